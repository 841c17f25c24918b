"""Colour correction: white-balance each photo before its garment colours are measured.

The light is estimated on the whole photo, not on the people in it: the illuminant is a property of the scene, and
an estimate made on a person's region is dominated by their clothes, so a red coat would be "corrected" towards
grey, the very error correction exists to avoid. For the same reason the garment pixels the parser found can be
left out of the estimate (``exclude_garments``). The gains are applied to the whole photo: it costs one lookup
table per channel (about a millisecond), and ``explain`` can then show exactly the pixels that were measured.

``ColorSettings`` is the YAML section ``color:``, shared with the dominant-colour stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from colortrend.color.white_balance import Regions, WbMethod, white_balance
from colortrend.models.parse_classes import IS_GARMENT
from colortrend.stages.base import Batch, Stage, ok_indices


@dataclass(frozen=True)
class ColorSettings:
    # White balance before measuring colours (scripts/measure_white_balance.py); none turns correction off.
    white_balance: WbMethod = "shades_of_gray"
    # Leave the garments the parser found out of the light estimate (a big garment would bias it to its colour).
    exclude_garments: bool = True
    # White-balance gains are clamped to [1/max_gain, max_gain]: a wrong estimate cannot ruin black or white.
    max_gain: float = 3.0
    # A light estimated closer than this (degrees) to neutral is taken as neutral and the photo left as it is.
    min_cast_deg: float = 2.0
    # k-means clusters per person before close ones are merged.
    k: int = 5
    # Garment pixels sampled (evenly) per person for clustering.
    max_pixels: int = 4000
    # An upper or lower garment with fewer pixels gets no colour of its own.
    min_part_px: int = 200
    # Clusters closer than this CIEDE2000 are merged (shading and weave split one colour into several).
    merge_delta_e: float = 6.0
    # Seed of the k-means++ draws: results are reproducible for a given seed.
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "max_gain": self.max_gain >= 1,
            "k": self.k >= 1,
            "max_pixels": self.max_pixels >= self.k,
            "min_part_px": self.min_part_px >= 1,
            "merge_delta_e": self.merge_delta_e >= 0,
            "min_cast_deg": self.min_cast_deg >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                limit = {"max_pixels": ">= k", "merge_delta_e": ">= 0", "min_cast_deg": ">= 0"}.get(key, ">= 1")
                raise ValueError(f"{key}: must be {limit}, got {getattr(self, key)}")


def garment_regions(parses: list) -> Regions:
    """Every person's garment pixels, from a photo's ``person_parse`` entries: what white balance leaves out."""
    return Regions(tuple(p for p in parses if p is not None), IS_GARMENT)


class CorrectStage(Stage):
    """White-balances ``image`` into ``image_wb``; ``landmarks`` serve the ``skin`` method, ``person_parse`` the
    ``exclude_garments`` setting."""

    name = "correct"
    reads = ("status", "image", "landmarks", "person_parse")
    adds = ("image_wb",)  # the white-balanced photo
    photo_fields = pa.schema([
        ("wb_method", pa.string()),
        ("wb_gain_r", pa.float32()),
        ("wb_gain_g", pa.float32()),
        ("wb_gain_b", pa.float32()),
    ])

    def __init__(self, settings: ColorSettings | None = None, device: str = "cpu"):
        super().__init__(settings or ColorSettings(), device)

    def process(self, batch: Batch) -> Batch:
        n_photos = len(batch["status"])
        for column in ("image_wb", "wb_method", "wb_gain_r", "wb_gain_g", "wb_gain_b"):
            batch[column] = [None] * n_photos
        settings = self.settings
        exclude = settings.exclude_garments and settings.white_balance != "none"
        todo = ok_indices(batch)
        images = [batch["image"][i] for i in todo]
        excludes = [garment_regions(batch["person_parse"][i]) if exclude else None for i in todo]
        landmarks = [batch["landmarks"][i] for i in todo]
        options = {"max_gain": settings.max_gain, "min_cast_deg": settings.min_cast_deg}
        device = self.torch_device()
        if device is None:
            results = [white_balance(image, settings.white_balance, landmarks=marks,
                                     exclude=None if regions is None else regions.mask(image.shape[:2]), **options)
                       for image, marks, regions in zip(images, landmarks, excludes)]
        else:
            from colortrend.color.torch_ops import white_balance_batch

            results = white_balance_batch(images, settings.white_balance, device, landmarks=landmarks,
                                          excludes=excludes, **options)
        for i, result in zip(todo, results):
            batch["image_wb"][i] = result.image
            batch["wb_method"][i] = result.method
            batch["wb_gain_r"][i], batch["wb_gain_g"][i], batch["wb_gain_b"][i] = (float(g) for g in result.gains)
        return batch
