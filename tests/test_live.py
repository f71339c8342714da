"""Live mode and temporal smoothing: the smoother's maths, a live session's tracking, smoothing, bad frames, pauses
and dropped frames, the model choice (auto / student / fusion), smoothing in the video pipeline and batch analysis,
and the app's live endpoints through gradio_client. Tiny registered models, synthetic frames, no datasets."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest

import fer_models as fm
from fer_models.pipeline import FacePredictor, InputError
from fer_models.pipeline.live import MEASURE_FRAMES, LiveModels, LiveSession
from fer_models.pipeline.smoothing import (
    TrackSmoother, check_time_constant, ema_weight, smooth_series, smoothed_columns,
)
from tests.media import astronaut_face, make_video


DET = "mtcnn"  # face counts below are this detector's on these frames


def frame_with_face(w: int = 320, h: int = 240, face: int = 140, x=90) -> np.ndarray:
    """A grey frame with the astronaut's face at each of ``x`` (one position or several)."""
    f = astronaut_face(face)
    out = np.full((h, w, 3), 100, np.uint8)
    y = (h - f.shape[0]) // 2
    for x0 in np.atleast_1d(x):
        out[y:y + f.shape[0], x0:x0 + face] = f
    return out


@pytest.fixture(scope="module")
def fusion() -> FacePredictor:
    return FacePredictor(fm.create_model("fusion_tiny").eval())


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("student")
    fm.create_model("resnet_tiny").save_pretrained(d)
    return d


@pytest.fixture
def models(fusion, student_dir) -> LiveModels:
    return LiveModels(lambda: fusion, student_dir=student_dir, device="cpu")


# --- smoothing -----------------------------------------------------------------------------------------------------
def test_ema_step_response_follows_the_time_constant_at_any_frame_rate():
    step = np.array([[1.0, 0.0]] + [[0.0, 1.0]] * 40)
    for fps in (4, 10, 30):
        t = np.arange(len(step)) / fps
        s = smooth_series(t, step, time_constant_s=0.5)
        at = int(round(0.5 * fps))  # 0.5 s after the last frame before the change (frame 0, t = 0)
        assert s[at, 1] == pytest.approx(1 - math.exp(-1), abs=1e-9)
        np.testing.assert_allclose(s.sum(1), 1.0)  # still probabilities
        assert np.all(np.diff(s[:, 1]) >= 0)
    np.testing.assert_array_equal(smooth_series(np.arange(5.0), step[:5], 0), step[:5])  # 0: off


def test_time_constant_checks_and_weights():
    assert check_time_constant(None) == 0.0
    for bad in (-1, float("nan"), 1e9, "soon"):
        with pytest.raises(InputError):
            check_time_constant(bad)
    assert ema_weight(0.1, 0) == 1.0
    assert ema_weight(0.0, 0.5) == 0.0 and ema_weight(-3, 0.5) == 0.0  # same instant, clock went back
    assert ema_weight(100, 0.5) == pytest.approx(1.0)  # a long gap: the new frame replaces the average


def test_track_smoother_keeps_tracks_apart_and_forgets_old_ones():
    sm = TrackSmoother(1.0, forget_after_s=5)
    a = sm.update(1, 0.0, [1, 0])
    b = sm.update(2, 0.0, [0, 1])
    np.testing.assert_array_equal(a, [1, 0])
    np.testing.assert_array_equal(b, [0, 1])
    out = sm.update_frame([1, 2], 1.0, np.array([[0, 1], [0, 1]]))
    assert out[0, 1] == pytest.approx(1 - math.exp(-1)) and out[1, 1] == pytest.approx(1.0)
    sm.prune(10.0, keep=[2])
    assert len(sm) == 1
    np.testing.assert_array_equal(sm.update(1, 10.0, [0.5, 0.5]), [0.5, 0.5])  # forgotten: starts afresh
    assert smoothed_columns(["a", "b"]) == ["smooth_label", "smooth_confidence", "smooth_p_a", "smooth_p_b"]


