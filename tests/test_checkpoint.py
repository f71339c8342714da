"""The shipped checkpoint (checkpoints/): strict loading, outputs on synthetic input, and its recorded accuracy."""
import json

import numpy as np
import pytest
import torch

import fer_models as fm
from fer_models.training.evaluate import evaluate_fer

from conftest import REPO_ROOT

CKPT = REPO_ROOT / "checkpoints"
pytestmark = pytest.mark.skipif(not (CKPT / "model.safetensors").is_file(), reason="no shipped checkpoint yet")


@pytest.fixture(scope="module")
def shipped():
    return fm.load_model(CKPT)  # strict=True: every tensor must match the config


def test_shipped_checkpoint_is_a_self_contained_fp16_fusion(shipped):
    from safetensors import safe_open

    assert isinstance(shipped, fm.FusionModel) and len(shipped.member_names) == 3
    assert any(getattr(m, "has_attention", False) for m in shipped.members.values())
    with safe_open(str(CKPT / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    size = sum(p.stat().st_size for p in CKPT.rglob("*") if p.is_file())
    assert size < 100e6


def test_shipped_checkpoint_outputs(shipped):
    x = torch.randn(4, 1, 44, 44)
    with torch.no_grad():
        out = shipped(x, attention=True)
    assert out.logits.shape == (4, 7) and torch.isfinite(out.logits).all()
    assert set(out.member_logits) == set(shipped.member_names)
    assert torch.allclose(out.logits.softmax(-1).sum(-1), torch.ones(4))
    assert out.attention and all(v.dim() == 3 for maps in out.attention.values() for v in maps.values())
    # the fused decision depends on the input (a trained, not constant, model)
    assert not torch.allclose(out.logits[0], out.logits[1])


def test_shipped_checkpoint_card_and_results():
    card = (CKPT / "README.md").read_text()
    results = json.loads((CKPT / "results.json").read_text())
    assert "model-index" in card and "confusion_matrix.png" in card and (CKPT / "confusion_matrix.png").is_file()
    acc = results["PrivateTest/tencrop"]["accuracy"]
    assert f"{acc * 100:.2f}%" in card


def test_shipped_accuracy_on_fixed_private_subset(shipped, data_dir):
    from fer_models.training.data import load_dataset

    recorded = json.loads((CKPT / "results.json").read_text())["PrivateTest500/center"]["accuracy"]
    res = evaluate_fer(shipped, load_dataset(data_dir), "PrivateTest", "center", subset=500)
    assert res["n"] == 500
    assert abs(res["accuracy"] - recorded) <= 0.015, (res["accuracy"], recorded)


# --- the student (checkpoints/student): the live mode's fast model, distilled from the fusion -------------------
STUDENT = CKPT / "student"
needs_student = pytest.mark.skipif(not (STUDENT / "model.safetensors").is_file(), reason="no shipped student")


@needs_student
def test_shipped_student_is_small_fp16_and_calibrated():
    from safetensors import safe_open

    student = fm.load_model(STUDENT)
    assert student.arch == "student" and sum(p.numel() for p in student.parameters()) < 2e6
    with safe_open(str(STUDENT / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes  # (I64: BatchNorm's batch counters)
    assert (STUDENT / "model.safetensors").stat().st_size < 5e6
    assert student.temperature > 0 and student.cfg.get("confidence_map")  # calibrated on PublicTest


@needs_student
def test_shipped_student_card_shows_accuracy_macro_f1_and_agreement():
    card = (STUDENT / "README.md").read_text()
    results = json.loads((STUDENT / "results.json").read_text())
    private = results["PrivateTest/center"]
    assert f"{private['accuracy'] * 100:.2f}%" in card and f"{private['macro_f1'] * 100:.2f}%" in card
    assert f"{results['distillation']['PrivateTest']['agreement'] * 100:.2f}%" in card
    assert "Calibrated probabilities" in card


@needs_student
def test_shipped_student_accuracy_on_fixed_private_subset(data_dir):
    from fer_models.training.data import load_dataset

    recorded = json.loads((STUDENT / "results.json").read_text())["PrivateTest500/center"]["accuracy"]
    res = evaluate_fer(fm.load_model(STUDENT), load_dataset(data_dir), "PrivateTest", "center", subset=500)
    assert res["n"] == 500
    assert abs(res["accuracy"] - recorded) <= 0.015, (res["accuracy"], recorded)
