"""The person/garment parser: an EfficientNet-Lite0 encoder with a light FPN decoder, in plain PyTorch.

The network sees one person at a time, on a crop anchored on that person's detected face (``crop_box``): the face
sits at the top centre of every crop, so the parser only has to label the person below it and can treat everything
else, passers-by included, as background. The same geometry is used in training and in the pipeline.

The encoder is EfficientNet-Lite0 (:mod:`colortrend.models.efficientnet_lite`), initialised from ImageNet in
training.

Labels. ``PARSE_CLASSES`` is what the network predicts; ``CCP_TO_PARSE`` maps the 59 Clothing Co-Parsing classes onto
it. One-piece garments (dress, romper, suit, swimwear, bodysuit, intimate) cannot be split at the waist from CCP's
labels, so each goes to the class of the body part it mostly covers: dresses and rompers to ``lower`` (the issue's
"lower garment / dress"), suits (jacket-led), bodysuits, intimates and swimwear to ``upper``. Items the data README
calls ambiguous (hat, scarf, tie, gloves, socks, stockings, tights, belt, accessories) are neither garment nor
background: they map to ``IGNORE`` and train nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from colortrend.models.efficientnet_lite import PIXEL_MEAN, PIXEL_STD, Lite0Encoder, conv_bn, fuse_batchnorm

PARSE_CLASSES = ("background", "skin", "hair", "upper", "lower", "shoes", "accessory")
BACKGROUND, SKIN, HAIR, UPPER, LOWER, SHOES, ACCESSORY = range(len(PARSE_CLASSES))
GARMENT_CLASSES = (UPPER, LOWER)
#: Label value that contributes nothing to the loss (ambiguous CCP classes, pixels outside the photo).
IGNORE = 255

#: Clothing Co-Parsing's class names by label id (its ``classes.csv``): the ids CCP-style masks hold.
CCP_CLASSES = (
    "null", "accessories", "bag", "belt", "blazer", "blouse", "bodysuit", "boots", "bra", "bracelet", "cape",
    "cardigan", "clogs", "coat", "dress", "earrings", "flats", "glasses", "gloves", "hair", "hat", "heels", "hoodie",
    "intimate", "jacket", "jeans", "jumper", "leggings", "loafers", "necklace", "panties", "pants", "pumps", "purse",
    "ring", "romper", "sandals", "scarf", "shirt", "shoes", "shorts", "skin", "skirt", "sneakers", "socks",
    "stockings", "suit", "sunglasses", "sweater", "sweatshirt", "swimwear", "t-shirt", "tie", "tights", "top", "vest",
    "wallet", "watch", "wedges",
)
#: Our class of each CCP class name; every CCP class appears exactly once.
CCP_TO_PARSE: dict[str, int] = {
    "null": BACKGROUND,
    "skin": SKIN,
    "hair": HAIR,
    **dict.fromkeys(
        ("blazer", "blouse", "bodysuit", "bra", "cape", "cardigan", "coat", "hoodie", "intimate", "jacket", "jumper",
         "shirt", "suit", "sweater", "sweatshirt", "swimwear", "t-shirt", "top", "vest"), UPPER),
    **dict.fromkeys(("dress", "jeans", "leggings", "panties", "pants", "romper", "shorts", "skirt"), LOWER),
    **dict.fromkeys(
        ("boots", "clogs", "flats", "heels", "loafers", "pumps", "sandals", "shoes", "sneakers", "wedges"), SHOES),
    **dict.fromkeys(
        ("bag", "bracelet", "earrings", "glasses", "necklace", "purse", "ring", "sunglasses", "wallet", "watch"),
        ACCESSORY),
    **dict.fromkeys(
        ("accessories", "belt", "gloves", "hat", "scarf", "socks", "stockings", "tie", "tights"), IGNORE),
}


def ccp_lookup() -> np.ndarray:
    """256-entry table taking CCP label ids to PARSE_CLASSES ids (IGNORE for ambiguous and unknown ids)."""
    lut = np.full(256, IGNORE, np.uint8)
    lut[:len(CCP_CLASSES)] = [CCP_TO_PARSE[name] for name in CCP_CLASSES]
    return lut


#: Grey that fills the parts of a crop outside the photo: 0 after normalisation.
PAD_VALUE = 127


@dataclass(frozen=True)
class CropGeometry:
    """Where a person's crop lies relative to their face box, and the network input size.

    The values the shipped weights were trained with are the defaults of ``SegmentSettings`` (its ``geometry``).
    """

    width: float  # crop width in face-box widths, centred on the face
    above: float  # crop top, in face-box heights above the face box top
    height: float  # crop height in face-box heights
    input_h: int  # network input height (multiple of 32)
    input_w: int  # network input width (multiple of 32)


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
             pad: int = PAD_VALUE, nearest: bool = False) -> np.ndarray:
    """The network input for ``box``: the photo resampled to the input size, ``pad`` where the box leaves the photo.

    A resize of the photo part (area-averaged when shrinking, so stripes and prints do not alias) rather than one
    affine warp, which would only point-sample. ``nearest`` is for label maps.
    """
    import cv2

    height, width = image.shape[:2]
    out = np.full((geom.input_h, geom.input_w, *image.shape[2:]), pad, image.dtype)
    m = crop_affine(box, geom)
    px0, py0 = max(math.ceil(box[0]), 0), max(math.ceil(box[1]), 0)
    px1, py1 = min(math.floor(box[2]), width), min(math.floor(box[3]), height)
    cx0, cy0 = (min(max(round(v), 0), n) for v, n in ((px0 * m[0, 0] + m[0, 2], geom.input_w),
                                                       (py0 * m[1, 1] + m[1, 2], geom.input_h)))
    cx1, cy1 = (min(max(round(v), 0), n) for v, n in ((px1 * m[0, 0] + m[0, 2], geom.input_w),
                                                       (py1 * m[1, 1] + m[1, 2], geom.input_h)))
    if px1 > px0 and py1 > py0 and cx1 > cx0 and cy1 > cy0:
        if nearest:
            flag = cv2.INTER_NEAREST
        else:
            flag = cv2.INTER_AREA if m[0, 0] < 1 else cv2.INTER_LINEAR
        out[cy0:cy1, cx0:cx1] = cv2.resize(image[py0:py1, px0:px1], (cx1 - cx0, cy1 - cy0), interpolation=flag)
    return out


def _sep_conv(c: int) -> nn.Sequential:
    """Depthwise-separable 3x3 convolution: the decoder's only spatial mixing, cheap at high resolution."""
    return nn.Sequential(conv_bn(c, c, 3, groups=c), conv_bn(c, c))


