"""How faithful are the CAMs? ROAD and the model-randomisation sanity check, per member map and fusion map.

* **ROAD** (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML 2022):
  remove a fraction of the crop's pixels, most relevant first (MoRF) or least relevant first (LeRF), fill them
  in with pytorch-grad-cam's ``NoisyLinearImputer`` (so the removal's shape leaks little class information), and
  record the change of the explained class's softmax probability. A faithful map makes MoRF drop fast and LeRF
  barely move; ``road = (LeRF - MoRF) / 2`` averaged over the fractions (pytorch-grad-cam's ``ROADCombined``
  definition), higher is better. Pixels are ranked with random tie-breaking and exactly ``round(f * N)`` are
  removed: ReLU'd CAMs have many tied zeros, which make pytorch-grad-cam's percentile threshold remove far more
  than the nominal fraction.
* **Baselines**: a uniformly random map and a centred Gaussian blob (faces are centred, so the blob is a
  strong naive prior). A method that does not beat both explains nothing the face layout doesn't.
* **Model randomisation** (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): Spearman rank
  correlation between the trained model's maps and those of the same architecture freshly re-initialised,
  for the same faces and target classes. Faithful maps depend on the learned weights: low correlation.

Each member map is scored with that member's own probability, the ``fusion`` map with the fused probability;
the explained class is the model's (fused) prediction, as in the app.

    python -m explain.faithfulness --model checkpoints --data ../shared/data \\
        --split PrivateTest --n 500 --out faithfulness.json

``--data`` is anything ``fer_models.training.data.load_dataset`` reads (e.g. ``../shared/data``), or an ``.npz`` with
``images`` (N x 48 x 48 uint8), ``labels`` and optionally ``split`` (strings) and ``class_names``.
``--model`` is a checkpoint folder (or, for smoke tests, a registered architecture name, with random weights).
Cost: per face, ``2 x fractions`` imputations (a sparse solve) per map and method, and about
``2 x fractions x (2 x methods + baselines)`` forwards of each member; for the real backbones the forwards
dominate, so plan ``--n 500`` with the defaults as a multi-hour CPU job (docs/explain.md has measured times),
or use ``--device cuda`` (the imputation stays on the CPU) or fewer ``--methods``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from scipy.stats import rankdata

import fer_models as fm
from fer_models.models.preprocess import prepare_faces

from .cam import ALIGN, FUSION_COMBINE, METHODS, Explainer

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.2, 0.5, 0.8)  # ROAD's paper uses 0.1..0.9; three keep 500 faces to about an hour
BASELINES = ("random", "centre")
ORDERS = ("morf", "lerf")
# A method is only recommended if its maps are this far from the re-initialised model's (|Spearman rho|: a map
# strongly anti-correlated with the random model's is as much a product of the input as a correlated one).
MAX_RANDOMIZATION_RHO = 0.5


# --- ROAD ---------------------------------------------------------------------------------------------------
def removal_order(relevance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices from most to least relevant, ties broken at random."""
    r = np.nan_to_num(np.asarray(relevance, dtype=np.float64)).ravel()
    return np.lexsort((rng.random(r.size), -r))


def keep_mask(order: np.ndarray, shape: tuple[int, int], fraction: float, most_relevant_first: bool) -> torch.Tensor:
    """H x W float mask, 1 = keep, 0 = impute, removing ``round(fraction * N)`` pixels."""
    n = order.size
    k = int(round(fraction * n))
    mask = np.ones(n, np.float32)
    if k:
        mask[order[:k] if most_relevant_first else order[n - k:]] = 0.0
    return torch.from_numpy(mask.reshape(shape))


def road_perturbations(x: torch.Tensor, maps: np.ndarray, fractions: Sequence[float], rng: np.random.Generator,
                       imputer: Optional[Callable] = None) -> torch.Tensor:
    """ROAD-imputed copies of ``x`` (B x C x H x W, CPU) for ``maps`` (B x H x W): B x 2 x F x C x H x W.

    Axis 1 is (MoRF, LeRF), axis 2 the removed fractions.
    """
    imputer = imputer or NoisyLinearImputer()
    b, c, h, w = x.shape
    if maps.shape != (b, h, w):
        raise ValueError(f"maps {maps.shape} do not match images {tuple(x.shape)}")
    out = torch.empty((b, len(ORDERS), len(fractions), c, h, w), dtype=x.dtype)
    with warnings.catch_warnings():
        # the imputer hands torch tensors to np.argwhere: a NumPy 2 DeprecationWarning per call, not ours to fix
        warnings.filterwarnings("ignore", message=".*__array_wrap__.*", category=DeprecationWarning)
        for i in range(b):
            order = removal_order(maps[i], rng)
            for o, name in enumerate(ORDERS):
                for j, f in enumerate(fractions):
                    out[i, o, j] = imputer(x[i], keep_mask(order, (h, w), f, name == "morf"))
    return out


