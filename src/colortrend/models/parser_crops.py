"""Where the garment parser looks: each person's crop, anchored on their face, and its way back to the photo.

The network sees one person at a time, on a crop anchored on that person's detected face (:func:`crop_box`): the
face sits at the top centre of every crop, so the parser only has to label the person below it and can treat
everything else, passers-by included, as background. Training and the pipeline cut crops with these functions, and
:func:`probs_to_photo` maps the network's output back onto the photo's pixels. numpy and OpenCV only, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

#: Grey that fills the parts of a crop outside the photo: 0 after normalisation.
PAD_VALUE = 127


@dataclass(frozen=True)
class CropGeometry:
    """Where a person's crop lies relative to their face box, and the network input size.

    The values the shipped weights were trained with are the defaults of ``SegmentSettings`` (its ``geometry``).
    """

    width: float  # crop width in face-box widths, centred on the face
    above: float  # crop top, in face-box heights above the face box top
    height: float  # crop height in face-box heights
    input_h: int  # network input height (multiple of 32)
    input_w: int  # network input width (multiple of 32)


def crop_box(face: np.ndarray, geom: CropGeometry) -> tuple[float, float, float, float]:
    """Crop rectangle (x1, y1, x2, y2) in photo pixels for a face box; it may extend past the photo's edges."""
    x1, y1, x2, y2 = (float(v) for v in face[:4])
    fw, fh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cx = (x1 + x2) / 2
    top = y1 - geom.above * fh
    return cx - geom.width * fw / 2, top, cx + geom.width * fw / 2, top + geom.height * fh


def crop_affine(box: tuple[float, float, float, float], geom: CropGeometry) -> np.ndarray:
    """2x3 matrix taking photo pixel coordinates to network-input coordinates for ``box``."""
    x1, y1, x2, y2 = box
    sx, sy = geom.input_w / (x2 - x1), geom.input_h / (y2 - y1)
    return np.array([[sx, 0.0, -x1 * sx], [0.0, sy, -y1 * sy]], dtype=np.float64)


@dataclass(frozen=True)
class CropWindow:
    """Which photo pixels a crop takes, where in the crop they go, and how they are resampled."""

    photo: tuple[int, int, int, int]  # x0, y0, x1, y1 of the photo part inside the box
    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 of the crop pixels it fills
    shrinks: bool  # the part is reduced (area-averaged) rather than enlarged (bilinear)


def crop_window(box: tuple[float, float, float, float], geom: CropGeometry, height: int,
                width: int) -> CropWindow | None:
    """Where ``box`` of a ``height`` x ``width`` photo lands in its crop; None when it misses the photo."""
    m = crop_affine(box, geom)
    px0, py0 = max(math.ceil(box[0]), 0), max(math.ceil(box[1]), 0)
    px1, py1 = min(math.floor(box[2]), width), min(math.floor(box[3]), height)
    cx0, cy0 = (min(max(round(v), 0), n) for v, n in ((px0 * m[0, 0] + m[0, 2], geom.input_w),
                                                       (py0 * m[1, 1] + m[1, 2], geom.input_h)))
    cx1, cy1 = (min(max(round(v), 0), n) for v, n in ((px1 * m[0, 0] + m[0, 2], geom.input_w),
                                                       (py1 * m[1, 1] + m[1, 2], geom.input_h)))
    if px1 > px0 and py1 > py0 and cx1 > cx0 and cy1 > cy0:
        return CropWindow((px0, py0, px1, py1), (cx0, cy0, cx1, cy1), bool(m[0, 0] < 1))
    return None


def cut_crop(image: np.ndarray, box: tuple[float, float, float, float], geom: CropGeometry,
             pad: int = PAD_VALUE, nearest: bool = False) -> np.ndarray:
    """The network input for ``box``: the photo resampled to the input size, ``pad`` where the box leaves the photo.

    A resize of the photo part (area-averaged when shrinking, so stripes and prints do not alias) rather than one
    affine warp, which would only point-sample. ``nearest`` is for label maps.
    """
    out = np.full((geom.input_h, geom.input_w, *image.shape[2:]), pad, image.dtype)
    window = crop_window(box, geom, *image.shape[:2])
    if window is not None:
        (px0, py0, px1, py1), (cx0, cy0, cx1, cy1) = window.photo, window.crop
        if nearest:
            flag = cv2.INTER_NEAREST
        else:
            flag = cv2.INTER_AREA if window.shrinks else cv2.INTER_LINEAR
        out[cy0:cy1, cx0:cx1] = cv2.resize(image[py0:py1, px0:px1], (cx1 - cx0, cy1 - cy0), interpolation=flag)
    return out


def probs_to_photo(probs: np.ndarray, box: tuple[float, float, float, float], height: int,
                   width: int) -> tuple[int, int, np.ndarray]:
    """Resample one crop's probabilities onto the photo pixels its box covers: ``(x0, y0, (h, w, classes))``.

    Bilinear, with ``cv2`` (several times faster than torch on a CPU). The region is empty if the box misses the photo.
    """
    x0, y0 = max(math.floor(box[0]), 0), max(math.floor(box[1]), 0)
    x1, y1 = min(math.ceil(box[2]), width), min(math.ceil(box[3]), height)
    if x1 <= x0 or y1 <= y0:
        return x0, y0, np.zeros((0, 0, probs.shape[-1]), np.float32)
    # Logit u was trained on crop pixel 2u+1, whose centre is 2u+1.5 in crop units (pixel edges at integers);
    # photo pixel x has its centre at (x + 0.5 - box_x1) * scale there: solve for u and sample.
    ax, ay = probs.shape[1] / (box[2] - box[0]), probs.shape[0] / (box[3] - box[1])
    m = np.array([[ax, 0.0, (x0 + 0.5 - box[0]) * ax - 0.75], [0.0, ay, (y0 + 0.5 - box[1]) * ay - 0.75]])
    region = cv2.warpAffine(probs, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    return x0, y0, region.reshape(y1 - y0, x1 - x0, probs.shape[-1])