# --- a live session -------------------------------------------------------------------------------------------------
def test_session_tracks_annotates_and_smooths(models):
    s = LiveSession(0.5)
    f1 = s.process(frame_with_face(), models, model="fusion", detector=DET, now=0.0)
    assert f1.annotated is not None and f1.annotated.shape == (240, 320, 3)
    assert f1.model == "fusion" and f1.model_reason == "chosen" and len(f1.faces) == 1
    face = f1.faces[0]
    assert face.track_id == 1 and face.smoothed == pytest.approx(face.probs)  # the first frame is its own average
    assert not np.array_equal(f1.annotated, frame_with_face())  # the box is drawn
    # The face moves a little and looks different (mirrored): same track, average between the two frames.
    f2 = s.process(frame_with_face(x=100)[:, ::-1], models, model="fusion", detector=DET, now=0.1)
    assert [f.track_id for f in f2.faces] == [1]
    sm, raw, before = f2.faces[0].smoothed, f2.faces[0].probs, face.smoothed
    w = 1 - math.exp(-0.1 / 0.5)
    for c in raw:
        assert sm[c] == pytest.approx(before[c] + w * (raw[c] - before[c]), abs=1e-6)
    assert sum(sm.values()) == pytest.approx(1.0)
    assert f2.frames == 2 and f2.fps == pytest.approx(10.0)
    d = f2.to_dict()
    assert d["faces"][0]["track_id"] == 1 and d["model"] == "fusion" and d["size"] == [320, 240]
    assert s.last_frame().shape == (240, 320, 3)  # kept for Grad-CAM on demand


def test_session_without_smoothing_shows_each_frames_own_label(models):
    s = LiveSession(0.0)
    s.process(frame_with_face(), models, model="fusion", detector=DET, time_constant_s=0, now=0.0)
    f = s.process(frame_with_face()[:, ::-1], models, model="fusion", detector=DET, time_constant_s=0, now=0.1).faces[0]
    assert f.smoothed == pytest.approx(f.probs) and f.label == f.raw_label


@pytest.mark.parametrize("frame, says", [
    (None, "Waiting for the camera"),
    (InputError("bad base64"), "could not be read"),
    (np.zeros((0, 0, 3), np.uint8), "could not be used"),
    (np.zeros((4, 4, 2), np.uint8), "could not be used"),
    (np.zeros((1, 1, 3), np.uint8), "too small"),
    ("/no/such/frame.jpg", "could not be used"),
    (b"not an image", "could not be used"),
])
def test_bad_frames_give_a_message_not_an_error(models, frame, says):
    out = LiveSession().process(frame, models, model="fusion", detector=DET, now=0.0)
    assert not out.faces and not out.dropped
    assert any(says in n for n in out.notes), out.notes


@pytest.mark.parametrize("frame", [
    np.random.default_rng(0).random((120, 160, 3)),  # float in [0, 1]
    np.full((90, 120), 40000, np.uint16),  # grey, 16-bit
    np.zeros((60, 80, 4), np.uint8),  # RGBA
    np.ones((50, 70, 3), bool),
    np.zeros((3000, 4000, 3), np.uint8),  # larger than a camera sends: analysed at LIVE_MAX_SIDE
])
def test_odd_frames_are_analysed(models, frame):
    out = LiveSession().process(frame, models, model="fusion", detector=DET, now=0.0)
    assert out.annotated is not None and out.annotated.dtype == np.uint8 and max(out.annotated.shape) <= 960


