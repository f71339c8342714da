"""A long live-webcam stream in a real browser, with the server's memory sampled: does RSS stay flat?

    python scripts/live_stream.py --minutes 10 [--warmup-seconds 60] [--out runs/soak/live.json]

Starts ``python app.py`` (as ``scripts/soak.py`` does), opens it in Chromium (the Debian package, driven by
Playwright; never ``playwright install``) whose fake camera films a Y4M clip of scikit-image's public-domain
astronaut moving across the picture, opens the Live tab and starts the webcam stream. For ``--minutes`` after a
warm-up it samples the server's resident memory every ``--sample-every`` seconds and counts the annotated frames
the page receives (each new picture in the live output). Reported: frames received and frames per second, the RSS
series ``(seconds, MiB, frames so far)``, RSS after the warm-up, its maximum and end after it, and page errors.
Exits 1 when the growth after the warm-up (max - start) exceeds ``--rss-bound-mb`` (100), no frame came back, or
the page raised an error. A stream that stops sending frames for 20 s (Gradio ends a stream at its time limit) is
started again with the same button, and the restart's time is reported.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
from soak import free_port, rss_mb, start_server, window_growth, write_report  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 "--autoplay-policy=no-user-gesture-required"]

# Counts every new picture shown in the live output (an <img> whose src changes, or a new <img>/<canvas>).
COUNTER_JS = """(sel) => {
  window.__frames = 0; window.__lastSrc = null;
  const root = document.querySelector(sel);
  const tick = () => {
    const img = document.querySelector(sel + ' img');
    if (img && img.src && img.src !== window.__lastSrc) { window.__lastSrc = img.src; window.__frames += 1; }
  };
  new MutationObserver(tick).observe(root, {subtree: true, childList: true, attributes: true,
                                            attributeFilter: ['src']});
  return true;
}"""


def fake_camera_file(path: Path, seconds: float = 6.0, fps: int = 10) -> str:
    """A Y4M clip (what ``--use-file-for-fake-video-capture`` reads; Chromium loops it) of the astronaut's face
    sliding left and right on a 640 x 480 picture, so the tracker follows a moving face."""
    from skimage import data

    face = cv2.resize(data.astronaut()[20:260, 120:340], (220, 240), interpolation=cv2.INTER_AREA)
    n = int(seconds * fps)
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W640 H480 F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(n):
            rgb = np.full((480, 640, 3), 100, np.uint8)
            x = int(60 + 300 * (0.5 - 0.5 * np.cos(2 * np.pi * i / n)))
            rgb[100:340, x:x + 220] = face
            f.write(b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())
    return str(path)


def start_stream(page, tab: str, input_sel: str) -> None:
    """Open the live tab and start the webcam stream (Gradio's streaming image input; in streaming mode its
    button keeps the label "capture photo" and toggles the stream)."""
    from playwright.sync_api import TimeoutError as PwTimeout

    page.get_by_role("tab", name=tab).click(timeout=30_000)
    box = page.locator(input_sel)
    box.wait_for(timeout=30_000)
    access = box.get_by_text("Click to Access Webcam")
    try:
        access.wait_for(timeout=5_000)
        access.click()
    except PwTimeout:
        pass  # access was granted without the button
    page.wait_for_function(f"() => {{ const v = document.querySelector('{input_sel} video');"
                           " return v && v.videoWidth > 0 && v.readyState >= 2; }", timeout=60_000)
    click_start(box, input_sel)


def click_start(box, input_sel: str) -> None:
    for name in ("start recording", "record", "start streaming", "stream", "start", "capture photo"):
        btn = box.get_by_role("button", name=name, exact=False)
        if btn.count():
            btn.first.click()
            return
    raise RuntimeError(f"no button to start the stream in {input_sel}: "
                       f"{[b.get_attribute('aria-label') for b in box.get_by_role('button').all()]}")


def stream(minutes: float, warmup_seconds: float, checkpoint_dir: str, sample_every: float = 10.0,
           tab: str = "Live webcam", input_sel: str = "#live-input", output_sel: str = "#live-output",
           wrap=(), env=None, screenshot: str | None = None, status_sel: str = "#live-status",
           stall_s: float = 20.0) -> dict:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        camera = fake_camera_file(Path(tmp) / "camera.y4m")
        port = free_port()
        proc = start_server(checkpoint_dir, port, 2, wrap=wrap, env=env)
        url = f"http://127.0.0.1:{port}/"
        errors: list[str] = []
        try:
            rss_started = rss_mb(proc.pid)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM,
                                            args=CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={camera}"])
                try:
                    context = browser.new_context(viewport={"width": 1400, "height": 1600})
                    context.grant_permissions(["camera"], origin=url.rstrip("/"))
                    page = context.new_page()
                    page.on("pageerror", lambda e: errors.append(str(e)[:300]))
                    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
                    start_stream(page, tab, input_sel)
                    page.locator(output_sel).wait_for(timeout=30_000)
                    page.evaluate(COUNTER_JS, output_sel)
                    frames = lambda: int(page.evaluate("() => window.__frames"))  # noqa: E731
                    t0 = time.time()
                    while time.time() - t0 < warmup_seconds:
                        page.wait_for_timeout(1000)
                    warm_frames = frames()
                    rss_start = rss_mb(proc.pid)
                    series = [(0.0, round(rss_start, 1), 0)]
                    t1 = time.time()
                    last_n, last_change, restarts = frames(), time.time(), []
                    while time.time() - t1 < minutes * 60:
                        page.wait_for_timeout(500)
                        if proc.poll() is not None:
                            raise RuntimeError(f"the server exited with {proc.returncode}")
                        n = frames()
                        if n != last_n:
                            last_n, last_change = n, time.time()
                        elif time.time() - last_change > stall_s:  # the stream ended (e.g. its time limit)
                            restarts.append(round(time.time() - t1))
                            click_start(page.locator(input_sel), input_sel)
                            last_change = time.time()
                        if time.time() - t1 >= sample_every * len(series):
                            series.append((round(time.time() - t1), round(rss_mb(proc.pid), 1),
                                           frames() - warm_frames))
                    wall = time.time() - t1
                    total = frames() - warm_frames
                    series.append((round(wall), round(rss_mb(proc.pid), 1), total))
                    status = page.locator(status_sel).inner_text(timeout=5_000)[:500]
                    if screenshot:
                        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                        page.screenshot(path=screenshot, full_page=True)
                finally:
                    browser.close()
            rss = [r[1] for r in series]
            return {
                "minutes": minutes, "seconds": round(wall, 1), "warmup_seconds": warmup_seconds,
                "warmup_frames": warm_frames, "frames": total, "frames_per_s": round(total / wall, 2),
                "page_errors": errors, "last_status": status, "restarts_at_s": restarts,
                "server": " ".join([*wrap, "app.py"]), "server_env": env or {},
                "rss_mb": {"started": round(rss_started, 1), "start": round(rss_start, 1), "end": rss[-1],
                           "max": max(rss), "growth_max": round(max(rss) - rss_start, 1),
                           "last_5_min": window_growth(series, 300), "series": series},
                "load_average": [round(x, 2) for x in os.getloadavg()],
            }
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except Exception:  # noqa: BLE001
                proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--warmup-seconds", type=float, default=60)
    ap.add_argument("--sample-every", type=float, default=10)
    ap.add_argument("--checkpoint-dir", default=str(ROOT / "checkpoints"))
    ap.add_argument("--rss-bound-mb", type=float, default=100, help="allowed growth after the warm-up (max - start)")
    ap.add_argument("--tab", default="Live webcam")
    ap.add_argument("--input", default="#live-input", help="CSS selector of the streaming webcam input")
    ap.add_argument("--output", default="#live-output", help="CSS selector of the annotated live output")
    ap.add_argument("--server-wrap", default="", help="e.g. 'scripts/memtrace.py --out DIR --'")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--screenshot", help="a full-page screenshot at the end")
    ap.add_argument("--out", help="also write the report here (JSON)")
    args = ap.parse_args(argv)
    if CHROMIUM is None:
        sys.exit("Chromium not found: apt-get install -y chromium (or set CHROMIUM_PATH)")
    report = stream(args.minutes, args.warmup_seconds, args.checkpoint_dir, args.sample_every, args.tab, args.input,
                    args.output, shlex.split(args.server_wrap), dict(kv.split("=", 1) for kv in args.server_env),
                    args.screenshot)
    report["rss_bound_mb"] = args.rss_bound_mb
    report["ok"] = (report["frames"] > 0 and not report["page_errors"]
                    and report["rss_mb"]["growth_max"] <= args.rss_bound_mb)
    return write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
