"""BatchNorm folding for inference: ``conv -> bn`` pairs become one conv with a bias.

In eval mode a BatchNorm is an affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, so
it can be merged into the convolution before it (as ``torch.fx.experimental.optimization.fuse`` and
``torch.ao.quantization.fuse_modules`` do, but without tracing, so the model's own ``forward`` — its attention
outputs, its per-module calls that Grad-CAM hooks — stays as it is). Each folded BatchNorm is replaced by an
``nn.Identity`` under the same name, so module paths such as a config's ``cam_layer`` still resolve.

The folded model computes the same function (to float rounding) but has a different ``state_dict`` (no
BatchNorm buffers, conv biases) and cannot be trained or saved as the original: fold a copy.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (which must directly follow ``conv``) into ``conv``'s weight and bias, in place."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    with torch.no_grad():
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        new_bias = (bias * scale + shift).to(conv.weight.dtype)
    conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) in eval mode with every ``Conv2d -> BatchNorm2d`` pair folded.

    A pair is two children of one module registered one after the other (the order of ``nn.Sequential`` and
    of this project's blocks, whose ``forward`` calls ``bnK`` right on ``convK``'s output); the BatchNorm must
    have as many features as the conv has output channels. ``tests/test_fold.py`` checks, for every
    registered architecture, that the outputs are unchanged, which is what guards this convention.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if (isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d
                    and bn.num_features == conv.out_channels and bn.track_running_stats):
                fold_conv_bn(conv, bn)
                setattr(parent, bn_name, nn.Identity())
    return model


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def prepare_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` for the prediction path: eval mode, BatchNorm folded, weights in channels_last.

    On this project's 2-core CPU both win for one-face batches (``benchmarks/app_speed.py`` measures them).
    A 1-channel input is the same tensor in either memory format, so callers need not convert their inputs.
    The original stays untouched (an explainer or ``save_pretrained`` can still use it).
    """
    fast = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    return fast.to(memory_format=torch.channels_last) if channels_last else fast
