"""Fusion-level WiSE-FT: every member's interpolation weight chosen together, by the *fused* model's scores.

    python -m fer_models.interpolate_fusion --start A0,B0,C0 --finetuned A1,B1,C1 --data ../shared/data
        --output runs/x/fusion_wise [--alphas 0,0.25,0.5,0.75,1] [--max-public-drop 0.003] [--head-train-faces 8000]

Why: ``interpolate`` keeps each member within half a point of its start on PublicTest, one member at a time, yet
the fusion of such members lost more than any of them (fine-tuned on the same faces, they agree more, and the fusion
gains less from combining them). Here the unit judged is the fusion:

1. every member's logits (centre crop) at every alpha of the grid on the head's Training faces (the fusion stage's
   seeded subset of ``--head-train-faces``), PublicTest and CK+48's held-out subjects, cached in
   ``OUTPUT/logits.npz`` (a rerun reuses them);
2. for every combination of the members' alphas the linear head is fitted exactly as the fusion stage fits it
   (``fusion_head.fit_head_trials``: without and with class weights, the step and the variant kept on PublicTest);
3. **selection** (validation data only: JAFFE and PrivateTest are not read): among the combinations whose fused
   PublicTest accuracy is at most ``--max-public-drop`` below the all-zero combination's (the starting members,
   head refitted the same way), the best ``(fused PublicTest + fused CK+48 held-out) / 2``; ties go to the smaller
   sum of alphas;
4. the chosen members' interpolated weights land in ``OUTPUT/<member>/best`` (with ``model/results.json`` as
   ``interpolate`` writes it, so the fusion's card says each member's alpha) and every combination's scores in
   ``OUTPUT/search.json``. The fusion stage then runs on them as usual:
   ``python -m fer_models.train --arch fusion --members OUTPUT/vgg19/best,OUTPUT/resnet18/best,...``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..models import load_model
from ..models.fusion import FusionModel
from ..models.predict import predict_logits
from .cli import setup_logging
from .config import TrainConfig
from .data import load_dataset
from .evaluate import _cross_dataset
from .fusion_head import fit_head_trials, head_split
from .interpolate import interpolated, load_ckplus, parse_alphas, save_interpolated
from .metrics import score_logits

log = logging.getLogger("fer_models.interpolate_fusion")


def choose_combination(rows: list[dict], max_public_drop: float) -> dict:
    """The stated rule: among combinations within ``max_public_drop`` of the all-zero one's fused PublicTest, the
    best score, ties to the smaller sum of alphas."""
    base = next(r for r in rows if not any(r["alphas"].values()))
    ok = [r for r in rows if r["public_acc"] >= base["public_acc"] - max_public_drop - 1e-12]
    return max(ok, key=lambda r: (r["score"], -sum(r["alphas"].values())))


def member_logits(pairs: dict, alphas: list[float], parts: dict, path: Path, batch_size: int) -> dict:
    """``{f"{name}/{alpha:g}/{split}": logits}`` for every member, alpha and split, cached in ``path``."""
    cache: dict[str, np.ndarray] = dict(np.load(path)) if path.is_file() else {}
    for name, (start, finetuned) in pairs.items():
        for a in alphas:
            keys = {split: f"{name}/{a:g}/{split}" for split in parts}
            if all(k in cache and len(cache[k]) == len(parts[s].labels) for s, k in keys.items()):
                continue
            t0 = time.time()
            model = interpolated(start, finetuned, a)
            for split, key in keys.items():
                cache[key], _ = predict_logits(model, parts[split].images, tta="center", batch_size=batch_size)
            np.savez(path, **cache)
            log.info("%s alpha %.2f: logits of %s in %.1f s", name, a,
                     ", ".join(f"{s} ({len(p.labels)})" for s, p in parts.items()), time.time() - t0)
    return cache


def search(fusion: FusionModel, cache: dict, parts: dict, alphas: list[float], cfg: TrainConfig) -> list[dict]:
    """Every combination of the members' alphas: the head fitted on Training, scored on PublicTest and CK+48."""
    names = fusion.member_names
    ck = parts["ckplus48"]
    ck_names, model_names, seqs = ck.class_names, fusion.class_names, ck.extra.get("sequences")
    rows = []
    combos = list(itertools.product(alphas, repeat=len(names)))
    t0 = time.time()
    for i, combo in enumerate(combos):
        if i and i % 64 == 0:
            log.info("%d of %d combinations (%.0f s)", i, len(combos), time.time() - t0)
        view = {}
        for split in ("Training", "PublicTest", "ckplus48"):
            view[f"{split}/labels"] = parts[split].labels
            for n, a in zip(names, combo):
                view[f"{split}/center/{n}"] = cache[f"{n}/{a:g}/{split}"]
        trials, pick = fit_head_trials(fusion, view, cfg)
        with torch.no_grad():
            ck_logits = fusion.fuse([torch.from_numpy(view[f"ckplus48/center/{n}"]).float() for n in names]).numpy()
        ckr = _cross_dataset(ck.labels, ck_logits, ck_names, model_names, seqs)
        t = trials[pick]
        rows.append({"alphas": dict(zip(names, combo)), "public_acc": t["public_acc"],
                     "public_macro_f1": t["public_macro_f1"], "ckplus48_acc": ckr["accuracy"],
                     "score": (t["public_acc"] + ckr["accuracy"]) / 2, "head_balance": pick,
                     "public_recall": t["public_recall"],
                     "ckplus48_recall": {c: round(m["recall"], 4) for c, m in ckr["per_class"].items()}})
    return rows


