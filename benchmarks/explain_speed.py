"""Latency of explanations: CAMs of every member plus the fused decision, for 1 face and for a batch.

    python benchmarks/explain_speed.py [--model fusion | --model checkpoints] [--batch-sizes 1 8]
        [--methods gradcam] [--repeats 5] [--threads N]

``--model`` is a registered architecture (random weights: timing only) or a checkpoint folder. For reference it
also times the plain prediction (one no-grad forward of the fused model). Medians of ``--repeats`` timed calls
after ``--warmup`` untimed ones (the first call also probes the CAM-cell geometry). On a shared CPU, pass
``--threads 1``: two processes each spinning two OpenMP threads on two cores made a forward ~9x slower here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import numpy as np
import torch

import fer_models as fm
from explain import METHODS, Explainer
from fer_models.models.preprocess import prepare_faces


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fusion", help="architecture name (random weights) or checkpoint folder")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--methods", nargs="+", default=["gradcam"], choices=list(METHODS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.path.isdir(args.model):
        model = fm.load_model(args.model)
    else:
        torch.manual_seed(0)
        model = fm.create_model(args.model)
    model.eval()
    explainer = Explainer(model)
    rng = np.random.default_rng(0)
    print(f"model {model.arch} ({', '.join(explainer.map_names)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; median of {args.repeats} calls")
    print("| method | faces | predict ms | explain ms | explain ms/face | vs 1 face |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        single = None
        for b in args.batch_sizes:
            faces = [rng.integers(0, 256, (48, 48), dtype=np.uint8) for _ in range(b)]
            x = prepare_faces(faces, model.input_spec())

            def predict():
                with torch.inference_mode():
                    model(x)

            pred = median_ms(predict, args.repeats, args.warmup)
            ms = median_ms(lambda: explainer.explain(x, method=method), args.repeats, args.warmup)
            single = ms if b == 1 else single
            ratio = f"{ms / single:.2f}x" if single else "—"
            print(f"| {method} | {b} | {pred:.0f} | {ms:.0f} | {ms / b:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
