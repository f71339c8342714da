"""Facial expression recognition demo: images, webcam snapshots and video clips (Gradio).

UI only: the pipeline (faces -> crops -> backbones -> fusion) is ``fer_models.pipeline``
and the explanations are ``explain``; this file lays out components and renders their result objects.

    python app.py [--model-repo USER/REPO] [--checkpoint-dir checkpoints] [--port 7860]

Weights come from the Hub repo named by ``--model-repo`` or ``$FER_MODEL_REPO``; offline (``HF_HUB_OFFLINE=1``)
or when the Hub is unreachable they come at once from ``checkpoints/``. Models load once per process.
"""
from __future__ import annotations

import argparse
import functools
import html
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import cv2
import gradio as gr
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from explain import DEFAULT_METHOD, METHODS, Explainer
from fer_models.pipeline.faces import DEFAULT_DETECTOR, DETECTORS
from fer_models.pipeline import (
    DEFAULT_CHECKPOINT_DIR, ENV_MODEL_REPO, MAX_IMAGE_PIXELS, FacePredictor, ImageAnalysis, InputError,
    ModelLoadError, annotate, class_color, get_predictor,
)
from fer_models.pipeline.video import DEFAULT_SAMPLE_FPS, MAX_SECONDS, VideoAnalysis, analyze_video, read_frame_at

try:  # explain.overlay renders heatmaps the same way everywhere; the fallback keeps the app usable without it
    from explain.overlay import overlay_on_face as _overlay_on_face
except ImportError:  # pragma: no cover
    _overlay_on_face = None

try:  # Hugging Face ZeroGPU: request a GPU per call only where the `spaces` package exists
    import spaces

    GPU = spaces.GPU
except ImportError:
    def GPU(fn=None, **_kwargs):  # noqa: N802 - mirrors spaces.GPU, usable bare or with arguments
        return fn if fn is not None else (lambda f: f)

log = logging.getLogger("fer_app")
# Gradio opens uploads with Pillow before we see them; raise Pillow's bomb limit to ours so that the loader,
# not Pillow, decides (and says so clearly).
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

TITLE = "Facial expression recognition: three backbones and their fusion"
DESCRIPTION = """
Upload a photo, take a webcam snapshot or upload a short video clip. Every face is found, aligned and classified
into the FER2013 expressions by three CNN backbones (VGG19, ResNet18 and a CBAM attention network), whose votes
a learned **fusion** layer combines. For each face you see the fused probabilities, each backbone's vote beside
them, Grad-CAM heatmaps of every backbone and of the fused decision, and the attention maps.
Read the heatmaps with care: on FER2013 test faces, Grad-CAM (the default, and the method whose maps depend most
on the learned weights) removes the evidence better than random but not better than a plain centre blob for the
fused decision (see the README's faithfulness table).
"""
PREDICTED = "predicted class"
OUTPUT_DIR = Path(tempfile.gettempdir()) / "fer_app_outputs"
OUTPUT_MAX_AGE_S = 3600
DISPLAY_MAX_SIDE = 1280
EXAMPLES_DIR = Path(__file__).parent / "examples"
CSS = """
.prob-table {border-collapse: collapse; font-size: 0.85em; margin-bottom: 1em}
.prob-table td, .prob-table th {padding: 2px 6px; border: 1px solid #ddd; text-align: left; min-width: 6em}
.prob-table th.disagree {color: #c00}
"""


# ----------------------------------------------------------------------------------------------------------------
# Model holder and helpers
# ----------------------------------------------------------------------------------------------------------------
class PredictorHolder:
    """Loads the predictor on first use (once per process, thread-safe); or wraps a ready one (tests)."""

    def __init__(self, predictor: Optional[FacePredictor] = None, *, repo_id: Optional[str] = None,
                 checkpoint_dir: Union[str, Path, None] = None, device: Optional[str] = None):
        self._predictor = predictor
        self.repo_id = repo_id
        self.checkpoint_dir = checkpoint_dir or os.environ.get("FER_CHECKPOINT_DIR", DEFAULT_CHECKPOINT_DIR)
        self.device = device
        self._lock = threading.Lock()

    def get(self) -> FacePredictor:
        with self._lock:
            if self._predictor is None:
                self._predictor = get_predictor(self.repo_id, self.checkpoint_dir, device=self.device,
                                                make_explainer=Explainer)
            return self._predictor


