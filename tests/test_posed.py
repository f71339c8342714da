"""The posed sets' fixed subject-disjoint split, training on its training subjects, and distillation's loss."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fer_models.training import posed
from fer_models.training.backbone import distillation_loss


def test_split_is_disjoint_and_fixed():
    split = posed.load_split()
    for name in ("ckplus48", "jaffe"):
        train, held = set(split[name]["train"]), set(split[name]["heldout"])
        assert train and held and not train & held
    assert len(split["ckplus48"]["train"]) == 83 and len(split["ckplus48"]["heldout"]) == 35
    assert split["jaffe"]["heldout"] == ["KA", "MK", "TM", "UY"]
    # the drawing code gives the stored split back from the same ids
    ids = split["jaffe"]["train"] + split["jaffe"]["heldout"]
    assert posed.draw_split(ids, posed.JAFFE_TRAIN_SUBJECTS) == split["jaffe"]


def test_subject_names_and_unknown_subjects():
    assert posed.ckplus_subject("S005_001_00000011.png") == "S005"
    assert posed.jaffe_subject("KA.AN1.39.tiff") == "KA"
    with pytest.raises(ValueError, match="CK\\+ file name"):
        posed.ckplus_subject("face.png")
    with pytest.raises(ValueError, match="neither part"):
        posed.subject_mask(["KA", "ZZ"], "jaffe", "train")
    assert posed.subject_mask(["KA", "KL"], "jaffe", "train").tolist() == [False, True]


def test_distillation_loss():
    torch.manual_seed(0)
    s, t = torch.randn(6, 7), torch.randn(6, 7)
    y = torch.randint(0, 7, (6,))
    hard = F.cross_entropy(s, y, reduction="none")
    # alpha 0 is the hard loss; alpha 1 is T^2 KL(teacher_T || student_T)
    assert distillation_loss(s, t, hard, 0.0, 4.0) == pytest.approx(float(hard.mean()), rel=1e-5)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    assert distillation_loss(s, t, hard, 1.0, 2.0) == pytest.approx(float(kl), rel=1e-5)
    # a student equal to its teacher has no soft loss
    assert distillation_loss(t, t, torch.zeros(6), 1.0, 3.0) == pytest.approx(0.0, abs=1e-6)
    # faces without a teacher (NaN rows) take the hard loss alone
    t2 = t.clone()
    t2[3:] = float("nan")
    mixed = distillation_loss(s, t2, hard, 1.0, 2.0)
    per_soft = F.kl_div(F.log_softmax(s[:3] / 2, -1), F.softmax(t[:3] / 2, -1), reduction="none").sum(-1) * 4
    assert mixed == pytest.approx(float((per_soft.sum() + hard[3:].sum()) / 6), rel=1e-5)


def test_posed_training_faces_hold_no_heldout_subject(data_dir):
    from fer_models.models.base import FER2013_CLASSES

    faces = posed.posed_training_faces(data_dir, list(FER2013_CLASSES))
    assert faces.images.shape[1:] == (48, 48) and faces.images.dtype == np.uint8
    split = posed.load_split()
    for src in faces.sources:
        name = src.rsplit("/", 1)[-1]
        if src.startswith("ckplus48/"):
            assert posed.ckplus_subject(name) in split["ckplus48"]["train"]
        else:
            assert posed.jaffe_subject(name) in split["jaffe"]["train"]
    assert "contempt" not in {FER2013_CLASSES[i] for i in faces.labels}
    assert len(faces) == 790  # 663 CK+48 (contempt left out) + 127 JAFFE crops


def test_train_with_posed_faces_and_distillation(data_dir, tmp_path):
    import fer_models as fm
    from fer_models.training.train import main

    fm.create_model("resnet_tiny").save_pretrained(tmp_path / "teacher")
    res = main(["--arch", "resnet_tiny", "--data", str(data_dir), "--output", str(tmp_path / "run"), "--epochs", "1",
                "--limit", "256", "--posed", "ckplus48,jaffe", "--posed-share", "0.25", "--distill-from",
                str(tmp_path / "teacher"), "--select-on", "public+ckplus48", "--skip-final-eval"])
    assert res["train_config"]["posed"] == ["ckplus48", "jaffe"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and "ckplus48_acc" in rows[0]
    assert (tmp_path / "run" / "teacher_logits.safetensors").is_file()


def test_mixup_mixes_the_teachers_softened_probabilities():
    from fer_models.training.backbone import mix_teacher, mixup_draw

    assert mixup_draw(0.0, 8, torch.Generator().manual_seed(0), torch.device("cpu")) == (1.0, None)
    lam, perm = mixup_draw(0.3, 8, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert 0.5 <= lam < 1 and sorted(perm.tolist()) == list(range(8))
    again = mixup_draw(0.3, 8, torch.Generator().manual_seed(1), torch.device("cpu"))  # reproducible on resume
    assert again[0] == lam and torch.equal(again[1], perm)

    torch.manual_seed(0)
    t = torch.randn(8, 7) * 3
    mixed = mix_teacher(t, perm, 0.7, 4.0)
    want = 0.7 * F.softmax(t / 4, -1) + 0.3 * F.softmax(t[perm] / 4, -1)
    assert torch.allclose(F.softmax(mixed / 4, -1), want, atol=1e-6)
    # a face without a teacher (a posed face) on either side of a pair: no soft target for that pair
    t[2] = float("nan")
    rows = torch.isfinite(mix_teacher(t, perm, 0.7, 4.0)[:, 0])
    assert (~rows).tolist() == [(i == 2 or int(perm[i]) == 2) for i in range(8)]


def test_set_class_balance_draws_every_set_and_class_equally():
    from fer_models.training.backbone import posed_draw_weights
    from fer_models.training.data import FaceData

    sources = np.array(["ckplus48/a"] * 6 + ["jaffe/b"] * 3)
    labels = np.array([5, 5, 5, 5, 2, 2, 2, 2, 5])  # CK+: 4 surprise, 2 fear; JAFFE: 2 fear, 1 surprise
    faces = FaceData(np.zeros((9, 48, 48), np.uint8), labels, ["c"] * 7, np.array(["Training"] * 9), sources=sources)
    assert torch.equal(posed_draw_weights(faces, "none"), torch.ones(9))
    w = posed_draw_weights(faces, "set-class")
    totals = {(s.split("/")[0], int(y)): 0.0 for s, y in zip(sources, labels)}
    for s, y, wi in zip(sources, labels, w.tolist()):
        totals[(s.split("/")[0], int(y))] += wi
    assert len(totals) == 4 and all(v == pytest.approx(1.0) for v in totals.values())
    with pytest.raises(ValueError, match="posed balance"):
        posed_draw_weights(faces, "class")


def test_train_with_mixup_and_balanced_posed_draws(data_dir, tmp_path):
    from fer_models.training.train import main

    res = main(["--arch", "resnet_tiny", "--data", str(data_dir), "--output", str(tmp_path / "run"), "--epochs", "1",
                "--limit", "256", "--posed", "ckplus48,jaffe", "--posed-share", "0.25", "--posed-balance", "set-class",
                "--mixup", "0.4", "--skip-final-eval"])
    assert res["train_config"]["mixup"] == 0.4 and res["train_config"]["posed_balance"] == "set-class"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and np.isfinite(rows[0]["train_loss"])


def test_ten_crop_teacher_logits_are_cached_as_asked(data_dir, tmp_path):
    import fer_models as fm
    from fer_models.models.predict import predict_logits
    from fer_models.training.data import load_dataset
    from fer_models.training.train import main
    from safetensors.torch import load_file

    fm.create_model("resnet_tiny").save_pretrained(tmp_path / "teacher")
    run = tmp_path / "run"
    args = ["--arch", "resnet_tiny", "--data", str(data_dir), "--output", str(run), "--epochs", "1", "--limit", "128",
            "--distill-from", str(tmp_path / "teacher"), "--skip-final-eval"]
    main(args)
    assert json.loads((run / "teacher_logits.json").read_text())["tta"] == "center"
    # another view of the teacher: the cache is recomputed (the final evaluation on 32 faces adds the agreement)
    res = main(args[:-1] + ["--distill-tta", "tencrop"])
    assert json.loads((run / "teacher_logits.json").read_text())["tta"] == "tencrop"
    assert res["distillation"]["teacher_tta"] == "tencrop" and "ten-crop mean" in (run / "model" / "README.md").read_text()
    faces = load_dataset(data_dir).get_split("Training").subset(slice(0, 128))
    want, _ = predict_logits(fm.load_model(tmp_path / "teacher"), faces.images, tta="tencrop", device="cpu",
                             amp=None)  # the teacher is run at the training's precision (--amp auto)
    got = load_file(str(run / "teacher_logits.safetensors"))["Training"].numpy()
    assert np.allclose(got, want, atol=1e-4)


def test_teacher_logits_resume_from_the_last_saved_chunk(data_dir, tmp_path, monkeypatch):
    """A run stopped while caching the teacher's logits picks up at the last saved chunk, with the same result."""
    import fer_models as fm
    from fer_models.training import backbone
    from fer_models.training.config import TrainConfig
    from fer_models.training.data import load_dataset

    fm.create_model("resnet_tiny").save_pretrained(tmp_path / "teacher")
    faces = load_dataset(data_dir).get_split("Training").subset(slice(0, 100))
    cfg = TrainConfig(arch="resnet_tiny", distill_from=str(tmp_path / "teacher"), distill_tta="tencrop")
    monkeypatch.setattr(backbone, "TEACHER_CHUNK", 32)
    want = backbone.teacher_logits(cfg, faces, tmp_path / "whole", torch.device("cpu"), "Training")
    assert not (tmp_path / "whole" / "teacher_logits.partial.safetensors").exists()

    real, calls = backbone.predict_logits, []
    def stop_after_two(model, images, **kw):
        calls.append(len(images))
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(model, images, **kw)
    run = tmp_path / "stopped"
    monkeypatch.setattr(backbone, "predict_logits", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        backbone.teacher_logits(cfg, faces, run, torch.device("cpu"), "Training")
    assert (run / "teacher_logits.partial.safetensors").is_file()
    monkeypatch.setattr(backbone, "predict_logits", lambda m, images, **kw: (calls.append(len(images)), real(m, images, **kw))[1])
    # a partial file of another view of the teacher is not reused
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run / "teacher_logits.partial.safetensors", other)
    calls.clear()
    backbone.teacher_logits(dataclasses.replace(cfg, distill_tta="center"), faces, other, torch.device("cpu"), "Training")
    assert sum(calls) == 100
    calls.clear()
    got = backbone.teacher_logits(cfg, faces, run, torch.device("cpu"), "Training")
    assert calls == [32, 4]  # faces 64-95 and 96-99 only
    assert torch.allclose(got, want, atol=1e-5)
    assert not (run / "teacher_logits.partial.safetensors").exists()