def test_a_pause_restarts_the_tracks_and_sessions_are_independent(models):
    a, b = LiveSession(), LiveSession()

    def ids(session, frame, t):
        out = session.process(frame, models, model="fusion", detector=DET, now=t)
        return [f.track_id for f in out.faces], out.notes

    for t in (0.0, 0.1, 0.2):
        two, _ = ids(a, frame_with_face(480, x=[20, 320]), t)
    assert two == [1, 2]
    right = frame_with_face(480, x=320)
    assert ids(b, right, 0.0)[0] == [1]  # another viewer: its own ids
    assert ids(a, right, 0.3)[0] == [2]
    after, notes = ids(a, right, 30.0)  # the camera stopped and came back
    assert after == [1] and any("tracked afresh" in n for n in notes)
    assert a.frames == 1
    assert any("afresh" in n for n in ids(a, right, 31.0)[1])  # the notice stays a while, to be read
    ids(a, right, 32.0)
    assert not any("afresh" in n for n in ids(a, right, 33.1)[1])


def test_a_frame_arriving_while_busy_is_dropped_at_once(models):
    s = LiveSession()
    started, release = threading.Event(), threading.Event()
    slow = LiveModels(lambda: (started.set(), release.wait(10), models.fusion())[2])
    worker = threading.Thread(target=s.process, args=(frame_with_face(), slow), kwargs={"model": "fusion"})
    worker.start()
    try:
        assert started.wait(10)
        out = s.process(frame_with_face(), slow, model="fusion", detector=DET)
        assert out.dropped and out.annotated is None and "dropped" in out.notes[0]
    finally:
        release.set()
        worker.join(10)
    assert s.dropped == 1
    assert not s.process(frame_with_face(), models, model="fusion", detector=DET).dropped  # free again


# --- the model choice -----------------------------------------------------------------------------------------------
def test_student_is_loaded_from_its_folder_and_chosen(models):
    out = LiveSession().process(frame_with_face(), models, model="student", detector=DET, now=0.0)
    assert out.model == "student" and out.model_reason == "chosen"
    assert "resnet_tiny" in out.model_source or "student" in out.model_source
    assert models.student() is models.student()  # loaded once


def test_auto_times_the_fusion_then_keeps_it_or_switches_to_the_student(models):
    first = models.pick("auto")
    assert first.name == "fusion" and "timing" in first.reason
    for _ in range(MEASURE_FRAMES):
        models.record("fusion", 0.5)  # 500 ms a frame: over the 100 ms budget
    slow = models.pick("auto")
    assert slow.name == "student" and "over the 100 ms budget" in slow.reason
    quick = LiveModels(models.fusion, student=models.student, frame_budget_s=1.0)
    for _ in range(MEASURE_FRAMES):
        quick.record("fusion", 0.05)
    assert quick.pick("auto").name == "fusion" and "within" in quick.pick("auto").reason
    with pytest.raises(InputError):
        models.pick("fastest")


def test_without_a_student_the_fusion_runs_and_says_why(fusion, tmp_path):
    models = LiveModels(lambda: fusion, student_dir=tmp_path / "missing")
    assert models.pick("auto").name == "fusion" and "no student" in models.pick("auto").reason
    chosen = models.pick("student")
    assert chosen.name == "fusion" and "not available" in chosen.reason and "missing" in chosen.reason


# --- smoothing in the video pipeline and the batch analysis --------------------------------------------------------
def test_video_analysis_keeps_raw_and_smoothed_series(fusion, tmp_path):
    from fer_models.pipeline.video import analyze_video

    clip = make_video(tmp_path / "clip.mp4", seconds=1.0, fps=10)
    va = analyze_video(fusion, clip, sample_fps=10, smooth_s=0.5)
    assert va.smooth_s == 0.5 and va.tracks
    tid = va.tracks[0].track_id
    t, raw = va.timeline(tid)
    t2, sm = va.timeline(tid, smoothed=True)
    np.testing.assert_array_equal(t, t2)
    np.testing.assert_allclose(sm, smooth_series(t, raw, 0.5), atol=1e-9)
    rows = va.rows()
    assert {"smooth_label", "smooth_p_happy"} <= set(va.columns()) and rows[0]["smooth_p_happy"] is not None
    header = open(va.to_csv(tmp_path / "frames.csv")).readline().strip().split(",")
    assert header == va.columns()
    plain = analyze_video(fusion, clip, sample_fps=10)
    assert "smooth_label" not in plain.columns()
    with pytest.raises(ValueError):
        plain.timeline(tid, smoothed=True)


