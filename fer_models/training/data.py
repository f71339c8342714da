"""Dataset readers: FER2013 (Kaggle CSV, plain or gzipped; the compact JPEG ``.npz``; the image-folder release)
and CK+48 (class folders of ``S<subject>_<sequence>_<frame>.png``).

Every reader returns a :class:`FaceData` of uint8 ``N x 48 x 48`` faces that lives in memory (FER2013 is
82 MB decoded), so training can keep it on the compute device. Malformed input fails with a
:class:`DataFormatError` that names the file (and row), not a stack trace deep in numpy.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..models.base import FER2013_CLASSES

log = logging.getLogger(__name__)

SPLITS = ("Training", "PublicTest", "PrivateTest")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
FER_SIDE = 48


class DataFormatError(ValueError):
    """Input data that does not have the expected format; the message names the file and row."""


@dataclass
class FaceData:
    images: np.ndarray                 # uint8 N x H x W
    labels: np.ndarray                 # int64 N, indices into class_names
    class_names: list[str]
    split: np.ndarray                  # str N: "Training" / "PublicTest" / "PrivateTest" (or "all")
    subjects: Optional[np.ndarray] = None   # str N (CK+: "S005"), when known
    sources: Optional[np.ndarray] = None    # str N: file names, when read from files
    name: str = ""
    extra: dict = field(default_factory=dict)  # per-face arrays (length N, e.g. CK+'s "sequences") follow subset()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Union[np.ndarray, Sequence[int], slice]) -> "FaceData":
        def pick(a):
            return None if a is None else a[index]

        per_face = {k: v[index] for k, v in self.extra.items() if isinstance(v, np.ndarray) and len(v) == len(self)}
        return FaceData(
            self.images[index], self.labels[index], list(self.class_names), self.split[index],
            pick(self.subjects), pick(self.sources), self.name, per_face,
        )

    def get_split(self, split: str) -> "FaceData":
        if split == "all":
            return self
        mask = self.split == split
        if not mask.any():
            have = sorted(set(self.split.tolist()))
            raise ValueError(f"{self.name or 'dataset'} has no {split!r} split (it has {have})")
        return self.subset(mask)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.class_names))


# --- FER2013 CSV -----------------------------------------------------------------------------------------
def read_fer2013_csv(path: Union[str, Path], class_names: Sequence[str] = FER2013_CLASSES) -> FaceData:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataFormatError(f"{path}: empty file")
            header = [h.strip() for h in header]
            missing = [c for c in ("emotion", "pixels") if c not in header]
            if missing:
                raise DataFormatError(f"{path}: missing column(s) {missing}; header is {header}")
            i_emo, i_pix = header.index("emotion"), header.index("pixels")
            i_use = header.index("Usage") if "Usage" in header else None
            images, labels, usage = [], [], []
            n_side = FER_SIDE * FER_SIDE
            for row_no, row in enumerate(reader, start=2):  # row 1 is the header
                if not row:
                    continue
                where = f"{path} row {row_no}"
                if len(row) < len(header):
                    raise DataFormatError(f"{where}: {len(row)} fields, expected {len(header)}")
                try:
                    label = int(row[i_emo])
                except ValueError:
                    raise DataFormatError(f"{where}: emotion {row[i_emo]!r} is not an integer") from None
                if not 0 <= label < len(class_names):
                    raise DataFormatError(f"{where}: emotion {label} outside 0..{len(class_names) - 1}")
                try:
                    px = np.array(row[i_pix].split(), dtype=np.int32)
                except ValueError:
                    raise DataFormatError(f"{where}: pixels contain a non-integer value") from None
                if px.size != n_side:
                    raise DataFormatError(f"{where}: {px.size} pixel values, expected {n_side} (48x48)")
                if px.min() < 0 or px.max() > 255:
                    raise DataFormatError(f"{where}: pixel values outside 0..255")
                u = row[i_use].strip() if i_use is not None else "Training"
                if u not in SPLITS:
                    raise DataFormatError(f"{where}: Usage {u!r} is not one of {SPLITS}")
                images.append(px.astype(np.uint8).reshape(FER_SIDE, FER_SIDE))
                labels.append(label)
                usage.append(u)
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise DataFormatError(f"{path}: cannot read as FER2013 CSV: {e}") from e
    if not images:
        raise DataFormatError(f"{path}: no data rows")
    return FaceData(np.stack(images), np.array(labels, np.int64), list(class_names), np.array(usage), name=path.name)


# --- FER2013 JPEG npz (shared/data/fer2013/fer2013_jpeg.npz) ----------------------------------------------
def read_fer2013_npz(path: Union[str, Path], class_names: Sequence[str] = FER2013_CLASSES) -> FaceData:
    """The compact release: concatenated JPEG bytes + offsets + labels + usage codes (0/1/2)."""
    from PIL import Image

    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
        jpeg, offsets, labels, usage = z["jpeg"], z["offsets"], z["labels"], z["usage"]
    except KeyError as e:
        raise DataFormatError(f"{path}: missing array {e}; expected jpeg, offsets, labels, usage") from e
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: cannot read npz: {e}") from e
    n = len(labels)
    if len(offsets) != n + 1 or len(usage) != n:
        raise DataFormatError(f"{path}: offsets/usage lengths do not match {n} labels")
    images = np.empty((n, FER_SIDE, FER_SIDE), np.uint8)
    buf = jpeg.tobytes()
    for i in range(n):
        try:
            im = Image.open(io.BytesIO(buf[offsets[i]:offsets[i + 1]])).convert("L")
        except Exception as e:  # PIL raises many types for broken data
            raise DataFormatError(f"{path} image {i}: cannot decode JPEG: {e}") from e
        if im.size != (FER_SIDE, FER_SIDE):
            raise DataFormatError(f"{path} image {i}: size {im.size}, expected 48x48")
        images[i] = np.asarray(im)
    if labels.max() >= len(class_names):
        raise DataFormatError(f"{path}: label {int(labels.max())} outside 0..{len(class_names) - 1}")
    return FaceData(images, labels.astype(np.int64), list(class_names), np.array(SPLITS)[usage], name=path.name)


# --- image folders ---------------------------------------------------------------------------------------
def _read_gray(path: Path, size: Optional[int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataFormatError(f"cannot read image {path}: {e}") from e


def _class_dirs(root: Path, class_names: Sequence[str], ignore: Sequence[str] = ()) -> list[tuple[int, Path]]:
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if d.name in ignore:
            continue
        if d.name not in class_names:
            raise DataFormatError(f"{root}: unknown class folder {d.name!r}; expected one of {list(class_names)}")
        out.append((list(class_names).index(d.name), d))
    return out


def _image_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def read_image_folder(root: Union[str, Path], class_names: Sequence[str] = FER2013_CLASSES) -> FaceData:
    """``train/<class>/*.jpg`` and ``test/<class>/*.jpg``; the split comes from a ``PublicTest_``/``PrivateTest_``
    file-name prefix when present (otherwise ``test/`` is PrivateTest), ``train/`` is Training."""
    root = Path(root)
    images, labels, split, sources = [], [], [], []
    for sub, default_split in (("train", "Training"), ("test", "PrivateTest")):
        if not (root / sub).is_dir():
            continue
        for label, d in _class_dirs(root / sub, class_names):
            for f in _image_files(d):
                s = default_split
                for prefix in SPLITS:
                    if f.name.startswith(prefix + "_"):
                        s = prefix
                images.append(_read_gray(f, FER_SIDE))
                labels.append(label)
                split.append(s)
                sources.append(f"{sub}/{d.name}/{f.name}")
    if not images:
        raise DataFormatError(f"{root}: no images under train/<class>/ or test/<class>/")
    return FaceData(np.stack(images), np.array(labels, np.int64), list(class_names), np.array(split),
                    sources=np.array(sources), name=root.name)


_CK_NAME = re.compile(r"^(S\d+)_(\d+)_(\d+)")


def read_ckplus(root: Union[str, Path], class_names: Sequence[str] = FER2013_CLASSES + ("contempt",)) -> FaceData:
    """CK+48: ``<class>/S<subject>_<sequence>_<frame>.png``. Labels index ``class_names`` (FER2013 order, then
    ``contempt``, which FER2013 lacks); ``subjects`` and ``extra['sequences']`` allow subject-independent folds."""
    root = Path(root)
    images, labels, subjects, seqs, sources = [], [], [], [], []
    for label, d in _class_dirs(root, class_names):
        for f in _image_files(d):
            m = _CK_NAME.match(f.name)
            if not m:
                raise DataFormatError(f"{f}: file name does not look like S<subject>_<sequence>_<frame>")
            images.append(_read_gray(f, FER_SIDE))
            labels.append(label)
            subjects.append(m.group(1))
            seqs.append(f"{m.group(1)}_{m.group(2)}")
            sources.append(f"{d.name}/{f.name}")
    if not images:
        raise DataFormatError(f"{root}: no CK+ images found")
    data = FaceData(np.stack(images), np.array(labels, np.int64), list(class_names), np.array(["all"] * len(labels)),
                    subjects=np.array(subjects), sources=np.array(sources), name="ckplus48")
    data.extra["sequences"] = np.array(seqs)
    return data


# --- dispatch + cache ------------------------------------------------------------------------------------
def _cache_path(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("FER_CACHE_DIR", Path.home() / ".cache" / "fer_models"))
    return root / f"{path.name}.{key}.npz"


def _cached(path: Path, reader) -> FaceData:
    """Decoded FER2013 as uncompressed npz next to nothing in the repo: a second load takes well under a second."""
    cache = _cache_path(path)
    if cache.is_file():
        try:
            z = np.load(cache, allow_pickle=False)
            return FaceData(z["images"], z["labels"], [str(c) for c in z["class_names"]], z["split"], name=path.name)
        except Exception as e:  # a broken cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s: %s", cache, e)
    data = reader(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, images=data.images, labels=data.labels, class_names=np.array(data.class_names), split=data.split)
        tmp.replace(cache)
    except OSError as e:
        log.warning("could not write cache %s: %s", cache, e)
    return data


def load_dataset(path: Union[str, Path], kind: str = "auto", cache: bool = True) -> FaceData:
    """Load FER2013 (CSV / .csv.gz / JPEG .npz / image folders) or CK+48 from ``path``.

    ``path`` may also be the shared data root (with ``fer2013/`` inside). ``kind``: auto, fer2013, ckplus.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if path.is_dir():
        if kind in ("auto", "fer2013"):
            for cand in ("fer2013/fer2013_jpeg.npz", "fer2013_jpeg.npz", "fer2013/fer2013.csv.gz", "fer2013.csv.gz",
                         "fer2013/fer2013.csv", "fer2013.csv"):
                if (path / cand).is_file():
                    return load_dataset(path / cand, "fer2013", cache)
            if (path / "train").is_dir() or (path / "test").is_dir():
                return read_image_folder(path)
        if kind in ("auto", "ckplus"):
            if (path / "ckplus48").is_dir():
                return read_ckplus(path / "ckplus48")
            return read_ckplus(path)
        raise DataFormatError(f"{path}: no FER2013 data found")
    name = path.name.lower()
    if name.endswith(".npz"):
        return _cached(path, read_fer2013_npz) if cache else read_fer2013_npz(path)
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        return _cached(path, read_fer2013_csv) if cache else read_fer2013_csv(path)
    raise DataFormatError(f"{path}: unsupported data file (expected .csv, .csv.gz, .npz or a folder)")
