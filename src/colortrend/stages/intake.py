"""Intake: read each file once, hash it, decode it to an RGB array the models can use.

Every file gets an honest outcome here: unreadable, unsupported or oversized files become rows with a status and a
message (never an exception that stops the run). The declared pixel count is checked from the header before any
pixel is decoded, so a decompression bomb costs nothing. Very large photos are decoded straight to a reduced size
(JPEG DCT scaling via ``draft``) and analysed there; coordinates are mapped back to the original pixels on output.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import UnidentifiedImageError

from colortrend.io.fs import file_size, read_bytes
from colortrend.stages.base import Batch, Stage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
EXIF_IFD = 0x8769
DATE_TAGS = (36867, 36868, 306)  # DateTimeOriginal, DateTimeDigitized, DateTime


@dataclass(frozen=True)
class InputSettings:
    # Folders (searched recursively), glob patterns, or manifest files (.csv/.parquet with a `path` column);
    # local paths or fsspec URLs (s3://bucket/photos).
    paths: tuple[str, ...]
    # Year used for photos whose EXIF has no DateTimeOriginal.
    year: int | None = None
    # Photos whose header declares more pixels than this are refused before decoding (decompression bombs).
    max_pixels: int = 60_000_000
    # Longest side the models see; larger photos are decoded reduced (width/height still report the original).
    max_side: int = 2048
    # Files found in folders with other extensions get a `skipped` row instead of being decoded.
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    # Files larger than this many bytes are refused unread.
    max_bytes: int = 200_000_000

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths: at least one folder, glob or manifest is needed")
        if self.max_side < 64:
            raise ValueError("max_side: must be at least 64")


class IntakeStage(Stage):
    name = "intake"
    reads = ("path",)
    adds = ("image",)  # decoded RGB, long side at most max_side
    photo_fields = pa.schema(
        [
            pa.field("photo_id", pa.string(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("taken_year", pa.int32()),
            pa.field("year_source", pa.string()),  # "exif" or "config"
            pa.field("content_hash", pa.string()),
            pa.field("file_bytes", pa.int64()),
            pa.field("format", pa.string()),
            pa.field("duplicate_of", pa.string()),
            pa.field("analysis_scale", pa.float32()),  # analysed pixels per original pixel (1.0 unless reduced)
        ]
    )

    def __init__(self, settings: InputSettings, device: str = "cpu", workers: int = 2):
        super().__init__(settings, device)
        self.workers = max(1, workers)

    def fingerprint_settings(self) -> dict:
        # Which folders are read does not change how a photo is decoded: adding a folder must not redo old shards.
        return {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "paths"}

    def process(self, batch: Batch) -> Batch:
        paths = batch["path"]
        # PIL and libjpeg release the GIL while decoding, so threads overlap file I/O and decoding.
        with ThreadPoolExecutor(self.workers) as pool:
            results = list(pool.map(self.read_one, paths))
        for key in ("status", "error", "width", "height", "taken_year", "year_source", "content_hash",
                    "file_bytes", "format", "analysis_scale", "image"):
            batch[key] = [r[key] for r in results]
        batch["duplicate_of"] = [None] * len(paths)
        return batch

    def read_one(self, path: str) -> dict:
        """Read, hash and decode one file; never raises."""
        row = {"status": "ok", "error": None, "width": None, "height": None, "taken_year": None,
               "year_source": None, "content_hash": None, "file_bytes": None, "format": None,
               "analysis_scale": None, "image": None}
        s = self.settings
        ext = os.path.splitext(path)[1].lower()
        if ext not in s.extensions:
            return {**row, "status": "skipped", "error": f"extension {ext or '(none)'!r} not in input.extensions"}
        try:
            size = file_size(path)
            row["file_bytes"] = size
            if size > s.max_bytes:
                return {**row, "status": "too_large", "error": f"file is {size} bytes, over input.max_bytes"}
            data = read_bytes(path, limit=s.max_bytes)
            if len(data) > s.max_bytes:
                return {**row, "status": "too_large", "error": "file grew past input.max_bytes while read"}
        except OSError as exc:
            return {**row, "status": "error", "error": f"cannot read file: {exc.strerror or exc}"}
        row["content_hash"] = hashlib.sha256(data).hexdigest()
        if not data:
            return {**row, "status": "error", "error": "empty file (0 bytes)"}
        try:
            decoded = decode_image(data, s.max_pixels, s.max_side)
        except TooLarge as exc:
            row.update(width=exc.width, height=exc.height)
            return {**row, "status": "too_large", "error": str(exc)}
        except UnidentifiedImageError:
            return {**row, "status": "error", "error": "not an image in a supported format"}
        except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's outcome, not the run's
            return {**row, "status": "error", "error": f"cannot decode image: {_one_line(exc)}"}
        row.update(decoded)
        if row["taken_year"] is not None:
            row["year_source"] = "exif"
        elif s.year is not None:
            row.update(taken_year=s.year, year_source="config")
        return row


class TooLarge(Exception):
    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"{width}x{height} = {width * height} pixels declared, over input.max_pixels={limit}")
        self.width, self.height = width, height


def decode_image(data: bytes, max_pixels: int, max_side: int) -> dict:
    """Decode bytes to an 8-bit RGB array with EXIF orientation applied.

    CMYK, greyscale, palette, alpha (composited on white) and 16-bit images all become RGB. Returns the original
    (oriented) size, the decoded array (long side at most ``max_side``), the scale between them, the EXIF year.
    """
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = None  # our own limit below, checked before decoding
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise TooLarge(width, height, max_pixels)
        fmt = im.format
        year = exif_year(im)
        orientation = im.getexif().get(0x0112, 1)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        scale = min(1.0, max_side / max(width, height))
        if scale < 1.0 and fmt == "JPEG":
            im.draft("RGB", (int(im.size[0] * scale) + 1, int(im.size[1] * scale) + 1))
        im.seek(0)  # animated GIF/WebP: the first frame
        factor = int(1 / scale)
        if factor > 1 and fmt != "JPEG":
            # Formats without DCT scaling decode in full; box-reduce right away so that the transpose and colour
            # conversions below copy a small image, not a 60-megapixel one (16-bit: 8 bytes per pixel in float).
            im = _reduce(im, factor)
        im = ImageOps.exif_transpose(im)
        rgb = to_rgb(im)
    if max(rgb.shape[:2]) > max_side:
        import cv2

        f = max_side / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f)))  # a 1-pixel-wide photo stays 1
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return {"width": width, "height": height, "taken_year": year, "format": fmt,
            "analysis_scale": rgb.shape[1] / width, "image": np.ascontiguousarray(rgb)}


def _reduce(im, factor: int):
    """``im`` shrunk by an integer factor with a box filter; modes PIL cannot reduce are converted first."""
    if im.mode.startswith("I;16"):  # reduced as 32-bit and back, so to_rgb still knows the 16-bit range
        return im.convert("I").reduce(factor).convert(im.mode)
    if im.mode in ("P", "1"):  # reduce the colours the palette stands for
        return im.convert("RGBA" if "transparency" in im.info else "RGB").reduce(factor)
    return im.reduce(factor)


def to_rgb(im) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return np.asarray(im.convert("RGB"))


def exif_year(im) -> int | None:
    """Year from EXIF DateTimeOriginal (then DateTimeDigitized, DateTime); None if absent or implausible."""
    try:
        exif = im.getexif()
        tags = {**exif, **exif.get_ifd(EXIF_IFD)}
    except Exception:  # noqa: BLE001 - corrupt EXIF is common and must not fail the photo
        return None
    for tag in DATE_TAGS:
        value = tags.get(tag)
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if isinstance(value, str) and len(value) >= 4 and value[:4].isdigit():
            year = int(value[:4])
            if 1900 <= year <= datetime.date.today().year + 1:
                return year
    return None


def _one_line(exc: Exception) -> str:
    """The message on one line, without memory addresses (the same file must give the same message every run)."""
    text = re.sub(r" ?<[^<>]* at 0x[0-9a-f]+>", "", " ".join(str(exc).split())) or type(exc).__name__
    return text[:300]
