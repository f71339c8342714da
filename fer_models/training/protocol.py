"""The real-photo validation protocol: one table of a checkpoint on FER2013 and on faces that do not look like it.

    python -m fer_models.protocol checkpoints --data ../shared/data [--baseline OLD_DIR] [--tta tencrop]
        [--subset N] [--out protocol.json]

Rows (every one scored per image, with accuracy, macro-F1, per-class recall and each backbone's accuracy):

* ``fer2013/PublicTest``, ``fer2013/PrivateTest`` — centre crop (``--tta tencrop`` adds PrivateTest ten-crop);
* ``ckplus48`` — the six classes CK+48 shares with FER2013 (``contempt`` left out, a ``neutral`` prediction is
  an error), 48 px grey crops like FER2013's but posed and lab-lit;
* ``jaffe/crops`` — the 213 JAFFE face crops (~170 px, studio photos) through ``FacePredictor.predict_crops``,
  the app's classifier on a given crop (centre view);
* ``jaffe/fullframe`` — the 68 JAFFE full frames through the app's own ``FacePredictor.analyze_batch``
  (detector, eye-levelled crop at the detector's margin, classifier); a photo with no face found is an error;
* ``ckplus48/heldout``, ``jaffe/crops/heldout``, ``jaffe/fullframe/heldout`` — the same rows on the **held-out
  subjects** of the fixed subject-disjoint split (:mod:`.posed`, docs/posed_split.md) only. A model trained with
  ``--posed`` has seen the other subjects, so only these rows are fair to it; the all-subject rows stay for
  comparison with results from before the split.

With ``--baseline`` both checkpoints are scored on the same images and each row gets an exact McNemar test of
the two (photos only one of them got right). **Selection rule**, stated here once and used by
``scripts/``/the README: a candidate checkpoint is chosen by ``selection_score = (PublicTest + CK+48 held-out
subjects) / 2`` (centre-crop accuracies; all CK+48 subjects when the held-out row is not scored); FER2013
PrivateTest and the JAFFE rows are reported, never used to choose. CK+48 and JAFFE images of held-out subjects
are never trained on.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .cli import setup_logging
from .data import FaceData, load_dataset
from .evaluate import _cross_dataset, fixed_subset, shared_labels
from .metrics import mcnemar_exact, score_logits
from .posed import jaffe_subject, subject_mask

log = logging.getLogger("fer_models.protocol")

JAFFE_EXTS = (".tiff", ".tif", ".jpg", ".jpeg", ".png")
ROWS = ("fer2013/PublicTest", "fer2013/PrivateTest", "fer2013/PrivateTest/tencrop", "ckplus48", "jaffe/crops",
        "jaffe/fullframe", "ckplus48/heldout", "jaffe/crops/heldout", "jaffe/fullframe/heldout")


@dataclass
class Photos:
    """Real photos of any size (RGB uint8), their labels (indices into ``class_names``) and file names."""

    images: list[np.ndarray]
    labels: np.ndarray
    class_names: list[str]
    names: list[str]

    def subset(self, idx: np.ndarray) -> "Photos":
        return Photos([self.images[i] for i in idx], self.labels[idx], self.class_names, [self.names[i] for i in idx])


def read_jaffe(root: Path, kind: str, class_names: Sequence[str]) -> Photos:
    """``jaffe/<kind>/<class>/*`` (kind ``crops`` or ``fullframe``) as RGB photos; unknown classes are an error."""
    from PIL import Image

    d = Path(root) / "jaffe" / kind
    files = sorted(f for f in d.glob("*/*") if f.suffix.lower() in JAFFE_EXTS)
    if not files:
        raise FileNotFoundError(f"no JAFFE {kind} under {d}")
    unknown = sorted({f.parent.name for f in files} - set(class_names))
    if unknown:
        raise ValueError(f"JAFFE classes {unknown} are not model classes {list(class_names)}")
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(np.asarray(im.convert("RGB")))
    labels = np.array([list(class_names).index(f.parent.name) for f in files], np.int64)
    return Photos(images, labels, list(class_names), [f"{f.parent.name}/{f.name}" for f in files])


def _row(y: np.ndarray, probs: np.ndarray, member_probs: dict[str, np.ndarray], names: list[str],
         found: Optional[np.ndarray] = None) -> dict:
    """Scores of one row; ``found`` marks images with a prediction (the others count as errors)."""
    pred = probs.argmax(1)
    correct = pred == y
    if found is not None:
        correct &= found
    res = score_logits(y, np.log(np.clip(probs, 1e-12, None)), names)
    res["accuracy"] = float(correct.mean())  # misses (no face) are errors, not left out
    res["correct"] = correct.tolist()
    res["members"] = {k: float(((v.argmax(1) == y) & (found if found is not None else True)).mean())
                      for k, v in member_probs.items()}
    if found is not None:
        res["found"] = int(found.sum())
    return res


