"""White balance: estimate the colour of a photo's light and divide it out, in linear RGB (von Kries gains).

Methods (``WB_METHODS``; the config key ``color.white_balance`` picks one):

* ``none``: no correction, gains 1.
* ``gray_world``: the average scene reflectance is grey, so the mean pixel is the light's colour.
* ``shades_of_gray``: the Minkowski p-norm (p = 6) of each channel instead of the mean (Finlayson & Trezzi 2004),
  between grey-world (p = 1) and white-patch (p = inf).
* ``gray_edge``: the average *edge* is grey: the p-norm (p = 6) of each channel's gradient magnitude after a
  Gaussian blur (van de Weijer et al. 2007); large uniform areas, such as one big garment, weigh little.
* ``skin``: the detected faces' skin (cheeks and nose, between the eye and mouth landmarks) compared with the
  chromaticity of skin under daylight; falls back to ``shades_of_gray`` on photos without a usable face.

The light is estimated on a downscaled linear copy of the photo, leaving out clipped pixels (a channel at 250 or
more: their true colour is unknown) and, optionally, pixels the caller excludes. An estimate within
``min_cast_deg`` of neutral leaves the photo untouched: most photos were balanced by the camera, and correcting
them would only add the method's own error. The gains keep the luminance of a neutral surface and are clamped to
``[1 / max_gain, max_gain]`` so that a wrong estimate cannot turn a white shirt pink or lift a black coat to grey;
applying them is one 8-bit lookup table per channel. ``scripts/measure_white_balance.py`` measures every method
on photos given known casts.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import cv2
import numpy as np
from numpy.typing import ArrayLike, NDArray

from colortrend.color.space import LUMA, linear_to_srgb, srgb_to_linear, to_uint8

WbMethod = Literal["none", "gray_world", "shades_of_gray", "gray_edge", "skin"]
WB_METHODS: tuple[str, ...] = get_args(WbMethod)

#: Minkowski norm of shades-of-grey and grey-edge (p = 6 is the usual choice in the colour-constancy literature).
MINKOWSKI_P = 6
#: Gaussian scale (pixels of the downscaled photo) of the derivatives in grey-edge.
EDGE_SIGMA = 1.0
#: Longest side of the photo copy the light is estimated on.
ESTIMATE_SIDE = 320
#: sRGB code at or above which a channel counts as clipped.
CLIP_CODE = 250
#: sRGB of the "dark skin" and "light skin" patches of the Macbeth ColorChecker, whose chromaticities bracket most
#: skin tones under daylight.
SKIN_PATCHES = ((115, 82, 68), (194, 150, 130))
#: Fewest skin pixels (at full resolution) a face must offer to be used as a reference.
MIN_SKIN_PX = 100


class Correction(NamedTuple):
    """A white-balanced photo and how it was obtained."""

    image: NDArray[np.uint8]  # the corrected photo (the input itself when nothing was corrected)
    gains: NDArray[np.float64]  # (3,) linear-RGB gains applied, r, g, b
    illuminant: NDArray[np.float64]  # (3,) unit-norm light colour the method estimated ((1, 1, 1) / sqrt(3) if none)
    method: str  # the method actually used: differs from the one asked for after a fallback


class Regions(NamedTuple):
    """Pixels to leave out, as rectangles of the photo: ``(x0, y0, part)`` each, ``part`` an (h, w) array placed at
    column ``x0``, row ``y0`` (a person's crop). Smaller to carry, and to send to a device, than a photo-sized
    mask. Each part is a bool mask, or with ``table`` a label map whose pixels ``table[label]`` leaves out (the
    persons' garments: a label map crosses to a device once for white balance and the dominant stage)."""

    parts: tuple[tuple[int, int, NDArray], ...]
    table: NDArray[np.bool_] | None = None

    def part_masks(self):
        """Each part as ``(x0, y0, bool mask)``."""
        for x0, y0, part in self.parts:
            yield x0, y0, part if self.table is None else self.table[part]

    def mask(self, shape: tuple[int, int]) -> NDArray[np.bool_]:
        """The (h, w) mask of every part."""
        out = np.zeros(shape, bool)
        for x0, y0, part in self.part_masks():
            out[y0:y0 + part.shape[0], x0:x0 + part.shape[1]] |= part
        return out


def white_balance(image: NDArray[np.uint8], method: str, *, landmarks: NDArray | None = None,
                  exclude: NDArray[np.bool_] | None = None, max_gain: float = 3.0,
                  min_cast_deg: float = 2.0) -> Correction:
    """Correct an RGB uint8 photo by ``method`` (one of ``WB_METHODS``).

    ``landmarks``: (n, 10) face landmarks (x, y of left eye, right eye, nose, mouth corners) for ``skin``.
    ``exclude``: (h, w) pixels left out of the estimate. ``max_gain``: clamp of the gains. ``min_cast_deg``: an
    estimate closer than this to neutral (angular error) leaves the photo as it is, since most photos were
    balanced by the camera and correcting them only adds the method's own error. The method used differs from
    ``method`` when ``skin`` finds no usable face (``shades_of_gray``) or when no pixel is usable (``none``).
    """
    if method not in WB_METHODS:
        raise ValueError(f"unknown white balance method {method!r}; expected one of {', '.join(WB_METHODS)}")
    illuminant = None
    if method == "skin":
        illuminant = skin_illuminant(image, landmarks)
        if illuminant is None:
            method = "shades_of_gray"
    if illuminant is None and method != "none":
        illuminant = estimate_illuminant(image, method, exclude=exclude)
    if illuminant is None:
        return Correction(image, np.ones(3), _unit(np.ones(3)), "none")
    if angular_error(illuminant, np.ones(3)) < min_cast_deg:
        return Correction(image, np.ones(3), illuminant, method)
    gains = illuminant_gains(illuminant, max_gain)
    return Correction(apply_gains(image, gains), gains, illuminant, method)


def estimate_illuminant(image: NDArray[np.uint8], method: str,
                        exclude: NDArray[np.bool_] | None = None) -> NDArray[np.float64] | None:
    """Unit-norm linear-RGB colour of the light by a statistical method (all of ``WB_METHODS`` but none/skin).

    None when no pixel is usable (an all-clipped or all-excluded photo).
    """
    linear, usable = _estimation_view(image, exclude)
    if method == "gray_world":
        values, p = linear[usable], 1
    elif method == "shades_of_gray":
        values, p = linear[usable], MINKOWSKI_P
    elif method == "gray_edge":
        blurred = cv2.GaussianBlur(linear, (0, 0), EDGE_SIGMA)
        dx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3)
        dy = cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3)
        # An edge next to an unusable pixel measures that pixel too.
        usable = cv2.erode(usable.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        values, p = np.hypot(dx, dy)[usable], MINKOWSKI_P
    else:
        raise ValueError(f"{method!r} is not a statistical white balance method")
    if len(values) == 0:
        return None
    norm = np.mean(values.astype(np.float64) ** p, axis=0) ** (1 / p)
    if not np.isfinite(norm).all() or norm.max() <= 0:
        return None  # a black or perfectly flat photo says nothing about the light
    return _unit(norm)


def skin_illuminant(image: NDArray[np.uint8], landmarks: NDArray | None) -> NDArray[np.float64] | None:
    """Light colour from face skin: median skin colour (linear RGB) over ``SKIN_D65``, face-size weighted.

    Each face contributes the rectangle between its eyes horizontally and from a third of the way down from the
    eyes to just above the mouth (cheeks and nose: no eyes, brows, hair or lips), minus clipped pixels and the
    darkest and brightest 15 % (nostrils, shine). None when no face yields ``MIN_SKIN_PX`` pixels.
    """
    if landmarks is None or len(landmarks) == 0:
        return None
    h, w = image.shape[:2]
    total = np.zeros(3)
    weight_sum = 0.0
    for points in np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2):
        eye_l, eye_r, _, mouth_l, mouth_r = points
        eye_y, mouth_y = (eye_l[1] + eye_r[1]) / 2, (mouth_l[1] + mouth_r[1]) / 2
        x0, x1 = sorted((eye_l[0], eye_r[0]))
        y0, y1 = eye_y + (mouth_y - eye_y) / 3, mouth_y - (mouth_y - eye_y) / 10
        x0, x1 = int(max(x0, 0)), int(min(x1, w))
        y0, y1 = int(max(y0, 0)), int(min(y1, h))
        if x1 <= x0 or y1 <= y0:
            continue
        patch = image[y0:y1, x0:x1].reshape(-1, 3)
        patch = patch[patch.max(axis=1) < CLIP_CODE]
        if len(patch) < MIN_SKIN_PX:
            continue
        linear = srgb_to_linear(patch)
        luma = linear @ LUMA
        lo, hi = np.quantile(luma, [0.15, 0.85])
        skin = np.median(linear[(luma >= lo) & (luma <= hi)], axis=0)
        if skin.min() <= 0:
            continue
        # Larger faces are sharper and less affected by compression: weight by skin area.
        total += len(patch) * _unit(skin / SKIN_D65)
        weight_sum += len(patch)
    return _unit(total) if weight_sum else None


