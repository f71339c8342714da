"""Training-time augmentation of whole batches already on the compute device, so training never waits on a
data loader.

* Geometric (:func:`augment_batch`): random crop, horizontal flip, rotation, zoom and shift jitter, folded into
  one affine ``grid_sample`` per batch.
* Photometric, resolution and occlusion (:func:`photometric_batch`, on ``[0, 1]`` pixels before normalisation):
  contrast, brightness and gamma, Gaussian blur, down-up sampling, JPEG re-encoding, Gaussian noise and random
  erasing (Zhong et al., AAAI 2020). They are off by default; ``AugmentConfig.preset("real")`` turns on the set
  chosen to cover what separates real photos from FER2013 (``docs/real_photos.md``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
from torch.nn import functional as F


@dataclass
class AugmentConfig:
    crop: bool = True           # random crop_size crop of the input_size face
    flip: bool = True           # horizontal flip with probability 0.5
    rotation: float = 10.0      # degrees, uniform in [-rotation, rotation]
    scale: float = 0.1          # zoom jitter, uniform in [1 - scale, 1 + scale]
    translate: float = 0.0      # extra shift, uniform in [-translate, translate] of the side, per axis
    # Photometric / resolution / occlusion, on [0, 1] pixels; 0 turns each off.
    contrast: float = 0.0       # contrast factor uniform in [1 - contrast, 1 + contrast] about each face's mean
    brightness: float = 0.0     # additive shift uniform in [-brightness, brightness]
    gamma: float = 0.0          # gamma exp(u), u uniform in [-gamma, gamma]
    blur_p: float = 0.0         # probability of a Gaussian blur, sigma uniform in [0.3, 1.3] px (at 48 px)
    downsample_p: float = 0.0   # probability of down-then-up sampling through a side uniform in [12, 32] px
    jpeg_p: float = 0.0         # probability of JPEG re-encoding at a quality uniform in [20, 80]
    noise: float = 0.0          # Gaussian noise, std uniform in [0, noise]
    erase_p: float = 0.0        # probability of erasing a rectangle of 2-20% of the face (random grey level)

    PRESETS: ClassVar[dict] = {
        "fer2013": {},
        # Geometry (rotation, scale) stays with its own flags; this adds shift, light, optics and occlusion.
        "real": dict(translate=0.04, contrast=0.4, brightness=0.15, gamma=0.4, blur_p=0.25, downsample_p=0.25,
                     jpeg_p=0.25, noise=0.04, erase_p=0.25),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> "AugmentConfig":
        """``fer2013`` (geometric only, the shipped recipe) or ``real`` (plus photometric/resolution/occlusion)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown augmentation preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @property
    def photometric(self) -> bool:
        return any(getattr(self, k) > 0 for k in ("contrast", "brightness", "gamma", "blur_p", "downsample_p",
                                                   "jpeg_p", "noise", "erase_p"))


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
    if cfg.translate > 0:  # in [-1, 1] coordinates a shift of f of the side is 2f
        shift = (torch.rand(b, 2, generator=generator, device="cpu").to(dev) * 2 - 1) * 2 * cfg.translate
        tx, ty = tx + shift[:, 0], ty + shift[:, 1]
    sx, sy = crop_size / w / scale, crop_size / h / scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos * sx * flip, -sin * sy, tx], dim=1),
        torch.stack([sin * sx * flip, cos * sy, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, (b, c, crop_size, crop_size), align_corners=False)
    # Border padding: rotated corners repeat the edge instead of inventing black triangles.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _uniform(generator: Optional[torch.Generator], b: int, lo: float, hi: float, device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(b, generator=generator, device="cpu")).to(device)


def _chance(generator: Optional[torch.Generator], b: int, p: float, device) -> torch.Tensor:
    return (torch.rand(b, generator=generator, device="cpu") < p).to(device)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 4) -> torch.Tensor:
    """Separable Gaussian blur of B x C x H x W with one sigma per sample (one grouped conv per axis)."""
    b, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x.dtype)[:, None].clamp_min(1e-3) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C) x K
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def jpeg_roundtrip(x: torch.Tensor, quality: Sequence[int]) -> torch.Tensor:
    """Each [0, 1] image (B x C x H x W, C = 1 or 3) through JPEG at its own quality, with Pillow's libjpeg."""
    import io

    import numpy as np
    from PIL import Image

    u8 = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img, q in zip(u8, quality):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, format="JPEG", quality=int(q))
        dec = np.asarray(Image.open(buf))
        out.append(dec[..., None] if dec.ndim == 2 else dec)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0


