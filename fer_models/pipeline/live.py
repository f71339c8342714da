"""Live webcam analysis: a session's frames -> faces -> the live model -> tracked faces with smoothed probabilities.

Each viewer (a browser tab, or an API client's session) has its own :class:`LiveSession`, which the app keeps in
``gr.State``: an IoU tracker (:class:`~fer_models.pipeline.video.IoUTracker`, the video pipeline's) gives each face
an id across frames, and a :class:`~fer_models.pipeline.smoothing.TrackSmoother` averages each id's probabilities
over time (time constant ``DEFAULT_TIME_CONSTANT_S``; the smoothing module says why). Nothing is shared between
sessions except the loaded models and their measured speed (:class:`LiveModels`).

Latency stays bounded: Gradio's stream event keeps only the newest frame while one is being processed (older ones
are overwritten, never queued), and a session that is still busy when another frame reaches it (two calls of the
API from one session) answers at once with ``dropped=True`` instead of waiting. A pause longer than
``RESET_AFTER_S`` (the camera stopped and restarted, the tab slept) starts the tracks afresh.

Which model runs: ``"fusion"`` (the app's three backbones and their fusion), ``"student"`` (one small network
distilled from the fusion, ``checkpoints/student``), or ``"auto"``: the student when the fusion's measured time
per frame exceeds the frame budget (``DEFAULT_FRAME_BUDGET_S``: 10 frames a second), the fusion otherwise or
when there is no student. Grad-CAM is not computed live; :meth:`LiveSession.last_frame` keeps the newest frame
for an on-demand explanation with the fusion.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import cv2
import numpy as np

from .errors import InputError, ModelLoadError
from .faces import FaceBox, FaceDetector
from .images import load_image
from .loading import DEFAULT_CHECKPOINT_DIR
from .predictor import NO_FACE_NOTE, FacePredictor, get_predictor
from .results import class_color, draw_boxes
from .smoothing import DEFAULT_TIME_CONSTANT_S, TrackSmoother, check_time_constant
from .video import IoUTracker

log = logging.getLogger(__name__)

LIVE_MODELS = ("auto", "student", "fusion")
ENV_STUDENT_DIR = "FER_STUDENT_DIR"
DEFAULT_FRAME_BUDGET_S = 0.1  # 10 frames a second, the target
MEASURE_FRAMES = 3  # frames with faces the fusion runs in "auto" before its speed decides
RESET_AFTER_S = 2.0  # a longer pause between frames starts new tracks
NOTICE_S = 3.0  # how long a one-off notice (the restart) stays in the frames' notes, so that a viewer can read it
LIVE_MAX_SIDE = 960  # frames are analysed (and sent back) at most this long on their longer side
STUDENT_RETRY_S = 30.0  # a missing student checkpoint is looked for again after this long (it may land later)
JPEG_QUALITY = 92  # the newest frame is kept JPEG-encoded (about 50 KB, not 1-3 MB) for Grad-CAM on demand


def default_student_dir(checkpoint_dir: Union[str, Path, None] = None) -> str:
    """``$FER_STUDENT_DIR``, else ``<checkpoint_dir>/student`` (``checkpoints/student``)."""
    env = os.environ.get(ENV_STUDENT_DIR)
    if env:
        return env
    return str(Path(checkpoint_dir or DEFAULT_CHECKPOINT_DIR) / "student")


@dataclass
class LiveModel:
    name: str  # "fusion" or "student"
    predictor: FacePredictor
    reason: str  # why this one is live, in words for the UI


class _Speed:
    """Exponential moving average of a model's seconds per frame (frames with faces only)."""

    def __init__(self, weight: float = 0.3):
        self.weight, self.n, self.seconds = weight, 0, 0.0

    def add(self, seconds: float) -> None:
        self.seconds = seconds if self.n == 0 else self.seconds + self.weight * (seconds - self.seconds)
        self.n += 1


