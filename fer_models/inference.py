"""The image pipeline: file -> RGB pixels -> faces -> aligned crops -> every backbone + fusion -> result objects.

One way through the code for the app, the video pipeline, benchmarks and tests alike:

* :func:`load_image` reads any common image robustly (EXIF orientation, 16-bit, CMYK, palettes, alpha, the first
  GIF frame, truncated files, decompression bombs) and raises :class:`InputError` with a message meant for users.
* :class:`FacePredictor` holds one loaded model and runs all faces of an image in one batched forward pass;
  its method arguments mirror the app's inputs. Explanations come from an optional injected ``explainer``
  (``explain.Explainer``; this package does not import it) computed from the *same* crops.
* :func:`load_model_with_fallback` loads weights from a Hub repo, falling back at once to a local folder when
  the Hub is offline or unreachable, and says which weights are in use (:class:`ModelSource`).
"""
from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union
from urllib.parse import urlparse

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .faces import DEFAULT_DETECTOR, FaceBox, FaceDetector, crop_face, detect_faces, get_detector
from .transforms import prepare_faces

log = logging.getLogger(__name__)

# Images above this many pixels are refused before decoding (20000 x 20000 still passes).
MAX_IMAGE_PIXELS = 420_000_000
# Decoded images are downscaled to this longer side at once: crops come from it, detection from a smaller copy.
MAX_WORKING_SIDE = 4096
ENV_MODEL_REPO = "FER_MODEL_REPO"
DEFAULT_CHECKPOINT_DIR = "checkpoints"

ImageSource = Union[str, Path, bytes, np.ndarray, Image.Image]


class InputError(ValueError):
    """A problem with the user's input. The message is written for the user and safe to show in a UI."""


class ModelLoadError(RuntimeError):
    """No usable weights were found; the message says where it looked and what to do."""


# --------------------------------------------------------------------------------------------------------------
# Image loading
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedImage:
    pixels: np.ndarray  # H x W x 3 uint8 RGB, upright, at most MAX_WORKING_SIDE on its longer side
    original_size: tuple[int, int]  # (width, height) of the file, after EXIF rotation
    format: str = ""
    notes: list[str] = field(default_factory=list)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8, by bit depth for integers and by range for floats."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        hi = int(a.max()) if a.size else 0
        if hi <= 255 and a.min() >= 0:
            return a.astype(np.uint8)
        # 16-bit images use the full 0..65535 range; wider integers are scaled by their own maximum.
        div = 257.0 if hi <= 65535 else hi / 255.0
        return np.clip(a / div, 0, 255).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float32))
    if a.size and (a.min() < 0 or a.max() > 1):
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return (a * 255 + 0.5).astype(np.uint8)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise InputError(f"Expected an image array (H x W, H x W x 3 or H x W x 4), got shape {a.shape}.")
    a = _to_uint8(a)
    if a.ndim == 2:
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if a.shape[2] == 4:  # composite over white, so transparent areas do not turn black
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = (a[..., :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "L"):
        return _array_to_rgb(np.asarray(im))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_rgb(np.asarray(im))
    if mode in ("RGBA", "LA", "P", "PA", "RGBa", "La") or "transparency" in im.info:
        return _array_to_rgb(np.asarray(im.convert("RGBA")))
    return _array_to_rgb(np.asarray(im.convert("RGB")))  # CMYK, YCbCr, LAB, HSV, 1


def _open_pil(source: Union[str, Path, bytes]) -> Image.Image:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"File not found: {path.name}")
        if path.stat().st_size == 0:
            raise InputError("The file is empty (0 bytes).")
        fp: Any = path
    else:
        if len(source) == 0:
            raise InputError("The file is empty (0 bytes).")
        fp = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise InputError(f"The image is too large to process ({e}).") from e
    except UnidentifiedImageError as e:
        raise InputError(
            "This file is not an image that can be read (supported: JPEG, PNG, WebP, BMP, GIF, TIFF)."
        ) from e
    except OSError as e:
        raise InputError(f"The image file cannot be read: {e}") from e


