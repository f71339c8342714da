"""The video pipeline: sample frames, find and classify every face, track identities, write a playable video.

Frames are decoded with PyAV (FFmpeg's libraries inside the ``av`` wheel, so no system ffmpeg is needed) and
sampled at up to ``sample_fps``. Faces in consecutive samples are linked by greedy IoU matching with a centre
distance fallback (the "IOU tracker" of Bochinski et al., AVSS 2017, without its score filtering), which is
enough for the few, slowly moving faces of a webcam clip. The annotated video is H.264 in MP4 (yuv420p, even
dimensions, ``faststart``), which every browser plays; OpenCV's pip wheels cannot write H.264.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import cv2
import numpy as np

from .faces import FaceBox, FaceDetector
from .errors import InputError
from .predictor import FacePredictor
from .results import FacePrediction, ImageAnalysis, class_color, draw_boxes, face_row, row_columns
from .smoothing import TrackSmoother, check_time_constant, smoothed_columns, smoothed_fields

log = logging.getLogger(__name__)

MAX_SECONDS = 60.0
DEFAULT_SAMPLE_FPS = 5.0
MAX_OUTPUT_SIDE = 1280

ProgressFn = Callable[[float, str], None]


def _av():
    import av  # imported lazily: only the video pipeline needs it

    return av


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float  # average frame rate of the file (0 if unknown)
    duration: float  # seconds (0 if unknown)
    codec: str
    frame_count: int = 0


def probe_video(path: Union[str, Path]) -> VideoInfo:
    """Size, rate, duration and codec of a video file; :class:`InputError` if it is not a readable video."""
    av = _av()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"Video file not found: {p.name}")
    if p.stat().st_size == 0:
        raise InputError("The video file is empty (0 bytes).")
    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                raise InputError("This file has no video stream.")
            if c.format.name == "image2" or c.format.name.endswith("_pipe"):  # FFmpeg reads stills as 1 frame
                raise InputError("This is a still image, not a video: analyse it in the image tab.")
            s = c.streams.video[0]
            rate = float(s.average_rate or s.guessed_rate or 0)
            if s.duration is not None and s.time_base is not None:
                duration = float(s.duration * s.time_base)
            elif c.duration is not None:
                duration = c.duration / 1_000_000
            else:
                duration = 0.0
            cc = s.codec_context  # None when FFmpeg has no decoder for the stream (a damaged header)
            w, h = (cc.width, cc.height) if cc is not None else (0, 0)
            if not w or not h:
                raise InputError("The video stream has no picture size: the file is probably corrupt.")
            return VideoInfo(int(w), int(h), rate, duration, s.codec_context.name, int(s.frames or 0))
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"This file is not a video that can be read (mp4, webm, mov, avi): {e}") from e


def iter_frames(
    path: Union[str, Path], sample_fps: float = DEFAULT_SAMPLE_FPS, max_seconds: float = MAX_SECONDS,
    notes: Optional[list] = None,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """``(frame_number, time_s, rgb)`` for frames sampled at most ``sample_fps`` times a second, up to
    ``max_seconds``. A stream that breaks off midway ends the iteration (with a note) instead of raising."""
    av = _av()
    step = 1.0 / sample_fps if sample_fps > 0 else 0.0
    next_t = 0.0
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        n = -1
        try:
            for frame in c.decode(stream):
                n += 1
                t = float(frame.time) if frame.time is not None else n / rate
                if t > max_seconds:
                    break
                if t + 1e-6 < next_t:
                    continue
                next_t = (math.floor(t / step + 1e-6) + 1) * step if step else 0.0
                yield n, t, frame.to_ndarray(format="rgb24")
        except av.FFmpegError as e:
            if notes is not None:
                notes.append(f"The video stream is damaged after frame {n}; the rest was skipped ({e}).")
            log.warning("video decode stopped at frame %d: %s", n, e)


def read_frame_at(path: Union[str, Path], time_s: float) -> tuple[float, np.ndarray]:
    """``(actual_time, rgb)`` of the first frame at or after ``time_s`` (the last frame if it is past the end)."""
    av = _av()
    info = probe_video(path)
    if math.isnan(time_s):
        raise InputError("The frame time must be a number of seconds.")
    if info.duration > 0:  # past the end means the last frame; also keeps the seek target within int64
        time_s = min(time_s, info.duration + 1.0)
    last = None
    try:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            if time_s > 0 and stream.time_base:
                try:
                    c.seek(int(time_s / stream.time_base), stream=stream, backward=True, any_frame=False)
                except (av.FFmpegError, OverflowError):
                    pass
            rate = float(stream.average_rate or 25)
            for i, frame in enumerate(c.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / rate
                last = (t, frame)
                if t + 0.5 / rate >= time_s:
                    break
    except av.FFmpegError as e:
        if last is None:
            raise InputError(f"Cannot decode the video: {e}") from e
    if last is None:
        raise InputError("The video has no decodable frames.")
    return last[0], last[1].to_ndarray(format="rgb24")


class IoUTracker:
    """Keeps face identities across frames: greedy matching on IoU, then centre distance, against each track's
    box moved by its last velocity (constant-velocity prediction, so a face panning across the frame keeps its
    identity even when consecutive samples barely overlap)."""

    def __init__(self, iou_threshold: float = 0.3, max_age: int = 10, max_center_dist: float = 1.0):
        self.iou_threshold, self.max_age, self.max_center_dist = iou_threshold, max_age, max_center_dist
        # id -> (last box, samples since seen, velocity in px per sample)
        self._tracks: dict[int, tuple[FaceBox, int, tuple[float, float]]] = {}
        self._next_id = 1

    def seed(self, ids: list[int], boxes: list[FaceBox]) -> None:
        """Start from known tracks (the last analysed frame of an interrupted run), so ids carry on."""
        for tid, b in zip(ids, boxes):
            self._tracks[int(tid)] = (b, 0, (0.0, 0.0))
            self._next_id = max(self._next_id, int(tid) + 1)

    def update(self, boxes: list[FaceBox]) -> list[int]:
        """Track ids for ``boxes`` (in order); unmatched boxes start new tracks."""
        ids = [0] * len(boxes)
        pairs = []
        for tid, (tb, age, (vx, vy)) in self._tracks.items():
            pb = tb.scaled(1.0, vx * (age + 1), vy * (age + 1))  # where the track should be now
            for j, b in enumerate(boxes):
                iou = pb.iou(b)
                (px, py), (bx, by) = pb.center, b.center
                dist = math.hypot(px - bx, py - by) / max(tb.width, tb.height, 1.0)
                if iou >= self.iou_threshold or dist <= self.max_center_dist:
                    pairs.append((iou, -dist, tid, j))
        matched: dict[int, int] = {}
        used_b: set[int] = set()
        for _, _, tid, j in sorted(pairs, reverse=True):
            if tid in matched or j in used_b:
                continue
            matched[tid] = j
            used_b.add(j)
            ids[j] = tid
        for tid in list(self._tracks):
            box, age, v = self._tracks[tid]
            if tid in matched:
                b = boxes[matched[tid]]
                (ox, oy), (nx, ny) = box.center, b.center
                self._tracks[tid] = (b, 0, ((nx - ox) / (age + 1), (ny - oy) / (age + 1)))
            elif age + 1 > self.max_age:
                del self._tracks[tid]
            else:
                self._tracks[tid] = (box, age + 1, v)
        for j, b in enumerate(boxes):
            if ids[j] == 0:
                ids[j] = self._next_id
                self._next_id += 1
                self._tracks[ids[j]] = (b, 0, (0.0, 0.0))
        return ids


class H264Writer:
    """Writes RGB frames to a browser-playable H.264 MP4 with PyAV (frames resized to even dimensions)."""

    def __init__(self, path: Union[str, Path], width: int, height: int, fps: float, crf: int = 23):
        av = _av()
        s = min(1.0, MAX_OUTPUT_SIDE / max(width, height))
        self.size = (max(2, int(width * s) // 2 * 2), max(2, int(height * s) // 2 * 2))
        self._c = av.open(str(path), "w", format="mp4", options={"movflags": "faststart"})
        self._s = self._c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        self._s.width, self._s.height = self.size
        self._s.pix_fmt = "yuv420p"
        self._s.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        av = _av()
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA)
        for packet in self._s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            self._c.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self._s.encode():
            self._c.mux(packet)
        self._c.close()


@dataclass
class TrackedFace:
    track_id: int
    face: FacePrediction  # crop and attention maps are dropped to keep memory bounded
    smoothed: Optional[dict[str, float]] = None  # the track's probabilities smoothed over time (smooth_s > 0)


@dataclass
class FrameResult:
    frame_number: int
    time_s: float
    faces: list[TrackedFace]


@dataclass
class TrackSummary:
    track_id: int
    frames: int
    first_s: float
    last_s: float
    dominant: str  # the class that was the fused top label most often
    share: dict[str, float]  # fraction of the track's frames with each top label
    mean_probs: dict[str, float]


@dataclass
class VideoAnalysis:
    info: VideoInfo
    sample_fps: float
    frames: list[FrameResult]
    tracks: list[TrackSummary]
    class_names: list[str]
    backbones: list[str]
    detector: str
    annotated_path: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    smooth_s: float = 0.0  # time constant of the per-track smoothing (smoothing.py); 0: off

    @property
    def analyzed_seconds(self) -> float:
        return self.frames[-1].time_s if self.frames else 0.0

    def timeline(self, track_id: int, smoothed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(times, probs)`` of one track: T and T x C arrays of fused probabilities, or of their smoothed values
        (``smoothed=True``; only when the clip was analysed with ``smooth_s > 0``)."""
        if smoothed and not self.smooth_s:
            raise ValueError("this clip was analysed without smoothing (smooth_s=0)")
        ts, ps = [], []
        for fr in self.frames:
            for tf in fr.faces:
                if tf.track_id == track_id:
                    ts.append(fr.time_s)
                    probs = tf.smoothed if smoothed else tf.face.probs
                    ps.append([probs[c] for c in self.class_names])
        return np.array(ts), np.array(ps).reshape(len(ts), len(self.class_names))

    def rows(self, file: Optional[str] = None) -> list[dict]:
        """The batch analysis's rows (:func:`~fer_models.pipeline.results.face_row`): one per face per sampled
        frame, one per sampled frame without faces."""
        ctx = {} if file is None else {"file": file}
        out = []
        for fr in self.frames:
            frame = {**ctx, "frame": fr.frame_number, "time_s": round(fr.time_s, 3), "n_faces": len(fr.faces),
                     "width": self.info.width, "height": self.info.height}
            out += [face_row(tf.face, **frame, track_id=tf.track_id, **self._smoothed_fields(tf))
                    for tf in fr.faces] or [face_row(None, **frame)]
        return out

    def _smoothed_fields(self, tf: TrackedFace) -> dict:
        if tf.smoothed is None:
            return {}
        return smoothed_fields(self.class_names, [tf.smoothed[c] for c in self.class_names])

    def columns(self, file: bool = False) -> list[str]:
        """The columns of :meth:`rows`: the batch analysis's, plus the smoothed ones when ``smooth_s > 0``."""
        extra = smoothed_columns(self.class_names) if self.smooth_s else []
        return row_columns(self.class_names, self.backbones, file=file) + extra

    def to_csv(self, path: Union[str, Path]) -> str:
        """:meth:`rows` as CSV, with the batch analysis's columns less ``file`` (docs/analyze.md)."""
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns())
            w.writeheader()
            w.writerows(self.rows())
        return str(path)

    def to_dict(self) -> dict:
        return {
            "video": vars(self.info), "sample_fps": self.sample_fps, "frames_analysed": len(self.frames),
            "detector": self.detector, "class_names": self.class_names, "backbones": self.backbones,
            "tracks": [vars(t) for t in self.tracks], "notes": self.notes,
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
            "smooth_s": self.smooth_s,
        }


