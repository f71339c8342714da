"""Result objects of the image pipeline (one face's fused prediction and backbone votes, one image's analysis),
how they are drawn, and the flat rows of batch analysis: the app and the batch CLI render these, never tensors."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import cv2
import numpy as np

from .faces import LANDMARK_NAMES, FaceBox
from .overlay import overlay_on_face


def _probs_dict(names: Sequence[str], p: np.ndarray) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, p)}


@dataclass
class BackboneVote:
    """One backbone's opinion of one face."""

    name: str
    label: str
    confidence: float
    probs: dict[str, float]

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "confidence": round(self.confidence, 6),
                "probs": {k: round(v, 6) for k, v in self.probs.items()}}


@dataclass
class FacePrediction:
    """The fused prediction for one face, each backbone's vote, and (when computed) its explanations."""

    index: int  # 1-based number drawn on the image
    box: FaceBox
    label: str
    confidence: float
    probs: dict[str, float]
    votes: list[BackboneVote]
    crop: np.ndarray = field(repr=False)  # the aligned face crop given to the model (RGB uint8, square)
    # "<member>/<layer>" -> input_size x input_size map in [0, 1], aligned with `crop` (the explainer's
    # receptive-field mapping for explained faces, plain bilinear upsampling of the centre crop otherwise).
    attention: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # "<member>" and "fusion" -> input_size x input_size Grad-CAM in [0, 1]; None when not explained.
    heatmaps: Optional[dict[str, np.ndarray]] = field(default=None, repr=False)
    cam_target: Optional[str] = None
    whole_image: bool = False

    @property
    def agreement(self) -> bool:
        """Whether every backbone's top class is the fused label."""
        return all(v.label == self.label for v in self.votes)

    def to_dict(self) -> dict:
        return {
            "index": self.index, "box": self.box.to_dict(), "label": self.label,
            "confidence": round(self.confidence, 6), "probs": {k: round(v, 6) for k, v in self.probs.items()},
            "backbones": {v.name: v.to_dict() for v in self.votes}, "backbones_agree": self.agreement,
            "explained": self.heatmaps is not None, "cam_target": self.cam_target, "whole_image": self.whole_image,
        }


