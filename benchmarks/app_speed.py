"""Speed of the app's pipeline on this machine's CPU (or GPU): one photo, with and without Grad-CAM, and a clip.

    python benchmarks/app_speed.py [--checkpoint-dir checkpoints] [--runs 20] [--threads 2] [--device cpu]

Targets from the issue, on the 2-core CPU: one 640x480 photo with one face analysed (detection + three backbones
+ fusion) in <= 150 ms without Grad-CAM and <= 600 ms with Grad-CAM for all three backbones (and the fusion);
a 10 s 640x480 clip at 5 fps analysed (decode, detect, classify, track, H.264 encode) in <= 15 s.
Uses the checkpoint if there is one, else an untrained full-size ``fusion`` (same architecture, same cost).
Inputs are generated from scikit-image's astronaut photo. Medians over ``--runs`` after 3 warm-up runs.
"""
from __future__ import annotations

import argparse
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
from fer_models.pipeline import FacePredictor, load_model_with_fallback  # noqa: E402
from fer_models.pipeline.video import analyze_video  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint-dir", default="checkpoints")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenCV threads (0: library defaults)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--detector", default="mtcnn")
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
    pred = FacePredictor(model, detector=args.detector, explainer=explainer)
    img = photo_640x480()
    n_faces = len(pred.analyze_array(img).faces)
    results: dict[str, float] = {}

    rows = []
    wall, cpu = timed(lambda: pred.analyze_array(img), args.runs)
    results.update(image_ms=wall, image_cpu_ms=cpu)
    rows.append(("640x480 photo, 1 face, no Grad-CAM", wall, cpu, 150, "ms"))
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
          f"detector {args.detector}; faces found in the photo: {n_faces}")
    print(f"weights: {weights}")
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
