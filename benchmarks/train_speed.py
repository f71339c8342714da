"""Training throughput (images/s) per architecture on the current device: fp32 vs bf16 autocast + channels_last.

    python benchmarks/train_speed.py [--archs vgg19 resnet18 resnet18_cbam] [--batch-size 128] [--steps 10]

Times the real training step (batch augmentation on the device, forward, loss, backward, SGD step) on random
uint8 faces; the first ``--warmup`` steps are not timed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch
from torch.nn import functional as F

import fer_models as fm
from fer_models.models.predict import autocast, resolve_device
from fer_models.training.augment import AugmentConfig, augment_batch
from fer_models.models.preprocess import normalize


def step_rate(arch: str, device: torch.device, batch: int, steps: int, warmup: int, mode: str,
              width: float = 1.0) -> float:
    model = fm.create_model(arch, width=width).to(device).train()
    channels_last, bf16 = "channels_last" in mode, mode.startswith("bf16")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    spec = model.input_spec()
    x8 = torch.randint(0, 256, (batch, 1, spec["input_size"], spec["input_size"]), dtype=torch.uint8, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    aug = AugmentConfig()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x = augment_batch(normalize(x8, spec), spec["crop_size"], aug)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            logits = model(x).logits
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["vgg19", "resnet18", "resnet18_cbam"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", nargs="+", default=["fp32", "fp32+channels_last", "bf16+channels_last"])
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (1.0 = published size)")
    args = p.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch_size}; width {args.width}; {args.steps} timed steps after "
          f"{args.warmup} warm-up")
    print(f"{'arch':<16}{'mode':<22}{'img/s':>10}{'FER2013 epoch (s)':>20}")
    for arch in args.archs:
        for mode in args.modes:
            rate = step_rate(arch, device, args.batch_size, args.steps, args.warmup, mode, args.width)
            print(f"{arch:<16}{mode:<22}{rate:10.1f}{28709 / rate:20.1f}", flush=True)


if __name__ == "__main__":
    main()