@dataclass
class ImageAnalysis:
    """Everything found in one image. ``to_json()`` is what the app offers for download."""

    width: int
    height: int
    faces: list[FacePrediction]
    class_names: list[str]
    backbones: list[str]
    detector: str
    tta: str
    model: str = ""
    cam_method: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def no_face(self) -> bool:
        return not self.faces

    def to_dict(self) -> dict:
        return {
            "image": {"width": self.width, "height": self.height}, "model": self.model,
            "class_names": self.class_names, "backbones": self.backbones, "detector": self.detector,
            "tta": self.tta, "cam_method": self.cam_method, "num_faces": len(self.faces),
            "faces": [f.to_dict() for f in self.faces], "notes": self.notes,
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# One colour per FER2013 class (RGB), so a label reads the same in images, videos and plots.
CLASS_COLORS = {
    "angry": (220, 40, 40), "disgust": (120, 160, 20), "fear": (150, 60, 200), "happy": (250, 190, 0),
    "sad": (40, 110, 220), "surprise": (240, 120, 20), "neutral": (150, 150, 150), "contempt": (140, 90, 60),
}


def class_color(name: str) -> tuple[int, int, int]:
    return CLASS_COLORS.get(name, (0, 200, 200))


def _tag_size(caption: str, scale: float, thick: int) -> tuple[int, int, int]:
    (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    return tw + 4, th + base + 4, base  # the filled tag around the text: 2 px padding on each side


def draw_boxes(rgb: np.ndarray, items: Sequence[tuple[FaceBox, str, tuple[int, int, int]]]) -> np.ndarray:
    """A copy of ``rgb`` with each (box, caption, colour) drawn; line width and text scale follow the image size.

    A caption sits on a filled tag just above its box; where that would leave the image (a face at the top
    edge) the tag moves inside the box's top, and it is shifted and, on tiny images, shrunk to stay whole.
    """
    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    thick = max(1, round(max(h, w) / 400))
    for box, caption, color in items:
        p0 = (int(round(box.x0)), int(round(box.y0)))
        p1 = (int(round(box.x1)) - 1, int(round(box.y1)) - 1)
        cv2.rectangle(out, p0, p1, color, thick, cv2.LINE_AA)
        if not caption:
            continue
        scale = max(0.4, max(h, w) / 1200)
        tag_w, tag_h, base = _tag_size(caption, scale, thick)
        while (tag_w > w or tag_h > h) and scale > 0.2:
            scale *= 0.8
            tag_w, tag_h, base = _tag_size(caption, scale, thick)
        top = p0[1] - tag_h if p0[1] - tag_h >= 0 else max(p0[1], 0)
        top = min(top, max(h - tag_h, 0))
        left = min(max(p0[0], 0), max(w - tag_w, 0))
        cv2.rectangle(out, (left, top), (left + tag_w - 1, top + tag_h - 1), color, -1)
        text_color = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
        cv2.putText(out, caption, (left + 2, top + tag_h - 2 - base), cv2.FONT_HERSHEY_SIMPLEX, scale, text_color,
                    thick, cv2.LINE_AA)
    return out


def annotate(rgb: np.ndarray, faces: Sequence[FacePrediction]) -> np.ndarray:
    """The image with a numbered box per face: ``#1 happy 93%``."""
    return draw_boxes(rgb, [(f.box, f"#{f.index} {f.label} {f.confidence:.0%}", class_color(f.label)) for f in faces])


def cam_panel(face: FacePrediction, caption_px: int = 18) -> np.ndarray:
    """The face crop, then each of its Grad-CAMs (the fused decision's first) blended on it, each captioned: the
    PNG a batch run writes per explained face, drawn by :func:`~fer_models.pipeline.overlay.overlay_on_face`."""
    if face.heatmaps is None:
        raise ValueError("this face has no Grad-CAM maps")
    crop = face.crop
    s = crop.shape[0]
    names = sorted(face.heatmaps, key=lambda n: n != "fusion")
    tiles = [(crop, f"#{face.index} {face.label}")]
    for name in names:
        tiles.append((overlay_on_face(crop, face.heatmaps[name]), name))
    out = []
    for img, caption in tiles:
        bar = np.full((caption_px, s, 3), 255, np.uint8)
        cv2.putText(bar, caption[:24], (2, caption_px - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        out.append(np.vstack([bar, img]))
    return np.hstack(out)

# ----------------------------------------------------------------------------------------------------------------
# Flat rows: one per face (or one per image or frame without faces), for CSV / JSONL / DataFrames
# ----------------------------------------------------------------------------------------------------------------
BOX_COLUMNS = ("x0", "y0", "x1", "y1", "det_score")
LANDMARK_COLUMNS = tuple(f"lm_{n}_{a}" for n in LANDMARK_NAMES for a in "xy")


def row_columns(class_names: Sequence[str], backbones: Sequence[str], *, file: bool = True) -> list[str]:
    """The columns of :func:`face_row` in order (documented in docs/analyze.md)."""
    return (
        (["file"] if file else []) + ["frame", "time_s", "track_id", "face", "n_faces", "width", "height"]
        + list(BOX_COLUMNS) + list(LANDMARK_COLUMNS) + ["whole_image", "label", "confidence"]
        + [f"p_{c}" for c in class_names]
        + [col for b in backbones for col in (f"{b}_label", *(f"{b}_p_{c}" for c in class_names))]
        + ["cam_png", "notes", "error"]
    )


def face_row(face: Optional[FacePrediction], **context) -> dict:
    """One face as a flat dict (box, landmarks, fused and per-backbone probabilities); ``face=None`` gives the
    row of an image or frame without faces. ``context`` fills the other columns (file, frame, track_id, ...);
    columns left out stay missing (None)."""
    row: dict = dict(context)
    if face is None:
        return row
    b = face.box
    row.update(face=face.index, x0=round(b.x0, 1), y0=round(b.y0, 1), x1=round(b.x1, 1), y1=round(b.y1, 1),
               det_score=round(float(b.score), 4), whole_image=face.whole_image, label=face.label,
               confidence=round(face.confidence, 6))
    if b.landmarks is not None:
        row.update({col: round(v, 1) for col, v in zip(LANDMARK_COLUMNS, (v for pt in b.landmarks for v in pt))})
    row.update({f"p_{c}": round(p, 6) for c, p in face.probs.items()})
    for v in face.votes:
        row[f"{v.name}_label"] = v.label
        row.update({f"{v.name}_p_{c}": round(p, 6) for c, p in v.probs.items()})
    return row
