"""The person/garment parser: an EfficientNet-Lite0 encoder with a light FPN decoder, in plain PyTorch.

The network sees one person at a time, on a crop anchored on that person's detected face (``crop_box``): the face
sits at the top centre of every crop, so the parser only has to label the person below it and can treat everything
else, passers-by included, as background. The same geometry is used in training and in the pipeline.

The encoder is defined here rather than imported so the runtime needs nothing beyond torch: its layout and parameter
names follow EfficientNet-Lite0 (Tan & Le 2019; no squeeze-excitation, ReLU6, fixed stem and head), whose ImageNet
weights only the training code reads (``colortrend.training.parsing``). Stride-2 convolutions pad like TensorFlow's
"SAME" (one more row/column at the bottom/right) so those weights keep the features they were trained to produce.

Labels. ``PARSE_CLASSES`` is what the network predicts; ``CCP_TO_PARSE`` maps the 59 Clothing Co-Parsing classes onto
it. One-piece garments (dress, romper, suit, swimwear, bodysuit, intimate) cannot be split at the waist from CCP's
labels, so each goes to the class of the body part it mostly covers: dresses and rompers to ``lower`` (the issue's
"lower garment / dress"), suits (jacket-led), bodysuits, intimates and swimwear to ``upper``. Items the data README
calls ambiguous (hat, scarf, tie, gloves, socks, stockings, tights, belt, accessories) are neither garment nor
background: they map to ``IGNORE`` and train nothing.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

PARSE_CLASSES = ("background", "skin", "hair", "upper", "lower", "shoes", "accessory")
UPPER, LOWER = PARSE_CLASSES.index("upper"), PARSE_CLASSES.index("lower")
GARMENT_CLASSES = (UPPER, LOWER)
#: Label value that contributes nothing to the loss (ambiguous CCP classes, pixels outside the photo).
IGNORE = 255

#: Our class of each CCP class name (``classes.csv`` in the CCP folder); every CCP class appears exactly once.
CCP_TO_PARSE: dict[str, int] = {
    "null": 0,
    "skin": 1,
    "hair": 2,
    **dict.fromkeys(
        ("blazer", "blouse", "bodysuit", "bra", "cape", "cardigan", "coat", "hoodie", "intimate", "jacket", "jumper",
         "shirt", "suit", "sweater", "sweatshirt", "swimwear", "t-shirt", "top", "vest"), UPPER),
    **dict.fromkeys(("dress", "jeans", "leggings", "panties", "pants", "romper", "shorts", "skirt"), LOWER),
    **dict.fromkeys(
        ("boots", "clogs", "flats", "heels", "loafers", "pumps", "sandals", "shoes", "sneakers", "wedges"), 5),
    **dict.fromkeys(
        ("bag", "bracelet", "earrings", "glasses", "necklace", "purse", "ring", "sunglasses", "wallet", "watch"), 6),
    **dict.fromkeys(
        ("accessories", "belt", "gloves", "hat", "scarf", "socks", "stockings", "tie", "tights"), IGNORE),
}

# EfficientNet-Lite0 stages: (repeats, kernel, stride, expansion, out channels); input to the first is the 32-ch stem.
_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                 (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# Index of the last block at strides 2, 4, 8, 16, 32: the decoder's skip connections.
_SKIP_BLOCKS = (0, 2, 4, 10, 15)
_BN_EPS = 1e-3
#: Input normalisation of EfficientNet-Lite (TensorFlow preprocessing): (rgb - 127) / 128.
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0
#: Grey that fills the parts of a crop outside the photo: 0 after normalisation.
PAD_VALUE = 127


@dataclass(frozen=True)
class CropGeometry:
    """Where a person's crop lies relative to their face box, in face widths/heights, and the network input size."""

    width: float = 4.0  # crop width in face widths, centred on the face
    above: float = 0.7  # crop top, in face heights above the face box top
    height: float = 8.0  # crop height in face heights
    input_h: int = 352  # network input height (multiple of 32)
    input_w: int = 192  # network input width (multiple of 32)


def crop_box(face: np.ndarray, geom: CropGeometry) -> tuple[float, float, float, float]:
    """Crop rectangle (x1, y1, x2, y2) in photo pixels for a face box; it may extend past the photo's edges."""
    x1, y1, x2, y2 = (float(v) for v in face[:4])
    fw, fh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cx = (x1 + x2) / 2
    top = y1 - geom.above * fh
    return cx - geom.width * fw / 2, top, cx + geom.width * fw / 2, top + geom.height * fh