def illuminant_gains(illuminant: NDArray[np.float64], max_gain: float = 3.0) -> NDArray[np.float64]:
    """Per-channel linear gains mapping ``illuminant`` to grey of the same luminance, clamped to the sane range."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a channel absent from the photo clamps to max_gain
        gains = float(LUMA @ illuminant) / np.asarray(illuminant, dtype=np.float64)
    return np.clip(np.nan_to_num(gains, nan=1.0), 1 / max_gain, max_gain)


def gain_tables(gains: ArrayLike) -> NDArray[np.uint8]:
    """The 8-bit tables of ``gains`` (..., 3): (..., 3, 256), what each sRGB code of a channel becomes when its
    linear value is multiplied by the channel's gain (past white clipped to 255)."""
    linear = srgb_to_linear(np.arange(256, dtype=np.uint8))
    return to_uint8(linear_to_srgb(linear * np.asarray(gains, dtype=np.float64)[..., None]))


def apply_gains(image: NDArray[np.uint8], gains: NDArray[np.float64]) -> NDArray[np.uint8]:
    """Multiply linear RGB by ``gains`` and re-encode as sRGB uint8 (values pushed past white clip to 255)."""
    luts = gain_tables(gains)
    out = np.empty_like(image)
    for c in range(3):
        out[..., c] = cv2.LUT(np.ascontiguousarray(image[..., c]), luts[c])
    return out


