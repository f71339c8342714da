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
