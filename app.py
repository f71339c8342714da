"""Facial expression recognition demo: images, webcam snapshots and video clips (Gradio).

UI only: the pipeline (faces -> crops -> backbones -> fusion) is ``fer_models.pipeline``
and the explanations are ``explain``; this file lays out components and renders their result objects.

    python app.py [--model-repo USER/REPO] [--checkpoint-dir checkpoints] [--port 7860]

Weights come from the Hub repo named by ``--model-repo`` or ``$FER_MODEL_REPO``; offline (``HF_HUB_OFFLINE=1``)
or when the Hub is unreachable they come at once from ``checkpoints/``. Models load once per process.
"""
from __future__ import annotations

import argparse
import base64
import functools
import html
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Union

import cv2
import gradio as gr
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from explain import DEFAULT_METHOD, METHODS, Explainer
from fer_models.models.predict import PREDICTED_CLASS
from fer_models.pipeline import allocator
from fer_models.pipeline.faces import DEFAULT_DETECTOR, DETECTORS
from fer_models.pipeline.overlay import colormap_lut, overlay_on_face
from fer_models.pipeline import (
    DEFAULT_CHECKPOINT_DIR, ENV_MODEL_REPO, MAX_IMAGE_PIXELS, FacePrediction, FacePredictor, ImageAnalysis, InputError,
    ModelLoadError, annotate, class_color, get_predictor,
)
from fer_models.pipeline.video import DEFAULT_SAMPLE_FPS, MAX_SECONDS, VideoAnalysis, analyze_video, read_frame_at
from fer_models.pipeline.live import LiveFrame, LiveModels, LiveSession, default_student_dir
from fer_models.pipeline.smoothing import DEFAULT_TIME_CONSTANT_S

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

TITLE = "Facial expression recognition you can look inside"
DESCRIPTION = """
Upload a photo, take a webcam snapshot or upload a short video. The app finds every face and tells which of seven
facial expressions it shows most: angry, disgust, fear, happy, sad, surprise or neutral. Three neural networks
look at each face and a small fusion step combines their votes. Each face gets a card with the combined answer,
each network's vote, and heatmaps of the parts of the face the networks relied on.
An expression is not an emotion, and the networks make mistakes, more often on photos unlike the ones they
learned from: see *About the model*.
"""
# Static facts about the approach; the accuracies of the weights actually loaded come from model_info().
ABOUT = """
**What it is.** Three convolutional neural networks (VGG19, ResNet18, and a VGG19 with CBAM attention), each
trained from scratch on FER2013: 28,709 small (48 x 48 pixel) grey face photos, each labelled with one of seven
expressions. A small learned layer (the *fusion*) combines the three networks' outputs into the final answer.
Faces are found by a face detector (BlazeFace; MTCNN and OpenCV's Haar cascade under *Options*), turned so the
eyes are level, and shrunk to 48 x 48 grey pixels, as in FER2013.

**How sure it is.** The confidence shown is calibrated on FER2013's PublicTest faces (a temperature, then a
correction of the top answer's confidence; neither changes an answer): on faces like FER2013's, answers shown
with 80% confidence should be right about 80% of the time. How well that holds on other faces is measured below.
On photos unlike FER2013 (studio portraits, other lighting, other people) the shipped networks are right far less
often: 39% to 46% on the JAFFE posed photos, for instance.

**What the heatmaps can and cannot show.** Grad-CAM colours the parts of the face that raised the score of the
explained expression most, for each network and for the combined decision. Each map is scaled to its own
maximum, so compare *where* the networks look, not how strongly. On FER2013 test faces these maps pick out
relevant regions better than a random map but no better than a plain blob in the middle of the face: they are a
rough pointer, not proof of what drove a decision. The attention maps are the CBAM network's own weights, shown
as they are on a fixed 0 to 1 scale (0: ignored, 1: kept in full); a map of one colour means that stage kept
the whole face about equally.

**What it is not.** A facial expression is not an emotion, and FER2013 has known biases (age, ethnicity, pose,
label noise). This is a demo for looking inside models, not a tool for judging people.
"""
OUTPUT_DIR = Path(tempfile.gettempdir()) / "fer_app_outputs"
OUTPUT_MAX_AGE_S = 3600
DISPLAY_MAX_SIDE = 1280
EXAMPLES_DIR = Path(__file__).parent / "examples"
CSS = ""  # page-wide CSS for launch(); the result cards carry their own (CARD_CSS)
THUMB_PX = 112  # displayed side of the face thumbnails in the cards (crops are 144 px: shrunk, never cut)
METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "hirescam": "HiResCAM", "layercam": "LayerCAM",
                "eigencam": "EigenCAM"}
