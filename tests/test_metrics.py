import numpy as np
import pytest

from fer_models.metrics import confusion_matrix, format_report, plot_confusion, summarize


def test_metrics_on_a_hand_made_confusion():
    # 3 classes; rows = true, cols = predicted
    cm = np.array([[5, 1, 0],
                   [2, 2, 0],
                   [0, 0, 0]])
    s = summarize(cm, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(7 / 10)
    assert s["per_class"]["a"]["precision"] == pytest.approx(5 / 7)
    assert s["per_class"]["a"]["recall"] == pytest.approx(5 / 6)
    assert s["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert s["per_class"]["b"]["recall"] == pytest.approx(2 / 4)
    f1_a = 2 * (5 / 7) * (5 / 6) / ((5 / 7) + (5 / 6))
    f1_b = 2 * (2 / 3) * (1 / 2) / ((2 / 3) + (1 / 2))
    assert s["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)  # class c has no samples: not averaged
    assert "accuracy 70.00%" in format_report(s)


def test_confusion_matrix_counts():
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1]), np.array([0]), 2)


def test_plot_confusion_writes_png(tmp_path):
    plot_confusion(np.eye(3, dtype=int) * 4, ["a", "b", "c"], tmp_path / "cm.png", title="t")
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
