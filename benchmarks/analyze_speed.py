"""Throughput of batch analysis (``fer_models.analyze``) on a folder of photos: faces per second.

    python benchmarks/analyze_speed.py [--n 60] [--batch-size 16] [--workers 1] [--threads 2] [--detector mtcnn]

The folder holds ``--n`` JPEGs made from the shipped examples (astronaut.jpg: one face; three_faces.jpg: three)
at a few sizes, mirrored or not, so no two files are the same. One untimed warm-up file, then the whole folder
into a CSV; prints files/s, faces/s and the CPU time per face. Uses ``--checkpoint-dir`` (the shipped fusion).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from fer_models.pipeline import FacePredictor, load_model_with_fallback  # noqa: E402
from fer_models.pipeline.analyze import analyze  # noqa: E402


def make_folder(folder: Path, n: int) -> None:
    sources = [Image.open(ROOT / "examples" / name).convert("RGB") for name in ("astronaut.jpg", "three_faces.jpg")]
    for i in range(n):
        im = sources[i % 2]
        scale = (1.0, 0.8, 1.25)[(i // 2) % 3]
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR)
        if (i // 6) % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im.save(folder / f"photo_{i:04d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="photos in the folder (half with one face, half with three)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--detector", default=None)
    ap.add_argument("--checkpoint-dir", default=str(ROOT / "checkpoints"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, source = load_model_with_fallback(None, args.checkpoint_dir, device=args.device)
    predictor = FacePredictor(model, source=source, **({"detector": args.detector} if args.detector else {}))
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "photos"
        folder.mkdir()
        make_folder(folder, args.n)
        analyze(folder / "photo_0000.jpg", predictor=predictor, progress=False)  # warm-up: detector nets, kernels
        t, c = time.perf_counter(), time.process_time()
        df = analyze(folder, out=Path(d) / "r.csv", predictor=predictor, batch_size=args.batch_size,
                     workers=args.workers, progress=False)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    faces = int(df["face"].notna().sum())
    assert df["error"].isna().all(), df["error"].dropna().tolist()
    print(f"{args.n} photos, {faces} faces in {wall:.1f} s: {args.n / wall:.1f} files/s, {faces / wall:.1f} faces/s "
          f"(batch {args.batch_size}, workers {args.workers}, {torch.get_num_threads()} torch threads, detector "
          f"{predictor.get_detector().name}); CPU {1000 * cpu / faces:.0f} ms per face, load average "
          f"{np.round(os.getloadavg(), 1).tolist()}")


if __name__ == "__main__":
    main()