# Scoped to the cards' gr.HTML (css_template), so the cards look the same however the app is launched.
CARD_CSS = """
.fer-card {border: 1px solid var(--border-color-primary, #ddd); border-radius: 8px; padding: 10px 12px;
  margin: 0 0 12px 0}
.fer-card h3 {margin: 0 0 8px 0; font-size: 1.15em}
.fer-card .fer-agree {font-weight: normal; font-size: 0.8em; opacity: 0.75}
.fer-top {display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start}
.fer-top img.fer-crop {border-radius: 4px}
.fer-bars, .fer-bars td, .fer-maps table, .fer-maps td, .fer-maps th {border: none !important}
.fer-bars tr, .fer-maps tr, .fer-bars tbody, .fer-maps tbody {border: none !important; background: none !important}
.fer-bars {border-collapse: collapse; font-size: 0.85em; margin: 0}
.fer-bars td {padding: 1px 6px 1px 0; white-space: nowrap; border: none}
.fer-bars caption {text-align: left; font-weight: 600; padding-bottom: 3px}
.fer-bar {display: inline-block; height: 0.8em; border-radius: 2px; vertical-align: middle}
.fer-track {display: inline-block; width: 110px; background: rgba(128,128,128,0.15); border-radius: 2px}
.fer-dissent {color: #c00}
.fer-maps {margin-top: 10px; display: flex; flex-wrap: wrap; gap: 10px 28px}
.fer-maps table {border-collapse: collapse}
.fer-maps caption {text-align: left; font-weight: 600; font-size: 0.9em; padding-bottom: 3px}
.fer-maps th {font-weight: normal; font-size: 0.8em; text-align: center; padding: 0 3px; border: none}
.fer-maps td {padding: 0 3px; border: none; text-align: center; vertical-align: top; font-size: 0.75em}
.fer-maps img {display: block; border-radius: 3px}
.fer-legend {display: flex; align-items: center; gap: 6px; font-size: 0.75em; margin-top: 4px; max-width: 600px}
.fer-scale {display: inline-block; width: 140px; min-width: 140px; height: 10px; border-radius: 2px}
.fer-card[data-compact] {display: inline-flex; gap: 10px; align-items: flex-start; margin: 0 10px 10px 0;
  padding: 6px 8px; vertical-align: top; max-width: 360px}
.fer-card[data-compact] h3 {font-size: 1em; margin: 0 0 4px 0}
details.fer-details {margin-top: 8px; font-size: 0.85em}
.fer-table {border-collapse: collapse; margin-top: 4px}
.fer-table td, .fer-table th {padding: 2px 6px; border: 1px solid var(--border-color-primary, #ddd); text-align: left}
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
def _img(rgb: np.ndarray, alt: str, px: int = THUMB_PX, cls: str = "") -> str:
    """An <img> of ``rgb`` embedded as a JPEG data URI, shown whole at ``px`` x ``px`` (square crops and maps)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 90])
    src = "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")
    return (f"<img src='{src}' width='{px}' height='{px}' alt='{html.escape(alt)}' title='{html.escape(alt)}'"
            f"{f' class={chr(39)}{cls}{chr(39)}' if cls else ''}>")


@functools.lru_cache(maxsize=1)
def _scale_css() -> str:
    """The heatmaps' colour table (explain.overlay's) as a CSS gradient from 0 (left) to 1 (right)."""
    lut = colormap_lut()
    stops = ", ".join(f"rgb({r},{g},{b}) {100 * i / 16:.0f}%"
                      for i, (r, g, b) in enumerate(lut[np.linspace(0, 255, 17).astype(int)]))
    return f"linear-gradient(90deg, {stops})"


def _legend(low: str, high: str, text: str) -> str:
    return (f"<div class='fer-legend'><span>{low}</span><span class='fer-scale' style='background: {_scale_css()}'>"
            f"</span><span>{high}</span><span>{text}</span></div>")


def _bar_row(name: str, label: str, value: float, *, bold: bool = False, dissent: bool = False) -> str:
    r, g, b = class_color(label)
    name_html = f"<b>{html.escape(name)}</b>" if bold else html.escape(name)
    cls = " class='fer-dissent'" if dissent else ""
    label_cell = f"<td{cls}>{html.escape(label)}</td>" if label != name else ""
    return (f"<tr><td>{name_html}</td>{label_cell}<td><span class='fer-track'><span class='fer-bar' "
            f"style='width: {100 * value:.1f}%; background: rgb({r},{g},{b})'></span></span></td>"
            f"<td>{value:.0%}</td></tr>")


def _probability_table(f: FacePrediction, class_names: list[str]) -> str:
    """Every class's probability for the fusion and each backbone: the full numbers, for the curious."""
    cols = [("fusion", f.probs, f.label)] + [(v.name, v.probs, v.label) for v in f.votes]
    head = "".join(f"<th>{html.escape(n)}</th>" for n, _, _ in cols)
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td>"
        + "".join(f"<td>{'<b>' if c == lab else ''}{p[c]:.1%}{'</b>' if c == lab else ''}</td>" for _, p, lab in cols)
        + "</tr>" for c in class_names)
    return (f"<details class='fer-details'><summary>All probabilities</summary>"
            f"<table class='fer-table'><tr><th>expression</th>{head}</tr>{rows}</table></details>")


