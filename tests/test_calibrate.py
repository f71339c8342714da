"""Temperature scaling and expected calibration error (fer_models.training.calibrate)."""
import json

import numpy as np
import pytest

import fer_models as fm
from fer_models.models.predict import softmax
from fer_models.training import calibrate as cal


def _sampled(n: int, temperature: float, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 7))
    p = softmax(logits / temperature)
    labels = np.array([rng.choice(7, p=row) for row in p])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(true_t):
    logits, labels = _sampled(20000, true_t)
    assert cal.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.06)


def test_ece_is_small_when_calibrated_and_large_when_overconfident():
    logits, labels = _sampled(20000, 2.0, seed=1)
    calibrated = cal.expected_calibration_error(softmax(logits / 2.0), labels)
    overconfident = cal.expected_calibration_error(softmax(logits), labels)
    assert calibrated < 0.02 < 0.08 < overconfident


def test_ece_by_hand():
    # two bins used: 0.9 confidence, right 1 of 2 (gap 0.4); 0.6 confidence, right 2 of 2 (gap 0.4)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    assert cal.expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.4)
    table = cal.reliability(probs, labels, bins=10)
    assert sum(b["count"] for b in table) == 4 and table[8]["count"] == 2 and table[5]["count"] == 2


def test_temperature_never_moves_the_argmax():
    logits, labels = _sampled(2000, 1.7, seed=2)
    t = cal.fit_temperature(logits, labels)
    assert (softmax(logits / t).argmax(1) == logits.argmax(1)).all()


def test_temperatures_are_written_into_the_checkpoint_config(tmp_path):
    model = fm.create_model("fusion_tiny")
    model.save_pretrained(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"arch": "fusion_tiny"}))
    temps = {"fused": 1.8, **{n: 1.2 + i / 10 for i, n in enumerate(model.member_names)}}
    report = {"method": "temperature", "fitted_on": "fer2013/PublicTest", "ece_bins": 15, "temperatures": temps,
              "rows": {"fer2013/PrivateTest": {"n": 3, "outputs": {"fused": {"accuracy": 0.5, "ece_before": 0.2,
                                                                             "ece_after": 0.05}}}}}
    cal.write_into_checkpoint(tmp_path, report)
    loaded = fm.load_model(tmp_path)
    assert cal.temperatures_of(loaded.cfg) == pytest.approx(temps)
    assert json.loads((tmp_path / "results.json").read_text())["calibration"]["temperatures"] == temps
    # weights untouched
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all((own[k] == back[k]).all() for k in own)

def test_calibrate_on_real_rows(data_dir):
    model = fm.load_model("checkpoints")
    report = cal.calibrate(model, data_dir, rows=("fer2013/PublicTest", "jaffe/crops"), subset=300)
    pub = report["rows"]["fer2013/PublicTest"]["outputs"]
    for name, o in pub.items():  # fitted on this row: the NLL can only go down
        assert o["nll_after"] <= o["nll_before"] + 1e-9, name
    assert set(report["temperatures"]) == {"fused", *model.member_names}
    assert report["rows"]["jaffe/crops"]["n"] > 0
