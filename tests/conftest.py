"""Shared fixtures: the demo photos shipped in data/, the labelled sets in ../shared (skipped when absent),
and a corpus of hostile files the tests make themselves."""
from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SHARED = ROOT.parent / "shared" / "data"

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def demo_photos() -> list[Path]:
    return sorted(DEMO.glob("*.jpg"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.skip("labelled data ../shared/data not present")
    return SHARED


def rgb_image(w: int = 64, h: int = 48, color=(200, 30, 30)):
    """A solid-colour PIL image."""
    from PIL import Image

    return Image.new("RGB", (w, h), color)


def encoded(im, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A ~100-byte PNG whose header declares width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def strip_tiff(rows: int) -> bytes:
    """An RGB TIFF 1 pixel wide and ``rows`` high with one strip per row: Pillow makes a Python object of every
    strip (issue 16: 10 million rows, 90 MB, took 4 GB to open)."""
    offsets_at = 8 + 3 * rows
    counts_at = offsets_at + 4 * rows
    ifd_at = counts_at + 2 * rows + 6
    entries = [(256, 4, 1, 1), (257, 4, 1, rows), (258, 3, 3, counts_at + 2 * rows), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, rows, offsets_at), (277, 3, 1, 3), (278, 4, 1, 1), (279, 3, rows, counts_at)]
    return b"".join([
        b"II*\0", struct.pack("<I", ifd_at), b"\x80" * (3 * rows),
        (8 + 3 * np.arange(rows, dtype="<u4")).tobytes(), np.full(rows, 3, "<u2").tobytes(),
        struct.pack("<3H", 8, 8, 8),
        struct.pack("<H", len(entries)),
        *(struct.pack("<HHIH2x" if kind == 3 and n == 1 else "<HHII", tag, kind, n, v) for tag, kind, n, v in entries),
        b"\0\0\0\0",
    ])


def make_hostile_corpus(folder: Path, demo_photo: Path) -> dict[str, str]:
    """Write awkward files into ``folder``; returns file name -> the status the pipeline must give it."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photo = demo_photo.read_bytes()
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, status: str) -> None:
        (folder / name).write_bytes(data)
        expected[name] = status

    put("empty.jpg", b"", "error")
    put("truncated.jpg", photo[: len(photo) // 3], "ok_or_error")
    put("text.jpg", b"this is not a photo\n" * 10, "error")
    put("bomb.png", png_bomb(), "too_large")
    # 10 megapixels declared (under max_pixels), but 1.2 million strips: over 500 MB for Pillow to open
    put("strips.tif", strip_tiff(1_200_000), "too_large")
    small_png = encoded(rgb_image(), "PNG")  # a comment chunk that inflates to 2 MB (Pillow stops at 1 MB)
    text_bomb = png_chunk(b"zTXt", b"c\0\0" + zlib.compress(b"\0" * 2_000_000))
    put("text-bomb.png", small_png[:33] + text_bomb + small_png[33:], "too_large")
    put("cmyk.jpg", encoded(rgb_image().convert("CMYK"), "JPEG"), "no_face")
    put("grey.png", encoded(rgb_image().convert("L"), "PNG"), "no_face")
    rgba = Image.new("RGBA", (64, 48), (10, 200, 10, 128))
    put("alpha.png", encoded(rgba, "PNG"), "no_face")
    pal = rgb_image().convert("P")
    pal.info["transparency"] = 0
    put("palette.png", encoded(pal, "PNG", transparency=0), "no_face")
    put("deep16.png", encoded(Image.fromarray(np.full((48, 64), 40000, np.uint16)), "PNG"), "no_face")
    put("small.webp", encoded(rgb_image(), "WEBP"), "no_face")
    frames = [rgb_image(color=(i * 40, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    put("animated.gif", buf.getvalue(), "no_face")
    put("notes.txt", b"not an image extension", "skipped")
    # three names for the same bytes: one is analysed, the others are duplicates of it
    put("photo copy ü.jpg", photo, "copy")
    put("the same photo.jpg", photo, "copy")
    (folder / "folder.jpg").mkdir()
    put("folder.jpg/inside.jpg", encoded(rgb_image(), "JPEG"), "no_face")
    os.symlink(folder / "photo copy ü.jpg", folder / "link.jpg")
    expected["link.jpg"] = "copy"
    os.symlink(folder / "missing-target.jpg", folder / "dangling.jpg")
    expected["dangling.jpg"] = "error"
    os.symlink("/dev/zero", folder / "endless.jpg")  # reading it would never end
    expected["endless.jpg"] = "error"
    os.mkfifo(folder / "pipe.jpg")  # opening it would block until someone writes
    expected["pipe.jpg"] = "error"
    put("tab\tand\nnewline.jpg", encoded(rgb_image(color=(0, 90, 200)), "JPEG"), "no_face")
    # a name that is not UTF-8: Python holds its bytes as surrogates, Arrow strings must be UTF-8
    put(os.fsdecode(b"latin-1 \xe9t\xe9.jpg"), encoded(rgb_image(color=(90, 200, 0)), "JPEG"), "no_face")
    if os.geteuid() != 0:  # root reads everything: an unreadable file cannot be made for root
        put("locked.jpg", photo, "error")
        os.chmod(folder / "locked.jpg", 0)
    return expected


@pytest.fixture
def demo_copy(tmp_path, demo_photos) -> Path:
    """A few demo photos in a folder the test may change."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in demo_photos[:4]:
        shutil.copy(p, folder / p.name)
    return folder
