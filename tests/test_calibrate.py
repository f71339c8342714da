"""Temperature scaling, the confidence map and expected calibration error (fer_models.training.calibrate)."""
import json

import numpy as np
import pytest

import fer_models as fm
import torch
from fer_models.models.base import calibrated_softmax, match_confidence
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


def _shaped(n: int, seed: int = 0):
    """Logits whose confidence is wrong in a way no single temperature fixes: the label is right with probability
    0.35 + 0.6 * (top probability)^4 (middling faces over-confident, confident ones under-confident)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.5, (n, 7))
    top = softmax(logits).max(1)
    right = rng.random(n) < 0.35 + 0.6 * top ** 4
    wrong = (logits.argmax(1) + rng.integers(1, 7, n)) % 7
    return logits, np.where(right, logits.argmax(1), wrong)


def test_confidence_map_fixes_what_a_temperature_cannot():
    """Fitted on one half, measured on the other: the temperature leaves the shape's error, the map removes it."""
    logits, labels = _shaped(40000)
    fit, held = slice(0, 20000), slice(20000, None)
    t = cal.fit_temperature(logits[fit], labels[fit])
    cmap = cal.fit_confidence_map(softmax(logits[fit] / t), labels[fit])
    assert all(a <= b for a, b in zip(cmap["y"], cmap["y"][1:])) and 1 / 7 <= min(cmap["y"]) <= max(cmap["y"]) < 1
    scaled = softmax(logits[held] / t)
    mapped = calibrated_softmax(torch.from_numpy(logits[held]), t, cmap).numpy()
    ece_t, ece_map = (cal.expected_calibration_error(p, labels[held]) for p in (scaled, mapped))
    assert ece_map < 0.015 < 0.04 < ece_t
    assert (mapped.argmax(1) == logits[held].argmax(1)).all()  # accuracy untouched
    np.testing.assert_allclose(mapped.sum(1), 1, atol=1e-5)


def test_match_confidence_reaches_the_target_and_keeps_the_class_order():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.1, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    top = logits.softmax(-1).amax(-1)
    cmap = {"x": [0.25, 1.0], "y": [0.3, 0.6]}  # 0.25 -> 0.3, 1 -> 0.6, linear between
    out = match_confidence(logits, cmap)
    want = np.interp(top.numpy(), cmap["x"], cmap["y"])
    np.testing.assert_allclose(out[:3].amax(-1).numpy(), want[:3], atol=1e-4)
    assert torch.equal(out[:3].argsort(-1), logits[:3].argsort(-1))  # the same ranking, sharpened or flattened
    np.testing.assert_allclose(out[3].numpy(), 0.25, atol=1e-6)  # a flat row cannot move


def test_temperatures_are_written_into_the_checkpoint_config(tmp_path):
    model = fm.create_model("fusion_tiny")
    model.save_pretrained(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"arch": "fusion_tiny"}))
    temps = {"fused": 1.8, **{n: 1.2 + i / 10 for i, n in enumerate(model.member_names)}}
    report = {"method": "temperature", "fitted_on": "fer2013/PublicTest", "ece_bins": 15, "temperatures": temps,
              "rows": {"fer2013/PrivateTest": {"n": 3, "outputs": {"fused": {"accuracy": 0.5, "ece_before": 0.2,
                                                                             "ece_after": 0.05}}}}}
    cmap = {"x": [0.3, 0.9], "y": [0.35, 0.8]}
    report["confidence_maps"] = {"fused": cmap, model.member_names[0]: cmap}
    cal.write_into_checkpoint(tmp_path, report)
    loaded = fm.load_model(tmp_path)
    assert cal.temperatures_of(loaded.cfg) == pytest.approx(temps)
    assert loaded.cfg["confidence_map"] == cmap and loaded.cfg["members"][0]["confidence_map"] == cmap
    assert "confidence_map" not in loaded.cfg["members"][1]
    assert loaded.member_calibrations()[model.member_names[0]] == (pytest.approx(temps[model.member_names[0]]), cmap)
    results = json.loads((tmp_path / "results.json").read_text())
    assert "confidence_maps" not in results["calibration"]
    from fer_models.training.card import write_model_card

    card = write_model_card(tmp_path / "card", loaded.cfg, results).text
    assert "fitted on fer2013/PublicTest" in card and "fer2013/PrivateTest: fused 20.00% -> 5.00%" in card
    assert json.loads((tmp_path / "results.json").read_text())["calibration"]["temperatures"] == temps
    # weights untouched
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all((own[k] == back[k]).all() for k in own)

def test_calibrate_on_real_rows(data_dir):
    model = fm.load_model("checkpoints")
    report = cal.calibrate(model, data_dir, rows=("fer2013/PublicTest", "jaffe/crops"), subset=300)
    pub = report["rows"]["fer2013/PublicTest"]["outputs"]
    for name, o in pub.items():  # fitted on this row: the NLL and the ECE can only go down
        assert o["nll_temperature"] <= o["nll_before"] + 1e-9, name
        assert o["ece_after"] <= o["ece_temperature"] + 1e-9, name
    assert set(report["temperatures"]) == set(report["confidence_maps"]) == {"fused", *model.member_names}
    assert report["rows"]["jaffe/crops"]["n"] > 0
