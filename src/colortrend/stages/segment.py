"""Segment: each detected person's clothes, from a parser run on a crop anchored on their face.

For every face wide enough to show clothing, a crop is cut around where that person's body should be (the face at
the top centre, down to the feet; ``parser_crops.crop_box``), so one model serves full-body shots, half-body selfies
(the crop runs past the photo's edge and is padded there, as in training) and group photos alike. All crops of all
photos in the batch go through the parser in one batched forward pass (fp16 on CUDA, where the probabilities are
also mapped back onto the photo and reduced to labels, so only those come back to the host).

Crops of people standing close overlap, and each crop's parser may see part of the other person. A pixel claimed by
several people goes to the one whose parser is most confident it belongs to a person (1 - P(background)): the
parser was trained to call neighbours background, so the owner's own crop is normally the confident one.

Writes ``person_parse`` (in memory only: per face None, or ``(x0, y0, labels)`` with a uint8 PARSE_CLASSES map of
the person's bounding box at (x0, y0) in the analysed image) and per measured person its box and garment pixel
counts. A person is measured when at least ``min_clothing_px`` of their pixels are garments.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from colortrend.models import WEIGHTS_DIR
from colortrend.models.parse_classes import LOWER, UPPER
from colortrend.models.parser_crops import CropGeometry, crop_box, cut_crop, probs_to_photo
from colortrend.stages.base import Batch, Stage, ok_indices

#: The parser trained by ``colortrend train parsing`` (CCP), shipped with the package.
PARSER_WEIGHTS = WEIGHTS_DIR / "parser_lite0.pt"


@dataclass(frozen=True)
class SegmentSettings:
    # "default" (the shipped parser) or a path to weights saved by `colortrend train parsing`.
    weights: str = "default"
    # Crop around each face, in face-box widths (horizontally) and heights (vertically); with the input size, what
    # the weights were trained with. Measured on CCP with MTCNN boxes, 99.6 % of the labelled person's garment
    # pixels fall inside (garments end 11.3 face heights below the face top at the 99th percentile).
    crop_width: float = 6.0  # crop width, centred on the face
    crop_above: float = 0.8  # crop top above the face box top
    crop_height: float = 12.0  # crop height
    input_h: int = 320  # parser input height (multiple of 32)
    input_w: int = 128  # parser input width (multiple of 32)
    # Faces narrower than this (analysed pixels) are not parsed: their clothes are too small to measure.
    min_face_px: int = 16
    # A person is measured (gets a garments row) only with at least this many garment pixels.
    min_clothing_px: int = 400
    # Also parse each crop's mirror image and average: twice the parser's cost, no gain on CCP validation.
    flip_average: bool = False
    # Crops per forward pass; a batch's crops go through in as few passes as this allows.
    batch_size: int = 64

    @property
    def geometry(self) -> CropGeometry:
        return CropGeometry(self.crop_width, self.crop_above, self.crop_height, self.input_h, self.input_w)


def resolve_weights(weights: str) -> Path:
    """The weight file a :class:`SegmentSettings.weights` value names; raises FileNotFoundError if it is missing."""
    path = PARSER_WEIGHTS if weights == "default" else Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"segment.weights: no weight file at {path}")
    return path


Parse = tuple[int, int, np.ndarray]


def regions_from_probs(probs: np.ndarray, box: tuple[float, float, float, float], height: int,
                       width: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """One crop's probabilities on the photo pixels its box covers, reduced to ``(x0, y0, labels, P(person))``."""
    x0, y0, region = probs_to_photo(probs, box, height, width)
    return x0, y0, region.argmax(-1).astype(np.uint8), 1.0 - region[..., 0]


def assign_pixels(regions: list[tuple[int, int, np.ndarray, np.ndarray]], height: int,
                  width: int) -> list[Parse | None]:
    """Label maps of each person from their (x0, y0, labels, P(person)) regions, each pixel given to at most one.

    Where regions overlap, the pixel goes to the person with the highest P(not background) there. Each label map
    is trimmed to the person's bounding box; a person with no pixel left is None.
    """
    labels = [label for _, _, label, _ in regions]
    if len(regions) > 1:
        owner = np.full((height, width), -1, np.int16)
        best = np.zeros((height, width), np.float32)
        for k, (x0, y0, label, person) in enumerate(regions):
            window = (slice(y0, y0 + label.shape[0]), slice(x0, x0 + label.shape[1]))
            wins = (person > best[window]) & (label > 0)
            best[window][wins] = person[wins]
            owner[window][wins] = k
        for k, (x0, y0, label, _) in enumerate(regions):
            label[owner[y0:y0 + label.shape[0], x0:x0 + label.shape[1]] != k] = 0
    out: list[Parse | None] = []
    for (x0, y0, _, _), label in zip(regions, labels):
        rows, cols = np.flatnonzero(label.any(axis=1)), np.flatnonzero(label.any(axis=0))
        if not len(rows):
            out.append(None)
            continue
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        trimmed = np.ascontiguousarray(label[r0:r1, c0:c1])
        trimmed.flags.writeable = False  # final: white balance and the dominant stage share its device copy
        out.append((x0 + c0, y0 + r0, trimmed))
    return out