def load_image(source: ImageSource, *, max_side: int = MAX_WORKING_SIDE) -> LoadedImage:
    """Read an image file, bytes, array or PIL image as upright RGB uint8, downscaled to ``max_side``."""
    notes: list[str] = []
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source)
        size, fmt = (rgb.shape[1], rgb.shape[0]), "array"
    else:
        im = source if isinstance(source, Image.Image) else _open_pil(source)
        fmt = im.format or ""
        w, h = im.size
        try:
            rotated = im.getexif().get(274, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
        except Exception:
            rotated = False
        if w * h > MAX_IMAGE_PIXELS:
            raise InputError(
                f"The image is {w} x {h} pixels ({w * h / 1e6:.0f} MP); the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} MP."
            )
        try:
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
                notes.append("Animated image: the first frame was analysed.")
            if fmt == "JPEG" and max(w, h) > max_side:
                im.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale: cheap for huge JPEGs
            im.load()
            if max(im.size) > 2 * max_side:
                # Shrink by an integer factor (box filter) before any mode conversion: a 20000 x 20000 image
                # is never copied at full size.
                if im.mode == "1":
                    im = im.convert("L")
                elif im.mode not in ("L", "RGB", "RGBA", "LA", "I", "F", "I;16", "CMYK", "YCbCr"):
                    im = im.convert("RGBA" if im.mode in ("P", "PA") and "transparency" in im.info else "RGB")
                im = im.reduce(max(1, max(im.size) // max_side))
            im = ImageOps.exif_transpose(im) or im
            rgb = _pil_to_rgb(im)
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"The image file is truncated or corrupt ({e}).") from e
        size = (h, w) if rotated else (w, h)
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    if max(rgb.shape[:2]) < max(size):
        notes.append(f"Large image ({size[0]} x {size[1]}) downscaled to {rgb.shape[1]} x {rgb.shape[0]}.")
    if min(rgb.shape[:2]) < 32:
        notes.append(f"The image is only {rgb.shape[1]} x {rgb.shape[0]} pixels: too small to find a face in.")
    return LoadedImage(rgb, (int(size[0]), int(size[1])), fmt, notes)


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------
# One colour per FER2013 class (RGB), so a label reads the same in images, videos and plots.
CLASS_COLORS = {
    "angry": (220, 40, 40), "disgust": (120, 160, 20), "fear": (150, 60, 200), "happy": (250, 190, 0),
    "sad": (40, 110, 220), "surprise": (240, 120, 20), "neutral": (150, 150, 150), "contempt": (140, 90, 60),
}


def class_color(name: str) -> tuple[int, int, int]:
    return CLASS_COLORS.get(name, (0, 200, 200))


def draw_boxes(rgb: np.ndarray, items: Sequence[tuple[FaceBox, str, tuple[int, int, int]]]) -> np.ndarray:
    """A copy of ``rgb`` with each (box, caption, colour) drawn; line width and text scale follow the image size."""
    out = np.ascontiguousarray(rgb.copy())
    h, w = out.shape[:2]
    thick = max(1, round(max(h, w) / 400))
    font_scale = max(0.4, max(h, w) / 1200)
    for box, caption, color in items:
        p0 = (int(round(box.x0)), int(round(box.y0)))
        p1 = (int(round(box.x1)) - 1, int(round(box.y1)) - 1)
        cv2.rectangle(out, p0, p1, color, thick, cv2.LINE_AA)
        if caption:
            (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)
            ty = p0[1] - 4 if p0[1] - th - base - 4 >= 0 else min(p1[1] + th + 4, h - base)
            tx = min(max(p0[0], 0), max(w - tw, 0))
            cv2.rectangle(out, (tx, ty - th - 2), (tx + tw + 2, ty + base), color, -1)
            text_color = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
            cv2.putText(out, caption, (tx + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, font_scale, text_color, thick,
                        cv2.LINE_AA)
    return out


def annotate(rgb: np.ndarray, faces: Sequence[FacePrediction]) -> np.ndarray:
    """The image with a numbered box per face: ``#1 happy 93%``."""
    return draw_boxes(rgb, [(f.box, f"#{f.index} {f.label} {f.confidence:.0%}", class_color(f.label)) for f in faces])


# --------------------------------------------------------------------------------------------------------------
# Model loading with Hub fallback
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ModelSource:
    """Which weights are in use, and why (shown in the UI)."""

    kind: str  # "hub" or "local"
    location: str  # repo id or local path
    device: str
    arch: str = ""
    results: Optional[dict] = None  # the checkpoint's results.json, when it has one
    note: str = ""  # e.g. why the Hub was not used

    def accuracies(self) -> dict[str, float]:
        """``{split: accuracy}`` from results.json (any split-like entry with an ``accuracy``)."""
        out: dict[str, float] = {}
        for k, v in (self.results or {}).items():
            if isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float)):
                out[k] = float(v["accuracy"])
        return out

    def describe(self) -> str:
        where = {"hub": f"Hub repo `{self.location}`", "local": f"local folder `{self.location}`"}.get(
            self.kind, f"in-memory model `{self.location}`")
        acc = self.accuracies()
        acc_txt = ", ".join(f"{k} accuracy {v:.1%}" if v <= 1 else f"{k} accuracy {v:.1f}%" for k, v in acc.items())
        s = f"Weights: {where} ({self.arch}, on {self.device})"
        s += f"; recorded {acc_txt}" if acc_txt else "; no recorded accuracy (results.json absent)"
        return s + (f". {self.note}" if self.note else ".")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "location": self.location, "device": self.device, "arch": self.arch,
                "accuracy": self.accuracies(), "note": self.note}