def _cam_row(f: FacePrediction, backbones: list[str], method: Optional[str]) -> str:
    """The face, then its Grad-CAM for each backbone and for the fused decision, one labelled column each."""
    names = [n for n in backbones if n in f.heatmaps] + [n for n in f.heatmaps if n not in backbones]
    heads = ["face"] + ["fused decision" if n == "fusion" else n for n in names]
    cells = [_img(f.crop, f"face #{f.index}")] + [
        _img(overlay_on_face(f.crop, f.heatmaps[n]), f"face #{f.index}: {n}") for n in names]
    what = METHOD_NAMES.get(method if method in METHOD_NAMES else DEFAULT_METHOD, method)
    caption = f"{html.escape(what)}: where each network looked to score “{html.escape(f.cam_target or f.label)}”"
    return (f"<div><table><caption>{caption}</caption><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in heads)}"
            f"</tr><tr>{''.join(f'<td>{c}</td>' for c in cells)}</tr></table>"
            + _legend("low", "high", "each map scaled to its own maximum: compare where, not how strongly") + "</div>")


def _stage_label(layer: str) -> str:
    """"stage3" (VGG) or "layer3" (ResNet) -> "stage 3"; other names as they are."""
    m = re.fullmatch(r"(?:stage|layer)(\d+)", layer)
    return f"stage {m.group(1)}" if m else layer


def _value_range(m: np.ndarray) -> str:
    """"min–max" of a map, leaving out the zero border where the model's centre crop cut the face frame."""
    inside = m[m > 0]
    return f"{float(inside.min()):.2f}–{float(inside.max()):.2f}" if inside.size else "0"


def _attention_rows(f: FacePrediction) -> list[str]:
    """Per attention network, its stages' maps on the absolute 0-1 scale (sigmoid outputs, not stretched), each
    with its own range underneath."""
    by_member: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, att in f.attention.items():
        member, _, layer = key.partition("/")
        by_member.setdefault(member, []).append((layer or member, np.asarray(att, np.float32)))
    out = []
    for member, maps in by_member.items():
        heads = "".join(f"<th>{html.escape(_stage_label(layer))}</th>" for layer, _ in maps)
        imgs = "".join(f"<td>{_img(overlay_on_face(f.crop, np.clip(m, 0, 1)), f'{member} {layer}')}"
                       f"{_value_range(m)}</td>" for layer, m in maps)
        out.append(f"<div><table><caption>{html.escape(member)} attention, by stage</caption><tr>{heads}</tr>"
                   f"<tr>{imgs}</tr></table>"
                   + _legend("0", "1", "attention weight as computed (0: ignored, 1: kept); not rescaled") + "</div>")
    return out


def face_card(f: FacePrediction, analysis: ImageAnalysis) -> str:
    """One face: its aligned crop, the fused label and confidence, every class's fused probability, each
    backbone's vote as a bar, and (for explained faces) its Grad-CAM and attention rows."""
    r, g, b = class_color(f.label)
    n_dissent = sum(v.label != f.label for v in f.votes)
    agree = ("all backbones agree" if not n_dissent else
             f"{n_dissent} of {len(f.votes)} backbone{'s' if len(f.votes) != 1 else ''} disagree")
    fused = sorted(analysis.class_names, key=lambda c: -f.probs[c])
    probs = "".join(_bar_row(c, c, f.probs[c], bold=c == f.label) for c in fused)
    votes = "".join(_bar_row(v.name, v.label, v.confidence, dissent=v.label != f.label) for v in f.votes)
    top = (f"<div class='fer-top'>{_img(f.crop, f'face #{f.index}', 144, 'fer-crop')}"
           f"<table class='fer-bars'><caption>Fused probabilities</caption>{probs}</table>"
           f"<table class='fer-bars'><caption>Each backbone's vote</caption>{votes}</table></div>")
    title = (f"<h3>#{f.index} <span style='color: rgb({r},{g},{b})'>{html.escape(f.label)}</span> "
             f"{f.confidence:.0%} <span class='fer-agree'>({agree})</span></h3>")
    attrs = f"class='fer-card' id='face-card-{f.index}' data-face='{f.index}' data-label='{html.escape(f.label)}'"
    if f.heatmaps is None:  # beyond the explained (largest) faces: a small card, several to a row
        return (f"<section {attrs} data-compact='1'>{_img(f.crop, f'face #{f.index}', 72)}<div>{title}"
                f"<table class='fer-bars'>{votes}</table><small>No heatmaps for this face: they are computed for the "
                f"largest faces only.</small></div></section>")
    maps = "<div class='fer-maps'>" + "".join(
        [_cam_row(f, analysis.backbones, analysis.cam_method)] + _attention_rows(f)) + "</div>"
    return f"<section {attrs}>{title}{top}{maps}{_probability_table(f, analysis.class_names)}</section>"