def _predict(predictor, images: Sequence[np.ndarray], tta: bool = False, chunk: int = 256):
    """``predictor.predict_crops`` in chunks of faces, so a ten-crop of 3,589 faces does not hold 36k views."""
    parts = [predictor.predict_crops(list(images[i:i + chunk]), tta=tta) for i in range(0, len(images), chunk)]
    probs = np.concatenate([r.probs for r in parts])
    members = {k: np.concatenate([r.member_probs[k] for r in parts]) for k in parts[0].member_probs}
    return probs, members


def _fer_row(predictor, data: FaceData, tta: bool) -> dict:
    probs, members = _predict(predictor, data.images, tta=tta)
    return _row(data.labels, probs, members, predictor.class_names)


def _ck_row(data: FaceData, probs: np.ndarray, members: dict[str, np.ndarray], model_names: list[str]) -> dict:
    """CK+48's scores on the classes it shares with the model (per image and per sequence)."""
    logp = np.log(np.clip(probs, 1e-12, None))
    res = _cross_dataset(data.labels, logp, data.class_names, model_names, data.extra.get("sequences"))
    _, keep, y = shared_labels(data.labels, data.class_names, model_names)
    res["correct"] = (probs[keep].argmax(1) == y).tolist()
    res["members"] = {k: float((v[keep].argmax(1) == y).mean()) for k, v in members.items()}
    return res


def _fullframe_predict(predictor, photos: Photos):
    """Every photo through the app's own path (``analyze_batch``: detection per photo, one forward for all
    crops); the largest face found is the photo's prediction. Returns probs, member probs and found."""
    c = len(predictor.class_names)
    probs = np.zeros((len(photos.images), c))
    members = {n: np.zeros((len(photos.images), c)) for n in predictor.backbones}
    found = np.zeros(len(photos.images), bool)
    for i, analysis in enumerate(predictor.analyze_batch(photos.images)):
        faces = analysis.faces
        if not faces:
            continue
        f = max(faces, key=lambda f: f.box.area)
        found[i] = True
        probs[i] = [f.probs[n] for n in predictor.class_names]
        for v in f.votes:
            members[v.name][i] = [v.probs[n] for n in predictor.class_names]
    return probs, members, found


def run_protocol(predictor, data_root: Path, *, tencrop: bool = False, subset: Optional[int] = None,
                 rows: Sequence[str] = ROWS) -> dict:
    """``{row: scores}`` for a :class:`~fer_models.pipeline.FacePredictor`; ``subset`` scores a fixed, evenly
    spread subset of at most that many images per row (quick checks and tests)."""
    data_root = Path(data_root)
    names = predictor.class_names

    def pick(n: int) -> np.ndarray:
        return fixed_subset(n, subset) if subset else np.arange(n)

    out: dict = {}
    if any(r.startswith("fer2013") for r in rows):
        fer = load_dataset(data_root, kind="fer2013")
        if list(fer.class_names) != names:
            raise ValueError(f"FER2013 classes {fer.class_names} differ from the model's {names}")
        for split in ("PublicTest", "PrivateTest"):
            part = fer.get_split(split)
            part = part.subset(pick(len(part)))
            if f"fer2013/{split}" in rows:
                out[f"fer2013/{split}"] = _fer_row(predictor, part, tta=False)
            if split == "PrivateTest" and tencrop and "fer2013/PrivateTest/tencrop" in rows:
                out["fer2013/PrivateTest/tencrop"] = _fer_row(predictor, part, tta=True)
    # Each posed set is read and predicted once; its all-subject and held-out rows are cut from the predictions.
    for base in ("ckplus48", "jaffe/crops", "jaffe/fullframe"):
        tags = [t for t in ("", "/heldout") if f"{base}{t}" in rows]
        if not tags:
            continue
        if base == "ckplus48":
            data = load_dataset(data_root / "ckplus48", kind="ckplus")
            subjects, labels = data.subjects, data.labels
        else:
            data = read_jaffe(data_root, base.split("/")[1], names)
            subjects, labels = [jaffe_subject(n) for n in data.names], data.labels
        picked = {}
        for tag in tags:
            mask = subject_mask(subjects, base.split("/")[0], "heldout") if tag else np.ones(len(labels), bool)
            picked[tag] = np.flatnonzero(mask)[pick(int(mask.sum()))]
        union = np.unique(np.concatenate(list(picked.values())))
        if base == "ckplus48":
            probs, members = _predict(predictor, data.images[union])
        elif base == "jaffe/crops":
            probs, members = _predict(predictor, data.subset(union).images)
        else:
            probs, members, found = _fullframe_predict(predictor, data.subset(union))
        for tag, idx in picked.items():
            pos = np.searchsorted(union, idx)
            p, m = probs[pos], {k: v[pos] for k, v in members.items()}
            if base == "ckplus48":
                out[base + tag] = _ck_row(data.subset(idx), p, m, names)
            else:
                out[base + tag] = _row(labels[idx], p, m, names, found[pos] if base == "jaffe/fullframe" else None)
    ck_row = "ckplus48/heldout" if "ckplus48/heldout" in out else "ckplus48"
    if "fer2013/PublicTest" in out and ck_row in out:
        out["selection_score"] = (out["fer2013/PublicTest"]["accuracy"] + out[ck_row]["accuracy"]) / 2
        out["selection_rows"] = ["fer2013/PublicTest", ck_row]
    return out