def default_device() -> str:
    from .predict import resolve_device

    return str(resolve_device("auto"))


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP connect to the Hub endpoint, bounded in time (DNS included); no HTTP retries."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _read_results(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None


def _load_local(local_dir: Union[str, Path], device: str):
    from .base import load_model

    d = Path(local_dir)
    if not d.is_dir() or not (d / "model.safetensors").is_file() or not (d / "config.json").is_file():
        raise ModelLoadError(
            f"No model weights in {d}/ (it needs config.json and model.safetensors). Train and save a model "
            f"there, or name a Hub repo with --model-repo or the {ENV_MODEL_REPO} environment variable."
        )
    try:
        model = load_model(d, device=device)
    except Exception as e:  # a corrupt or mismatched checkpoint: say which and why
        raise ModelLoadError(f"The checkpoint in {d}/ cannot be loaded: {e}") from e
    return model, _read_results(d)


def _load_hub(repo_id: str, device: str, revision: Optional[str], local_files_only: bool):
    from huggingface_hub import hf_hub_download

    from .base import load_model

    model = load_model(repo_id, device=device, revision=revision, local_files_only=local_files_only)
    results = None
    try:
        results = json.loads(Path(hf_hub_download(repo_id, "results.json", revision=revision,
                                                  local_files_only=local_files_only)).read_text())
    except Exception:  # results.json is optional
        pass
    return model, results


def load_model_with_fallback(
    repo_id: Optional[str] = None, local_dir: Union[str, Path] = DEFAULT_CHECKPOINT_DIR, *,
    device: Optional[str] = None, revision: Optional[str] = None, probe_timeout: float = 2.0,
):
    """``(model, ModelSource)``: the Hub repo ``repo_id`` (default ``$FER_MODEL_REPO``) if it can be had
    quickly (online, or already in the local Hub cache), else the local folder ``local_dir``.

    Never stalls: with ``HF_HUB_OFFLINE`` set or the endpoint not answering a TCP connect within
    ``probe_timeout`` seconds, only the Hub cache is tried before falling back.
    """
    device = device or default_device()
    repo_id = repo_id if repo_id is not None else (os.environ.get(ENV_MODEL_REPO) or None)
    note = ""
    if repo_id:
        offline = hub_offline()
        online = not offline and hub_reachable(probe_timeout)
        attempts = [False, True] if online else [True]  # download, then the cache alone
        errors = []
        for cache_only in attempts:
            try:
                model, results = _load_hub(repo_id, device, revision, local_files_only=cache_only)
                src_note = "" if online and not cache_only else "Loaded from the local Hub cache (offline)."
                return model, ModelSource("hub", repo_id, device, model.arch, results, src_note)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        why = "HF_HUB_OFFLINE is set" if offline else ("the Hub is unreachable" if not online else errors[-1])
        note = f"Hub repo `{repo_id}` not used ({why}); fell back to the local checkpoint."
        log.warning(note)
    model, results = _load_local(local_dir, device)
    return model, ModelSource("local", str(local_dir), device, model.arch, results, note)