def face_cards(analysis: ImageAnalysis) -> str:
    """A card per face, in the order of the numbers drawn on the image."""
    if not analysis.faces:
        return "<p>No faces to show.</p>"
    return "<div class='fer-cards'>" + "".join(
        face_card(f, analysis) for f in sorted(analysis.faces, key=lambda f: f.index)) + "</div>"


def status_markdown(analysis: ImageAnalysis) -> str:
    n = len(analysis.faces)
    tta = "on" if analysis.tta == "tencrop" else "off"
    lines = [f"**{n} face{'s' if n != 1 else ''} found** in {analysis.timings_ms.get('total', 0):.0f} ms "
             f"(face detector: {analysis.detector}; ten-crop averaging: {tta})."]
    lines += [f"- {html.escape(note)}" for note in analysis.notes]
    return "\n".join(lines)


def timeline_figure(va: VideoAnalysis, max_tracks: int = 6,
                    smoothed: Optional[Mapping[int, tuple[np.ndarray, np.ndarray]]] = None) -> Figure:
    """One panel per tracked face (the ``max_tracks`` longest tracks, in order of appearance): each expression's
    fused probability over time. Raw values are dots joined by thin lines; ``smoothed`` (track id -> times and a
    T x C array, where the pipeline smooths) is drawn over them as thick lines. The y axis runs a little past 0
    and 1 so that lines at exactly 0 or 1 stay visible."""
    tracks = sorted(sorted(va.tracks, key=lambda t: -t.frames)[:max_tracks], key=lambda t: t.track_id)
    fig = Figure(figsize=(9, 0.6 + 2.0 * max(1, len(tracks))), layout="constrained")
    if not tracks:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no faces found", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = fig.subplots(len(tracks), 1, squeeze=False, sharex=True)[:, 0]
    smooth = smoothed or {}
    for ax, tr in zip(axes, tracks):
        ts, ps = va.timeline(tr.track_id)
        has_smooth = tr.track_id in smooth
        for j, c in enumerate(va.class_names):
            color = np.array(class_color(c)) / 255
            ax.plot(ts, ps[:, j], color=color, lw=0.8 if has_smooth else 1.5, marker=".", ms=4,
                    alpha=0.5 if has_smooth else 1.0, label=None if has_smooth else c)
            if has_smooth:
                sts, sps = smooth[tr.track_id]
                ax.plot(sts, np.asarray(sps)[:, j], color=color, lw=2.2, label=c)
        ax.set_ylim(-0.06, 1.06)
        ax.set_yticks([0, 0.5, 1])
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylabel("probability")
        tau = getattr(va, "smooth_s", 0)
        kind = f" (dots: each frame; lines: smoothed{f' over {tau:g} s' if tau else ''})" if has_smooth else ""
        ax.set_title(f"Face ID{tr.track_id}: mostly {tr.dominant} ({tr.share[tr.dominant]:.0%} of its frames){kind}",
                     fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    axes[-1].set_xlabel("time in the clip (s)")
    if len(va.tracks) > len(tracks):
        fig.suptitle(f"The {len(tracks)} longest of {len(va.tracks)} tracked faces", fontsize=10)
    return fig


def summary_headers(class_names: list[str]) -> list[str]:
    return ["face", "frames", "seconds", "dominant"] + [f"% {c}" for c in class_names]


def summary_table(va: VideoAnalysis) -> pd.DataFrame:
    """One row per tracked face: dominant emotion and the share of its frames with each top label."""
    rows = [[f"ID{t.track_id}", t.frames, f"{t.first_s:.1f}-{t.last_s:.1f}", t.dominant]
            + [round(100 * t.share[c]) for c in va.class_names] for t in va.tracks]
    return pd.DataFrame(rows, columns=summary_headers(va.class_names))


def render_image(analysis: ImageAnalysis, rgb: np.ndarray) -> tuple:
    """A photo's or frame's five outputs: annotated image, status, the face cards, the JSON file and its dict."""
    json_path = _output_path("fer_result.json")
    Path(json_path).write_text(analysis.to_json())
    return (_display(annotate(rgb, analysis.faces)), status_markdown(analysis), face_cards(analysis), json_path,
            analysis.to_dict())


def video_status_markdown(va: VideoAnalysis) -> str:
    n = len(va.tracks)
    lines = [f"**{len(va.frames)} frames analysed** ({va.sample_fps:g} per second, "
             f"{va.analyzed_seconds:.1f} s of a {va.info.duration:.1f} s {va.info.width}x{va.info.height} "
             f"{va.info.codec} clip), {n} face track{'s' if n != 1 else ''}, "
             f"in {va.timings_ms.get('total', 0) / 1000:.1f} s."]
    lines += [f"- {html.escape(note)}" for note in va.notes]
    return "\n".join(lines)


def model_facts(results: Optional[dict], backbones: list[str]) -> str:
    """The accuracies a checkpoint's results.json records, in plain words ("" when it records none of them)."""
    results = results or {}

    def accuracy(key: str) -> Optional[float]:
        v = results.get(key)
        return float(v["accuracy"]) if isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float)) else None

    private, tencrop, ck = accuracy("PrivateTest/center"), accuracy("PrivateTest/tencrop"), accuracy("ckplus48/center")
    if private is None:
        return ""
    row = results["PrivateTest/center"]
    n = f"{row['n']:,} " if isinstance(row.get("n"), int) else ""
    text = (f"**How often it is right.** On FER2013's PrivateTest set ({n}faces used neither for training nor for "
            f"choosing the model) the combined answer is right {private:.1%} of the time")
    if tencrop is not None:
        text += f" ({tencrop:.1%} when ten shifted crops of each face are averaged)"
    members = {k: v["accuracy"] for k, v in (row.get("members") or {}).items()
               if isinstance(v, dict) and "accuracy" in v}
    if members:
        text += "; each network alone: " + ", ".join(f"{k} {members[k]:.1%}" for k in backbones if k in members)
    text += "."
    if ck is not None:
        n_ck = results["ckplus48/center"].get("n")
        text += (f" On CK+, another collection ({f'{n_ck:,} ' if isinstance(n_ck, int) else ''}posed faces of the "
                 f"six expressions it shares with FER2013), {ck:.1%}.")
    return text + calibration_facts(results.get("calibration"))


