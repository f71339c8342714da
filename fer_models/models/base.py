"""Base class of every FER model: config that travels with the weights, and safetensors Hub I/O.

Each model is an ``nn.Module`` mixed with huggingface_hub's ``PyTorchModelHubMixin``. Its ``__init__`` keyword
arguments *are* its config (architecture, class names and order, input/crop size, channels, normalisation,
the Grad-CAM layer); the mixin writes them to ``config.json`` and ``from_pretrained`` rebuilds the model from
them, so loading never guesses the architecture. Weights are safetensors only (never pickle), loaded with
``strict=True``, and may be stored as fp16 and loaded back as fp32.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# Grey-level statistics of the FER2013 training split, in [0, 1].
FER2013_MEAN = (0.5077,)
FER2013_STD = (0.2550,)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Keys every model config has; the builders add architecture-specific ones.
# face_norm: None, or [mean, std] grey levels each face is standardised to before mean/std normalisation
# (per-face contrast normalisation; docs/real_photos.md). Absent from older configs, which means None.
SPEC_KEYS = ("class_names", "input_size", "crop_size", "in_chans", "mean", "std", "face_norm")


@dataclass
class ModelOutput:
    """What every model's ``forward`` returns, whatever the model (after timm's one-method forward contract).

    ``logits``: B x C, the model's decision (a fusion's fused logits). ``member_logits``: each backbone's own
    B x C logits by member name; a backbone is its own single member (``{arch: logits}``). ``attention``:
    ``{member: {layer: B x h x w}}`` CBAM spatial maps, filled only when ``forward(x, attention=True)`` and only
    for members that have attention. Turn logits into probabilities with :meth:`FERModel.probabilities`.
    """

    logits: torch.Tensor
    member_logits: dict[str, torch.Tensor]
    attention: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def calibrated_softmax(logits: torch.Tensor, temperature: float = 1.0,
                       confidence_map: Optional[dict] = None) -> torch.Tensor:
    """Calibrated probabilities in float32: ``softmax(logits / T)`` (temperature scaling, Guo et al., ICML 2017;
    T = 1 is the plain softmax), then, with a ``confidence_map``, each row's top probability moved to the map's
    value (see :func:`match_confidence`)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = logits.float() / float(temperature)
    if not confidence_map:
        return scaled.softmax(-1)
    return match_confidence(scaled, confidence_map)


def match_confidence(logits: torch.Tensor, confidence_map: dict, iterations: int = 30) -> torch.Tensor:
    """``softmax(logits * s_i)`` with an inverse temperature ``s_i > 0`` per row chosen so that the top probability
    equals ``confidence_map`` at the row's own top probability (``{"x": [...], "y": [...]}``, non-decreasing,
    interpolated linearly, flat beyond its ends). A positive per-row temperature keeps every row's class order, so
    the argmax and the ranking never move; the whole distribution flattens or sharpens together.

    With ``d_j = z_j - max(z)``, the top probability is ``1 / g(s)``, ``g(s) = sum_j exp(s * d_j)``: convex and
    decreasing in ``s``, so Newton's method from ``s = 0`` (where ``g`` is the number of classes, above any
    target) approaches the root from the left without overshooting; a few steps reach float64 precision (in NumPy:
    on one face this costs about 0.1 ms, against 1 ms for a bisection in torch)."""
    shape = logits.shape
    z = logits.float().reshape(-1, shape[-1])  # any leading shape, as the softmax takes
    n_cls = z.shape[-1]
    zd = z.detach().cpu().double().numpy()
    d = zd - zd.max(-1, keepdims=True)
    top = 1.0 / np.exp(d).sum(-1)
    target = np.interp(top, np.asarray(confidence_map["x"], np.float64), np.asarray(confidence_map["y"], np.float64))
    goal = 1.0 / target.clip(1.0 / n_cls + 1e-9, 1.0 - 1e-9)  # g(s) must come down to this
    scale = np.zeros_like(goal)
    for _ in range(iterations):
        e = np.exp(scale[:, None] * d)
        g, dg = e.sum(-1), (d * e).sum(-1)  # dg <= 0; 0 only for a row whose logits are all equal
        step = np.where(dg < 0, (g - goal) / np.where(dg < 0, -dg, 1.0), 0.0)
        scale = scale + np.maximum(step, 0.0)
        if np.all(np.abs(g - goal) <= 1e-10 * goal):
            break
    s_t = torch.as_tensor(scale, dtype=z.dtype, device=z.device).unsqueeze(-1)
    return (z * s_t).softmax(-1).reshape(shape)


