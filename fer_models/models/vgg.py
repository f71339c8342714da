"""VGG with batch norm (Simonyan & Zisserman, 2015), adapted to 48x48 grayscale FER faces.

``vgg19_cbam`` adds a CBAM module (Woo et al., ECCV 2018) at the end of every stage, before its pool; its
forward pass can return each stage's spatial attention map (``forward(x, attention=True).attention``).

Follows torchvision's ``models/vgg.py`` (architecture as data in ``cfgs``), with two FER changes:
the last max-pool is dropped so a 44x44 crop ends on a 2x2 map (44->22->11->5->2) instead of collapsing to
1x1, and the head is global average pooling + dropout + a linear layer sized from the config.
Grad-CAM targets the last conv block of stage 4 (5x5 at 44 px).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._registry import register_model
from .attention import CBAM
from .base import FERModel, default_config

# "M" is a 2x2 max-pool. Standard VGG19 ("E") has five; FER inputs keep four.
cfgs: dict[str, list[Union[int, str]]] = {
    "E_fer": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
    "tiny": [8, "M", 16, "M", 16, "M", 32, "M", 32],
}


def scale_width(channels: int, width: float) -> int:
    """Channel count under a width multiplier (as in MobileNet), at least 8 and a multiple of 8 when scaled."""
    return channels if width == 1.0 else max(8, int(round(channels * width / 8)) * 8)


def layout(cfg: Sequence[Union[int, str]], attention: bool) -> list[str]:
    """Kinds of the modules ``make_layers`` builds, in order (so config code can name module indices)."""
    kinds: list[str] = []
    for i, v in enumerate(cfg):
        if v == "M":
            kinds.append("pool")
        else:
            kinds += ["conv", "bn", "relu"]
            if attention and (i + 1 == len(cfg) or cfg[i + 1] == "M"):
                kinds.append("cbam")
    return kinds


def make_layers(cfg: Sequence[Union[int, str]], in_chans: int, attention: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_chans
    for i, v in enumerate(cfg):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c = int(v)
            if attention and (i + 1 == len(cfg) or cfg[i + 1] == "M"):
                layers.append(CBAM(c))
    return nn.Sequential(*layers)


class VGG(FERModel):
    """VGG-BN body, global average pooling, dropout, linear classifier."""

    def __init__(self, *, arch: str, layers: list, width: float = 1.0, attention: bool = False, dropout: float = 0.5,
                 cam_layer: str = "", **config):
        super().__init__(arch=arch, layers=layers, width=width, attention=attention, dropout=dropout,
                         cam_layer=cam_layer, **config)
        self.has_attention = bool(attention)
        layers = [v if v == "M" else scale_width(int(v), width) for v in layers]
        self.features = make_layers(layers, self.in_chans, attention)
        final_channels = [v for v in layers if v != "M"][-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(int(final_channels), self.num_classes)
        self._init_weights()

    def forward_features(self, x: torch.Tensor, attention: Optional[dict] = None) -> torch.Tensor:
        """Body; when ``attention`` is a dict it receives ``{"stage<i>": B x h x w}`` spatial attention maps."""
        stage = 0
        for m in self.features:  # modules called one by one so Grad-CAM hooks on any of them fire
            if isinstance(m, CBAM):
                stage += 1
                x, attn = m(x)
                if attention is not None:
                    attention[f"stage{stage}"] = attn[:, 0]
            else:
                x = m(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


def _last_relu_before_last_pool(layers: Sequence[Union[int, str]], attention: bool) -> str:
    """Module path of the ReLU ending the last conv block before the last pool."""
    kinds = layout(layers, attention)
    last_pool = max(i for i, k in enumerate(kinds) if k == "pool")
    return f"features.{max(i for i, k in enumerate(kinds[:last_pool]) if k == 'relu')}"


def _vgg(name: str, cfg_key: str, **overrides) -> VGG:
    config = default_config(arch=name, **overrides)
    config.setdefault("layers", list(cfgs[cfg_key]))
    layers = config["layers"]
    # Grad-CAM at the last conv block before the last pool: 5x5 at 44 px (the final stage is only 2x2).
    config.setdefault("cam_layer", _last_relu_before_last_pool(layers, bool(config.get("attention"))))
    return VGG(**config)


@register_model
def vgg19(**cfg) -> VGG:
    """VGG19-BN for 48x48 FER faces (about 20M parameters)."""
    return _vgg("vgg19", "E_fer", **cfg)


@register_model
def vgg19_cbam(**cfg) -> VGG:
    """VGG19-BN with a CBAM module closing each stage; exposes the stages' spatial attention maps."""
    return _vgg("vgg19_cbam", "E_fer", **{"attention": True, **cfg})


@register_model
def vgg_tiny(**cfg) -> VGG:
    """A few-thousand-parameter VGG for tests."""
    return _vgg("vgg_tiny", "tiny", **cfg)


@register_model
def vgg_cbam_tiny(**cfg) -> VGG:
    return _vgg("vgg_cbam_tiny", "tiny", **{"attention": True, **cfg})
