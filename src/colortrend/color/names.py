"""A curated palette of garment colour names (English and Chinese) and nearest-name lookup by CIEDE2000.

The names are the words shoppers and fashion reports use for clothes (藏青 navy, 驼色 camel, 酒红 burgundy ...),
each anchored at a typical garment sRGB value rather than at a saturated "web colour": real navy cloth photographs
far darker and greyer than #000080. Neutrals are dense (black, charcoal, three greys, off-white, white) because
most clothing is neutral and the difference between black and charcoal is what cohorts differ in. The order of
``NAMED_COLORS`` is fixed, so ties resolve the same way everywhere.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from colortrend.color.space import delta_e2000, hex_to_rgb, rgb_to_lab


class ColorName(NamedTuple):
    en: str
    zh: str
    rgb: tuple[int, int, int]


def _named(en: str, zh: str, code: str) -> ColorName:
    return ColorName(en, zh, hex_to_rgb(code))


NAMED_COLORS: tuple[ColorName, ...] = (
    # neutrals
    _named("black", "黑色", "#161616"),
    _named("charcoal", "炭灰", "#3a3b3f"),
    _named("dark grey", "深灰", "#5e5f62"),
    _named("grey", "灰色", "#8e8e8e"),
    _named("light grey", "浅灰", "#c4c4c2"),
    _named("off-white", "米白", "#ece6d8"),
    _named("white", "白色", "#f8f8f6"),
    # browns and beiges
    _named("beige", "米色", "#d8c8a8"),
    _named("khaki", "卡其", "#b9a77f"),
    _named("camel", "驼色", "#b88a58"),
    _named("tan", "棕褐", "#9a7653"),
    _named("brown", "棕色", "#6b4a33"),
    _named("dark brown", "深棕", "#3b2a20"),
    # reds, pinks, oranges, yellows
    _named("burgundy", "酒红", "#6d1f2c"),
    _named("red", "红色", "#c0202e"),
    _named("rust", "铁锈红", "#a8482a"),
    _named("coral", "珊瑚色", "#f2776a"),
    _named("orange", "橙色", "#e8792a"),
    _named("mustard", "芥末黄", "#d2a424"),
    _named("yellow", "黄色", "#f3d43a"),
    _named("cream", "奶油色", "#f3e6b8"),
    _named("hot pink", "玫红", "#d63a7a"),
    _named("pink", "粉色", "#f0a6bd"),
    _named("dusty pink", "藕粉", "#c99a9a"),
    # greens
    _named("olive", "橄榄绿", "#6b6b3a"),
    _named("army green", "军绿", "#4a4f35"),
    _named("dark green", "墨绿", "#1f3b2e"),
    _named("green", "绿色", "#2f8a4e"),
    _named("mint", "薄荷绿", "#a6dcc4"),
    _named("teal", "青色", "#1f7576"),
    # blues and purples
    _named("navy", "藏青", "#1c2338"),
    _named("dark blue", "深蓝", "#22327a"),
    _named("denim blue", "牛仔蓝", "#4a6383"),
    _named("light denim", "浅牛仔蓝", "#8ea6c2"),
    _named("royal blue", "宝蓝", "#2a4eb0"),
    _named("sky blue", "天蓝", "#8cc3e8"),
    _named("purple", "紫色", "#5e3a7e"),
    _named("lavender", "薰衣草紫", "#b8a6d6"),
)

#: CIELAB of each named colour, in ``NAMED_COLORS`` order.
NAMED_LAB: NDArray[np.float64] = rgb_to_lab(np.array([c.rgb for c in NAMED_COLORS], dtype=np.uint8))


def nearest_index(lab: ArrayLike) -> NDArray[np.int64]:
    """Index into ``NAMED_COLORS`` of the closest name (CIEDE2000) for each CIELAB colour in ``lab`` (..., 3)."""
    lab = np.asarray(lab, dtype=np.float64)
    return delta_e2000(lab[..., None, :], NAMED_LAB).argmin(-1)


def nearest_name(color: ArrayLike, space: str = "rgb") -> ColorName:
    """The named colour closest (CIEDE2000) to one colour given as 0-255 sRGB (``space="rgb"``) or CIELAB."""
    if space not in ("rgb", "lab"):
        raise ValueError(f"space must be 'rgb' or 'lab', not {space!r}")
    lab = rgb_to_lab(np.asarray(color, dtype=np.float64)) if space == "rgb" else color
    return NAMED_COLORS[int(nearest_index(lab))]
