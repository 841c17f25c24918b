"""The person/garment parser: an EfficientNet-Lite0 encoder with a light FPN decoder, in plain PyTorch.

It labels the person of one crop (:mod:`colortrend.models.parser_crops`) with the classes of
:mod:`colortrend.models.parse_classes`. The encoder is EfficientNet-Lite0 (:mod:`colortrend.models.efficientnet_lite`),
initialised from ImageNet in training.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from colortrend.models.efficientnet_lite import PIXEL_MEAN, PIXEL_STD, Lite0Encoder, conv_bn, fuse_batchnorm
from colortrend.models.parse_classes import PARSE_CLASSES
from colortrend.models.parser_crops import PAD_VALUE, CropGeometry, crop_window


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


def normalize(crops: np.ndarray | torch.Tensor, device: str = "cpu", half: bool = False) -> torch.Tensor:
    """uint8 RGB crops (N, H, W, 3) -> normalised float tensor (N, 3, H, W) in channels_last memory format."""
    x = crops if isinstance(crops, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(crops))
    x = x.to(device)
    x = x.permute(0, 3, 1, 2).float().sub_(PIXEL_MEAN).div_(PIXEL_STD)
    x = x.contiguous(memory_format=torch.channels_last)
    return x.half() if half else x


def cut_crops_on_device(images: list[np.ndarray], photo_of: list[int],
                        boxes: list[tuple[float, float, float, float]], geom: CropGeometry,
                        device: str) -> torch.Tensor:
    """:func:`~colortrend.models.parser_crops.cut_crop` of each box of ``images[photo_of[k]]``, made by torch on
    ``device``: (N, H, W, 3) uint8 there. Each photo crosses to the device once; OpenCV's own weights, so codes
    differ only by its fixed-point rounding."""
    from colortrend.color.torch_ops import opencv_resize, photo_on_device

    out = torch.full((len(boxes), geom.input_h, geom.input_w, 3), PAD_VALUE, dtype=torch.uint8, device=device)
    on_device: dict[int, torch.Tensor] = {}
    for k, (p, box) in enumerate(zip(photo_of, boxes)):
        window = crop_window(box, geom, *images[p].shape[:2])
        if window is None:
            continue
        if p not in on_device:
            on_device[p] = photo_on_device(images[p], device)
        (px0, py0, px1, py1), (cx0, cy0, cx1, cy1) = window.photo, window.crop
        part = on_device[p][py0:py1, px0:px1][None].float()
        part = opencv_resize(part, (cx1 - cx0, cy1 - cy0), "area" if window.shrinks else "linear")
        out[k, cy0:cy1, cx0:cx1] = part[0].round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_parser(path: str | Path, device: str = "cpu") -> ParserNet:
    """The shipped parser ready for inference (batch norm folded): fp16 on CUDA, fp32 on CPU (fp16 convolutions
    are slow there)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = ParserNet()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model = fuse_batchnorm(model.eval()).to(device).to(memory_format=torch.channels_last)
    return model.half() if str(device).startswith("cuda") else model  # cuda:1 too


def predict_crops(model: ParserNet, crops: np.ndarray, flip_average: bool = False,
                  max_batch: int = 64) -> np.ndarray:
    """Class probabilities (N, H/2, W/2, classes) float32 for uint8 crops (N, H, W, 3), ``max_batch`` at a time.

    ``flip_average`` also parses each crop's mirror image and averages the two (twice the compute).
    """
    out = [p.permute(0, 2, 3, 1).cpu().numpy() for p in _probabilities(model, crops, flip_average, max_batch)]
    if not out:
        return np.zeros((0, 0, 0, len(PARSE_CLASSES)), np.float32)
    return np.concatenate(out)


def predict_labels_on_photo(model: ParserNet, crops: np.ndarray | torch.Tensor,
                            boxes: list[tuple[float, float, float, float]], photo_sizes: list[tuple[int, int]],
                            flip_average: bool = False,
                            max_batch: int = 64) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Per crop, on the model's device: its class probabilities resampled onto the pixels its box covers in its
    photo (``photo_sizes``: height, width; bilinear, as :func:`~colortrend.models.parser_crops.probs_to_photo` does
    with OpenCV) and reduced there to ``(x0, y0, labels uint8, P(person) float32)``: only the reduced maps come back
    to the host, not every class's probabilities."""
    jobs = iter(zip(boxes, photo_sizes))
    return [_on_photo(one, box, *size) for probs in _probabilities(model, crops, flip_average, max_batch)
            for one, (box, size) in zip(probs, jobs)]


def _on_photo(probs: torch.Tensor, box: tuple[float, float, float, float], height: int,
              width: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    x0, y0 = max(math.floor(box[0]), 0), max(math.floor(box[1]), 0)
    x1, y1 = min(math.ceil(box[2]), width), min(math.ceil(box[3]), height)
    if x1 <= x0 or y1 <= y0:
        return x0, y0, np.zeros((0, 0), np.uint8), np.zeros((0, 0), np.float32)
    h, w = probs.shape[-2:]
    # The sampling positions of probs_to_photo (logit u was trained on crop pixel 2u+1), in grid_sample's
    # normalised coordinates (align_corners=False: pixel centre i at (2i + 1) / size - 1).
    ax, ay = w / (box[2] - box[0]), h / (box[3] - box[1])
    xs = torch.arange(x1 - x0, device=probs.device, dtype=torch.float64)
    ys = torch.arange(y1 - y0, device=probs.device, dtype=torch.float64)
    u = ax * xs + (x0 + 0.5 - box[0]) * ax - 0.75
    v = ay * ys + (y0 + 0.5 - box[1]) * ay - 0.75
    gx, gy = torch.broadcast_tensors(((2 * u + 1) / w - 1)[None, :], ((2 * v + 1) / h - 1)[:, None])
    grid = torch.stack([gx, gy], dim=-1)[None].to(probs.dtype)
    region = F.grid_sample(probs[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    labels = region.argmax(0).to(torch.uint8)
    return x0, y0, labels.cpu().numpy(), (1.0 - region[0]).cpu().numpy()


def _probabilities(model: ParserNet, crops: np.ndarray | torch.Tensor, flip_average: bool, max_batch: int):
    """Softmax probabilities (n, classes, H/2, W/2) float32 on the model's device, ``max_batch`` crops at a time."""
    param = next(model.parameters())
    for start in range(0, len(crops), max_batch):
        x = normalize(crops[start:start + max_batch], str(param.device), param.dtype == torch.float16)
        with torch.inference_mode():
            p = torch.softmax(model(x).float(), dim=1)
            if flip_average:
                p = (p + torch.softmax(model(x.flip(-1)).float(), dim=1).flip(-1)) / 2
        yield p
