"""The app in a real browser: Chromium (Debian package, driven by Playwright) uploads a photo, runs the analysis
and finds the rendered label, per-face table and heatmaps; takes a webcam snapshot from a fake camera that films
the astronaut's face; uploads a clip and plays the annotated H.264 result. Screenshots go to test-artifacts/.

Needs ``apt-get install -y chromium`` (never ``playwright install``: it downloads browsers); skipped without it.
Set ``CHROMIUM_PATH`` to use another binary.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

import fer_models as fm
from fer_models.pipeline import FacePredictor

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install -y chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) not installed")
explain = pytest.importorskip("explain", reason="explain/ is needed by the app")


@pytest.fixture(scope="module")
def app_url():
    import app

    model = fm.create_model("fusion_tiny").eval()
    demo = app.build_demo(FacePredictor(model, explainer=explain.Explainer(model)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def test_upload_and_analyse_in_chromium(app_url, tmp_path):
    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo, quality=90)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app_url, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#image-input input[type=file]").set_input_files(str(photo), timeout=30_000)
            page.locator("#image-input img").first.wait_for(timeout=30_000)  # the upload preview
            page.locator("#analyze-image").click()
            label = page.locator("#top-label")
            label.locator("text=/angry|disgust|fear|happy|sad|surprise|neutral/").first.wait_for(timeout=90_000)
            page.locator("#faces-table").get_by_text("Face #1").wait_for(timeout=30_000)
            cams = page.locator("#cam-gallery img")
            cams.first.wait_for(timeout=30_000)
            assert cams.count() >= 2  # the face and its heatmaps
            assert "1 face found" in page.locator("#image-status").inner_text()
            assert page.locator("#annotated img").count() == 1
            page.screenshot(path=str(ARTIFACTS / "app_image_analysis.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def fake_camera_file(path: Path, frames: int = 10) -> str:
    """A Y4M clip (the format Chromium's ``--use-file-for-fake-video-capture`` reads) of the astronaut's face."""
    import cv2
    import numpy as np

    rgb = np.full((480, 640, 3), 100, np.uint8)
    rgb[60:60 + 349, 220:220 + 320] = np.asarray(Image.fromarray(data.astronaut()[20:260, 120:340]).resize((320, 349)))
    yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes()
    with open(path, "wb") as f:
        f.write(b"YUV4MPEG2 W640 H480 F10:1 Ip A1:1 C420jpeg\n")
        for _ in range(frames):
            f.write(b"FRAME\n" + yuv)
    return str(path)


def test_webcam_snapshot_in_chromium(app_url, tmp_path):
    """The webcam source: Chromium's fake camera films a face, the snapshot is analysed like an upload."""
    camera = fake_camera_file(tmp_path / "camera.y4m")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={camera}"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1800})
            context.grant_permissions(["camera"], origin=app_url.rstrip("/"))
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app_url, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#image-input").get_by_label("Capture from camera").click(timeout=30_000)
            access = page.locator("#image-input").get_by_text("Click to Access Webcam")
            try:
                access.wait_for(timeout=5_000)
                access.click()
            except sync_api.TimeoutError:
                pass  # access was granted without the button
            page.locator("#image-input video").first.wait_for(timeout=30_000)
            page.wait_for_function("() => { const v = document.querySelector('#image-input video');"
                                   " return v && v.videoWidth > 0 && v.readyState >= 2; }", timeout=30_000)
            page.locator("#image-input").get_by_label("capture photo").click()
            page.locator("#image-input img").first.wait_for(timeout=30_000)  # the snapshot replaces the stream
            page.locator("#analyze-image").click()
            page.locator("#top-label").locator(
                "text=/angry|disgust|fear|happy|sad|surprise|neutral/").first.wait_for(timeout=90_000)
            status = page.locator("#image-status").inner_text()
            page.screenshot(path=str(ARTIFACTS / "app_webcam_snapshot.png"), full_page=True)
            assert "1 face found" in status, status
            assert page.locator("#cam-gallery img").count() >= 2
            assert not errors, errors
        finally:
            browser.close()


def test_video_tab_in_chromium(app_url, tmp_path):
    """Upload a clip in the browser (no ffmpeg on the server), analyse it, and find the playable result."""
    import av
    import numpy as np

    clip = tmp_path / "clip.mp4"
    face = np.asarray(Image.fromarray(data.astronaut()[20:260, 120:340]).resize((100, 109)))
    with av.open(str(clip), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        for i in range(15):
            frame = np.full((240, 320, 3), 90, np.uint8)
            frame[60:169, 20 + 8 * i:120 + 8 * i] = face
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(app_url, wait_until="domcontentloaded", timeout=60_000)
            page.get_by_role("tab", name="Video clip").click()
            page.locator("#video-input input[type=file]").set_input_files(str(clip), timeout=30_000)
            page.locator("#video-input video").first.wait_for(timeout=30_000)
            page.locator("#analyze-video").click()
            page.locator("#annotated-video video").first.wait_for(timeout=90_000)
            assert page.get_by_text("frames analysed").count() >= 1
            # The browser decodes the annotated H.264 result: metadata loaded, a duration, a picture size.
            page.wait_for_function("() => { const v = document.querySelector('#annotated-video video');"
                                   " return v && v.readyState >= 1 && v.duration > 0 && v.videoWidth > 0; }",
                                   timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "app_video_analysis.png"), full_page=True)
        finally:
            browser.close()
