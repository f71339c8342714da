"""Tests of explain/: CAM shapes and ranges over the tiny registry, targets, hooks, alignment, overlays, and the
faithfulness CLI on a synthetic task a tiny model learns in seconds (class = the shape of a blob placed at
random, so its evidence is local and a faithful map must find it)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch.nn import functional as F

import fer_models as fm
from explain import DEFAULT_METHOD, METHODS, TARGET_FREE_METHODS, Explainer, Explanation
from explain import faithfulness
from explain.overlay import colorbar, colorize, overlay_on_face, paste_on_image
from fer_models.models.preprocess import prepare_faces

TINY = [n for n in fm.list_models() if n.endswith("_tiny")]  # every registered architecture, tiny variant
SHAPES = {0: (9, 9, 235), 1: (9, 9, 20), 2: (5, 15, 235), 3: (15, 5, 235)}  # h, w, grey level per class


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models are all overhead; one thread avoids oversubscribing a busy 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_shapes(n: int, seed: int, size: int = 48):
    """Noise faces with one object: bright square, dark square, horizontal bar or vertical bar (the class).

    Returns uint8 N x size x size images, labels and each object's (x0, y0, x1, y1) box in the image frame.
    """
    rng = np.random.default_rng(seed)
    imgs = rng.normal(128, 20, (n, size, size)).clip(0, 255)
    labels = rng.integers(0, len(SHAPES), n)
    boxes = np.zeros((n, 4), np.int64)
    for i, c in enumerate(labels):
        h, w, v = SHAPES[int(c)]
        y, x = rng.integers(6, size - 6 - h), rng.integers(6, size - 6 - w)
        imgs[i, y:y + h, x:x + w] = v
        boxes[i] = (x, y, x + w, y + h)
    return imgs.astype(np.uint8), labels, boxes


def _train(arch: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> fm.FERModel:
    torch.manual_seed(0)
    model = fm.create_model(arch, num_classes=len(SHAPES)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]).logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """A fusion of a VGG and a ResNet, each trained for a few seconds on the shapes task, plus held-out faces."""
    imgs, labels, _ = make_shapes(512, seed=0)
    spec = fm.create_model("vgg_tiny", num_classes=len(SHAPES)).input_spec()
    x, y = prepare_faces(list(imgs), spec), torch.from_numpy(labels)
    members = [_train("vgg_tiny", x, y, 60), _train("resnet_tiny", x, y, 100)]
    fusion = fm.FusionModel.from_members(members).eval()
    test_imgs, test_labels, test_boxes = make_shapes(48, seed=1)
    xt = prepare_faces(list(test_imgs), spec)
    with torch.no_grad():
        acc = (fusion(xt).logits.argmax(1).numpy() == test_labels).mean()
    assert acc >= 0.8, f"the tiny fusion did not learn the shapes task (accuracy {acc:.2f})"
    return dict(fusion=fusion, members=members, imgs=test_imgs, labels=test_labels, boxes=test_boxes, x=xt)


def _faces(model: fm.FERModel, n: int = 2) -> torch.Tensor:
    g = np.random.default_rng(0)
    return prepare_faces([g.integers(0, 256, (48, 48), dtype=np.uint8) for _ in range(n)], model.input_spec())


class _Logits(torch.nn.Module):
    """A model whose forward returns ``ModelOutput.logits``, for third-party code that expects a tensor."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def _hook_count(model: torch.nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, a, {})) for m in model.modules() for a in names)


