"""Speed of the app's pipeline on this machine's CPU (or GPU): one photo, with and without Grad-CAM, a folder, a clip.

    python benchmarks/app_speed.py [--checkpoint-dir checkpoints] [--runs 20] [--threads 2] [--device cpu]
        [--folder-photos 40] [--skip-video]

Targets from the issues, on the 2-core CPU: one 640x480 photo with one face analysed (detection + three
backbones + fusion) in <= 80 ms; a folder analysed (``fer_models.pipeline.analyze``) at >= 25 faces/s;
<= 600 ms with Grad-CAM for all three backbones (and the fusion); a 10 s 640x480 clip at 5 fps analysed
(decode, detect, classify, track, H.264 encode) in <= 15 s.

The photo and the folder are timed for several configurations *in the same run, interleaved* (one call of
each in turn, per round), and each is given as a ratio to the previous configuration (MTCNN, BatchNorm not
folded, NCHW weights) round by round, so the ratios hold on a busy machine whose speed drifts. The classification
levers (BatchNorm folding, channels_last, ``inference_mode`` vs ``no_grad``) are timed the same way on one face.
Uses the checkpoint if there is one, else an untrained full-size ``fusion`` (same architecture, same cost).
Inputs are generated from scikit-image's astronaut photo. Medians over ``--runs`` after 3 warm-up runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fer_models as fm  # noqa: E402
from fer_models.models.fold import prepare_for_inference  # noqa: E402
from fer_models.models.preprocess import prepare_faces  # noqa: E402
from fer_models.pipeline import FacePredictor, load_model_with_fallback  # noqa: E402
from fer_models.pipeline.analyze import analyze  # noqa: E402
from fer_models.pipeline.video import analyze_video  # noqa: E402
from analyze_speed import make_folder  # noqa: E402  (benchmarks/: the folder analyze_speed.py times)


def photo_640x480() -> np.ndarray:
    return np.ascontiguousarray(cv2.resize(data.astronaut(), (640, 640))[80:560])


def clip_640x480(path: Path, seconds: float = 10.0, fps: int = 25) -> str:
    import av

    face = cv2.resize(data.astronaut()[20:260, 120:340], (200, 218))
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 640, 480, "yuv420p"
        n = int(seconds * fps)
        for i in range(n):
            frame = np.full((480, 640, 3), 90, np.uint8)
            x = 20 + int(400 * i / (n - 1))
            frame[120:338, x:x + 200] = face
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def timed(fn, runs: int, warmup: int = 3) -> tuple[float, float]:
    """Median wall time and median process CPU time (ms). On a shared, busy machine the CPU time divided by
    the threads actually used is the better guide to what an idle machine would do."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def interleaved(fns: dict, runs: int, base: str, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """``{name: (median ms, median ratio to fns[base] within a round)}``, calling each fn once per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1000)
    return {k: (statistics.median(v), statistics.median(a / b for a, b in zip(v, times[base])))
            for k, v in times.items()}


def previous_predictor(model, **kwargs) -> FacePredictor:
    """The configuration before issue 11: MTCNN, and the model as loaded (BatchNorm not folded, NCHW)."""
    pred = FacePredictor(model, detector="mtcnn", **kwargs)
    pred.model = model.eval()
    return pred


def lever_forwards(model, runs: int) -> dict[str, tuple[float, float]]:
    """One face through the three members + fusion, per classification lever."""
    crop = photo_640x480()[100:300, 250:450]
    x = prepare_faces([crop], model.input_spec())
    folded_nchw = prepare_for_inference(model, channels_last=False)
    plain_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fast = prepare_for_inference(model)

    def fwd(m, ctx=torch.inference_mode):
        def run():
            with ctx():
                m(x, attention=True)
        return run

    return interleaved({
        "as loaded, inference_mode (previous)": fwd(model),
        "as loaded, no_grad": fwd(model, torch.no_grad),
        "channels_last only": fwd(plain_cl),
        "BatchNorm folded only": fwd(folded_nchw),
        "BatchNorm folded + channels_last (now)": fwd(fast),
    }, runs, "as loaded, inference_mode (previous)")


