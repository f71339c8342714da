"""Soak test: start ``python app.py`` and hit it with concurrent gradio_client clients for a bounded time.

    python scripts/soak.py --clients 20 --seconds 1800 --warmup-seconds 60 [--out soak.json]
    python scripts/soak.py ... --server-wrap "scripts/memtrace.py --out DIR --"   # memory seen from inside

Each client loops over a mix of requests (photos with Grad-CAM, short clips, explanations of a video frame) until
the time is up. Reported: requests served, errors (the target is 0; each kind of message is listed), p50/p95
latency per kind and overall, and the server's resident memory after a warm-up under the same load (by then every
thread's allocator arenas and every lazily built detector and explainer exist) and at the end, with a series
``(seconds, MiB, requests served)`` every ``--sample-every`` s, its slope in MiB per request, and the growth within
the last ``--window-seconds`` (largest RSS there minus its value at the window's start). Targets: growth from start
to end within ``--rss-bound-mb`` and within the window within ``--window-bound-mb`` (50). Exits 1 if a target is
missed. The media are generated (scikit-image's public-domain astronaut), never read from a dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from media import faces_image, make_video  # noqa: E402

MIX = [("photo", 0.6), ("video", 0.2), ("explain", 0.2)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint_dir: str, port: int, concurrency: int, timeout: float = 300.0,
                 wrap: Sequence[str] = (), env: Optional[dict] = None) -> subprocess.Popen:
    """``python [wrap...] app.py`` on ``port``, returned once it answers HTTP. ``wrap``: e.g. ``scripts/memtrace.py
    --out DIR --`` (memory recorded from inside the server); ``env``: extra environment variables."""
    log = tempfile.TemporaryFile("w+")
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_DISABLE_TELEMETRY="1", FER_MODEL_REPO="", **(env or {}))
    proc = subprocess.Popen([sys.executable, *wrap, str(ROOT / "app.py"), "--checkpoint-dir", checkpoint_dir,
                             "--port", str(port), "--concurrency", str(concurrency)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log  # read with server_log(proc); a pipe nobody reads would block a chatty server once full
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}: {server_log(proc)}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read(100)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s")


def server_log(proc: subprocess.Popen, chars: int = 4000) -> str:
    """The end of what the server wrote to stderr (its tracebacks and warnings)."""
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()[-chars:]


def make_media(folder: Path) -> dict[str, str]:
    """A 640 x 480 photo with two faces and a 2 s 320 x 240 clip."""
    photo = np.full((480, 640, 3), 110, np.uint8)
    faces = faces_image(2, face=160, cols=2)
    photo[40:40 + faces.shape[0], 60:60 + faces.shape[1]] = faces[:440, :580]
    Image.fromarray(photo).save(folder / "photo.jpg", quality=90)
    return {"photo": str(folder / "photo.jpg"), "video": make_video(folder / "clip.mp4", seconds=2.0, fps=10)}


def request(client, kind: str, media: dict[str, str], rng: random.Random):
    from gradio_client import handle_file

    if kind == "photo":
        return client.predict(handle_file(media["photo"]), "mtcnn", False, rng.choice(["gradcam", "gradcam++"]),
                              "predicted class", False, api_name="/analyze_image")
    if kind == "video":
        return client.predict(handle_file(media["video"]), 2, "mtcnn", False, api_name="/analyze_video")
    return client.predict(handle_file(media["video"]), rng.uniform(0, 1.4), "mtcnn", "gradcam", "predicted class",
                          api_name="/explain_video_frame")


def percentile(xs: list[float], q: float):
    return round(float(np.percentile(xs, q)), 3) if xs else None


def run_clients(url: str, clients: int, seconds: float, media: dict[str, str], seed: int = 0,
                served: Optional[list] = None) -> dict:
    """``clients`` threads, each with its own gradio_client, each looping over the mix until ``seconds`` pass.
    ``served``: a one-element list counting answered requests as they come (for the RSS series)."""
    from gradio_client import Client

    latencies: dict[str, list[float]] = {k: [] for k, _ in MIX}
    errors: Counter = Counter()
    lock = threading.Lock()
    deadline = time.time() + seconds

    def client_loop(i: int) -> None:
        rng = random.Random(seed + i)
        client = Client(url, verbose=False)
        while time.time() < deadline:
            kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
            t = time.perf_counter()
            try:
                request(client, kind, media, rng)
                ok = True
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                ok, msg = False, f"{kind}: {type(e).__name__}: {str(e)[:200]}"
            with lock:
                if ok:
                    latencies[kind].append(time.perf_counter() - t)
                    if served is not None:
                        served[0] += 1
                else:
                    errors[msg] += 1

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 600)
    every = [x for xs in latencies.values() for x in xs]
    return {
        "served": len(every), "errors": sum(errors.values()), "error_messages": dict(errors),
        "latency_s": {k: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)}
                      for k, v in {**latencies, "all": every}.items()},
    }


def window_growth(series: list, window_s: float) -> Optional[dict]:
    """RSS over the last ``window_s`` seconds of a series of ``(t, rss[, served])`` samples: its value at the
    window's start, its largest and last values, and growth = largest - start (the soak's flatness target)."""
    if not series or window_s <= 0:
        return None
    t_end = series[-1][0]
    inside = [row for row in series if row[0] >= t_end - window_s - 1e-6]
    if len(inside) < 2:
        return None
    start = inside[0][1]
    return {"seconds": round(inside[-1][0] - inside[0][0]), "from_t": inside[0][0], "start": start,
            "max": max(r[1] for r in inside), "end": inside[-1][1],
            "growth": round(max(r[1] for r in inside) - start, 1)}


def mib_per_request(series: list) -> Optional[float]:
    """Least-squares slope of RSS against requests served, over a series of ``(t, rss, served)``."""
    xs = np.array([r[2] for r in series if len(r) > 2], float)
    ys = np.array([r[1] for r in series if len(r) > 2], float)
    if len(xs) < 3 or np.ptp(xs) == 0:
        return None
    return round(float(np.polyfit(xs, ys, 1)[0]), 3)


def soak(clients: int, seconds: float, checkpoint_dir: str, concurrency: int = 2, seed: int = 0,
         warmup_seconds: float = 60.0, sample_every: float = 30.0, window_s: float = 0.0,
         wrap: Sequence[str] = (), env: Optional[dict] = None) -> dict:
    """Start the app, warm it up (one request of each kind, then ``warmup_seconds`` of the full load), run the
    clients, report. The RSS series has a sample every ``sample_every`` seconds: (seconds, MiB, requests served)."""
    from gradio_client import Client

    with tempfile.TemporaryDirectory() as tmp:
        media = make_media(Path(tmp))
        port = free_port()
        t0 = time.time()
        proc = start_server(checkpoint_dir, port, concurrency, wrap=wrap, env=env)
        url = f"http://127.0.0.1:{port}/"
        try:
            started_s = time.time() - t0
            rss_started = rss_mb(proc.pid)
            warm = Client(url, verbose=False)
            for kind, _ in MIX:
                request(warm, kind, media, random.Random(seed))
            rss_first = rss_mb(proc.pid)
            warmup = run_clients(url, clients, warmup_seconds, media, seed + 1000) if warmup_seconds > 0 else None
            rss_start = rss_mb(proc.pid)
            served = [0]
            peak, series = [rss_start], [(0.0, round(rss_start, 1), 0)]
            done = threading.Event()
            t_series = time.time()

            def sample() -> None:
                while not done.wait(0.5):
                    peak.append(rss_mb(proc.pid))
                    if time.time() - t_series >= sample_every * len(series):
                        series.append((round(time.time() - t_series), round(peak[-1], 1), served[0]))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t = time.time()
            report = run_clients(url, clients, seconds, media, seed, served)
            wall = time.time() - t
            done.set()
            sampler.join()
            series.append((round(time.time() - t_series), round(rss_mb(proc.pid), 1), served[0]))
            alive = proc.poll() is None and request(warm, "photo", media, random.Random(seed)) is not None
            report.update({
                "clients": clients, "seconds": round(wall, 1), "concurrency": concurrency,
                "checkpoint_dir": checkpoint_dir, "server_start_s": round(started_s, 1),
                "server": " ".join([*wrap, "app.py"]), "server_env": env or {},
                "throughput_per_s": round(report["served"] / wall, 2),
                "rss_mb": {"started": round(rss_started, 1), "after_first_requests": round(rss_first, 1),
                           "start": round(rss_start, 1), "end": round(rss_mb(proc.pid), 1),
                           "max": round(max(peak), 1), "mib_per_request": mib_per_request(series),
                           "last_window": window_growth(series, window_s), "series": series},
                "warmup": {"seconds": warmup_seconds, "served": warmup["served"] if warmup else 0,
                           "errors": warmup["errors"] if warmup else 0},
                "serving_after": bool(alive),
                "server_log_tail": server_log(proc) if report["errors"] else "",
                "load_average": [round(x, 2) for x in os.getloadavg()],
            })
            return report
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def write_report(report: dict, out: Optional[str]) -> int:
    """Print the report (JSON), also write it to ``out``; the exit status: 0 when ``report["ok"]``."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return 0 if report["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--checkpoint-dir", default=str(ROOT / "checkpoints"))
    ap.add_argument("--concurrency", type=int, default=2, help="the app's --concurrency")
    ap.add_argument("--rss-bound-mb", type=float, default=300, help="allowed RSS growth from start to end")
    ap.add_argument("--warmup-seconds", type=float, default=60, help="load before the RSS start is taken")
    ap.add_argument("--sample-every", type=float, default=30, help="seconds between RSS samples in the series")
    ap.add_argument("--window-seconds", type=float, default=None,
                    help="the flatness window at the end (default: 1200 s, or 2/3 of a shorter run)")
    ap.add_argument("--window-bound-mb", type=float, default=50, help="allowed RSS growth within the window")
    ap.add_argument("--server-wrap", default="", help="e.g. 'scripts/memtrace.py --out DIR --' (run before app.py)")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the server (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the report here (JSON)")
    args = ap.parse_args(argv)
    window = args.window_seconds if args.window_seconds is not None else min(1200.0, args.seconds * 2 / 3)
    env = dict(kv.split("=", 1) for kv in args.server_env)
    report = soak(args.clients, args.seconds, args.checkpoint_dir, args.concurrency, args.seed, args.warmup_seconds,
                  args.sample_every, window, shlex.split(args.server_wrap), env)
    report["rss_bound_mb"] = args.rss_bound_mb
    report["window_bound_mb"] = args.window_bound_mb
    last = report["rss_mb"]["last_window"]
    report["ok"] = (report["errors"] == 0 and report["warmup"]["errors"] == 0 and report["serving_after"]
                    and report["rss_mb"]["end"] - report["rss_mb"]["start"] <= args.rss_bound_mb
                    and (last is None or last["growth"] <= args.window_bound_mb))
    return write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