class SegmentStage(Stage):
    """Reads ``image`` and the face boxes; writes ``person_parse`` and the garment pixel columns per face."""

    name = "segment"
    uses_accelerator = True
    reads = ("status", "image", "n_faces", "box_x1", "box_y1", "box_x2", "box_y2")
    adds = ("person_parse",)  # per face None or (x0, y0, labels): see the module docstring
    garment_fields = pa.schema([
        ("person_x1", pa.int32()), ("person_y1", pa.int32()), ("person_x2", pa.int32()), ("person_y2", pa.int32()),
        ("clothing_px", pa.int32()), ("upper_px", pa.int32()), ("lower_px", pa.int32()),
    ])
    _COUNTS = ("person_x1", "person_y1", "person_x2", "person_y2", "clothing_px", "upper_px", "lower_px")

    def __init__(self, settings: SegmentSettings | None = None, device: str = "cpu"):
        super().__init__(settings or SegmentSettings(), device)
        self._model = None

    def model_files(self) -> list[str]:
        return [str(resolve_weights(self.settings.weights))]

    def setup(self) -> None:
        from colortrend.models.parser_net import load_parser

        self._model = load_parser(resolve_weights(self.settings.weights), self.device)

    def process(self, batch: Batch) -> Batch:
        # imports torch: loaded by setup() anyway
        from colortrend.models.parser_net import cut_crops_on_device, predict_crops, predict_labels_on_photo

        s, geom = self.settings, self.settings.geometry
        n_photos = len(batch["status"])
        batch["person_parse"] = [[] for _ in range(n_photos)]
        for col in self._COUNTS:
            batch[col] = [np.zeros(0, np.int32) for _ in range(n_photos)]

        # Every parseable face of every photo: (photo, face index, crop box).
        jobs: list[tuple[int, int, tuple[float, float, float, float]]] = []
        for i in ok_indices(batch):
            n = int(batch["n_faces"][i] or 0)
            batch["person_parse"][i] = [None] * n
            for col in self._COUNTS:
                batch[col][i] = np.zeros(n, np.int32)
            faces = np.stack([batch[f"box_{c}"][i] for c in ("x1", "y1", "x2", "y2")], axis=1) if n else []
            jobs += [(i, j, crop_box(face, geom)) for j, face in enumerate(faces) if face[2] - face[0] >= s.min_face_px]
        if not jobs:
            return batch

        sizes = [batch["image"][i].shape[:2] for i, _, _ in jobs]
        device = self.torch_device()
        if device is None:  # OpenCV's resizes and warps: faster than torch on a CPU
            crops = np.stack([cut_crop(batch["image"][i], box, geom) for i, _, box in jobs])
            probs = predict_crops(self._model, crops, s.flip_average, s.batch_size)
            regions = [regions_from_probs(p, box, *size) for p, (_, _, box), size in zip(probs, jobs, sizes)]
        else:  # on the device: each photo goes there once, only labels and P(person) come back to the host
            boxes = [box for _, _, box in jobs]
            crops = cut_crops_on_device(batch["image"], [i for i, _, _ in jobs], boxes, geom, device)
            regions = predict_labels_on_photo(self._model, crops, boxes, sizes, s.flip_average, s.batch_size)
        for i in sorted({i for i, _, _ in jobs}):
            height, width = batch["image"][i].shape[:2]
            mine = [(j, region) for (pi, j, _), region in zip(jobs, regions) if pi == i]
            for (j, _), parse in zip(mine, assign_pixels([r for _, r in mine], height, width)):
                if parse is not None:
                    self._measure(batch, i, j, parse)
        return batch

    def _measure(self, batch: Batch, i: int, j: int, parse: Parse) -> None:
        x0, y0, labels = parse
        # Two comparisons of the uint8 map: a tenth of bincount's time, which widens every label to 64 bits first.
        upper, lower = int(np.count_nonzero(labels == UPPER)), int(np.count_nonzero(labels == LOWER))
        values = (x0, y0, x0 + labels.shape[1], y0 + labels.shape[0], upper + lower, upper, lower)
        for col, value in zip(self._COUNTS, values):
            batch[col][i][j] = value
        if upper + lower >= self.settings.min_clothing_px:
            batch["person_parse"][i][j] = parse
