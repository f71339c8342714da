"""Speed of live mode on this machine: frames/s and p50/p95 latency of the live handler, 1 and 4 faces, per model.

    python benchmarks/live_speed.py [--checkpoint-dir checkpoints] [--student-dir checkpoints/student]
        [--frames 60] [--threads 2] [--detectors mtcnn blazeface] [--tiny]

Each frame goes through :meth:`fer_models.pipeline.live.LiveSession.process` exactly as the app's stream handler
runs it (reading, detection, the model, tracking, smoothing, drawing, keeping the frame for Grad-CAM), back to back
on 640x480 frames in which the astronaut's face (scikit-image, public domain) moves a little from frame to frame.
Latency is the handler's time per frame; frames/s is 1000 / mean latency, the most one stream can get (the browser
sends one every 0.1 s; the network and JPEG coding in the browser are not included). The fusion and the student
come from their checkpoints when present, else untrained models of the same architecture (same cost); ``--tiny``
times the tiny test models instead. The frame budget for ``auto`` is 100 ms (10 frames/s).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fer_models as fm  # noqa: E402
from fer_models.pipeline import FacePredictor, ModelLoadError, load_model_with_fallback  # noqa: E402
from fer_models.pipeline.live import DEFAULT_FRAME_BUDGET_S, LiveModels, LiveSession  # noqa: E402


def frames_with_faces(n_faces: int, n_frames: int) -> list[np.ndarray]:
    """640x480 frames with ``n_faces`` astronaut faces (one large, or a 2x2 grid), moving 2 px a frame."""
    face = cv2.resize(data.astronaut()[20:260, 120:340], (200, 218) if n_faces == 1 else (120, 131))
    fh, fw = face.shape[:2]
    spots = [(130, 200)] if n_faces == 1 else [(60 + 200 * (i % 2), 90 + 260 * (i // 2)) for i in range(n_faces)]
    out = []
    for k in range(n_frames):
        frame = np.full((480, 640, 3), 90, np.uint8)
        dx = 2 * (k % 20)
        for y, x in spots:
            frame[y:y + fh, x + dx:x + dx + fw] = face
        out.append(frame)
    return out


def load(folder: str, fallback_arch: str, tiny: bool) -> tuple[FacePredictor, str]:
    if tiny:
        arch = {"fusion": "fusion_tiny", "student": "resnet_tiny"}[fallback_arch]
        return FacePredictor(fm.create_model(arch).eval()), f"untrained {arch}"
    try:
        model, source = load_model_with_fallback("", folder, device="cpu")
        return FacePredictor(model, source=source), f"{folder} ({model.arch})"
    except ModelLoadError:
        return FacePredictor(fm.create_model(fallback_arch).eval()), f"untrained {fallback_arch} (no {folder})"


def time_live(pred: FacePredictor, frames: list[np.ndarray], detector: str, warmup: int = 3) -> dict:
    models = LiveModels(lambda: pred)
    session = LiveSession()
    lat, faces = [], []
    for i, f in enumerate(frames[:warmup] + frames):
        out = session.process(f, models, model="fusion", detector=detector, now=i * 0.1)
        if i >= warmup:
            lat.append(out.latency_ms)
            faces.append(len(out.faces))
    q = statistics.quantiles(lat, n=20)
    return {"fps": round(1000 / statistics.mean(lat), 1), "p50_ms": round(statistics.median(lat), 1),
            "p95_ms": round(q[18], 1), "faces_found": round(statistics.mean(faces), 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint-dir", default="checkpoints")
    ap.add_argument("--student-dir", default="checkpoints/student")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--detectors", nargs="+", default=["mtcnn", "blazeface"])
    ap.add_argument("--tiny", action="store_true", help="the tiny test models (fusion_tiny, resnet_tiny)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    predictors = {"student": load(args.student_dir, "student", args.tiny),
                  "fusion": load(args.checkpoint_dir, "fusion", args.tiny)}
    results = {"threads": args.threads, "frame_budget_ms": DEFAULT_FRAME_BUDGET_S * 1000,
               "models": {k: v[1] for k, v in predictors.items()}, "runs": []}
    print(f"{'model':8} {'detector':10} {'faces':>5} {'frames/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'found':>6}")
    for n_faces in (1, 4):
        frames = frames_with_faces(n_faces, args.frames)
        for det in args.detectors:
            for name, (pred, _) in predictors.items():
                r = {"model": name, "detector": det, "faces": n_faces, **time_live(pred, frames, det)}
                results["runs"].append(r)
                print(f"{name:8} {det:10} {n_faces:>5} {r['fps']:>9} {r['p50_ms']:>8} {r['p95_ms']:>8} "
                      f"{r['faces_found']:>6}", flush=True)
    print(json.dumps(results["models"]))
    return results


if __name__ == "__main__":
    main()