def summarise_tracks(frames: list[FrameResult], class_names: list[str]) -> list[TrackSummary]:
    by_track: dict[int, list[tuple[float, FacePrediction]]] = {}
    for fr in frames:
        for tf in fr.faces:
            by_track.setdefault(tf.track_id, []).append((fr.time_s, tf.face))
    out = []
    for tid, items in sorted(by_track.items()):
        labels = [f.label for _, f in items]
        share = {c: labels.count(c) / len(labels) for c in class_names}
        mean = {c: float(np.mean([f.probs[c] for _, f in items])) for c in class_names}
        dominant = max(class_names, key=lambda c: (share[c], mean[c]))
        out.append(TrackSummary(tid, len(items), items[0][0], items[-1][0], dominant, share, mean))
    return out


@dataclass
class AnalysedFrame:
    """One sampled frame through the image pipeline, with the track id of each of its faces (in order)."""

    frame_number: int
    time_s: float
    rgb: np.ndarray
    analysis: ImageAnalysis
    track_ids: list[int]
    smoothed: Optional[np.ndarray] = None  # faces x classes: each track's smoothed probabilities (with a smoother)


def default_tracker(sample_fps: float) -> IoUTracker:
    return IoUTracker(max_age=max(2, int(round(2 * sample_fps))))