# --------------------------------------------------------------------------------------------------------------
# The predictor
# --------------------------------------------------------------------------------------------------------------
def _frame_map(m: torch.Tensor, spec: dict) -> np.ndarray:
    """B x h x w maps on the centre crop -> B x input_size x input_size in [0, 1], aligned with the face crop."""
    crop, size = spec["crop_size"], spec["input_size"]
    m = torch.nn.functional.interpolate(m.float()[:, None], size=(crop, crop), mode="bilinear", align_corners=False)
    p = (size - crop) // 2
    # Zeros where the centre crop cut the frame off, as explain.Explainer does for its maps.
    m = torch.nn.functional.pad(m, (p, size - crop - p, p, size - crop - p))[:, 0]
    return m.clamp(0, 1).cpu().numpy()


def _mean_view_probs(logits: torch.Tensor, views: int) -> torch.Tensor:
    """(views * B) x C logits -> B x C probabilities averaged over the views."""
    return logits.float().softmax(-1).view(views, -1, logits.shape[-1]).mean(0)


@dataclass
class RawPredictions:
    probs: np.ndarray  # B x C fused probabilities
    member_probs: dict[str, np.ndarray]  # member -> B x C
    attention: dict[str, np.ndarray]  # "<member>/<layer>" -> B x input_size x input_size


