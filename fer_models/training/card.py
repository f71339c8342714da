"""Model cards: Hub metadata (``model-index`` eval results) and a body with the measured results."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .metrics import format_confusion, plot_confusion

DATASETS = {"PrivateTest": ("FER2013 PrivateTest", "fer2013", "PrivateTest"),
            "PublicTest": ("FER2013 PublicTest", "fer2013", "PublicTest"),
            "ckplus48": ("CK+48 (cross-dataset, 6 shared classes)", "ckplus", "all"),
            "ckplus48-heldout": ("CK+48 held-out subjects (cross-dataset, 6 shared classes)", "ckplus", "heldout")}


# Every set a model may be trained on, with its source and terms of use (named in the card when used).
TRAINING_SETS = {
    "fer2013": "FER2013 Training (28,709 faces; Goodfellow et al., ICML 2013 Challenges in Representation "
               "Learning, released through the Kaggle challenge for research)",
    "ckplus48": "CK+48, the training subjects of a fixed subject-disjoint split ({train} of {total} subjects; "
                "Lucey et al., CVPR Workshops 2010; research use only, under the CK+ database's terms)",
    "jaffe": "JAFFE crops, the training subjects of a fixed subject-disjoint split ({train} of {total} subjects; "
             "Lyons et al., FG 1998; research use only, under the JAFFE database's terms)",
}


def _train_configs(results: dict) -> list[dict]:
    """The model's own train config and each member's (empty dicts where none was stored)."""
    return [results.get("train_config") or {}] + [
        t.get("train_config") or {} for t in results.get("member_training", {}).values()]


def training_sets(results: dict) -> list[str]:
    """The sets this model (or any of its members) was trained on, FER2013 first, from the stored train configs."""
    sets = ["fer2013"]
    for c in _train_configs(results):
        sets += [s for s in c.get("posed") or [] if s not in sets]
    return sets


def selection_text(results: dict) -> str:
    """How checkpoints were chosen, from the stored train configs (never on PrivateTest)."""
    if any(c.get("select_on") == "public+ckplus48" for c in _train_configs(results)):
        return ("Checkpoints are selected on (FER2013 PublicTest + CK+48) / 2, CK+48's held-out subjects only when "
                "its other subjects were trained on; PrivateTest is reported once.")
    return "Checkpoints are selected on FER2013 PublicTest only; PrivateTest is reported once."


def training_data_section(results: dict) -> str:
    from .posed import load_split

    split = load_split()
    lines = []
    for s in training_sets(results):
        part = split.get(s, {})
        n_train = len(part.get("train", []))
        lines.append("- " + TRAINING_SETS[s].format(train=n_train, total=n_train + len(part.get("heldout", []))))
    note = ("" if len(lines) == 1 else "\n\nNo image of a held-out subject was trained on; the held-out subjects "
            "are the CK+48 and JAFFE evaluation rows (the split: docs/posed_split.md in the source repository).")
    return "## Training data\n\n" + "\n".join(lines) + note + "\n"


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{x * 100:.2f}%"


def _eval_results(model_name: str, results: dict) -> list[EvalResult]:
    out = []
    for key, res in results.items():
        if "/" not in key or not isinstance(res, dict) or "accuracy" not in res:
            continue
        split, tta = key.split("/", 1)
        if split not in DATASETS:
            continue
        ds_name, ds_type, ds_split = DATASETS[split]
        for metric, value in (("accuracy", res["accuracy"]), ("f1", res.get("macro_f1"))):
            if value is None:
                continue
            out.append(EvalResult(
                task_type="image-classification", dataset_type=ds_type, dataset_name=ds_name, dataset_split=ds_split,
                metric_type=metric, metric_value=round(float(value) * 100, 2),
                metric_name=f"{metric} ({'macro' if metric == 'f1' else ''}{'ten-crop' if tta == 'tencrop' else 'single crop'})".replace("(macroten", "(macro, ten").replace("(macrosingle", "(macro, single"),
                metric_config=tta,
            ))
    return out


def results_table(results: dict) -> str:
    """Markdown table: one row per model (members and fusion) with PublicTest/PrivateTest numbers."""
    rows: dict[str, dict[str, Any]] = {}
    for key, res in results.items():
        if "/" not in key or not isinstance(res, dict) or "accuracy" not in res:
            continue
        rows.setdefault(results.get("arch", "model"), {})[key] = res
        for name, m in res.get("members", {}).items():
            rows.setdefault(name, {})[key] = m
    cols = [("PublicTest/center", "accuracy", "PublicTest acc"), ("PrivateTest/center", "accuracy", "PrivateTest acc"),
            ("PrivateTest/tencrop", "accuracy", "PrivateTest acc (ten-crop)"),
            ("PrivateTest/center", "macro_f1", "PrivateTest macro-F1"),
            ("PrivateTest/tencrop", "macro_f1", "PrivateTest macro-F1 (ten-crop)")]
    lines = ["| model | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    order = sorted(rows, key=lambda n: n == results.get("arch"))  # the fused model last
    for name in order:
        lines.append(f"| {name} | " + " | ".join(_pct(rows[name].get(k, {}).get(m)) for k, m, _ in cols) + " |")
    return "\n".join(lines)


def robustness_section(rob: dict, out: Path) -> str:
    """The card's "Robustness" section from ``results["robustness"]`` (written by ``python -m fer_models.robustness
    --update-card``): the table, and the plot when its file is in the card's folder."""
    from .robustness import format_table

    base = rob["names"].get("baseline")
    plot = rob.get("plot")
    img = f"![accuracy under perturbation]({plot})\n\n" if plot and (Path(out) / plot).is_file() else ""
    n = f"{rob['n']} faces" + (f" (a fixed subset of {rob.get('split', 'the split')})" if rob.get("subset") else "")
    return (f"## Robustness (FER2013 {rob.get('split', 'PrivateTest')}, perturbed)\n\n"
            f"Accuracy on {n}, {rob.get('tta', 'center')} crop, under lighting, optics, compression, noise, in-plane "
            f"rotation and occlusion perturbations (seed {rob.get('seed')}; eyes band rows "
            f"{rob['bands']['eyes'][0]}-{rob['bands']['eyes'][1] - 1}, mouth band rows "
            f"{rob['bands']['mouth'][0]}-{rob['bands']['mouth'][1] - 1}, filled with each face's mean grey)"
            + (f", against `{base}` on the same perturbed faces" if base else "")
            + "; \"vs clean\" is the change in points from the unperturbed row. Measured by "
            "`python -m fer_models.robustness`.\n\n"
            f"{img}{format_table(rob)}\n")


