"""Photo intake: every file gets a row with an honest status; awkward formats decode to RGB."""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from colortrend.errors import ConfigError
from colortrend.io.discover import discover, photo_id_for
from colortrend.stages.intake import InputSettings, IntakeStage, decode_image
from conftest import encoded, make_hostile_corpus, png_bomb, png_chunk, rgb_image, strip_tiff


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

    with pytest.raises(TooLarge, match="1600000000 pixels declared, over input.max_pixels=60000000"):
        decode_image(png_bomb(), 60_000_000, 2048)
    with pytest.raises(TooLarge, match="8000x5000 = 40000000 pixels declared, over input.max_pixels=10000000"):
        decode_image(png_bomb(8000, 5000), 10_000_000, 2048)


def test_pillows_own_bomb_guard_stays_on_for_the_rest_of_the_process():
    """Importing colortrend must not switch off Pillow's guard for other code in the process; a larger
    input.max_pixels raises it only that far."""
    from colortrend.stages.intake import TooLarge

    default = Image.MAX_IMAGE_PIXELS
    assert default is not None
    decode_image(encoded(rgb_image(64, 48), "PNG"), 60_000_000, 2048)
    assert Image.MAX_IMAGE_PIXELS == default
    with pytest.raises(TooLarge):
        decode_image(png_bomb(), 500_000_000, 2048)
    assert Image.MAX_IMAGE_PIXELS == 500_000_000
    Image.MAX_IMAGE_PIXELS = default


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


def refusal(data: bytes, tmp_path, name: str, **settings) -> tuple[str, str]:
    """(status, error) intake gives ``data`` saved as ``name``."""
    path = tmp_path / name
    path.write_bytes(data)
    batch = intake([path], **settings)
    return batch["status"][0], batch["error"][0]


def test_a_tiff_with_a_strip_per_row_is_refused_from_its_structure(tmp_path, monkeypatch):
    """Pillow turns every strip into Python objects when it opens a TIFF: the number of strips, not the declared
    pixels (2,000 here), decides the cost, and it is counted from the raw bytes before Pillow sees them."""
    import PIL.Image

    data = strip_tiff(2000)
    opened = []
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("opened"))
    status, error = refusal(data, tmp_path, "strips.tif", max_decode_bytes=500_000)
    assert status == "too_large" and "2,000 TIFF strips" in error and "input.max_decode_bytes=500000" in error
    assert not opened  # refused before Pillow parsed it
    monkeypatch.undo()
    assert refusal(data, tmp_path, "strips.tif") == ("ok", None)  # the default bound admits 2,000 strips


def test_a_progressive_jpeg_counts_the_coefficients_of_the_whole_image(tmp_path):
    """libjpeg keeps every DCT coefficient of a progressive JPEG (2 bytes each), even when it decodes it reduced."""
    photo = rgb_image(600, 400)
    bound = {"max_decode_bytes": 1_200_000}  # 600 x 400 x 4 bytes of pixels fit, 600 x 400 x 3 x 2 more do not
    status, error = refusal(encoded(photo, "JPEG", progressive=True, subsampling=0), tmp_path, "p.jpg", **bound)
    assert status == "too_large" and "progressive JPEG coefficients" in error
    assert refusal(encoded(photo, "JPEG", subsampling=0), tmp_path, "b.jpg", **bound)[0] == "ok"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_huge_exif_arrays_are_counted_before_they_are_read(tmp_path, fmt):
    """An EXIF block is a TIFF directory: Pillow expands its number arrays when the orientation or date is read."""
    exif = Image.Exif()
    exif[0xC7A0] = tuple(range(70_000, 85_000))  # 15,000 LONG values (about 1 MB once read) in 60 kB of EXIF
    bound = {"max_decode_bytes": 600_000}
    status, error = refusal(encoded(rgb_image(), fmt, exif=exif.tobytes()), tmp_path, f"x.{fmt.lower()}", **bound)
    assert status == "too_large" and "15,0" in error and "TIFF tag values" in error, error
    assert refusal(encoded(rgb_image(), fmt), tmp_path, f"y.{fmt.lower()}", **bound)[0] == "ok"


def test_a_multi_page_tiff_is_judged_by_its_first_page(tmp_path):
    """Only the first page is decoded and Pillow never parses the others: a huge second page costs nothing."""
    import io

    buf = io.BytesIO()
    rgb_image(64, 48).save(buf, "TIFF", save_all=True, append_images=[rgb_image(4000, 3000)])
    (tmp_path / "pages.tif").write_bytes(buf.getvalue())
    batch = intake([tmp_path / "pages.tif"], max_decode_bytes=100_000)  # the second page alone needs 48 MB
    assert batch["status"] == ["ok"] and batch["image"][0].shape == (48, 64, 3)


