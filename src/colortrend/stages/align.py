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
    return chip_transforms(np.asarray(landmarks)[None], size, template)[0]


def chip_transforms(landmarks: np.ndarray, size: int = CHIP_SIZE, template: np.ndarray | None = None) -> np.ndarray:
    """:func:`chip_transform` of (n, 5, 2) landmarks at once -> (n, 2, 3)."""
    src = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    dst = chip_template(size) if template is None else np.asarray(template, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=1), dst.mean(axis=0)
    s, d = src - src_mean[:, None], dst - dst_mean
    # For 2-D similarity the optimum has a closed form in the complex plane: dst ~ z * src.
    a = (s[..., 0] * d[:, 0] + s[..., 1] * d[:, 1]).sum(1)
    b = (s[..., 0] * d[:, 1] - s[..., 1] * d[:, 0]).sum(1)
    norm = (s**2).sum((1, 2))
    if (norm <= 0).any():
        raise ValueError("degenerate landmarks: all five points coincide")
    a, b = a / norm, b / norm
    mx, my = src_mean[:, 0], src_mean[:, 1]
    shift = np.stack([dst_mean[0] - (a * mx + -b * my), dst_mean[1] - (b * mx + a * my)], -1)  # dst - linear @ src
    return np.stack([np.stack([a, -b, shift[:, 0]], -1), np.stack([b, a, shift[:, 1]], -1)], 1)


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


def cut_chips_on_device(photos: list, faces: list[tuple[int, np.ndarray]], size: int = CHIP_SIZE,
                        scale: float = 1.0, pyramids: dict[int, list] | None = None):
    """:func:`cut_chips` of many photos' faces at once, on the device that holds the photos: ``photos`` (H, W, 3)
    uint8 tensors, ``faces`` (photo index, (5, 2) landmarks) -> (n, size, size, 3) uint8 tensor.

    Each photo is halved as often as its smallest face needs, once for all its faces: with :func:`cut_chips`'s
    crops snapped to the pyramid's grid and their margins wider than its kernels' reach, a chip cut from the whole
    photo's pyramid is the chip cut from its crop's. The halving is ``cv2.pyrDown``'s integer arithmetic,
    reproduced exactly (its 5-tap kernel, rounding and mirrored border); the warp is bilinear in floating point as
    OpenCV 5's ``warpAffine`` is, within one code of it, every chip in one gather. Calls given the same
    ``pyramids`` (photo index -> its halvings) share them: chips of several sizes halve each photo once.
    """
    template = chip_template(size, scale=TEMPLATE_SCALE * scale)
    device = photos[0].device if photos else "cpu"
    matrices = chip_transforms(np.array([points for _, points in faces]).reshape(-1, 5, 2), size, template)
    scales = np.hypot(matrices[:, 0, 0], matrices[:, 1, 0])
    levels = np.where(scales > 0, np.maximum(0, np.floor(-np.log2(np.where(scales > 0, scales, 1)))), 0).astype(int)
    pyramids = {} if pyramids is None else pyramids
    sources = []
    for k, (p, _) in enumerate(faces):
        pyramid = pyramids.setdefault(p, [photos[p]])
        while len(pyramid) <= levels[k] and min(pyramid[-1].shape[:2]) >= 2:
            pyramid.append(_pyr_down(pyramid[-1].int()).to(photos[p].dtype))
        level = min(levels[k], len(pyramid) - 1)
        sources.append(pyramid[level])
        matrices[k, :, :2] *= 2**level  # pyramid pixel r sits at photo pixel 2**level * r
    return _warp_bilinear(sources, matrices, size, device)


def _pyr_down(image):
    """``cv2.pyrDown`` of an (h, w, 3) int32 tensor: rows then columns with the kernel (1, 4, 6, 4, 1), the border
    mirrored without repeating the edge (BORDER_REFLECT_101), rounded once at the end."""
    import torch

    taps = torch.tensor([1, 4, 6, 4, 1], dtype=torch.int32, device=image.device)
    for dim in (0, 1):
        n = image.shape[dim]
        at = 2 * torch.arange((n + 1) // 2, device=image.device)[:, None] + torch.arange(-2, 3, device=image.device)
        at = torch.where(at < 0, -at, at)
        at = torch.where(at >= n, 2 * n - 2 - at, at).clamp(0, n - 1)
        picked = image.index_select(dim, at.reshape(-1))
        shape = (len(at), 5, *image.shape[1:]) if dim == 0 else (image.shape[0], len(at), 5, 3)
        image = (picked.view(shape) * taps.view(5, 1, 1) if dim == 0 else
                 picked.view(shape) * taps.view(5, 1)).sum(dim + 1, dtype=torch.int32)
    return (image + 128) >> 8


def _warp_bilinear(sources: list, matrices: np.ndarray, size: int, device):
    """``cv2.warpAffine(source, matrix, (size, size), INTER_LINEAR, borderValue=0)`` of each (source, matrix), as
    OpenCV 5 computes it: bilinear in floating point, rounded; pixels outside the source black. A None source gives
    a black chip."""
    import torch

    n = len(sources)
    chips = torch.zeros((n, size, size, 3), dtype=torch.uint8, device=device)
    kept = [k for k, source in enumerate(sources) if source is not None]
    if not kept:
        return chips
    # Every distinct source once (a photo serves all its faces' chips), one after another.
    distinct: dict[int, int] = {}
    for k in kept:
        distinct.setdefault(id(sources[k]), len(distinct))
    order = list({id(sources[k]): sources[k] for k in kept}.values())
    sizes = [int(source.shape[0] * source.shape[1]) for source in order]
    flat = torch.cat([source.reshape(-1, 3) for source in order])
    begins = np.cumsum([0] + sizes[:-1])
    which = [distinct[id(sources[k])] for k in kept]
    table = torch.tensor([(begins[d], order[d].shape[0], order[d].shape[1]) for d in which], dtype=torch.long)
    starts, h, w = table.to(device).unbind(1)
    h, w = h[:, None, None], w[:, None, None]
    inverse = np.stack([cv2.invertAffineTransform(matrices[k]) for k in kept])  # chip pixel -> source pixel
    m = torch.from_numpy(inverse).to(device)
    steps = torch.arange(size, device=device, dtype=torch.float64)
    x = m[:, 0, 0, None, None] * steps + m[:, 0, 1, None, None] * steps[:, None] + m[:, 0, 2, None, None]
    y = m[:, 1, 0, None, None] * steps + m[:, 1, 1, None, None] * steps[:, None] + m[:, 1, 2, None, None]
    ix, iy = x.floor(), y.floor()
    fx, fy = (x - ix).float(), (y - iy).float()
    # The four neighbours of every chip pixel at once: (4, k, size, size), top-left, top-right, bottom-left, ...
    xx = ix.long() + torch.tensor([0, 1, 0, 1], device=device).view(4, 1, 1, 1)
    yy = iy.long() + torch.tensor([0, 0, 1, 1], device=device).view(4, 1, 1, 1)
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    at = torch.where(inside, starts[:, None, None] + yy * w + xx, 0)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]) * inside
    total = (flat[at].float() * weights[..., None]).sum(0)
    chips[kept] = total.round().clamp(0, 255).to(torch.uint8)
    return chips


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
