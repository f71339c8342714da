"""The Gradio app, launched in-process on a free port and called through gradio_client like any API user.

A tiny fusion model (saved and loaded back like the real checkpoint) keeps it fast. Every endpoint is called
with generated inputs and its outputs checked; each bad input must come back as a clear error (or note) while
the next good request still works.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

import fer_models as fm
from fer_models.pipeline import FacePredictor, load_model_with_fallback

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

explain = pytest.importorskip("explain", reason="explain/ is needed by the app")


from conftest import free_port  # noqa: E402
from media import astronaut_face, faces_image, make_video  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    out = {}
    Image.fromarray(data.astronaut()).resize((640, 640)).crop((0, 80, 640, 560)).save(d / "one.jpg", quality=90)
    out["one"] = str(d / "one.jpg")
    Image.fromarray(faces_image(30, face=70, cols=8)).save(d / "thirty.png")
    out["thirty"] = str(d / "thirty.png")
    (d / "text.jpg").write_text("hello, I am not an image")
    out["text"] = str(d / "text.jpg")
    (d / "trunc.jpg").write_bytes(Path(out["one"]).read_bytes()[:2000])
    out["trunc"] = str(d / "trunc.jpg")
    (d / "empty.png").write_bytes(b"")
    out["empty"] = str(d / "empty.png")
    Image.new("RGB", (1, 1), (200, 100, 50)).save(d / "pixel.png")
    out["pixel"] = str(d / "pixel.png")
    # 20000 x 20000: 400 megapixels, stored small because it is flat
    Image.new("L", (20000, 20000), 120).save(d / "huge.png", compress_level=1)
    out["huge"] = str(d / "huge.png")
    out["video"] = make_video(d / "clip.mp4", seconds=2.0, fps=10, size=(320, 240))
    out["noface"] = make_video(d / "noface.mp4", seconds=1.0, fps=10, face=False)
    (d / "broken.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    out["broken"] = str(d / "broken.mp4")
    (d / "zero.mp4").write_bytes(b"")
    out["zero"] = str(d / "zero.mp4")
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory, fusion_tiny):
    import app

    ckpt = tmp_path_factory.mktemp("ckpt")
    fusion_tiny.save_pretrained(ckpt)
    (ckpt / "results.json").write_text(json.dumps({"PrivateTest": {"accuracy": 0.25}}))
    model, source = load_model_with_fallback(None, ckpt, device="cpu")
    predictor = FacePredictor(model, explainer=explain.Explainer(model), source=source, max_explained=4)
    demo = app.build_demo(predictor)
    port = free_port()
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def analyze_image(client, path, detector="mtcnn", tta=False, method="gradcam", target="predicted class",
                  whole=False):
    return client.predict(handle_file(path), detector, tta, method, target, whole, api_name="/analyze_image")


def card_sections(cards_html: str) -> list[str]:
    """The result cards' HTML, one string per face card, in page order."""
    return re.findall(r"<section class='fer-card'.*?</section>", cards_html, flags=re.S)


def check_image_result(out, n_faces, explained=None):
    annotated, status, cards, json_file, result = out
    assert Path(annotated).is_file()
    w, h = result["image"]["width"], result["image"]["height"]
    assert Image.open(annotated).size == (w, h) or max(Image.open(annotated).size) == 1280
    assert result["num_faces"] == n_faces == len(result["faces"])
    assert json.loads(Path(json_file).read_text()) == result
    assert "Weights:" not in status  # the model's facts live in "About the model", not under every result
    classes = result["class_names"]
    for f in result["faces"]:
        b = f["box"]
        assert 0 <= b["x0"] < b["x1"] <= w and 0 <= b["y0"] < b["y1"] <= h
        assert sum(f["probs"].values()) == pytest.approx(1, abs=1e-3) and list(f["probs"]) == classes
        assert set(f["backbones"]) == set(result["backbones"])
        for v in f["backbones"].values():
            assert sum(v["probs"].values()) == pytest.approx(1, abs=1e-3) and v["label"] in classes
    explained = n_faces if explained is None else explained
    assert sum(f["explained"] for f in result["faces"]) == explained
    # One card per face, in the order of the numbers on the image, each with its label, confidence and votes;
    # an explained face's card has a labelled Grad-CAM column per backbone and for the fusion, a legend for each
    # scale, and its attention row labelled by stage.
    sections = card_sections(cards)
    assert len(sections) == n_faces
    for card, f in zip(sections, result["faces"]):
        assert f"data-face='{f['index']}'" in card and f"data-label='{f['label']}'" in card
        assert f"#{f['index']} " in card and f"{f['confidence']:.0%}" in card
        assert all(name in card for name in result["backbones"])
        n_img = card.count("<img ")
        if f["explained"]:
            assert all(f"<th>{name}</th>" in card for name in result["backbones"]) and "<th>fused decision</th>" in card
            assert "scaled to its own maximum" in card and "not rescaled" in card and "<th>stage 1</th>" in card
            assert n_img >= 1 + 1 + len(result["backbones"]) + 1 + 1  # crop, face, CAMs, fusion, attention
        else:
            assert n_img == 1 and "No heatmaps for this face" in card
    if not n_faces:
        assert "No faces" in cards
    return result