# --- CAM contract ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", TINY)
def test_cam_shapes_and_range(arch, method):
    model = fm.create_model(arch)
    x = _faces(model, 3)
    exp = Explainer(model).explain(x, method=method)
    assert isinstance(exp, Explanation)
    s, crop = model.cfg["input_size"], model.cfg["crop_size"]
    expected = list(model.member_names) + (["fusion"] if model.fuses_members else [])
    assert list(exp.heatmaps) == expected
    for name, h in exp.heatmaps.items():
        assert h.shape == (3, s, s) and h.dtype == np.float32, name
        assert np.isfinite(h).all() and h.min() >= 0 and h.max() <= 1, name
        lo, hi = (s - crop) // 2, (s - crop) // 2 + crop
        border = h.copy()
        border[:, lo:hi, lo:hi] = 0
        assert not border.any(), f"{name}: non-zero outside the {crop} px centre crop"
        assert np.isclose(h.reshape(3, -1).max(1), 1, atol=1e-4).all(), f"{name}: peak should be 1 after scaling"
    assert exp.crop_box == (2, 2, 46, 46)
    assert exp.targets.shape == (3,) and exp.targets.dtype == np.int64
    assert exp.probs.shape == (3, model.num_classes)
    np.testing.assert_allclose(exp.probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(exp.targets, exp.probs.argmax(1))  # default target: the (fused) prediction


@pytest.mark.parametrize("arch", TINY)
def test_attention_maps(arch):
    model = fm.create_model(arch)
    x = _faces(model, 2)
    exp = Explainer(model).explain(x)
    with torch.no_grad():
        out = model(x, attention=True)
    expected = {f"{name}/{k}": v for name, layers in out.attention.items() for k, v in layers.items()}
    assert set(exp.attention) == set(expected)
    for key, a in exp.attention.items():
        assert a.shape == (2, 48, 48) and a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
        assert not a[:, :2].any() and not a[:, :, 46:].any()
        if expected[key].shape[-1] == 44:  # a map at crop resolution comes through unchanged, at the crop position
            np.testing.assert_allclose(a[:, 2:46, 2:46], expected[key].numpy(), atol=1e-6)


def test_grad_modes_and_input_checks(fusion_tiny):
    model = fusion_tiny
    explainer = Explainer(model)
    x = _faces(model, 2)
    ref = explainer.explain(x, "gradcam").heatmaps
    with torch.no_grad():
        a = explainer.explain(x, "gradcam").heatmaps
    with torch.inference_mode():
        b = explainer.explain(x.clone(), "gradcam").heatmaps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = explainer.explain(x, "gradcam").heatmaps
    for other in (a, b, c):
        for k in ref:
            np.testing.assert_allclose(other[k], ref[k], atol=1e-5)
    assert all(p.grad is None for p in model.parameters()), "explaining must not write parameter gradients"
    with pytest.raises(ValueError, match="unknown CAM method"):
        explainer.explain(x, "scorecam")
    with pytest.raises(ValueError, match="ten-crop"):
        explainer.explain(x[None].expand(10, -1, -1, -1, -1))
    with pytest.raises(ValueError):
        explainer.explain(x[:, :, :, :30].repeat(1, 3, 1, 1))


def test_hooks_released_over_repeated_calls(fusion_tiny):
    model = fusion_tiny
    explainer = Explainer(model)
    x = _faces(model, 2)
    before = _hook_count(model)
    for method in METHODS:
        for _ in range(2):
            explainer.explain(x, method=method)
    with pytest.raises(ValueError):  # an error after the forward pass must release the hooks too
        explainer.explain(x, target=99)
    assert _hook_count(model) == before == 0
    with torch.no_grad():  # and plain inference afterwards is unaffected
        torch.testing.assert_close(model(x).logits, model(x).logits)


def test_concurrent_calls_share_one_explainer(fusion_tiny):
    """The app shares one model and one Explainer between request threads, beside plain predictions."""
    from concurrent.futures import ThreadPoolExecutor

    model = fusion_tiny
    explainer = Explainer(model)
    xs = [_faces(model, 2) + i for i in range(4)]
    expected = [explainer.explain(x, "gradcam").heatmaps for x in xs]

    def predict(x):
        with torch.inference_mode():
            return model(x)

    with ThreadPoolExecutor(4) as pool:
        cams = [pool.submit(explainer.explain, x, "gradcam") for x in xs * 2]
        preds = [pool.submit(predict, x) for x in xs * 2]
        results = [f.result() for f in cams]
        [f.result() for f in preds]
    for i, exp in enumerate(results):
        for k, v in expected[i % 4].items():
            np.testing.assert_allclose(exp.heatmaps[k], v, atol=1e-5)
    assert _hook_count(model) == 0


def test_explain_faces_matches_explain():
    model = fm.create_model("vgg_tiny")
    faces = [np.random.default_rng(i).integers(0, 256, (60, 50, 3), dtype=np.uint8) for i in range(2)]
    explainer = Explainer(model)
    a = explainer.explain_faces(faces, "hirescam")
    b = explainer.explain(prepare_faces(faces, model.input_spec()), "hirescam")
    np.testing.assert_array_equal(a.heatmaps["vgg_tiny"], b.heatmaps["vgg_tiny"])


# --- correctness against pytorch-grad-cam and against the members alone ----------------------------------------
@pytest.mark.parametrize("arch", ["vgg_tiny", "resnet_cbam_tiny"])
def test_single_backbone_matches_pytorch_grad_cam(arch):
    model = fm.create_model(arch).eval()
    x = _faces(model, 2)
    ours = Explainer(model, align="stretch").explain(x, "gradcam", target=[1, 3]).heatmaps[arch][:, 2:46, 2:46]
    with GradCAM(_Logits(model), [model.cam_target_layers()[arch]]) as cam:  # pytorch-grad-cam wants a tensor
        ref = cam(x, [ClassifierOutputTarget(1), ClassifierOutputTarget(3)])
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    for p in model.parameters():
        p.grad = None  # pytorch-grad-cam's backward wrote them


def test_cells_are_placed_on_their_receptive_field_centres(fusion_tiny):
    """ResNet: stride-2 3x3 convs centre layer3 cell i on crop pixel 4i; VGG: three 2x2 pools put cell i on 8i+3.5."""
    from explain.geometry import Geometry, upsample

    model = fusion_tiny
    explainer = Explainer(model, align="receptive_field")
    cam, by_shape = explainer._geometries(_faces(model, 1))
    assert cam["resnet_tiny"] == cam["resnet_cbam_tiny"] == Geometry((4.0, 4.0), (0.0, 0.0))
    assert cam["vgg_tiny"] == Geometry((8.0, 8.0), (3.5, 3.5))
    assert by_shape[("resnet_cbam_tiny", 6, 6)] == Geometry((8.0, 8.0), (0.0, 0.0))  # CBAM layer4 attention
    grid = np.zeros((1, 11, 11), np.float32)
    grid[0, 3, 7] = 1
    up = upsample(grid, cam["resnet_tiny"], (44, 44))[0]
    assert np.unravel_index(np.argmax(up), up.shape) == (12, 28) and up[12, 28] == 1
    # the stretched geometry is cv2.resize's (what pytorch-grad-cam uses)
    import cv2

    g = np.random.default_rng(0).random((1, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(upsample(g, Geometry.stretched((5, 5), (44, 44)), (44, 44))[0],
                               cv2.resize(g[0], (44, 44)), atol=1e-5)


def test_member_maps_equal_members_explained_alone(trained):
    """One backward of the summed member logits gives every member its own-logit gradient."""
    fusion, x = trained["fusion"], trained["x"][:6]
    targets = [0, 1, 2, 3, 0, 1]
    for method in ("gradcam", "gradcam++", "layercam"):
        exp = Explainer(fusion).explain(x, method, target=targets)
        for name, member in fusion.members.items():
            alone = Explainer(member).explain(x, method, target=targets)
            np.testing.assert_allclose(exp.heatmaps[name], alone.heatmaps[member.arch], atol=1e-5)


def test_fusion_map_combination(trained):
    fusion, x = trained["fusion"], trained["x"][:4]
    exp = Explainer(fusion, fusion_combine="contribution").explain(x, "gradcam")
    w = np.stack([exp.fusion_weights[n] for n in fusion.member_names])
    assert w.shape == (2, 4) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(0), 1, atol=1e-5)
    c = np.stack([exp.contributions[n] for n in fusion.member_names])
    np.testing.assert_allclose(w, np.maximum(c, 0) / np.maximum(c, 0).sum(0), atol=1e-5)
    # The untrained head averages the members' logits, so the fused logit's gradient at each member's layer is
    # its own logit's gradient / 2, and "mean" combining must give the renormalised mean of the members' maps.
    mean = Explainer(fusion, fusion_combine="mean").explain(x, "gradcam")
    avg = sum(mean.heatmaps[n][:, 2:46, 2:46] for n in fusion.member_names) / 2
    lo, hi = avg.min((1, 2), keepdims=True), avg.max((1, 2), keepdims=True)
    np.testing.assert_allclose(mean.heatmaps["fusion"][:, 2:46, 2:46], (avg - lo) / (hi - lo), atol=1e-4)
    # Contribution weighting follows the head: a head that ignores the VGG leaves only the ResNet's map.
    vgg, res = fusion.member_names
    with torch.no_grad():
        head = fusion.head.weight.clone()
        fusion.head.weight[:, :4] = 0
    try:
        exp = Explainer(fusion, fusion_combine="contribution").explain(x, "gradcam")
    finally:
        with torch.no_grad():
            fusion.head.weight.copy_(head)
    np.testing.assert_allclose(exp.fusion_weights[vgg], 0, atol=1e-6)
    np.testing.assert_allclose(exp.heatmaps["fusion"], exp.heatmaps[res], atol=1e-4)


def test_target_selection(trained):
    fusion, x = trained["fusion"], trained["x"][:4]
    explainer = Explainer(fusion)
    a = explainer.explain(x, "gradcam", target=0)
    b = explainer.explain(x, "gradcam", target="class_2")
    np.testing.assert_array_equal(a.targets, [0] * 4)
    np.testing.assert_array_equal(b.targets, [2] * 4)
    assert a.target_names == ["class_0"] * 4
    for name in a.heatmaps:
        assert np.abs(a.heatmaps[name] - b.heatmaps[name]).max() > 0.1, name
    per_face = explainer.explain(x, "gradcam", target=np.array([0, 2, 0, 2]))
    np.testing.assert_allclose(per_face.heatmaps["fusion"][1], b.heatmaps["fusion"][1], atol=1e-5)
    np.testing.assert_allclose(per_face.heatmaps["fusion"][0], a.heatmaps["fusion"][0], atol=1e-5)
    # target-free methods do not depend on the class
    e0, e2 = (explainer.explain(x, "eigencam", target=t) for t in (0, 2))
    assert "eigencam" in TARGET_FREE_METHODS
    np.testing.assert_array_equal(e0.heatmaps["fusion"], e2.heatmaps["fusion"])
    for bad in (7, -1, [0, 1], "happy"):
        with pytest.raises(ValueError):
            explainer.explain(x, "gradcam", target=bad)


def test_maps_point_at_the_object(trained):
    """Pointing game in the 48 px face frame: the map's peak lies on the object (within half a VGG CAM cell,
    4 px) far more often than chance (about 15%)."""
    exp = Explainer(trained["fusion"]).explain(trained["x"], DEFAULT_METHOD, target=trained["labels"])
    need = {"fusion": 0.8, "resnet_tiny": 0.7, "vgg_tiny": 0.45}
    for name, floor in need.items():
        hits = []
        for h, (x0, y0, x1, y1) in zip(exp.heatmaps[name], trained["boxes"]):
            yy, xx = np.unravel_index(np.argmax(h), h.shape)
            hits.append(np.hypot(max(x0 - xx, 0, xx - x1 + 1), max(y0 - yy, 0, yy - y1 + 1)) <= 4)
        assert np.mean(hits) >= floor, f"{name}: peak on the object for only {np.mean(hits):.0%} of faces"


# --- overlays -------------------------------------------------------------------------------------------------
def test_overlays():
    heat = np.zeros((48, 48), np.float32)
    heat[10:20, 30:40] = 1.0
    face = np.full((48, 48, 3), 128, np.uint8)
    out = overlay_on_face(face, heat, alpha=0.5)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    big = overlay_on_face(np.full((96, 96), 128, np.uint8), heat)  # grey face of another size
    assert big.shape == (96, 96, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(overlay_on_face(face, heat, alpha=1.0)[15, 35], colorize(np.ones((1, 1)))[0, 0])
    np.testing.assert_array_equal(overlay_on_face(face, heat, alpha=0.0), face)
    image = np.zeros((100, 120, 3), np.uint8)
    pasted = paste_on_image(image, (100, -10, 140, 30), heat, alpha=0.5)  # sticks out of the frame
    assert pasted.shape == image.shape and pasted.dtype == np.uint8
    assert not pasted[40:, :].any() and not pasted[:, :100].any() and pasted[:30, 100:].any()
    assert not image.any(), "paste_on_image must not modify its input"
    bar = colorbar(256, 24)
    assert bar.dtype == np.uint8 and bar.shape[0] == 256 and bar.shape[2] == 3 and bar.shape[1] >= 24
    np.testing.assert_array_equal(bar[0, 0], colorize(np.ones((1, 1)))[0, 0])
    np.testing.assert_array_equal(bar[-1, 0], colorize(np.zeros((1, 1)))[0, 0])
    assert colorbar(100, 10, labels=False).shape == (100, 10, 3)


# --- faithfulness ---------------------------------------------------------------------------------------------
def test_road_removes_exact_fractions_despite_ties():
    rng = np.random.default_rng(0)
    cam = np.zeros((10, 10), np.float32)
    cam[:3, :3] = 1.0  # 91 tied zeros
    order = faithfulness.removal_order(cam, rng)
    for f in (0.05, 0.5):
        for morf in (True, False):
            mask = faithfulness.keep_mask(order, (10, 10), f, morf).numpy()
            assert mask.sum() == 100 - round(f * 100)
    assert faithfulness.keep_mask(order, (10, 10), 0.05, True).numpy()[:3, :3].sum() == 9 - 5
    np.testing.assert_allclose(faithfulness.spearman_rows(cam[None], cam[None]), [1.0])
    assert np.isnan(faithfulness.spearman_rows(np.zeros((1, 9)), cam[None, :3, :3]))[0]


def test_faithfulness_cli(trained, tmp_path):
    data = tmp_path / "shapes.npz"
    n = len(trained["labels"])
    np.savez(data, images=trained["imgs"], labels=trained["labels"],
             split=np.array(["PrivateTest"] * (n - 8) + ["Training"] * 8),
             class_names=np.array(trained["fusion"].class_names))
    model_dir = tmp_path / "fusion"
    trained["fusion"].save_pretrained(model_dir)
    out = tmp_path / "faithfulness.json"
    report = faithfulness.main([
        "--model", str(model_dir), "--data", str(data), "--split", "PrivateTest", "--n", "16",
        "--methods", "gradcam", "eigencam", "--fractions", "0.2", "0.6", "--batch-size", "8", "--out", str(out),
    ])
    saved = json.loads(out.read_text())
    assert saved["n"] == 16 and saved["maps"] == ["vgg_tiny", "resnet_tiny", "fusion"]
    assert saved["accuracy"] >= 0.8
    for name in saved["maps"]:
        assert set(saved["results"][name]) == {"gradcam", "eigencam", "random", "centre"}
        for r in saved["results"][name].values():
            assert len(r["morf_curve"]) == 2 and np.isfinite(r["road"])
    res = report["results"]
    # The trained maps find the object: removing it first hurts more than removing random pixels first ...
    for name in ("resnet_tiny", "fusion"):
        assert res[name]["gradcam"]["morf"] < res[name]["random"]["morf"], name
    # ... and they depend on the learned weights (Adebayo et al.): low rank correlation with a re-initialised
    # model's maps, where the same maps against themselves correlate perfectly.
    for name in saved["maps"]:
        assert res[name]["gradcam"]["randomization_spearman"] < 0.5, (name, res[name]["gradcam"])


def test_randomization_tells_trained_from_reinitialised(trained):
    fusion, x = trained["fusion"], trained["x"][:16]
    exp = Explainer(fusion).explain(x, "gradcam")
    same = Explainer(fusion).explain(x, "gradcam", target=exp.targets)
    fresh = Explainer(faithfulness.reinitialised(fusion, seed=1)).explain(x, "gradcam", target=exp.targets)
    for name in exp.heatmaps:
        crop = (slice(None), slice(2, 46), slice(2, 46))
        assert np.nanmean(faithfulness.spearman_rows(exp.heatmaps[name][crop], same.heatmaps[name][crop])) > 0.999
        rho = np.nanmean(faithfulness.spearman_rows(exp.heatmaps[name][crop], fresh.heatmaps[name][crop]))
        assert rho < 0.5, f"{name}: trained and re-initialised maps correlate (rho {rho:.2f})"


def test_recommend_method_needs_the_prior_beaten_and_weight_dependent_maps():
    from explain.faithfulness import recommend_method

    res = {"random": {"road": 0.0}, "centre": {"road": 0.15},
           "anti": {"road": 0.30, "randomization_spearman": -0.6},   # inverted copy of the input structure
           "ok": {"road": 0.20, "randomization_spearman": 0.1},
           "copy": {"road": 0.40, "randomization_spearman": 0.7},
           "unmeasured": {"road": 0.18}}
    assert recommend_method(res, ["anti", "ok", "copy", "unmeasured"]) == "ok"
    res["ok"]["road"] = 0.1   # below the centre prior
    assert recommend_method(res, ["anti", "ok", "copy", "unmeasured"]) == "unmeasured"
    assert recommend_method(res, ["anti", "ok", "copy"]) is None
