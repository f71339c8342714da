"""Batched inference over in-memory uint8 faces, with optional ten-crop TTA, for training, evaluation and caching;
the one definition of ten-crop (:func:`forward_views`) and of "which class" (:func:`class_index`,
:func:`resolve_targets`) that evaluation, the protocol, the app's predictor and the explanations share."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .base import ModelOutput
from .preprocess import TENCROP_CENTER, crop_views, normalize

# What a caller passes to mean "the class the model predicts" (the app's dropdown shows PREDICTED_CLASS).
PREDICTED_CLASS = "predicted class"
_PREDICTED_ALIASES = ("", "predicted", "auto", PREDICTED_CLASS)


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA GPU is available")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX512-BF16; without them bf16 autocast is slower than fp32 on CPU."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def amp_enabled(device: torch.device, amp: Optional[bool]) -> bool:
    """``amp=None`` means auto: bf16 on CUDA, and on CPUs with bf16 hardware."""
    if amp is not None:
        return bool(amp)
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU and CUDA; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def forward_views(model: torch.nn.Module, views: torch.Tensor, *, attention: bool = False,
                  channels_last: bool = False) -> ModelOutput:
    """One forward of ``views`` (B x C x h x w, or V x B x C x h x w from ``crop_views``) as one :class:`ModelOutput`.

    Ten-crop is the mean of the views' **logits** (fused and per member), so a temperature then scales one
    averaged logit vector; attention maps come from the centre view. This is what the published ten-crop
    accuracies measure, and every path (evaluation, protocol, app, explanations' target) goes through here.
    """
    if views.dim() == 4:
        x = views.contiguous(memory_format=torch.channels_last) if channels_last else views
        return model(x, attention=attention)
    v, b = views.shape[:2]
    flat = views.reshape(v * b, *views.shape[2:])
    out = model(flat.contiguous(memory_format=torch.channels_last) if channels_last else flat, attention=attention)

    def mean(lg: torch.Tensor) -> torch.Tensor:
        return lg.float().reshape(v, b, -1).mean(0)

    centre = TENCROP_CENTER if v == 10 else v // 2
    attention = {m: {k: a.reshape(v, b, *a.shape[1:])[centre] for k, a in layers.items()}
                 for m, layers in out.attention.items()}
    return ModelOutput(mean(out.logits), {k: mean(lg) for k, lg in out.member_logits.items()}, attention)


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, images: Union[np.ndarray, torch.Tensor], *, tta: str = "center", batch_size: int = 512,
    device: Union[str, torch.device, None] = None, amp: Optional[bool] = False, channels_last: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits for uint8 ``N x H x W`` (or ``N x C x H x W``) faces already at the model's ``input_size``.

    ``amp=False`` (the default) computes in fp32, the precision the app serves, so every score reported from here
    (evaluation, calibration, robustness, the fusion head's logits) is the app's and does not depend on the
    machine; ``amp=None`` is training's auto setting (bf16 autocast on CUDA and on CPUs with bf16 units), for the
    per-epoch selection and the teacher's logits, where speed counts.

    Returns ``(logits, member_logits)``; ``member_logits`` is ``{}`` unless the model fuses members. With
    ``tta="tencrop"`` the logits are averaged over the ten crops (:func:`forward_views`). ``batch_size`` counts
    network inputs (views), so a ten-crop forward holds ``batch_size // 10`` faces.
    """
    spec = model.input_spec()
    dev = next(model.parameters()).device if device is None else resolve_device(device)
    model.eval()
    x_all = torch.as_tensor(images)
    if x_all.dim() == 3:
        x_all = x_all.unsqueeze(1)
    if x_all.shape[-1] != spec["input_size"]:
        raise ValueError(f"faces are {tuple(x_all.shape[-2:])}, model expects {spec['input_size']} px")
    out: list[torch.Tensor] = []
    members: dict[str, list[torch.Tensor]] = {}
    step = max(1, batch_size // (10 if tta == "tencrop" else 1))
    for i in range(0, len(x_all), step):
        views = crop_views(normalize(x_all[i:i + step].to(dev), spec), spec["crop_size"], tta)
        with autocast(dev, amp_enabled(dev, amp)):
            res = forward_views(model, views, channels_last=channels_last)
        out.append(res.logits.float().cpu())
        if model.fuses_members:
            for name, lg in res.member_logits.items():
                members.setdefault(name, []).append(lg.float().cpu())
    logits = torch.cat(out).numpy()
    return logits, {k: torch.cat(v).numpy() for k, v in members.items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


# --- which class ------------------------------------------------------------------------------------------------
Target = Union[None, int, str, Sequence[Union[int, str]], np.ndarray, torch.Tensor]


def class_index(target: Union[None, int, str], class_names: Sequence[str]) -> Optional[int]:
    """One class: None for "the predicted class" (None, ``""``, ``"predicted"``, ``"auto"``,
    :data:`PREDICTED_CLASS`), else the index of a class name, an index, or an index written as a string.
    Raises ``ValueError`` naming the classes for anything else."""
    if target is None or (isinstance(target, str) and target.strip().lower() in _PREDICTED_ALIASES):
        return None
    if isinstance(target, str) and target.lstrip("-").isdigit():
        target = int(target)
    if isinstance(target, str):
        if target not in class_names:
            raise ValueError(f"unknown target class {target!r}; choose one of {list(class_names)}")
        return list(class_names).index(target)
    if not 0 <= int(target) < len(class_names):
        raise ValueError(f"target class index {int(target)} is out of range 0..{len(class_names) - 1}")
    return int(target)


def resolve_targets(target: Target, class_names: Sequence[str], predicted: torch.Tensor) -> torch.Tensor:
    """(B,) int64 class per face: ``predicted`` (B,) where ``target`` means the predicted class, one class for every
    face, or a sequence of one target per face (each resolved by :func:`class_index`)."""
    b = predicted.shape[0]
    if target is None or isinstance(target, (int, np.integer, str)):
        t = class_index(target, class_names)
        return predicted.long().clone() if t is None else torch.full((b,), t, dtype=torch.long, device=predicted.device)
    seq = target.tolist() if isinstance(target, (np.ndarray, torch.Tensor)) else list(target)
    if len(seq) != b:
        raise ValueError(f"got {len(seq)} targets for {b} faces")
    idx = [class_index(s, class_names) for s in seq]
    return torch.tensor([int(p) if i is None else i for i, p in zip(idx, predicted.tolist())], dtype=torch.long,
                        device=predicted.device)