def crop_affine(box: tuple[float, float, float, float], geom: CropGeometry) -> np.ndarray:
    """2x3 matrix taking photo pixel coordinates to network-input coordinates for ``box``."""
    x1, y1, x2, y2 = box
    sx, sy = geom.input_w / (x2 - x1), geom.input_h / (y2 - y1)
    return np.array([[sx, 0.0, -x1 * sx], [0.0, sy, -y1 * sy]], dtype=np.float64)


def cut_crop(image: np.ndarray, box: tuple[float, float, float, float], geom: CropGeometry,
             interpolation: int | None = None) -> np.ndarray:
    """The network input for ``box``: resampled to the input size, grey where the box leaves the photo."""
    import cv2

    m = crop_affine(box, geom)
    if interpolation is None:  # shrinking: area averaging avoids aliasing on fine patterns (stripes, prints)
        interpolation = cv2.INTER_AREA if m[0, 0] < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(image, m, (geom.input_w, geom.input_h), flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(PAD_VALUE,) * 3)


def _same_pad(kernel: int) -> nn.Module:
    # TensorFlow "SAME" for stride 2 on even sizes: total padding k - 2, the extra row/column at the bottom/right.
    total = kernel - 2
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: dict[str, nn.Module] = {}
    if stride == 2:
        layers["pad"] = _same_pad(kernel)
    layers["conv"] = nn.Conv2d(cin, cout, kernel, stride, 0 if stride == 2 else kernel // 2, groups=groups, bias=False)
    layers["bn"] = nn.BatchNorm2d(cout, eps=_BN_EPS)
    if act:
        layers["act"] = nn.ReLU6(inplace=True)
    return nn.Sequential(OrderedDict(layers))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, linear 1x1 projection, identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = _conv_bn(mid, cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.skip else y


class Lite0Encoder(nn.Module):
    """EfficientNet-Lite0 without its classifier head; returns the features at strides 2, 4, 8, 16 and 32."""

    channels = (16, 24, 40, 112, 320)

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 32, 3, 2)
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


def _sep_conv(c: int) -> nn.Sequential:
    """Depthwise-separable 3x3 convolution: the decoder's only spatial mixing, cheap at high resolution."""
    return nn.Sequential(_conv_bn(c, c, 3, groups=c), _conv_bn(c, c))


class ParserNet(nn.Module):
    """Lite0 encoder + FPN-style top-down decoder; logits at half the input resolution, one channel per class."""

    def __init__(self, num_classes: int = len(PARSE_CLASSES), width: int = 64, fine_width: int = 32):
        super().__init__()
        self.encoder = Lite0Encoder()
        c2, c4, c8, c16, c32 = Lite0Encoder.channels
        self.lateral = nn.ModuleList([_conv_bn(c, width) for c in (c32, c16, c8, c4)])
        self.smooth = nn.ModuleList([_sep_conv(width) for _ in range(3)])
        # The stride-2 stage sharpens garment edges from the encoder's first block; kept narrow because it is large.
        self.fine_in = _conv_bn(width, fine_width)
        self.fine_lateral = _conv_bn(c2, fine_width)
        self.fine = _sep_conv(fine_width)
        self.classify = nn.Conv2d(fine_width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: normalised (N, 3, H, W) with H, W multiples of 32 -> logits (N, classes, H/2, W/2)."""
        f2, f4, f8, f16, f32 = self.encoder(x)
        y = self.lateral[0](f32)
        for lateral, smooth, skip in zip(self.lateral[1:], self.smooth, (f16, f8, f4)):
            y = smooth(lateral(skip) + F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False))
        y = self.fine_in(F.interpolate(y, size=f2.shape[-2:], mode="bilinear", align_corners=False))
        y = self.fine(y + self.fine_lateral(f2))
        return self.classify(y)


def normalize(crops: np.ndarray, device: str = "cpu", half: bool = False) -> torch.Tensor:
    """uint8 RGB crops (N, H, W, 3) -> normalised float tensor (N, 3, H, W) in channels_last memory format."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(device)
    x = x.permute(0, 3, 1, 2).float().sub_(PIXEL_MEAN).div_(PIXEL_STD)
    x = x.contiguous(memory_format=torch.channels_last)
    return x.half() if half else x


def load_parser(path: str | Path, device: str = "cpu") -> ParserNet:
    """The shipped parser ready for inference: fp16 on CUDA, fp32 on CPU (fp16 convolutions are slow there)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = ParserNet()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    return model.half() if device == "cuda" else model