def member_rows(name: str, cache: dict, parts: dict, alphas: list[float], class_names: list[str]) -> list[dict]:
    """The member's own scores per alpha (the record ``interpolate`` keeps), from the cached logits."""
    ck = parts["ckplus48"]
    rows = []
    for a in alphas:
        pub = score_logits(parts["PublicTest"].labels, cache[f"{name}/{a:g}/PublicTest"], class_names)
        ckr = _cross_dataset(ck.labels, cache[f"{name}/{a:g}/ckplus48"], ck.class_names, class_names,
                             ck.extra.get("sequences"))
        rows.append({"alpha": a, "public_acc": pub["accuracy"], "public_macro_f1": pub["macro_f1"],
                     "ckplus48_acc": ckr["accuracy"], "score": (pub["accuracy"] + ckr["accuracy"]) / 2,
                     "public_recall": {c: m["recall"] for c, m in pub["per_class"].items()}})
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fusion-level WiSE-FT: choose the members' interpolation weights "
                                            "together, by the fused model's PublicTest and CK+48 held-out scores.")
    p.add_argument("--start", required=True, help="comma-separated member checkpoints the fine-tunes started from")
    p.add_argument("--finetuned", required=True, help="comma-separated fine-tuned checkpoints, same order")
    p.add_argument("--data", required=True, help="the shared data root (fer2013/ and ckplus48/)")
    p.add_argument("--output", required=True, help="writes OUTPUT/<member>/best, OUTPUT/search.json, OUTPUT/logits.npz")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated weights of the fine-tuned end")
    p.add_argument("--max-public-drop", type=float, default=0.003,
                   help="combinations whose fused PublicTest is more than this below the starting members' are not kept")
    p.add_argument("--head-train-faces", type=int, default=8000, help="the head's Training subset (as the fusion stage)")
    p.add_argument("--head-epochs", type=int, default=TrainConfig.head_epochs)
    p.add_argument("--limit", type=int, default=None, help="first N faces of each split (smoke tests)")
    p.add_argument("--batch-size", type=int, default=512)
    return p


def main(argv: Optional[list] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    alphas = parse_alphas(args.alphas)
    starts, ends = args.start.split(","), args.finetuned.split(",")
    if len(starts) != len(ends) or len(starts) < 2:
        raise SystemExit("--start and --finetuned need the same number (two or more) of checkpoints")
    start_models = [load_model(s) for s in starts]
    end_models = [load_model(f) for f in ends]
    for s, f, ms, mf in zip(starts, ends, start_models, end_models):
        if ms.arch != mf.arch:
            raise SystemExit(f"{s} is {ms.arch}, {f} is {mf.arch}")
    fusion = FusionModel.from_members(start_models).eval()
    names = fusion.member_names
    pairs = {n: (s, f) for n, s, f in zip(names, start_models, end_models)}
    cfg = TrainConfig(arch="fusion", head_train_faces=args.head_train_faces, head_epochs=args.head_epochs,
                      limit=args.limit)
    root = Path(args.data)
    fer = load_dataset(root, kind="fer2013")
    parts = {"Training": head_split(fer, "Training", cfg), "PublicTest": head_split(fer, "PublicTest", cfg),
             "ckplus48": load_ckplus(root, "heldout")}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cache = member_logits(pairs, alphas, parts, out / "logits.npz", args.batch_size)
    t0 = time.time()
    rows = search(fusion, cache, parts, alphas, cfg)
    best = choose_combination(rows, args.max_public_drop)
    base = next(r for r in rows if not any(r["alphas"].values()))
    log.info("%d combinations in %.0f s; starting members: PublicTest %.2f%%, CK+48 held-out %.2f%%", len(rows),
             time.time() - t0, 100 * base["public_acc"], 100 * base["ckplus48_acc"])
    log.info("kept %s: PublicTest %.2f%%, CK+48 held-out %.2f%%, score %.2f%%", best["alphas"],
             100 * best["public_acc"], 100 * best["ckplus48_acc"], 100 * best["score"])
    record = {"rule": f"fused PublicTest within {100 * args.max_public_drop:.1f} points of the starting members' "
                      "(head refitted the same way), then best (PublicTest + CK+48 held-out) / 2",
              "max_public_drop": args.max_public_drop, "alphas_grid": alphas, "head_train_faces": args.head_train_faces,
              "starting_members": base, "kept": best, "combinations": rows}
    (out / "search.json").write_text(json.dumps(record, indent=1))
    for (name, (s, f)), sdir, fdir in zip(pairs.items(), starts, ends):
        save_interpolated(sdir, fdir, s, f, out / name, {
            "alpha": best["alphas"][name], "chosen_by": "fusion", "max_public_drop": args.max_public_drop,
            "ckplus_subjects": "heldout", "alphas": member_rows(name, cache, parts, alphas, fusion.class_names)})
    return record


if __name__ == "__main__":
    main()
