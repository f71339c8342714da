"""BatchNorm folding (fer_models.models.fold): same outputs, attention maps and Grad-CAM, original untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fer_models as fm
from fer_models.models.fold import count_batchnorms, fold_batchnorm, prepare_for_inference

TINY = [n for n in fm.list_models() if n.endswith("_tiny")]


def _with_bn_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding has something to fold."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.6 + 0.7)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.3)
        elif isinstance(m, torch.nn.Linear):  # the init's std 0.01 gives logits too small to compare
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 5)
    return model.eval()


def _outputs(model, x):
    with torch.inference_mode():
        out = model(x, attention=True)
    return out.logits, {f"{k}/{s}": v for k, layers in out.attention.items() for s, v in layers.items()}


@pytest.mark.parametrize("name", TINY + ["vgg19", "resnet18_cbam"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folding_keeps_outputs(name, channels_last):
    model = _with_bn_statistics(fm.create_model(name, width=0.25) if "tiny" not in name else fm.create_model(name))
    keys = set(model.state_dict())
    fast = prepare_for_inference(model, channels_last=channels_last)
    assert count_batchnorms(model) > 0 and count_batchnorms(fast) == 0
    assert set(model.state_dict()) == keys  # the original is not modified
    # Noise around three grey levels: pooled features of zero-mean noise alone barely differ between inputs.
    x = torch.randn(3, 1, 44, 44) + torch.tensor([-1.5, 0.0, 1.5]).view(3, 1, 1, 1)
    (a, maps_a), (b, maps_b) = _outputs(model, x), _outputs(fast, x)
    assert (a[0] - a[1]).abs().max() > 1e-3 * a.abs().max()  # logits that ignore the input would pass anything
    # Float rounding grows with depth and magnitude: tolerance relative to the logits' scale.
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    assert maps_a.keys() == maps_b.keys()
    for k in maps_a:
        torch.testing.assert_close(maps_b[k], maps_a[k], rtol=1e-4, atol=1e-5)


def test_folding_changes_weights_not_paths():
    model = _with_bn_statistics(fm.create_model("resnet_tiny"))
    folded = fold_batchnorm(model)
    names = {n for n, _ in model.named_modules()}
    assert names == {n for n, _ in folded.named_modules()}  # BatchNorms become Identity under the same name
    assert isinstance(folded.bn1, torch.nn.Identity) and folded.conv1.bias is not None
    assert not torch.equal(folded.conv1.weight, model.conv1.weight)
    assert folded.get_submodule(folded.cfg["cam_layer"]) is not None


def test_gradcam_on_folded_model_matches():
    explain = pytest.importorskip("explain")
    model = _with_bn_statistics(fm.create_model("fusion_tiny"))
    folded = fold_batchnorm(model)
    faces = [np.random.default_rng(i).integers(0, 256, (60, 60, 3), dtype=np.uint8) for i in range(2)]
    a = explain.Explainer(model).explain_faces(faces, method="gradcam")
    b = explain.Explainer(folded).explain_faces(faces, method="gradcam")
    assert a.heatmaps.keys() == b.heatmaps.keys() and len(a.heatmaps) >= 2
    assert any(np.asarray(m).std() > 0.01 for m in a.heatmaps.values())  # real maps, not only constants
    for k in a.heatmaps:
        np.testing.assert_allclose(np.asarray(b.heatmaps[k]), np.asarray(a.heatmaps[k]), atol=2e-3)
