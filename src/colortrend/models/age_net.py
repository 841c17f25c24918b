"""The age networks: one interface (:class:`AgeModel`), two architectures.

``aresnet10`` (:class:`AgeNet`): dlib's age predictor (Cydral, CC0) ported layer for layer to PyTorch. The original
is a dlib DNN: a 7x7/2 convolution and 3x3/2 max-pool stem, three residual stages (64, 128, 256 channels), global
average pooling and a fully connected layer whose softmax covers ages 0..80. dlib has no batch norm at inference:
each convolution is followed by a per-channel affine layer (``y = x * scale + offset``), kept here as its own module
so the converted weights stay one-to-one with the ONNX export. A down-sampling block's shortcut is a 2x2 average
pool, and dlib's residual add zero-pads whichever operand is smaller in channels, rows or columns at the *trailing*
end (the top-left origin of both stays aligned).

``lite0`` (:class:`Lite0AgeNet`): EfficientNet-Lite0 (ImageNet-initialised in training) with its 1280-channel head
convolution, global average pooling and a linear layer over the same age classes. It starts from general image
features rather than from an age model, so its errors differ from the dlib-based networks' and averaging the two
kinds removes more of them.

Three buffers travel with the weights of either. ``class_ages``: dlib weights class 0 as 0.25 years, and a
fine-tuned head may extend beyond 80, so the expectation is always taken over the ages the weights were trained
with. ``chip_size``: both networks are fully convolutional with a global average pool, so they run on any chip side,
but they only predict well on chips of the side they were trained on; the age stage cuts chips of that side (weights
saved before the buffer existed were trained on 64-px chips). ``chip_scale``: the face's scale in the chips trained
on (1.0 = the aligner's template; below 1 shows more of the head and neck), kept at full precision so the age stage
cuts the same chips.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from colortrend.models import efficientnet_lite as lite

#: Per-channel RGB means dlib subtracts before dividing by 256.
PIXEL_MEAN = (122.782, 117.001, 104.298)
#: Side of the square input chip dlib's weights were trained on, in pixels.
CHIP_SIZE = 64
#: Number of classes of the original head (ages 0..80).
DLIB_CLASSES = 81
#: Buffers saved at full precision.
EXACT = {"chip_scale"}


def class_ages(n_classes: int) -> torch.Tensor:
    """Years each class stands for: dlib counts class 0 (under one year) as 0.25, class k as k."""
    ages = torch.arange(n_classes, dtype=torch.float32)
    ages[0] = 0.25
    return ages


class Affine(nn.Module):
    """dlib's ``affine_`` layer: a per-channel scale and offset (a batch norm frozen at export)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.offset = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset


def _conv_affine(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding), Affine(c_out))


def padded_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: zero-pad the trailing channels/rows/columns of the smaller operand, then add."""
    shape = [max(sa, sb) for sa, sb in zip(a.shape[1:], b.shape[1:])]

    def grow(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        if (c, h, w) == tuple(shape):
            return t
        return F.pad(t, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - c))

    return grow(a) + grow(b)


class ResidualBlock(nn.Module):
    """Two 3x3 conv+affine layers and a shortcut; ``down`` halves the resolution and may widen the channels.

    A down block's first convolution is 3x3 stride 2 *without* padding (so 14 -> 6, 7 -> 3) while its shortcut is a
    2x2/2 average pool (14 -> 7, 7 -> 3): the padded add reconciles the two.
    """

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.conv1 = _conv_affine(c_in, c_out, 3, 2 if down else 1, 0 if down else 1)
        self.conv2 = _conv_affine(c_out, c_out, 3, 1, 1)
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(padded_add(shortcut, y))


class AgeModel(nn.Module):
    """Age from a square RGB face chip: ``forward`` returns logits over :attr:`class_ages`.

    Input: float or uint8 tensor (N, 3, S, S) of raw RGB values 0..255, S = :attr:`chip_size`, cut by
    :func:`colortrend.stages.align.cut_chips` at :attr:`chip_scale`; each architecture normalises inside, so callers
    (and GPU transfers) handle plain pixels.
    """

    def __init__(self, n_classes: int, chip_size: int, chip_scale: float):
        super().__init__()
        self.register_buffer("class_ages", class_ages(n_classes))
        self.register_buffer("chip_size", torch.tensor(chip_size, dtype=torch.int32))
        self.register_buffer("chip_scale", torch.tensor(chip_scale, dtype=torch.float64))

    def pretrained_layers(self, blocks: int) -> list[nn.Module]:
        """The input-side layers that keep their initial weights when ``blocks`` blocks are frozen in training."""
        raise NotImplementedError

    def predict(self, pixels: torch.Tensor, flip_average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected age and the standard deviation of the predicted distribution, both (N,) float32.

        ``flip_average`` averages the distributions of each chip and its mirror image (the chip template is
        left-right symmetric to within a pixel), at twice the cost.
        """
        return self.moments(self.distribution(pixels, flip_average))

    def distribution(self, pixels: torch.Tensor, flip_average: bool = False) -> torch.Tensor:
        """(N, classes) float32 probabilities over :attr:`class_ages` (see :meth:`predict` for ``flip_average``)."""
        p = self(pixels).float().softmax(dim=1)
        if flip_average:
            p = (p + self(pixels.flip(3)).float().softmax(dim=1)) / 2
        return p

    def moments(self, probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation, in years, of distributions over :attr:`class_ages`."""
        ages = self.class_ages.float()
        mean = probabilities @ ages
        var = probabilities @ ages.square() - mean.square()
        return mean, var.clamp_min(0).sqrt()


class AgeNet(AgeModel):
    """``aresnet10``: dlib's network (see the module docstring); 64-px chips unless fine-tuned on others."""

    def __init__(self, n_classes: int = DLIB_CLASSES, chip_size: int = CHIP_SIZE, chip_scale: float = 1.0):
        super().__init__(n_classes, chip_size, chip_scale)
        self.stem = _conv_affine(3, 64, 7, 2, 0)
        self.blocks = nn.Sequential(
            ResidualBlock(64, 64, down=False),
            ResidualBlock(64, 128, down=True),
            ResidualBlock(128, 128, down=False),
            ResidualBlock(128, 256, down=True),
            ResidualBlock(256, 256, down=False),
        )
        self.fc = nn.Linear(256, n_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the network's precision, exactly as dlib does.
        mean = torch.tensor(PIXEL_MEAN, device=pixels.device).view(1, 3, 1, 1)
        x = ((pixels.float() - mean) / 256.0).to(self.fc.weight.dtype).contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))

    def pretrained_layers(self, blocks: int) -> list[nn.Module]:
        return [self.stem, *self.blocks[:blocks]]


