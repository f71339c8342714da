"""The Gradio app, launched in-process on a free port and called through gradio_client like any API user.

A tiny fusion model (saved and loaded back like the real checkpoint) keeps it fast. Every endpoint is called
with generated inputs and its outputs checked; each bad input must come back as a clear error (or note) while
the next good request still works.
"""
from __future__ import annotations

import json
import socket
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


from media import astronaut_face, faces_image, make_video  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def client(tmp_path_factory):
    import app

    ckpt = tmp_path_factory.mktemp("ckpt")
    fm.create_model("fusion_tiny").save_pretrained(ckpt)
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


def check_image_result(out, n_faces, explained=None):
    annotated, status, label, faces_html, cams, atts, json_file, result = out
    assert Path(annotated).is_file()
    w, h = result["image"]["width"], result["image"]["height"]
    assert Image.open(annotated).size == (w, h) or max(Image.open(annotated).size) == 1280
    assert result["num_faces"] == n_faces == len(result["faces"])
    assert json.loads(Path(json_file).read_text()) == result
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
    # Gallery: each explained face, then one Grad-CAM per backbone and one for the fusion.
    assert len(cams) == explained * (1 + len(result["backbones"]) + 1)
    for item in cams:
        assert Image.open(item["image"]).size == (144, 144)
    if n_faces:
        assert label["label"] == result["faces"][0]["label"] and len(label["confidences"]) == 7
        assert atts and len(atts) % explained == 0 and "Face #1" in faces_html and "fusion" in faces_html
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
    assert "1 face found" in out[1] and "PrivateTest accuracy" in out[1]
    assert result["faces"][0]["cam_target"] == result["faces"][0]["label"]


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


def test_app_imports_without_loading_a_model():
    import app

    assert isinstance(app.demo, app.gr.Blocks)
    assert app.PredictorHolder()._predictor is None


def test_main_reports_missing_checkpoint(tmp_path, capsys):
    import app

    with pytest.raises(SystemExit) as e:
        app.main(["--checkpoint-dir", str(tmp_path / "missing"), "--model-repo", ""])
    assert "No model weights" in str(e.value.code)
