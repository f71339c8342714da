"""Robustness report: a checkpoint on FER2013 PrivateTest under controlled perturbations at several strengths.

    python -m fer_models.robustness MODEL [--baseline OTHER] --data ../shared/data [--split PrivateTest]
        [--subset N] [--perturbations brightness,eyes_band] [--out robustness.json] [--png robustness.png]
        [--seed 0] [--update-card]

The design follows the corruption benchmarks of Hendrycks & Dietterich ("Benchmarking Neural Network Robustness
to Common Corruptions and Perturbations", ICLR 2019, ImageNet-C): a fixed list of perturbations, each at a few
fixed strengths, applied with a fixed seed to the test faces, so two checkpoints are scored on the *same* pixels
(each setting is perturbed once and both models see it; the paired McNemar test of each row uses that).

Perturbations (uint8 ``N x H x W`` faces in, uint8 out; each has a zero-strength identity that returns the faces
unchanged, and the random ones draw from a generator seeded by ``(seed, name, strength)``):

* lighting: ``brightness`` (add -80/-40/+40/+80 grey levels), ``gamma`` (0.5/0.7/1.5/2.0 on [0, 1] pixels; < 1
  brightens), ``contrast`` (x0.5/x0.3 about each face's mean);
* optics and transport: ``blur`` (Gaussian, sigma 1/2 px), ``down_up`` (area-down to 24/16/12 px, bilinear back),
  ``jpeg`` (quality 30/10, OpenCV's libjpeg), ``noise`` (Gaussian, sigma 10/20/30 grey levels);
* pose: ``rotation`` (in-plane, 10/20/30 degrees about the centre, a seeded random sign per face, border replicated);
* occlusion, filled with each face's own mean grey (no brightness change, no new dark/bright blob):
  ``eyes_band`` rows 12-23 and ``mouth_band`` rows 32-43 of the 48-row frame (full width, 12 rows = 25% of the
  face each), ``patch`` a 16 or 24 px square at a seeded random position (24 px = the area of a band).

The bands were measured on the mean of the 28,709 FER2013 Training faces: its darkest rows over the central
columns are row 17 (the eyes, dark blobs over rows ~13-21) and row 38 (the mouth, rows ~34-40); each band is
centred on its row (17.5, 37.5). The faces are only roughly aligned, so a band covers most, not all, eyes/mouths.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import cv2
import numpy as np

from ..models.predict import predict_logits, resolve_device
from .cli import setup_logging
from .metrics import mcnemar_exact, score_logits

log = logging.getLogger("fer_models.robustness")

# Band rows as fractions of the frame height (rows 12-23 and 32-43 of 48); see the module docstring.
EYES_BAND = (12 / 48, 24 / 48)
MOUTH_BAND = (32 / 48, 44 / 48)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _per_face(faces: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.stack([fn(f) for f in faces]) if len(faces) else faces.copy()


# --- the perturbations: (faces, strength, rng) -> faces -------------------------------------------------------
def brightness(faces: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(faces.astype(np.float32) + delta)


def gamma(faces: np.ndarray, g: float, rng: np.random.Generator) -> np.ndarray:
    lut = _to_uint8(255.0 * (np.arange(256) / 255.0) ** g)
    return lut[faces]


def contrast(faces: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    x = faces.astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8((x - mean) * factor + mean)


def blur(faces: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _per_face(faces, lambda f: cv2.GaussianBlur(f, (0, 0), sigmaX=float(sigma),
                                                       borderType=cv2.BORDER_REPLICATE))


def down_up(faces: np.ndarray, side: float, rng: np.random.Generator) -> np.ndarray:
    """Down to ``side`` px (area average, as a small face in a photo), bilinear back up (as the app's resize)."""
    h, w = faces.shape[1:]
    s = int(side)
    return _per_face(faces, lambda f: cv2.resize(cv2.resize(f, (s, s), interpolation=cv2.INTER_AREA), (w, h),
                                                 interpolation=cv2.INTER_LINEAR))


def jpeg(faces: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    def one(f: np.ndarray) -> np.ndarray:
        ok, buf = cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return _per_face(faces, one)


def noise(faces: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(faces.astype(np.float32) + rng.normal(0.0, sigma, faces.shape).astype(np.float32))


def rotation(faces: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """In-plane rotation by +-``degrees`` (sign drawn per face) about the frame centre; borders replicated, so
    the corners hold no black wedges that would be a second perturbation."""
    h, w = faces.shape[1:]
    signs = rng.choice(np.array([-1.0, 1.0]), size=len(faces))
    out = np.empty_like(faces)
    for i, (f, s) in enumerate(zip(faces, signs)):
        m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), s * float(degrees), 1.0)
        out[i] = cv2.warpAffine(f, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out


def _face_means(faces: np.ndarray) -> np.ndarray:
    return _to_uint8(faces.reshape(len(faces), -1).mean(1))


def band_rows(height: int, band: tuple[float, float]) -> tuple[int, int]:
    return int(round(band[0] * height)), int(round(band[1] * height))


def _occlude_band(faces: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    r0, r1 = band_rows(faces.shape[1], band)
    out = faces.copy()
    out[:, r0:r1, :] = _face_means(faces)[:, None, None]
    return out


def eyes_band(faces: np.ndarray, on: float, rng: np.random.Generator) -> np.ndarray:
    return _occlude_band(faces, EYES_BAND)


def mouth_band(faces: np.ndarray, on: float, rng: np.random.Generator) -> np.ndarray:
    return _occlude_band(faces, MOUTH_BAND)


def patch(faces: np.ndarray, side: float, rng: np.random.Generator) -> np.ndarray:
    """A square of ``side`` px (on a 48 px frame; scaled with the frame) at a uniform random position inside it."""
    n, h, w = faces.shape
    s = max(1, min(h, w, int(round(side * h / 48))))
    ys, xs = rng.integers(0, h - s + 1, n), rng.integers(0, w - s + 1, n)
    out = faces.copy()
    for i, (y, x, m) in enumerate(zip(ys, xs, _face_means(faces))):
        out[i, y:y + s, x:x + s] = m
    return out


@dataclass(frozen=True)
class Perturbation:
    """One perturbation and its strengths; ``levels`` is the plot's x axis in order, ``identity`` included."""

    name: str
    fn: Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]
    levels: tuple
    identity: Any
    fmt: str  # how a strength reads in a table: "{:+g}" etc.; the identity reads "none"

    @property
    def strengths(self) -> tuple:
        return tuple(s for s in self.levels if s != self.identity)

    def label(self, strength: Any) -> str:
        return "none" if strength == self.identity else self.fmt.format(strength)

    def apply(self, faces: np.ndarray, strength: Any, seed: int = 0) -> np.ndarray:
        """The faces at ``strength`` (a copy at the identity); the same ``(seed, strength)`` gives the same pixels."""
        faces = np.asarray(faces)
        if faces.dtype != np.uint8 or faces.ndim != 3:
            raise ValueError(f"expected uint8 N x H x W faces, got {faces.dtype} {faces.shape}")
        if strength == self.identity:
            return faces.copy()
        rng = np.random.default_rng([int(seed), zlib.crc32(f"{self.name}:{strength}".encode())])
        return self.fn(faces, strength, rng)


PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("brightness", brightness, (-80, -40, 0, 40, 80), 0, "{:+g} grey"),
    Perturbation("gamma", gamma, (0.5, 0.7, 1.0, 1.5, 2.0), 1.0, "gamma {:g}"),
    Perturbation("contrast", contrast, (1.0, 0.5, 0.3), 1.0, "x{:g}"),
    Perturbation("blur", blur, (0, 1, 2), 0, "sigma {:g} px"),
    Perturbation("down_up", down_up, (48, 24, 16, 12), 48, "{:g} px"),
    Perturbation("jpeg", jpeg, (None, 30, 10), None, "quality {:g}"),
    Perturbation("noise", noise, (0, 10, 20, 30), 0, "sigma {:g}"),
    Perturbation("rotation", rotation, (0, 10, 20, 30), 0, "+-{:g} deg"),
    Perturbation("eyes_band", eyes_band, (0, 1), 0, "rows 12-23"),
    Perturbation("mouth_band", mouth_band, (0, 1), 0, "rows 32-43"),
    Perturbation("patch", patch, (0, 16, 24), 0, "{:g} px square"),
)


def get_perturbations(names: Optional[Iterable[str]] = None) -> tuple[Perturbation, ...]:
    if names is None:
        return PERTURBATIONS
    by_name = {p.name: p for p in PERTURBATIONS}
    names = list(names)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown perturbations {unknown}; choose from {list(by_name)}")
    return tuple(by_name[n] for n in names)


# --- scoring ---------------------------------------------------------------------------------------------
def _score(labels: np.ndarray, logits: np.ndarray, members: dict, class_names: list[str]) -> dict:
    s = score_logits(labels, logits, class_names)
    return {
        "accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
        "recall": {c: m["recall"] for c, m in s["per_class"].items()},
        "members": {k: float((v.argmax(1) == labels).mean()) for k, v in members.items()},
        "correct": logits.argmax(1) == labels,  # dropped before the result leaves score_robustness
    }


def score_robustness(
    model, faces: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, baseline=None,
    perturbations: Sequence[Perturbation] = PERTURBATIONS, seed: int = 0, tta: str = "center",
    batch_size: int = 512, device: Union[str, None] = None, names: Optional[dict] = None,
) -> dict:
    """Accuracy, macro-F1 and per-class recall of ``model`` (and ``baseline``, on the same perturbed faces) on the
    clean faces and at every strength of every perturbation; with a baseline each row has an exact McNemar test.

    Models are called only through :func:`predict_logits` (centre crop by default). Returns a JSON-ready dict
    whose ``rows`` start with the clean row; ``seconds`` splits the time into perturbing and each model's forwards.
    """
    labels = np.asarray(labels, np.int64)
    models = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    for role, m in models.items():
        if list(m.class_names) != list(class_names):
            raise ValueError(f"{role} classes {m.class_names} differ from the data's {list(class_names)}")
    settings: list[tuple[Optional[Perturbation], Any]] = [(None, None)]
    settings += [(p, s) for p in perturbations for s in p.strengths]
    seconds = {"perturb": 0.0, **{r: 0.0 for r in models}}
    rows = []
    for i, (p, strength) in enumerate(settings):
        t0 = time.perf_counter()
        x = faces if p is None else p.apply(faces, strength, seed)
        seconds["perturb"] += time.perf_counter() - t0
        row: dict[str, Any] = {"perturbation": "clean" if p is None else p.name,
                               "strength": strength, "label": "none" if p is None else p.label(strength)}
        for role, m in models.items():
            t0 = time.perf_counter()
            logits, members = predict_logits(m, x, tta=tta, batch_size=batch_size, device=device)
            seconds[role] += time.perf_counter() - t0
            row[role] = _score(labels, logits, members, list(class_names))
        if baseline is not None:
            row["paired"] = mcnemar_exact(row["model"]["correct"], row["baseline"]["correct"])
        rows.append(row)
        log.info("[%d/%d] %s %s: %s", i + 1, len(settings), row["perturbation"], row["label"],
                 "  ".join(f"{r} {row[r]['accuracy']:.2%}" for r in models))
    for row in rows:
        for role in models:
            row[role].pop("correct")
            row[role]["delta"] = row[role]["accuracy"] - rows[0][role]["accuracy"]
    perturbed = rows[1:]
    summary = {r: float(np.mean([row[r]["accuracy"] for row in perturbed])) if perturbed else None for r in models}
    return {
        "n": int(len(labels)), "seed": int(seed), "tta": tta, "class_names": list(class_names),
        "names": {r: (names or {}).get(r, r) for r in models},
        "bands": {"eyes": list(band_rows(faces.shape[1], EYES_BAND)),
                  "mouth": list(band_rows(faces.shape[1], MOUTH_BAND))},
        "rows": rows, "mean_perturbed_accuracy": summary,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


# --- reporting -------------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """Markdown: perturbation, strength, accuracy, change from clean (points); the baseline's and the paired test
    when there is one; a last row with the mean over the perturbed settings."""
    has_base = "baseline" in result["names"]
    head = ["perturbation", "strength", "accuracy", "vs clean"]
    if has_base:
        head += ["baseline accuracy", "baseline vs clean", "only model right / only baseline right, McNemar p"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def acc(r: dict) -> list[str]:
        return [f"{r['accuracy']:.2%}", f"{r['delta'] * 100:+.1f}"]

    for row in result["rows"]:
        cells = [row["perturbation"], row["label"], *acc(row["model"])]
        if has_base:
            t = row["paired"]
            cells += [*acc(row["baseline"]), f"{t['only_a']} / {t['only_b']}, p = {t['p_value']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    mean = result["mean_perturbed_accuracy"]
    if mean.get("model") is not None:
        cells = ["mean of the perturbed rows", "", f"{mean['model']:.2%}", ""]
        if has_base:
            cells += [f"{mean['baseline']:.2%}", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_recall(result: dict, role: str = "model") -> str:
    """Per-class recall of one model at every setting (which classes a perturbation costs)."""
    names = result["class_names"]
    lines = ["| perturbation | strength | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for row in result["rows"]:
        rec = row[role]["recall"]
        lines.append(f"| {row['perturbation']} | {row['label']} | " + " | ".join(f"{rec[c]:.0%}" for c in names) + " |")
    return "\n".join(lines)


def _tick(label: str) -> str:
    for word in (" grey", " px", " square", "gamma ", "quality ", "sigma "):
        label = label.replace(word, "")
    return label.replace(" deg", "°")


def plot_robustness(result: dict, path: Union[str, Path], title: str = "") -> None:
    """Accuracy against strength, one panel per perturbation, the model (and the baseline) as lines; the clean
    accuracy is each panel's identity point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {p.name: p for p in PERTURBATIONS}
    clean = result["rows"][0]
    panels = [n for n in dict.fromkeys(r["perturbation"] for r in result["rows"][1:]) if n in by_name]
    cols = 4
    nrows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), dpi=100, squeeze=False, sharey=True)
    styles = {"model": dict(color="tab:blue", marker="o"), "baseline": dict(color="tab:orange", marker="s", ls="--")}
    accs = [r[role]["accuracy"] * 100 for r in result["rows"] for role in result["names"]]
    ylim = (max(0.0, min(accs) - 5), min(100.0, max(accs) + 3))  # one scale for all panels, every point inside
    for ax, name in zip(axes.flat, panels):
        p = by_name[name]
        rows = {repr(r["strength"]): r for r in result["rows"] if r["perturbation"] == name}
        levels = [s for s in p.levels if s == p.identity or repr(s) in rows]
        for role, label in result["names"].items():
            ys = [clean[role]["accuracy"] if s == p.identity else rows[repr(s)][role]["accuracy"] for s in levels]
            ax.plot(range(len(levels)), [y * 100 for y in ys], label=label, **styles[role])
        ax.set_xticks(range(len(levels)), [_tick(p.label(s)) for s in levels], fontsize=7)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy %")
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:  # the legend in the first empty panel, else below the grid
        spare[0].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    else:
        fig.legend(handles, labels, loc="lower right", fontsize=8, frameon=False)
    fig.suptitle(title or f"Accuracy under perturbation (n = {result['n']}, {result['tta']} crop)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- command line ----------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Accuracy on FER2013 under lighting, blur, resolution, JPEG, noise, "
                                            "rotation and occlusion perturbations (optionally vs a baseline).")
    p.add_argument("model", help="checkpoint directory or Hub repo id")
    p.add_argument("--baseline", default=None, help="a second checkpoint, scored on the same perturbed faces")
    p.add_argument("--data", required=True, help="FER2013 file/folder or the shared data root")
    p.add_argument("--split", default="PrivateTest", help="FER2013 split")
    p.add_argument("--subset", type=int, default=None, help="a fixed subset of this many faces spread over the split")
    p.add_argument("--perturbations", default=None,
                   help=f"comma-separated subset of {','.join(x.name for x in PERTURBATIONS)} (default: all)")
    p.add_argument("--tta", choices=["center", "tencrop"], default="center")
    p.add_argument("--seed", type=int, default=0, help="seeds noise, rotation signs and patch positions")
    p.add_argument("--batch-size", type=int, default=512, help="network inputs per forward")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--png", default=None, help="write the plot here")
    p.add_argument("--update-card", action="store_true",
                   help="store the results as results.json's 'robustness' and the plot as robustness.png in the "
                        "model directory and rewrite its card (local directory only)")
    return p


def main(argv: Optional[list] = None) -> dict:
    from ..models import load_model
    from .data import load_dataset
    from .evaluate import fixed_subset

    args = get_args_parser().parse_args(argv)
    setup_logging()
    if args.update_card and not Path(args.model).is_dir():
        raise SystemExit("--update-card needs a local model directory")
    perturbations = get_perturbations(args.perturbations.split(",") if args.perturbations else None)
    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
    baseline = load_model(args.baseline, device=device) if args.baseline else None
    part = load_dataset(args.data, kind="fer2013").get_split(args.split)
    if args.subset:
        part = part.subset(fixed_subset(len(part), args.subset))
    names = {"model": args.model, **({"baseline": args.baseline} if args.baseline else {})}
    t0 = time.perf_counter()
    res = score_robustness(model, part.images, part.labels, part.class_names, baseline=baseline,
                           perturbations=perturbations, seed=args.seed, tta=args.tta, batch_size=args.batch_size,
                           device=device, names=names)
    res.update(split=args.split, subset=args.subset, seconds_total=round(time.perf_counter() - t0, 1))
    print(f"== {args.model} on FER2013 {args.split} ({res['n']} faces, {args.tta} crop, seed {args.seed})"
          + (f" vs {args.baseline}" if args.baseline else ""))
    print(format_table(res))
    for role, label in res["names"].items():
        print(f"\nper-class recall, {label}:\n{format_recall(res, role)}")
    print(f"\n{res['seconds_total']} s ({res['seconds']})")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.png:
        plot_robustness(res, args.png)
    if args.update_card:
        from .card import write_model_card

        mdir = Path(args.model)
        plot = mdir / "robustness.png"
        if args.png:
            shutil.copyfile(args.png, plot)
        else:
            plot_robustness(res, plot)
        rec_path = mdir / "results.json"
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {"arch": model.arch}
        rec["robustness"] = {**res, "plot": plot.name}
        rec_path.write_text(json.dumps(rec, indent=1))
        write_model_card(mdir, model.cfg, rec)
    return res


if __name__ == "__main__":
    main()