def analyze_frames(
    predictor: FacePredictor, path: Union[str, Path], *, sample_fps: float = DEFAULT_SAMPLE_FPS,
    max_seconds: float = MAX_SECONDS, detector: Union[str, FaceDetector, None] = None, batch_size: int = 8,
    tracker: Optional[IoUTracker] = None, after_frame: int = -1, notes: Optional[list[str]] = None,
    smoother: Optional[TrackSmoother] = None, **classify_kw,
) -> Iterator[AnalysedFrame]:
    """The video pipeline shared by :func:`analyze_video` (the app) and ``fer_models.analyze`` (batches):
    frames sampled at ``sample_fps``, faces found frame by frame, the crops of ``batch_size`` frames classified in
    one forward pass, then tracked in frame order. Frames numbered up to ``after_frame`` are decoded but not
    analysed (resuming a run; pass a ``tracker`` seeded with the last analysed frame's faces). With a ``smoother``
    each frame also carries its tracks' probabilities smoothed over time (:mod:`.smoothing`).
    ``classify_kw`` goes to :meth:`FacePredictor.classify` (``tta``, ``explain``, ``cam_method``, ...)."""
    if not 0 < sample_fps <= 30:
        raise InputError(f"Sample rate must be between 0 and 30 frames per second, got {sample_fps}.")
    det = predictor.get_detector(detector)
    tracker = tracker or default_tracker(sample_fps)
    pending: list[tuple[int, float, np.ndarray]] = []
    found = []

    def flush() -> Iterator[AnalysedFrame]:
        for (n, ts, rgb), analysis in zip(pending, predictor.classify(found, **classify_kw)):
            ids = tracker.update([f.box for f in analysis.faces])
            smoothed = None
            if smoother is not None:
                raw = [[f.probs[c] for c in predictor.class_names] for f in analysis.faces]
                smoothed = smoother.update_frame(ids, ts, np.array(raw).reshape(len(raw), len(predictor.class_names)))
            yield AnalysedFrame(n, ts, rgb, analysis, ids, smoothed)
        pending.clear()
        found.clear()

    for n, ts, rgb in iter_frames(path, sample_fps, max_seconds, notes):
        if n <= after_frame:
            continue
        pending.append((n, ts, rgb))
        found.append(predictor.find_faces(rgb, detector=det))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def _shown_label(tf: TrackedFace) -> tuple[str, float]:
    """The label drawn on a face: its track's smoothed top class when smoothing is on, else the frame's own."""
    if tf.smoothed is None:
        return tf.face.label, tf.face.confidence
    label = max(tf.smoothed, key=tf.smoothed.get)
    return label, tf.smoothed[label]


