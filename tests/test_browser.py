"""The app in a real browser: Chromium (Debian package, driven by Playwright) uploads the three-face example photo
and finds a result card per face, numbered and labelled; takes a webcam snapshot from a fake camera that films the
astronaut's face; uploads a clip and plays the annotated H.264 result. The app runs the shipped weights in
``checkpoints/`` (so the screenshots show real results). Full-page screenshots go to test-artifacts/; the README's
screenshot is the photo result's first screen, written to docs/img/app_result.png when UPDATE_DOCS_SCREENSHOT=1.

Needs ``apt-get install -y chromium`` (never ``playwright install``: it downloads browsers); skipped without it.
Set ``CHROMIUM_PATH`` to use another binary.
"""
from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from conftest import free_port
from fer_models.pipeline import FacePredictor, load_model_with_fallback

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
THREE_FACES = REPO_ROOT / "examples" / "three_faces.jpg"
CLASSES = "angry|disgust|fear|happy|sad|surprise|neutral"
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

    model, source = load_model_with_fallback(None, REPO_ROOT / "checkpoints", device="cpu")
    demo = app.build_demo(FacePredictor(model, explainer=explain.Explainer(model), source=source))
    port = free_port()
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def small_png(png: bytes, path: Path, width: int = 1000, max_bytes: int = 300_000) -> None:
    """A screenshot shrunk to ``width`` px and reduced to 256 colours, so it stays a small file."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    assert path.stat().st_size < max_bytes, path.stat().st_size


def test_three_faces_three_cards_in_chromium(app_url):
    """The three-face example: one card per face, numbered 1-3 as on the image, each with its label; the cards
    grow the page instead of scrolling inside a box."""
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app_url, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#image-input input[type=file]").set_input_files(str(THREE_FACES), timeout=30_000)
            page.locator("#image-input img").first.wait_for(timeout=30_000)  # the upload preview
            page.locator("#analyze-image").click()
            cards = page.locator("#face-cards .fer-card")
            cards.nth(2).wait_for(timeout=120_000)
            assert cards.count() == 3
            titles = [cards.nth(i).locator("h3").inner_text() for i in range(3)]
            for i, title in enumerate(titles, 1):
                assert re.match(rf"#{i} ({CLASSES}) \d+%", title), titles
                assert cards.nth(i - 1).get_attribute("data-label") in CLASSES.split("|")
                assert cards.nth(i - 1).get_by_text("fused decision").count() == 1
                assert cards.nth(i - 1).get_by_text("stage 1", exact=True).count() == 1
            assert "3 faces found" in page.locator("#image-status").inner_text()
            assert "Weights:" not in page.locator("#image-status").inner_text()
            assert page.locator("#annotated img").count() == 1
            # No inner scroll box: the cards' container is as tall as its content.
            assert page.evaluate("() => { const e = document.querySelector('#face-cards');"
                                 " return e.scrollHeight - e.clientHeight; }") <= 1
            # Thumbnails show the whole face: every map is drawn at its own square size, not cut to fit.
            assert page.evaluate("() => [...document.querySelectorAll('#face-cards img')].every(i =>"
                                 " i.complete && i.naturalWidth > 0 && Math.abs(i.clientWidth - i.clientHeight) <= 1)")
            # The model's facts are in the collapsed "About the model" section.
            about = page.locator("#about-model").get_by_text("About the model", exact=True)
            about.click()
            page.locator("#about-model").get_by_text("How often it is right").wait_for(timeout=30_000)
            about.click()
            page.locator("#annotated").scroll_into_view_if_needed()
            top = page.locator("#annotated").bounding_box()["y"] + page.evaluate("window.scrollY")
            first = cards.nth(0).bounding_box()
            bottom = first["y"] + first["height"] + page.evaluate("window.scrollY")
            page.screenshot(path=str(ARTIFACTS / "app_image_analysis.png"), full_page=True)
            shot = page.screenshot(full_page=True, clip={"x": 0, "y": max(0, top - 120), "width": 1280,
                                                         "height": min(bottom, top + 1500) - max(0, top - 120) + 10})
            small_png(shot, ARTIFACTS / "app_result.png")
            if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
                small_png(shot, REPO_ROOT / "docs" / "img" / "app_result.png")
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
            page.locator("#face-cards .fer-card").first.wait_for(timeout=90_000)
            status = page.locator("#image-status").inner_text()
            page.screenshot(path=str(ARTIFACTS / "app_webcam_snapshot.png"), full_page=True)
            assert "1 face found" in status, status
            assert page.locator("#face-cards .fer-card").count() == 1
            assert page.locator("#face-cards .fer-card img").count() >= 2  # the face and its heatmaps
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
            page.locator("#timeline img").first.wait_for(timeout=30_000)  # the timeline, one panel per face
            # The browser decodes the annotated H.264 result: metadata loaded, a duration, a picture size.
            page.wait_for_function("() => { const v = document.querySelector('#annotated-video video');"
                                   " return v && v.readyState >= 1 && v.duration > 0 && v.videoWidth > 0; }",
                                   timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "app_video_analysis.png"), full_page=True)
        finally:
            browser.close()


def moving_camera_file(path: Path, frames: int = 60) -> str:
    """A Y4M clip (30 frames/s) of the astronaut's face moving 3 px a frame, so that every annotated frame differs
    (identical ones are cached under one URL)."""
    import cv2
    import numpy as np

    face = np.asarray(Image.fromarray(data.astronaut()[20:260, 120:340]).resize((220, 240)))
    with open(path, "wb") as f:
        f.write(b"YUV4MPEG2 W640 H480 F30:1 Ip A1:1 C420jpeg\n")
        for i in range(frames):
            rgb = np.full((480, 640, 3), 100, np.uint8)
            x = 120 + 3 * (i if i < frames // 2 else frames - i)
            rgb[120:360, x:x + 220] = face
            f.write(b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())
    return str(path)


def _start_live(page, app_url: str) -> None:
    """Open the Live webcam tab and start streaming the fake camera."""
    page.goto(app_url, wait_until="domcontentloaded", timeout=60_000)
    page.get_by_role("tab", name="Live webcam").click()
    live = page.locator("#live-input")
    access = live.get_by_text("Click to Access Webcam")
    try:
        access.wait_for(timeout=5_000)
        access.click()
    except sync_api.TimeoutError:
        pass  # access was granted without the button
    page.wait_for_function("() => { const v = document.querySelector('#live-input video');"
                           " return v && v.videoWidth > 0 && v.readyState >= 2; }", timeout=30_000)
    live.get_by_label("capture photo").click()  # in a streaming input this button starts and stops the stream


def _live_frames(page, seconds: float) -> set[str]:
    """The distinct annotated frames shown in ``seconds``."""
    seen: set[str] = set()
    end = page.evaluate("Date.now()") + seconds * 1000
    while page.evaluate("Date.now()") < end:
        src = page.evaluate("() => document.querySelector('#live-output img')?.src || ''")
        if src:
            seen.add(src)
        page.wait_for_timeout(50)
    return seen


def test_live_webcam_stream_in_chromium(app_url, tmp_path):
    """Two viewers stream Chromium's fake camera (the astronaut's face) in the Live tab: annotated frames keep
    coming back with the live model named; the first viewer closes the tab mid-stream and the second's stream
    goes on; the second stops its camera and starts it again, and its tracks start afresh."""
    camera = moving_camera_file(tmp_path / "camera.y4m")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={camera}"])
        try:
            pages, errors = [], []
            for _ in range(2):
                context = browser.new_context(viewport={"width": 1400, "height": 1600})
                context.grant_permissions(["camera"], origin=app_url.rstrip("/"))
                page = context.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                _start_live(page, app_url)
                pages.append(page)
            first, second = pages
            for page in pages:
                page.locator("#live-output img").first.wait_for(timeout=90_000)
                page.locator("#live-status").get_by_text("Live model:").wait_for(timeout=30_000)
            frames = _live_frames(first, 5)
            assert len(frames) >= 2, f"{len(frames)} annotated frames in 5 s"
            status = first.locator("#live-status").inner_text()
            assert re.search(r"\b[1-9]\d* faces?,", status), status
            assert "Face ID" in first.locator("#live-faces").inner_text()
            first.screenshot(path=str(ARTIFACTS / "app_live_stream.png"), full_page=True)
            first.context.close()  # a viewer leaves mid-stream
            assert len(_live_frames(second, 4)) >= 1  # the other stream goes on
            capture = second.locator("#live-input").get_by_label("capture photo")
            capture.click()  # stop the camera ...
            second.wait_for_timeout(3_000)
            capture.click()  # ... and start it again after more than RESET_AFTER_S
            second.locator("#live-status").get_by_text("tracked afresh").wait_for(timeout=30_000)
            assert len(_live_frames(second, 4)) >= 1
            assert not errors, errors
        finally:
            browser.close()
