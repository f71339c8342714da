"""The real-photo protocol (FER2013 + CK+48 + JAFFE crops + JAFFE full frames) and the real-photo augmentation."""
import json

import numpy as np
import pytest
import torch

from fer_models.training import protocol
from fer_models.training.augment import AugmentConfig, augment_batch, gaussian_blur, photometric_batch
from fer_models.training.metrics import mcnemar_exact
from pathlib import Path

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"


def test_real_preset_changes_pixels_but_keeps_range_and_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 48, 48)
    y = photometric_batch(x, AugmentConfig.preset("real", contrast=0.5), g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.02  # it does something
    assert photometric_batch(x, AugmentConfig.preset("fer2013"), g) is x  # the shipped recipe is untouched
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        AugmentConfig.preset("nope")


def test_blur_with_zero_sigma_is_identity_and_blur_smooths():
    x = torch.rand(3, 1, 20, 20)
    assert torch.allclose(gaussian_blur(x, torch.zeros(3)), x, atol=1e-5)
    y = gaussian_blur(x, torch.full((3,), 1.2))
    assert y.std() < 0.6 * x.std()


def test_geometry_on_raw_pixels_matches_geometry_on_normalised_pixels():
    """Training now warps [0, 1] pixels then normalises; the old order normalised first: same result."""
    x = torch.rand(8, 1, 48, 48)
    cfg = AugmentConfig()
    a = augment_batch((x - 0.5) / 0.25, 44, cfg, torch.Generator().manual_seed(1))
    b = (augment_batch(x, 44, cfg, torch.Generator().manual_seed(1)) - 0.5) / 0.25
    assert torch.allclose(a, b, atol=1e-5)


def test_format_table_and_paired_tests():
    a = {"fer2013/PublicTest": {"accuracy": 0.75, "correct": [True, True, True, False]}, "selection_score": 0.7}
    b = {"fer2013/PublicTest": {"accuracy": 0.25, "correct": [False, False, True, False]}}
    tests = protocol.paired_tests(a, b)
    assert tests["fer2013/PublicTest"] == mcnemar_exact(np.array(a["fer2013/PublicTest"]["correct"]),
                                                        np.array(b["fer2013/PublicTest"]["correct"]))
    table = protocol.format_table({"new": a, "old": b}, tests)
    assert "75.00%" in table and "25.00%" in table and "2 / 0" in table


@pytest.mark.skipif(not (CKPT / "model.safetensors").is_file(), reason="no shipped checkpoint")
def test_protocol_cli_on_a_small_subset(data_dir, tmp_path):
    out = tmp_path / "p.json"
    res = protocol.main([str(CKPT), "--data", str(data_dir), "--subset", "40", "--out", str(out)])["results"]
    r = res[str(CKPT)]
    for row in ("fer2013/PublicTest", "fer2013/PrivateTest", "ckplus48", "jaffe/crops", "jaffe/fullframe"):
        assert len(r[row]["correct"]) <= 40 and 0 <= r[row]["accuracy"] <= 1
        assert set(r[row]["members"]) == {"vgg19", "resnet18", "vgg19_cbam"}
    assert r["fer2013/PublicTest"]["accuracy"] > 0.5  # far above chance (1/7) on FER2013
    assert r["jaffe/fullframe"]["found"] >= 39  # the detector finds (almost) every JAFFE face
    # the held-out-subject rows: only the held-out subjects of the fixed split, and the selection uses CK+'s
    from fer_models.training.posed import load_split
    held = load_split()
    for row in ("ckplus48/heldout", "jaffe/crops/heldout", "jaffe/fullframe/heldout"):
        assert 0 < len(r[row]["correct"]) <= 40
    assert r["selection_rows"] == ["fer2013/PublicTest", "ckplus48/heldout"]
    crops = list((Path(data_dir) / "jaffe" / "crops").glob("*/*"))
    n_held = sum(1 for f in crops if f.name.split(".")[0] in held["jaffe"]["heldout"])
    full = protocol.run_protocol(protocol._predictor(str(CKPT), "cpu", None), data_dir, rows=["jaffe/crops/heldout"])
    assert list(full) == ["jaffe/crops/heldout"] and 0 < n_held < len(crops)
    assert len(full["jaffe/crops/heldout"]["correct"]) == n_held
    assert json.loads(out.read_text())["subset"] == 40


def test_face_norm_standardises_each_face_and_travels_with_the_config(tmp_path):
    import fer_models as fm
    from fer_models.models.preprocess import normalize, prepare_faces, standardize_faces

    x = torch.stack([torch.full((1, 8, 8), 0.2), torch.rand(1, 8, 8) * 0.3 + 0.6])
    y = standardize_faces(x, 130.0, 50.0)
    assert torch.allclose(y[1].mean() * 255, torch.tensor(130.0), atol=1.0)
    assert torch.allclose(y[1].std() * 255, torch.tensor(50.0), atol=1.0)
    assert torch.allclose(y[0], torch.full_like(y[0], 130 / 255), atol=1e-5)  # flat face: shifted, not amplified
    plain = fm.create_model("vgg_tiny")
    assert plain.input_spec()["face_norm"] is None
    model = fm.create_model("vgg_tiny", face_norm=[130.0, 50.0])
    model.save_pretrained(tmp_path / "m")
    loaded = fm.load_model(tmp_path / "m")
    assert loaded.input_spec()["face_norm"] == [130.0, 50.0]
    dark = np.full((48, 48), 40, np.uint8)
    dark[10:30, 10:30] = 70
    bright = (dark.astype(int) * 2 + 50).astype(np.uint8)  # same face, other exposure and contrast
    a, b = prepare_faces([dark, bright], loaded.input_spec())
    assert torch.allclose(a, b, atol=0.05)  # face_norm makes the exposure irrelevant
    a0, b0 = prepare_faces([dark, bright], plain.input_spec())
    assert not torch.allclose(a0, b0, atol=0.5)
    full = normalize(torch.from_numpy(dark)[None], loaded.input_spec())  # B x 1 x 48 x 48, before the crop
    assert torch.allclose(full[..., 2:46, 2:46], a[None], atol=1e-6)
    fusion = fm.FusionModel.from_members([model, fm.create_model("resnet_tiny", face_norm=[130.0, 50.0])])
    assert fusion.input_spec()["face_norm"] == [130.0, 50.0]
    with pytest.raises(ValueError, match="input spec"):
        fm.FusionModel.from_members([model, fm.create_model("resnet_tiny")])


def test_card_names_every_training_set_with_its_terms(tmp_path):
    """A model trained on the posed sets' training subjects says so in its card (sets, subjects, terms of use)."""
    import fer_models as fm
    from fer_models.training.card import write_model_card

    model = fm.create_model("resnet_tiny")
    write_model_card(tmp_path, model.cfg, {"arch": model.arch})
    plain = (tmp_path / "README.md").read_text()
    assert "FER2013 Training" in plain and "CK+48" not in plain and "JAFFE" not in plain
    assert "selected on FER2013 PublicTest only" in plain
    posed = {"train_config": {"posed": ["ckplus48", "jaffe"], "select_on": "public+ckplus48"}}
    write_model_card(tmp_path, model.cfg, {"arch": "fusion", "member_training": {"resnet18": posed}})
    text = (tmp_path / "README.md").read_text()
    assert "83 of 118 subjects" in text and "6 of 10 subjects" in text and text.count("research use only") == 2
    assert "No image of a held-out subject was trained on" in text and "(FER2013 PublicTest + CK+48) / 2" in text
    assert "- ckplus48" in text and "- jaffe" in text  # the Hub metadata's datasets list


def test_evaluate_ckplus_on_held_out_subjects_updates_the_card(data_dir, tmp_path):
    import fer_models as fm
    from fer_models.training import evaluate
    from fer_models.training.data import load_dataset
    from fer_models.training.posed import subject_mask

    fm.create_model("vgg_tiny").save_pretrained(tmp_path)
    res = evaluate.main([str(tmp_path), "--data", str(data_dir / "ckplus48"), "--subjects", "heldout",
                         "--device", "cpu", "--update-card"])
    ck = load_dataset(data_dir / "ckplus48", kind="ckplus")
    held = subject_mask(ck.subjects, "ckplus48", "heldout") & (np.array(ck.class_names)[ck.labels] != "contempt")
    assert res["n"] == held.sum() < len(ck) / 2 and res["dataset"] == "ckplus48-heldout"
    assert "ckplus48-heldout/center" in json.loads((tmp_path / "results.json").read_text())
    assert f"CK+48 held-out subjects cross-dataset accuracy (6 shared classes, {held.sum()} faces" in (
        tmp_path / "README.md").read_text()


def test_each_posed_set_is_predicted_once_and_held_out_rows_are_cut_from_it(data_dir):
    """The all-subject and held-out rows of a set come from one prediction of its images: the held-out row equals
    the all-subject row restricted to the held-out subjects."""
    from fer_models.training.posed import jaffe_subject, load_split

    predictor = protocol._predictor(str(CKPT), "cpu", None)
    calls = []
    crops_fn, batch_fn = predictor.predict_crops, predictor.analyze_batch
    predictor.predict_crops = lambda images, **kw: calls.append(("crops", len(images))) or crops_fn(images, **kw)
    predictor.analyze_batch = lambda images, **kw: calls.append(("frames", len(images))) or batch_fn(images, **kw)
    rows = ["jaffe/crops", "jaffe/crops/heldout", "jaffe/fullframe", "jaffe/fullframe/heldout"]
    res = protocol.run_protocol(predictor, data_dir, rows=rows)
    n_crops, n_frames = len(res["jaffe/crops"]["correct"]), len(res["jaffe/fullframe"]["correct"])
    assert sorted(calls) == [("crops", n_crops), ("frames", n_frames)]  # once per set, every image once
    held = set(load_split()["jaffe"]["heldout"])
    for kind in ("crops", "fullframe"):
        names = protocol.read_jaffe(Path(data_dir), kind, predictor.class_names).names
        mask = np.array([jaffe_subject(n) in held for n in names])
        assert res[f"jaffe/{kind}/heldout"]["correct"] == np.array(res[f"jaffe/{kind}"]["correct"])[mask].tolist()