def calibration_facts(cal: Optional[dict]) -> str:
    """The measured calibration of the combined answer in plain words ("" when results.json has none)."""
    try:
        rows = {row: r["outputs"]["fused"] for row, r in cal["rows"].items()}
        private = rows["fer2013/PrivateTest"]
    except (TypeError, KeyError):
        return ""
    text = (f"\n\n**How sure it is, measured.** On PrivateTest the confidence shown is off from how often such "
            f"answers are right by {private['ece_after']:.1%} on average (expected calibration error; "
            f"{private['ece_before']:.1%} before calibration)")
    names = {"ckplus48": "CK+", "jaffe/crops": "the JAFFE photos"}
    other = [f"{names[k]} {rows[k]['ece_after']:.1%}" for k in names if k in rows]
    if other:
        text += f"; on {', on '.join(other)}: on photos unlike FER2013 the confidence is still too high"
    return text + "."


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
            cam_method=cam_method or DEFAULT_METHOD, cam_target=cam_target,
        )
        return render_image(analysis, rgb)

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
                           progress=lambda f, text: progress(f, desc=text), smooth_s=DEFAULT_TIME_CONSTANT_S)
        last = max(va.analyzed_seconds, 0.0)
        smoothed = {t.track_id: va.timeline(t.track_id, smoothed=True) for t in va.tracks} if va.smooth_s else None
        return (va.annotated_path, timeline_figure(va, smoothed=smoothed), summary_table(va),
                va.to_csv(_output_path("fer_frames.csv")),
                video_status_markdown(va), va.to_dict(),
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
                                      cam_method=cam_method or DEFAULT_METHOD, cam_target=cam_target,
                                      notes=[f"Frame at {t:.2f} s."])
        return render_image(analysis, rgb)

    def model_info() -> str:
        """The loaded weights: their recorded accuracies in plain words, and where they come from."""
        try:
            pred = holder.get()
            return model_facts(pred.source.results, pred.backbones) + (
                f"\n\n<small>{pred.source.describe()} Backbones: {', '.join(pred.backbones)}.</small>")
        except ModelLoadError as e:
            return f"**No model loaded:** {e}"

    return Handlers(analyze_image, analyze_clip, explain_frame, model_info)


def _explain_options(class_choices: list[str]) -> tuple[gr.Dropdown, gr.Dropdown]:
    return (gr.Dropdown(list(METHODS), value=DEFAULT_METHOD, label="Explanation method"),
            gr.Dropdown(class_choices, value=PREDICTED_CLASS, allow_custom_value=True, label="Explain which class"))


def _result_panels(ids: bool = False) -> list:
    """The face cards and the JSON result (a file, and a collapsed view): the last three of an image's outputs."""
    cards = gr.HTML("", css_template=CARD_CSS, elem_id="face-cards" if ids else None, js_on_load=None)
    with gr.Accordion("Result as JSON", open=False):
        json_file = gr.File(label="Download the result (JSON)", elem_id="result-json" if ids else None)
        json_view = gr.JSON(label="Result", open=False)
    return [cards, json_file, json_view]


