"""Colour-space conversions and colour difference, vectorised over any leading shape.

Conventions. Arrays hold colours in their last axis (``(..., 3)``). 8-bit sRGB is 0-255 (``uint8`` or float);
linear RGB and XYZ are floats with reference white Y = 1; CIELAB uses the D65 white of sRGB (no chromatic adaptation
anywhere: photos, garment colours and the named palette all live in sRGB/D65). Formulas follow IEC 61966-2-1 (sRGB)
and CIE 15 (XYZ, CIELAB); ``delta_e2000`` follows Sharma, Wu & Dalal (2005), whose published test pairs are in the
tests.

Everything here is plain numpy: the colour work of the pipeline runs on a few thousand pixels per person, where
numpy is fast enough and importing torch would cost more than the arithmetic.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.floating]

#: Linear sRGB -> CIE XYZ, D65 (IEC 61966-2-1, the 4-digit matrix of the standard).
RGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805],
                       [0.2126, 0.7152, 0.0722],
                       [0.0193, 0.1192, 0.9505]])
XYZ_TO_RGB = np.linalg.inv(RGB_TO_XYZ)
#: XYZ of the D65 white point (the sRGB white, (1, 1, 1) through ``RGB_TO_XYZ``).
D65_WHITE = RGB_TO_XYZ.sum(axis=1)
#: Relative luminance weights of linear sRGB (the Y row of ``RGB_TO_XYZ``).
LUMA = RGB_TO_XYZ[1]

_EPS = 216 / 24389  # CIE's (6/29)^3: below it L* is linear in Y
_KAPPA = 24389 / 27

# sRGB decoding of each 8-bit code: converting uint8 pixels is one table lookup.
_SRGB8_TO_LINEAR = np.where(np.arange(256) / 255 <= 0.04045, np.arange(256) / 255 / 12.92,
                            ((np.arange(256) / 255 + 0.055) / 1.055) ** 2.4)


def srgb_to_linear(rgb: ArrayLike) -> FloatArray:
    """8-bit sRGB (0-255, uint8 or float) -> linear RGB in [0, 1]."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return _SRGB8_TO_LINEAR[rgb]
    v = rgb / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((np.maximum(v, 0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: ArrayLike) -> FloatArray:
    """Linear RGB -> sRGB on the 0-255 scale as floats (out-of-gamut values are clipped to [0, 1] first)."""
    v = np.clip(np.asarray(linear, dtype=np.float64), 0.0, 1.0)
    return 255.0 * np.where(v <= 0.0031308, 12.92 * v, 1.055 * np.maximum(v, 0.0031308) ** (1 / 2.4) - 0.055)


def to_uint8(rgb: ArrayLike) -> NDArray[np.uint8]:
    """Round 0-255 floats to uint8, clipping out-of-gamut values."""
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def linear_to_xyz(linear: ArrayLike) -> FloatArray:
    """Linear sRGB -> CIE XYZ (D65, Y of white = 1)."""
    return np.asarray(linear, dtype=np.float64) @ RGB_TO_XYZ.T


def xyz_to_linear(xyz: ArrayLike) -> FloatArray:
    """CIE XYZ (D65) -> linear sRGB; values outside [0, 1] mean the colour is outside the sRGB gamut."""
    return np.asarray(xyz, dtype=np.float64) @ XYZ_TO_RGB.T


def xyz_to_lab(xyz: ArrayLike) -> FloatArray:
    """CIE XYZ -> CIELAB relative to D65."""
    t = np.asarray(xyz, dtype=np.float64) / D65_WHITE
    f = np.where(t > _EPS, np.cbrt(t), (_KAPPA * t + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_xyz(lab: ArrayLike) -> FloatArray:
    """CIELAB (D65) -> CIE XYZ."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    t = np.where(f**3 > _EPS, f**3, (116 * f - 16) / _KAPPA)
    return t * D65_WHITE


def rgb_to_lab(rgb: ArrayLike) -> FloatArray:
    """8-bit sRGB (0-255) -> CIELAB (D65)."""
    return xyz_to_lab(linear_to_xyz(srgb_to_linear(rgb)))


def lab_to_rgb(lab: ArrayLike) -> FloatArray:
    """CIELAB (D65) -> sRGB on the 0-255 scale as floats, clipped to the gamut (use ``to_uint8`` for pixels)."""
    return linear_to_srgb(xyz_to_linear(lab_to_xyz(lab)))


def delta_e2000(lab1: ArrayLike, lab2: ArrayLike, kl: float = 1.0, kc: float = 1.0, kh: float = 1.0) -> FloatArray:
    """CIEDE2000 colour difference between CIELAB colours; the inputs broadcast against each other.

    About 1 is a just-noticeable difference; garments of "the same colour" in photos differ by a few units.
    """
    lab1 = np.asarray(lab1, dtype=np.float64)
    lab2 = np.asarray(lab2, dtype=np.float64)
    l1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    l2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]

    # a* is stretched for near-neutral colours, where the CIELAB hue scale is least uniform.
    c_mean7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2) ** 7
    g = 0.5 * (1 - np.sqrt(c_mean7 / (c_mean7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    chroma_zero = (c1p * c2p) == 0  # a neutral colour has no hue: the hue terms must vanish

    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(chroma_zero, 0.0, dh)
    dh_big = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))

    l_mean = (l1 + l2) / 2
    c_mean = (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(np.abs(h1p - h2p) <= 180, h_sum / 2, np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
    h_mean = np.where(chroma_zero, h_sum, h_mean)

    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6)) - 0.20 * np.cos(np.radians(4 * h_mean - 63)))
    sl = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    sc = 1 + 0.045 * c_mean
    sh = 1 + 0.015 * c_mean * t
    c_mean7p = c_mean**7
    rt = (-2 * np.sqrt(c_mean7p / (c_mean7p + 25.0**7))
          * np.sin(np.radians(60 * np.exp(-(((h_mean - 275) / 25) ** 2)))))

    tl, tc, th = dl / (kl * sl), dc / (kc * sc), dh_big / (kh * sh)
    return np.sqrt(np.maximum(tl**2 + tc**2 + th**2 + rt * tc * th, 0.0))


def rgb_to_hex(rgb: ArrayLike) -> str:
    """One 0-255 sRGB colour -> ``#rrggbb``."""
    r, g, b = (int(v) for v in to_uint8(rgb))
    return f"#{r:02x}{g:02x}{b:02x}"


def hex_to_rgb(code: str) -> tuple[int, int, int]:
    """``#rrggbb``, ``rrggbb`` or ``#rgb`` -> an (r, g, b) tuple of ints."""
    digits = code.strip().lstrip("#")
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    if len(digits) != 6:
        raise ValueError(f"not a hex colour: {code!r}")
    value = int(digits, 16)
    return (value >> 16) & 255, (value >> 8) & 255, value & 255
