"""Classification metrics from a confusion matrix: accuracy, per-class precision/recall/F1, macro-F1; and an
exact paired test for comparing two models on the same samples."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[t, p]`` counts samples of true class ``t`` predicted as ``p``."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(num_classes, -1)


def summarize(cm: np.ndarray, class_names: Sequence[str]) -> dict:
    """Metrics of a confusion matrix. Classes with no true samples are left out of the macro average."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "n": int(total),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "class_names": list(class_names),
    }


def score_logits(y_true: np.ndarray, logits: np.ndarray, class_names: Sequence[str]) -> dict:
    """:func:`summarize` of the argmax predictions of ``logits`` (N x C, any monotone score)."""
    return summarize(confusion_matrix(y_true, np.asarray(logits).argmax(1), len(class_names)), class_names)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact two-sided McNemar test of two models scored on the same samples (boolean "was right" arrays).

    Only the discordant samples count: ``only_a`` right where b was wrong, ``only_b`` the reverse. Under the null
    (equal accuracy) they split like fair coin flips, so p is the two-sided binomial tail of the smaller count.
    """
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same samples: shapes {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": min(1.0, 2 * tail)}


def format_confusion(cm: Union[np.ndarray, list], class_names: Sequence[str]) -> str:
    cm = np.asarray(cm)
    w = max(8, max(len(n) for n in class_names) + 1)
    lines = ["true \\ pred".ljust(w) + "".join(n[:7].rjust(8) for n in class_names)]
    for i, n in enumerate(class_names):
        lines.append(n.ljust(w) + "".join(str(int(v)).rjust(8) for v in cm[i]))
    return "\n".join(lines)


def format_report(summary: dict) -> str:
    lines = [f"accuracy {summary['accuracy'] * 100:.2f}%  macro-F1 {summary['macro_f1'] * 100:.2f}%  (n={summary['n']})",
             f"{'class':<10}{'prec':>8}{'recall':>8}{'f1':>8}{'n':>7}"]
    for name, m in summary["per_class"].items():
        lines.append(f"{name:<10}{m['precision'] * 100:8.1f}{m['recall'] * 100:8.1f}{m['f1'] * 100:8.1f}{m['support']:7d}")
    lines.append(format_confusion(summary["confusion_matrix"], summary["class_names"]))
    return "\n".join(lines)


def plot_confusion(cm: Union[np.ndarray, list], class_names: Sequence[str], path: Union[str, Path], title: str = "") -> None:
    """Row-normalised confusion matrix with counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{norm[i, j] * 100:.0f}%\n{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="recall share of the true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