def test_batch_analysis_smooth_option_adds_columns_and_resumes(fusion, tmp_path):
    from fer_models.pipeline.analyze import analyze

    clip = make_video(tmp_path / "clip.mp4", seconds=1.0, fps=10)
    out = tmp_path / "rows.csv"
    df = analyze([clip], out=out, predictor=fusion, smooth_s=0.5, sample_fps=10, max_seconds=0.45, progress=False)
    assert "smooth_p_neutral" in df.columns and "p_neutral" in df.columns
    faces = df[df["face"].notna()]
    assert faces["smooth_label"].notna().all()
    full = analyze([clip], out=out, predictor=fusion, smooth_s=0.5, sample_fps=10, progress=False)  # resumes
    fresh = analyze([clip], predictor=fusion, smooth_s=0.5, sample_fps=10, progress=False)
    cols = [c for c in full.columns if c.startswith("smooth_p_")]
    np.testing.assert_allclose(full[cols].to_numpy(float), fresh[cols].to_numpy(float), atol=2e-6)
    with pytest.raises(InputError, match="--smooth"):
        analyze([clip], out=out, predictor=fusion, progress=False)  # the file has the smoothed columns


# --- the app's live endpoints -------------------------------------------------------------------------------------
def test_app_live_endpoints_keep_each_clients_session(student_dir, tmp_path, monkeypatch):
    """The named API endpoint (the browser streams through the same handler, tests/test_browser.py): tracks and
    smoothing carry over between one client's calls, not to another client; bad frames give a message; Grad-CAM
    of the newest frame on demand."""
    explain = pytest.importorskip("explain")
    from gradio_client import Client, handle_file
    from PIL import Image

    from tests.served import serve

    monkeypatch.setenv("FER_STUDENT_DIR", str(student_dir))
    model = fm.create_model("fusion_tiny").eval()
    pred = FacePredictor(model, explainer=explain.Explainer(model))
    photo, tiny, broken = tmp_path / "frame.png", tmp_path / "tiny.png", tmp_path / "broken.png"
    Image.fromarray(frame_with_face()).save(photo)
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tiny)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with serve(pred) as url:
        a, b = Client(url, verbose=False), Client(url, verbose=False)
        with pytest.raises(Exception, match="Start the webcam"):
            a.predict("mtcnn", "gradcam", "predicted class", api_name="/explain_live_frame")
        image, info = a.predict(handle_file(str(photo)), "student", 0.5, "mtcnn", api_name="/analyze_live_frame")
        assert image and info["model"] == "student" and [f["track_id"] for f in info["faces"]] == [1]
        _, info = a.predict(handle_file(str(photo)), "fusion", 0.5, "mtcnn", api_name="/analyze_live_frame")
        assert info["model"] == "fusion" and info["frames"] == 2 and info["faces"][0]["track_id"] == 1
        _, other = b.predict(handle_file(str(photo)), "auto", 0, "mtcnn", api_name="/analyze_live_frame")
        assert other["frames"] == 1 and other["smoothing_s"] == 0 and "auto" in other["model_reason"]
        frame, status, *_ = a.predict("mtcnn", "gradcam", "predicted class", api_name="/explain_live_frame")
        assert frame and "1 face" in status, status
        for bad, says in ((tiny, "too small"), (broken, "could not be read")):
            _, info = a.predict(handle_file(str(bad)), "auto", 0.5, "mtcnn", api_name="/analyze_live_frame")
            assert not info["faces"] and any(says in n for n in info["notes"]), info["notes"]
        # The stream event is registered for the browser, with its frame interval and its own queue slots.
        cfg = next(d for d in a.config["dependencies"] if d.get("api_name") == "live_stream")
        assert cfg["connection"] == "stream" and cfg["stream_every"] == pytest.approx(0.1)
