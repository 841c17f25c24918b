"""Dominant colours: a CIELAB palette of each measured person's garments, and of their upper and lower garment.

Reads ``person_parse`` (segment) and ``image_wb`` (correct). For every person with a parse it gathers up to
``color.max_pixels`` garment pixels (upper + lower classes, evenly sampled) of the white-balanced photo, plus the
upper and lower garments on their own, and clusters all of them, for every person of the batch, in one batched
k-means (``colortrend.color.kmeans``; on a GPU, gathering and clustering both run there for the whole batch,
``torch_ops.garment_palettes``). The largest cluster is the dominant colour, named by the curated palette.

Face-level output columns are, per photo, lists with one entry per face; entries are None for faces without a
parse, and the upper/lower colours are None where that garment has fewer than ``color.min_part_px`` pixels.
The CIELAB columns are ``dominant_lab_l/a/b``: ``dominant_b`` is already the blue channel.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from colortrend.color.kmeans import Palette, palettes, sample_pixels
from colortrend.color.names import NAMED_COLORS, ColorName, nearest_index
from colortrend.models.parse_classes import IS_GARMENT, LOWER, UPPER
from colortrend.stages.base import Batch, Stage, ok_indices
from colortrend.stages.correct import ColorSettings

_RGB = ("r", "g", "b")
PALETTE_TYPE = pa.list_(pa.struct([("r", pa.uint8()), ("g", pa.uint8()), ("b", pa.uint8()), ("share", pa.float32())]))
COLUMNS = (
    *(f"dominant_{c}" for c in _RGB), "dominant_lab_l", "dominant_lab_a", "dominant_lab_b", "dominant_share",
    "palette", *(f"upper_{c}" for c in _RGB), *(f"lower_{c}" for c in _RGB), "color_name", "color_name_zh",
)
#: The pixels measured of each person: each part's table says which labels belong to it.
PARTS = (("all", IS_GARMENT), ("upper", np.arange(256) == UPPER), ("lower", np.arange(256) == LOWER))


class DominantStage(Stage):
    """Writes each measured person's dominant colour, palette, upper/lower colours and colour name."""

    name = "dominant"
    reads = ("status", "person_parse", "image_wb")
    garment_fields = pa.schema([
        *((f"dominant_{c}", pa.uint8()) for c in _RGB),
        ("dominant_lab_l", pa.float32()),
        ("dominant_lab_a", pa.float32()),
        ("dominant_lab_b", pa.float32()),
        ("dominant_share", pa.float32()),
        ("palette", PALETTE_TYPE),
        *((f"upper_{c}", pa.uint8()) for c in _RGB),
        *((f"lower_{c}", pa.uint8()) for c in _RGB),
        ("color_name", pa.string()),
        ("color_name_zh", pa.string()),
    ])

    def __init__(self, settings: ColorSettings | None = None, device: str = "cpu"):
        super().__init__(settings or ColorSettings(), device)

    def process(self, batch: Batch) -> Batch:
        s = self.settings
        n_photos = len(batch["status"])
        parses = batch["person_parse"]
        for column in COLUMNS:
            batch[column] = [[None] * len(parses[i]) for i in range(n_photos)]

        options = {"k": s.k, "max_pixels": s.max_pixels, "merge_delta_e": s.merge_delta_e, "seed": s.seed}
        people = [(i, j, parse) for i in ok_indices(batch) for j, parse in enumerate(parses[i]) if parse is not None]
        # Each part's label table and the pixels it needs: the segment stage parses only persons with enough garment
        # pixels (segment.min_clothing_px); a garment part of its own needs color.min_part_px.
        parts = [(table, 1 if name == "all" else s.min_part_px) for name, table in PARTS]
        device = self.torch_device()
        if device is None:
            found = self._part_pixels(batch["image_wb"], people, parts, s.max_pixels)
            flat = iter(palettes([pixels for person in found for pixels in person if pixels is not None], **options))
            results = [[None if pixels is None else next(flat) for pixels in person] for person in found]
        else:
            from colortrend.color.torch_ops import garment_palettes

            results = garment_palettes(batch["image_wb"], [(i, *parse) for i, _, parse in people], parts, device,
                                       **options)
        wholes = [(i, j, person[0]) for (i, j, _), person in zip(people, results) if person[0] is not None]
        names = nearest_index(np.array([p.dominant_lab for _, _, p in wholes]).reshape(-1, 3))  # all at once
        for (i, j, palette), name in zip(wholes, names):
            self._write_person(batch, i, j, palette, NAMED_COLORS[int(name)])
        for (i, j, _), person in zip(people, results):
            for (part, _), palette in zip(PARTS[1:], person[1:]):
                if palette is not None:
                    for c, value in zip(_RGB, palette.dominant_rgb):
                        batch[f"{part}_{c}"][i][j] = int(value)
        return batch

    @staticmethod
    def _part_pixels(images: list, people: list, parts: list, max_pixels: int) -> list[list[np.ndarray | None]]:
        """Per person, each part's pixels of the photo (at most ``max_pixels``, evenly sampled in the label map's
        row-major order), or None where the part has too few."""
        found = []
        for i, _, (x0, y0, labels) in people:
            flat_image, width = images[i].reshape(-1, 3), images[i].shape[1]
            found.append([])
            for table, needed in parts:
                idx = np.flatnonzero(table[labels])
                if len(idx) < needed:
                    found[-1].append(None)
                    continue
                # Sample label positions first, then read only those pixels of the photo.
                rows, cols = np.divmod(sample_pixels(idx, max_pixels), labels.shape[1])
                found[-1].append(flat_image[(y0 + rows) * width + x0 + cols])
        return found

    @staticmethod
    def _write_person(batch: Batch, i: int, j: int, palette: Palette, name: ColorName) -> None:
        for c, value in zip(_RGB, palette.dominant_rgb):
            batch[f"dominant_{c}"][i][j] = int(value)
        for c, value in zip("lab", palette.dominant_lab):
            batch[f"dominant_lab_{c}"][i][j] = float(value)
        batch["dominant_share"][i][j] = palette.dominant_share
        batch["palette"][i][j] = [{"r": int(r), "g": int(g), "b": int(b), "share": float(share)}
                                  for (r, g, b), share in zip(palette.rgb, palette.share)]
        batch["color_name"][i][j], batch["color_name_zh"][i][j] = name.en, name.zh