def random_erase(x: torch.Tensor, mask_rows: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Erase one rectangle (2-20% of the area, aspect 0.3-3.3) per selected sample with a random grey level."""
    b, c, h, w = x.shape
    dev = x.device
    area = _uniform(generator, b, 0.02, 0.2, dev)
    aspect = torch.exp(_uniform(generator, b, math.log(0.3), math.log(3.3), dev))
    eh, ew = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    y0, x0 = _uniform(generator, b, 0, 1, dev) * (1 - eh), _uniform(generator, b, 0, 1, dev) * (1 - ew)
    fill = _uniform(generator, b, 0, 1, dev)
    yy = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
    xx = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
    inside = (((yy[None] >= y0[:, None]) & (yy[None] < (y0 + eh)[:, None]))[:, :, None]
              & ((xx[None] >= x0[:, None]) & (xx[None] < (x0 + ew)[:, None]))[:, None, :])
    inside &= mask_rows.bool()[:, None, None]
    return torch.where(inside[:, None], fill.view(b, 1, 1, 1).to(x.dtype), x)


def photometric_batch(x: torch.Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Contrast / brightness / gamma, blur, down-up sampling, JPEG, noise and erasing of [0, 1] B x C x H x W.

    Each sample draws its own strengths; the order follows a camera (light, optics, resolution, compression,
    sensor noise) and occlusion comes last. Returns [0, 1] pixels.
    """
    if not cfg.photometric:
        return x
    b, _, h, w = x.shape
    dev = x.device
    if cfg.contrast > 0:
        f = _uniform(generator, b, 1 - cfg.contrast, 1 + cfg.contrast, dev).view(b, 1, 1, 1)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * f + mean
    if cfg.brightness > 0:
        x = x + _uniform(generator, b, -cfg.brightness, cfg.brightness, dev).view(b, 1, 1, 1)
    x = x.clamp(0, 1)
    if cfg.gamma > 0:
        x = x.clamp_min(1e-4) ** torch.exp(_uniform(generator, b, -cfg.gamma, cfg.gamma, dev)).view(b, 1, 1, 1)
    if cfg.blur_p > 0:
        pick = _chance(generator, b, cfg.blur_p, dev)
        sigma = torch.where(pick, _uniform(generator, b, 0.3, 1.3, dev), torch.zeros(b, device=dev))
        x = torch.where(pick.view(b, 1, 1, 1), gaussian_blur(x, sigma), x)
    if cfg.downsample_p > 0:
        pick = _chance(generator, b, cfg.downsample_p, dev)
        if pick.any():
            side = int(torch.randint(12, 33, (1,), generator=generator))
            small = F.interpolate(x[pick], size=(side, side), mode="area")
            x = x.clone()
            x[pick] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    if cfg.jpeg_p > 0:
        pick = _chance(generator, b, cfg.jpeg_p, dev)
        if pick.any():
            q = torch.randint(20, 81, (int(pick.sum()),), generator=generator).tolist()
            x = x.clone()
            x[pick] = jpeg_roundtrip(x[pick], q)
    if cfg.noise > 0:
        std = _uniform(generator, b, 0, cfg.noise, dev).view(b, 1, 1, 1)
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(dev)
        x = x + noise * std
    if cfg.erase_p > 0:
        x = random_erase(x, _chance(generator, b, cfg.erase_p, dev), generator)
    return x.clamp(0, 1)