class LiveModels:
    """The models live mode can run, loaded on first use and shared by all sessions, and their measured speed.

    ``fusion``: a callable returning the app's predictor (e.g. ``PredictorHolder.get``). ``student``: a callable
    returning the student's predictor, or None to load ``student_dir`` with :func:`get_predictor` (a missing
    checkpoint is looked for again every ``STUDENT_RETRY_S`` seconds)."""

    def __init__(self, fusion: Callable[[], FacePredictor], *, student: Optional[Callable[[], FacePredictor]] = None,
                 student_dir: Union[str, Path, None] = None, device: Optional[str] = None,
                 frame_budget_s: float = DEFAULT_FRAME_BUDGET_S):
        self._fusion = fusion
        self._student_fn = student
        self.student_dir = str(student_dir) if student_dir is not None else default_student_dir()
        self.device = device
        self.frame_budget_s = frame_budget_s
        self._student: Optional[FacePredictor] = None
        self._student_error: Optional[str] = None
        self._student_tried = -math.inf
        self._lock = threading.Lock()
        self._speed = {"fusion": _Speed(), "student": _Speed()}

    def fusion(self) -> FacePredictor:
        return self._fusion()

    def student(self) -> Optional[FacePredictor]:
        """The student's predictor, or None (``student_error`` says why)."""
        with self._lock:
            if self._student is None and time.monotonic() - self._student_tried >= STUDENT_RETRY_S:
                self._student_tried = time.monotonic()
                try:
                    if self._student_fn is not None:
                        self._student = self._student_fn()
                    else:  # "" as the repo: never the Hub repo that $FER_MODEL_REPO names for the fusion
                        self._student = get_predictor("", self.student_dir, device=self.device)
                    self._student_error = None
                except ModelLoadError as e:
                    self._student_error = str(e)
                except Exception as e:  # noqa: BLE001 - a broken student must not stop live mode
                    log.exception("loading the live student model from %s", self.student_dir)
                    self._student_error = f"{type(e).__name__}: {e}"
            return self._student

    @property
    def student_error(self) -> Optional[str]:
        return self._student_error

    def record(self, name: str, seconds: float) -> None:
        """A frame with faces took ``seconds`` on model ``name`` (detection included)."""
        with self._lock:
            self._speed[name].add(seconds)

    def speed_ms(self, name: str) -> Optional[float]:
        s = self._speed[name]
        return s.seconds * 1000 if s.n else None

    def pick(self, choice: Optional[str] = "auto") -> LiveModel:
        """The model to run for ``choice`` (``auto``, ``student`` or ``fusion``) and why, in words."""
        choice = (choice or "auto").strip().lower()
        if choice not in LIVE_MODELS:
            raise InputError(f"Unknown live model {choice!r}: choose one of {', '.join(LIVE_MODELS)}.")
        budget_ms = self.frame_budget_s * 1000
        if choice == "fusion":
            return LiveModel("fusion", self.fusion(), "chosen")
        student = self.student()
        if choice == "student":
            if student is None:
                return LiveModel("fusion", self.fusion(),
                                 f"the student model is not available ({self._student_error}); the fusion runs instead")
            return LiveModel("student", student, "chosen")
        if student is None:
            return LiveModel("fusion", self.fusion(), "auto: there is no student model")
        fusion_ms, n = self.speed_ms("fusion"), self._speed["fusion"].n
        if n < MEASURE_FRAMES:
            try:
                return LiveModel("fusion", self.fusion(), f"auto: timing the fusion ({n}/{MEASURE_FRAMES} frames)")
            except ModelLoadError as e:
                return LiveModel("student", student, f"auto: the fusion cannot be loaded ({e})")
        if fusion_ms <= budget_ms:
            return LiveModel("fusion", self.fusion(),
                             f"auto: the fusion takes {fusion_ms:.0f} ms a frame, within the {budget_ms:.0f} ms budget")
        return LiveModel("student", student,
                         f"auto: the fusion takes {fusion_ms:.0f} ms a frame, over the {budget_ms:.0f} ms budget "
                         f"of {1 / self.frame_budget_s:g} frames/s")


@dataclass
class LiveFace:
    track_id: int
    box: FaceBox
    label: str  # the smoothed top class (the frame's own when smoothing is off)
    confidence: float
    smoothed: dict[str, float]  # the track's probabilities averaged over time
    probs: dict[str, float]  # this frame's fused probabilities
    raw_label: str

    def to_dict(self) -> dict:
        return {"track_id": self.track_id, "box": self.box.to_dict(), "label": self.label,
                "confidence": round(self.confidence, 6), "raw_label": self.raw_label,
                "smoothed": {k: round(v, 6) for k, v in self.smoothed.items()},
                "probs": {k: round(v, 6) for k, v in self.probs.items()}}


@dataclass
class LiveFrame:
    """One frame's answer. ``annotated`` is None when there was no usable frame or it was dropped."""

    annotated: Optional[np.ndarray]
    faces: list[LiveFace] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    model: str = ""  # "fusion" / "student"; "" when no model ran
    model_reason: str = ""
    model_source: str = ""
    time_constant_s: float = DEFAULT_TIME_CONSTANT_S
    latency_ms: float = 0.0  # this frame, server side: reading, detection, the model, drawing
    fps: float = 0.0  # frames processed per second by this session lately
    frames: int = 0  # frames processed by this session since its last reset
    dropped: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        size = None if self.annotated is None else [int(self.annotated.shape[1]), int(self.annotated.shape[0])]
        return {"model": self.model, "model_reason": self.model_reason, "model_source": self.model_source,
                "smoothing_s": self.time_constant_s, "latency_ms": round(self.latency_ms, 1),
                "fps": round(self.fps, 2), "frames": self.frames, "dropped": self.dropped, "size": size,
                "class_names": self.class_names, "faces": [f.to_dict() for f in self.faces], "notes": self.notes}