def default_config(arch: str, **overrides: Any) -> dict:
    """FER2013 defaults (7 classes, 48x48 grayscale, 44x44 crops) updated with ``overrides``."""
    cfg: dict[str, Any] = dict(
        arch=arch,
        class_names=list(FER2013_CLASSES),
        input_size=48,
        crop_size=44,
        in_chans=1,
        mean=list(FER2013_MEAN),
        std=list(FER2013_STD),
    )
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if "num_classes" in overrides and "class_names" not in overrides:
        cfg["class_names"] = [f"class_{i}" for i in range(int(overrides["num_classes"]))]
    cfg.pop("num_classes", None)
    return cfg


class FERModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="fer-models",
    tags=["facial-expression-recognition", "image-classification", "fer2013", "pytorch"],
    pipeline_tag="image-classification",
    license="mit",
):
    """Common config handling. Subclasses pass all their keyword arguments up to ``FERModel.__init__``."""

    def __init__(
        self, *, arch: str, class_names: list, input_size: int, crop_size: int, in_chans: int, mean: list,
        std: list, **extra: Any,
    ):
        super().__init__()
        if crop_size > input_size:
            raise ValueError(f"crop_size {crop_size} is larger than input_size {input_size}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean/std need {in_chans} values, got {mean} / {std}")
        self.cfg: dict[str, Any] = dict(
            arch=arch, class_names=list(class_names), input_size=int(input_size), crop_size=int(crop_size),
            in_chans=int(in_chans), mean=[float(m) for m in mean], std=[float(s) for s in std], **extra,
        )

    # --- config accessors -------------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.cfg["arch"]

    @property
    def class_names(self) -> list[str]:
        return list(self.cfg["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.cfg["class_names"])

    @property
    def in_chans(self) -> int:
        return self.cfg["in_chans"]

    def input_spec(self) -> dict:
        """What preprocessing must produce for this model (read by data, evaluation, explanations, the app)."""
        return {k: self.cfg.get(k) for k in SPEC_KEYS}

    def cam_target_layers(self) -> dict[str, nn.Module]:
        """``{name: module}`` that Grad-CAM should hook (the config's ``cam_layer``)."""
        return {self.arch: self.get_submodule(self.cfg["cam_layer"])}

    has_attention = False  # set by backbones built with attention modules

    # --- members and calibration: a backbone is a fusion of one, so callers never ask which they hold -----------
    @property
    def member_names(self) -> list[str]:
        """Keys of ``ModelOutput.member_logits`` (and of ``cam_target_layers``), in order."""
        return [self.arch]

    def member_models(self) -> dict[str, "FERModel"]:
        """``{member name: the module computing its logits}``; a backbone is its own member."""
        return {self.arch: self}

    # Whether ``logits`` combine several members' logits (a fusion), so the decision has its own explanation.
    fuses_members = False

    @property
    def temperature(self) -> float:
        """The config's ``temperature`` for the model's decision (absent: 1.0, the plain softmax)."""
        return float(self.cfg.get("temperature", 1.0))

    def member_calibrations(self) -> dict[str, tuple[float, Optional[dict]]]:
        """Each member's ``(temperature, confidence_map)``, by member name (a backbone's is its own)."""
        return {self.arch: (self.temperature, self.cfg.get("confidence_map"))}

    def probabilities(self, output: ModelOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(probs, member_probs)`` of an output, calibrated as the config says: the decision with this model's
        ``temperature`` (and ``confidence_map``, if any), each member's logits with its own
        (:func:`calibrated_softmax`). Every probability the pipeline shows comes from here; accuracy and argmax
        code keeps using logits (neither step ever moves the argmax)."""
        cals = self.member_calibrations()
        probs = calibrated_softmax(output.logits, self.temperature, self.cfg.get("confidence_map"))
        own = (self.temperature, self.cfg.get("confidence_map"))
        # a backbone is its own member: its vote is its decision, computed once
        return probs, {n: probs if lg is output.logits and cals[n] == own else calibrated_softmax(lg, *cals[n])
                       for n, lg in output.member_logits.items()}

    def forward(self, x: torch.Tensor, *, attention: bool = False) -> ModelOutput:
        """Backbone forward: a :class:`ModelOutput`; with ``attention=True`` it carries the CBAM spatial maps
        (``{arch: {stage: B x h x w}}``; empty for a backbone without attention).

        Backbones define ``forward_features(x, attention=None)`` and ``forward_head``; the fusion model overrides this.
        """
        maps: Optional[dict[str, torch.Tensor]] = {} if attention and self.has_attention else None
        logits = self.forward_head(self.forward_features(x, maps))
        return ModelOutput(logits, {self.arch: logits}, {self.arch: maps} if maps else {})

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    # --- saving -----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, Path], *, dtype: Optional[torch.dtype] = None, **kwargs):
        """``PyTorchModelHubMixin.save_pretrained`` plus ``dtype`` (e.g. ``torch.float16``) for the stored weights."""
        self._save_dtype = dtype
        kwargs.setdefault("config", self.cfg)  # our config, not the mixin's guess from __init__ arguments
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self._save_dtype = None

    def _save_pretrained(self, save_directory: Path) -> None:
        dtype = getattr(self, "_save_dtype", None)
        state = {}
        for k, v in self.state_dict().items():
            v = v.detach().to("cpu")
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            state[k] = v.contiguous()
        meta = {"format": "pt", "arch": self.arch, "config": json.dumps(self.cfg)}
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata=meta)

    # --- loading ----------------------------------------------------------------------------------------
    @classmethod
    def _from_pretrained(
        cls, *, model_id: str, revision: Optional[str] = None, cache_dir=None, force_download: bool = False,
        local_files_only: bool = False, token=None, map_location: str = "cpu", strict: bool = True, **model_kwargs,
    ):
        from ._registry import create_model

        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"{weights} not found (only safetensors weights are supported)")
        else:
            weights = hf_hub_download(
                repo_id=model_id, filename=WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                force_download=force_download, local_files_only=local_files_only, token=token,
            )
        arch = model_kwargs.pop("arch", None)
        if arch is None:
            raise ValueError(f"{model_id}: config has no 'arch'; is this a fer-models checkpoint?")
        model = create_model(arch, **model_kwargs)
        load_weights(model, weights, strict=strict)
        return model.to(map_location).eval()


def load_weights(model: nn.Module, path: Union[str, Path], strict: bool = True) -> None:
    """Load a safetensors file into ``model`` (dtype cast to the model's), with a clear error if it is broken."""
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read weights file {path}: {e}") from e
    own = model.state_dict()
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"weights {path} do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"weights {path}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    state = {k: (v.to(own[k].dtype) if k in own else v) for k, v in state.items()}
    model.load_state_dict(state, strict=strict)


def load_model(
    name_or_path: Union[str, Path], *, device: Union[str, torch.device] = "cpu", revision: Optional[str] = None,
    local_files_only: bool = False, **kwargs: Any,
) -> FERModel:
    """Load any fer-models checkpoint (a local directory or a Hub repo id); the config picks the class."""
    return FERModel.from_pretrained(
        str(name_or_path), revision=revision, local_files_only=local_files_only, map_location=str(device), **kwargs
    )
