"""Batch analysis: files, folders, globs and videos in; one row per face (fused and per-backbone probabilities,
box, landmarks, detector score, frame time, track id) out, as a DataFrame and optionally CSV, JSONL or Parquet.

The same pipeline as the app (:class:`FacePredictor` for photos, :func:`video.analyze_frames` for clips): images
are read and their faces found one by one (in a worker thread, ahead of the model), then the crops of
``batch_size`` images go through the model in one forward pass. Rows are appended to the output after every
batch, so a killed run keeps what it did, and a rerun skips the files (and video frames) the output already holds.
A file that cannot be read becomes one row with an ``error`` and the run goes on. Columns: docs/analyze.md.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .errors import InputError
from .faces import FaceBox, FaceDetector
from .images import load_image
from .loading import DEFAULT_CHECKPOINT_DIR
from .predictor import NO_FACE_NOTE, DetectedFaces, FacePredictor, get_predictor
from .results import ImageAnalysis, cam_panel, face_row, row_columns
from .smoothing import SMOOTH_PREFIX, TrackSmoother, check_time_constant, smoothed_columns, smoothed_fields
from .video import DEFAULT_SAMPLE_FPS, analyze_frames, default_tracker, probe_video

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v"})
OUTPUT_FORMATS = (".csv", ".jsonl", ".parquet")
DEFAULT_BATCH_SIZE = 16

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def is_video(path: PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def expand_inputs(inputs: Union[PathLike, Iterable[PathLike]]) -> list[str]:
    """Files as given, folders searched recursively for images and videos, globs (``**`` too) expanded; in
    order, without repeats. A path that matches nothing is kept, so that it is reported as missing."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: dict[str, None] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS
                           | VIDEO_EXTENSIONS)
            out.update((q.as_posix(), None) for q in found)
        elif not p.exists() and glob.has_magic(str(item)):
            out.update((Path(q).as_posix(), None) for q in sorted(glob.glob(str(item), recursive=True))
                       if Path(q).is_file())
        else:
            out[p.as_posix()] = None
    return list(out)


# ----------------------------------------------------------------------------------------------------------------
# Outputs: typed columns, appended after every batch, read back to resume
# ----------------------------------------------------------------------------------------------------------------
_INT_COLUMNS = ("frame", "track_id", "face", "n_faces", "width", "height")


def _is_text(col: str) -> bool:
    return col in ("file", "label", "cam_png", "notes", "error") or col.endswith("_label")


def column_dtypes(columns: Sequence[str]) -> dict[str, str]:
    """pandas dtypes of the row columns: nullable integers and booleans, strings, floats for the rest."""
    return {c: "Int64" if c in _INT_COLUMNS else "boolean" if c == "whole_image" else "object" if _is_text(c)
            else "float64" for c in columns}


def rows_frame(rows: Sequence[dict], columns: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), columns=list(columns))
    return df.astype(column_dtypes(columns))


def _arrow_schema(columns: Sequence[str]):
    import pyarrow as pa

    types = {"Int64": pa.int64(), "boolean": pa.bool_(), "object": pa.string(), "float64": pa.float64()}
    return pa.schema([(c, types[d]) for c, d in column_dtypes(columns).items()])


