"""Live mode's speed report in one run: live frames/s, the models' time per face, the photo path per detector, and
the detectors' found-rates.

    python benchmarks/live_report.py [--checkpoint-dir checkpoints] [--student-dir checkpoints/student]
        [--data DATA] [--frames 60] [--runs 30] [--json report.json]

1. **Live**: frames/s and p50/p95 latency of the live handler (:mod:`benchmarks.live_speed`: detection, the model,
   tracking, smoothing, drawing) on 640x480 frames with 1 and 4 moving faces, student and fusion, the default
   detector, 2 threads.
2. **Per face**: the model's time per face through ``FacePredictor.predict_crops`` (preprocessing, the
   BatchNorm-folded channels_last forward, calibrated probabilities) on one thread, batch 1 and batch 32
   (median of ``--runs``), with faces/s.
3. **Per photo**: a 640x480 photo with one face, detection + the fusion (``analyze_array``), 2 threads, per
   detector, the detectors called in turn round by round (median).
4. **Found-rates**: each detector on the JAFFE full frames and the seeded group set of
   :mod:`benchmarks.group_photos` (needs the data folder; skipped without it).

The models come from their checkpoints when present, else untrained models of the same architecture (same cost).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fer_models.pipeline import FacePredictor  # noqa: E402
from fer_models.pipeline.faces import DEFAULT_DETECTOR, create_detector, detect_faces  # noqa: E402
from app_speed import photo_640x480, timed  # noqa: E402
from live_speed import frames_with_faces, load, time_live  # noqa: E402

DETECTORS = ("blazeface+", "blazeface", "mtcnn")


def live_rows(predictors: dict, frames: int) -> list[dict]:
    torch.set_num_threads(2)
    rows = []
    for n_faces in (1, 4):
        clip = frames_with_faces(n_faces, frames)
        for name, pred in predictors.items():
            rows.append({"model": name, "faces": n_faces, **time_live(pred, clip, DEFAULT_DETECTOR)})
    return rows


def per_face_rows(predictors: dict, runs: int) -> list[dict]:
    """ms per face at one thread, batch 1 and 32 (predict_crops: what the app runs per batch of faces)."""
    torch.set_num_threads(1)
    crops = [np.ascontiguousarray(f[130:348, 200 + 2 * (i % 20):400 + 2 * (i % 20)])
             for i, f in enumerate(frames_with_faces(1, 32))]  # the moving face's crops
    rows = []
    for name, pred in predictors.items():
        for batch in (1, 32):
            ms = timed(lambda: pred.predict_crops(crops[:batch]), runs)[0] / batch
            rows.append({"model": name, "batch": batch, "ms_per_face": round(ms, 2), "faces_per_s": round(1000 / ms)})
    torch.set_num_threads(2)
    return rows


def per_photo_rows(pred: FacePredictor, runs: int) -> list[dict]:
    """A 640x480 photo with one face: detection + the fusion, 2 threads, detectors interleaved round by round."""
    torch.set_num_threads(2)
    cv2.setNumThreads(2)
    img = photo_640x480()
    for d in DETECTORS:
        for _ in range(3):
            pred.analyze_array(img, detector=d)
    times: dict[str, list[float]] = {d: [] for d in DETECTORS}
    for _ in range(runs):
        for d in DETECTORS:
            t = time.perf_counter()
            pred.analyze_array(img, detector=d)
            times[d].append((time.perf_counter() - t) * 1000)
    return [{"detector": d, "ms_per_photo": round(statistics.median(v), 1), "p90_ms": round(float(np.percentile(v, 90)), 1),
             "faces": len(pred.analyze_array(img, detector=d).faces)} for d, v in times.items()]


def found_rate_rows(data: Path) -> list[dict]:
    import group_photos as gp

    mtcnn = create_detector("mtcnn")
    sources = gp.load_sources(data, mtcnn)
    sets = {"JAFFE full frames": gp.jaffe_sets(sources)["JAFFE full frames (256x256)"],
            "group set": gp.build_group_set(sources, mtcnn, 80, 0)}
    rows = []
    for name in DETECTORS:
        det = create_detector(name)
        detect_faces(sets["group set"][0].rgb, det)
        for set_name, photos in sets.items():
            r = gp.evaluate(det, photos, by_region=set_name.startswith("JAFFE"))
            rows.append({"detector": name, "set": set_name, "found": r["found"], "faces": r["faces"],
                         "extra": r["extra"], "median_ms": round(r["ms"], 1)})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint-dir", default="checkpoints")
    ap.add_argument("--student-dir", default="checkpoints/student")
    ap.add_argument("--data", default=os.environ.get("FER_DATA_DIR", "../shared/data"))
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="tiny untrained models (a quick check of the script)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    loaded = {"student": load(args.student_dir, "student", args.tiny), "fusion": load(args.checkpoint_dir, "fusion", args.tiny)}
    predictors = {k: v[0] for k, v in loaded.items()}
    report: dict = {"models": {k: v[1] for k, v in loaded.items()}, "detector": DEFAULT_DETECTOR,
                    "cpu": f"{os.cpu_count()} cores", "load_average_before": os.getloadavg()[0]}
    print(f"models: {report['models']}; live detector {DEFAULT_DETECTOR}; load average {report['load_average_before']:.2f}")

    report["live"] = live_rows(predictors, args.frames)
    print("\n| live model | faces | frames/s | p50 ms | p95 ms | faces found per frame |\n|---|---|---|---|---|---|")
    for r in report["live"]:
        print(f"| {r['model']} | {r['faces']} | {r['fps']} | {r['p50_ms']} | {r['p95_ms']} | {r['faces_found']} |")

    report["per_face"] = per_face_rows(predictors, args.runs)
    print("\n| model (1 thread) | batch | ms per face | faces/s |\n|---|---|---|---|")
    for r in report["per_face"]:
        print(f"| {r['model']} | {r['batch']} | {r['ms_per_face']} | {r['faces_per_s']} |")

    report["per_photo"] = per_photo_rows(predictors["fusion"], args.runs)
    print("\n| detector (640x480 photo, 1 face, + fusion, 2 threads) | ms per photo | p90 ms | faces |\n|---|---|---|---|")
    for r in report["per_photo"]:
        print(f"| {r['detector']} | {r['ms_per_photo']} | {r['p90_ms']} | {r['faces']} |")

    if (Path(args.data) / "jaffe").is_dir():
        report["found_rates"] = found_rate_rows(Path(args.data))
        print("\n| detector | set | found | extra boxes | median ms |\n|---|---|---|---|---|")
        for r in report["found_rates"]:
            print(f"| {r['detector']} | {r['set']} | {r['found']}/{r['faces']} ({100 * r['found'] / r['faces']:.1f}%) "
                  f"| {r['extra']} | {r['median_ms']} |")
    else:
        print(f"\nfound-rates skipped: no JAFFE under {args.data}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
