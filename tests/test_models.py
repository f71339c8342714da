"""Registry-parametrized model tests on tiny variants: the output contract (shapes, members, attention maps,
calibrated probabilities), finiteness, save/load round trips."""
import json

import pytest
import torch

import fer_models as fm
from fer_models.models.base import WEIGHTS_NAME

TINY = [n for n in fm.list_models() if n.endswith("_tiny")]
ATTENTION = [n for n in TINY if "cbam" in n]


def test_registry_lists_full_and_tiny_models():
    names = fm.list_models()
    for n in ("vgg19", "resnet18", "resnet18_cbam", "vgg19_cbam", "fusion"):
        assert n in names
    assert set(fm.list_models(include_tiny=False)).isdisjoint(TINY)


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="known models: .*resnet18"):
        fm.create_model("resnet1000")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        fm.register_model(fm.models.vgg.vgg19)


@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_config(name):
    model = fm.create_model(name).eval()
    spec = model.input_spec()
    assert spec["class_names"] == list(fm.FER2013_CLASSES)
    x = torch.randn(3, spec["in_chans"], spec["crop_size"], spec["crop_size"])
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, fm.ModelOutput) and out.logits.shape == (3, 7) and out.attention == {}
    assert torch.isfinite(out.logits).all()
    assert list(out.member_logits) == model.member_names == list(model.member_models())
    assert list(model.cam_target_layers()) == model.member_names
    if not model.fuses_members:  # a backbone is its own single member
        assert out.member_logits[name] is out.logits and model.member_models()[name] is model
    for layer_name, layer in model.cam_target_layers().items():  # Grad-CAM layers keep >= 5x5 maps
        seen = {}
        h = layer.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))  # returns None: output kept
        with torch.no_grad():
            model(x)
        h.remove()
        assert min(seen["shape"][-2:]) >= 5, (layer_name, seen["shape"])


@pytest.mark.parametrize("name", ["vgg19", "resnet18", "vgg19_cbam"])
def test_full_size_backbones_forward(name):
    model = fm.create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 44, 44)).logits.shape == (2, 7)
    # the final feature map is pooled as a whole and is larger than 1x1 (no stage collapses)
    feats = model.forward_features(torch.randn(1, 1, 44, 44))
    assert min(feats.shape[-2:]) >= 2


def test_num_classes_and_class_names_size_the_head():
    model = fm.create_model("resnet_tiny", class_names=["a", "b", "c"])
    assert model(torch.randn(2, 1, 44, 44)).logits.shape == (2, 3)
    assert fm.create_model("vgg_tiny", num_classes=5).num_classes == 5


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_maps_have_the_grid_shape(name):
    model = fm.create_model(name).eval()
    x = torch.randn(2, 1, 44, 44)
    with torch.no_grad():
        out = model(x, attention=True)
    logits, maps = out.logits, out.attention[name]
    assert logits.shape == (2, 7) and list(out.attention) == [name]
    first = next(iter(maps.values()))
    assert first.shape == (2, 44, 44)  # the first stage's map is the input grid
    for m in maps.values():
        assert m.dim() == 3 and m.shape[0] == 2
        assert float(m.min()) >= 0 and float(m.max()) <= 1
    with torch.no_grad():
        assert torch.allclose(logits, model(x).logits, atol=1e-6)


def test_backbone_without_attention_answers_with_no_maps():
    out = fm.create_model("vgg_tiny").eval()(torch.randn(1, 1, 44, 44), attention=True)
    assert out.attention == {} and out.logits.shape == (1, 7)


def test_probabilities_apply_the_config_temperatures():
    """softmax(logits / T): the model's own T for the decision, each member's (members[i]["temperature"]) for its."""
    backbone = fm.create_model("vgg_tiny", temperature=2.0).eval()
    x = torch.randn(3, 1, 44, 44)
    with torch.no_grad():
        out = backbone(x)
    probs, members = backbone.probabilities(out)
    torch.testing.assert_close(probs, (out.logits / 2.0).softmax(-1))
    torch.testing.assert_close(members["vgg_tiny"], probs)
    fusion = fm.create_model("fusion_tiny", temperature=0.5).eval()
    fusion.cfg["members"][1]["temperature"] = 3.0  # as the calibration CLI writes it into the member config
    with torch.no_grad():
        out = fusion(x)
    probs, members = fusion.probabilities(out)
    torch.testing.assert_close(probs, (out.logits / 0.5).softmax(-1))
    torch.testing.assert_close(members["resnet_tiny"], (out.member_logits["resnet_tiny"] / 3.0).softmax(-1))
    torch.testing.assert_close(members["vgg_tiny"], out.member_logits["vgg_tiny"].softmax(-1))  # absent: T = 1
    with pytest.raises(ValueError, match="temperature"):
        fm.create_model("vgg_tiny", temperature=0.0).probabilities(out)


