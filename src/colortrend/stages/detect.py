"""Stage "detect": faces and their 5 landmarks in every photo, the first model stage.

One :class:`~colortrend.models.mtcnn.FaceDetector` call covers all analysable photos of a batch (the detector
batches across photos of any sizes). Faces are kept when their final MTCNN score reaches ``min_score``, best first,
at most ``max_faces`` per photo. Coordinates are in pixels of the batch's ``image`` (the table builder maps them to
the original photo). Photos without a kept face keep status ``ok`` with ``n_faces`` 0.

Faces that fill the frame (close selfies, tight crops) are often missed: the chin or the forehead is cut off, and
MTCNN's windows need some margin around a face. A photo with no face is therefore searched once more inside a
border of its own edge colours (``retry_border`` times its longer side on each side); faces found there keep
coordinates in the photo's pixels (a box may reach past the edge). Only photos without a face pay for the retry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from colortrend.stages.base import Batch, Stage, fail, ok_indices

if TYPE_CHECKING:
    from colortrend.models.mtcnn import Detections

@dataclass(frozen=True)
class DetectSettings:
    min_face_px: int = 40  # smallest face side searched, in pixels (after max_side downscaling); smaller is slower
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)  # MTCNN P-, R-, O-Net face probability thresholds
    min_score: float = 0.7  # final detection score a face needs to be kept (the statistics filter again in align)
    max_side: int = 1280  # photos with a longer side are downscaled for detection (coordinates map back)
    max_faces: int = 20  # faces kept per photo, best scores first
    retry_border: float = 0.25  # photos without a face are searched again inside a border this fraction of their
    # longer side (tight crops and close selfies); 0 turns the retry off

    def __post_init__(self) -> None:
        if not 0.0 <= self.retry_border <= 1.0:
            raise ValueError("retry_border: a fraction of the photo's longer side, 0-1 (0 = no retry)")


class DetectStage(Stage):
    """Adds ``n_faces`` per photo and, per face, box, ``det_score``, ``landmarks`` (n, 10) and ``face_idx``."""

    name = "detect"
    uses_accelerator = True
    reads = ("status", "image")
    photo_fields = pa.schema([pa.field("n_faces", pa.int32())])
    face_fields = pa.schema(
        [
            pa.field("face_idx", pa.int32()),
            pa.field("box_x1", pa.float32()),
            pa.field("box_y1", pa.float32()),
            pa.field("box_x2", pa.float32()),
            pa.field("box_y2", pa.float32()),
            pa.field("det_score", pa.float32()),
            # x, y of left eye, right eye, nose, mouth left, mouth right (10 values)
            pa.field("landmarks", pa.list_(pa.float32())),
        ]
    )

    def __init__(self, settings: DetectSettings | None = None, device: str = "cpu"):
        super().__init__(settings or DetectSettings(), device)
        self._model = None

    def setup(self) -> None:
        from colortrend.models.mtcnn import FaceDetector

        s = self.settings
        self._model = FaceDetector(
            device=self.device, min_face_px=s.min_face_px, thresholds=s.thresholds, max_side=s.max_side
        )

    def model_files(self) -> list[str]:
        from colortrend.models import facenet_weights

        return [str(path) for path in facenet_weights()]

    def process(self, batch: Batch) -> Batch:
        n_photos = len(batch["status"])
        empty = _face_columns(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))
        columns = {name: [value] * n_photos for name, value in empty.items()}
        columns["n_faces"] = [0] * n_photos
        ok = ok_indices(batch)
        for i, found in zip(ok, self._detect_with_retry([batch["image"][i] for i in ok])):
            if isinstance(found, Exception):
                fail(batch, i, f"face detection failed: {type(found).__name__}: {found}")
                continue
            keep = np.flatnonzero(found.scores >= self.settings.min_score)[: self.settings.max_faces]
            for name, value in _face_columns(found.boxes[keep], found.scores[keep], found.landmarks[keep]).items():
                columns[name][i] = value
            columns["n_faces"][i] = len(keep)
        batch.update(columns)
        return batch

    def _detect_with_retry(self, images: list[np.ndarray]) -> list[Detections | Exception]:
        """Detections per image; images without a kept face are searched again inside a border (``retry_border``)."""
        results = self._detect(images)
        border = self.settings.retry_border
        missed = [k for k, found in enumerate(results)
                  if not isinstance(found, Exception) and not (found.scores >= self.settings.min_score).any()]
        if not border or not missed:
            return results
        import cv2

        from colortrend.models.mtcnn import Detections

        pads = [max(1, round(border * max(images[k].shape[:2]))) for k in missed]
        padded = [cv2.copyMakeBorder(images[k], pad, pad, pad, pad, cv2.BORDER_REPLICATE)
                  for k, pad in zip(missed, pads)]
        for k, pad, found in zip(missed, pads, self._detect(padded)):
            if isinstance(found, Exception) or not len(found):
                continue
            results[k] = Detections(boxes=found.boxes - pad, scores=found.scores, landmarks=found.landmarks - pad)
        return results

    def _detect(self, images: list[np.ndarray]) -> list[Detections | Exception]:
        """Detections per image; if the batched call fails, each image alone, an exception standing for a failure."""
        self._model.use_device_paths(self.torch_device() is not None)
        try:
            return self._model.detect(images)
        except Exception:  # one bad photo must not fail the batch: find it by retrying one by one
            results: list[Detections | Exception] = []
            for image in images:
                try:
                    results.extend(self._model.detect([image]))
                except Exception as exc:  # recorded on the photo
                    results.append(exc)
            return results


def _face_columns(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """The stage's face-level columns for faces with these (n, 4) boxes, (n,) scores and (n, 5, 2) landmarks."""
    return {
        "face_idx": np.arange(len(scores), dtype=np.int32),
        "box_x1": boxes[:, 0].astype(np.float32),
        "box_y1": boxes[:, 1].astype(np.float32),
        "box_x2": boxes[:, 2].astype(np.float32),
        "box_y2": boxes[:, 3].astype(np.float32),
        "det_score": scores.astype(np.float32),
        "landmarks": landmarks.reshape(-1, 10).astype(np.float32),
    }