def _trim_partial_line(path: Path) -> None:
    """Drop a last line cut off by a killed run, so appended rows start on a line of their own."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class TableOutput:
    """Rows appended to a CSV, JSONL or Parquet file; ``read()`` gives what an earlier run left there."""

    def __init__(self, path: PathLike, columns: Sequence[str]):
        self.path, self.columns = Path(path), list(columns)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in OUTPUT_FORMATS:
            raise InputError(f"Unknown output format {self.path.name!r}: use one of {', '.join(OUTPUT_FORMATS)}.")
        self._parquet: Any = None
        if self.suffix == ".parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise InputError("Writing .parquet needs pyarrow (`pip install pyarrow`); or write .csv / .jsonl.") \
                    from None

    def read(self) -> Optional[pd.DataFrame]:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        if self.suffix == ".parquet":
            try:
                df = pd.read_parquet(self.path)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
                raise InputError(f"{self.path} cannot be read ({e}); a killed run leaves no Parquet footer: "
                                 "remove the file or write elsewhere (CSV and JSONL survive a kill).") from e
        else:
            _trim_partial_line(self.path)
            if self.suffix == ".csv":
                df = pd.read_csv(self.path, dtype={c: "object" for c in self.columns if _is_text(c)})
            else:
                with open(self.path) as f:
                    df = pd.DataFrame([json.loads(line) for line in f if line.strip()])
        if list(df.columns) != self.columns:
            raise InputError(f"{self.path} holds other columns than this model's results (another model or "
                             "version, or a run with(out) --smooth?): write to a new file.")
        return df.astype(column_dtypes(self.columns))

    def append(self, rows: Sequence[dict]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.suffix == ".parquet":
            self._append_parquet(rows_frame(rows, self.columns))
        elif self.suffix == ".csv":
            new = not self.path.is_file() or self.path.stat().st_size == 0
            text = rows_frame(rows, self.columns).to_csv(header=new, index=False)
            with open(self.path, "a", newline="") as f:
                f.write(text)  # one write per batch: a kill cuts at most the last line, which read() drops
        else:
            text = "".join(json.dumps({c: r.get(c) for c in self.columns}) + "\n" for r in rows)
            with open(self.path, "a") as f:
                f.write(text)

    def _append_parquet(self, df: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _arrow_schema(self.columns)
        if self._parquet is None:
            # Parquet cannot be appended to: rows go to a new file (the earlier run's first) that replaces the
            # output on close().
            old = self.read()
            self._tmp = self.path.with_name(self.path.name + ".partial")
            self._parquet = pq.ParquetWriter(self._tmp, schema)
            if old is not None and len(old):
                self._parquet.write_table(pa.Table.from_pandas(old, schema=schema, preserve_index=False))
        self._parquet.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False))

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            os.replace(self._tmp, self.path)
            self._parquet = None


@dataclass
class ResumeState:
    """What an earlier run's rows say is done: whole files, and how far into each video."""

    done_files: set[str] = field(default_factory=set)
    last_frame: dict[str, int] = field(default_factory=dict)  # video -> last analysed frame number
    last_tracks: dict[str, tuple[list[int], list[FaceBox]]] = field(default_factory=dict)  # its faces
    # video -> (time of its last analysed frame, {track id: smoothed probabilities}) when the rows have them
    last_smoothed: dict[str, tuple[float, dict[int, list[float]]]] = field(default_factory=dict)

    @classmethod
    def from_table(cls, df: Optional[pd.DataFrame]) -> "ResumeState":
        state = cls()
        if df is None or not len(df):
            return state
        whole = df[df["frame"].isna()]  # images, and files that failed as a whole
        state.done_files.update(whole["file"].astype(str))
        frames = df[df["frame"].notna()]
        for file, rows in frames.groupby("file", sort=False):
            last = int(rows["frame"].max())
            state.last_frame[str(file)] = last
            at = rows[(rows["frame"] == last) & rows["track_id"].notna()]
            boxes = [FaceBox(r.x0, r.y0, r.x1, r.y1, r.det_score) for r in at.itertuples()]
            state.last_tracks[str(file)] = ([int(t) for t in at["track_id"]], boxes)
            smooth = [c for c in df.columns if c.startswith(f"{SMOOTH_PREFIX}p_")]
            if smooth and len(at):
                state.last_smoothed[str(file)] = (float(at["time_s"].iloc[0]), {
                    int(t): [float(v) for v in vals] for t, vals in zip(at["track_id"], at[smooth].to_numpy())})
        return state


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    file: str
    found: Optional[DetectedFaces] = None
    notes: list[str] = field(default_factory=list)
    error: Optional[str] = None


def _error_text(e: BaseException) -> str:
    return str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"