@pytest.mark.parametrize("kind, payload", [(b"zTXt", b"comment\0\0"), (b"iCCP", b"profile\0\0"),
                                           (b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0")])
def test_png_chunks_that_inflate_past_the_limit_are_too_large(tmp_path, kind, payload):
    import zlib

    png = encoded(rgb_image(), "PNG")
    bomb = png_chunk(kind, payload + zlib.compress(b"\0" * 2_000_000))
    status, error = refusal(png[:33] + bomb + png[33:], tmp_path, "chunk.png")
    assert status == "too_large" and "expands past" in error


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


def test_a_new_setting_at_its_default_leaves_committed_shards_current():
    """Outputs written before `max_decode_bytes` existed keep their fingerprints; changing it redoes them."""
    default = IntakeStage(InputSettings(paths=("x",)))
    assert "max_decode_bytes" not in default.fingerprint_settings()
    assert IntakeStage(InputSettings(paths=("x",), max_decode_bytes=10**6)).fingerprint() != default.fingerprint()


def test_url_rows_are_checked_against_the_allowed_schemes_before_anything_is_opened(monkeypatch):
    """A manifest row must not choose where intake connects: only local files, the schemes written in
    input.paths, the output's store's and input.allowed_schemes are opened; any other row is an error row."""
    import fsspec

    import colortrend.io.fs

    memory = fsspec.filesystem("memory")
    memory.pipe("/allowed/photo.png", encoded(rgb_image(), "PNG"))
    rows = ["ftp://127.0.0.1:1/a.jpg", "http://127.0.0.1:1/b.jpg", "zip://c.jpg::ftp://127.0.0.1:1/d.zip",
            "memory://allowed/photo.png", "memory://allowed/missing.png"]
    opened = []
    real = colortrend.io.fs.filesystem
    monkeypatch.setattr(colortrend.io.fs, "filesystem", lambda url: opened.append(url) or real(url))
    cases = [(InputSettings(paths=("list.csv",)), None, []),  # local manifest, local output: nothing remote
             (InputSettings(paths=("list.csv",), allowed_schemes=("memory",)), None, ["memory"]),
             (InputSettings(paths=("memory://allowed",)), None, ["memory"]),  # a scheme the user wrote in paths
             (InputSettings(paths=("list.csv",)), "memory://out", ["memory"])]  # the output's own store
    for settings, output, allowed in cases:
        opened.clear()
        stage = IntakeStage(settings, output=output)
        out = stage({"photo_id": [str(i) for i in range(len(rows))], "path": rows})
        for path, status, error in zip(rows, out["status"], out["error"]):
            if path.startswith("memory://") and allowed:
                assert status == ("ok" if "photo" in path else "error"), (path, error)
                assert "missing" not in path or "cannot read file" in error
            else:
                assert status == "error" and "is not allowed" in error and "input.allowed_schemes" in error
        assert all(url.startswith("memory://") for url in opened) and bool(opened) == bool(allowed)


def test_an_unknown_allowed_scheme_is_a_config_error():
    from colortrend.config import load_from_dict

    message = r"input.allowed_schemes\[1\]: unknown URL scheme 'htps' \(did you mean https"
    with pytest.raises(ConfigError, match=message):
        load_from_dict({"name": "t", "input": {"paths": ["x"], "allowed_schemes": ["s3", "htps"]}, "output": "o"})


# --- JPEG decode on a device (nvJPEG on a GPU; here torchvision's CPU decoder runs the same path) ------------------

def asymmetric_jpeg(orientation: int = 1, size: tuple[int, int] = (140, 90), **save) -> bytes:
    """A JPEG whose every flip and rotation looks different (gradients, an off-centre patch), with an orientation."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // w, y * 255 // h, (x + 2 * y) % 256], -1).astype(np.uint8)
    pixels[h // 9:h // 3, w // 28:w // 3] = (250, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(pixels), "JPEG", quality=90, exif=exif.tobytes(), **save)


def device_decode(data: bytes, max_side: int = 2048, **limits) -> dict:
    from colortrend.stages.intake import decode_jpegs

    out = decode_image(data, 10**8, max_side, defer_jpeg=True, **limits)
    assert out["image"] is None
    out["image"] = decode_jpegs([out.pop("jpeg")], "cpu")[0]
    return out


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decoded_jpeg_is_oriented_as_pillow_does_it(orientation):
    data = asymmetric_jpeg(orientation)
    reference, ours = decode_image(data, 10**8, 2048), device_decode(data)
    assert {k: v for k, v in ours.items() if k != "image"} == {k: v for k, v in reference.items() if k != "image"}
    assert ours["image"].shape == reference["image"].shape
    # Two libjpeg-turbo builds here; nvJPEG's IDCT differs by a few codes more (measured by scripts/gpu_check.py).
    assert np.abs(ours["image"].astype(int) - reference["image"]).max() <= 2


def test_a_reduced_jpeg_is_decoded_in_full_and_reduced_to_pillows_size(demo_photos):
    """Over max_side, the device decodes in full and reduces (INTER_AREA); so does Pillow's path unless the photo is
    over twice max_side, which it decodes DCT-scaled first: the same size and analysis scale, pixels within 1 code
    without DCT scaling and, with it (measured 0.2-0.7 codes on average, 99th percentile 2-6), within 1 code on
    average and 8 at the 99th percentile."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(Image.open(demo_photos[0]).resize((1500, 2300)), "JPEG", quality=92, exif=exif.tobytes())
    for max_side in (1200, 900, 500):
        reference, ours = decode_image(data, 10**8, max_side), device_decode(data, max_side)
        assert ours["image"].shape == reference["image"].shape
        assert ours["analysis_scale"] == reference["analysis_scale"]
        diff = np.abs(ours["image"].astype(int) - reference["image"])
        if max_side * 2 > 2300:
            assert diff.max() <= 1
        else:
            assert diff.mean() <= 1 and np.percentile(diff, 99) <= 8


def test_checks_run_before_a_jpeg_is_left_to_the_device():
    from colortrend.stages.intake import TooLarge

    data = bytearray(asymmetric_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (40000).to_bytes(2, "big") * 2  # the header now declares 40000 x 40000 pixels
    with pytest.raises(TooLarge, match="max_pixels"):
        decode_image(bytes(data), 10**8, 2048, defer_jpeg=True)
    big = asymmetric_jpeg(size=(2400, 1600))
    with pytest.raises(TooLarge, match="max_decode_bytes"):
        decode_image(big, 10**8, 2048, 1000, defer_jpeg=True)
    # Decoded in full it would pass max_decode_bytes, DCT-scaled by Pillow it does not: Pillow decodes it.
    assert decode_image(big, 10**8, 600, 2400 * 1600 * 4 - 1, defer_jpeg=True)["image"].shape == (400, 600, 3)
    # What nvJPEG would convert differently, and what is not a JPEG, is decoded by Pillow.
    for other in (encoded(rgb_image().convert("CMYK"), "JPEG"), encoded(rgb_image(), "PNG")):
        assert decode_image(other, 10**8, 2048, defer_jpeg=True)["image"] is not None
    grey_progressive = encoded(rgb_image().convert("L"), "JPEG", progressive=True)
    assert decode_image(grey_progressive, 10**8, 2048, defer_jpeg=True)["image"] is None


def test_device_decoding_stage_gives_pillows_rows_and_falls_back_for_what_it_refuses(tmp_path, demo_photos,
                                                                                     monkeypatch):
    """Hostile files and demo photos through intake with JPEG decoding on a device: every row is Pillow's; files
    the device decoder refuses (a truncated JPEG here, and every second file once it refuses those too) are
    decoded by Pillow, with Pillow's outcome."""
    import torchvision.io

    make_hostile_corpus(tmp_path / "in", demo_photos[0])
    paths = discover((str(tmp_path / "in"),)) + [str(p) for p in demo_photos[:6]]
    (tmp_path / "rotated.jpg").write_bytes(asymmetric_jpeg(8))
    paths.append(str(tmp_path / "rotated.jpg"))

    def rows(jpeg_device):
        stage = IntakeStage(InputSettings(paths=("unused",)))
        stage.ops_device = jpeg_device
        return stage({"photo_id": paths, "path": paths})

    def assert_same(ours, reference):
        for key in ("status", "error", "width", "height", "taken_year", "format", "analysis_scale",
                    "content_hash"):
            assert ours[key] == reference[key], key
        for a, b in zip(ours["image"], reference["image"]):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 2

    reference = rows(None)
    assert reference["status"].count("ok") >= 15
    assert_same(rows("cpu"), reference)

    decode_jpeg, calls = torchvision.io.decode_jpeg, []

    def refuse_every_second(tensors, **kw):
        calls.append(len(tensors))
        if len(tensors) > 1 or len(calls) % 2:
            raise RuntimeError("refused")
        return decode_jpeg(tensors, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refuse_every_second)
    assert_same(rows("cpu"), reference)
    assert calls[0] > 1 and set(calls[1:]) == {1}  # one batch first, then one file at a time