def baseline_maps(kind: str, b: int, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Maps that know nothing about the model: uniform noise, or a centred Gaussian (sigma = a quarter side)."""
    h, w = hw
    if kind == "random":
        return rng.random((b, h, w)).astype(np.float32)
    if kind == "centre":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        sy, sx = h / 4.0, w / 4.0
        blob = np.exp(-(((yy - (h - 1) / 2) / sy) ** 2 + ((xx - (w - 1) / 2) / sx) ** 2) / 2)
        return np.broadcast_to(blob, (b, h, w)).astype(np.float32)
    raise ValueError(f"unknown baseline {kind!r}; choose from {BASELINES}")


# --- model randomisation ------------------------------------------------------------------------------------
def reinitialised(model: fm.FERModel, seed: int = 0) -> fm.FERModel:
    """The same architecture and config with fresh random weights (a fusion model's members included)."""
    cfg = dict(model.cfg)
    arch = cfg.pop("arch")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = fm.create_model(arch, **cfg)
    return fresh.to(next(model.parameters()).device).eval()


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row pair of ``a`` and ``b`` (B x N); NaN where a row is constant."""
    ra = rankdata(a.reshape(a.shape[0], -1), axis=1)
    rb = rankdata(b.reshape(b.shape[0], -1), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


# --- the evaluation -----------------------------------------------------------------------------------------
class Scorer:
    """Probability of the explained class as seen by each heatmap's own network: a member map is scored by that
    member, the ``fusion`` map by the fused model (whose one forward also gives every member's), with the
    config's temperatures (``FERModel.probabilities``)."""

    def __init__(self, model: fm.FERModel, chunk: int = 128):
        self.model = model
        self.chunk = chunk
        self.members = model.member_models()
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, targets: torch.Tensor, maps: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{map: p}`` with ``p[i...] = probabilities(net(x[i...]))[targets[i]]``; x is B x ... x C x H x W."""
        lead = x.shape[:-3]
        flat = x.reshape(-1, *x.shape[-3:])
        t = targets.reshape(targets.shape + (1,) * (len(lead) - 1)).expand(lead).reshape(-1, 1).to(self.device)
        out: dict[str, list] = {m: [] for m in maps}
        for s in range(0, flat.shape[0], self.chunk):
            xs, ts = flat[s:s + self.chunk].to(self.device), t[s:s + self.chunk]
            if all(m in self.members for m in maps):  # member maps only: run just those members
                probs = {m: self.members[m].probabilities(self.members[m](xs))[0] for m in maps}
            else:  # the fused decision's map: one forward gives it and every member's
                fused, member_probs = self.model.probabilities(self.model(xs))
                probs = {**member_probs, "fusion": fused}
            for m in maps:
                out[m].append(probs[m].gather(1, ts)[:, 0].cpu())
        return {m: torch.cat(v).reshape(lead) for m, v in out.items()}


@dataclass
class _Acc:
    """Running sums of per-face ROAD differences (order x fraction)."""

    total: np.ndarray
    n: int = 0

    def add(self, diffs: np.ndarray) -> None:  # diffs: B x 2 x F
        self.total += diffs.sum(0)
        self.n += diffs.shape[0]


def evaluate(
    model: fm.FERModel, x: torch.Tensor, *, methods: Sequence[str] = METHODS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS, baselines: Sequence[str] = BASELINES, batch_size: int = 32,
    seed: int = 0, fusion_combine: str = FUSION_COMBINE[0], align: str = ALIGN[0], randomization: bool = True,
    labels: Optional[np.ndarray] = None,
) -> dict:
    """ROAD (+ baselines) and the randomisation check for every heatmap of ``model`` on faces ``x``.

    ``x`` is normalised centre crops (B x C x crop x crop, ``prepare_faces`` output). Returns a JSON-ready dict;
    see :func:`format_table` for its layout in words.
    """
    model.eval()
    explainer = Explainer(model, fusion_combine=fusion_combine, align=align)
    random_explainer = None
    if randomization:
        random_explainer = Explainer(reinitialised(model, seed + 1), fusion_combine=fusion_combine, align=align)
    scorer = Scorer(model)
    names = explainer.map_names
    kinds = list(methods) + list(baselines)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # the imputer's noise
    imputer = NoisyLinearImputer()
    acc = {n: {k: _Acc(np.zeros((len(ORDERS), len(fractions)))) for k in kinds} for n in names}
    rhos: dict[str, dict[str, list]] = {n: {m: [] for m in methods} for n in names}
    correct, t0 = 0, time.perf_counter()
    x = x.detach().float().cpu()
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        first = explainer.explain(xb, method=methods[0]) if methods else explainer.explain(xb)
        targets = torch.from_numpy(first.targets)
        if labels is not None:
            correct += int((first.targets == np.asarray(labels[start:start + batch_size])).sum())
        y0, x0 = first.crop_box[1], first.crop_box[0]
        hw = tuple(xb.shape[-2:])
        base_p = scorer(xb, targets, names)

        def score(maps: Sequence[str], kind: str, perturbed: torch.Tensor) -> None:
            for n, p in scorer(perturbed, targets, maps).items():  # B x 2 x F each
                acc[n][kind].add((p - base_p[n][:, None, None]).numpy())

        for method in methods:
            exp = first if method == methods[0] else explainer.explain(xb, method=method)
            if random_explainer is not None:
                rexp = random_explainer.explain(xb, method=method, target=exp.targets)
            for n in names:
                maps = exp.heatmaps[n][:, y0:y0 + hw[0], x0:x0 + hw[1]]
                score([n], method, road_perturbations(xb, maps, fractions, rng, imputer))
                if random_explainer is not None:
                    rmaps = rexp.heatmaps[n][:, y0:y0 + hw[0], x0:x0 + hw[1]]
                    rhos[n][method].extend(spearman_rows(maps, rmaps).tolist())
        for kind in baselines:  # the same perturbed faces serve every map's scorer
            perturbed = road_perturbations(xb, baseline_maps(kind, xb.shape[0], hw, rng), fractions, rng, imputer)
            score(names, kind, perturbed)
        done = min(start + batch_size, x.shape[0])
        log.info("faithfulness: %d/%d faces (%.0f s)", done, x.shape[0], time.perf_counter() - t0)

    road = {}
    for n in names:
        road[n] = {}
        for k in kinds:
            mean = acc[n][k].total / max(acc[n][k].n, 1)
            morf, lerf = mean[0], mean[1]
            entry = {"morf": float(morf.mean()), "lerf": float(lerf.mean()),
                     "road": float((lerf.mean() - morf.mean()) / 2),
                     "morf_curve": morf.round(5).tolist(), "lerf_curve": lerf.round(5).tolist()}
            if k in methods and randomization:
                r = np.asarray(rhos[n][k], dtype=np.float64)
                valid = r[~np.isnan(r)]
                entry["randomization_spearman"] = float(valid.mean()) if valid.size else float("nan")
                entry["randomization_undefined"] = int(np.isnan(r).sum())
            road[n][k] = entry
    decision_map = "fusion" if "fusion" in names else names[0]
    return {
        "n": int(x.shape[0]),
        "accuracy": (correct / x.shape[0]) if labels is not None else None,
        "fractions": [float(f) for f in fractions],
        "methods": list(methods),
        "baselines": list(baselines),
        "maps": names,
        "fusion_combine": fusion_combine,
        "align": align,
        "seconds": round(time.perf_counter() - t0, 1),
        "results": road,
        "recommended_method": recommend_method(road[decision_map], methods, baselines),
        "recommended_for": decision_map,
    }


def recommend_method(results: dict, methods: Sequence[str], baselines: Sequence[str] = BASELINES) -> Optional[str]:
    """The default-method rule: the highest ROAD among methods that beat every baseline's ROAD and whose maps
    change with the weights (|randomisation Spearman| below ``MAX_RANDOMIZATION_RHO``, when measured).
    None when no method passes (then no map should be presented as an explanation of the decision)."""
    floor = max((results[b]["road"] for b in baselines if b in results), default=-math.inf)
    ok = [m for m in methods if results[m]["road"] > floor
          and not (abs(results[m].get("randomization_spearman", 0.0)) >= MAX_RANDOMIZATION_RHO)]
    return max(ok, key=lambda m: results[m]["road"]) if ok else None


def format_table(report: dict) -> str:
    """Markdown table: one row per (map, method or baseline)."""
    lines = [
        f"ROAD on {report['n']} faces, fractions {report['fractions']}; Δp = change of the explained class's "
        "probability after imputing (mean over faces and fractions). road = (LeRF − MoRF) / 2, higher is better; "
        "rand. ρ = Spearman between trained and re-initialised model's maps, lower is better.",
        "",
        "| map | method | MoRF Δp ↓ | LeRF Δp ↑ | road ↑ | rand. ρ ↓ |",
        "|---|---|---|---|---|---|",
    ]
    for n in report["maps"]:
        for k, r in report["results"][n].items():
            rho = r.get("randomization_spearman")
            rho_s = "—" if rho is None else f"{rho:.3f}"
            name = k if k in report["methods"] else f"*{k} baseline*"
            lines.append(f"| {n} | {name} | {r['morf']:+.4f} | {r['lerf']:+.4f} | {r['road']:+.4f} | {rho_s} |")
    if report.get("accuracy") is not None:
        lines.append(f"\nAccuracy of the model on these faces: {report['accuracy']:.4f}")
    rec = report.get("recommended_method")
    lines.append(f"Recommended default method (rule in explain.faithfulness.recommend_method, on the "
                 f"{report.get('recommended_for')} map): {rec if rec else 'none passes'}")
    return "\n".join(lines)


# --- data and CLI -------------------------------------------------------------------------------------------
def load_faces(path: str, split: Optional[str], n: int, seed: int = 0):
    """(uint8 N x H x W faces, int64 labels, class names or None), ``n`` drawn at random from ``split``."""
    plain = False
    if str(path).endswith(".npz"):
        with np.load(path, allow_pickle=False) as d:
            plain = "images" in d.files  # plain arrays (tests, exported subsets), not FER2013's JPEG npz
            if plain:
                images, labels = np.asarray(d["images"]), np.asarray(d["labels"]).astype(np.int64)
                splits = np.asarray(d["split"]).astype(str) if "split" in d else None
                class_names = [str(c) for c in d["class_names"]] if "class_names" in d else None
    if not plain:
        from fer_models.training.data import load_dataset

        ds = load_dataset(path)
        images, labels = np.asarray(ds.images), np.asarray(ds.labels).astype(np.int64)
        splits = np.asarray(ds.split).astype(str) if getattr(ds, "split", None) is not None else None
        class_names = list(ds.class_names) if getattr(ds, "class_names", None) is not None else None
    idx = np.arange(len(images))
    if split:
        if splits is None:
            raise ValueError(f"{path} has no split column; drop --split")
        idx = idx[splits == split]
        if idx.size == 0:
            raise ValueError(f"{path} has no {split!r} faces (splits: {sorted(set(splits.tolist()))})")
    if 0 < n < idx.size:
        idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
    return images[idx], labels[idx], class_names


def load_any_model(name_or_dir: str, seed: int = 0) -> fm.FERModel:
    if os.path.isdir(name_or_dir) or not fm.is_model(name_or_dir):
        return fm.load_model(name_or_dir)
    log.warning("%s is an architecture name, not a checkpoint: its weights are random", name_or_dir)
    torch.manual_seed(seed)
    return fm.create_model(name_or_dir).eval()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m explain.faithfulness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (or an architecture name: random weights)")
    p.add_argument("--data", required=True, help="dataset path for fer_models.training.data.load_dataset, or an .npz")
    p.add_argument("--split", default="PrivateTest", help="split to sample from; '' for all faces")
    p.add_argument("--n", type=int, default=500, help="faces to evaluate (0: all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES))
    p.add_argument("--fractions", nargs="+", type=float, default=list(DEFAULT_FRACTIONS),
                   help="fractions of the crop's pixels to remove")
    p.add_argument("--fusion-combine", default=FUSION_COMBINE[0], choices=list(FUSION_COMBINE))
    p.add_argument("--align", default=ALIGN[0], choices=list(ALIGN))
    p.add_argument("--no-randomization", action="store_true", help="skip the model-randomisation check")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="write the JSON report here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(not 0.0 < f < 1.0 for f in args.fractions):
        raise SystemExit(f"--fractions must lie strictly between 0 and 1, got {args.fractions}")
    model = load_any_model(args.model, args.seed).to(args.device).eval()
    images, labels, class_names = load_faces(args.data, args.split or None, args.n, args.seed)
    if class_names is not None and list(class_names) != model.class_names:
        log.warning("dataset classes %s differ from the model's %s: accuracy is meaningless", class_names,
                    model.class_names)
    x = prepare_faces(list(images), model.input_spec(), tta="center")
    report = evaluate(
        model, x, methods=args.methods, fractions=args.fractions, baselines=args.baselines,
        batch_size=args.batch_size, seed=args.seed, fusion_combine=args.fusion_combine, align=args.align,
        randomization=not args.no_randomization, labels=labels,
    )
    report["config"] = {k: v for k, v in vars(args).items()}
    report["model_arch"] = model.arch
    print(format_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        log.info("wrote %s", args.out)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
