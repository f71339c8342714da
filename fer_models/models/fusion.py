"""Fusion of several FER backbones into one decision.

The default (``mode="concat_linear"``) is the original design: concatenate the members' logits
(7 each, so 14 for two members and 21 for three) and map them through one linear layer to 7 classes.
It is initialised to the plain average of the members' logits, so an untrained head is already the
averaging ensemble and training can only move it from there. ``mode="average"`` averages the members'
softmax probabilities and has no parameters: the baseline the learned head must beat.

The members are built from their configs inside the fusion model, so a fusion checkpoint is
self-contained: one ``config.json`` (with every member's config) and one ``model.safetensors``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ._registry import create_model, register_model
from .base import SPEC_KEYS, FERModel, ModelOutput

FUSION_MODES = ("concat_linear", "average")


def _member_name(arch: str, taken: Sequence[str]) -> str:
    name, i = arch, 2
    while name in taken:
        name, i = f"{arch}_{i}", i + 1
    return name


class FusionModel(FERModel):
    def __init__(
        self, *, arch: str = "fusion", members: list, member_names: Optional[list] = None,
        mode: str = "concat_linear", **config: Any,
    ):
        if mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {mode!r}; choose from {FUSION_MODES}")
        if not members:
            raise ValueError("a fusion model needs at least one member")
        member_cfgs = [dict(m) for m in members]
        spec = {k: member_cfgs[0].get(k) for k in SPEC_KEYS}
        for m in member_cfgs[1:]:
            diff = {k: (spec[k], m.get(k)) for k in SPEC_KEYS if m.get(k) != spec[k]}
            if diff:
                raise ValueError(f"fusion members must share their input spec and classes; differences: {diff}")
        for k in SPEC_KEYS:
            config.setdefault(k, spec[k])
        if member_names is None:
            member_names = []
            for m in member_cfgs:
                member_names.append(_member_name(m["arch"], member_names))
        if len(member_names) != len(member_cfgs) or len(set(member_names)) != len(member_names):
            raise ValueError(f"member_names {member_names} must be unique, one per member")
        super().__init__(arch=arch, members=member_cfgs, member_names=list(member_names), mode=mode, **config)
        self.mode = mode
        self.members = nn.ModuleDict(
            {name: create_model(m["arch"], **{k: v for k, v in m.items() if k != "arch"})
             for name, m in zip(member_names, member_cfgs)}
        )
        n, c = len(member_cfgs), self.num_classes
        if mode == "concat_linear":
            self.head = nn.Linear(n * c, c)
            with torch.no_grad():  # start as the average of the members' logits
                self.head.weight.copy_(torch.cat([torch.eye(c)] * n, dim=1) / n)
                self.head.bias.zero_()

    fuses_members = True

    @property
    def member_names(self) -> list[str]:
        return list(self.members.keys())

    def member_models(self) -> dict[str, FERModel]:
        return dict(self.members.items())

    def member_calibrations(self) -> dict[str, tuple[float, Optional[dict]]]:
        """Each member's ``(temperature, confidence_map)`` as stored in its member config (``members[i]``;
        absent: 1.0 and none)."""
        return {n: (float(c.get("temperature", 1.0)), c.get("confidence_map"))
                for n, c in zip(self.member_names, self.cfg["members"])}

    def cam_target_layers(self) -> dict[str, nn.Module]:
        return {name: m.get_submodule(m.cfg["cam_layer"]) for name, m in self.members.items()}

    def fuse(self, member_logits: Union[dict[str, torch.Tensor], Sequence[torch.Tensor]]) -> torch.Tensor:
        """Fused logits from member logits (in member order); used by training on cached logits too."""
        if isinstance(member_logits, dict):
            member_logits = [member_logits[n] for n in self.member_names]
        if self.mode == "concat_linear":
            return self.head(torch.cat(list(member_logits), dim=1))
        probs = torch.stack([l.float().softmax(-1) for l in member_logits]).mean(0)
        return probs.clamp_min(1e-12).log()  # log of averaged probabilities: softmax gives them back

    def forward(self, x: torch.Tensor, *, attention: bool = False) -> ModelOutput:
        """Fused logits with every member's logits (and, with ``attention=True``, their attention maps)."""
        member_logits: dict[str, torch.Tensor] = {}
        maps: dict[str, dict[str, torch.Tensor]] = {}
        for name, m in self.members.items():
            out = m(x, attention=attention)
            member_logits[name] = out.logits
            if out.attention:  # the member's own {arch: {layer: map}}, filed under its member name
                maps[name] = out.attention[m.arch]
        return ModelOutput(self.fuse(member_logits), member_logits, maps)

    @classmethod
    def from_members(cls, models: Sequence[FERModel], mode: str = "concat_linear",
                     member_names: Optional[list] = None) -> "FusionModel":
        """A fusion model holding copies of trained ``models`` (their weights included)."""
        fusion = cls(members=[m.cfg for m in models], member_names=member_names, mode=mode)
        for name, m in zip(fusion.member_names, models):
            fusion.members[name].load_state_dict(m.state_dict(), strict=True)
        return fusion


def _fusion(members: Sequence[Union[str, dict]], **cfg: Any) -> FusionModel:
    spec_overrides = {k: cfg.pop(k) for k in list(cfg) if k in SPEC_KEYS or k == "num_classes"}
    member_cfgs = [create_model(m, **spec_overrides).cfg if isinstance(m, str) else dict(m) for m in members]
    return FusionModel(members=member_cfgs, **cfg)


@register_model
def fusion(members: Optional[Sequence[Union[str, dict]]] = None, **cfg: Any) -> FusionModel:
    """Fusion of VGG19, ResNet18 and VGG19-CBAM by default; ``members`` takes names or configs."""
    return _fusion(members or ("vgg19", "resnet18", "vgg19_cbam"), **cfg)


@register_model
def fusion_tiny(members: Optional[Sequence[Union[str, dict]]] = None, **cfg: Any) -> FusionModel:
    return _fusion(members or ("vgg_tiny", "resnet_tiny", "resnet_cbam_tiny"), arch=cfg.pop("arch", "fusion_tiny"), **cfg)
