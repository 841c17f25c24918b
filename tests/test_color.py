"""Colour maths: conversions, CIEDE2000, white balance, k-means palettes and colour names."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from colortrend.color.kmeans import palettes
from colortrend.color.names import NAMED_COLORS, nearest_index, nearest_name
from colortrend.color.space import (
    delta_e2000,
    hex_to_rgb,
    lab_to_rgb,
    lab_to_xyz,
    linear_to_srgb,
    rgb_to_hex,
    rgb_to_lab,
    srgb_to_linear,
    to_uint8,
    xyz_to_lab,
)
from colortrend.color.white_balance import Regions, angular_error, apply_cast, white_balance

CCP = Path(__file__).resolve().parents[1] / "../shared/data/parsing/ccp"

# --- conversions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rgb, lab", [
    ((255, 255, 255), (100.0, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
    ((128, 128, 128), (53.585, 0.0, 0.0)),
    ((255, 0, 0), (53.24, 80.09, 67.20)),
    ((0, 255, 0), (87.73, -86.18, 83.18)),
    ((0, 0, 255), (32.30, 79.19, -107.86)),
])
def test_known_colours_to_lab(rgb, lab):
    # Reference values: sRGB D65 (e.g. Lindbloom's calculator); the 4-digit sRGB matrix agrees to ~0.05.
    assert rgb_to_lab(np.array(rgb, np.uint8)) == pytest.approx(lab, abs=0.06)


def test_every_8bit_colour_round_trips_through_lab():
    codes = np.arange(0, 256, 5, dtype=np.uint8)
    rgb = np.stack(np.meshgrid(codes, codes, codes, indexing="ij"), -1).reshape(-1, 3)
    assert np.array_equal(to_uint8(lab_to_rgb(rgb_to_lab(rgb))), rgb)


def test_uint8_lookup_matches_float_formula():
    codes = np.arange(256)
    assert np.allclose(srgb_to_linear(codes.astype(np.uint8)), srgb_to_linear(codes.astype(float)), atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, (3,), elements=st.floats(0, 255)))
def test_lab_round_trip_property(rgb):
    assert lab_to_rgb(rgb_to_lab(rgb)) == pytest.approx(rgb, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, (3,), elements=st.floats(0, 1)))
def test_xyz_lab_and_gamma_round_trips(values):
    xyz = values * np.array([0.95, 1.0, 1.09])
    assert lab_to_xyz(xyz_to_lab(xyz)) == pytest.approx(xyz, abs=1e-9)
    assert srgb_to_linear(linear_to_srgb(values)) == pytest.approx(values, abs=1e-9)


def test_hex_helpers():
    assert rgb_to_hex((22, 20, 24)) == "#161418"
    assert hex_to_rgb("#161418") == (22, 20, 24)
    assert hex_to_rgb("fff") == (255, 255, 255)
    with pytest.raises(ValueError):
        hex_to_rgb("#12345")


# --- CIEDE2000 ---------------------------------------------------------------------------------------------------

# Pairs from Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes, supplementary
# test data, and mathematical observations", Table 1 (pair number: Lab1, Lab2, ΔE00). They exercise the hue
# wrap-around, the neutral axis and the blue-region rotation term.
SHARMA_PAIRS = {
    1: ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    7: ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    10: ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0010), 7.1792),
    11: ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0011), 7.2195),
    14: ((50.0, -0.001, 2.49), (50.0, 0.0010, -2.49), 4.8045),
    15: ((50.0, -0.001, 2.49), (50.0, 0.0011, -2.49), 4.7461),
    17: ((50.0, 2.5, 0.0), (73.0, 25.0, -18.0), 27.1492),
    19: ((50.0, 2.5, 0.0), (56.0, -27.0, -3.0), 31.9030),
    24: ((50.0, 2.5, 0.0), (50.0, 3.2592, 0.3350), 1.0000),
    29: ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    31: ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441),
    34: ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
}


@pytest.mark.parametrize("pair", sorted(SHARMA_PAIRS))
def test_ciede2000_sharma_pairs(pair):
    lab1, lab2, expected = SHARMA_PAIRS[pair]
    assert float(delta_e2000(lab1, lab2)) == pytest.approx(expected, abs=1e-4)


def test_ciede2000_vectorises():
    lab1 = np.array([p[0] for p in SHARMA_PAIRS.values()])
    lab2 = np.array([p[1] for p in SHARMA_PAIRS.values()])
    assert delta_e2000(lab1, lab2) == pytest.approx([p[2] for p in SHARMA_PAIRS.values()], abs=1e-4)


lab_colours = st.tuples(st.floats(0, 100), st.floats(-110, 110), st.floats(-110, 110))


@settings(max_examples=300, deadline=None)
@given(lab_colours, lab_colours)
def test_ciede2000_symmetric_and_non_negative(lab1, lab2):
    d12, d21 = float(delta_e2000(lab1, lab2)), float(delta_e2000(lab2, lab1))
    assert d12 >= 0
    assert d12 == pytest.approx(d21, abs=1e-9)
    assert float(delta_e2000(lab1, lab1)) == pytest.approx(0, abs=1e-9)


# --- white balance -----------------------------------------------------------------------------------------------

def mondrian(seed: int = 0, size: int = 240, patch: int = 12) -> np.ndarray:
    """A grid of flat colour patches whose colours come in complementary pairs (grey on average), plus one
    black and one white patch: the textbook scene for grey-world methods."""
    rng = np.random.default_rng(seed)
    n = (size // patch) ** 2
    half = rng.uniform(-60, 60, (n // 2, 3))
    colours = np.clip(np.concatenate([128 + half, 128 - half]), 0, 255)
    colours[0], colours[1] = 12, 238
    grid = colours[rng.permutation(n)].reshape(size // patch, size // patch, 3)
    return np.repeat(np.repeat(grid, patch, 0), patch, 1).astype(np.uint8)


CAST = np.array([1.0, 0.8, 0.6])  # a warm light, about 3,500 K


@pytest.mark.parametrize("method", ["gray_world", "shades_of_gray", "gray_edge"])
def test_white_balance_undoes_a_known_cast(method):
    scene = mondrian()
    result = white_balance(apply_cast(scene, CAST), method)
    assert result.method == method
    assert angular_error(result.illuminant, CAST) < 2.0
    error = delta_e2000(rgb_to_lab(result.image), rgb_to_lab(scene))
    assert np.median(error) < 3.0


def test_black_and_white_survive_correction():
    scene = mondrian()
    corrected = white_balance(apply_cast(scene, CAST), "gray_world").image
    lab = rgb_to_lab(corrected)
    black, white = np.all(scene == 12, axis=-1), np.all(scene == 238, axis=-1)
    assert lab[black][:, 0].max() < 8 and np.hypot(*lab[black][:, 1:].T).max() < 3
    assert lab[white][:, 0].min() > 90 and np.hypot(*lab[white][:, 1:].T).max() < 3


def test_gains_are_clamped_and_none_is_identity():
    red = np.zeros((50, 50, 3), np.uint8)
    red[..., 0], red[..., 1], red[..., 2] = 200, 40, 30
    result = white_balance(red, "gray_world", max_gain=2.0)
    assert result.gains.max() == pytest.approx(2.0) and result.gains.min() >= 0.5
    untouched = white_balance(red, "none")
    assert untouched.image is red and np.array_equal(untouched.gains, np.ones(3)) and untouched.method == "none"


def test_clipped_pixels_do_not_drive_the_estimate():
    scene = mondrian()
    cast = apply_cast(scene, CAST)
    cast[:60, :60] = (255, 255, 40)  # a blown-out yellow sign: clipped in red and green
    assert angular_error(white_balance(cast, "gray_world").illuminant, CAST) < 4.0


def test_skin_method_uses_faces_and_falls_back_without_them():
    skin = (194, 150, 130)  # the ColorChecker "light skin" patch, near the method's reference
    image = np.full((200, 200, 3), 128, np.uint8)
    image[60:140, 60:140] = skin
    landmarks = np.array([[80, 80, 120, 80, 100, 100, 85, 125, 115, 125]], np.float32)
    result = white_balance(apply_cast(image, CAST), "skin", landmarks=landmarks)
    assert result.method == "skin"
    assert angular_error(result.illuminant, CAST) < 5.0
    assert white_balance(image, "skin", landmarks=np.zeros((0, 10))).method == "shades_of_gray"


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="gray_world"):
        white_balance(mondrian(), "retinex")


# --- k-means palettes --------------------------------------------------------------------------------------------

def garment(colours: list[tuple[int, int, int]], shares: list[float], n: int = 6000, seed: int = 0) -> np.ndarray:
    """n pixels of the given colours in the given shares, with sensor-like noise, shuffled."""
    rng = np.random.default_rng(seed)
    counts = np.round(np.array(shares) * n).astype(int)
    pixels = np.concatenate([np.tile(c, (m, 1)) for c, m in zip(colours, counts)]).astype(float)
    pixels += rng.normal(0, 2.5, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[rng.permutation(len(pixels))]


def test_two_colour_garment_recovers_colours_and_shares():
    navy, cream = (30, 38, 70), (235, 228, 205)
    palette = palettes([garment([navy, cream], [0.7, 0.3])])[0]
    assert len(palette.share) == 2
    assert palette.share == pytest.approx([0.7, 0.3], abs=0.01)
    assert delta_e2000(palette.lab, rgb_to_lab(np.array([navy, cream], np.uint8))) == pytest.approx([0, 0], abs=1.0)
    assert nearest_name(palette.dominant_rgb).en == "navy"


def test_highlights_are_dropped_unless_the_garment_is_white():
    shine = np.full((600, 3), 255, np.uint8)
    black = np.concatenate([garment([(20, 20, 22)], [1.0]), shine])
    assert palettes([black])[0].lab[:, 0].max() < 20  # no trace of the shine in the palette
    white = garment([(255, 255, 255)], [1.0])
    assert nearest_name(palettes([white])[0].dominant_rgb).en == "white"


def test_palettes_are_deterministic_and_batching_changes_nothing():
    people = [garment([(30, 38, 70), (235, 228, 205), (150, 30, 40)], [0.5, 0.3, 0.2], seed=s) for s in range(4)]
    people += [garment([(90, 90, 90)], [1.0], n=50), np.zeros((0, 3), np.uint8)]
    batched = palettes(people)
    again = palettes(people[::-1])[::-1]
    alone = [palettes([p])[0] for p in people]
    assert batched[-1] is None
    for a, b, c in zip(batched[:-1], again[:-1], alone[:-1]):
        for x in (b, c):
            assert np.array_equal(a.lab, x.lab) and np.array_equal(a.share, x.share)


@pytest.mark.skipif(not CCP.exists(), reason="needs ../shared/data/parsing/ccp")
def test_batched_equals_per_person_on_real_garments():
    from PIL import Image

    people = []
    for number in ("0008", "0016", "0024", "0032"):
        image = np.asarray(Image.open(CCP / f"images/{number}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(CCP / f"masks/{number}.png"))
        # CCP ids of blazer, blouse, coat, dress, jacket, jeans, pants, shirt, skirt, sweater, t-shirt, top.
        people.append(image[np.isin(mask, (4, 5, 13, 14, 24, 25, 31, 38, 42, 48, 51, 54))])
    batched = palettes(people, seed=3)
    for person, palette in zip(people, batched):
        alone = palettes([person], seed=3)[0]
        assert np.array_equal(palette.lab, alone.lab) and np.array_equal(palette.share, alone.share)
        assert palette.share.sum() == pytest.approx(1.0) and np.all(np.diff(palette.share) <= 0)


# --- the torch path (what a cuda stage runs), on this CPU against the numpy path -----------------------------------

def demo_images(count: int = 8) -> list[np.ndarray]:
    """``count`` demo photos of different sizes, every other one under a warm cast (so gains are not all 1)."""
    from PIL import Image

    paths = sorted((Path(__file__).resolve().parents[1] / "data" / "demo").glob("*.jpg"))[:count]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return [apply_cast(image, CAST) if i % 2 else image for i, image in enumerate(images)]


def test_area_reduction_is_opencvs_inter_area():
    import cv2
    import torch

    from colortrend.color.torch_ops import opencv_resize

    rng = np.random.default_rng(0)
    for h, w, side in [(838, 550, 320), (1000, 7, 320), (321, 320, 320), (5, 3, 2), (977, 1301, 301)]:
        scale = min(1.0, side / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = rng.random((h, w, 3)).astype(np.float32)
        ours = opencv_resize(torch.from_numpy(image)[None], size, "area")[0].numpy()
        assert ours == pytest.approx(cv2.resize(image, size, interpolation=cv2.INTER_AREA), abs=1e-6)
        # Which output pixels a sparse mask reaches, exactly: the estimate's usable pixels depend on it.
        mask = (rng.random((h, w)) < 0.002).astype(np.float32)
        reached = opencv_resize(torch.from_numpy(mask)[None, ..., None], size, "area")[0, ..., 0].numpy() > 0
        assert np.array_equal(reached, cv2.resize(mask, size, interpolation=cv2.INTER_AREA) > 0)


def test_opencv_resize_is_opencvs_whichever_way_each_axis_goes():
    # The detector's pyramid and the parser's crops on a GPU: shrinking, enlarging and one axis of each (where
    # INTER_AREA falls back to OpenCV's own 2-tap weights), including the ratio whose float rounding picks the row.
    import cv2
    import torch

    from colortrend.color.torch_ops import opencv_resize

    rng = np.random.default_rng(1)
    for (h, w), (th, tw) in [((838, 550), (419, 275)), ((150, 29), (185, 258)), ((299, 165), (320, 128)),
                             ((40, 60), (41, 13)), ((7, 5), (3, 11)), ((300, 300), (300, 121))]:
        image = rng.random((h, w, 3)).astype(np.float32)
        for flag, name in ((cv2.INTER_AREA, "area"), (cv2.INTER_LINEAR, "linear")):
            ours = opencv_resize(torch.from_numpy(image)[None], (tw, th), name)[0].numpy()
            assert ours == pytest.approx(cv2.resize(image, (tw, th), interpolation=flag), abs=1e-4), (h, w, th, tw)


@pytest.mark.parametrize("method", ["gray_world", "shades_of_gray", "gray_edge", "skin"])
def test_torch_white_balance_equals_numpy_on_demo_photos(method):
    from colortrend.color.torch_ops import white_balance_batch

    images = demo_images()
    rng = np.random.default_rng(1)
    def regions(h: int, w: int) -> Regions:  # as persons' garments come: overlapping crops, one in the corner
        return Regions(((w // 4, h // 5, rng.random((h // 3, w // 3)) < 0.5),
                        (w - w // 2, h - h // 2, rng.random((h // 2, w // 2)) < 0.3)))

    def label_regions(h: int, w: int) -> Regions:  # as the correct stage passes them: label maps and a class table
        return Regions(((w // 3, h // 4, rng.integers(0, 7, (h // 3, w // 4), dtype=np.uint8)),
                        (0, h // 2, rng.integers(0, 7, (h // 2, w // 2), dtype=np.uint8))),
                       np.isin(np.arange(256), (3, 4)))

    # a photo-sized mask, the same as regions (only their parts cross to the device), or none
    excludes = [rng.random(image.shape[:2]) < 0.2 if i % 4 == 0 else regions(*image.shape[:2]) if i % 4 == 1
                else label_regions(*image.shape[:2]) if i % 4 == 2 else None for i, image in enumerate(images)]
    # skin: a face on the first photo only (the others fall back to shades_of_gray, batched on the device)
    landmarks = [np.array([[200, 200, 260, 200, 230, 240, 205, 270, 255, 270]], np.float32)] + [None] * 7
    numpy_path = [white_balance(image, method, landmarks=marks,
                                exclude=exclude.mask(image.shape[:2]) if isinstance(exclude, Regions) else exclude)
                  for image, marks, exclude in zip(images, landmarks, excludes)]
    torch_path = white_balance_batch(images, method, "cpu", landmarks=landmarks, excludes=excludes)
    assert sum(not np.allclose(r.gains, 1) for r in numpy_path) >= 4  # the cast photos were corrected
    for ours, reference in zip(torch_path, numpy_path):
        assert ours.method == reference.method
        assert ours.gains == pytest.approx(reference.gains, rel=1e-6)
        assert ours.illuminant == pytest.approx(reference.illuminant, abs=1e-6)
        assert np.array_equal(ours.image, reference.image)  # the same tables for the same gains


def test_torch_white_balance_edge_cases_equal_numpy():
    from colortrend.color.torch_ops import white_balance_batch

    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(1, 1), (2, 9), (4, 4), (7, 3)]]
    images += [np.full((30, 40, 3), 255, np.uint8), np.zeros((30, 40, 3), np.uint8)]  # all clipped; black
    for method in ("gray_world", "gray_edge", "none"):
        for ours, image in zip(white_balance_batch(images, method, "cpu"), images):
            reference = white_balance(image, method)
            assert ours.method == reference.method
            assert ours.gains == pytest.approx(reference.gains, rel=1e-6)
            assert np.array_equal(ours.image, reference.image)
    with pytest.raises(ValueError, match="gray_world"):
        white_balance_batch(images, "retinex", "cpu")


def assert_palettes_agree(ours, reference) -> None:
    """The stated tolerance of the torch path: the same dominant colour within CIEDE2000 0.5, shares within 0.01."""
    assert (ours is None) == (reference is None)
    if ours is not None:
        assert float(delta_e2000(ours.dominant_lab, reference.dominant_lab)) <= 0.5
        assert abs(ours.dominant_share - reference.dominant_share) <= 0.01
        assert ours.share.sum() == pytest.approx(1.0)


def test_torch_palettes_equal_numpy_on_generated_garments():
    from colortrend.color import torch_ops

    people = [garment([(30, 38, 70), (235, 228, 205), (150, 30, 40)], [0.5, 0.3, 0.2], seed=s) for s in range(6)]
    people += [garment([(90, 90, 90)], [1.0], n=50), garment([(255, 255, 255)], [1.0]), np.zeros((0, 3), np.uint8),
               garment([(200, 120, 20), (20, 120, 200)], [0.55, 0.45], n=3)]
    for seed, k in [(0, 5), (7, 3), (1, 1)]:
        for ours, reference in zip(torch_ops.palettes(people, "cpu", k=k, seed=seed), palettes(people, k=k, seed=seed)):
            assert_palettes_agree(ours, reference)


@pytest.mark.skipif(not CCP.exists(), reason="needs ../shared/data/parsing/ccp")
def test_torch_palettes_equal_numpy_on_real_garments():
    from PIL import Image

    from colortrend.color import torch_ops

    people = []
    for number in ("0008", "0016", "0024", "0032", "0040", "0048"):
        image = np.asarray(Image.open(CCP / f"images/{number}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(CCP / f"masks/{number}.png"))
        people.append(image[np.isin(mask, (4, 5, 13, 14, 24, 25, 31, 38, 42, 48, 51, 54))])
    for ours, reference in zip(torch_ops.palettes(people, "cpu", seed=3), palettes(people, seed=3)):
        assert_palettes_agree(ours, reference)


# --- names -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rgb, en, zh", [
    ((0, 0, 0), "black", "黑色"),
    ((22, 20, 24), "black", "黑色"),  # the original analysis's "95度黑"
    ((255, 255, 255), "white", "白色"),
    ((128, 128, 128), "grey", "灰色"),
    ((30, 36, 58), "navy", "藏青"),
    ((110, 28, 42), "burgundy", "酒红"),
    ((190, 140, 90), "camel", "驼色"),
    ((72, 98, 132), "denim blue", "牛仔蓝"),
])
def test_nearest_names(rgb, en, zh):
    name = nearest_name(rgb)
    assert (name.en, name.zh) == (en, zh)
    assert nearest_name(rgb_to_lab(np.array(rgb, np.uint8)), space="lab") == name


def test_palette_names_are_unique_and_each_names_itself():
    assert len({c.en for c in NAMED_COLORS}) == len({c.zh for c in NAMED_COLORS}) == len(NAMED_COLORS)
    own = nearest_index(rgb_to_lab(np.array([c.rgb for c in NAMED_COLORS], np.uint8)))
    assert np.array_equal(own, np.arange(len(NAMED_COLORS)))