def paired_tests(new: dict, old: dict) -> dict:
    """Exact McNemar per row shared by two protocol results (new vs old, on the same images)."""
    out = {}
    for row in ROWS:
        if row in new and row in old and len(new[row]["correct"]) == len(old[row]["correct"]):
            out[row] = mcnemar_exact(np.array(new[row]["correct"]), np.array(old[row]["correct"]))
    return out


def format_table(results: dict[str, dict], tests: Optional[dict] = None) -> str:
    """A markdown table: one row per protocol row, one column per checkpoint (+ the paired test)."""
    labels = list(results)
    head = ["row", "n"] + labels + (["only first right / only second right, McNemar p"] if tests else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        if not any(row in r for r in results.values()):
            continue
        first = next(r[row] for r in results.values() if row in r)
        cells = [row, str(len(first["correct"]))]
        for lab in labels:
            r = results[lab].get(row)
            cells.append("—" if r is None else f"{r['accuracy']:.2%}" + (
                f" (found {r['found']})" if "found" in r else ""))
        if tests:
            t = tests.get(row)
            cells.append("—" if t is None else f"{t['only_a']} / {t['only_b']}, p = {t['p_value']:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    scores = [results[lab].get("selection_score") for lab in labels]
    if any(s is not None for s in scores):
        ck = "CK+48 held-out" if any("ckplus48/heldout" in r for r in results.values()) else "CK+48"
        lines.append(f"| selection score (PublicTest + {ck}) / 2 | | " + " | ".join(
            "—" if s is None else f"{s:.2%}" for s in scores) + (" | |" if tests else " |"))
    return "\n".join(lines)


def format_recall(result: dict) -> str:
    """Per-class recall of every row of one checkpoint (the weak classes of each domain at a glance)."""
    rows = [r for r in ROWS if r in result]
    names = list(result[rows[0]]["per_class"])
    lines = ["| row | " + " | ".join(names) + " | members |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        pc = result[r]["per_class"]
        cells = [f"{pc[n]['recall']:.0%}" if pc[n]["support"] else "—" for n in names]
        mem = ", ".join(f"{k} {v:.1%}" for k, v in result[r]["members"].items())
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {mem} |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FER2013 + CK+48 + JAFFE crops + JAFFE full frames, for a checkpoint.")
    p.add_argument("model", help="checkpoint directory or Hub repo id")
    p.add_argument("--data", required=True, help="the shared data root (fer2013/, ckplus48/, jaffe/)")
    p.add_argument("--baseline", default=None, help="a second checkpoint, scored on the same images and paired")
    p.add_argument("--tta", choices=["center", "tencrop"], default="center",
                   help="tencrop adds a PrivateTest ten-crop row (about 18 min per checkpoint on 2 CPU cores)")
    p.add_argument("--subset", type=int, default=None, help="at most this many images per row (fixed subset)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to score")
    p.add_argument("--detector", default=None, help="face detector for the full frames (default: the app's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write all results (and the paired tests) as JSON here")
    return p


def _predictor(model_path: str, device: str, detector: Optional[str]):
    from ..pipeline import FacePredictor, load_model_with_fallback

    repo = None if Path(model_path).is_dir() else model_path
    model, source = load_model_with_fallback(repo, model_path, device=device)
    kwargs = {"detector": detector} if detector else {}
    return FacePredictor(model, source=source, **kwargs)


def main(argv: Optional[list] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    rows = [r for r in args.rows.split(",") if r]
    bad = sorted(set(rows) - set(ROWS))
    if bad:
        raise SystemExit(f"unknown rows {bad}; choose from {list(ROWS)}")
    kw = dict(tencrop=args.tta == "tencrop", subset=args.subset, rows=rows)
    results = {args.model: run_protocol(_predictor(args.model, args.device, args.detector), Path(args.data), **kw)}
    tests = None
    if args.baseline:
        results[args.baseline] = run_protocol(_predictor(args.baseline, args.device, args.detector),
                                              Path(args.data), **kw)
        tests = paired_tests(results[args.model], results[args.baseline])
    print(format_table(results, tests))
    for lab, res in results.items():
        print(f"\nper-class recall, {lab}:\n{format_recall(res)}")
    out = {"results": results, "paired_tests": tests, "subset": args.subset, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
