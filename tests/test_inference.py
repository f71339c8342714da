"""The image and video pipelines (fer_models.pipeline, fer_models.pipeline.video) with a tiny fusion model.

Images are generated in memory or taken from scikit-image (public domain); videos are generated with PyAV.
"""
from __future__ import annotations

import io
import json
import time

import av
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import fer_models as fm
from fer_models import pipeline as inf
from fer_models.pipeline import images, loading
from fer_models.pipeline.faces import FaceBox
from fer_models.pipeline import FacePredictor, InputError, ModelLoadError, load_image, load_model_with_fallback
from fer_models.pipeline.video import IoUTracker, analyze_video, probe_video, read_frame_at

try:
    from explain import Explainer
except ImportError:  # pragma: no cover - explain/ is developed in parallel
    Explainer = None


from media import astronaut_face, faces_image, make_video  # noqa: E402


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(fusion_tiny):
    return fusion_tiny


@pytest.fixture(scope="module")
def predictor(model):
    explainer = Explainer(model) if Explainer is not None else None
    return FacePredictor(model, explainer=explainer)


# ---------------------------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_load_formats(fmt):
    src = Image.fromarray(data.astronaut()).resize((128, 128))
    out = load_image(encode(src, fmt))
    assert out.pixels.shape == (128, 128, 3) and out.pixels.dtype == np.uint8
    assert np.abs(out.pixels.astype(int) - np.asarray(src).astype(int)).mean() < 25  # GIF palettes are lossy


def test_load_modes(tmp_path):
    gray = Image.fromarray(data.camera()).resize((64, 64))
    assert load_image(encode(gray, "PNG")).pixels.shape == (64, 64, 3)
    # 16-bit grayscale, full range: 65535 -> 255
    a16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    out = load_image(encode(Image.fromarray(a16), "PNG")).pixels
    assert out.max() == 255 and out.min() == 0 and out.shape == (64, 64, 3)
    # CMYK JPEG
    cmyk = Image.fromarray(data.astronaut()).resize((64, 64)).convert("CMYK")
    assert load_image(encode(cmyk, "JPEG")).pixels.shape == (64, 64, 3)
    # RGBA: transparent areas become white, not black
    rgba = np.zeros((32, 32, 4), np.uint8)
    assert load_image(encode(Image.fromarray(rgba), "PNG")).pixels.min() == 255
    # palette with transparency
    pal = Image.fromarray(data.astronaut()).resize((32, 32)).convert("P")
    assert load_image(encode(pal, "PNG", transparency=0)).pixels.shape == (32, 32, 3)
    # arrays: gray, float, RGBA
    assert load_image(np.zeros((10, 12), np.uint8)).pixels.shape == (10, 12, 3)
    assert load_image(np.random.rand(10, 12, 3)).pixels.dtype == np.uint8
    assert load_image(np.zeros((10, 12, 4), np.uint8)).pixels.shape == (10, 12, 3)


def test_load_exif_orientation():
    src = Image.fromarray(np.zeros((40, 80, 3), np.uint8))  # landscape pixels...
    exif = Image.Exif()
    exif[274] = 6  # ...that the camera says to rotate by 90 degrees
    out = load_image(encode(src, "JPEG", exif=exif))
    assert out.pixels.shape == (80, 40, 3) and out.original_size == (40, 80)


def test_load_animated_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    assert out.pixels[8, 8, 0] > 200 and out.pixels[8, 8, 2] < 50
    assert any("first frame" in n for n in out.notes)


@pytest.mark.parametrize("payload,match", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
    (encode(Image.fromarray(data.astronaut()), "JPEG")[:3000], "truncated or corrupt"),
    (encode(Image.fromarray(data.astronaut()), "PNG")[:5000], "truncated or corrupt"),
])
def test_load_bad_files(payload, match, tmp_path):
    with pytest.raises(InputError, match=match):
        load_image(payload)
    p = tmp_path / "bad.jpg"
    p.write_bytes(payload)
    with pytest.raises(InputError, match=match):
        load_image(p)


