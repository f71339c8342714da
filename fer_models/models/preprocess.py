"""Preprocessing driven by a model's input spec (``model.input_spec()``): face crops -> normalised tensors.

Evaluation and the app use the centre crop or the ten-crop (4 corners + centre, and their mirror images) of the
``input_size`` face, as in Krizhevsky et al. (2012). Training-time augmentation is ``training.augment``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def standardize_faces(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Per-face contrast normalisation of [0, 1] floats B x C x H x W: each face's pixels are shifted and scaled
    to ``mean`` / ``std`` grey levels (0-255 units, e.g. FER2013's median face), then clipped to [0, 1]."""
    m = x.mean((1, 2, 3), keepdim=True)
    s = x.std((1, 2, 3), keepdim=True).clamp_min(2.0 / 255)  # a flat face is shifted, not blown up
    return ((x - m) / s * (std / 255.0) + mean / 255.0).clamp(0, 1)


def standardize(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """[0, 1] float faces B x C x H x W -> the model's input per ``spec``: per-face ``face_norm`` when set, then
    mean/std. Training calls it after augmentation; :func:`normalize` after decoding uint8 faces."""
    if spec.get("face_norm"):
        x = standardize_faces(x, *spec["face_norm"])
    m = torch.tensor(spec["mean"], device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(spec["std"], device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def normalize(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """uint8 faces B x C x H x W (or B x H x W) -> the model's input floats per ``spec``."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return standardize(x.float() / 255.0, spec)


def center_offset(size: int, crop: int) -> int:
    """Where a centre crop of ``crop`` px starts in a ``size`` px side: the one crop geometry of prediction,
    attention maps and explanations."""
    return (size - crop) // 2


def center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = center_offset(h, crop), center_offset(w, crop)
    return x[..., top:top + crop, left:left + crop]


def to_face_frame(maps: np.ndarray, frame: int) -> np.ndarray:
    """B x h x w maps on the centre crop -> B x frame x frame float32 in [0, 1] (NaN as 0), placed where
    :func:`center_crop` took the crop from, with zeros on the border it cut off."""
    maps = np.clip(np.nan_to_num(np.asarray(maps, np.float32)), 0, 1)
    h, w = maps.shape[-2:]
    top, left = center_offset(frame, h), center_offset(frame, w)
    out = np.zeros((maps.shape[0], frame, frame), np.float32)
    out[:, top:top + h, left:left + w] = maps
    return out


TENCROP_CENTER = 4  # index of the (unmirrored) centre view in ten_crop's order


def ten_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """B x C x H x W -> 10 x B x C x crop x crop: four corners, centre, then the same five mirrored."""
    h, w = x.shape[-2:]
    crops = [
        x[..., :crop, :crop], x[..., :crop, w - crop:], x[..., h - crop:, :crop], x[..., h - crop:, w - crop:],
        center_crop(x, crop),
    ]
    crops += [c.flip(-1) for c in crops]
    return torch.stack(crops)


def faces_to_uint8(faces: Sequence[np.ndarray], input_size: int, in_chans: int) -> torch.Tensor:
    """Face crops of any size, grey or RGB(A) uint8 arrays -> uint8 B x C x input_size x input_size."""
    import cv2

    out = np.empty((len(faces), in_chans, input_size, input_size), np.uint8)
    for i, f in enumerate(faces):
        f = np.asarray(f)
        if f.dtype != np.uint8:
            raise ValueError(f"face {i}: expected uint8 pixels, got {f.dtype}")
        if f.ndim == 3 and f.shape[2] == 4:
            f = f[..., :3]
        if in_chans == 1 and f.ndim == 3:
            f = cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)
        elif in_chans == 3 and f.ndim == 2:
            f = np.repeat(f[..., None], 3, axis=2)
        if f.shape[0] < 1 or f.shape[1] < 1:
            raise ValueError(f"face {i}: empty crop {f.shape}")
        interp = cv2.INTER_AREA if min(f.shape[:2]) >= input_size else cv2.INTER_LINEAR
        f = cv2.resize(f, (input_size, input_size), interpolation=interp)
        out[i] = f[None] if f.ndim == 2 else f.transpose(2, 0, 1)
    return torch.from_numpy(out)


def prepare_faces(faces: Sequence[np.ndarray], spec: dict, tta: str = "center") -> torch.Tensor:
    """Face crops (numpy uint8) -> model input per ``spec``: B x C x crop x crop, or 10 x B x ... for ten-crop."""
    x = normalize(faces_to_uint8(faces, spec["input_size"], spec["in_chans"]), spec)
    return crop_views(x, spec["crop_size"], tta)


def crop_views(x: torch.Tensor, crop_size: int, tta: str) -> torch.Tensor:
    if tta == "center":
        return center_crop(x, crop_size)
    if tta == "tencrop":
        return ten_crop(x, crop_size)
    raise ValueError(f"unknown test-time augmentation {tta!r}; use 'center' or 'tencrop'")