class FacePredictor:
    """A loaded FER model plus a face detector (and optionally an explainer), shared by all requests.

    ``explainer`` is any object with ``explain(x, method=..., target=...)`` returning ``heatmaps``
    (``{name: B x S x S}``), as ``explain.Explainer`` does (it is thread-safe, so calls are not serialised).
    """

    def __init__(
        self, model: torch.nn.Module, *, detector: Union[str, FaceDetector] = DEFAULT_DETECTOR,
        explainer: Any = None, source: Optional[ModelSource] = None, max_faces: int = 50,
        max_explained: int = 8, detect_max_side: int = 640, crop_px: int = 144,
    ):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.spec = model.input_spec()
        self.class_names: list[str] = list(model.class_names)
        self.is_fusion = hasattr(model, "member_names")
        self.backbones: list[str] = list(model.member_names) if self.is_fusion else [model.arch]
        self.detector = detector
        self.explainer = explainer
        self.source = source or ModelSource("memory", model.arch, str(self.device), model.arch)
        self.max_faces, self.max_explained = max_faces, max_explained
        self.detect_max_side, self.crop_px = detect_max_side, crop_px

    # --- building blocks ------------------------------------------------------------------------------------
    def get_detector(self, detector: Union[str, FaceDetector, None] = None) -> FaceDetector:
        d = detector or self.detector
        return get_detector(d) if isinstance(d, str) else d

    def _forward(self, x: torch.Tensor):
        if self.is_fusion:
            out = self.model(x, return_members=True, return_attention=True)
            return out.logits, out.member_logits, out.attention
        if getattr(self.model, "has_attention", False):
            logits, att = self.model(x, return_attention=True)
            return logits, {self.model.arch: logits}, {self.model.arch: att}
        logits = self.model(x)
        return logits, {self.model.arch: logits}, {}

    @torch.inference_mode()
    def predict_crops(self, crops: Sequence[np.ndarray], tta: bool = False) -> RawPredictions:
        """Probabilities for face crops (uint8, any size), all in one batch; ten-crop averages 10 views."""
        x = prepare_faces(list(crops), self.spec, tta="tencrop" if tta else "center").to(self.device)
        if tta:
            views = x.shape[0]
            logits, members, att = self._forward(x.flatten(0, 1))
            probs = _mean_view_probs(logits, views)
            member_probs = {k: _mean_view_probs(v, views) for k, v in members.items()}
            # Attention is shown for the centre view (index 4 of ten_crop's order) only.
            att = {m: {k: v.view(views, -1, *v.shape[1:])[4] for k, v in layers.items()} for m, layers in att.items()}
        else:
            logits, members, att = self._forward(x)
            probs = logits.float().softmax(-1)
            member_probs = {k: v.float().softmax(-1) for k, v in members.items()}
        attention = {f"{m}/{k}": _frame_map(v, self.spec) for m, layers in att.items() for k, v in layers.items()}
        return RawPredictions(probs.cpu().numpy(), {k: v.cpu().numpy() for k, v in member_probs.items()}, attention)

    def class_index(self, target: Union[None, int, str]) -> Optional[int]:
        """None (the predicted class), a class index, or a class name -> index or None."""
        if target is None or target == "" or (isinstance(target, str) and target.lower() in ("predicted", "auto")):
            return None
        if isinstance(target, str) and target.lstrip("-").isdigit():
            target = int(target)
        if isinstance(target, (int, np.integer)):
            if not 0 <= int(target) < len(self.class_names):
                raise InputError(f"Target class index {target} is out of range 0..{len(self.class_names) - 1}.")
            return int(target)
        if target not in self.class_names:
            raise InputError(f"Unknown target class {target!r}; choose one of {self.class_names}.")
        return self.class_names.index(target)

    def _explain(self, crops: Sequence[np.ndarray], method: Optional[str], target: Optional[int]):
        if self.explainer is None:
            raise RuntimeError("this predictor has no explainer")
        x = prepare_faces(list(crops), self.spec, tta="center").to(self.device)
        kwargs: dict[str, Any] = {"target": target}
        if method:
            kwargs["method"] = method
        try:
            return self.explainer.explain(x, **kwargs)
        except ValueError as e:  # e.g. an unknown method name typed into the API
            raise InputError(f"Cannot compute the explanation: {e}") from e

    def explain_crops(self, crops: Sequence[np.ndarray], method: Optional[str] = None,
                      target: Optional[int] = None) -> dict[str, np.ndarray]:
        """Grad-CAM maps ``{name: B x S x S}`` for crops (centre view), via the injected explainer."""
        exp = self._explain(crops, method, target)
        return {k: np.asarray(v, dtype=np.float32) for k, v in exp.heatmaps.items()}

    # --- whole images ---------------------------------------------------------------------------------------
    def analyze_array(
        self, rgb: np.ndarray, *, detector: Union[str, FaceDetector, None] = None, tta: bool = False,
        whole_image: bool = False, explain: bool = False, cam_method: Optional[str] = None,
        cam_target: Union[None, int, str] = None, max_explained: Optional[int] = None,
        notes: Optional[list[str]] = None,
    ) -> ImageAnalysis:
        """Analyse an RGB uint8 array (see :meth:`analyze_image` for the arguments)."""
        timings: dict[str, float] = {}
        notes = list(notes or [])
        det = self.get_detector(detector)
        target_idx = self.class_index(cam_target)
        t0 = time.perf_counter()
        h, w = rgb.shape[:2]
        boxes = detect_faces(rgb, det, max_side=self.detect_max_side) if min(h, w) >= 12 else []
        timings["detect"] = (time.perf_counter() - t0) * 1000
        is_whole = False
        if not boxes:
            if not whole_image:
                notes.append("No face found. Tick 'classify the whole image as one face' to classify it anyway.")
                return self._analysis(rgb, [], det, tta, explain, cam_method, notes, timings)
            boxes, is_whole = [FaceBox(0.0, 0.0, float(w), float(h), 1.0)], True
            notes.append("No face found: the whole image was classified as one face.")
        if len(boxes) > self.max_faces:
            notes.append(f"{len(boxes)} faces found; only the {self.max_faces} largest were analysed.")
            boxes = sorted(sorted(boxes, key=lambda b: -b.area)[: self.max_faces], key=lambda b: (b.x0, b.y0))
        t = time.perf_counter()
        margin = 0.0 if is_whole else det.crop_margin
        crops = [crop_face(rgb, b, margin=margin, size=self.crop_px) for b in boxes]
        explain_idx: list[int] = []
        if explain and self.explainer is not None:
            k = self.max_explained if max_explained is None else max_explained
            explain_idx = sorted(range(len(boxes)), key=lambda j: -boxes[j].area)[:k]
        exp = None
        if explain_idx and len(explain_idx) == len(boxes) and not tta:
            # The explainer's own forward pass already gives every probability and attention map: one pass.
            exp, exp_faces = self._explain(crops, cam_method, target_idx), list(range(len(boxes)))
            raw = RawPredictions(np.asarray(exp.probs), {k: np.asarray(v) for k, v in exp.member_probs.items()},
                                 {k: np.asarray(v) for k, v in exp.attention.items()})
            timings["classify+explain"] = (time.perf_counter() - t) * 1000
        else:
            raw = self.predict_crops(crops, tta=tta)
            timings["classify"] = (time.perf_counter() - t) * 1000
            if explain_idx:
                t = time.perf_counter()
                exp, exp_faces = self._explain([crops[j] for j in explain_idx], cam_method, target_idx), explain_idx
                timings["explain"] = (time.perf_counter() - t) * 1000
        faces = []
        for i, (box, crop) in enumerate(zip(boxes, crops)):
            p = raw.probs[i]
            votes = []
            for name in self.backbones:
                mp = raw.member_probs[name][i]
                votes.append(BackboneVote(name, self.class_names[int(mp.argmax())], float(mp.max()),
                                          _probs_dict(self.class_names, mp)))
            faces.append(FacePrediction(
                index=i + 1, box=box, label=self.class_names[int(p.argmax())], confidence=float(p.max()),
                probs=_probs_dict(self.class_names, p), votes=votes, crop=crop,
                attention={k: v[i] for k, v in raw.attention.items()}, whole_image=is_whole,
            ))
        if exp is not None:
            for row, j in enumerate(exp_faces):
                faces[j].heatmaps = {name: np.asarray(m[row], np.float32) for name, m in exp.heatmaps.items()}
                # The explainer maps attention onto the face frame through each layer's receptive field;
                # prefer its maps for the faces it explained, so they line up with the CAMs.
                faces[j].attention.update({k: np.asarray(v[row], np.float32) for k, v in exp.attention.items()})
                faces[j].cam_target = self.class_names[int(exp.targets[row])]
            if len(explain_idx) < len(faces):
                numbers = ", ".join(f"#{faces[j].index}" for j in sorted(explain_idx))
                notes.append(f"{len(faces)} faces: Grad-CAM computed for the {len(explain_idx)} largest only "
                             f"({numbers}).")
        timings["total"] = (time.perf_counter() - t0) * 1000
        return self._analysis(rgb, faces, det, tta, explain, cam_method, notes, timings)

    def _analysis(self, rgb, faces, det, tta, explain, cam_method, notes, timings) -> ImageAnalysis:
        return ImageAnalysis(
            width=int(rgb.shape[1]), height=int(rgb.shape[0]), faces=faces, class_names=self.class_names,
            backbones=self.backbones, detector=det.name, tta="tencrop" if tta else "center",
            model=self.source.location, cam_method=(cam_method or "default") if explain else None,
            notes=notes, timings_ms=timings,
        )

    def analyze_image(
        self, image: ImageSource, *, detector: Union[str, FaceDetector, None] = None, tta: bool = False,
        whole_image: bool = False, explain: bool = False, cam_method: Optional[str] = None,
        cam_target: Union[None, int, str] = None, max_explained: Optional[int] = None,
    ) -> tuple[ImageAnalysis, np.ndarray]:
        """``(analysis, rgb)`` for an image file, bytes, array or PIL image.

        detector: ``"mtcnn"`` or ``"haar"`` (default: the predictor's); tta: ten-crop averaging;
        whole_image: classify the whole image as one face when no face is found; explain: Grad-CAM for up to
        ``max_explained`` faces (largest first) with ``cam_method`` and ``cam_target`` (None = predicted class).
        Boxes refer to the returned ``rgb`` (upright, downscaled to at most ``MAX_WORKING_SIDE``).
        """
        t = time.perf_counter()
        loaded = load_image(image)
        load_ms = (time.perf_counter() - t) * 1000
        analysis = self.analyze_array(
            loaded.pixels, detector=detector, tta=tta, whole_image=whole_image, explain=explain,
            cam_method=cam_method, cam_target=cam_target, max_explained=max_explained, notes=loaded.notes,
        )
        analysis.timings_ms = {"load": load_ms, **analysis.timings_ms}
        return analysis, loaded.pixels


_PREDICTORS: dict[tuple, FacePredictor] = {}
_PREDICTORS_LOCK = threading.Lock()


def get_predictor(
    repo_id: Optional[str] = None, local_dir: Union[str, Path] = DEFAULT_CHECKPOINT_DIR, *,
    device: Optional[str] = None, detector: str = DEFAULT_DETECTOR,
    make_explainer: Optional[Callable[[torch.nn.Module], Any]] = None,
) -> FacePredictor:
    """The process-wide predictor for these weights, loaded once (thread-safe) and shared by all requests."""
    key = (repo_id if repo_id is not None else os.environ.get(ENV_MODEL_REPO), str(local_dir), device, detector)
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            model, source = load_model_with_fallback(repo_id, local_dir, device=device)
            explainer = make_explainer(model) if make_explainer is not None else None
            _PREDICTORS[key] = FacePredictor(model, detector=detector, explainer=explainer, source=source)
        return _PREDICTORS[key]
