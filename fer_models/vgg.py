"""VGG with batch norm (Simonyan & Zisserman, 2015), adapted to 48x48 grayscale FER faces.

Follows torchvision's ``models/vgg.py`` (architecture as data in ``cfgs``), with two FER changes:
the last max-pool is dropped so a 44x44 crop ends on a 2x2 map (44->22->11->5->2) instead of collapsing to
1x1, and the head is global average pooling + dropout + a linear layer sized from the config.
Grad-CAM targets the last conv block of stage 4 (5x5 at 44 px).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from ._registry import register_model
from .base import FERModel, default_config

# "M" is a 2x2 max-pool. Standard VGG19 ("E") has five; FER inputs keep four.
cfgs: dict[str, list[Union[int, str]]] = {
    "E_fer": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
    "tiny": [8, "M", 16, "M", 16, "M", 32, "M", 32],
}


def make_layers(cfg: Sequence[Union[int, str]], in_chans: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_chans
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers)


class VGG(FERModel):
    """VGG-BN body, global average pooling, dropout, linear classifier."""

    def __init__(self, *, arch: str, layers: list, dropout: float = 0.5, cam_layer: str = "", **config):
        super().__init__(arch=arch, layers=layers, dropout=dropout, cam_layer=cam_layer, **config)
        self.features = make_layers(layers, self.in_chans)
        width = [v for v in layers if v != "M"][-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(int(width), self.num_classes)
        self._init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _last_conv_block_before_pool(layers: Sequence[Union[int, str]], pools_before: int) -> str:
    """Module path of the ReLU ending the last conv block before pool number ``pools_before`` (1-based)."""
    idx, seen, last_relu = 0, 0, None
    for v in layers:
        if v == "M":
            seen += 1
            if seen == pools_before:
                break
            idx += 1
        else:
            last_relu = idx + 2
            idx += 3
    return f"features.{last_relu}"


def _vgg(name: str, cfg_key: str, **overrides) -> VGG:
    config = default_config(arch=name, **overrides)
    config.setdefault("layers", list(cfgs[cfg_key]))
    layers = config["layers"]
    # Grad-CAM at the last conv block before the last pool: 5x5 at 44 px (the final stage is only 2x2).
    config.setdefault("cam_layer", _last_conv_block_before_pool(layers, sum(v == "M" for v in layers)))
    return VGG(**config)


@register_model
def vgg19(**cfg) -> VGG:
    """VGG19-BN for 48x48 FER faces (about 20M parameters)."""
    return _vgg("vgg19", "E_fer", **cfg)


@register_model
def vgg_tiny(**cfg) -> VGG:
    """A few-thousand-parameter VGG for tests."""
    return _vgg("vgg_tiny", "tiny", **cfg)
