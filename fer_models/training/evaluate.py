"""Evaluate a FER checkpoint: ``python -m fer_models.evaluate <model> --data <path> --split PrivateTest [--tta tencrop]``.

Prints accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix; writes JSON (``--out``) and a
confusion-matrix PNG (``--png``). For a fusion model, every member is reported too (from the same forward pass).

CK+48 (``--data .../ckplus48``) is scored cross-dataset on the classes it shares with the model (angry, disgust,
fear, happy, sad, surprise: ``contempt`` faces are left out, CK+48 has no neutral). Two numbers are reported:
``accuracy`` counts a prediction of a class CK+48 lacks (neutral) as an error, over all 7 model outputs;
``accuracy_shared_argmax`` takes the argmax over the shared classes only. Scores are per image; the three
frames of a sequence are near-duplicates, so a per-sequence majority vote is reported as well.
``--subjects heldout`` scores only CK+48's held-out subjects of the fixed subject-disjoint split (what a model trained
on the other subjects, ``train --posed ckplus48``, must be judged on; recorded as ``ckplus48-heldout``).
``--update-card`` merges the results into the model directory's ``results.json`` and regenerates its card.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..models import load_model
from .cli import setup_logging
from .data import FaceData, load_dataset
from .metrics import format_report, plot_confusion, score_logits
from ..models.predict import predict_logits, resolve_device

log = logging.getLogger("fer_models.evaluate")


def fixed_subset(n_total: int, n: int) -> np.ndarray:
    """``n`` indices spread evenly over a split: a fixed, reproducible subset for quick regression checks."""
    return np.unique(np.linspace(0, n_total - 1, min(n, n_total)).round().astype(int))


def evaluate_fer(model, data: FaceData, split: str, tta: str, batch_size: int = 512, device=None,
                 subset: Optional[int] = None) -> dict:
    part = data.get_split(split)
    if subset:
        part = part.subset(fixed_subset(len(part), subset))
    if list(part.class_names) != list(model.class_names):
        raise ValueError(f"data classes {part.class_names} differ from the model's {model.class_names}")
    logits, members = predict_logits(model, part.images, tta=tta, batch_size=batch_size, device=device)
    res = score_logits(part.labels, logits, model.class_names)
    res.update(split=split, tta=tta, dataset=data.name)
    if members:
        res["members"] = {k: score_logits(part.labels, v, model.class_names) for k, v in members.items()}
    return res


def shared_labels(labels_ck: np.ndarray, ck_names: list[str], model_names: list[str]):
    """``(shared, keep, y)``: the classes present in both, which samples have one, and their model indices."""
    present = set(np.array(ck_names)[np.unique(labels_ck)])
    shared = [c for c in ck_names if c in model_names and c in present]
    keep = np.isin(np.array(ck_names)[labels_ck], shared)
    y = np.array([model_names.index(ck_names[l]) for l in labels_ck[keep]])
    return shared, keep, y


def _cross_dataset(labels_ck: np.ndarray, logits: np.ndarray, ck_names: list[str], model_names: list[str],
                   sequences: Optional[np.ndarray]) -> dict:
    shared, keep, y = shared_labels(labels_ck, ck_names, model_names)
    present = set(np.array(ck_names)[np.unique(labels_ck)])
    lg = logits[keep]
    full = score_logits(y, lg, model_names)
    idx = [model_names.index(c) for c in shared]
    restricted = np.array(idx)[lg[:, idx].argmax(1)]
    out = {
        "accuracy": full["accuracy"], "macro_f1": full["macro_f1"],
        "accuracy_shared_argmax": float((restricted == y).mean()),
        "n": int(keep.sum()), "shared_classes": shared,
        "excluded": {c: int((np.array(ck_names)[labels_ck] == c).sum()) for c in sorted(present - set(shared))},
        "predicted_missing_class": {c: int((lg.argmax(1) == model_names.index(c)).sum())
                                    for c in model_names if c not in shared},
        "per_class": full["per_class"], "confusion_matrix": full["confusion_matrix"], "class_names": model_names,
    }
    if sequences is not None:
        seqs = sequences[keep]
        uniq = np.unique(seqs)
        probs = np.exp(lg - lg.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        hits = [probs[seqs == s].mean(0).argmax() == y[seqs == s][0] for s in uniq]
        out["accuracy_per_sequence"] = float(np.mean(hits))
        out["n_sequences"] = int(len(uniq))
    return out


def evaluate_ckplus(model, data: FaceData, tta: str, batch_size: int = 512, device=None) -> dict:
    logits, members = predict_logits(model, data.images, tta=tta, batch_size=batch_size, device=device)
    seqs = data.extra.get("sequences")
    res = _cross_dataset(data.labels, logits, data.class_names, model.class_names, seqs)
    res.update(split="all", tta=tta, dataset="ckplus48")
    if members:
        res["members"] = {k: _cross_dataset(data.labels, v, data.class_names, model.class_names, seqs)
                          for k, v in members.items()}
    return res


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a FER checkpoint on FER2013 or CK+48.")
    p.add_argument("model", help="checkpoint directory or Hub repo id")
    p.add_argument("--data", required=True, help="FER2013 file/folder, the shared data root, or a CK+48 folder")
    p.add_argument("--split", default="PrivateTest", help="FER2013 split (ignored for CK+48)")
    p.add_argument("--tta", choices=["center", "tencrop"], default="center")
    p.add_argument("--subjects", choices=["all", "heldout"], default="all",
                   help="CK+48: all subjects, or the held-out subjects of the fixed split (docs/posed_split.md)")
    p.add_argument("--subset", type=int, default=None,
                   help="score a fixed subset of this many faces spread over the split (recorded as <split><n>)")
    p.add_argument("--batch-size", type=int, default=512, help="network inputs per forward (ten-crop: /10 faces)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--png", default=None, help="write the confusion matrix as PNG here")
    p.add_argument("--update-card", action="store_true",
                   help="merge into <model>/results.json and rewrite its model card (local directory only)")
    return p


def main(argv: Optional[list] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
    data_path = Path(args.data)
    is_ck = "ck" in data_path.name.lower() or (data_path / "contempt").is_dir()
    data = load_dataset(data_path, kind="ckplus" if is_ck else "fer2013")
    if is_ck:
        name = "ckplus48"
        if args.subjects == "heldout":
            from .posed import subject_mask

            data = data.subset(np.flatnonzero(subject_mask(data.subjects, "ckplus48", "heldout")))
            name = "ckplus48-heldout"
        res = evaluate_ckplus(model, data, args.tta, args.batch_size, device)
        res["dataset"] = name
        key = f"{name}/{args.tta}"
    else:
        res = evaluate_fer(model, data, args.split, args.tta, args.batch_size, device, subset=args.subset)
        key = f"{args.split}{args.subset or ''}/{args.tta}"
    print(f"== {args.model} on {key}")
    print(format_report(res))
    if is_ck:
        print(f"accuracy over shared classes only: {res['accuracy_shared_argmax'] * 100:.2f}%; per sequence: "
              f"{res.get('accuracy_per_sequence', float('nan')) * 100:.2f}%; predicted a class CK+48 lacks: "
              f"{res['predicted_missing_class']}")
    for name, m in res.get("members", {}).items():
        print(f"   member {name}: accuracy {m['accuracy'] * 100:.2f}%  macro-F1 {m['macro_f1'] * 100:.2f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.png:
        plot_confusion(res["confusion_matrix"], res["class_names"], args.png, title=f"{model.arch} – {key}")
    if args.update_card:
        from .card import write_model_card

        mdir = Path(args.model)
        if not mdir.is_dir():
            raise SystemExit("--update-card needs a local model directory")
        rec_path = mdir / "results.json"
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {"arch": model.arch}
        rec[key] = res
        rec_path.write_text(json.dumps(rec, indent=1))
        write_model_card(mdir, model.cfg, rec)
    return res


if __name__ == "__main__":
    main()
