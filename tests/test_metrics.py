import numpy as np
import pytest

from fer_models.training.metrics import confusion_matrix, format_report, mcnemar_exact, plot_confusion, summarize


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


def test_mcnemar_exact_counts_discordant_pairs_only():
    a = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    b = np.zeros(7, bool)
    r = mcnemar_exact(a, b)
    assert (r["only_a"], r["only_b"]) == (5, 0)
    assert r["p_value"] == pytest.approx(2 / 32)  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    # 1 vs 10 discordant: 2 * (C(11,0) + C(11,1)) / 2^11; agreement on the rest does not matter
    a = np.r_[np.ones(10, bool), np.zeros(1, bool), np.ones(50, bool)]
    b = np.r_[np.zeros(10, bool), np.ones(1, bool), np.ones(50, bool)]
    assert mcnemar_exact(a, b)["p_value"] == pytest.approx(2 * 12 / 2048)
    assert mcnemar_exact(b, a)["p_value"] == pytest.approx(2 * 12 / 2048)
    assert mcnemar_exact(a, a) == {"only_a": 0, "only_b": 0, "p_value": 1.0}
    with pytest.raises(ValueError, match="same samples"):
        mcnemar_exact(a, a[:5])