def user_errors(fn: Callable) -> Callable:
    """Turn input and model problems into a clear message in the UI; log anything else without a stack trace
    reaching the user."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (InputError, ModelLoadError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except MemoryError:
            raise gr.Error("Out of memory on this input: try a smaller image or a shorter clip.",
                           print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the server must keep serving
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Sorry, this input could not be analysed ({type(e).__name__}: {e}).",
                           print_exception=False) from None
    return wrapper


def _output_path(name: str) -> str:
    """A fresh file ``name`` in its own folder (so downloads keep a readable name); results older than an
    hour are removed so the disk stays bounded."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in OUTPUT_DIR.iterdir():
        try:
            if now - old.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return str(Path(tempfile.mkdtemp(dir=OUTPUT_DIR)) / name)


def _display(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = DISPLAY_MAX_SIDE / max(h, w)
    if s >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _overlay(face: np.ndarray, heat: np.ndarray) -> np.ndarray:
    if _overlay_on_face is not None:
        return np.asarray(_overlay_on_face(face, heat))
    h = cv2.resize(np.asarray(heat, np.float32), face.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    color = cv2.cvtColor(cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (0.5 * face + 0.5 * color).astype(np.uint8)


def tolerant_preprocess(component: gr.Image) -> gr.Image:
    """Make an image input hand bad uploads to our loader, which says what is wrong, instead of failing in
    Gradio's preprocessing with Pillow's bare error. (An instance patch: a gr.Image subclass would make Gradio
    write a .pyi file next to this one at import.)"""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except Exception:  # noqa: BLE001
            return str(payload.path) if payload is not None and payload.path else None

    component.preprocess = preprocess
    return component


# ----------------------------------------------------------------------------------------------------------------
# Rendering result objects
# ----------------------------------------------------------------------------------------------------------------
def faces_html(analysis: ImageAnalysis) -> str:
    """Per face: a table of the fused probabilities beside each backbone's; a dissenting vote is red."""
    if not analysis.faces:
        return "<p>No faces.</p>"
    parts = []
    for f in analysis.faces:
        cols = [("fusion", f.label, f.probs)] + [(v.name, v.label, v.probs) for v in f.votes]
        agree = "all backbones agree" if f.agreement else "backbones disagree"
        head = "".join(
            f"<th class='{'agree' if lab == f.label else 'disagree'}'>{html.escape(n)}<br>{html.escape(lab)}</th>"
            for n, lab, _ in cols)
        rows = []
        for c in analysis.class_names:
            cells = []
            for _, lab, p in cols:
                v = p[c]
                r, g, b = class_color(c)
                style = f"background: linear-gradient(90deg, rgba({r},{g},{b},0.45) {v * 100:.1f}%, transparent 0)"
                txt = f"<b>{v:.1%}</b>" if c == lab else f"{v:.1%}"
                cells.append(f"<td style='{style}'>{txt}</td>")
            rows.append(f"<tr><td>{html.escape(c)}</td>{''.join(cells)}</tr>")
        parts.append(
            f"<h4>Face #{f.index}: {html.escape(f.label)} ({f.confidence:.0%}), {agree}</h4>"
            f"<table class='prob-table'><tr><th>class</th>{head}</tr>{''.join(rows)}</table>")
    return "\n".join(parts)


def heatmap_gallery(analysis: ImageAnalysis) -> list[tuple[np.ndarray, str]]:
    items = []
    for f in analysis.faces:
        if f.heatmaps is None:
            continue
        items.append((f.crop, f"#{f.index} face ({f.label})"))
        for name, heat in f.heatmaps.items():
            items.append((_overlay(f.crop, heat), f"#{f.index} {name}: {analysis.cam_method} for {f.cam_target}"))
    return items


def attention_gallery(analysis: ImageAnalysis) -> list[tuple[np.ndarray, str]]:
    items = []
    for f in analysis.faces:
        if f.heatmaps is None:  # shown for the explained faces, beside their Grad-CAMs
            continue
        for name, att in f.attention.items():
            items.append((_overlay(f.crop, att), f"#{f.index} {name} attention"))
    return items


def status_markdown(analysis: ImageAnalysis, source_text: str) -> str:
    n = len(analysis.faces)
    lines = [f"**{n} face{'s' if n != 1 else ''} found** (detector: {analysis.detector}, "
             f"test-time augmentation: {analysis.tta}) in {analysis.timings_ms.get('total', 0):.0f} ms."]
    lines += [f"- {html.escape(note)}" for note in analysis.notes]
    lines.append(f"\n<small>{source_text}</small>")
    return "\n".join(lines)


def top_label(analysis: ImageAnalysis) -> Optional[dict]:
    return analysis.faces[0].probs if analysis.faces else None


def timeline_figure(va: VideoAnalysis, max_tracks: int = 6) -> Figure:
    tracks = sorted(va.tracks, key=lambda t: -t.frames)[:max_tracks]
    fig = Figure(figsize=(9, 2.4 * max(1, len(tracks))), layout="constrained")
    if not tracks:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no faces found", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(len(tracks), 1, squeeze=False, sharex=True)[:, 0]
    for ax, tr in zip(axes, tracks):
        ts, ps = va.timeline(tr.track_id)
        for j, c in enumerate(va.class_names):
            ax.plot(ts, ps[:, j], label=c, color=np.array(class_color(c)) / 255, lw=1.5, marker=".", ms=3)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
        ax.set_title(f"Face ID{tr.track_id}: mostly {tr.dominant} ({tr.share[tr.dominant]:.0%} of its frames)",
                     fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    axes[-1].set_xlabel("time (s)")
    return fig


def summary_headers(class_names: list[str]) -> list[str]:
    return ["face", "frames", "seconds", "dominant"] + [f"% {c}" for c in class_names]


def summary_table(va: VideoAnalysis) -> pd.DataFrame:
    """One row per tracked face: dominant emotion and the share of its frames with each top label."""
    rows = [[f"ID{t.track_id}", t.frames, f"{t.first_s:.1f}-{t.last_s:.1f}", t.dominant]
            + [round(100 * t.share[c]) for c in va.class_names] for t in va.tracks]
    return pd.DataFrame(rows, columns=summary_headers(va.class_names))


def render_image(analysis: ImageAnalysis, rgb: np.ndarray, pred: FacePredictor) -> tuple:
    """A photo's or frame's eight outputs: annotated image, status, top label, then :func:`_face_panels`' five."""
    json_path = _output_path("fer_result.json")
    Path(json_path).write_text(analysis.to_json())
    return (
        _display(annotate(rgb, analysis.faces)), status_markdown(analysis, pred.source.describe()),
        top_label(analysis), faces_html(analysis), heatmap_gallery(analysis), attention_gallery(analysis),
        json_path, analysis.to_dict(),
    )


def video_status_markdown(va: VideoAnalysis, source_text: str) -> str:
    n = len(va.tracks)
    lines = [f"**{len(va.frames)} frames analysed** ({va.sample_fps:g} per second, "
             f"{va.analysed_seconds:.1f} s of a {va.info.duration:.1f} s {va.info.width}x{va.info.height} "
             f"{va.info.codec} clip), {n} face track{'s' if n != 1 else ''}, "
             f"in {va.timings_ms.get('total', 0) / 1000:.1f} s."]
    lines += [f"- {html.escape(note)}" for note in va.notes]
    lines.append(f"\n<small>{source_text}</small>")
    return "\n".join(lines)


def _target(cam_target: Optional[str]) -> Optional[str]:
    return None if cam_target in (None, "", PREDICTED) else cam_target


# ----------------------------------------------------------------------------------------------------------------
# The app: event handlers, then the two tabs' layouts
# ----------------------------------------------------------------------------------------------------------------
class Handlers(NamedTuple):
    analyze_image: Callable
    analyze_clip: Callable
    explain_frame: Callable
    model_info: Callable


def make_handlers(holder: PredictorHolder) -> Handlers:
    """The events' functions; their arguments mirror the UI inputs (closures, so ZeroGPU pickles no object)."""
    @GPU
    @user_errors
    def analyze_image(image, detector, tta, cam_method, cam_target, whole_image):
        """Analyse an image: faces, fused and per-backbone probabilities, Grad-CAM and attention maps."""
        if image is None:
            raise InputError("Please upload an image or take a webcam snapshot first.")
        pred = holder.get()
        analysis, rgb = pred.analyze_image(
            image, detector=detector or None, tta=bool(tta), whole_image=bool(whole_image), explain=True,
            cam_method=cam_method or DEFAULT_METHOD, cam_target=_target(cam_target),
        )
        return render_image(analysis, rgb, pred)

    @GPU(duration=120)
    @user_errors
    def analyze_clip(video, sample_fps, detector, tta, progress=gr.Progress()):
        """Analyse a video clip: per-face emotion timelines, summaries, annotated video and a CSV."""
        if video is None:
            raise InputError("Please upload a video clip first.")
        pred = holder.get()
        progress(0, desc="Reading the video")
        va = analyze_video(pred, video, sample_fps=float(sample_fps or DEFAULT_SAMPLE_FPS),
                           detector=detector or None, tta=bool(tta), out_path=_output_path("fer_annotated.mp4"),
                           progress=lambda f, text: progress(f, desc=text))
        last = max(va.analysed_seconds, 0.0)
        return (va.annotated_path, timeline_figure(va), summary_table(va), va.to_csv(_output_path("fer_frames.csv")),
                video_status_markdown(va, pred.source.describe()), va.to_dict(),
                gr.update(maximum=max(last, 0.1), value=min(last, last / 2)))

    @GPU
    @user_errors
    def explain_frame(video, time_s, detector, cam_method, cam_target):
        """Grad-CAM and attention maps for the faces of one frame of a clip."""
        if video is None:
            raise InputError("Please upload a video clip first.")
        pred = holder.get()
        t, rgb = read_frame_at(video, float(time_s or 0.0))
        analysis = pred.analyze_array(rgb, detector=detector or None, explain=True,
                                      cam_method=cam_method or DEFAULT_METHOD, cam_target=_target(cam_target),
                                      notes=[f"Frame at {t:.2f} s."])
        return render_image(analysis, rgb, pred)

    def model_info() -> str:
        try:
            pred = holder.get()
            return f"{pred.source.describe()} Backbones: {', '.join(pred.backbones)}."
        except ModelLoadError as e:
            return f"**No model loaded:** {e}"

    return Handlers(analyze_image, analyze_clip, explain_frame, model_info)


def _explain_options(class_choices: list[str]) -> tuple[gr.Dropdown, gr.Dropdown]:
    return (gr.Dropdown(list(METHODS), value=DEFAULT_METHOD, label="Explanation method"),
            gr.Dropdown(class_choices, value=PREDICTED, allow_custom_value=True, label="Explain which class"))


def _face_panels(ids: bool = False) -> list:
    """Per-face table, Grad-CAM and attention galleries, JSON result: the last five of an image's outputs."""
    faces = gr.HTML(label="Per face: fusion and each backbone's vote", elem_id="faces-table" if ids else None)
    with gr.Row():
        cams = gr.Gallery(label="Grad-CAM: each backbone and the fused decision", columns=5, height=320,
                          elem_id="cam-gallery" if ids else None)
        atts = gr.Gallery(label="CBAM spatial attention", columns=4, height=320,
                          elem_id="attention-gallery" if ids else None)
    with gr.Row():
        json_file, json_view = gr.File(label="Result (JSON)"), gr.JSON(label="Result", open=False)
    return [faces, cams, atts, json_file, json_view]


def image_tab(h: Handlers, class_choices: list[str]) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            # image_mode=None: Gradio passes the file through untouched (with "RGB" it would decode and re-encode
            # every upload, 20000 x 20000 ones included); our loader converts.
            image_in = tolerant_preprocess(gr.Image(
                label="Image (upload, webcam or paste)", type="filepath", image_mode=None,
                sources=["upload", "webcam", "clipboard"], elem_id="image-input"))
            with gr.Accordion("Options", open=False):
                detector_in = gr.Radio(list(DETECTORS), value=DEFAULT_DETECTOR, label="Face detector")
                tta_in = gr.Checkbox(False, label="Ten-crop test-time augmentation (slower)")
                method_in, target_in = _explain_options(class_choices)
            whole_in = gr.Checkbox(False, label="If no face is found, classify the whole image as one face")
            image_btn = gr.Button("Analyse image", variant="primary", elem_id="analyze-image")
        with gr.Column(scale=2):
            annotated_out = gr.Image(label="Faces", type="numpy", format="jpeg", elem_id="annotated")
            status_out = gr.Markdown(elem_id="image-status")
            label_out = gr.Label(num_top_classes=7, label="Face #1, fused prediction", elem_id="top-label")
    outputs = [annotated_out, status_out, label_out] + _face_panels(ids=True)
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))
    if examples:
        gr.Examples(examples, inputs=image_in, label="Examples (generated or from scikit-image)")
    image_btn.click(h.analyze_image, [image_in, detector_in, tta_in, method_in, target_in, whole_in], outputs,
                    api_name="analyze_image", concurrency_id="model")


def video_tab(h: Handlers, class_choices: list[str]) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            video_in = gr.Video(label=f"Video clip (mp4, webm, mov, avi; up to {MAX_SECONDS:.0f} s)",
                                sources=["upload"], format=None, include_audio=True, elem_id="video-input")
            fps_in = gr.Slider(1, 10, value=DEFAULT_SAMPLE_FPS, step=1, label="Frames analysed per second")
            detector_in = gr.Radio(list(DETECTORS), value=DEFAULT_DETECTOR, label="Face detector")
            tta_in = gr.Checkbox(False, label="Ten-crop test-time augmentation (slower)")
            video_btn = gr.Button("Analyse video", variant="primary", elem_id="analyze-video")
        with gr.Column(scale=2):
            video_out = gr.Video(label="Annotated video (H.264)", format=None, elem_id="annotated-video")
            status_out = gr.Markdown()
    videos = sorted(str(p) for p in EXAMPLES_DIR.glob("*.mp4"))
    if videos:
        gr.Examples(videos, inputs=video_in, label="Example clip (generated)")
    timeline_out = gr.Plot(label="Emotion timeline per face")
    summary_out = gr.Dataframe(headers=summary_headers(class_choices[1:]), label="Summary per face",
                               interactive=False)
    with gr.Row():
        csv_out = gr.File(label="Per-frame results (CSV)")
        json_out = gr.JSON(label="Summary", open=False)
    gr.Markdown("### Grad-CAM for one frame")
    with gr.Row():
        time_in = gr.Slider(0, MAX_SECONDS, value=0, step=0.1, label="Frame time (s)")
        method_in, target_in = _explain_options(class_choices)
        frame_btn = gr.Button("Explain this frame")
    with gr.Row():
        frame_out = gr.Image(label="Frame", type="numpy", format="jpeg")
        frame_status_out = gr.Markdown()
    frame_label_out = gr.Label(num_top_classes=7, label="Face #1, fused prediction")
    frame_outputs = [frame_out, frame_status_out, frame_label_out] + _face_panels()
    video_btn.click(h.analyze_clip, [video_in, fps_in, detector_in, tta_in],
                    [video_out, timeline_out, summary_out, csv_out, status_out, json_out, time_in],
                    api_name="analyze_video", concurrency_id="model")
    frame_btn.click(h.explain_frame, [video_in, time_in, detector_in, method_in, target_in], frame_outputs,
                    api_name="explain_video_frame", concurrency_id="model")


def build_demo(predictor: Union[FacePredictor, PredictorHolder, None] = None) -> gr.Blocks:
    """The Gradio app. ``predictor``: a ready FacePredictor (tests), a holder, or None (load on first use)."""
    holder = predictor if isinstance(predictor, PredictorHolder) else PredictorHolder(predictor)
    handlers = make_handlers(holder)
    class_choices = [PREDICTED] + _class_names_hint(holder)
    with gr.Blocks(title="Facial expression recognition", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}")
        model_md = gr.Markdown("Loading model information...")
        with gr.Tab("Image or webcam"):
            image_tab(handlers, class_choices)
        with gr.Tab("Video clip"):
            video_tab(handlers, class_choices)
        demo.load(handlers.model_info, None, model_md, api_name="model_info")
    return demo


def _class_names_hint(holder: PredictorHolder) -> list[str]:
    """Class names for the target dropdown without forcing a model load at import time."""
    if holder._predictor is not None:
        return list(holder._predictor.class_names)
    from fer_models import FER2013_CLASSES

    return list(FER2013_CLASSES)


# Overload is refused politely, not by running out of memory: at most QUEUE_MAX_SIZE requests wait (beyond that
# a client gets "Queue is full" at once), `concurrency` run at a time, and uploads above MAX_FILE_SIZE are refused
# before they are stored. A waiting request holds only its uploaded file on disk (docs/reliability.md).
QUEUE_MAX_SIZE = 64
MAX_FILE_SIZE = "200mb"


def _atomic_image_cache() -> None:
    """Gradio 6.31 writes each image output to a content-hashed cache path in place, so two requests with the
    same output image (one photo sent twice at once) truncate a file while it is being served: the client gets
    "peer closed connection" (found by the soak test). Write under a temporary name and rename, as Gradio already
    does for files in ``save_file_to_cache``; a reader of the old copy keeps reading a complete file."""
    from gradio import processing_utils as pu

    if getattr(pu.save_pil_to_cache, "atomic", False):
        return

    def save_pil_to_cache(img, cache_dir, name="image", format="webp"):
        data = pu.encode_pil_to_bytes(img, format)
        folder = Path(cache_dir) / pu.hash_bytes(data)
        folder.mkdir(exist_ok=True, parents=True)
        target = (folder / f"{name}.{format}").resolve()
        if target.exists():
            os.utime(target)  # delete_cache ages files by ctime: a copy handed out again is fresh
        else:
            fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(staging, target)
        return str(target)

    save_pil_to_cache.atomic = True
    pu.save_pil_to_cache = save_pil_to_cache


def launch(demo: gr.Blocks, *, concurrency: int = 2, queue_max_size: int = QUEUE_MAX_SIZE, **kwargs):
    """Queue with a concurrency limit (bounds memory) and a length limit, upload size limit, then launch."""
    _atomic_image_cache()
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_max_size)
    kwargs.setdefault("max_file_size", MAX_FILE_SIZE)
    kwargs.setdefault("show_error", True)
    kwargs.setdefault("ssr_mode", False)
    kwargs.setdefault("css", CSS)
    return demo.launch(**kwargs)


# Built at import (no model load, no download): `gradio app.py` and Spaces find `demo` here.
demo = build_demo()


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-repo", default=os.environ.get(ENV_MODEL_REPO),
                    help=f"Hub repo id of the weights (default ${ENV_MODEL_REPO}); falls back to --checkpoint-dir")
    ap.add_argument("--checkpoint-dir", default=os.environ.get("FER_CHECKPOINT_DIR", DEFAULT_CHECKPOINT_DIR))
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--concurrency", type=int, default=2, help="requests processed at once (memory bound)")
    ap.add_argument("--queue-size", type=int, default=QUEUE_MAX_SIZE,
                    help="requests that may wait; more are refused with 'Queue is full'")
    ap.add_argument("--max-file-size", default=MAX_FILE_SIZE, help="largest upload accepted, e.g. 200mb")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    holder = PredictorHolder(repo_id=args.model_repo or None, checkpoint_dir=args.checkpoint_dir,
                             device=args.device)
    try:
        pred = holder.get()  # load now, so a missing or broken checkpoint is reported before serving
    except ModelLoadError as e:
        sys.exit(f"error: {e}")
    log.info("%s", pred.source.describe())
    launch(build_demo(holder), concurrency=args.concurrency, queue_max_size=args.queue_size,
           max_file_size=args.max_file_size, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