def folder_throughput(preds: dict[str, FacePredictor], n: int, batch_size: int = 16) -> dict[str, tuple]:
    """``{name: (faces/s, faces, ratio of faces/s to the first predictor's)}`` on one folder, alternating."""
    out: dict[str, list] = {k: [] for k in preds}
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "photos"
        folder.mkdir()
        make_folder(folder, n)
        for p in preds.values():
            analyze(folder / "photo_0000.jpg", predictor=p, progress=False)  # warm-up
        for _ in range(2):  # two alternating rounds
            for k, p in preds.items():
                t = time.perf_counter()
                df = analyze(folder, predictor=p, batch_size=batch_size, workers=1, progress=False, resume=False)
                faces = int(df["label"].notna().sum())  # rows of images without faces have no label
                out[k].append((faces / (time.perf_counter() - t), faces))
    first = next(iter(out))
    return {k: (statistics.median(r for r, _ in v), v[0][1],
                statistics.median(a[0] / b[0] for a, b in zip(v, out[first]))) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint-dir", default="checkpoints")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenCV threads (0: library defaults)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--detector", default=None, help="for the Grad-CAM, TTA and video rows (default: the app's)")
    ap.add_argument("--folder-photos", type=int, default=40, help="photos in the folder throughput test (0: skip)")
    ap.add_argument("--skip-video", action="store_true")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    try:
        model, source = load_model_with_fallback(None, args.checkpoint_dir, device=args.device)
        weights = source.describe()
    except Exception as e:  # noqa: BLE001
        model = fm.create_model("fusion").eval().to(args.device or "cpu")
        weights = f"untrained full-size fusion ({type(e).__name__}: no usable checkpoint in {args.checkpoint_dir})"
    try:
        from explain import Explainer
        explainer = Explainer(model)
    except ImportError:
        explainer = None
    pred = FacePredictor(model, explainer=explainer, **({"detector": args.detector} if args.detector else {}))
    img = photo_640x480()
    n_faces = len(pred.analyze_array(img).faces)
    results: dict = {}
    previous = previous_predictor(model)
    configs = {
        "previous: mtcnn, BatchNorm not folded": previous,
        "mtcnn, BatchNorm folded + channels_last (the app now)": FacePredictor(model, detector="mtcnn"),
        "blazeface, BatchNorm folded + channels_last": FacePredictor(model, detector="blazeface"),
    }
    photo = interleaved({k: (lambda p=p: p.analyze_array(img)) for k, p in configs.items()}, args.runs,
                        next(iter(configs)))
    results["photo_ms"] = {k: v[0] for k, v in photo.items()}
    levers = lever_forwards(model, args.runs)
    results["classify_one_face_ms"] = {k: v[0] for k, v in levers.items()}
    folder = folder_throughput(configs, args.folder_photos) if args.folder_photos else {}
    results["folder_faces_per_s"] = {k: v[0] for k, v in folder.items()}

    rows = []
    stages = pred.analyze_array(img).timings_ms
    if explainer is not None:
        wall, cpu = timed(lambda: pred.analyze_array(img, explain=True), max(5, args.runs // 2))
        results.update(image_gradcam_ms=wall, image_gradcam_cpu_ms=cpu)
        rows.append(("640x480 photo, 1 face, Grad-CAM x3 + fusion", wall, cpu, 600, "ms"))
    wall, cpu = timed(lambda: pred.analyze_array(img, tta=True), max(5, args.runs // 2))
    results.update(image_tencrop_ms=wall, image_tencrop_cpu_ms=cpu)
    rows.append(("640x480 photo, 1 face, ten-crop TTA", wall, cpu, None, "ms"))
    if not args.skip_video:
        with tempfile.TemporaryDirectory() as d:
            clip = clip_640x480(Path(d) / "clip.mp4")
            t0, c0 = time.perf_counter(), time.process_time()
            va = analyze_video(pred, clip, sample_fps=5, out_path=Path(d) / "out.mp4")
            secs, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        results.update(video_s=secs, video_cpu_s=cpu_s, video_frames=len(va.frames))
        rows.append((f"10 s 640x480 clip at 5 fps ({len(va.frames)} frames)", secs, cpu_s, 15, "s"))

    print(f"device: {pred.device}; torch threads {torch.get_num_threads()}, OpenCV threads {cv2.getNumThreads()}; "
          f"detector {pred.detector}; faces found in the photo: {n_faces}")
    print(f"weights: {weights}")
    print(f"\n640x480 photo, 1 face, detection + 3 backbones + fusion (interleaved, {args.runs} rounds; target <= 80 ms)")
    print("| configuration | wall time (median) | ratio to previous (median per round) | target |")
    print("|---|---|---|---|")
    for k, (ms, ratio) in photo.items():
        print(f"| {k} | {ms:.0f} ms | {ratio:.3f} | {'met' if ms <= 80 else 'missed'} |")
    print(f"\nclassification of one face, 3 members + fusion (interleaved, {args.runs} rounds)")
    print("| lever | wall time (median) | ratio to previous (median per round) |")
    print("|---|---|---|")
    for k, (ms, ratio) in levers.items():
        print(f"| {k} | {ms:.1f} ms | {ratio:.3f} |")
    if folder:
        print(f"\nfolder of {args.folder_photos} photos through fer_models.pipeline.analyze (batch 16, 1 reader "
              "thread; half the photos hold 3 faces; median of 2 alternating rounds; target >= 25 faces/s)")
        print("| configuration | faces found | faces/s | ratio to previous | target |")
        print("|---|---|---|---|---|")
        for k, (fps, faces, ratio) in folder.items():
            print(f"| {k} | {faces} | {fps:.1f} | {ratio:.3f} | {'met' if fps >= 25 else 'missed'} |")
    print("\nthe app's default configuration:")
    print("stages of one photo (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    print("| measurement | wall time (median) | process CPU time (median) | target |")
    print("|---|---|---|---|")
    for name, value, cpu, target, unit in rows:
        ok = "" if target is None else (" (met)" if value <= target else " (missed)")
        tgt = "-" if target is None else f"<= {target} {unit}{ok}"
        digits = 0 if unit == "ms" else 1
        print(f"| {name} | {value:.{digits}f} {unit} | {cpu:.{digits}f} {unit} | {tgt} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