def apply_cast(image: NDArray[np.uint8], light: NDArray[np.float64]) -> NDArray[np.uint8]:
    """Re-light a photo under ``light`` (linear RGB, any scale): the synthetic cast of the tests and measurements.

    The light is scaled to unit luminance so the cast changes colour, not exposure.
    """
    light = np.asarray(light, dtype=np.float64)
    return apply_gains(image, light / float(LUMA @ light))


def angular_error(estimate: NDArray[np.float64], truth: NDArray[np.float64]) -> float:
    """Angle in degrees between two illuminant colours: the standard colour-constancy error."""
    cos = float(_unit(estimate) @ _unit(truth))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


# Linear value of each 8-bit code, for cv2.LUT (several times faster than numpy indexing on a whole photo).
_LINEAR_LUT = srgb_to_linear(np.arange(256, dtype=np.uint8)).astype(np.float32)


def _estimation_view(image: NDArray[np.uint8],
                     exclude: NDArray[np.bool_] | None) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Downscaled linear copy of the photo and the mask of its pixels usable for estimation."""
    h, w = image.shape[:2]
    scale = min(1.0, ESTIMATE_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    linear = cv2.resize(cv2.LUT(image, _LINEAR_LUT), size, interpolation=cv2.INTER_AREA)
    r, g, b = cv2.split(image)
    bad = (cv2.max(cv2.max(r, g), b) >= CLIP_CODE).astype(np.float32)
    if exclude is not None:
        bad = np.maximum(bad, exclude.astype(np.float32))
    # A downscaled pixel is usable only when none of the pixels it averages is bad.
    usable = cv2.resize(bad, size, interpolation=cv2.INTER_AREA) == 0
    return linear, usable


def _unit(v: NDArray) -> NDArray[np.float64]:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


#: Linear-RGB chromaticity (unit vector) of skin under daylight: the mean of the patches' chromaticities.
SKIN_D65 = _unit(np.mean([_unit(srgb_to_linear(np.array(p, np.uint8))) for p in SKIN_PATCHES], axis=0))
