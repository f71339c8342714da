"""Heatmap overlays on a fixed colour scale, so every panel (member, fusion, attention) reads the same way.

Values in [0, 1] go through one 256-entry colour table (OpenCV's Turbo, an improved Jet: Mikhailov, Google AI
blog 2019); 0 and 1 always get the same colours, whatever the map's own range, and :func:`colorbar` draws that
scale. Everything takes and returns RGB uint8 arrays. The app, ``explain`` (which re-exports this module as
``explain.overlay``) and batch analysis's CAM panels all draw heatmaps with these functions.
"""
from __future__ import annotations

import functools
from typing import Sequence

import cv2
import numpy as np

TICKS = (0.0, 0.5, 1.0)


@functools.lru_cache(maxsize=1)
def colormap_lut() -> np.ndarray:
    """256 x 3 uint8 RGB colours for values 0/255 .. 255/255."""
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0, ::-1]
    lut = np.ascontiguousarray(lut)
    lut.setflags(write=False)
    return lut


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """H x W values in [0, 1] (clipped; NaN counts as 0) -> H x W x 3 uint8 RGB on the shared scale."""
    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return colormap_lut()[np.rint(np.clip(h, 0.0, 1.0) * 255).astype(np.uint8)]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 4:
        return image[..., :3]
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"expected an H x W (x 3) image, got shape {image.shape}")


def _check_heatmap(heatmap: np.ndarray) -> np.ndarray:
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2 or min(heatmap.shape) < 1:
        raise ValueError(f"expected one H x W heatmap, got shape {heatmap.shape}")
    return heatmap


def _blend(rgb: np.ndarray, heatmap: np.ndarray, alpha: float) -> np.ndarray:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = rgb.shape[:2]
    heat = cv2.resize(heatmap, (w, h), interpolation=cv2.INTER_LINEAR)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colorize(heat).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_on_face(face_rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend ``heatmap`` (any H x W, resized bilinearly to the face) over a face: uint8 RGB of the face's size.

    ``face_rgb`` may be RGB, RGBA or grey uint8. The heatmap frame is the face frame: pass the whole
    ``Explanation.heatmaps[name][i]`` (input_size x input_size) for the face crop the model saw.
    """
    rgb = _as_rgb(face_rgb)
    return _blend(rgb, _check_heatmap(heatmap), alpha)


def paste_on_image(image_rgb: np.ndarray, box: Sequence[float], heatmap: np.ndarray, alpha: float = 0.5
                   ) -> np.ndarray:
    """A copy of ``image_rgb`` with ``heatmap`` blended inside ``box = (x0, y0, x1, y1)`` only.

    The heatmap is stretched over the whole box (the face crop it was computed on); parts of the box outside
    the image are cut off, so boxes that stick out of the frame still line up.
    """
    out = _as_rgb(image_rgb).copy()
    heatmap = _check_heatmap(heatmap)
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {tuple(box)}")
    heat = cv2.resize(heatmap, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    h, w = out.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return out  # the box is entirely outside the image
    region = out[cy0:cy1, cx0:cx1]
    out[cy0:cy1, cx0:cx1] = _blend(region, heat[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], alpha)
    return out


def colorbar(height: int = 256, width: int = 24, labels: bool = True) -> np.ndarray:
    """The shared scale as a vertical bar, 1 at the top and 0 at the bottom: uint8 RGB ``height x W``.

    Without labels ``W == width``; with labels a white strip with ticks and "0.0" / "0.5" / "1.0" is added on the
    right, so ``W == width + 32``.
    """
    if height < 2 or width < 1:
        raise ValueError(f"colorbar needs height >= 2 and width >= 1, got {height} x {width}")
    values = np.linspace(1.0, 0.0, height, dtype=np.float32)
    bar = np.repeat(colorize(values[:, None]), width, axis=1)
    if not labels:
        return bar
    strip = np.full((height, 32, 3), 255, np.uint8)
    for v in TICKS:
        y = int(round((1.0 - v) * (height - 1)))
        cv2.line(strip, (0, y), (4, y), (0, 0, 0), 1)
        text_y = min(max(y + 4, 9), height - 2)  # keep the end labels inside the image
        cv2.putText(strip, f"{v:.1f}", (6, text_y), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, strip], axis=1)
