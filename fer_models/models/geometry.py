"""Where a feature-map cell sits in the input: place low-resolution maps on the pixels they came from.

Shared by the predictor's attention maps and ``explain``'s CAMs, so both land on the face the same way.

pytorch-grad-cam (like most CAM code) stretches an h x w map over the W-pixel image with ``cv2.resize``, i.e.
it assumes cell ``i`` is centred on pixel ``(i + 0.5) * W / w - 0.5``. That holds only when the cells tile the
input exactly. At FER sizes they don't: in the CIFAR-style ResNets every stride-2 3x3 convolution (padding 1)
centres output ``j`` on input ``2j``, so an 11x11 ``layer3`` cell ``i`` of a 44 px crop sits on pixel ``4i``,
not ``4i + 1.5``; in the VGGs the third 2x2 pool floors 11 -> 5, so the 5 cells cover only the first 40 px
(cell ``i`` on pixel ``8i + 3.5``, not ``8.8i + 3.9``: up to 3.6 px off on a 48 px face).

:func:`probe_geometry` finds the exact affine map ``pixel = stride * cell + offset`` of every module output by
one forward pass with hooks that compose each Conv2d / MaxPool2d / AvgPool2d's kernel, stride, padding and
dilation (``centre(j) = stride * j - padding + dilation * (kernel - 1) / 2``); every other module that keeps
the spatial size keeps the geometry. Outputs of functional ops (``out + identity``, ``x * attn``) are matched to
the latest geometry of the same spatial size. :func:`upsample` then interpolates bilinearly at those positions
(edge cells repeated past the last centre).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

_RESAMPLERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class Geometry:
    """Cell ``(i, j)`` of a map is centred on input pixel ``(stride[0] * i + offset[0], stride[1] * j + offset[1])``."""

    stride: tuple[float, float]
    offset: tuple[float, float]

    def then(self, module: nn.Module) -> "Geometry":
        k, s, p, d = (_pair(getattr(module, a, 1)) for a in ("kernel_size", "stride", "padding", "dilation"))
        return Geometry(
            stride=(self.stride[0] * s[0], self.stride[1] * s[1]),
            offset=tuple(self.stride[i] * (d[i] * (k[i] - 1) / 2 - p[i]) + self.offset[i] for i in range(2)),
        )

    @staticmethod
    def stretched(grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> "Geometry":
        """The geometry ``cv2.resize`` assumes: cells tiling the output exactly."""
        s = (out_hw[0] / grid_hw[0], out_hw[1] / grid_hw[1])
        return Geometry(stride=s, offset=((s[0] - 1) / 2, (s[1] - 1) / 2))


IDENTITY = Geometry(stride=(1.0, 1.0), offset=(0.0, 0.0))


def _pair(v) -> tuple[float, float]:
    if isinstance(v, str):  # padding="same"/"valid" is not used by the FER models; treat as unknown
        raise ValueError(f"unsupported padding {v!r}")
    return (float(v[0]), float(v[1])) if isinstance(v, (tuple, list)) else (float(v), float(v))


@torch.no_grad()
def probe_geometry(model: nn.Module, x: torch.Tensor, groups: Optional[dict[str, nn.Module]] = None
                   ) -> tuple[dict[nn.Module, Geometry], dict[tuple, Geometry]]:
    """Geometry of every module output for input ``x``, from one hooked forward pass of ``model``.

    Returns ``(by_module, by_shape)``; ``by_shape`` maps ``(group, h, w)`` to the last geometry seen at that
    size inside each of ``groups`` (e.g. the members of a fusion model), for maps that come out of functional
    code such as CBAM attention. Modules whose geometry cannot be traced are left out.
    """
    owner = threading.get_ident()
    group_of = {m: g for g, root in (groups or {}).items() for m in root.modules()}
    by_tensor: dict[int, Geometry] = {id(x): IDENTITY}
    alive = [x]  # keep probed tensors alive so their ids are not reused during the pass
    by_module: dict[nn.Module, Geometry] = {}
    by_shape: dict[tuple, Geometry] = {}
    latest: dict[tuple, Geometry] = {(None,) + tuple(x.shape[-2:]): IDENTITY}  # (group or None, h, w)

    def hook(module: nn.Module, args, out):
        if threading.get_ident() != owner or not isinstance(out, torch.Tensor) or out.dim() != 4:
            return
        g = by_tensor.get(id(out))  # already traced by a child module (containers, in-place ops)
        if g is None:
            inp = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4), None)
            if inp is None:
                return
            hw = tuple(inp.shape[-2:])
            g_in = by_tensor.get(id(inp)) or latest.get((group_of.get(module),) + hw) or latest.get((None,) + hw)
            if g_in is None:
                return
            if isinstance(module, _RESAMPLERS):
                try:
                    g = g_in.then(module)
                except ValueError:
                    return
            elif tuple(out.shape[-2:]) == tuple(inp.shape[-2:]):
                g = g_in
            else:
                return  # adaptive pooling, upsampling, ...: not a fixed grid
            by_tensor[id(out)] = g
            alive.append(out)
        by_module[module] = g
        hw = tuple(out.shape[-2:])
        latest[(None,) + hw] = g
        if module in group_of:
            latest[(group_of[module],) + hw] = by_shape[(group_of[module],) + hw] = g

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return by_module, by_shape


def _interp_matrix(n_in: int, n_out: int, stride: float, offset: float) -> np.ndarray:
    """n_out x n_in bilinear weights sampling a grid whose cell i sits on pixel ``stride * i + offset``."""
    t = np.clip((np.arange(n_out, dtype=np.float64) - offset) / stride, 0, n_in - 1)
    i0 = np.floor(t).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = t - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1 - w
    m[np.arange(n_out), i1] += w
    return m


def upsample(maps: np.ndarray, geometry: Geometry, out_hw: tuple[int, int]) -> np.ndarray:
    """B x h x w cell values -> B x H x W pixel values, each cell placed where ``geometry`` says."""
    h, w = maps.shape[-2:]
    my = _interp_matrix(h, out_hw[0], geometry.stride[0], geometry.offset[0])
    mx = _interp_matrix(w, out_hw[1], geometry.stride[1], geometry.offset[1])
    return np.einsum("yi,bij,xj->byx", my, maps.astype(np.float64), mx).astype(np.float32)


def member_geometries(model: nn.Module, crop_shape: tuple[int, ...], device: torch.device
                      ) -> tuple[dict[nn.Module, Geometry], dict[tuple, Geometry]]:
    """:func:`probe_geometry` of ``model`` (any FER model) for one ``C x h x w`` crop, grouped by member."""
    return probe_geometry(model, torch.zeros((1,) + tuple(crop_shape), device=device), model.member_models())


def attention_to_frame(attention: dict[str, dict[str, torch.Tensor]], by_shape: dict[tuple, Geometry],
                       crop_hw: tuple[int, int], frame: int) -> dict[str, np.ndarray]:
    """``ModelOutput.attention`` on a centre crop -> ``{"<member>/<layer>": B x frame x frame}`` in [0, 1]: each
    cell placed on the pixel its receptive field is centred on (``by_shape`` from :func:`member_geometries`;
    stretched over the crop where unknown), then pasted where the centre crop was taken from."""
    from .preprocess import to_face_frame

    out = {}
    for m, maps in attention.items():
        for layer, a in maps.items():
            a = a.detach().float().cpu().numpy()
            geo = by_shape.get((m,) + a.shape[-2:]) or Geometry.stretched(a.shape[-2:], crop_hw)
            out[f"{m}/{layer}"] = to_face_frame(upsample(a, geo, crop_hw), frame)
    return out