def image_tab(h: Handlers, class_choices: list[str]) -> None:
    # image_mode=None: Gradio passes the file through untouched (with "RGB" it would decode and re-encode every
    # upload, 20000 x 20000 ones included); our loader converts. Rendered below the examples that fill it.
    image_in = tolerant_preprocess(gr.Image(
        label="Image (upload, webcam or paste)", type="filepath", image_mode=None,
        sources=["upload", "webcam", "clipboard"], elem_id="image-input", render=False))
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))
    if examples:
        gr.Examples(examples, inputs=image_in, label="Try an example (generated from a public-domain photo)")
    with gr.Row():
        with gr.Column(scale=1):
            image_in.render()
            whole_in = gr.Checkbox(False, label="If no face is found, classify the whole image as one face")
            image_btn = gr.Button("Analyse image", variant="primary", elem_id="analyze-image")
            with gr.Accordion("Options", open=False):
                detector_in = gr.Radio(list(DETECTORS), value=DEFAULT_DETECTOR, label="Face detector")
                tta_in = gr.Checkbox(False, label="Ten-crop test-time augmentation (slower)")
                method_in, target_in = _explain_options(class_choices)
        with gr.Column(scale=2):
            annotated_out = gr.Image(label="Faces found", type="numpy", format="jpeg", elem_id="annotated")
            status_out = gr.Markdown(elem_id="image-status")
    outputs = [annotated_out, status_out] + _result_panels(ids=True)
    image_btn.click(h.analyze_image, [image_in, detector_in, tta_in, method_in, target_in, whole_in], outputs,
                    api_name="analyze_image", concurrency_id="model")


def video_tab(h: Handlers, class_choices: list[str]) -> None:
    video_in = gr.Video(label=f"Video clip (mp4, webm, mov, avi; up to {MAX_SECONDS:.0f} s)", sources=["upload"],
                        format=None, include_audio=True, elem_id="video-input", render=False)
    videos = sorted(str(p) for p in EXAMPLES_DIR.glob("*.mp4"))
    if videos:
        gr.Examples(videos, inputs=video_in, label="Try an example clip (generated)")
    with gr.Row():
        with gr.Column(scale=1):
            video_in.render()
            fps_in = gr.Slider(1, 10, value=DEFAULT_SAMPLE_FPS, step=1, label="Frames analysed per second")
            video_btn = gr.Button("Analyse video", variant="primary", elem_id="analyze-video")
            with gr.Accordion("Options", open=False):
                detector_in = gr.Radio(list(DETECTORS), value=DEFAULT_DETECTOR, label="Face detector")
                tta_in = gr.Checkbox(False, label="Ten-crop test-time augmentation (slower)")
        with gr.Column(scale=2):
            video_out = gr.Video(label="Annotated video (H.264)", format=None, elem_id="annotated-video")
            status_out = gr.Markdown(elem_id="video-status")
    timeline_out = gr.Plot(label="Expression timeline, one panel per tracked face", elem_id="timeline")
    summary_out = gr.Dataframe(headers=summary_headers(class_choices[1:]), label="Summary per face",
                               interactive=False)
    with gr.Accordion("Per-frame results (CSV) and summary (JSON)", open=False):
        csv_out = gr.File(label="Download the per-frame results (CSV)")
        json_out = gr.JSON(label="Summary", open=False)
    gr.Markdown("### Heatmaps for one frame")
    with gr.Row():
        time_in = gr.Slider(0, MAX_SECONDS, value=0, step=0.1, label="Frame time (s)")
        method_in, target_in = _explain_options(class_choices)
        frame_btn = gr.Button("Explain this frame")
    with gr.Row():
        frame_out = gr.Image(label="Frame", type="numpy", format="jpeg")
        frame_status_out = gr.Markdown()
    frame_outputs = [frame_out, frame_status_out] + _result_panels()
    video_btn.click(h.analyze_clip, [video_in, fps_in, detector_in, tta_in],
                    [video_out, timeline_out, summary_out, csv_out, status_out, json_out, time_in],
                    api_name="analyze_video", concurrency_id="model")
    frame_btn.click(h.explain_frame, [video_in, time_in, detector_in, method_in, target_in], frame_outputs,
                    api_name="explain_video_frame", concurrency_id="model")


# ----------------------------------------------------------------------------------------------------------------
# Live webcam tab (fer_models.pipeline.live): streamed frames, tracked faces, probabilities smoothed over time
# ----------------------------------------------------------------------------------------------------------------
LIVE_STREAM_EVERY_S = 0.1  # the browser sends a frame every 0.1 s; Gradio keeps only the newest while one is analysed
LIVE_TIME_LIMIT_S = 300  # a stream then rejoins the queue (the browser restarts it), so waiting viewers get a turn
LIVE_STREAMS = 4  # streams served at once: each holds its slot for its whole run, between frames too
LIVE_MODEL_CHOICES = [("Auto: the student when the fusion is too slow", "auto"),
                      ("Student: one small network distilled from the fusion", "student"),
                      ("Fusion: the three networks", "fusion")]


