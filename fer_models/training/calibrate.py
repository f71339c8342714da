"""Calibrated probabilities: temperature scaling, then a monotone map of the top-class confidence.

    python -m fer_models.calibrate checkpoints --data ../shared/data [--write] [--png reliability.png]

Step 1, temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): one scalar ``T``
per output divides its logits before the softmax, fitted by minimising the negative log-likelihood. Step 2, a
confidence map: isotonic regression (pool-adjacent-violators) of "the top class is right" on the top-class
probability after ``T`` (Zadrozny & Elkan, KDD 2002, applied to the top label), stored as ``{"x": [...], "y":
[...]}``; each face's distribution is then flattened or sharpened by its own positive temperature until its top
probability equals the map's value (``models.base.match_confidence``). Neither step ever moves the argmax or the
order of the classes, so accuracy is untouched. Both are fitted on FER2013 **PublicTest** (the selection split;
never PrivateTest), for the fused decision and for each member, and stored in the config (``temperature`` and
``confidence_map``; a fusion's members each in their own member config), so every place that shows or writes
probabilities applies them. Why two steps: on FER2013 a temperature alone leaves 5-7% ECE on PrivateTest even
when fitted on PrivateTest itself (confident faces come out under-confident and middling ones over-confident: a
shape one scalar cannot fix); docs/calibration.md has the comparison.

Expected calibration error (ECE, 15 equal-width confidence bins, Naeini et al., 2015): the mean gap between
confidence and accuracy weighted by the share of faces in each bin. Reported before, after the temperature and
after both steps, on PrivateTest, the CK+48 crops (the six classes it shares with FER2013; a ``neutral``
prediction is an error) and the JAFFE crops. Per-class vector scaling (``softmax(w * logits + b)``) was measured
too (``--vector``, 2-fold cross-validation on PublicTest) and is reported, not used.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..models.base import calibrated_softmax
from ..models.predict import predict_logits, softmax
from ..models.preprocess import faces_to_uint8
from .cli import setup_logging
from .data import FaceData, load_dataset
from .evaluate import shared_labels

log = logging.getLogger("fer_models.calibrate")

ECE_BINS = 15
ROWS = ("fer2013/PublicTest", "fer2013/PrivateTest", "ckplus48", "jaffe/crops")


# --- the numbers ---------------------------------------------------------------------------------------------
def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width bins of the top-class confidence (0 = perfectly calibrated)."""
    table = reliability(probs, labels, bins)
    n = sum(b["count"] for b in table)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin: its range, face count, mean confidence and accuracy (a reliability diagram's data)."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(m.sum()),
                    "confidence": float(conf[m].mean()) if m.any() else 0.0,
                    "accuracy": float(correct[m].mean()) if m.any() else 0.0})
    return out


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = torch.from_numpy(np.asarray(logits, np.float64)) / temperature
    return float(torch.nn.functional.cross_entropy(z, torch.from_numpy(labels).long()))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` > 0 minimising the NLL of ``softmax(logits / T)`` (a convex problem in 1/T; LBFGS on log T)."""
    z = torch.from_numpy(np.asarray(logits, np.float64))
    y = torch.from_numpy(np.asarray(labels)).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def fit_confidence_map(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Isotonic regression of correctness on the top-class probability (pool-adjacent-violators, blocks of equal
    mean merged), as ``{"x": [...], "y": [...]}`` points: each block's lowest and highest confidence at the block's
    accuracy, so the map is the fitted step function, linear only across the gaps between blocks (as
    scikit-learn's IsotonicRegression predicts; joining block centres instead smeared wide blocks: 5% ECE on the
    fitting set itself). A block's accuracy is shrunk towards one half by half a face each way,
    ``(k + 0.5) / (n + 1)``, so a small all-right block at the top reads 97%, not 100%; then clipped to
    [1/classes, 0.999] and kept non-decreasing."""
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    blocks: list[list[float]] = []  # [sum of correct, count, lowest confidence, highest confidence]
    for c, k in zip(conf[order], correct[order]):
        blocks.append([k, 1.0, float(c), float(c)])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            k2, n2, _, hi = blocks.pop()
            blocks[-1] = [blocks[-1][0] + k2, blocks[-1][1] + n2, blocks[-1][2], hi]
    y = np.array([(b[0] + 0.5) / (b[1] + 1.0) for b in blocks])
    y = np.maximum.accumulate(y.clip(1.0 / probs.shape[1], 0.999))
    xs, ys = [], []
    for (_, _, lo, hi), v in zip(blocks, y):
        for x in ((lo,) if hi <= lo else (lo, hi)):
            if not xs or x > xs[-1]:  # strictly increasing points for np.interp
                xs.append(round(float(x), 6))
                ys.append(round(float(v), 5))
    return {"x": xs, "y": ys}


def fit_calibration(logits: dict[str, np.ndarray], labels: np.ndarray) -> tuple[dict[str, float], dict[str, dict]]:
    """Both steps for every output (``{"fused" or a member name: logits}``): the temperatures and the confidence
    maps fitted after them."""
    temps = {k: fit_temperature(v, labels) for k, v in logits.items()}
    return temps, {k: fit_confidence_map(softmax(v / temps[k]), labels) for k, v in logits.items()}


def fit_vector_scaling(logits: np.ndarray, labels: np.ndarray, steps: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Per-class scale ``w`` and bias ``b`` minimising the NLL of ``softmax(w * logits + b)`` (may move the argmax)."""
    z = torch.from_numpy(np.asarray(logits, np.float64))
    y = torch.from_numpy(np.asarray(labels)).long()
    w = torch.ones(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z * w + b, y)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def vector_scaling_cv(logits: np.ndarray, labels: np.ndarray, folds: int = 2, seed: int = 0) -> dict:
    """Temperature vs vector scaling on held-out folds of the fitting split: mean ECE and accuracy of each."""
    idx = np.random.default_rng(seed).permutation(len(labels))
    parts = np.array_split(idx, folds)
    res = {"temperature": {"ece": [], "accuracy": []}, "vector": {"ece": [], "accuracy": []}}
    for k in range(folds):
        test = parts[k]
        train = np.concatenate([p for j, p in enumerate(parts) if j != k])
        t = fit_temperature(logits[train], labels[train])
        w, b = fit_vector_scaling(logits[train], labels[train])
        for name, p in (("temperature", softmax(logits[test] / t)), ("vector", softmax(logits[test] * w + b))):
            res[name]["ece"].append(expected_calibration_error(p, labels[test]))
            res[name]["accuracy"].append(float((p.argmax(1) == labels[test]).mean()))
    return {name: {k: float(np.mean(v)) for k, v in d.items()} for name, d in res.items()}


# --- temperatures in a model's config ------------------------------------------------------------------------
def temperatures_of(cfg: dict) -> dict[str, float]:
    """``{"fused" or arch: T, member: T, ...}`` as stored in a config (1.0 where none is stored)."""
    out = {"fused": float(cfg.get("temperature", 1.0))}
    for name, m in zip(cfg.get("member_names", []), cfg.get("members", [])):
        out[name] = float(m.get("temperature", 1.0))
    return out


def with_calibration(cfg: dict, temps: dict[str, float], maps: Optional[dict[str, dict]] = None) -> dict:
    """A copy of ``cfg`` with ``temps`` and ``maps`` (keyed ``fused`` and member names) written in; an output
    without a map loses any map stored before."""
    cfg = json.loads(json.dumps(cfg))
    maps = maps or {}
    outputs = [("fused", cfg)] + list(zip(cfg.get("member_names", []), cfg.get("members", [])))
    for name, c in outputs:
        if name in temps:
            c["temperature"] = round(float(temps[name]), 5)
            c.pop("confidence_map", None)
            if maps.get(name):
                c["confidence_map"] = maps[name]
    return cfg


# --- the rows ------------------------------------------------------------------------------------------------
def row_logits(model, data_root: Path, rows: Sequence[str] = ROWS, subset: Optional[int] = None,
               batch_size: int = 512) -> dict[str, dict]:
    """``{row: {"labels": y, "logits": {"fused": ..., member: ...}}}`` with centre-crop logits in the model's
    class order (CK+48 restricted to the shared classes)."""
    from .evaluate import fixed_subset
    from .protocol import read_jaffe

    names = list(model.class_names)
    out: dict[str, dict] = {}

    def add(row: str, images: np.ndarray, labels: np.ndarray):
        fused, members = predict_logits(model, images, tta="center", batch_size=batch_size)
        out[row] = {"labels": labels, "logits": {"fused": fused, **members}}

    fer: Optional[FaceData] = None
    for row in rows:
        if row.startswith("fer2013/"):
            fer = fer or load_dataset(data_root)
            part = fer.get_split(row.split("/", 1)[1])
            if subset:
                part = part.subset(fixed_subset(len(part), subset))
            add(row, part.images, part.labels)
        elif row == "ckplus48":
            ck = load_dataset(Path(data_root) / "ckplus48", kind="ckplus")
            if subset:
                ck = ck.subset(fixed_subset(len(ck), subset))
            _, keep, y = shared_labels(ck.labels, ck.class_names, names)
            add(row, ck.images[keep], y)
        elif row == "jaffe/crops":
            photos = read_jaffe(Path(data_root), "crops", names)
            if subset:
                photos = photos.subset(fixed_subset(len(photos.labels), subset))
            spec = model.input_spec()
            faces = faces_to_uint8(photos.images, spec["input_size"], spec["in_chans"]).numpy()
            add(row, faces[:, 0] if spec["in_chans"] == 1 else faces, photos.labels)
        else:
            raise ValueError(f"unknown row {row!r}; choose from {ROWS}")
    return out


def calibrate(model, data_root: Path, *, rows: Sequence[str] = ROWS, subset: Optional[int] = None,
              fit_row: str = "fer2013/PublicTest", vector: bool = False) -> dict:
    """Fit one temperature per output on ``fit_row`` and report NLL/ECE/accuracy before and after on every row."""
    if fit_row not in rows:
        rows = (fit_row, *rows)
    data = row_logits(model, data_root, rows, subset)
    fit = data[fit_row]
    temps, maps = fit_calibration(fit["logits"], fit["labels"])
    report: dict = {"method": "temperature + confidence map", "fitted_on": fit_row, "ece_bins": ECE_BINS,
                    "temperatures": temps, "confidence_maps": maps, "rows": {}}
    for row, d in data.items():
        y = d["labels"]
        report["rows"][row] = {"n": int(len(y)), "outputs": {}}
        for k, lg in d["logits"].items():
            before, scaled = softmax(lg), softmax(lg / temps[k])
            after = calibrated_softmax(torch.from_numpy(np.asarray(lg, np.float32)), temps[k], maps[k]).numpy()
            report["rows"][row]["outputs"][k] = {
                "accuracy": float((lg.argmax(1) == y).mean()),
                "ece_before": expected_calibration_error(before, y),
                "ece_temperature": expected_calibration_error(scaled, y),
                "ece_after": expected_calibration_error(after, y),
                "nll_before": nll(lg, y), "nll_temperature": nll(lg, y, temps[k]),
                "mean_confidence_before": float(before.max(1).mean()),
                "mean_confidence_after": float(after.max(1).mean()),
                "reliability_before": reliability(before, y), "reliability_after": reliability(after, y),
            }
    if vector:
        report["vector_scaling_cv"] = {k: vector_scaling_cv(v, fit["labels"]) for k, v in fit["logits"].items()}
    return report


def reliability_png(report: dict, path: Path, output: str = "fused") -> None:
    """One reliability diagram per row (before and after) for ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r != report["fitted_on"]] or list(report["rows"])
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3.4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        o = report["rows"][row]["outputs"][output]
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
        for key, colour, label in (("before", "tab:red", "raw"), ("after", "tab:blue", "calibrated")):
            bins = [b for b in o[f"reliability_{key}"] if b["count"] >= 5]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=colour, ms=3,
                    label=f"{label} (ECE {100 * o[f'ece_{key}']:.1f}%)")
        ax.set(title=f"{row} (n={report['rows'][row]['n']})", xlabel="confidence", xlim=(0, 1), ylim=(0, 1.02))
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reliability of the {output} probabilities (15 bins; bins with >= 5 faces)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(report: dict) -> dict:
    """The report without the per-bin tables: what results.json and the model card carry."""
    out = {k: v for k, v in report.items() if k not in ("rows", "confidence_maps")}
    out["rows"] = {row: {"n": r["n"], "outputs": {k: {m: round(v, 5) for m, v in o.items()
                                                        if not m.startswith("reliability")}
                                                   for k, o in r["outputs"].items()}}
                   for row, r in report["rows"].items()}
    return out


def format_table(report: dict) -> str:
    lines = ["| row | output | accuracy | ECE before | ECE, temperature | ECE, temperature + map | NLL before | "
             "NLL, temperature |", "|---|---|---|---|---|---|---|---|"]
    for row, r in report["rows"].items():
        for k, o in r["outputs"].items():
            lines.append(f"| {row} | {k} (T={report['temperatures'][k]:.2f}) | {100 * o['accuracy']:.2f}% | "
                         f"{100 * o['ece_before']:.2f}% | {100 * o['ece_temperature']:.2f}% | "
                         f"{100 * o['ece_after']:.2f}% | {o['nll_before']:.3f} | {o['nll_temperature']:.3f} |")
    return "\n".join(lines)


def write_into_checkpoint(folder: Path, report: dict, png: Optional[Path] = None) -> None:
    """Store the temperatures and confidence maps in ``folder/config.json`` and the report in
    ``folder/results.json`` (weights untouched)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg = with_calibration(cfg, report["temperatures"], report.get("confidence_maps"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    res_path = folder / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    results["calibration"] = summary(report)
    if png is not None:
        results["calibration"]["reliability_png"] = Path(png).name
    res_path.write_text(json.dumps(results, indent=1))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fit temperatures on PublicTest; report ECE before/after per row.")
    p.add_argument("model", help="checkpoint folder (or Hub repo id)")
    p.add_argument("--data", default="../shared/data", help="the data root (fer2013/, ckplus48/, jaffe/)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--subset", type=int, default=None, help="a fixed subset of at most N images per row")
    p.add_argument("--vector", action="store_true", help="also compare per-class vector scaling (2-fold CV)")
    p.add_argument("--write", action="store_true",
                   help="store the temperatures in MODEL/config.json and the report in MODEL/results.json")
    p.add_argument("--png", default=None, help="reliability diagrams of the fused probabilities")
    p.add_argument("--out", default=None, help="the full report (per-bin tables included) as JSON")
    return p


def main(argv: Optional[list] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    setup_logging(timestamps=True)
    from ..models import load_model
    from ..models.fold import prepare_for_inference

    model = prepare_for_inference(load_model(args.model))
    report = calibrate(model, Path(args.data), rows=args.rows, subset=args.subset, vector=args.vector)
    print(format_table(report))
    if args.vector:
        print(json.dumps(report["vector_scaling_cv"], indent=1))
    if args.png:
        reliability_png(report, Path(args.png))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.write:
        write_into_checkpoint(Path(args.model), report, Path(args.png) if args.png else None)
        log.info("temperatures and confidence maps written to %s/config.json", args.model)
    return report


if __name__ == "__main__":
    main()
