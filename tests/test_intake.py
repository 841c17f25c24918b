"""Photo intake: every file gets a row with an honest status; awkward formats decode to RGB."""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from colortrend.errors import ConfigError
from colortrend.io.discover import discover, photo_id_for
from colortrend.stages.intake import InputSettings, IntakeStage, decode_image
from conftest import encoded, make_hostile_corpus, png_bomb, rgb_image


def intake(paths, **settings):
    stage = IntakeStage(InputSettings(paths=("unused",), **settings))
    batch = {"photo_id": [photo_id_for(str(p)) for p in paths], "path": [str(p) for p in paths]}
    return stage(batch)


def test_exif_orientation_and_year_are_honoured():
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a portrait photo stored landscape
    exif.get_ifd(0x8769)[36867] = "2014:05:01 10:00:00"
    out = decode_image(encoded(im, "JPEG", exif=exif.tobytes()), 10**8, 2048)
    assert (out["width"], out["height"]) == (20, 40)
    assert out["image"].shape == (40, 20, 3)
    assert out["taken_year"] == 2014


@pytest.mark.parametrize(
    "image",
    [
        rgb_image().convert("CMYK"),
        rgb_image().convert("L"),
        Image.new("RGBA", (64, 48), (10, 200, 10, 0)),
        Image.fromarray(np.full((48, 64), 65535, np.uint16)),
    ],
    ids=["cmyk", "grey", "transparent", "16bit"],
)
def test_modes_become_8bit_rgb(image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    out = decode_image(encoded(image, fmt), 10**8, 2048)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (48, 64, 3)
    if image.mode == "RGBA":  # fully transparent composites onto white
        assert out["image"].min() == 255
    if image.mode == "I;16":  # 16-bit full scale stays full scale, not clipped garbage
        assert out["image"].min() == 255


def test_bomb_refused_from_header_without_decoding():
    from colortrend.stages.intake import TooLarge

    with pytest.raises(TooLarge, match="40000x40000"):
        decode_image(png_bomb(), 60_000_000, 2048)


def test_large_photo_is_analysed_reduced_but_reports_original_size():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), np.uint8))
    out = decode_image(encoded(big, "JPEG", quality=70), 10**8, 1000)
    assert (out["width"], out["height"]) == (4000, 3000)
    assert max(out["image"].shape[:2]) <= 1000
    assert out["analysis_scale"] == pytest.approx(out["image"].shape[1] / 4000)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "1", "I;16"])
def test_large_png_is_reduced_early_to_the_same_picture(mode):
    """Formats without JPEG's DCT scaling are box-reduced right after decoding (memory); the picture must not change."""
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (6, 9, 3), np.uint8).repeat(500, 0).repeat(500, 1)  # 4500 x 3000, flat blocks
    if mode == "I;16":
        big = Image.fromarray(blocks[..., 0].astype(np.uint16) * 257)
    elif mode == "RGBA":
        big = Image.fromarray(np.dstack([blocks, np.full(blocks.shape[:2], 255, np.uint8)]))
    else:
        big = Image.fromarray(blocks).convert(mode)
    out = decode_image(encoded(big, "PNG", compress_level=1), 10**8, 900)
    assert (out["width"], out["height"]) == (4500, 3000) and out["image"].shape == (600, 900, 3)
    reference = np.asarray(big.convert("L" if mode == "I;16" else "RGB").resize((9, 6), Image.BOX))
    if mode == "I;16":
        reference = np.repeat((np.asarray(big.resize((9, 6), Image.BOX), np.float64) / 257).round()[..., None], 3, 2)
    # each block's mean away from its edges (P and 1 are dithered: single pixels vary)
    centres = out["image"].reshape(6, 100, 9, 100, 3)[:, 10:90, :, 10:90].mean(axis=(1, 3))
    assert np.abs(centres - reference).max() <= 2


def test_every_hostile_file_gets_a_row(tmp_path, demo_photos):
    expected = make_hostile_corpus(tmp_path / "in", demo_photos[0])
    paths = discover((str(tmp_path / "in"),))
    names = {p.split("/in/", 1)[1] for p in paths}
    assert names == set(expected)  # the folder named like a photo is walked, not read as a file
    batch = intake(paths)
    by_name = {p.split("/in/", 1)[1]: (s, e) for p, s, e in zip(paths, batch["status"], batch["error"])}
    for name, want in expected.items():
        status, error = by_name[name]
        if want in ("error", "too_large", "skipped"):
            assert status == want, (name, status, error)
            assert error, name
        else:  # decodable: duplicates and faces are decided by later stages
            assert status == "ok" or (want == "ok_or_error" and status == "error"), (name, status, error)
    assert "empty" in by_name["empty.jpg"][1]
    assert "max_pixels" in by_name["bomb.png"][1]


def test_missing_input_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"input.paths\[0\].*does not exist"):
        discover((str(tmp_path / "nope"),))


def test_manifest_and_glob_inputs(tmp_path, demo_photos):
    import pandas as pd

    for p in demo_photos[:2]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    manifest = tmp_path / "sub" / "list.csv"
    manifest.parent.mkdir()
    # manifest paths are relative to the manifest's folder
    pd.DataFrame({"path": [f"../{p.name}" for p in demo_photos[:2]]}).to_csv(manifest, index=False)
    assert discover((str(manifest),)) == sorted(str(tmp_path / p.name) for p in demo_photos[:2])
    assert len(discover((str(tmp_path / "*.jpg"),))) == 2