def write_model_card(out: Path, cfg: dict, results: dict, repo_id: Optional[str] = None) -> ModelCard:
    out = Path(out)
    name = repo_id or cfg["arch"]
    card_data = ModelCardData(
        library_name="fer-models", license="mit", pipeline_tag="image-classification",
        tags=["facial-expression-recognition", "fer2013", "pytorch", "safetensors", cfg["arch"]],
        datasets=training_sets(results), metrics=["accuracy", "f1"], model_name=name,
        eval_results=_eval_results(name, results) or None,
    )
    main_key = "PrivateTest/tencrop" if "PrivateTest/tencrop" in results else "PrivateTest/center"
    cm_md = ""
    if main_key in results:
        r = results[main_key]
        plot_confusion(r["confusion_matrix"], r["class_names"], out / "confusion_matrix.png",
                       title=f"{cfg['arch']} – FER2013 {main_key.replace('/', ', ')}")
        per_class = "\n".join(
            f"| {c} | {m['precision'] * 100:.1f} | {m['recall'] * 100:.1f} | {m['f1'] * 100:.1f} | {m['support']} |"
            for c, m in r["per_class"].items())
        cm_md = (f"## Confusion matrix ({main_key})\n\n![confusion matrix](confusion_matrix.png)\n\n```\n"
                 f"{format_confusion(r['confusion_matrix'], r['class_names'])}\n```\n\n"
                 f"| class | precision % | recall % | F1 % | n |\n|---|---|---|---|---|\n{per_class}\n")
    extra = []
    if "PrivateTest500/center" in results:
        extra.append(f"- Fixed 500-face PrivateTest subset (the regression test's reference): accuracy "
                     f"{_pct(results['PrivateTest500/center']['accuracy'])}")
    for key, what in (("ckplus48/center", "CK+48"), ("ckplus48-heldout/center", "CK+48 held-out subjects")):
        if key in results:
            r = results[key]
            extra.append(f"- {what} cross-dataset accuracy (6 shared classes, {r.get('n')} faces, contempt left out): "
                         f"{_pct(r['accuracy'])} counting `neutral` predictions as errors; "
                         f"{_pct(r.get('accuracy_shared_argmax'))} with the argmax over the shared classes; "
                         f"{_pct(r.get('accuracy_per_sequence'))} per sequence")
    for member, t in results.get("member_training", {}).items():
        stages = t.get("stages") or []
        how = ""
        if len(stages) > 1:
            how = " in {} runs ({}), each later run a warm start (`--init-from`) from the previous run's best".format(
                len(stages), " + ".join(f"{s.get('epochs_completed')} epochs / {s.get('train_minutes')} min"
                                        for s in stages))
        last_completed = stages[-1].get("epochs_completed") if stages else t.get("epochs_completed")
        kept = f"kept epoch {t.get('best_epoch')} of the last run"
        if t.get("best_epoch") is not None and last_completed is not None and t["best_epoch"] > last_completed:
            kept += ", the partial epoch its time budget cut short"  # epochs_completed counts whole epochs only
        by = ("best (PublicTest + CK+48) / 2" if (t.get("train_config") or {}).get("select_on") == "public+ckplus48"
              else "best PublicTest accuracy")
        interp = (stages[-1] if stages else {}).get("interpolation")
        if interp:
            who = "with the other members by the fused model " if interp.get("chosen_by") == "fusion" else ""
            kept += (f" ({by}), then its weights interpolated with the starting checkpoint's at alpha "
                     f"{interp['alpha']:g} (WiSE-FT; alpha chosen {who}on PublicTest and CK+48"
                     f"{' held-out subjects' if interp.get('ckplus_subjects') == 'heldout' else ''})")
        else:
            kept += f" ({by})"
        extra.append(f"- `{member}` trained {t.get('train_minutes')} min on {t.get('device')}, "
                     f"{t.get('epochs_completed')} epochs{how}; {kept}")
    if "train_minutes" in results and results.get("epochs_completed") is not None:
        extra.append(f"- Training time: {results['train_minutes']} min on {results.get('device', '?')}; "
                     f"epochs completed: {results.get('epochs_completed')}, checkpoint selected on PublicTest "
                     f"(epoch {results.get('best_epoch')})")
    if "distillation" in results:
        d = results["distillation"]
        agree = "; ".join(f"{split} {_pct(d[split]['agreement'])} (the teacher's own accuracy "
                          f"{_pct(d[split]['teacher_accuracy'])})" for split in ("PublicTest", "PrivateTest") if split in d)
        view = "ten-crop mean" if d.get("teacher_tta") == "tencrop" else "centre-crop"
        if d.get("views"):
            source = (f"the teacher's logits on {d['views']} fixed augmented views of every Training face, each "
                      f"computed once on exactly the view the student trains on ({d.get('view_mix', 0):.0%} of "
                      f"them blended with a second face, {d.get('view_photometric', 0):.0%} through the real-photo "
                      f"augmentation)")
        else:
            source = f"the teacher's {view} logits on the Training faces, cached once"
        extra.append(f"- Distilled from `{d['teacher']}` (Hinton et al., 2015: alpha {d['alpha']}, temperature "
                     f"{d['temperature']}; {source}). "
                     f"Agreement of the student's centre-crop prediction with the teacher's ({view}): {agree}")
    if "calibration" in results:
        extra.append(_calibration_line(out, results["calibration"]))
    members = ""
    if "head_trials" in results:
        trials = "; ".join(
            f"{b}: accuracy {t['public_acc'] * 100:.2f}%, macro-F1 {t.get('public_macro_f1', 0) * 100:.2f}%, "
            f"disgust recall {t.get('public_recall', {}).get('disgust', 0) * 100:.1f}%, "
            f"fear recall {t.get('public_recall', {}).get('fear', 0) * 100:.1f}%"
            for b, t in results["head_trials"].items())
        extra.append(f"- Fusion head fitted on cached member logits; PublicTest accuracy by imbalance handling "
                     f"({trials}); kept `{results.get('head_balance')}`")
    if cfg.get("members"):
        members = "Members: " + ", ".join(f"`{m['arch']}` (width {m.get('width', 1.0)})" for m in cfg["members"]) + \
            f"; fusion mode `{cfg.get('mode')}` (concatenated member logits -> linear layer).\n\n"
    body = f"""
# {name}

Facial-expression recognition on 48x48 grayscale faces (FER2013 classes: {", ".join(cfg["class_names"])}).
Architecture `{cfg["arch"]}`{f" (width {cfg['width']})" if "width" in cfg else ""}; input {cfg["input_size"]}x{cfg["input_size"]}, {cfg["in_chans"]} channel(s),
{cfg["crop_size"]}x{cfg["crop_size"]} centre crop (or ten-crop), normalised with mean {cfg["mean"]} / std {cfg["std"]}.
{members}{selection_text(results)}

{training_data_section(results)}
## Results (measured by the training/evaluation CLI, not typed by hand)

{results_table(results)}

{chr(10).join(extra)}

{cm_md}
{robustness_section(results["robustness"], out) if "robustness" in results else ""}
## Use

```python
import fer_models
model = fer_models.load_model("{repo_id or "path/to/this/folder"}")  # safetensors, strict loading
```

Faces must be cropped first (the app in this repository does detection + cropping); FER2013 has biases in
age, ethnicity and pose, and expression is not emotion: do not use this model to make decisions about people.
"""
    card = ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n" + body)
    card.save(out / "README.md")
    return card


def _calibration_line(out: Path, c: dict) -> str:
    """The card's calibration bullet: the method, and ECE before -> after for every output on every row."""
    single = len(c["temperatures"]) == 1  # one network: its output is the model's, not a fused one

    def name(k: str) -> str:
        return "" if single else f"{k} "

    rows = "; ".join(
        f"{row}: " + ", ".join(f"{name(k)}{_pct(o['ece_before'])} -> {_pct(o['ece_after'])}"
                               for k, o in r["outputs"].items())
        for row, r in c["rows"].items() if row != c["fitted_on"])
    temps = ", ".join(f"{name(k)}{v:.2f}" for k, v in c["temperatures"].items())
    png = c.get("reliability_png")
    per_output = "" if single else "per output "
    return (f"- Calibrated probabilities: a temperature {per_output}({temps}), then a monotone map of the top "
            f"class's probability (isotonic regression), both fitted on {c['fitted_on']}; neither moves a "
            f"prediction. Expected calibration error (15 bins), uncalibrated -> shown: {rows}"
            + (f". Reliability diagrams: ![reliability]({png})" if png and (out / png).is_file() else ""))
