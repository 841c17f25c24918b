"""Age: one batched forward pass of the age network over every face chip of the batch.

Writes ``age`` (expected age in years) and ``age_sd`` (standard deviation of the predicted age distribution, a
per-face uncertainty) for every face, filtered or not: the quality filters decide what the statistics use, and
keeping the age of filtered faces lets their effect be measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from colortrend.errors import ConfigError
from colortrend.models import WEIGHTS_DIR
from colortrend.stages.align import TEMPLATE_SCALE, chip_template, cut_chips
from colortrend.stages.base import Batch, Stage, ok_indices

#: Fine-tuned weights shipped with the package (``colortrend train age``), the default when present.
FINETUNED_WEIGHTS = WEIGHTS_DIR / "age_finetuned.pt"
#: dlib's network as converted by ``scripts/convert_age_onnx.py``: the starting point of fine-tuning.
DLIB_WEIGHTS = WEIGHTS_DIR / "age_dlib_cc0.pt"


@dataclass(frozen=True)
class AgeSettings:
    # "default" (the shipped fine-tuned weights, else the converted dlib ones), "dlib", or a path to an AgeNet file.
    weights: str = "default"
    # Chips per forward pass; a batch's chips go through in as few passes as this allows.
    batch_size: int = 4096
    # Average the predictions for each chip and its mirror image (twice the age network's cost).
    flip_average: bool = True
    # Chip scales whose predictions are averaged (test-time augmentation): 1.0 is the aligner's chip, 0.94 shows a
    # little more of the head, 1.06 a little less. Each scale is one more pass of the network.
    scales: tuple[float, ...] = (0.94, 1.0, 1.06)

    def __post_init__(self) -> None:
        if not self.scales or not all(0.5 <= s <= 2.0 for s in self.scales):
            raise ValueError("scales: one or more chip scales between 0.5 and 2.0 (1.0 = the aligner's chip)")


def resolve_weights(weights: str) -> Path:
    """The weight file an :class:`AgeSettings.weights` value names; a missing file is a configuration error."""
    if weights == "default":
        path = FINETUNED_WEIGHTS if FINETUNED_WEIGHTS.exists() else DLIB_WEIGHTS
    elif weights == "dlib":
        path = DLIB_WEIGHTS
    else:
        path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"age.weights: no weight file at {path}")
    return path


def estimate_ages(
    model, chips: np.ndarray, device: str, batch_size: int = 4096, flip_average: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Age and age_sd (float32, (n,)) of (n, 64, 64, 3) uint8 chips with a loaded :class:`AgeNet`."""
    import torch

    from colortrend.models.age_net import chips_to_tensor

    ages, sds = [], []
    with torch.inference_mode():
        for start in range(0, len(chips), batch_size):
            mean, sd = model.predict(chips_to_tensor(chips[start : start + batch_size], device), flip_average)
            ages.append(mean.cpu().numpy())
            sds.append(sd.cpu().numpy())
    if not ages:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(ages).astype(np.float32), np.concatenate(sds).astype(np.float32)


class AgeStage(Stage):
    """Reads the align stage's ``chips``; writes ``age`` and ``age_sd`` per face."""

    name = "age"
    face_fields = pa.schema([("age", pa.float32()), ("age_sd", pa.float32())])

    def __init__(self, settings: AgeSettings | None = None, device: str = "cpu"):
        super().__init__(settings or AgeSettings(), device)
        self._model = None

    def model_files(self) -> list[str]:
        return [str(resolve_weights(self.settings.weights))]

    def setup(self) -> None:
        from colortrend.models.age_net import load_age_net

        self._model = load_age_net(resolve_weights(self.settings.weights), self.device)

    def process(self, batch: Batch) -> Batch:
        n_photos = len(batch["status"])
        batch["age"] = [np.zeros(0, np.float32) for _ in range(n_photos)]
        batch["age_sd"] = [np.zeros(0, np.float32) for _ in range(n_photos)]
        photos = [i for i in ok_indices(batch) if len(batch["chips"][i])]
        if not photos:
            return batch
        ages, sds = self._estimate(batch, photos)
        start = 0
        for i in photos:
            n = len(batch["chips"][i])
            batch["age"][i], batch["age_sd"][i] = ages[start : start + n], sds[start : start + n]
            start += n
        return batch

    def _estimate(self, batch: Batch, photos: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Age and age_sd of every face of ``photos``: the moments of the mixture of the per-scale distributions."""
        means, second_moments = [], []
        for scale in self.settings.scales:
            if scale == 1.0:
                chips = np.concatenate([batch["chips"][i] for i in photos])
            else:
                template = chip_template(scale=TEMPLATE_SCALE * scale)
                chips = np.concatenate([
                    cut_chips(batch["image"][i], np.asarray(batch["landmarks"][i]).reshape(-1, 5, 2), template=template)
                    for i in photos
                ])
            mean, sd = estimate_ages(self._model, chips, self.device, self.settings.batch_size,
                                     self.settings.flip_average)
            means.append(mean.astype(np.float64))
            second_moments.append(sd.astype(np.float64) ** 2 + means[-1] ** 2)
        age = np.mean(means, axis=0)
        sd = np.sqrt(np.maximum(np.mean(second_moments, axis=0) - age**2, 0.0))
        return age.astype(np.float32), sd.astype(np.float32)
