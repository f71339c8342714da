"""The robustness report: every perturbation (identity, determinism, what it does to pixels), the scorer with a
baseline on synthetic faces and tiny models, a tiny model whose class lives in the eyes (occluding the eyes band
must hide it, the mouth band must not), the card's section, the CLI end to end on a tiny checkpoint and a
generated FER2013 CSV, and the shipped checkpoint on a small real subset (``FER_DATA_DIR``)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import fer_models as fm
from fer_models.models.predict import predict_logits
from fer_models.training import robustness as rb
from fer_models.training.card import write_model_card

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"
CLASSES = list(fm.FER2013_CLASSES)


def noise_faces(n: int, seed: int = 0) -> np.ndarray:
    """Mid-grey faces with texture (no clipping at the lighting strengths' first steps)."""
    rng = np.random.default_rng(seed)
    return rng.normal(128, 25, (n, 48, 48)).clip(0, 255).astype(np.uint8)


# --- the perturbations -----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", rb.PERTURBATIONS, ids=lambda p: p.name)
def test_identity_strengths_and_seeds(p):
    faces = noise_faces(6)
    same = p.apply(faces, p.identity)
    assert same is not faces and np.array_equal(same, faces)
    assert p.identity in p.levels and len(p.strengths) == len(p.levels) - 1 >= 1
    for s in p.strengths:
        out = p.apply(faces, s, seed=3)
        assert out.shape == faces.shape and out.dtype == np.uint8
        assert not np.array_equal(out, faces), f"{p.name} {s} left the faces unchanged"
        assert np.array_equal(out, p.apply(faces, s, seed=3)), f"{p.name} {s} is not deterministic"
    assert np.array_equal(faces, noise_faces(6)), "the input was modified in place"


@pytest.mark.parametrize("name", ["noise", "rotation", "patch"])
def test_random_perturbations_follow_the_seed(name):
    p = rb.get_perturbations([name])[0]
    faces = noise_faces(8)
    assert not np.array_equal(p.apply(faces, p.strengths[0], seed=0), p.apply(faces, p.strengths[0], seed=1))


def test_lighting_perturbations():
    faces = np.full((2, 48, 48), 100, np.uint8)
    faces[1, :, :24] = 60  # a face with two grey levels
    by = {p.name: p for p in rb.PERTURBATIONS}
    assert np.array_equal(by["brightness"].apply(faces, 40), faces + 40)
    assert np.array_equal(by["brightness"].apply(faces, -80), np.clip(faces.astype(int) - 80, 0, 255))
    assert by["gamma"].apply(faces, 0.5).mean() > faces.mean() > by["gamma"].apply(faces, 2.0).mean()
    low = by["contrast"].apply(faces, 0.5).astype(float)
    assert low[1].std() == pytest.approx(faces[1].std() * 0.5, abs=0.6)
    assert low[1].mean() == pytest.approx(faces[1].mean(), abs=0.6)  # about each face's own mean
    assert np.array_equal(low[0], faces[0])  # a flat face has no contrast to lose


def test_optics_and_noise_perturbations():
    faces = noise_faces(4)
    by = {p.name: p for p in rb.PERTURBATIONS}
    for name, strengths in (("blur", (1, 2)), ("down_up", (24, 16, 12))):
        stds = [by[name].apply(faces, s).astype(float).std() for s in strengths]
        assert faces.std() > stds[0] and all(a >= b for a, b in zip(stds, stds[1:])), (name, stds)
    err = [np.abs(by["jpeg"].apply(faces, q).astype(float) - faces).mean() for q in (30, 10)]
    assert 0 < err[0] < err[1]
    grey = np.full((4, 48, 48), 128, np.uint8)
    for sigma in (10, 20, 30):
        assert by["noise"].apply(grey, sigma).astype(float).std() == pytest.approx(sigma, rel=0.05)


def test_rotation_turns_each_face_one_way_or_the_other():
    face = np.zeros((48, 48), np.uint8)
    face[22:26, 4:44] = 255  # a horizontal bar through the centre
    faces = np.repeat(face[None], 16, 0)
    out = rb.get_perturbations(["rotation"])[0].apply(faces, 20)
    kinds = {o.tobytes() for o in out}
    assert len(kinds) == 2  # +20 and -20 degrees, seeded per face
    assert (out[:, 22:26, 4:44] < 128).any()  # the bar left its rows
    assert (out[:, 23:25, 23:25] == 255).all()  # the centre stays


def test_occlusions_fill_the_measured_bands_and_a_square_with_the_face_mean():
    faces = noise_faces(5)
    means = np.rint(faces.reshape(5, -1).mean(1))
    by = {p.name: p for p in rb.PERTURBATIONS}
    for name, (r0, r1) in (("eyes_band", (12, 24)), ("mouth_band", (32, 44))):
        out = by[name].apply(faces, 1)
        assert (out[:, r0:r1] == means[:, None, None]).all()
        keep = np.ones(48, bool)
        keep[r0:r1] = False
        assert np.array_equal(out[:, keep], faces[:, keep])
    for side in (16, 24):
        out = by["patch"].apply(faces, side)
        changed = out != faces
        assert all(0 < c.sum() <= side * side for c in changed)
        ys, xs = np.nonzero(changed[0])
        assert ys.max() - ys.min() < side and xs.max() - xs.min() < side
    assert rb.band_rows(48, rb.EYES_BAND) == (12, 24) and rb.band_rows(96, rb.MOUTH_BAND) == (64, 88)


def test_bad_input_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        rb.PERTURBATIONS[0].apply(np.zeros((2, 48, 48), np.float32), 40)
    with pytest.raises(ValueError, match="unknown perturbations"):
        rb.get_perturbations(["brightness", "fog"])


# --- the scorer, the table, the plot ---------------------------------------------------------------------
def test_scorer_with_a_baseline_on_synthetic_faces(tmp_path):
    faces, labels = noise_faces(14), np.arange(14) % 7
    model, base = fm.create_model("resnet_tiny").eval(), fm.create_model("fusion_tiny").eval()
    res = rb.score_robustness(model, faces, labels, CLASSES, baseline=base, names={"model": "new", "baseline": "old"})
    assert len(res["rows"]) == 1 + sum(len(p.strengths) for p in rb.PERTURBATIONS)
    clean = res["rows"][0]
    assert clean["perturbation"] == "clean" and clean["model"]["delta"] == 0 == clean["baseline"]["delta"]
    direct = (predict_logits(model, faces)[0].argmax(1) == labels).mean()
    assert clean["model"]["accuracy"] == pytest.approx(direct)
    assert set(clean["baseline"]["members"]) == set(base.member_names) and clean["model"]["members"] == {}
    for row in res["rows"]:
        assert 0 <= row["model"]["accuracy"] <= 1 and set(row["model"]["recall"]) == set(CLASSES)
        t = row["paired"]
        assert t["only_a"] + t["only_b"] <= 14 and 0 <= t["p_value"] <= 1
    again = rb.score_robustness(model, faces, labels, CLASSES, baseline=base,
                                names={"model": "new", "baseline": "old"})
    assert [r["model"]["accuracy"] for r in again["rows"]] == [r["model"]["accuracy"] for r in res["rows"]]
    res = json.loads(json.dumps(res))  # JSON-ready, and the report works from the JSON
    table = rb.format_table(res)
    assert table.count("\n") == len(res["rows"]) + 2 and "| eyes_band | rows 12-23 |" in table
    assert "McNemar" in table and "mean of the perturbed rows" in table
    assert "| jpeg | quality 10 |" in table and "| brightness | -80 grey |" in table
    assert rb.format_recall(res, "baseline").count("\n") == len(res["rows"]) + 1
    rb.plot_robustness(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_scorer_refuses_a_model_with_other_classes():
    model = fm.create_model("resnet_tiny", num_classes=3)
    with pytest.raises(ValueError, match="differ"):
        rb.score_robustness(model, noise_faces(3), np.zeros(3, int), CLASSES)


def eyes_task(n: int, seed: int):
    """Faces whose class is the shape of the eyes: two horizontal (class 0) or vertical (class 1) dark bars of the
    same area around row 17, where the FER2013 mean face has its eyes; the mouth region holds only texture."""
    rng = np.random.default_rng(seed)
    faces = rng.normal(150, 12, (n, 48, 48)).clip(0, 255)
    labels = rng.integers(0, 2, n)
    for i, c in enumerate(labels):
        h, w = (3, 9) if c == 0 else (9, 3)
        y, dx = 17 - h // 2 + rng.integers(-1, 2), rng.integers(-2, 3)
        for cx in (14, 33):
            x = cx + dx - w // 2
            faces[i, y:y + h, x:x + w] = 40
    return faces.astype(np.uint8), labels


def test_occluding_the_eyes_band_hides_a_class_that_lives_in_the_eyes():
    from fer_models.models.preprocess import prepare_faces

    faces, labels = eyes_task(384, seed=0)
    torch.manual_seed(0)
    model = fm.create_model("resnet_tiny", num_classes=2).train()
    x, y = prepare_faces(list(faces), model.input_spec()), torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(x), (32,), generator=g)
        out = model(x[idx])
        loss = F.cross_entropy(out.logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_faces, test_labels = eyes_task(128, seed=1)
    res = rb.score_robustness(model, test_faces, test_labels, model.class_names,
                              perturbations=rb.get_perturbations(["eyes_band", "mouth_band"]))
    acc = {r["perturbation"]: r["model"]["accuracy"] for r in res["rows"]}
    assert acc["clean"] >= 0.9, f"the tiny model did not learn the eyes task ({acc})"
    assert acc["eyes_band"] <= 0.65, acc  # both classes look the same: chance
    assert acc["mouth_band"] >= acc["clean"] - 0.1, acc


# --- the card and the command line -----------------------------------------------------------------------
def _tiny_result(**kw) -> dict:
    model = fm.create_model("resnet_tiny").eval()
    return rb.score_robustness(model, noise_faces(7), np.arange(7), CLASSES,
                               perturbations=rb.get_perturbations(["brightness", "mouth_band"]), **kw)


def test_card_has_a_robustness_section_with_table_and_plot(tmp_path):
    model = fm.create_model("resnet_tiny")
    res = _tiny_result()
    write_model_card(tmp_path, model.cfg, {"arch": model.arch, "robustness": {**res, "plot": "robustness.png"}})
    text = (tmp_path / "README.md").read_text()
    assert "## Robustness (FER2013 PrivateTest, perturbed)" in text and "| mouth_band | rows 32-43 |" in text
    assert "eyes band rows 12-23" in text and "robustness.png" not in text  # no plot file, no broken link
    rb.plot_robustness(res, tmp_path / "robustness.png")
    write_model_card(tmp_path, model.cfg, {"arch": model.arch, "robustness": {**res, "plot": "robustness.png"}})
    assert "![accuracy under perturbation](robustness.png)" in (tmp_path / "README.md").read_text()
    write_model_card(tmp_path, model.cfg, {"arch": model.arch})
    assert "Robustness" not in (tmp_path / "README.md").read_text()


def write_fer_csv(path: Path, n: int) -> None:
    faces = noise_faces(n, seed=5)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for i, face in enumerate(faces):
            w.writerow([i % 7, " ".join(map(str, face.ravel())), "PrivateTest" if i % 3 else "PublicTest"])


def test_cli_end_to_end_on_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    write_fer_csv(tmp_path / "fer2013.csv", 30)
    new, old = tmp_path / "new", tmp_path / "old"
    fm.create_model("resnet_tiny").save_pretrained(new)
    fm.create_model("fusion_tiny").save_pretrained(old)
    (new / "results.json").write_text(json.dumps({"arch": "resnet_tiny", "kept": 1}))
    res = rb.main([str(new), "--baseline", str(old), "--data", str(tmp_path / "fer2013.csv"), "--subset", "12",
                   "--perturbations", "brightness,eyes_band", "--device", "cpu", "--out", str(tmp_path / "r.json"),
                   "--png", str(tmp_path / "r.png"), "--update-card"])
    assert res["n"] == 12 and len(res["rows"]) == 6 and res["names"] == {"model": str(new), "baseline": str(old)}
    printed = capsys.readouterr().out
    assert "| eyes_band | rows 12-23 |" in printed and "per-class recall" in printed
    assert json.loads((tmp_path / "r.json").read_text())["subset"] == 12 and (tmp_path / "r.png").is_file()
    rec = json.loads((new / "results.json").read_text())
    assert rec["robustness"]["plot"] == "robustness.png" and rec["kept"] == 1
    card = (new / "README.md").read_text()
    assert "## Robustness" in card and "![accuracy under perturbation](robustness.png)" in card
    assert (new / "robustness.png").is_file() and f"against `{old}`" in card
    with pytest.raises(SystemExit):
        rb.main(["some/hub-id", "--data", str(tmp_path / "fer2013.csv"), "--update-card"])


@pytest.mark.skipif(not (CKPT / "model.safetensors").is_file(), reason="no shipped checkpoint")
def test_shipped_checkpoint_on_a_small_privatetest_subset(data_dir, tmp_path):
    res = rb.main([str(CKPT), "--data", str(data_dir), "--subset", "100", "--device", "cpu",
                   "--perturbations", "brightness,blur,eyes_band,mouth_band", "--out", str(tmp_path / "r.json")])
    acc = {(r["perturbation"], r["label"]): r["model"]["accuracy"] for r in res["rows"]}
    assert res["n"] == 100 and acc[("clean", "none")] > 0.5  # far above chance (1/7)
    assert acc[("blur", "sigma 2 px")] < acc[("clean", "none")]
    assert min(acc.values()) > 1 / 7 - 0.05
