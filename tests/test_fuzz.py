"""Property-based fuzzing (hypothesis) of every decode path: image bytes and arrays, video files, and the
arguments of the app's endpoints through gradio_client.

Inputs are valid files of every supported format mutated by bit flips, truncation, insertions, deletions and
overwrites (structure-aware enough to get past the format sniffing), or arbitrary arrays and argument values.
The property everywhere: a result of the documented shape, or a clear :class:`InputError` (in the app, a message
that is not the catch-all for unexpected exceptions), within time and memory bounds.

The CI run is bounded (about a minute on 2 slow cores, deterministic: ``derandomize``); ``FER_FUZZ_SCALE=20``
multiplies every example budget and draws fresh random examples (the long run in docs/reliability.md). Counts of
examples tried go to ``test-artifacts/fuzz_counts.json``.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from fer_models.pipeline import InputError, load_image  # noqa: E402
from fer_models.pipeline.video import iter_frames, probe_video, read_frame_at  # noqa: E402

from media import astronaut_face, make_video  # noqa: E402
from served import UNEXPECTED, PeakMemory, call_image, serve, tiny_predictor  # noqa: E402

FUZZ_SCALE = float(os.environ.get("FER_FUZZ_SCALE", "1"))
PEAK_MB = 512  # extra resident memory allowed while one fuzzed input is decoded (docs/reliability.md)
SECONDS = 20.0  # per input, on a shared 2-core machine
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
COUNTS: Counter = Counter()
MESSAGES: Counter = Counter()  # the app's refusals, for reading: each must be a clear message


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * FUZZ_SCALE)), deadline=None, database=None,
                    derandomize=FUZZ_SCALE <= 1, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz_counts.json").write_text(json.dumps(
        {"scale": FUZZ_SCALE, "counts": COUNTS, "app_messages": MESSAGES.most_common()}, indent=1))


def _encode(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(astronaut_face(64)[:64]).save(buf, format=fmt, **kw)
    return buf.getvalue()


IMAGE_SEEDS = {
    "jpeg": _encode("JPEG", quality=80), "progressive": _encode("JPEG", progressive=True), "png": _encode("PNG"),
    "webp": _encode("WEBP"), "lossless_webp": _encode("WEBP", lossless=True), "gif": _encode("GIF"),
    "tiff": _encode("TIFF"), "tiff_lzw": _encode("TIFF", compression="tiff_lzw"), "bmp": _encode("BMP"),
}


@st.composite
def mutated(draw, seeds: dict[str, bytes], keep: int = 8):
    """A seed file with up to 8 random edits after its first ``keep`` bytes (so the format is still sniffed)."""
    data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "splice"]))
        if len(data) <= keep + 1:
            break
        i = draw(st.integers(keep, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 64))]
        elif op == "overwrite":  # often a size or count field: 0, small, or all ones
            chunk = draw(st.sampled_from([b"\0\0\0\0", b"\xff\xff\xff\xff", b"\x7f\xff", b"\0\x01"]))
            data[i:i + len(chunk)] = chunk
        else:  # duplicate a slice of the file elsewhere
            j = draw(st.integers(keep, len(data) - 1))
            data[i:i] = data[j:j + draw(st.integers(1, 256))]
    return bytes(data)


def _bounded(fn, *args):
    """``fn(*args)``, checked against the time and memory bounds; returns its result or the InputError."""
    with PeakMemory() as peak:
        t = time.perf_counter()
        try:
            out = fn(*args)
        except InputError as e:
            assert str(e) and len(str(e)) < 600
            out = e
        seconds = time.perf_counter() - t
    assert seconds < SECONDS, f"{seconds:.1f} s"
    assert peak.growth_mb is None or peak.growth_mb < PEAK_MB, f"{peak.growth_mb:.0f} MiB"
    return out


def _check_loaded(out, tag: str) -> None:
    COUNTS[f"{tag}:{'refused' if isinstance(out, InputError) else 'read'}"] += 1
    if not isinstance(out, InputError):
        px = out.pixels
        assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[2] == 3 and 1 <= max(px.shape[:2]) <= 4096


@fuzz_settings(300)
@given(data=mutated(IMAGE_SEEDS))
def test_fuzz_image_bytes(data):
    _check_loaded(_bounded(load_image, data), "image_bytes")


@fuzz_settings(100)
@given(data=st.binary(max_size=2048) | st.sampled_from(sorted(IMAGE_SEEDS)).map(lambda k: IMAGE_SEEDS[k][:12]))
@example(data=b"\x89PNG\r\n\x1a\n\x00\x00\x00\x00IHDR\x00\x00")  # found by the long run: Pillow's ValueError
@example(data=b"\x01\xda\x07\x07\x00\x00" + bytes(600))  # found by the long run: SGI, KeyError/ValueError
def test_fuzz_image_arbitrary_bytes(data):
    _check_loaded(_bounded(load_image, data), "image_random_bytes")


@fuzz_settings(150)
@given(a=hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64, np.bool_]),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=40),
    elements=None))
def test_fuzz_image_arrays(a):
    _check_loaded(_bounded(load_image, a), "image_array")


@pytest.fixture(scope="module")
def video_seeds(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("seeds")
    return {
        "mp4": Path(make_video(d / "a.mp4", seconds=1.0, fps=10, size=(240, 180))).read_bytes(),
        "webm": Path(make_video(d / "a.webm", seconds=1.0, fps=10, size=(240, 180), codec="libvpx",
                                container="webm")).read_bytes(),
        "mkv_mpeg4": Path(make_video(d / "a.mkv", seconds=1.0, fps=10, size=(240, 180), codec="mpeg4",
                                     container="matroska")).read_bytes(),
    }


def _read_video(path: str, time_s: float):
    info = probe_video(path)
    frames = [rgb.shape for _, _, rgb in iter_frames(path, 5.0, 3.0, [])]
    assert all(len(s) == 3 and s[2] == 3 for s in frames)
    if frames:
        t, rgb = read_frame_at(path, time_s)
        assert rgb.ndim == 3 and math.isfinite(t)
    return info


def test_fuzz_video_files(video_seeds, tmp_path):
    @fuzz_settings(80)
    @given(data=st.data(), time_s=st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 2))
    def run(data, time_s):
        path = tmp_path / "fuzzed.mp4"
        path.write_bytes(data.draw(mutated(video_seeds, keep=12)))
        out = _bounded(_read_video, str(path), time_s)
        COUNTS[f"video:{'refused' if isinstance(out, InputError) else 'read'}"] += 1

    run()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from gradio_client import Client

    pytest.importorskip("explain", reason="explain/ is needed by the app")
    with serve(tiny_predictor(tmp_path_factory.mktemp("ckpt"))) as url:
        yield Client(url, verbose=False)


@pytest.fixture(scope="module")
def media_files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(astronaut_face(96)).save(d / "face.png")
    return {"face": str(d / "face.png"), "video": make_video(d / "clip.mp4", seconds=1.0, fps=5, size=(240, 180))}


JUNK = st.text(max_size=30) | st.sampled_from(["", "../../etc/passwd", "<script>", "None", "-1", "7", "1e309"])
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**6, 10**6) | st.just(None)


def mostly(valid: list, junk=JUNK):
    """Valid choices three times in four (so most calls get past Gradio's own validation into the app), else junk."""
    return st.one_of(*[st.sampled_from(valid)] * 3, junk)


def _call(fn) -> str:
    """Run one API call; '' if it succeeded, else its error message, which must be a clear one."""
    try:
        fn()
        return ""
    except Exception as e:  # gradio_client raises AppError with the app's message
        msg = str(e)
        assert msg and UNEXPECTED not in msg and "Traceback" not in msg, msg
        MESSAGES[msg[:160]] += 1
        return msg


def test_fuzz_endpoint_arguments(client, media_files):
    """Every argument of the three analysis endpoints: choices, junk strings, odd numbers, None."""
    from gradio_client import handle_file

    @fuzz_settings(12)
    @given(detector=mostly(["mtcnn", "haar"]), tta=st.booleans(),
           method=mostly(["gradcam", "gradcam++", "hirescam", "layercam", "eigencam"]),
           target=mostly(["predicted class", "happy", "surprise"]), whole=st.booleans())
    def image_args(detector, tta, method, target, whole):
        msg = _call(lambda: call_image(client, media_files["face"], detector, tta, method, target, whole))
        COUNTS[f"endpoint_image:{'refused' if msg else 'served'}"] += 1

    @fuzz_settings(8)
    @given(fps=mostly([1, 2.5, 10], FLOATS), detector=mostly(["mtcnn", "haar"]), tta=st.booleans())
    def video_args(fps, detector, tta):
        msg = _call(lambda: client.predict(handle_file(media_files["video"]), fps, detector, tta,
                                           api_name="/analyze_video"))
        COUNTS[f"endpoint_video:{'refused' if msg else 'served'}"] += 1

    @fuzz_settings(8)
    @given(time_s=mostly([0, 0.5, 59.9], FLOATS), method=mostly(["gradcam", "eigencam"]),
           target=mostly(["predicted class", "sad"]))
    def frame_args(time_s, method, target):
        msg = _call(lambda: client.predict(handle_file(media_files["video"]), time_s, "haar", method, target,
                                           api_name="/explain_video_frame"))
        COUNTS[f"endpoint_frame:{'refused' if msg else 'served'}"] += 1

    image_args()
    video_args()
    frame_args()
    assert call_image(client, media_files["face"], whole=True)[-1]["num_faces"] >= 1  # still serving