def live_status_markdown(lf: LiveFrame) -> str:
    """Which model is live and why, the speed, the faces; then the frame's notes."""
    n = len(lf.faces)
    smoothing = f"smoothing {lf.time_constant_s:g} s" if lf.time_constant_s else "no smoothing"
    lines = [f"**Live model: {lf.model}** ({html.escape(lf.model_reason)}). {n} face{'s' if n != 1 else ''}, "
             f"{lf.latency_ms:.0f} ms for this frame, {lf.fps:.1f} frames/s, {smoothing}."]
    lines += [f"- {html.escape(note)}" for note in lf.notes]
    lines.append(f"\n<small>{html.escape(lf.model_source)}</small>")
    return "\n".join(lines)


def live_faces_html(lf: LiveFrame) -> str:
    """Per tracked face: its smoothed probabilities as bars, this frame's own beside them."""
    if not lf.faces:
        return "<p>No face in this frame.</p>"
    parts = []
    for f in lf.faces:
        rows = []
        for c in lf.class_names:
            s, p = f.smoothed[c], f.probs[c]
            r, g, b = class_color(c)
            bar = (f"<span style='display:inline-block;width:120px;background:rgba(128,128,128,0.15)'>"
                   f"<span style='display:inline-block;height:0.8em;width:{s * 100:.1f}%;"
                   f"background:rgb({r},{g},{b})'></span></span>")
            name = f"<b>{html.escape(c)}</b>" if c == f.label else html.escape(c)
            rows.append(f"<tr><td>{name}</td><td>{bar}</td><td>{s:.0%}</td><td style='opacity:0.6'>{p:.0%}</td></tr>")
        parts.append(
            f"<div style='display:inline-block;vertical-align:top;margin:0 18px 10px 0'>"
            f"<b>Face ID{f.track_id}: {html.escape(f.label)} {f.confidence:.0%}</b>"
            f"<table style='font-size:0.85em;border-collapse:collapse'>"
            f"<tr><th></th><th>smoothed</th><th></th><th style='opacity:0.6'>this frame</th></tr>"
            f"{''.join(rows)}</table></div>")
    return "".join(parts)


def _tolerant_frame(component: gr.Image) -> gr.Image:
    """A frame Gradio cannot decode reaches the handler as an InputError (said in the status, the stream goes
    on) instead of failing in preprocessing, which would end the stream."""
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except Exception as e:  # noqa: BLE001
            return InputError(f"{type(e).__name__}: {e}")

    component.preprocess = preprocess
    return component


def make_live_handlers(holder: PredictorHolder, models: LiveModels) -> tuple[Callable, Callable, Callable]:
    """``(stream, analyze_live_frame, explain_live_frame)``. The session (tracker, smoothing, newest frame) is
    the viewer's own gr.State; only the loaded models are shared."""
    def run(frame, model, smooth_s, detector, session):
        session = session if isinstance(session, LiveSession) else LiveSession()
        try:
            lf = session.process(frame, models, model=model or "auto", time_constant_s=smooth_s,
                                 detector=detector or None)
        except (InputError, ModelLoadError) as e:
            lf = LiveFrame(None, notes=[str(e)])
        except Exception as e:  # noqa: BLE001 - an exception here would end the viewer's stream
            log.exception("live frame failed")
            lf = LiveFrame(None, notes=[f"Sorry, this frame could not be analysed ({type(e).__name__}: {e})."])
        return lf, session

    def stream(frame, model, smooth_s, detector, session):
        """One streamed frame -> annotated frame, status, per-face panel. Never raises (that ends the stream)."""
        lf, session = run(frame, model, smooth_s, detector, session)
        if lf.dropped:
            return gr.skip(), gr.skip(), gr.skip(), session
        if lf.annotated is None:  # no usable frame: keep the last picture, say why
            return gr.skip(), "\n".join(f"**{html.escape(n)}**" for n in lf.notes), gr.skip(), session
        return _display(lf.annotated), live_status_markdown(lf), live_faces_html(lf), session

    def analyze_live_frame(frame, model, smooth_s, detector, session):
        """One webcam frame through live mode: the annotated frame and the tracked faces' smoothed probabilities
        (JSON). Calls from one client session share its tracks and smoothing; a frame sent while the session's
        previous one is still being analysed is dropped (``"dropped": true``)."""
        lf, session = run(frame, model, smooth_s, detector, session)
        image = gr.skip() if lf.annotated is None else _display(lf.annotated)
        return image, lf.to_dict(), session

    @GPU
    @user_errors
    def explain_live_frame(session, detector, cam_method, cam_target):
        """Grad-CAM and attention maps of the newest live frame, with the fusion (as the photo tab does)."""
        rgb = session.last_frame() if isinstance(session, LiveSession) else None
        if rgb is None:
            raise InputError("Start the webcam first: this button explains the newest frame of the live stream.")
        analysis = holder.get().analyze_array(
            rgb, detector=detector or None, explain=True, cam_method=cam_method or DEFAULT_METHOD,
            cam_target=cam_target, notes=["The newest live frame, explained with the fusion."])
        return render_image(analysis, rgb)

    return stream, analyze_live_frame, explain_live_frame


