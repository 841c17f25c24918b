"""Age: batched forward passes of the age networks over every face chip of the batch.

The prediction for a face is the mixture of the distributions of every (network, chip scale, mirror image) view.
The shipped default averages four networks that each see the face differently: two of dlib's ResNet-10 fine-tuned
on 96-px chips framed wider (more hair, ears and neck) and closer (the inner face in more detail) than the aligner's
template, and two EfficientNet-Lite0 trained from ImageNet weights on 112-px chips, framed wide and as the aligner
frames them; all four trained on All-Age-Faces, UTKFace and FairFace's age bands (``docs/models.md``). Networks
that differ in what they see, and in what they started from, err differently, so their average removes more error
(validation MAE on All-Age-Faces: 5.16-5.57 alone, 4.71 together). With such different views, test-time chip
scales (``scales``) add nothing, so the default is the trained framing only.

Each network's chips are cut from the photo at the side and framing it was trained on (both stored with its
weights), with the aligner's template; networks of the same geometry share their chips.

Writes ``age`` (the median of the mixture, in years: the estimate with the least expected absolute error, and
lower validation MAE than the mixture's mean) and ``age_sd`` (its standard deviation, a per-face uncertainty) for
every face, filtered or not: the quality filters decide what the statistics use, and keeping the age of filtered
faces lets their effect be measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from colortrend.errors import ConfigError
from colortrend.models import WEIGHTS_DIR
from colortrend.stages.align import CHIP_SIZE, cut_chips, cut_chips_on_device
from colortrend.stages.base import Batch, Stage, ok_indices

#: Networks shipped with the package, averaged by default (the README gives each one's ``train age`` command): their
#: architecture, chip side and framing (chip scale) differ, so their errors do.
FINETUNED_WEIGHTS = tuple(WEIGHTS_DIR / name for name in (
    "age_finetuned_96_wide.pt",  # dlib's ResNet-10, 96 px, chip scale 0.8: more hair, ears and neck
    "age_finetuned_96_close.pt",  # dlib's ResNet-10, 96 px, chip scale 1.25: the inner face in more detail
    "age_lite0_112_wide.pt",  # EfficientNet-Lite0 from ImageNet, 112 px, chip scale 0.8
    "age_lite0_112.pt",  # EfficientNet-Lite0 from ImageNet, 112 px, the aligner's framing
))
#: dlib's network as converted by ``scripts/convert_age_onnx.py``: the starting point of fine-tuning.
DLIB_WEIGHTS = WEIGHTS_DIR / "age_dlib_cc0.pt"


@dataclass(frozen=True)
class AgeSettings:
    # Networks whose predictions are averaged: "default" (the shipped four), "dlib" (the original network), or
    # paths to files written by `colortrend train age`. One name or path alone is a list of one.
    weights: tuple[str, ...] = ("default",)
    # Chips per forward pass; a batch's chips go through in as few passes as this allows.
    batch_size: int = 4096
    # Average the predictions for each chip and its mirror image (twice the age network's cost).
    flip_average: bool = True
    # Chip scales whose predictions are averaged (test-time augmentation), relative to the framing each network was
    # trained on: 1.0 is that framing, 0.94 shows a little more of the head, 1.06 a little less. Each scale is one
    # more pass of each network; with the default four networks more scales do not lower the error.
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if isinstance(self.weights, str):
            object.__setattr__(self, "weights", (self.weights,))
        if not self.weights:
            raise ValueError("weights: name at least one network (default, dlib or a weights file)")
        if not self.scales or not all(0.5 <= s <= 2.0 for s in self.scales):
            raise ValueError("scales: one or more chip scales between 0.5 and 2.0 (1.0 = the trained framing)")


def resolve_weights(weights: str | tuple[str, ...]) -> list[Path]:
    """The weight files an :class:`AgeSettings.weights` value names; a missing file is a configuration error."""
    paths: list[Path] = []
    for name in (weights,) if isinstance(weights, str) else weights:
        if name == "default":
            paths += FINETUNED_WEIGHTS
        elif name == "dlib":
            paths.append(DLIB_WEIGHTS)
        else:
            paths.append(Path(name).expanduser())
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"age.weights: no weight file at {path}")
    return paths


def age_distributions(
    model, chips, device: str, batch_size: int = 4096, flip_average: bool = True
) -> np.ndarray:
    """(n, classes) float32 probabilities over a loaded :class:`AgeModel`'s ages for (n, S, S, 3) uint8 chips
    (a numpy array, or a tensor on the model's device)."""
    import torch

    from colortrend.models.age_net import chips_to_tensor

    parts = [np.zeros((0, len(model.class_ages)), np.float32)]
    with torch.inference_mode():
        for start in range(0, len(chips), batch_size):
            pixels = chips_to_tensor(chips[start : start + batch_size], device)
            parts.append(model.distribution(pixels, flip_average).cpu().numpy())
    return np.concatenate(parts)


def median_and_sd(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and standard deviation, in years (float32, (n,)), of distributions over the age classes 0, 1, 2, ...

    For the median each class k spreads its probability evenly over [k - 0.5, k + 0.5] (class 0, under one year,
    over [0, 0.5]), so the median moves smoothly with the probabilities. The standard deviation is that of the
    classes' ages (class 0 counts as 0.25 years, as in the networks' expected age).
    """
    from colortrend.models.age_net import class_ages

    ages = class_ages(probabilities.shape[1]).double().numpy()
    cumulative = np.cumsum(probabilities, axis=1)
    k = np.minimum((cumulative < 0.5).sum(axis=1), probabilities.shape[1] - 1)  # the class holding the median
    rows = np.arange(len(probabilities))
    inside = probabilities[rows, k]
    fraction = np.clip((0.5 - (cumulative[rows, k] - inside)) / np.maximum(inside, 1e-12), 0.0, 1.0)
    lower = np.maximum(k - 0.5, 0.0)
    median = lower + fraction * (k + 0.5 - lower)
    mean = probabilities @ ages
    sd = np.sqrt(np.maximum(probabilities @ ages**2 - mean**2, 0.0))
    return median.astype(np.float32), sd.astype(np.float32)


class AgeStage(Stage):
    """Cuts each network's chips from ``image`` at the ``landmarks``; writes ``age`` and ``age_sd`` per face."""

    name = "age"
    uses_accelerator = True
    reads = ("status", "image", "landmarks")
    face_fields = pa.schema([("age", pa.float32()), ("age_sd", pa.float32())])

    def __init__(self, settings: AgeSettings | None = None, device: str = "cpu"):
        super().__init__(settings or AgeSettings(), device)
        self._models: list = []

    def model_files(self) -> list[str]:
        return [str(p) for p in resolve_weights(self.settings.weights)]

    def setup(self) -> None:
        from colortrend.models.age_net import load_age_net

        self._models = [load_age_net(path, self.device) for path in resolve_weights(self.settings.weights)]

    @property
    def chip_geometry(self) -> list[tuple[int, float]]:
        """(side, scale) of the chips each loaded network was trained on."""
        return [(int(model.chip_size), float(model.chip_scale)) for model in self._models]

    def process(self, batch: Batch) -> Batch:
        n_photos = len(batch["status"])
        batch["age"] = [np.zeros(0, np.float32) for _ in range(n_photos)]
        batch["age_sd"] = [np.zeros(0, np.float32) for _ in range(n_photos)]
        photos = [i for i in ok_indices(batch) if len(batch["landmarks"][i])]
        if not photos:
            return batch
        ages, sds = self._estimate(batch, photos)
        start = 0
        for i in photos:
            n = len(batch["landmarks"][i])
            batch["age"][i], batch["age_sd"][i] = ages[start : start + n], sds[start : start + n]
            start += n
        return batch

    def chips(self, batch: Batch, photos: list[int], size: int = CHIP_SIZE, scale: float = 1.0,
              pyramids: dict | None = None):
        """The ``size``-px chips of every face of ``photos`` at chip ``scale`` (64 px at scale 1: the aligner's):
        (n, size, size, 3) uint8, cut by OpenCV, or on the device from the photos' shared copies there (calls with
        the same ``pyramids`` share the photos' halvings)."""
        device = self.torch_device()
        if device is not None:
            from colortrend.color.torch_ops import photo_on_device

            copies = [photo_on_device(batch["image"][i], device) for i in photos]
            faces = [(k, points) for k, i in enumerate(photos)
                     for points in np.asarray(batch["landmarks"][i]).reshape(-1, 5, 2)]
            return cut_chips_on_device(copies, faces, size, scale, pyramids)
        return np.concatenate([
            cut_chips(batch["image"][i], np.asarray(batch["landmarks"][i]).reshape(-1, 5, 2), size, scale=scale)
            for i in photos
        ])

    def _estimate(self, batch: Batch, photos: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Age and age_sd of every face of ``photos``: the median and standard deviation of the equal mixture of
        the distributions of every network at every scale."""
        views: list[np.ndarray] = []
        cut: dict[tuple[int, float], np.ndarray] = {}  # networks of the same chip geometry share their chips
        pyramids: dict = {}  # and on the device, every geometry shares the photos' halvings
        for model, (size, chip_scale) in zip(self._models, self.chip_geometry):
            for scale in self.settings.scales:
                key = (size, chip_scale * scale)
                if key not in cut:
                    cut[key] = self.chips(batch, photos, *key, pyramids=pyramids)
                views.append(age_distributions(model, cut[key], self.device, self.settings.batch_size,
                                               self.settings.flip_average))
        classes = max(view.shape[1] for view in views)  # heads differ in length (dlib's ends at 80 years)
        mixture = np.mean([np.pad(view.astype(np.float64), ((0, 0), (0, classes - view.shape[1]))) for view in views],
                          axis=0)
        return median_and_sd(mixture)
