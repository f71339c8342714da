"""Weight-space interpolation of a fine-tuned backbone with the checkpoint it was fine-tuned from (WiSE-FT,
Wortsman et al., CVPR 2022): ``(1 - alpha) * start + alpha * finetuned``, every tensor of the state dict (BatchNorm
statistics included), for alphas on a grid; each is scored on FER2013 PublicTest and CK+48, and one is kept.

    python -m fer_models.interpolate START FINETUNED --data ../shared/data --output runs/x/resnet18_wise
        [--alphas 0,0.25,0.5,0.75,1] [--max-public-drop 0.005]

A fine-tune on new data (here the posed sets' training subjects) moves away from what the start was good at;
the two ends of the line are both trained models, and points between often keep most of both. **Selection**
(validation data only, never PrivateTest): among the alphas whose PublicTest accuracy is at most
``--max-public-drop`` below the start's, the one with the best ``(PublicTest + CK+48) / 2`` (CK+48's held-out
subjects when the fine-tune trained on the others); alpha 0 (the start) when none qualifies. The kept weights land
in ``OUTPUT/best`` and the scores of every alpha in ``OUTPUT/model/results.json`` (read by the fusion's card).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..models import FERModel, load_model
from .cli import setup_logging
from .data import load_dataset
from .evaluate import evaluate_ckplus, evaluate_fer

log = logging.getLogger("fer_models.interpolate")


def interpolate_state(start: dict, finetuned: dict, alpha: float) -> dict:
    """``(1 - alpha) * start + alpha * finetuned`` per floating-point tensor; integer tensors (BatchNorm's batch
    counters) come from ``finetuned``. The two state dicts must have the same keys and shapes."""
    if start.keys() != finetuned.keys():
        raise ValueError(f"different parameters: {sorted(set(start) ^ set(finetuned))[:5]}")
    out = {}
    for k, b in finetuned.items():
        a = start[k]
        if a.shape != b.shape:
            raise ValueError(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)} (not the same architecture/width)")
        out[k] = torch.lerp(a.float(), b.float(), alpha).to(b.dtype) if b.is_floating_point() else b.clone()
    return out


def interpolated(start: FERModel, finetuned: FERModel, alpha: float) -> FERModel:
    """A copy of ``finetuned`` (its config) with the interpolated weights."""
    model = copy.deepcopy(finetuned)
    model.load_state_dict(interpolate_state(start.state_dict(), finetuned.state_dict(), alpha))
    return model.eval()


def choose(rows: list[dict], max_public_drop: float) -> dict:
    """The stated rule: best selection score among alphas within ``max_public_drop`` of alpha 0's PublicTest."""
    base = next(r for r in rows if r["alpha"] == 0.0)
    ok = [r for r in rows if r["public_acc"] >= base["public_acc"] - max_public_drop - 1e-12]
    return max(ok, key=lambda r: (r["score"], -r["alpha"]))


def parse_alphas(text: str) -> list[float]:
    """``--alphas``: sorted, 0 (the start) always included, each in [0, 1]."""
    alphas = sorted({float(a) for a in text.split(",") if a.strip()} | {0.0})
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise SystemExit(f"--alphas must lie in [0, 1], got {alphas}")
    return alphas


def load_ckplus(root: Path, subjects: str = "heldout"):
    """CK+48 under the data root: every subject, or the fixed split's held-out subjects."""
    ck = load_dataset(Path(root) / "ckplus48", kind="ckplus")
    if subjects == "heldout":
        from .posed import subject_mask

        ck = ck.subset(np.flatnonzero(subject_mask(ck.subjects, "ckplus48", "heldout")))
    return ck


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="WiSE-FT: interpolate a fine-tuned backbone with its starting weights.")
    p.add_argument("start", help="the checkpoint the fine-tune started from")
    p.add_argument("finetuned", help="the fine-tuned checkpoint (same architecture and width)")
    p.add_argument("--data", required=True, help="the shared data root (fer2013/ and ckplus48/)")
    p.add_argument("--output", required=True, help="writes OUTPUT/best (the kept weights) and OUTPUT/model/results.json")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated weights of the fine-tuned end")
    p.add_argument("--max-public-drop", type=float, default=0.005,
                   help="alphas whose PublicTest accuracy is more than this below the start's are not kept")
    p.add_argument("--ckplus-subjects", choices=["heldout", "all"], default="heldout",
                   help="CK+48 subjects in the selection score (heldout: the fixed split's held-out subjects)")
    return p


def main(argv: Optional[list] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    alphas = parse_alphas(args.alphas)
    start, finetuned = load_model(args.start), load_model(args.finetuned)
    if start.arch != finetuned.arch:
        raise SystemExit(f"{args.start} is {start.arch}, {args.finetuned} is {finetuned.arch}")
    root = Path(args.data)
    fer = load_dataset(root, kind="fer2013")
    ck = load_ckplus(root, args.ckplus_subjects)
    rows = []
    for a in alphas:
        model = interpolated(start, finetuned, a)
        pub = evaluate_fer(model, fer, "PublicTest", "center")
        ckr = evaluate_ckplus(model, ck, "center")
        rows.append({"alpha": a, "public_acc": pub["accuracy"], "public_macro_f1": pub["macro_f1"],
                     "ckplus48_acc": ckr["accuracy"], "score": (pub["accuracy"] + ckr["accuracy"]) / 2,
                     "public_recall": {c: m["recall"] for c, m in pub["per_class"].items()}})
        log.info("alpha %.2f  PublicTest %.2f%%  CK+48 (%s) %.2f%%  score %.2f%%", a, 100 * pub["accuracy"],
                 args.ckplus_subjects, 100 * ckr["accuracy"], 100 * rows[-1]["score"])
    best = choose(rows, args.max_public_drop)
    log.info("kept alpha %.2f (PublicTest within %.1f points of the start, best selection score)", best["alpha"],
             100 * args.max_public_drop)
    return save_interpolated(args.start, args.finetuned, start, finetuned, Path(args.output), {
        "alpha": best["alpha"], "max_public_drop": args.max_public_drop, "ckplus_subjects": args.ckplus_subjects,
        "alphas": rows})


def save_interpolated(start_dir, finetuned_dir, start: FERModel, finetuned: FERModel, out: Path, record: dict) -> dict:
    """The kept weights (``record["alpha"]``) in ``out/best`` and, in ``out/model/results.json``, the fine-tune's
    record (so the fusion's card still tells how the member was trained) plus ``record`` as its interpolation."""
    interpolated(start, finetuned, record["alpha"]).save_pretrained(out / "best", dtype=torch.float16)
    src = Path(finetuned_dir).parent / "model" / "results.json"
    rec = json.loads(src.read_text()) if src.is_file() else {"arch": finetuned.arch}
    rec["interpolation"] = {"start": str(start_dir), "finetuned": str(finetuned_dir), **record}
    (out / "model").mkdir(parents=True, exist_ok=True)
    (out / "model" / "results.json").write_text(json.dumps(rec, indent=1))
    if (Path(finetuned_dir).parent / "train_config.json").is_file():
        shutil.copy(Path(finetuned_dir).parent / "train_config.json", out / "train_config.json")
    return rec["interpolation"]


if __name__ == "__main__":
    main()