class Lite0AgeNet(AgeModel):
    """``lite0``: EfficientNet-Lite0 features, its head convolution, average pooling, dropout and the age classes."""

    def __init__(self, n_classes: int, chip_size: int, chip_scale: float = 1.0, dropout: float = 0.2):
        super().__init__(n_classes, chip_size, chip_scale)
        self.encoder = lite.Lite0Encoder()
        self.head = lite.lite0_head()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(lite.HEAD_CHANNELS, n_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = ((pixels.float() - lite.PIXEL_MEAN) / lite.PIXEL_STD).to(self.fc.weight.dtype)
        x = self.head(self.encoder(x.contiguous(memory_format=torch.channels_last))[-1])
        return self.fc(self.dropout(x.mean(dim=(2, 3))))

    def pretrained_layers(self, blocks: int) -> list[nn.Module]:
        return [self.encoder.stem, *self.encoder.blocks[:blocks]]


#: Architecture name -> class. A weights file's architecture is read from its parameter names.
ARCHITECTURES: dict[str, type[AgeModel]] = {"aresnet10": AgeNet, "lite0": Lite0AgeNet}


def architecture_of(state: dict[str, torch.Tensor]) -> str:
    """``lite0`` for a state dict with an EfficientNet encoder, else ``aresnet10``."""
    return "lite0" if any(key.startswith("encoder.") for key in state) else "aresnet10"


def chips_to_tensor(chips: np.ndarray | torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """(N, S, S, 3) uint8 chips -> (N, 3, S, S) uint8 tensor on ``device`` (normalised inside the network)."""
    if not isinstance(chips, torch.Tensor):
        chips = torch.from_numpy(np.ascontiguousarray(chips))
    return chips.to(device).permute(0, 3, 1, 2)


def build_age_net(state: dict[str, torch.Tensor]) -> AgeModel:
    """The network a state dict describes (architecture, head size and chip geometry), its weights loaded in
    float32 (the chip scale at full precision); in training mode, for further training."""
    state = dict(state)
    state.setdefault("chip_size", torch.tensor(CHIP_SIZE, dtype=torch.int32))
    state.setdefault("chip_scale", torch.tensor(1.0, dtype=torch.float64))
    n_classes, size = state["fc.weight"].shape[0], int(state["chip_size"])
    net = ARCHITECTURES[architecture_of(state)](n_classes=n_classes, chip_size=size)
    net.load_state_dict({k: v.float() if v.is_floating_point() and k not in EXACT else v for k, v in state.items()})
    return net


def load_age_net(path: str | Path, device: str = "cpu") -> AgeModel:
    """The network stored in ``path`` (an fp16 state dict written by :func:`save_age_net`), ready for inference.

    Batch norms are folded into their convolutions, and the weights stored channels-last. Weights are kept in
    float32 on CPU (fp16 convolutions are slow there) and cast to half on CUDA; the buffers (class ages, chip
    geometry) stay as saved.
    """
    net = lite.fuse_batchnorm(build_age_net(torch.load(path, map_location="cpu", weights_only=True)).eval()).to(device)
    net = net.to(memory_format=torch.channels_last)  # measured 15-25 % faster convolutions on CPU, same outputs
    if device.startswith("cuda"):
        for layers in net.children():  # the buffers live on the network itself, so they keep their precision
            layers.half()
    return net


def save_age_net(net: AgeModel, path: str | Path) -> None:
    """Write ``net`` as the shipped format: an fp16 state dict (class ages and chip geometry included; the chip
    scale stays float64 so inference cuts exactly the chips trained on)."""
    state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() and k not in EXACT else v.dtype)
             for k, v in net.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