class ParserNet(nn.Module):
    """Lite0 encoder + FPN-style top-down decoder; logits at half the input resolution, one channel per class."""

    def __init__(self, num_classes: int = len(PARSE_CLASSES), width: int = 64, fine_width: int = 32):
        super().__init__()
        self.encoder = Lite0Encoder()
        c2, c4, c8, c16, c32 = Lite0Encoder.channels
        self.lateral = nn.ModuleList([conv_bn(c, width) for c in (c32, c16, c8, c4)])
        self.smooth = nn.ModuleList([_sep_conv(width) for _ in range(3)])
        # The stride-2 stage sharpens garment edges from the encoder's first block; kept narrow because it is large.
        self.fine_in = conv_bn(width, fine_width)
        self.fine_lateral = conv_bn(c2, fine_width)
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
    """The shipped parser ready for inference (batch norm folded): fp16 on CUDA, fp32 on CPU (fp16 convolutions
    are slow there)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = ParserNet()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model = fuse_batchnorm(model.eval()).to(device).to(memory_format=torch.channels_last)
    return model.half() if device == "cuda" else model


def predict_crops(model: ParserNet, crops: np.ndarray, flip_average: bool = False,
                  max_batch: int = 64) -> np.ndarray:
    """Class probabilities (N, H/2, W/2, classes) float32 for uint8 crops (N, H, W, 3), ``max_batch`` at a time.

    ``flip_average`` also parses each crop's mirror image and averages the two (twice the compute).
    """
    param = next(model.parameters())
    out = []
    for start in range(0, len(crops), max_batch):
        x = normalize(crops[start:start + max_batch], str(param.device), param.dtype == torch.float16)
        with torch.inference_mode():
            p = torch.softmax(model(x).float(), dim=1)
            if flip_average:
                p = (p + torch.softmax(model(x.flip(-1)).float(), dim=1).flip(-1)) / 2
        out.append(p.permute(0, 2, 3, 1).cpu().numpy())
    if not out:
        return np.zeros((0, 0, 0, len(PARSE_CLASSES)), np.float32)
    return np.concatenate(out)


def probs_to_photo(probs: np.ndarray, box: tuple[float, float, float, float], height: int,
                   width: int) -> tuple[int, int, np.ndarray]:
    """Resample one crop's probabilities onto the photo pixels its box covers: ``(x0, y0, (h, w, classes))``.

    Bilinear, with ``cv2`` (several times faster than torch on a CPU). The region is empty if the box misses the photo.
    """
    import cv2

    x0, y0 = max(math.floor(box[0]), 0), max(math.floor(box[1]), 0)
    x1, y1 = min(math.ceil(box[2]), width), min(math.ceil(box[3]), height)
    if x1 <= x0 or y1 <= y0:
        return x0, y0, np.zeros((0, 0, probs.shape[-1]), np.float32)
    # Logit u was trained on crop pixel 2u+1, whose centre is 2u+1.5 in crop units (pixel edges at integers);
    # photo pixel x has its centre at (x + 0.5 - box_x1) * scale there: solve for u and sample.
    ax, ay = probs.shape[1] / (box[2] - box[0]), probs.shape[0] / (box[3] - box[1])
    m = np.array([[ax, 0.0, (x0 + 0.5 - box[0]) * ax - 0.75], [0.0, ay, (y0 + 0.5 - box[1]) * ay - 0.75]])
    region = cv2.warpAffine(probs, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    return x0, y0, region.reshape(y1 - y0, x1 - x0, probs.shape[-1])