def test_fusion_exposes_member_logits_and_starts_as_logit_average(fusion_tiny):
    model = fusion_tiny
    x = torch.randn(4, 1, 44, 44)
    with torch.no_grad():
        out = model(x, attention=True)
    assert list(out.member_logits) == model.member_names == ["vgg_tiny", "resnet_tiny", "resnet_cbam_tiny"]
    avg = torch.stack(list(out.member_logits.values())).mean(0)
    assert torch.allclose(out.logits, avg, atol=1e-5)
    assert list(out.attention) == ["resnet_cbam_tiny"]
    plain = model(x)
    assert torch.allclose(plain.logits, out.logits) and plain.attention == {}


def test_fusion_average_mode_averages_probabilities():
    model = fm.create_model("fusion_tiny", mode="average").eval()
    x = torch.randn(2, 1, 44, 44)
    with torch.no_grad():
        out = model(x)
    probs = torch.stack([l.softmax(-1) for l in out.member_logits.values()]).mean(0)
    assert torch.allclose(out.logits.softmax(-1), probs, atol=1e-5)


def test_fusion_rejects_members_with_different_input_specs():
    a = fm.create_model("vgg_tiny").cfg
    b = fm.create_model("resnet_tiny", crop_size=40).cfg
    with pytest.raises(ValueError, match="input spec"):
        fm.FusionModel(members=[a, b])


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_save_load_round_trip(tmp_path, name, dtype):
    model = fm.create_model(name).eval()
    with torch.no_grad():  # non-trivial BN statistics, so the round trip covers buffers too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path, dtype=dtype)
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["arch"] == name and cfg["class_names"] == list(fm.FER2013_CLASSES)
    loaded = fm.load_model(tmp_path)
    assert type(loaded) is type(model)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # fp16 storage loads back as fp32
    x = torch.randn(2, 1, 44, 44)
    with torch.no_grad():
        a, b = model(x).logits, loaded(x).logits
    if dtype is None:
        assert torch.equal(a, b)
    else:
        assert torch.allclose(a, b, atol=2e-2, rtol=1e-2)


def test_fp16_checkpoint_is_about_half_the_size(tmp_path):
    model = fm.create_model("vgg_tiny")
    model.save_pretrained(tmp_path / "fp32")
    model.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    s32 = (tmp_path / "fp32" / WEIGHTS_NAME).stat().st_size
    s16 = (tmp_path / "fp16" / WEIGHTS_NAME).stat().st_size
    assert s16 < 0.6 * s32


def test_fusion_checkpoint_is_self_contained(tmp_path):
    members = [fm.create_model(n) for n in ("vgg_tiny", "resnet_cbam_tiny")]
    fusion = fm.FusionModel.from_members(members)
    fusion.save_pretrained(tmp_path / "fusion")
    for m in tmp_path.iterdir():  # only the fusion directory exists
        assert m.name == "fusion"
    loaded = fm.load_model(tmp_path / "fusion")
    x = torch.randn(2, 1, 44, 44)
    with torch.no_grad():
        assert torch.equal(loaded.members["vgg_tiny"](x).logits, members[0].eval()(x).logits)
        assert torch.equal(loaded(x).logits, fusion.eval()(x).logits)


def test_strict_loading_rejects_mismatched_weights(tmp_path):
    fm.create_model("vgg_tiny").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["layers"] = cfg["layers"] + [64]  # the config now describes a different network
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match|shape"):
        fm.load_model(tmp_path)


def test_corrupt_or_missing_weights_give_clear_errors(tmp_path):
    fm.create_model("vgg_tiny").save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read weights file"):
        fm.load_model(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        fm.load_model(tmp_path)


def test_hub_repo_id_fails_fast_offline():
    import time

    from huggingface_hub.errors import LocalEntryNotFoundError

    t0 = time.time()
    with pytest.raises((LocalEntryNotFoundError, OSError)):
        fm.load_model("nobody/does-not-exist")
    assert time.time() - t0 < 10


def test_load_from_hf_cache_layout(tmp_path, monkeypatch):
    """A repo id resolves from a pre-populated Hugging Face cache with HF_HUB_OFFLINE=1 (the Space fallback path)."""
    from huggingface_hub import constants

    model = fm.create_model("resnet_tiny").eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    snap = tmp_path / "hub" / "models--someone--fer-tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((src / f).read_bytes())
    refs = snap.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = fm.load_model("someone/fer-tiny", cache_dir=str(tmp_path / "hub"))
    x = torch.randn(1, 1, 44, 44)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