def live_tab(holder: PredictorHolder, class_choices: list[str]) -> None:
    """The Live webcam tab: streamed frames annotated with each tracked face's smoothed label, a panel of the
    smoothed probabilities, the live model and its speed, and Grad-CAM of the current frame on demand."""
    models = LiveModels(holder.get, student_dir=default_student_dir(holder.checkpoint_dir), device=holder.device)
    stream, analyze_live_frame, explain_live_frame = make_live_handlers(holder, models)
    with gr.Tab("Live webcam"):
        with gr.Row():
            with gr.Column(scale=1):
                live_in = _tolerant_frame(gr.Image(
                    label="Webcam (start it, and the analysis follows)", sources=["webcam"], streaming=True,
                    type="numpy", elem_id="live-input"))
                model_in = gr.Radio(LIVE_MODEL_CHOICES, value="auto", label="Live model", elem_id="live-model")
                smooth_in = gr.Slider(0, 3, value=DEFAULT_TIME_CONSTANT_S, step=0.1,
                                      label="Smoothing time constant (seconds; 0: off)")
                with gr.Accordion("Options", open=False):
                    detector_in = gr.Radio(list(DETECTORS), value=DEFAULT_DETECTOR, label="Face detector")
            with gr.Column(scale=1):
                live_out = gr.Image(label="Live: each face's id, smoothed label and confidence", type="numpy",
                                    format="jpeg", interactive=False, elem_id="live-output")
                status_out = gr.Markdown("Start the webcam to begin.", elem_id="live-status")
        faces_out = gr.HTML("", elem_id="live-faces")
        json_out = gr.JSON(visible=False)
        session = gr.State(None, delete_callback=lambda s: s.release() if isinstance(s, LiveSession) else None)
        gr.Markdown("### Heatmaps for the current frame (the fusion, as in the photo tab)")
        with gr.Row():
            method_in, target_in = _explain_options(class_choices)
            explain_btn = gr.Button("Explain the current frame", elem_id="live-explain")
        with gr.Row():
            frame_out = gr.Image(label="Frame", type="numpy", format="jpeg")
            frame_status_out = gr.Markdown()
        frame_outputs = [frame_out, frame_status_out] + _result_panels()
    inputs = [live_in, model_in, smooth_in, detector_in, session]
    live_in.stream(stream, inputs, [live_out, status_out, faces_out, session], stream_every=LIVE_STREAM_EVERY_S,
                   time_limit=LIVE_TIME_LIMIT_S, concurrency_limit=LIVE_STREAMS, concurrency_id="live",
                   show_progress="hidden", api_name="live_stream", api_visibility="undocumented")
    gr.on([], analyze_live_frame, inputs, [live_out, json_out, session], api_name="analyze_live_frame",
          concurrency_id="model", show_progress="hidden")
    explain_btn.click(explain_live_frame, [session, detector_in, method_in, target_in], frame_outputs,
                      api_name="explain_live_frame", concurrency_id="model")


def build_demo(predictor: Union[FacePredictor, PredictorHolder, None] = None) -> gr.Blocks:
    """The Gradio app. ``predictor``: a ready FacePredictor (tests), a holder, or None (load on first use).
    Each tab is one function over the shared handlers; a new tab is one more ``with gr.Tab(...)`` line here."""
    holder = predictor if isinstance(predictor, PredictorHolder) else PredictorHolder(predictor)
    handlers = make_handlers(holder)
    class_choices = [PREDICTED_CLASS] + _class_names_hint(holder)
    with gr.Blocks(title="Facial expression recognition", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}")
        with gr.Accordion("About the model", open=False, elem_id="about-model"):
            gr.Markdown(ABOUT)
            model_md = gr.Markdown("Loading model information...")
        with gr.Tab("Image or webcam"):
            image_tab(handlers, class_choices)
        with gr.Tab("Video clip"):
            video_tab(handlers, class_choices)
        live_tab(holder, class_choices)
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
    allocator.tune()  # before any worker thread: RSS stays flat under load (docs/reliability.md)
    allocator.start_trimmer()
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