def test_load_too_many_pixels(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(InputError, match="limit"):
        load_image(encode(Image.new("L", (200, 200)), "PNG"))


def test_load_large_image_downscaled():
    big = Image.new("RGB", (5000, 3000), (10, 20, 30))
    out = load_image(encode(big, "PNG", compress_level=1), max_side=1000)
    assert out.pixels.shape == (600, 1000, 3) and out.original_size == (5000, 3000)
    assert any("downscaled" in n for n in out.notes)
    jpg = load_image(encode(big, "JPEG"), max_side=1000)  # JPEG draft mode path
    assert max(jpg.pixels.shape[:2]) == 1000 and jpg.original_size == (5000, 3000)


# ---------------------------------------------------------------------------------------------------------------
# FacePredictor
# ---------------------------------------------------------------------------------------------------------------
def _check_faces(analysis, n_classes=7):
    for f in analysis.faces:
        b = f.box
        assert 0 <= b.x0 < b.x1 <= analysis.width and 0 <= b.y0 < b.y1 <= analysis.height
        assert sum(f.probs.values()) == pytest.approx(1, abs=1e-4) and len(f.probs) == n_classes
        assert f.label == max(f.probs, key=f.probs.get) and f.confidence == pytest.approx(f.probs[f.label])
        assert [v.name for v in f.votes] == analysis.backbones
        for v in f.votes:
            assert sum(v.probs.values()) == pytest.approx(1, abs=1e-4) and v.label == max(v.probs, key=v.probs.get)


def test_analyze_one_face(predictor):
    analysis, rgb = predictor.analyze_image(data.astronaut())
    assert len(analysis.faces) == 1 and rgb.shape == (512, 512, 3)
    _check_faces(analysis)
    f = analysis.faces[0]
    assert f.index == 1 and f.crop.shape == (predictor.crop_px, predictor.crop_px, 3) and f.heatmaps is None
    assert f.attention and all(a.shape == (48, 48) and 0 <= a.min() and a.max() <= 1 for a in f.attention.values())
    assert analysis.backbones == ["vgg_tiny", "resnet_tiny", "resnet_cbam_tiny"]
    d = json.loads(analysis.to_json())
    assert d["num_faces"] == 1 and set(d["faces"][0]["backbones"]) == set(analysis.backbones)
    assert {"detect", "classify", "total", "load"} <= set(d["timings_ms"])


def test_batched_prediction_matches_single(predictor):
    crops = [astronaut_face(120), astronaut_face(80)[:, ::-1].copy()]
    both = predictor.predict_crops(crops)
    one = predictor.predict_crops(crops[1:])
    np.testing.assert_allclose(both.probs[1], one.probs[0], atol=1e-5)
    for name in predictor.backbones:
        np.testing.assert_allclose(both.member_probs[name][1], one.member_probs[name][0], atol=1e-5)


def test_tencrop(predictor):
    center, _ = predictor.analyze_image(data.astronaut())
    ten, _ = predictor.analyze_image(data.astronaut(), tta=True)
    assert ten.tta == "tencrop" and center.tta == "center"
    _check_faces(ten)
    assert ten.faces[0].attention.keys() == center.faces[0].attention.keys()


@pytest.mark.skipif(Explainer is None, reason="explain/ not available")
def test_explanations_and_target(predictor):
    analysis, _ = predictor.analyze_image(data.astronaut(), explain=True, cam_target="happy")
    f = analysis.faces[0]
    assert set(f.heatmaps) == set(predictor.backbones) | {"fusion"}
    for h in f.heatmaps.values():
        assert h.shape == (48, 48) and h.dtype == np.float32 and 0 <= h.min() and h.max() <= 1
    assert f.cam_target == "happy" and analysis.cam_method == "default"
    # Explaining adds maps beside the prediction: the probabilities and attention maps are the plain path's.
    plain, _ = predictor.analyze_image(data.astronaut())
    assert f.probs == plain.faces[0].probs and [v.probs for v in f.votes] == [v.probs for v in plain.faces[0].votes]
    assert f.attention.keys() == plain.faces[0].attention.keys()
    for k, a in f.attention.items():
        assert a.shape == (48, 48) and 0 <= a.min() and a.max() <= 1
        np.testing.assert_array_equal(a, plain.faces[0].attention[k])
    ten, _ = predictor.analyze_image(data.astronaut(), explain=True, tta=True, cam_method="gradcam++")
    assert ten.faces[0].heatmaps is not None and ten.cam_method == "gradcam++"
    # With no target, what is explained is the class reported, here the ten-crop prediction.
    ten, _ = predictor.analyze_image(data.astronaut(), explain=True, tta=True)
    assert ten.faces[0].cam_target == ten.faces[0].label
    with pytest.raises(InputError, match="explanation"):
        predictor.analyze_image(data.astronaut(), explain=True, cam_method="nonsense")
    with pytest.raises(InputError, match="Unknown target"):
        predictor.analyze_image(data.astronaut(), explain=True, cam_target="bored")


def test_no_face_and_whole_image(predictor):
    blank = np.full((100, 120, 3), 128, np.uint8)
    analysis, _ = predictor.analyze_array(blank), None
    assert analysis.no_face and any("No face found" in n for n in analysis.notes)
    whole = predictor.analyze_array(blank, whole_image=True)
    assert len(whole.faces) == 1 and whole.faces[0].whole_image
    assert (whole.faces[0].box.x1, whole.faces[0].box.y1) == (120, 100)
    _check_faces(whole)
    tiny, _ = predictor.analyze_image(np.zeros((1, 1, 3), np.uint8), whole_image=True)
    assert len(tiny.faces) == 1 and any("too small" in n for n in tiny.notes)


def test_many_faces_capped(model):
    # The grid's faces are 5% of the image's longer side, below the default detector's range (about 7%,
    # docs/detectors.md); MTCNN finds all 24, and the cap is what this checks.
    predictor = FacePredictor(model, detector="mtcnn", explainer=Explainer(model) if Explainer else None,
                              max_faces=20, max_explained=3)
    analysis, _ = predictor.analyze_image(faces_image(24), explain=Explainer is not None)
    assert len(analysis.faces) == 20
    assert any("24 faces found" in n for n in analysis.notes)
    _check_faces(analysis)
    if Explainer is not None:
        assert sum(f.heatmaps is not None for f in analysis.faces) == 3
        assert any("Grad-CAM computed for the 3 largest" in n for n in analysis.notes)


@pytest.mark.skipif(Explainer is None, reason="explain/ not available")
@pytest.mark.parametrize("tta", [False, True])
def test_explained_and_unexplained_faces_get_identical_predictions(model, tta):
    """Explaining some faces of an image changes no probability or attention map of any face, explained or not."""
    predictor = FacePredictor(model, explainer=Explainer(model), max_explained=2)
    img = faces_image(4)
    explained = predictor.analyze_array(img, explain=True, tta=tta)
    plain = predictor.analyze_array(img, tta=tta)
    assert len(plain.faces) == len(explained.faces) >= 3  # some explained, some not
    assert sum(f.heatmaps is not None for f in explained.faces) == 2
    for e, p in zip(explained.faces, plain.faces):
        assert e.probs == p.probs and [v.probs for v in e.votes] == [v.probs for v in p.votes]
        assert e.attention.keys() == p.attention.keys()
        for k in e.attention:
            np.testing.assert_array_equal(e.attention[k], p.attention[k])


def test_temperatures_in_the_config_scale_the_predictor_probabilities(tmp_path):
    """A config's temperature (fused) and a member config's (that member) give softmax(logits / T) everywhere the
    predictor reports probabilities, after a save/load round trip."""
    fm.create_model("fusion_tiny").save_pretrained(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    cfg["temperature"], cfg["members"][0]["temperature"] = 2.0, 4.0
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    model = fm.load_model(tmp_path / "plain")
    crops = [astronaut_face(120), astronaut_face(80)]
    p = FacePredictor(model)
    raw = p.predict_crops(crops)
    with torch.no_grad():
        out = model(p.prepare(crops))
    np.testing.assert_allclose(raw.probs, (out.logits / 2.0).softmax(-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(raw.member_probs["vgg_tiny"], (out.member_logits["vgg_tiny"] / 4.0).softmax(-1).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(raw.member_probs["resnet_tiny"], out.member_logits["resnet_tiny"].softmax(-1).numpy(),
                               atol=1e-5)
    face = p.analyze_image(data.astronaut())[0].faces[0]  # what the app, JSON and CSV show
    assert max(face.probs.values()) == pytest.approx(face.confidence)
    with torch.no_grad():
        logits = model(p.prepare([face.crop])).logits[0]
    assert list(face.probs.values()) == pytest.approx((logits / 2.0).softmax(-1).tolist(), abs=1e-5)


def test_a_confidence_map_in_the_config_sets_the_shown_confidence(tmp_path):
    """With a confidence map (fused and one member), the top probability the predictor reports is the map's value
    at the temperature-scaled top probability, the class order unchanged, after a save/load round trip."""
    fm.create_model("fusion_tiny").save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cmap = {"x": [0.1, 1.0], "y": [0.2, 0.4]}  # a tiny untrained model is near 1/7: its top becomes about 0.21
    cfg["temperature"], cfg["confidence_map"] = 2.0, cmap
    cfg["members"][1]["confidence_map"] = cmap
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    model = fm.load_model(tmp_path / "m")
    p = FacePredictor(model)
    face = p.analyze_image(data.astronaut())[0].faces[0]
    with torch.no_grad():
        out = model(p.prepare([face.crop]))
    scaled = (out.logits[0] / 2.0).softmax(-1)
    assert face.confidence == pytest.approx(float(np.interp(float(scaled.max()), cmap["x"], cmap["y"])), abs=1e-4)
    assert np.argsort(list(face.probs.values())).tolist() == scaled.argsort().tolist()
    votes = {v.name: v for v in face.votes}
    top = float(out.member_logits["resnet_tiny"][0].softmax(-1).max())
    assert max(votes["resnet_tiny"].probs.values()) == pytest.approx(float(np.interp(top, cmap["x"], cmap["y"])),
                                                                     abs=1e-4)
    assert max(votes["vgg_tiny"].probs.values()) == pytest.approx(
        float(out.member_logits["vgg_tiny"][0].softmax(-1).max()), abs=1e-5)  # no map: plain softmax


def test_tencrop_is_one_definition_in_the_app_evaluation_and_protocol(model):
    """Ten-crop = softmax(mean of the ten views' logits / T): FacePredictor (app, analyze), predict_logits
    (``python -m fer_models.evaluate --tta tencrop``) and the protocol give the same probabilities."""
    from fer_models.models.predict import predict_logits
    from fer_models.models.preprocess import normalize, ten_crop
    from fer_models.training import protocol

    faces = np.random.default_rng(0).integers(0, 256, (6, 48, 48), dtype=np.uint8)
    predictor = FacePredictor(model)
    app = predictor.predict_crops(list(faces), tta=True)
    proto_probs, proto_members = protocol._predict(predictor, list(faces), tta=True)

    def evaluate_cli(net):  # evaluate_fer's logits (amp off: bf16 would change the precision, not the definition)
        logits, members = predict_logits(net, faces, tta="tencrop", amp=False)
        return model.probabilities(fm.ModelOutput(torch.from_numpy(logits),
                                                  {k: torch.from_numpy(v) for k, v in members.items()}))

    for net, tol in ((predictor.model, 1e-6), (model, 1e-4)):  # the same folded network; the checkpoint as loaded
        probs, member_probs = evaluate_cli(net)
        for p, mp in ((app.probs, app.member_probs), (proto_probs, proto_members)):
            np.testing.assert_allclose(p, probs.numpy(), atol=tol)
            for name in model.member_names:
                np.testing.assert_allclose(mp[name], member_probs[name].numpy(), atol=tol)
    with torch.no_grad():  # the definition, spelled out
        views = ten_crop(normalize(torch.from_numpy(faces), model.input_spec()), 44)
        direct = model(views.flatten(0, 1)).logits.view(10, len(faces), -1).mean(0).softmax(-1)
    np.testing.assert_allclose(app.probs, direct.numpy(), atol=1e-4)


def test_predictor_single_backbone():
    m = fm.create_model("resnet_cbam_tiny").eval()
    p = FacePredictor(m)
    analysis, _ = p.analyze_image(data.astronaut())
    assert p.backbones == ["resnet_cbam_tiny"] and len(analysis.faces[0].votes) == 1
    assert analysis.faces[0].attention


def test_annotate(predictor):
    analysis, rgb = predictor.analyze_image(data.astronaut())
    out = inf.annotate(rgb, analysis.faces)
    assert out.shape == rgb.shape and (out != rgb).any() and not (rgb is out)


# ---------------------------------------------------------------------------------------------------------------
# Model loading with fallback
# ---------------------------------------------------------------------------------------------------------------
def test_load_local_and_results(tmp_path, model):
    model.save_pretrained(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"PrivateTest": {"accuracy": 0.7312}}))
    m, src = load_model_with_fallback(None, tmp_path, device="cpu")
    assert src.kind == "local" and src.arch == "fusion_tiny" and src.accuracies() == {"PrivateTest": 0.7312}
    assert "73.1%" in src.describe() and str(tmp_path) in src.describe()


def test_hub_offline_falls_back_at_once(tmp_path, model, monkeypatch):
    model.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    m, src = load_model_with_fallback("someone/fer-fusion", tmp_path, device="cpu")
    assert time.perf_counter() - t < 5
    assert src.kind == "local" and "someone/fer-fusion" in src.note and "HF_HUB_OFFLINE" in src.note
    assert "fell back" in src.describe()


def test_unreachable_hub_falls_back_at_once(tmp_path, model, monkeypatch):
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(loading, "hub_offline", lambda: False)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=2.0: False)
    t = time.perf_counter()
    m, src = load_model_with_fallback("someone/fer-fusion", tmp_path, device="cpu")
    assert time.perf_counter() - t < 5
    assert src.kind == "local" and "unreachable" in src.note


def test_missing_or_corrupt_checkpoint(tmp_path, model):
    with pytest.raises(ModelLoadError, match="No model weights"):
        load_model_with_fallback(None, tmp_path / "nothing", device="cpu")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot be loaded"):
        load_model_with_fallback(None, tmp_path, device="cpu")


def test_get_predictor_is_shared(tmp_path, model):
    model.save_pretrained(tmp_path)
    a = inf.get_predictor(None, tmp_path, device="cpu")
    b = inf.get_predictor(None, tmp_path, device="cpu")
    assert a is b


# ---------------------------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------------------------
def test_tracker_keeps_identities():
    tr = IoUTracker(max_age=2)
    assert tr.update([FaceBox(0, 0, 10, 10), FaceBox(50, 0, 60, 10)]) == [1, 2]
    assert tr.update([FaceBox(52, 1, 62, 11), FaceBox(2, 0, 12, 10)]) == [2, 1]  # order swapped
    assert tr.update([FaceBox(100, 100, 110, 110)]) == [3]  # a newcomer
    for _ in range(3):
        tr.update([])
    assert tr.update([FaceBox(0, 0, 10, 10)]) == [4]  # old tracks expired
    # A fast, steady pan: 8 px per sample on 10 px boxes, then 14 px: the velocity prediction keeps the identity.
    tr = IoUTracker()
    ids = [tr.update([FaceBox(x, 0, x + 10, 10)])[0] for x in (0, 8, 16, 30, 44, 58)]
    assert ids == [1] * 6


def test_analyze_video(tmp_path, predictor):
    clip = make_video(tmp_path / "clip.mp4", seconds=2.0, fps=10)
    seen = []
    va = analyze_video(predictor, clip, sample_fps=5, out_path=tmp_path / "out.mp4",
                       progress=lambda f, t: seen.append(f))
    assert 9 <= len(va.frames) <= 11 and seen and seen[-1] <= 1.0
    assert len(va.tracks) == 1 and va.tracks[0].frames >= 8
    assert all(len(fr.faces) == 1 and fr.faces[0].track_id == 1 for fr in va.frames if fr.faces)
    tr = va.tracks[0]
    assert sum(tr.share.values()) == pytest.approx(1) and tr.dominant in va.class_names
    ts, ps = va.timeline(1)
    assert ps.shape == (len(ts), 7) and np.allclose(ps.sum(1), 1, atol=1e-3) and (np.diff(ts) > 0).all()
    info = probe_video(va.annotated_path)
    assert info.codec == "h264" and info.width % 2 == 0 and info.height % 2 == 0
    with av.open(va.annotated_path) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"
        assert sum(1 for _ in c.decode(video=0)) == len(va.frames)
    rows = (tmp_path / "r.csv").read_text().splitlines() if va.to_csv(tmp_path / "r.csv") else []
    assert rows[0].startswith("frame,time_s,track_id") and len(rows) == 1 + sum(len(f.faces) for f in va.frames)
    json.dumps(va.to_dict())
    t, frame = read_frame_at(clip, 1.0)
    assert abs(t - 1.0) < 0.11 and frame.shape == (240, 320, 3)


def test_video_trimmed_and_webm(tmp_path, predictor):
    clip = make_video(tmp_path / "clip.webm", seconds=3.0, fps=10, codec="libvpx-vp9", container="webm")
    va = analyze_video(predictor, clip, sample_fps=2, max_seconds=1.0)
    assert va.frames[-1].time_s <= 1.0 and any("only its first 1 s" in n for n in va.notes)


@pytest.mark.parametrize("ext,codec", [("avi", "mpeg4"), ("mov", "libx264")])
def test_video_containers(tmp_path, predictor, ext, codec):
    clip = make_video(tmp_path / f"clip.{ext}", seconds=1.0, fps=10, codec=codec)
    va = analyze_video(predictor, clip, sample_fps=5)
    assert len(va.frames) == 5 and len(va.tracks) == 1


def test_video_bad_inputs(tmp_path, predictor):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        analyze_video(predictor, empty)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="not a video"):
        analyze_video(predictor, junk)
    image = tmp_path / "image.mp4"
    image.write_bytes(encode(Image.new("RGB", (8, 8)), "PNG"))
    with pytest.raises(InputError):
        analyze_video(predictor, image)
    good = make_video(tmp_path / "g.mp4", seconds=1.0)
    truncated = tmp_path / "trunc.mp4"
    truncated.write_bytes(open(good, "rb").read()[:1500])
    with pytest.raises(InputError):
        analyze_video(predictor, truncated)
    noface = make_video(tmp_path / "noface.mp4", seconds=1.0, face=False)
    va = analyze_video(predictor, noface, sample_fps=5)
    assert va.frames and not va.tracks and any("No faces found" in n for n in va.notes)
    with pytest.raises(InputError, match="Sample rate"):
        analyze_video(predictor, noface, sample_fps=0)


def test_extreme_float_arrays_load_without_overflow():
    """NaN, infinities and float32 extremes (found by the fuzzer) give finite, ordered pixels and no NaN casts."""
    import warnings

    a = np.array([[np.inf, -np.inf, np.nan], [3.4e38, -3.4e38, 0.0]] * 8, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = load_image(a).pixels
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 3, 3)
    assert rgb[0, 0, 0] == 255 and rgb[0, 1, 0] == 0 and rgb[1, 2, 0] == 128


def test_reported_logits_are_the_apps_fp32_even_where_bf16_is_fast(monkeypatch):
    """Evaluation (``predict_logits``' default) computes what the app computes: fp32, on any CPU. bf16 autocast
    (training's auto setting on CPUs with bf16 units) moved logits by up to 0.16 and changed answers."""
    from fer_models.models import predict

    monkeypatch.setattr(predict, "cpu_has_fast_bf16", lambda: True)
    torch.manual_seed(0)
    model = fm.create_model("resnet_tiny").eval()
    faces = np.random.default_rng(0).integers(0, 256, (16, 48, 48), dtype=np.uint8)
    reported, _ = predict.predict_logits(model, faces)
    p = FacePredictor(model, source=None, detector="mtcnn")
    with torch.inference_mode():
        served = p.model(p.prepare(list(faces))).logits.numpy()  # the app's folded copy
    assert np.allclose(reported, served, atol=1e-4)
    fast, _ = predict.predict_logits(model, faces, amp=None)  # training's auto: bf16 here
    assert not np.allclose(fast, served, atol=1e-4)
