"""ResNet (He et al., 2016) for 48x48 FER faces, plain and with CBAM attention (Woo et al., ECCV 2018).

Small-image stem as in the CIFAR ResNets: a 3x3 stride-1 first conv and no max-pool, so a 44x44 crop gives
44 -> 22 -> 11 -> 6 maps in layers 1-4, and adaptive average pooling over the whole final map.
Grad-CAM targets the last block of ``layer3`` (11x11 at 44 px); ``layer4`` is only 6x6.

``resnet18_cbam`` adds a CBAM module (channel attention, then spatial attention) at the end of every
residual branch. Its forward pass can return the spatial attention map of each stage
(``forward(x, attention=True).attention``), which the app shows beside Grad-CAM.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._registry import register_model
from .attention import CBAM
from .base import FERModel, default_config
from .vgg import scale_width


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, attention: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.cbam = CBAM(planes) if attention else None
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor, attention_out: Optional[list] = None) -> torch.Tensor:
        # Attention maps go to a per-call list, not module state, so one model can serve concurrent requests.
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.cbam is not None:
            out, attn = self.cbam(out)
            if attention_out is not None:
                attention_out.append(attn)
        return self.relu(out + identity)


class ResNet(FERModel):
    """ResNet with a small-image stem; ``attention=True`` gives the CBAM variant."""

    def __init__(
        self, *, arch: str, layers: list, widths: list, width: float = 1.0, attention: bool = False,
        dropout: float = 0.0, cam_layer: str = "", stem_stride: int = 1, **config,
    ):
        if stem_stride != 1:  # only written to configs that use it, so older checkpoints' configs are unchanged
            config["stem_stride"] = int(stem_stride)
        super().__init__(
            arch=arch, layers=layers, widths=widths, width=width, attention=attention, dropout=dropout,
            cam_layer=cam_layer, **config,
        )
        widths = [scale_width(w, width) for w in widths]
        self.has_attention = bool(attention)
        self.conv1 = nn.Conv2d(self.in_chans, widths[0], 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (n_blocks, width) in enumerate(zip(layers, widths)):
            blocks = []
            for b in range(n_blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, width, stride, attention=attention))
                in_planes = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_planes, self.num_classes)
        self._init_weights()

    def forward_features(self, x: torch.Tensor, attention: Optional[dict] = None) -> torch.Tensor:
        """Body; when ``attention`` is a dict it receives ``{"layer<i>": B x h x w}``, each stage's last map."""
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            maps: Optional[list] = [] if attention is not None else None
            for block in getattr(self, f"layer{i + 1}"):  # blocks called one by one: Grad-CAM hooks a block
                x = block(x, maps)
            if maps:
                attention[f"layer{i + 1}"] = maps[-1][:, 0]
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


def _resnet(name: str, model_args: dict, **overrides) -> ResNet:
    config = {**model_args, **default_config(arch=name, **overrides)}
    config.setdefault("cam_layer", f"layer3.{config['layers'][2] - 1}")  # last block of stage 3: 11x11 at 44 px
    return ResNet(**config)


@register_model
def resnet18(**cfg) -> ResNet:
    """ResNet18 with a 3x3 stride-1 stem and no max-pool (about 11M parameters)."""
    return _resnet("resnet18", dict(layers=[2, 2, 2, 2], widths=[64, 128, 256, 512], attention=False), **cfg)


@register_model
def resnet18_cbam(**cfg) -> ResNet:
    """ResNet18 with CBAM channel + spatial attention in every block; exposes spatial attention maps."""
    return _resnet("resnet18_cbam", dict(layers=[2, 2, 2, 2], widths=[64, 128, 256, 512], attention=True), **cfg)


@register_model
def resnet_tiny(**cfg) -> ResNet:
    return _resnet("resnet_tiny", dict(layers=[1, 1, 1, 1], widths=[8, 16, 16, 32], attention=False), **cfg)


@register_model
def resnet_cbam_tiny(**cfg) -> ResNet:
    return _resnet("resnet_cbam_tiny", dict(layers=[1, 1, 1, 1], widths=[8, 16, 16, 32], attention=True), **cfg)


@register_model
def student(**cfg) -> ResNet:
    """A small, fast ResNet for live video: stride-2 stem and one basic block per stage (44 -> 22 -> 11 -> 6 -> 3;
    1.2M parameters). Trained by distillation from the fusion (``train --distill-from``). Grad-CAM on ``layer2``
    (11x11 at 44 px)."""
    return _resnet("student", dict(layers=[1, 1, 1, 1], widths=[32, 64, 128, 256], attention=False, stem_stride=2,
                                   cam_layer="layer2.0"), **cfg)