class LiveSession:
    """One viewer's live state: tracker, smoother, recent timings and the newest frame. Thread-safe; a call made
    while another is running returns at once with ``dropped=True``."""

    def __init__(self, time_constant_s: float = DEFAULT_TIME_CONSTANT_S, *, reset_after_s: float = RESET_AFTER_S,
                 max_side: int = LIVE_MAX_SIDE):
        self.reset_after_s, self.max_side = reset_after_s, max_side
        self._busy = threading.Lock()
        self.time_constant_s = check_time_constant(time_constant_s)
        self.dropped = 0
        self._frame_jpeg: Optional[bytes] = None
        self._notice: tuple[str, float] = ("", -math.inf)  # (text, shown until)
        self.reset()

    def reset(self) -> None:
        """Forget the tracks (new ids from 1) and the timings; the newest frame is kept for Grad-CAM."""
        self.tracker = IoUTracker(max_age=15)
        self.smoother = TrackSmoother(self.time_constant_s, forget_after_s=max(5.0, 5 * self.time_constant_s))
        self._class_names: Optional[list[str]] = None
        self._times: deque[float] = deque(maxlen=30)
        self.last_t: Optional[float] = None
        self.frames = 0

    def release(self) -> None:
        """Free what the session holds (called when the app drops the session's state)."""
        self._frame_jpeg = None
        self.reset()

    def last_frame(self) -> Optional[np.ndarray]:
        """The newest frame analysed (RGB, as analysed), for an explanation on demand; None before the first."""
        data = self._frame_jpeg
        if data is None:
            return None
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def fps(self) -> float:
        t = self._times
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) >= 2 and t[-1] > t[0] else 0.0

    def process(self, frame: Any, models: LiveModels, *, model: Optional[str] = "auto",
                time_constant_s: Optional[float] = DEFAULT_TIME_CONSTANT_S,
                detector: Union[str, FaceDetector, None] = None, now: Optional[float] = None) -> LiveFrame:
        """Analyse one frame (an RGB array, any image the loader reads, None, or an exception standing for a frame
        that could not be decoded). Problems with the frame come back as notes, never raised; a model that cannot
        be loaded raises :class:`ModelLoadError`."""
        if not self._busy.acquire(blocking=False):
            self.dropped += 1
            return LiveFrame(None, dropped=True, time_constant_s=self.time_constant_s, fps=self.fps(),
                             frames=self.frames, notes=["Still analysing the previous frame: this one was dropped."])
        try:
            return self._process(frame, models, model, time_constant_s, detector, now)
        finally:
            self._busy.release()

    def _process(self, frame, models, model, time_constant_s, detector, now) -> LiveFrame:
        t0 = time.perf_counter()
        now = time.monotonic() if now is None else now
        tau = check_time_constant(time_constant_s)
        if tau != self.time_constant_s:
            self.time_constant_s = self.smoother.time_constant_s = tau
        notes: list[str] = []
        if isinstance(frame, BaseException):
            return self._note(f"This camera frame could not be read ({frame}); waiting for the next one.")
        if frame is None:
            return self._note("Waiting for the camera: start it with the button on the webcam panel.")
        if self.last_t is not None and now - self.last_t > self.reset_after_s:
            self._notice = (f"The stream paused for {now - self.last_t:.1f} s: faces are tracked afresh.",
                            now + NOTICE_S)
            self.reset()
        if now <= self._notice[1]:
            notes.append(self._notice[0])
        try:
            loaded = load_image(frame, max_side=self.max_side)
        except InputError as e:
            return self._note(f"This camera frame could not be used: {e}")
        rgb = loaded.pixels
        notes += loaded.notes
        live = models.pick(model)
        pred = live.predictor
        if self._class_names != pred.class_names:  # another model with other classes: start the averages over
            self.smoother.reset()
            self._class_names = list(pred.class_names)
        t_model = time.perf_counter()
        analysis = pred.analyze_array(rgb, detector=detector)
        if analysis.faces:
            models.record(live.name, time.perf_counter() - t_model)
        notes += analysis.notes
        ids = self.tracker.update([f.box for f in analysis.faces])
        names = list(pred.class_names)
        raw = np.array([[f.probs[c] for c in names] for f in analysis.faces]).reshape(-1, len(names))
        smoothed = self.smoother.update_frame(ids, now, raw)
        self.smoother.prune(now, keep=ids)
        faces = []
        for tid, f, s in zip(ids, analysis.faces, smoothed):
            i = int(np.argmax(s))
            faces.append(LiveFace(tid, f.box, names[i], float(s[i]), {c: float(v) for c, v in zip(names, s)},
                                  dict(f.probs), f.label))
        annotated = draw_boxes(rgb, [(f.box, f"ID{f.track_id} {f.label} {f.confidence:.0%}", class_color(f.label))
                                     for f in faces])
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if ok:
            self._frame_jpeg = jpeg.tobytes()
        self.last_t = now + (time.perf_counter() - t0)  # a pause is counted from the end of this frame's work
        self.frames += 1
        self._times.append(now)
        return LiveFrame(annotated, faces, names, live.name, live.reason, pred.source.describe(),
                         self.time_constant_s, (time.perf_counter() - t0) * 1000, self.fps(), self.frames,
                         notes=[n for n in notes if n != NO_FACE_NOTE])  # it speaks of the photo tab's tick box

    def _note(self, text: str) -> LiveFrame:
        return LiveFrame(None, time_constant_s=self.time_constant_s, fps=self.fps(), frames=self.frames, notes=[text])
