"""Face alignment: cut each detected face into a 64x64 chip and measure face quality on it.

The chip serves the quality measures only: the age stage cuts each network's chips itself, at the side and framing
the network was trained on, with the same template (:func:`chip_template` scales with the chip).

The chip geometry lives in two pure functions, :func:`chip_transform` and :func:`cut_chips`, used identically by the
pipeline stage, ``colortrend eval age`` and ``colortrend train age``: a model only sees chips cut the way it was
trained on.

Geometry. dlib's age network was trained on ``get_face_chip_details(shape, 64, padding=0.2)`` chips: its 5-point
landmarks (eye corners, nose base) mapped by a similarity transform onto dlib's mean face, padded by 20 % of the
face square on every side. MTCNN's 5 points (eye centres, nose tip, mouth corners) are different points, so the
template here places them where dlib's 68-point mean face has them (eye centres = mean of points 36-41 / 42-47,
nose tip = 30, mouth corners = 48 / 54), in the same padded frame. A search over that template's scale (0.85-1.1)
and vertical shift (-4..+4 chip pixels) with the as-shipped dlib weights on 400 AAF + 400 UTKFace training-split
photos (``scripts/convert_age_onnx.py --search-template``) found the unscaled template best, and moving it 2 pixels
up the chip (more chin, less forehead) best on AAF: MAE 7.84 / 6.35 years (AAF / UTKFace), against 7.99 / 6.36
unshifted and 9.5-11 at the edges of the grid.

Resampling. dlib extracts chips from an image pyramid so that a large face shrunk to 64 pixels is not aliased;
:func:`cut_chips` does the same with ``cv2.pyrDown`` on a crop around each face, then ``cv2.warpAffine`` bilinear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from colortrend.stages.base import Batch, Stage, ok_indices

#: Side of the chip the age network reads.
CHIP_SIZE = 64
#: dlib's default ``get_face_chip_details`` padding, as a fraction of the face square, on each side.
CHIP_PADDING = 0.2
#: dlib's 68-point mean face (unit face square) at MTCNN's points: left eye centre, right eye centre, nose tip,
#: mouth left, mouth right (image left/right, facenet-pytorch order).
MEAN_FACE_5 = np.array(
    [
        [0.225492, 0.215990],  # mean of points 36-41
        [0.754761, 0.215990],  # mean of points 42-47
        [0.490127, 0.515625],  # point 30
        [0.254149, 0.780233],  # point 48
        [0.726104, 0.780233],  # point 54
    ]
)
#: Best-MAE adjustment of the template for the as-shipped dlib weights (see the module docstring).
TEMPLATE_SCALE = 1.0
TEMPLATE_SHIFT_Y = -2.0


def chip_template(
    size: int = CHIP_SIZE, scale: float = TEMPLATE_SCALE, shift_y: float = TEMPLATE_SHIFT_Y
) -> np.ndarray:
    """Where the 5 landmarks land in a ``size`` x ``size`` chip, (5, 2) float64 pixel coordinates.

    ``scale`` (about the landmarks' centre) and ``shift_y`` (in pixels of a 64-pixel chip, positive = down) adjust
    dlib's mean face; the defaults are the values the shipped weights expect.
    """
    unit = (CHIP_PADDING + MEAN_FACE_5) / (1 + 2 * CHIP_PADDING)
    centre = unit.mean(axis=0)
    unit = centre + (unit - centre) * scale
    return unit * size + np.array([0.0, shift_y * size / CHIP_SIZE])


def chip_transform(landmarks: np.ndarray, size: int = CHIP_SIZE, template: np.ndarray | None = None) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, shift; no reflection) from photo to chip.

    ``landmarks``: (5, 2) x, y pixel coordinates in MTCNN order; ``template``: where they should land (default
    :func:`chip_template`). Returns the (2, 3) matrix for ``cv2.warpAffine`` (closed-form least squares, so the
    result does not depend on a random sample as RANSAC estimators would).
    """
    src = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    dst = chip_template(size) if template is None else np.asarray(template, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - src_mean, dst - dst_mean
    # For 2-D similarity the optimum has a closed form in the complex plane: dst ~ z * src.
    a = (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum()
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum()
    norm = (s**2).sum()
    if norm <= 0:
        raise ValueError("degenerate landmarks: all five points coincide")
    a, b = a / norm, b / norm
    linear = np.array([[a, -b], [b, a]])
    return np.hstack([linear, (dst_mean - linear @ src_mean)[:, None]])


def transform_scale(matrix: np.ndarray) -> float:
    """Chip pixels per photo pixel of a similarity transform."""
    return float(math.hypot(matrix[0, 0], matrix[1, 0]))


def cut_chips(
    image: np.ndarray,
    landmarks: np.ndarray,
    size: int = CHIP_SIZE,
    template: np.ndarray | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Cut one aligned chip per face: ``image`` (H, W, 3) uint8, ``landmarks`` (n, 5, 2) -> (n, size, size, 3) uint8.

    Pixels outside the photo are black, as in dlib's ``extract_image_chip``. ``scale`` frames the face relative to
    the aligner's chip (below 1 shows more of the head; age networks store the scale they were trained on);
    ``template`` as in :func:`chip_transform` replaces the framing (only the template search passes one).
    """
    if template is None:
        template = chip_template(size, scale=TEMPLATE_SCALE * scale)
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    chips = np.zeros((len(landmarks), size, size, 3), dtype=np.uint8)
    for k, points in enumerate(landmarks):
        chips[k] = _cut_one(image, chip_transform(points, size, template), size)
    return chips


def _cut_one(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    scale = transform_scale(matrix)
    # Halve the photo as long as the chip still samples it at half its resolution or less, so bilinear sampling
    # never skips pixels (aliasing); faces already near chip size are warped directly.
    levels = max(0, math.floor(-math.log2(scale))) if scale > 0 else 0
    if levels == 0:
        return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)

    # Only the chip's footprint plus the reach of the pyramid kernels is halved, not the whole photo.
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64) @ inverse.T
    margin = 4 * 2**levels
    h, w = image.shape[:2]
    x0 = max(0, math.floor(corners[:, 0].min()) - margin)
    y0 = max(0, math.floor(corners[:, 1].min()) - margin)
    x1 = min(w, math.ceil(corners[:, 0].max()) + margin)
    y1 = min(h, math.ceil(corners[:, 1].max()) + margin)
    if x1 <= x0 or y1 <= y0:  # chip entirely outside the photo
        return np.zeros((size, size, 3), dtype=np.uint8)
    # Snap the crop to multiples of 2**levels: its pyramid then equals the whole photo's pyramid (away from the
    # crop edges), so a chip does not depend on where the crop happened to start.
    x0 -= x0 % 2**levels
    y0 -= y0 % 2**levels
    region, factor = image[y0:y1, x0:x1], 1
    for _ in range(levels):
        if min(region.shape[:2]) < 2:
            break
        region, factor = cv2.pyrDown(region), factor * 2
    # Pyramid pixel r sits at photo pixel (x0, y0) + factor * r (pyrDown keeps pixel 2j as its pixel j).
    local = np.hstack([matrix[:, :2] * factor, (matrix[:, :2] @ np.array([x0, y0]) + matrix[:, 2])[:, None]])
    return cv2.warpAffine(region, local, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


# ---------------------------------------------------------------------------------------------------------------
# Face quality


def face_size_px(landmarks: np.ndarray) -> np.ndarray:
    """Width of dlib's face square (about brow to chin) in photo pixels, from the chip scale: (n, 5, 2) -> (n,)."""
    inner = CHIP_SIZE / (1 + 2 * CHIP_PADDING)
    return np.array([inner / transform_scale(chip_transform(p)) for p in np.asarray(landmarks).reshape(-1, 5, 2)])


def yaw_proxy(landmarks: np.ndarray) -> np.ndarray:
    """Signed head-turn estimate in [-1, 1] from where the nose sits between the eyes: 0 frontal, +-1 profile.

    In the face frame (x along the eye line), ``(d_left - d_right) / (d_left + d_right)`` with d the horizontal
    distance from the nose tip to each eye centre; robust to roll and scale.
    """
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    axis = pts[:, 1] - pts[:, 0]
    axis /= np.linalg.norm(axis, axis=1, keepdims=True).clip(1e-9)
    d_left = ((pts[:, 2] - pts[:, 0]) * axis).sum(axis=1)
    d_right = ((pts[:, 1] - pts[:, 2]) * axis).sum(axis=1)
    return np.clip((d_left - d_right) / (np.abs(d_left) + np.abs(d_right)).clip(1e-9), -1.0, 1.0)


def sharpness(chips: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian over the face square of each grey chip, (n, S, S, 3) uint8 -> (n,): low = blurred.

    Only the face square counts, not the padding around it: where a face is near the photo's edge, the padding
    holds the black outside of the photo, whose border would read as sharp detail.
    """
    pad = math.ceil(chips.shape[1] * CHIP_PADDING / (1 + 2 * CHIP_PADDING))
    inner = slice(pad, chips.shape[1] - pad)
    out = np.zeros(len(chips))
    for k, chip in enumerate(chips):
        grey = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)
        out[k] = cv2.Laplacian(grey, cv2.CV_64F)[inner, inner].var()
    return out


@dataclass(frozen=True)
class AlignSettings:
    """Chip geometry is fixed (the age weights depend on it); these are the face quality filters.

    Defaults from degrading held-out AAF / UTKFace photos with the fine-tuned weights: shrinking faces to 32 px
    costs about 0.1 year of MAE, to 16 px about 0.8; blur that brings sharpness to about 45 costs 0.4, to 15
    about 1.8.
    """

    min_face_px: float = 32.0  # faces whose face square (brow to chin) is narrower, in photo pixels, are filtered
    min_sharpness: float = 30.0  # variance of the Laplacian over the chip's face square; below = blurred
    max_yaw: float = 0.6  # |yaw proxy| above which the head is turned too far (0 frontal, 1 profile)
    min_score: float = 0.95  # faces with a lower detection score are filtered


def filter_reasons(
    settings: AlignSettings, face_px: np.ndarray, sharp: np.ndarray, yaw: np.ndarray, score: np.ndarray
) -> list[str | None]:
    """The first failed quality check per face (None when the face passes): small, blurred, pose, low_score."""
    reasons: list[str | None] = []
    for px, sh, yw, sc in zip(face_px, sharp, yaw, score):
        if px < settings.min_face_px:
            reasons.append("small")
        elif sh < settings.min_sharpness:
            reasons.append("blurred")
        elif abs(yw) > settings.max_yaw:
            reasons.append("pose")
        elif sc < settings.min_score:
            reasons.append("low_score")
        else:
            reasons.append(None)
    return reasons


class AlignStage(Stage):
    """Writes the face quality columns, measured on each face's 64-px chip."""

    name = "align"
    reads = ("status", "image", "landmarks", "det_score")
    face_fields = pa.schema(
        [
            ("face_px", pa.float32()),
            ("sharpness", pa.float32()),
            ("yaw", pa.float32()),
            ("quality_ok", pa.bool_()),
            ("filter_reason", pa.string()),
        ]
    )

    def __init__(self, settings: AlignSettings | None = None, device: str = "cpu"):
        super().__init__(settings or AlignSettings(), device)

    def process(self, batch: Batch) -> Batch:
        n_photos = len(batch["status"])
        empty = self._empty_columns()
        out: dict[str, list] = {key: [value] * n_photos for key, value in empty.items()}
        for i in ok_indices(batch):
            landmarks = np.asarray(batch["landmarks"][i], dtype=np.float32).reshape(-1, 5, 2)
            if len(landmarks) == 0:
                continue
            chips = cut_chips(batch["image"][i], landmarks)
            face_px = face_size_px(landmarks)
            sharp = sharpness(chips)
            yaw = yaw_proxy(landmarks)
            score = np.asarray(batch["det_score"][i], dtype=np.float32)
            reasons = filter_reasons(self.settings, face_px, sharp, yaw, score)
            out["face_px"][i] = face_px.astype(np.float32)
            out["sharpness"][i] = sharp.astype(np.float32)
            out["yaw"][i] = yaw.astype(np.float32)
            out["quality_ok"][i] = np.array([r is None for r in reasons], dtype=bool)
            out["filter_reason"][i] = np.array(reasons, dtype=object)
        batch.update(out)
        return batch

    @staticmethod
    def _empty_columns() -> dict[str, np.ndarray]:
        return {
            "face_px": np.zeros(0, dtype=np.float32),
            "sharpness": np.zeros(0, dtype=np.float32),
            "yaw": np.zeros(0, dtype=np.float32),
            "quality_ok": np.zeros(0, dtype=bool),
            "filter_reason": np.zeros(0, dtype=object),
        }
