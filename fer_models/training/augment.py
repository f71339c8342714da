"""Training-time augmentation of whole batches already on the compute device, so training never waits on a
data loader: random crop, horizontal flip, rotation and scale jitter are folded into one affine ``grid_sample``
per batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F


@dataclass
class AugmentConfig:
    crop: bool = True           # random crop_size crop of the input_size face
    flip: bool = True           # horizontal flip with probability 0.5
    rotation: float = 10.0      # degrees, uniform in [-rotation, rotation]
    scale: float = 0.1          # zoom jitter, uniform in [1 - scale, 1 + scale]


def augment_batch(
    x: torch.Tensor, crop_size: int, cfg: AugmentConfig, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Random crop + flip + rotation + scale of float B x C x H x W in one ``grid_sample`` -> B x C x crop x crop."""
    b, c, h, w = x.shape
    dev = x.device
    u = torch.rand(b, 5, generator=generator, device="cpu").to(dev)
    angle = (u[:, 0] * 2 - 1) * math.radians(cfg.rotation)
    scale = 1 + (u[:, 1] * 2 - 1) * cfg.scale
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(b, device=dev)
    # Offsets of the crop window, in the input's normalised [-1, 1] coordinates.
    max_off = (w - crop_size) / w if cfg.crop else 0.0
    tx = (u[:, 3] * 2 - 1) * max_off
    ty = (u[:, 4] * 2 - 1) * ((h - crop_size) / h if cfg.crop else 0.0)
    sx, sy = crop_size / w / scale, crop_size / h / scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos * sx * flip, -sin * sy, tx], dim=1),
        torch.stack([sin * sx * flip, cos * sy, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, (b, c, crop_size, crop_size), align_corners=False)
    # Border padding: rotated corners repeat the edge instead of inventing black triangles.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