def cam_filename(file: str, frame: Optional[int], face: int) -> str:
    """``photos/a b.jpg``, face 2 -> ``photos_a_b.jpg_face2.png``; video frames add ``_f000123``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", file).strip("_.") or "input"
    return f"{stem}{'' if frame is None else f'_f{frame:06d}'}_face{face}.png"


class _Run:
    """One call of :func:`analyze`: the predictor, the options, the output, and the rows built so far."""

    def __init__(self, predictor: FacePredictor, output: Optional[TableOutput], columns: list[str], *,
                 batch_size: int, detector, tta: bool, whole_image: bool, sample_fps: float, max_seconds: float,
                 cam_dir: Optional[Path], cam_method: Optional[str], bar: tqdm, smooth_s: float = 0.0):
        self.predictor, self.output, self.columns, self.bar = predictor, output, columns, bar
        self.batch_size, self.detector, self.whole_image = max(1, int(batch_size)), detector, whole_image
        self.sample_fps, self.max_seconds, self.cam_dir = sample_fps, max_seconds, cam_dir
        self.smooth_s = smooth_s
        self.classify_kw = dict(tta=tta, explain=cam_dir is not None, cam_method=cam_method,
                                max_explained=predictor.max_faces)
        self.rows: list[dict] = []
        self.faces = 0

    def emit(self, rows: list[dict]) -> None:
        self.rows += rows
        self.faces += sum(r.get("face") is not None for r in rows)
        if self.output is not None:
            self.output.append(rows)

    def analysis_rows(self, analysis: ImageAnalysis, context: dict, track_ids: Optional[list[int]] = None,
                      smoothed: Optional[np.ndarray] = None):
        notes = "; ".join(n for n in analysis.notes if n != NO_FACE_NOTE) or None
        ctx = dict(context, n_faces=len(analysis.faces), width=analysis.width, height=analysis.height, notes=notes)
        rows = []
        for i, f in enumerate(analysis.faces):
            row = face_row(f, **ctx, track_id=None if track_ids is None else track_ids[i])
            if smoothed is not None:
                row.update(smoothed_fields(analysis.class_names, smoothed[i]))
            if f.heatmaps is not None and self.cam_dir is not None:
                path = self.cam_dir / cam_filename(context["file"], context.get("frame"), f.index)
                Image.fromarray(cam_panel(f)).save(path)
                row["cam_png"] = str(path)
            rows.append(row)
        return rows or [face_row(None, **ctx)]

    # --- photos ---------------------------------------------------------------------------------------------
    def load(self, file: str) -> _Loaded:
        """Read one image and find its faces (runs in the worker thread); errors are kept, not raised."""
        try:
            loaded = load_image(file)
            found = self.predictor.find_faces(loaded.pixels, detector=self.detector, whole_image=self.whole_image,
                                              notes=loaded.notes)
            return _Loaded(file, found)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the run
            log.warning("%s: %s", file, _error_text(e))
            return _Loaded(file, error=_error_text(e))

    def images(self, files: list[str], workers: int) -> None:
        batch: list[_Loaded] = []
        for item in _prefetch(self.load, files, workers, ahead=2 * self.batch_size):
            batch.append(item)
            if sum(b.found is not None for b in batch) >= self.batch_size:
                self.classify_images(batch)
                batch = []
        self.classify_images(batch)

    def classify_images(self, batch: list[_Loaded]) -> None:
        if not batch:
            return
        good = [b for b in batch if b.found is not None]
        try:
            analyses = iter(self.predictor.classify([b.found for b in good], **self.classify_kw))
            rows = []
            for b in batch:  # in input order, unreadable files included
                if b.found is None:
                    rows.append(face_row(None, file=b.file, error=b.error))
                else:
                    rows += self.analysis_rows(next(analyses), {"file": b.file})
        except Exception as e:  # noqa: BLE001
            log.exception("a batch of %d images failed", len(good))
            rows = [face_row(None, file=b.file, error=b.error or _error_text(e)) for b in batch]
        self.emit(rows)
        self.bar.update(len(batch))
        self.bar.set_postfix(faces=self.faces)

    # --- videos ---------------------------------------------------------------------------------------------
    def video(self, file: str, resume: ResumeState) -> None:
        tracker = default_tracker(self.sample_fps)
        if file in resume.last_tracks:
            tracker.seed(*resume.last_tracks[file])
        smoother = TrackSmoother(self.smooth_s) if self.smooth_s else None
        if smoother is not None and file in resume.last_smoothed:
            t, by_track = resume.last_smoothed[file]
            for tid, probs in by_track.items():
                smoother.seed(tid, t, probs)
        notes: list[str] = []
        pending: list[dict] = []
        frames = 0
        try:
            probe_video(file)  # a clear message for files that are not videos
            for af in analyze_frames(self.predictor, file, sample_fps=self.sample_fps, max_seconds=self.max_seconds,
                                     detector=self.detector, batch_size=self.batch_size, tracker=tracker,
                                     after_frame=resume.last_frame.get(file, -1), notes=notes, smoother=smoother,
                                     **self.classify_kw):
                ctx = {"file": file, "frame": af.frame_number, "time_s": round(af.time_s, 3)}
                pending += self.analysis_rows(af.analysis, ctx, af.track_ids, af.smoothed)
                frames += 1
                if frames % self.batch_size == 0:
                    self.emit(pending)
                    pending = []
                    self.bar.set_postfix(faces=self.faces, frame=af.frame_number)
            self.emit(pending)
            if frames == 0 and file not in resume.last_frame:
                raise InputError("No frames could be decoded from this video: the file is probably corrupt.")
            if notes:  # the stream broke off midway: its frames so far are kept, the file is marked done
                self.emit([face_row(None, file=file, error="; ".join(notes))])
        except Exception as e:  # noqa: BLE001
            log.warning("%s: %s", file, _error_text(e))
            self.emit(pending + [face_row(None, file=file, error=_error_text(e))])
        self.bar.update()


def _prefetch(fn: Callable[[str], _Loaded], items: list[str], workers: int, ahead: int) -> Iterator[_Loaded]:
    """``fn(item)`` for each item in order, computed up to ``ahead`` items in advance by ``workers`` threads
    (image decoding and face detection overlap the model's forward pass); inline when ``workers`` is 0."""
    if workers <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fer-load")
    try:
        futures = [pool.submit(fn, x) for x in items[:ahead]]
        for i in range(len(items)):
            if i + ahead < len(items):
                futures.append(pool.submit(fn, items[i + ahead]))
            yield futures[i].result()
            futures[i] = None  # type: ignore[call-overload] - free the decoded image
    finally:  # on Ctrl-C or an error, do not read the images queued ahead
        pool.shutdown(wait=True, cancel_futures=True)


def analyze(
    inputs: Union[PathLike, Iterable[PathLike]], *, out: Optional[PathLike] = None,
    predictor: Optional[FacePredictor] = None, repo_id: Optional[str] = None,
    checkpoint_dir: PathLike = DEFAULT_CHECKPOINT_DIR, device: Optional[str] = None,
    batch_size: int = DEFAULT_BATCH_SIZE, detector: Union[str, FaceDetector, None] = None, tta: bool = False,
    whole_image: bool = False, sample_fps: float = DEFAULT_SAMPLE_FPS, max_seconds: float = math.inf,
    cam_dir: Optional[PathLike] = None, cam_method: Optional[str] = None,
    make_explainer: Optional[Callable[[Any], Any]] = None, resume: bool = True, workers: int = 1,
    progress: bool = True, smooth_s: float = 0.0,
) -> pd.DataFrame:
    """Every face of every image and sampled video frame in ``inputs``, one row each (docs/analyze.md).

    inputs: files, folders (searched recursively) and globs; videos by extension. out: ``.csv``, ``.jsonl``
    or ``.parquet``, appended batch by batch; with ``resume`` the files (and video frames) it already holds are
    skipped, otherwise it is overwritten. The returned DataFrame is the whole output (earlier rows included),
    or this run's rows without ``out``. predictor: a ready one, else the weights of ``repo_id`` /
    ``checkpoint_dir`` are loaded. batch_size: images (or frames) per forward pass. cam_dir: write a Grad-CAM
    PNG per face there; needs a predictor with an explainer, or ``make_explainer`` (``explain.Explainer``).
    workers: threads reading images and finding faces ahead of the model (0: none). smooth_s: add each video
    track's probabilities smoothed over time with this time constant in seconds (``smooth_*`` columns beside
    the raw ones; :mod:`.smoothing`); 0: no such columns.
    """
    t0 = time.perf_counter()
    if predictor is None:
        predictor = get_predictor(repo_id, checkpoint_dir, device=device,
                                  make_explainer=make_explainer if cam_dir is not None else None)
    if cam_dir is not None:
        if predictor.explainer is None:
            raise ValueError("cam_dir needs a predictor with an explainer: FacePredictor(model, "
                             "explainer=explain.Explainer(model)), or make_explainer=explain.Explainer")
        cam_dir = Path(cam_dir)
        cam_dir.mkdir(parents=True, exist_ok=True)
    smooth_s = check_time_constant(smooth_s)
    columns = row_columns(predictor.class_names, predictor.backbones)
    if smooth_s:
        columns += smoothed_columns(predictor.class_names)
    output = TableOutput(out, columns) if out is not None else None
    if output is not None and not resume and output.path.exists():
        output.path.unlink()
    state = ResumeState.from_table(output.read() if output is not None else None)
    files = [f for f in expand_inputs(inputs) if f not in state.done_files]
    images = [f for f in files if not is_video(f)]
    videos = [f for f in files if is_video(f)]
    with tqdm(total=len(files), unit="file", disable=not progress, dynamic_ncols=True) as bar:
        run = _Run(predictor, output, columns, batch_size=batch_size, detector=detector, tta=tta,
                   whole_image=whole_image, sample_fps=sample_fps, max_seconds=max_seconds,
                   cam_dir=cam_dir, cam_method=cam_method, bar=bar, smooth_s=smooth_s)
        try:
            run.images(images, workers)
            for v in videos:
                run.video(v, state)
        finally:
            if output is not None:
                output.close()
    log.info("%d files, %d faces in %.1f s", len(files), run.faces, time.perf_counter() - t0)
    if output is not None:
        return output.read() if output.path.is_file() else rows_frame([], columns)
    return rows_frame(run.rows, columns)