def analyze_video(
    predictor: FacePredictor, path: Union[str, Path], *, sample_fps: float = DEFAULT_SAMPLE_FPS,
    max_seconds: float = MAX_SECONDS, detector: Union[str, FaceDetector, None] = None, tta: bool = False,
    out_path: Union[str, Path, None] = None, progress: Optional[ProgressFn] = None, batch_size: int = 8,
    smooth_s: float = 0.0,
) -> VideoAnalysis:
    """Analyse a clip: faces in frames sampled at ``sample_fps``, tracked across frames, summarised per track.

    Clips longer than ``max_seconds`` are trimmed to their first ``max_seconds`` (with a note). With
    ``out_path`` an annotated H.264 MP4 of the sampled frames is written there. ``progress(fraction, text)``
    is called after each sampled frame (in bursts: ``batch_size`` frames share one forward pass). ``smooth_s``:
    the time constant in seconds of each track's smoothed probabilities (:mod:`.smoothing`; 0: none), kept beside
    the raw ones; the annotated video then shows the smoothed label.
    """
    t0 = time.perf_counter()
    smooth_s = check_time_constant(smooth_s)
    info = probe_video(path)
    notes: list[str] = []
    if info.duration > max_seconds:
        notes.append(f"The clip is {info.duration:.0f} s long: only its first {max_seconds:.0f} s were analysed.")
    span = min(info.duration, max_seconds) if info.duration > 0 else max_seconds
    expected = max(1, int(span * min(sample_fps, info.fps or sample_fps)) + 1)
    det = predictor.get_detector(detector)
    writer: Optional[H264Writer] = None
    frames: list[FrameResult] = []
    timings = {"analyze": 0.0, "encode": 0.0}
    t = time.perf_counter()
    try:
        for af in analyze_frames(predictor, path, sample_fps=sample_fps, max_seconds=max_seconds, detector=det,
                                 tta=tta, batch_size=batch_size, notes=notes,
                                 smoother=TrackSmoother(smooth_s) if smooth_s else None):
            timings["analyze"] += (time.perf_counter() - t) * 1000  # decoding, detection and the model
            t = time.perf_counter()
            faces = []
            for i, (tid, f) in enumerate(zip(af.track_ids, af.analysis.faces)):
                f.crop, f.attention = np.zeros((0, 0, 3), np.uint8), {}
                sm = None if af.smoothed is None else dict(zip(predictor.class_names, map(float, af.smoothed[i])))
                faces.append(TrackedFace(tid, f, sm))
            frames.append(FrameResult(af.frame_number, af.time_s, faces))
            if out_path is not None:
                if writer is None:
                    writer = H264Writer(out_path, af.rgb.shape[1], af.rgb.shape[0], sample_fps)
                items = [(tf.face.box, f"ID{tf.track_id} {lab} {conf:.0%}", class_color(lab))
                         for tf, (lab, conf) in ((tf, _shown_label(tf)) for tf in faces)]
                writer.write(draw_boxes(af.rgb, items))
            timings["encode"] += (time.perf_counter() - t) * 1000
            if progress is not None:
                progress(min(1.0, len(frames) / expected), f"frame {len(frames)}/{expected} at {af.time_s:.1f} s")
            t = time.perf_counter()
    finally:
        if writer is not None:
            writer.close()
    if not frames:
        raise InputError("No frames could be decoded from this video: the file is probably corrupt.")
    tracks = summarise_tracks(frames, predictor.class_names)
    if not tracks:
        notes.append(f"No faces found in the {len(frames)} sampled frames.")
    timings["total"] = (time.perf_counter() - t0) * 1000
    return VideoAnalysis(
        info=info, sample_fps=sample_fps, frames=frames, tracks=tracks, class_names=predictor.class_names,
        backbones=predictor.backbones, detector=det.name,
        annotated_path=str(out_path) if out_path is not None and writer is not None else None,
        notes=notes, timings_ms=timings, smooth_s=smooth_s,
    )