def test_api_lists_every_endpoint(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/analyze_image", "/analyze_video", "/explain_video_frame", "/model_info"} <= names


def test_model_info(client):
    info = client.predict(api_name="/model_info")
    assert "fusion_tiny" in info and "PrivateTest accuracy 25.0%" in info


def test_analyze_image(client, files):
    out = analyze_image(client, files["one"])
    result = check_image_result(out, 1)
    assert "1 face found" in out[1]
    assert result["faces"][0]["cam_target"] == result["faces"][0]["label"]


def test_three_faces_three_cards(client):
    """The example group photo: a card for every face, numbered as on the image."""
    out = analyze_image(client, str(Path(__file__).resolve().parents[1] / "examples" / "three_faces.jpg"))
    result = check_image_result(out, 3)
    assert [f["index"] for f in result["faces"]] == [1, 2, 3] and "3 faces found" in out[1]


def test_analyze_image_options(client, files):
    out = analyze_image(client, files["one"], detector="haar", tta=True, method="gradcam++", target="surprise")
    result = check_image_result(out, 1)
    assert result["tta"] == "tencrop" and result["detector"] == "haar" and result["cam_method"] == "gradcam++"
    assert result["faces"][0]["cam_target"] == "surprise"


def test_bad_images_give_clear_errors(client, files):
    for key, msg in [("text", "not an image"), ("trunc", "truncated or corrupt"), ("empty", "empty")]:
        with pytest.raises(Exception, match=msg):
            analyze_image(client, files[key])
    # A 1 x 1 image: no error, but a clear note, and the whole-image fallback is offered and works.
    out = analyze_image(client, files["pixel"])
    check_image_result(out, 0)
    assert "too small" in out[1] and "classify the whole image" in out[1]
    out = analyze_image(client, files["pixel"], whole=True)
    check_image_result(out, 1)
    # The server still answers a good request afterwards.
    check_image_result(analyze_image(client, files["one"]), 1)


def test_huge_image_is_downscaled(client, files):
    out = analyze_image(client, files["huge"])
    result = check_image_result(out, 0)
    assert max(result["image"]["width"], result["image"]["height"]) <= 4096 and "downscaled" in out[1]


def test_thirty_faces_explanations_capped(client, files):
    out = analyze_image(client, files["thirty"])
    result = check_image_result(out, 30, explained=4)
    assert "Grad-CAM computed for the 4 largest" in out[1]
    assert len({f["index"] for f in result["faces"]}) == 30


def test_analyze_video(client, files, tmp_path):
    video, plot, summary, csv_file, status, result, slider = client.predict(
        handle_file(files["video"]), 5, "mtcnn", False, api_name="/analyze_video")
    assert "frames analysed" in status and result["frames_analysed"] >= 9
    assert len(result["tracks"]) == 1 and result["tracks"][0]["dominant"] in result["class_names"]
    assert summary["data"][0][0] == "ID1" and summary["headers"][:4] == ["face", "frames", "seconds", "dominant"]
    assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image")
    rows = Path(csv_file).read_text().splitlines()
    assert len(rows) == 1 + result["frames_analysed"]
    path = video["video"] if isinstance(video, dict) else video
    with av.open(path) as c:  # a playable H.264 MP4
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert sum(1 for _ in c.decode(s)) == result["frames_analysed"]
    assert 0 < slider["maximum"] <= 2.0

    out = client.predict(handle_file(files["video"]), 1.0, "mtcnn", "gradcam", "happy",
                         api_name="/explain_video_frame")
    frame_result = check_image_result(out, 1)
    assert frame_result["faces"][0]["cam_target"] == "happy" and "Frame at 1.00 s" in out[1]


def test_bad_videos(client, files):
    for key, msg in [("broken", "not a video"), ("zero", "empty"), ("one", "still image")]:
        with pytest.raises(Exception, match=msg):
            client.predict(handle_file(files[key]), 5, "mtcnn", False, api_name="/analyze_video")
    out = client.predict(handle_file(files["noface"]), 5, "mtcnn", False, api_name="/analyze_video")
    assert "No faces found" in out[4] and out[5]["tracks"] == []
    # Still serving.
    out = client.predict(handle_file(files["video"]), 2, "haar", False, api_name="/analyze_video")
    assert out[5]["frames_analysed"] >= 3


def test_tag_at_the_top_edge_moves_inside_the_image():
    """A face touching the top (and right) edge keeps its whole "#1 happy 96%" tag inside the image."""
    from fer_models.pipeline import draw_boxes
    from fer_models.pipeline.faces import FaceBox

    color = (250, 190, 0)

    def tag_size(box, shape):
        canvas = np.zeros(shape, np.uint8)
        tagged = draw_boxes(canvas, [(box, "#1 happy 96%", color)])
        plain = draw_boxes(canvas, [(box, "", color)])
        ys, xs = np.nonzero((tagged == color).all(-1) & ~(plain == color).all(-1))
        return ys.min(), ys.max() - ys.min(), xs.max() - xs.min()

    _, roomy_h, roomy_w = tag_size(FaceBox(100, 100, 180, 190), (400, 400, 3))
    top, h, w = tag_size(FaceBox(330, 0, 420, 90), (400, 400, 3))
    assert (h, w) == (roomy_h, roomy_w) and top >= 0  # not clipped, and inside the box's top instead of above it


def _fake_video(n_tracks: int, frames: int = 5):
    from fer_models.pipeline.faces import FaceBox
    from fer_models.pipeline.results import FacePrediction
    from fer_models.pipeline.video import FrameResult, TrackedFace, VideoAnalysis, VideoInfo, summarise_tracks

    classes = list(fm.FER2013_CLASSES)
    result = []
    for i in range(frames):
        faces = []
        for t in range(1, n_tracks + 1):
            label = classes[(i + t) % 2]  # probabilities of exactly 0 and 1: the lines on the plot's frame
            probs = {c: float(c == label) for c in classes}
            faces.append(TrackedFace(t, FacePrediction(t, FaceBox(0, 0, 10, 10), label, 1.0, probs, [],
                                                       np.zeros((0, 0, 3), np.uint8))))
        result.append(FrameResult(i, i * 0.2, faces))
    return VideoAnalysis(VideoInfo(64, 48, 5.0, 1.0, "h264"), 5.0, result, summarise_tracks(result, classes),
                         classes, [], "mtcnn")


def test_timeline_panels_margins_and_smoothing():
    import app

    va = _fake_video(8)
    fig = app.timeline_figure(va)
    assert len(fig.axes) == 6  # one panel per face, the 6 longest tracks
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo < 0 and hi > 1  # lines at exactly 0 and 1 stay visible inside the frame
        assert len(ax.get_lines()) == len(va.class_names)
    ts, ps = va.timeline(1)
    fig = app.timeline_figure(_fake_video(2), smoothed={1: (ts, ps * 0.5)})
    assert [len(ax.get_lines()) for ax in fig.axes] == [2 * len(va.class_names), len(va.class_names)]
    assert "smoothed" in fig.axes[0].get_title() and "smoothed" not in fig.axes[1].get_title()


def test_model_facts_in_plain_words():
    import app

    results = json.loads((Path(__file__).resolve().parents[1] / "checkpoints" / "results.json").read_text())
    text = app.model_facts(results, ["vgg19", "resnet18", "vgg19_cbam"])
    private = results["PrivateTest/center"]["accuracy"]
    assert f"{private:.1%}" in text and "3,589" in text and "vgg19_cbam" in text and "CK+" in text
    assert app.model_facts({"PrivateTest": {"accuracy": 0.25}}, []) == ""
    cal = {"rows": {"fer2013/PrivateTest": {"outputs": {"fused": {"ece_before": 0.199, "ece_after": 0.021}}},
                    "jaffe/crops": {"outputs": {"fused": {"ece_before": 0.51, "ece_after": 0.28}}}}}
    text = app.model_facts({**results, "calibration": cal}, [])
    assert "by 2.1% on average" in text and "19.9% before calibration" in text and "JAFFE photos 28.0%" in text
    assert app.calibration_facts({"rows": {}}) == "" and app.calibration_facts(None) == ""


def test_app_imports_without_loading_a_model():
    import app

    assert isinstance(app.demo, app.gr.Blocks)
    assert app.PredictorHolder()._predictor is None


def test_main_reports_missing_checkpoint(tmp_path, capsys):
    import app

    with pytest.raises(SystemExit) as e:
        app.main(["--checkpoint-dir", str(tmp_path / "missing"), "--model-repo", ""])
    assert "No model weights" in str(e.value.code)
