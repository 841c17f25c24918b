"""Intake: read each file once, hash it, decode it to an RGB array the models can use.

Every file gets an honest outcome here: unreadable, unsupported or oversized files become rows with a status and a
message (never an exception that stops the run). Before any pixel is decoded, the declared pixel count is checked
from the header and the decoder's memory is estimated from the file's structure (pixel buffers, TIFF strips and tag
arrays, EXIF arrays, progressive JPEG coefficients), so a decompression or structure bomb costs nothing. A URL is
opened only when its scheme is allowed. Very large photos are decoded straight to a reduced size (JPEG DCT scaling
via ``draft``) and analysed there; coordinates are mapped back to the original pixels on output.
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

from colortrend.io.fs import file_size, read_bytes, url_schemes
from colortrend.stages.base import Batch, Stage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
EXIF_IFD = 0x8769
DATE_TAGS = (36867, 36868, 306)  # DateTimeOriginal, DateTimeDigitized, DateTime
DEFAULT_DECODE_BYTES = 500_000_000
#: InputSettings fields added after outputs were written, with their defaults (see ``fingerprint_settings``).
ADDED_SETTINGS = {"max_decode_bytes": DEFAULT_DECODE_BYTES}


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
    # URL schemes that manifest rows may name besides local files, the schemes written in `paths` and the
    # output's store (e.g. [s3]); a row naming another one becomes an error row and nothing is opened for it.
    allowed_schemes: tuple[str, ...] = ()
    # Photos whose decoding would need more memory than this (pixel buffers, TIFF strips/tiles and tag arrays,
    # EXIF, progressive JPEG coefficients), estimated from the file's structure, are refused before decoding.
    max_decode_bytes: int = DEFAULT_DECODE_BYTES

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths: at least one folder, glob or manifest is needed")
        if self.max_side < 64:
            raise ValueError("max_side: must be at least 64")
        if self.max_decode_bytes < 1:
            raise ValueError("max_decode_bytes: must be positive")
        if self.allowed_schemes:
            import difflib

            from fsspec import available_protocols

            known = available_protocols()
            for i, scheme in enumerate(self.allowed_schemes):
                if scheme not in known:
                    close = difflib.get_close_matches(scheme, known, n=3)
                    hint = f"did you mean {', '.join(close)}?" if close else f"fsspec knows {len(known)} others"
                    raise ValueError(f"allowed_schemes[{i}]: unknown URL scheme {scheme!r} ({hint})")


#: Row keys that decoding fills in.
DECODED_KEYS = ("width", "height", "taken_year", "year_source", "format", "analysis_scale", "image")


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

    def __init__(self, settings: InputSettings, device: str = "cpu", workers: int = 2, output: str | None = None):
        super().__init__(settings, device)
        self.workers = max(1, workers)
        self.schemes = input_schemes(settings, output)

    def fingerprint_settings(self) -> dict:
        # Which folders are read does not change how a photo is decoded: adding a folder must not redo old shards.
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items()
                    if k not in ("paths", "allowed_schemes")}
        # Settings added after outputs existed count only when changed, so an upgrade does not restale every shard.
        for name, default in ADDED_SETTINGS.items():
            if settings.get(name) == default:
                del settings[name]
        return settings

    def process(self, batch: Batch) -> Batch:
        paths = batch["path"]
        device = self.torch_device()  # JPEGs batched through torchvision's decoder (nvJPEG on a GPU), or Pillow
        # PIL and libjpeg release the GIL while decoding, so threads overlap file I/O and decoding.
        with ThreadPoolExecutor(self.workers) as pool:
            rows = list(pool.map(lambda path: self.read_one(path, defer_jpeg=device is not None), paths))
            deferred = [i for i, row in enumerate(rows) if "jpeg" in row]
            jobs = [rows[i].pop("jpeg") for i in deferred]
            refused = []
            for i, job, image in zip(deferred, jobs, decode_jpegs(jobs, device) if jobs else []):
                if image is None:
                    refused.append((i, job))
                rows[i]["image"] = image
            # What the GPU decoder refuses is decoded by Pillow, from the row as it was before decoding began.
            redo = [({**rows[i], **dict.fromkeys(DECODED_KEYS)}, job.data) for i, job in refused]
            for (i, _), row in zip(refused, pool.map(lambda item: self.decode_into(*item), redo)):
                rows[i] = row
        for key in ("status", "error", "width", "height", "taken_year", "year_source", "content_hash",
                    "file_bytes", "format", "analysis_scale", "image"):
            batch[key] = [r[key] for r in rows]
        batch["duplicate_of"] = [None] * len(paths)
        return batch

    def read_one(self, path: str, defer_jpeg: bool = False) -> dict:
        """Read, hash and decode one file; never raises. ``defer_jpeg``: see :func:`decode_image` (a deferred
        JPEG's row has ``image`` None and its :class:`JpegJob` in ``jpeg``)."""
        row = {"status": "ok", "error": None, "width": None, "height": None, "taken_year": None,
               "year_source": None, "content_hash": None, "file_bytes": None, "format": None,
               "analysis_scale": None, "image": None}
        s = self.settings
        refused = sorted(url_schemes(path) - self.schemes)
        if refused:  # checked before anything is opened: a manifest row must not choose where we connect
            allowed = ", ".join(["local files", *sorted(self.schemes)])
            return {**row, "status": "error", "error": f"URL scheme {refused[0]!r} is not allowed (allowed here: "
                    f"{allowed}; add others to input.allowed_schemes)"}
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
        return self.decode_into(row, data, defer_jpeg)

    def decode_into(self, row: dict, data: bytes, defer_jpeg: bool = False) -> dict:
        """Decode ``data`` into ``row`` (size, format, year, image, or the refusal); never raises."""
        s = self.settings
        try:
            decoded = decode_image(data, s.max_pixels, s.max_side, s.max_decode_bytes, defer_jpeg=defer_jpeg)
        except TooLarge as exc:
            row.update(width=exc.width, height=exc.height, format=exc.format)
            return {**row, "status": "too_large", "error": str(exc)}
        except UnidentifiedImageError:
            return {**row, "status": "error", "error": "not an image in a supported format"}
        except ValueError as exc:
            if str(exc).startswith("Decompressed data too large"):  # Pillow's only sign of a zlib bomb in a PNG
                return {**row, "status": "too_large", "error": "a compressed PNG text or colour-profile chunk expands "
                        "past Pillow's limit of 1 MB (PngImagePlugin.MAX_TEXT_CHUNK)"}
            return {**row, "status": "error", "error": f"cannot decode image: {_one_line(exc)}"}
        except Exception as exc:  # any decoder failure is this file's outcome, not the run's
            return {**row, "status": "error", "error": f"cannot decode image: {_one_line(exc)}"}
        row.update(decoded)
        if row["taken_year"] is not None:
            row["year_source"] = "exif"
        elif s.year is not None:
            row.update(taken_year=s.year, year_source="config")
        return row


def input_schemes(settings: InputSettings, output: str | None = None) -> frozenset[str]:
    """URL schemes intake may open besides local files: those the user wrote in ``input.paths`` and
    ``input.allowed_schemes``, and the output's store's."""
    return frozenset().union(*(url_schemes(p) for p in (*settings.paths, output or "")), settings.allowed_schemes)


class TooLarge(Exception):
    """A photo refused before decoding: over ``max_pixels``, or its decoding would exceed ``max_decode_bytes``."""

    def __init__(self, message: str, width: int | None = None, height: int | None = None, fmt: str | None = None):
        super().__init__(message)
        self.width, self.height, self.format = width, height, fmt


def decode_image(data: bytes, max_pixels: int, max_side: int, max_decode_bytes: int = DEFAULT_DECODE_BYTES,
                 defer_jpeg: bool = False) -> dict:
    """Decode bytes to an 8-bit RGB array with EXIF orientation applied.

    CMYK, greyscale, palette, alpha (composited on white) and 16-bit images all become RGB. Returns the original
    (oriented) size, the decoded array (long side at most ``max_side``), the scale between them, the EXIF year.
    Raises :class:`TooLarge` before decoding a photo over ``max_pixels`` or one whose decoder would need more than
    ``max_decode_bytes`` (see :func:`decoder_bytes`).

    ``defer_jpeg``: a JPEG the GPU decoder can take (YCbCr or greyscale, its full-size decode within
    ``max_decode_bytes``) is not decoded here: after every check, ``image`` is None and ``jpeg`` says how to
    finish it (:class:`JpegJob`, for :func:`decode_jpegs`).
    """
    from PIL import Image, ImageOps

    # Pillow parses a TIFF's whole first directory when it opens the file (every strip becomes a Python object),
    # so its structure is measured from the raw bytes before Pillow sees them.
    structure = tiff_structure_bytes(data) if data[:4] in TIFF_HEADERS else DecodeCost()
    if structure.total > max_decode_bytes:
        raise TooLarge(structure.refusal(max_decode_bytes), fmt="TIFF")
    # Pillow refuses (at twice its MAX_IMAGE_PIXELS) in open(), before our own limit below is checked: it is
    # raised as far as max_pixels when that is larger, never switched off (it guards every Pillow user in the
    # process), and its refusal is ours.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # "Image size (N pixels) exceeds limit of ..."
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        raise TooLarge(f"{declared[1] if declared else 'too many'} pixels declared, over input.max_pixels="
                       f"{max_pixels}", fmt=None) from None
    with opened as im:
        width, height = im.size
        fmt = im.format
        if width * height > max_pixels:
            raise TooLarge(f"{width}x{height} = {width * height} pixels declared, over input.max_pixels={max_pixels}",
                           width, height, fmt)
        exif = im.info.get("exif")
        if isinstance(exif, bytes) and fmt != "TIFF":  # a TIFF's EXIF is its own first directory, measured above
            structure = structure + tiff_structure_bytes(exif.removeprefix(b"Exif\0\0"), image=False)
        if structure.total > max_decode_bytes:  # reading EXIF expands its tag arrays: refuse before that
            raise TooLarge(structure.refusal(max_decode_bytes), width, height, fmt)
        orientation = im.getexif().get(0x0112, 1)
        oriented = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        scale = min(1.0, max_side / max(oriented))
        # The GPU decodes at full size (no DCT scaling): its buffer counts in full.
        deferred = (defer_jpeg and fmt == "JPEG" and im.mode in GPU_JPEG_MODES
                    and (structure + decoder_bytes(im, width, height)).total <= max_decode_bytes)
        if scale < 1.0 and fmt == "JPEG":
            im.draft("RGB", (int(im.size[0] * scale) + 1, int(im.size[1] * scale) + 1))
        cost = structure + decoder_bytes(im, width, height)
        if cost.total > max_decode_bytes:
            raise TooLarge(cost.refusal(max_decode_bytes), width, height, fmt)
        year = exif_year(im)
        width, height = oriented
        if deferred:
            # The size the CPU path ends at: its draft's size, oriented, then reduced to max_side.
            drafted = im.size[::-1] if orientation in (5, 6, 7, 8) else im.size
            f = min(1.0, max_side / max(drafted))
            size = (max(1, round(drafted[0] * f)), max(1, round(drafted[1] * f)))
            return {"width": width, "height": height, "taken_year": year, "format": fmt,
                    "analysis_scale": size[0] / width, "image": None,
                    "jpeg": JpegJob(data, orientation if orientation in range(1, 9) else 1, size, width * height)}
        im.seek(0)  # animated GIF/WebP, multi-page TIFF: the first frame (later ones are never parsed)
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


# ---- JPEG decode on the GPU ---------------------------------------------------------------------------------------
#: JPEG modes nvJPEG decodes to RGB as libjpeg does (CMYK/YCCK stay on the CPU, whose conversion is Pillow's).
GPU_JPEG_MODES = ("RGB", "L")


@dataclass(frozen=True)
class JpegJob:
    """A JPEG that passed every check in :func:`decode_image`, left to :func:`decode_jpegs`."""

    data: bytes
    orientation: int  # EXIF orientation, 1-8
    size: tuple[int, int]  # (width, height) of the analysed image, as the CPU path would make it
    pixels: int  # of the stored image, which the GPU decodes in full


def decode_jpegs(jobs: list[JpegJob], device: str) -> list[np.ndarray | None]:
    """RGB arrays of the JPEGs, decoded together on ``device`` (nvJPEG on a GPU), oriented and reduced there;
    None for each one the decoder refuses (the caller decodes those on the CPU).

    The pixels differ from Pillow's by the decoders' IDCT and chroma upsampling (a few codes; the tests state the
    tolerance), and a photo over ``max_side`` is reduced from its full size instead of from a DCT-scaled one.
    """
    import warnings

    import torch

    from torchvision import io as tvio

    def decode(batch: list[JpegJob]) -> list:
        tensors = [torch.frombuffer(bytearray(job.data), dtype=torch.uint8) for job in batch]
        with warnings.catch_warnings():  # torchvision 0.29 announces TorchCodec; its decoder is unchanged
            warnings.simplefilter("ignore", DeprecationWarning)
            return tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=device)

    results: list[np.ndarray | None] = []
    for chunk in _pixel_chunks(jobs):
        try:
            decoded = decode(chunk)
        except Exception:  # one refused file fails the whole call: find it by decoding one at a time
            decoded = []
            for job in chunk:
                try:
                    decoded.extend(decode([job]))
                except Exception:  # the CPU decodes it, or says why it cannot
                    decoded.append(None)
        results.extend(None if image is None else _finish_jpeg(image, job, device)
                       for image, job in zip(decoded, chunk))
    return results


#: Pixels decoded by one call of the GPU decoder (its output and work buffers live on the GPU until finished).
JPEG_BATCH_PIXELS = 200_000_000


def _pixel_chunks(jobs: list[JpegJob]) -> list[list[JpegJob]]:
    """``jobs`` in order, in runs of at most ``JPEG_BATCH_PIXELS`` declared pixels (at least one job each)."""
    chunks: list[list[JpegJob]] = [[]]
    pixels = 0
    for job in jobs:
        if chunks[-1] and pixels + job.pixels > JPEG_BATCH_PIXELS:
            chunks.append([])
            pixels = 0
        chunks[-1].append(job)
        pixels += job.pixels
    return chunks


def _finish_jpeg(image, job: JpegJob, device: str) -> np.ndarray:
    """A decoded (3, h, w) tensor oriented by its EXIF tag, reduced to the job's size, as a read-only numpy array
    (as Pillow's are) whose copy on ``device`` the later stages share (:class:`~colortrend.color.torch_ops.
    DeviceCopies`): the photo never crosses to the device again."""
    import torch

    from colortrend.color.torch_ops import DEVICE_COPIES, opencv_resize

    hwc = image.permute(1, 2, 0)
    hwc = {1: lambda x: x, 2: lambda x: x.flip(1), 3: lambda x: x.flip(0, 1), 4: lambda x: x.flip(0),
           5: lambda x: x.transpose(0, 1), 6: lambda x: torch.rot90(x, -1), 7: lambda x: x.transpose(0, 1).flip(0, 1),
           8: lambda x: torch.rot90(x, 1)}[job.orientation](hwc)
    if (hwc.shape[1], hwc.shape[0]) != job.size:
        hwc = opencv_resize(hwc[None].float(), job.size, "area")[0].round_().clamp_(0, 255).to(torch.uint8)
    hwc = hwc.contiguous()
    array = np.ascontiguousarray(hwc.cpu().numpy())
    array.flags.writeable = False
    DEVICE_COPIES.put(array, hwc, device)
    return array


# ---- what decoding will cost, from the file's structure -------------------------------------------------------
# Measured with Pillow 13 on this machine (peak RSS over a 1-million-part file, scripts/measure_decode_memory.py):
# each numeric TIFF/EXIF tag value Pillow reads becomes a Python int in a tuple (about 60 bytes; a rational is an
# IFDRational object, about 300), each strip or tile a tile record on top of its offset and byte count (about 300).
# Pillow holds 4 bytes per pixel (RGB is stored as RGBX); its WebP decoder about 16 (libwebp's canvas, the
# previous frame, the frame and Pillow's copy). A progressive JPEG keeps every DCT coefficient of the whole image
# (2 bytes each) whatever size it is decoded to.
TIFF_HEADERS = {b"II*\0": ("<", False), b"MM\0*": (">", False), b"II+\0": ("<", True), b"MM\0+": (">", True)}
TIFF_VALUE_BYTES = 64
TIFF_RATIONAL_BYTES = 320
TIFF_PART_BYTES = 320
TIFF_RATIONALS = {5, 10}  # RATIONAL, SRATIONAL
TIFF_NUMBERS = {3, 4, 8, 9, 11, 12, 13, 16, 17, 18}  # SHORT, LONG, SSHORT, SLONG, FLOAT, DOUBLE, IFD, LONG8, ...
TIFF_PART_TAGS = (273, 324)  # StripOffsets, TileOffsets
TIFF_POINTERS = (4, 13, 16, 18)  # LONG, IFD, LONG8, IFD8: the types a sub-directory offset comes in
#: Bytes per value of each TIFF field type (0 and past the end: unknown types, which Pillow skips).
TIFF_TYPE_BYTES = np.array([0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8, 8, 8, 0])
TIFF_ENTRY_BYTES = 200  # Pillow keeps each entry's raw bytes and type in dicts
PIXEL_BYTES = {"WEBP": 16}
DEFAULT_PIXEL_BYTES = 4


@dataclass(frozen=True)
class DecodeCost:
    """Estimated decoder memory, by what it is spent on (for the refusal message)."""

    parts: tuple[tuple[str, int], ...] = ()

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def __add__(self, other: "DecodeCost") -> "DecodeCost":
        return DecodeCost(self.parts + other.parts)

    def refusal(self, limit: int) -> str:
        what = max(self.parts, key=lambda p: p[1])[0]
        return (f"decoding would need about {self.total / 1e6:,.0f} MB (mostly {what}), "
                f"over input.max_decode_bytes={limit}")


def decoder_bytes(im, width: int, height: int) -> DecodeCost:
    """Memory Pillow and its codecs will take to decode ``im`` (opened, after ``draft``): pixel buffers and, for
    a progressive JPEG, the coefficients of the whole image (libjpeg buffers every scan before the last)."""
    w, h = im.size  # the reduced size after a JPEG draft
    per_pixel = PIXEL_BYTES.get(im.format, DEFAULT_PIXEL_BYTES)
    parts = [(f"a {w}x{h} pixel buffer", w * h * per_pixel)]
    if im.format == "JPEG" and im.info.get("progressive"):
        layers = getattr(im, "layer", None) or [("", 1, 1, 0)] * len(im.getbands())
        h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
        blocks = sum(-(-width * layer[1] // (8 * h_max)) * -(-height * layer[2] // (8 * v_max)) for layer in layers)
        parts.append(("progressive JPEG coefficients", blocks * 64 * 2))
    return DecodeCost(tuple(parts))


def tiff_structure_bytes(data: bytes, image: bool = True) -> DecodeCost:
    """What Pillow allocates reading the first directory (and its EXIF directory) of TIFF-structured ``data``: a
    TIFF file (``image``: its strips or tiles become tile records too) or an EXIF blob. Reads only the entries'
    headers, never their values; a malformed structure counts what can be read (the decoder then fails on it, as
    it would have)."""
    header = TIFF_HEADERS.get(data[:4])
    if header is None:
        return DecodeCost()
    order, big = header
    count_type, field = (f"{order}u8", f"{order}u8") if big else (f"{order}u2", f"{order}u4")
    entry = np.dtype([("tag", f"{order}u2"), ("kind", f"{order}u2"), ("count", field), ("value", field)])
    totals = {"entries": 0, "values": 0, "rationals": 0, "parts": 0}
    first = _unpack(data, 8 if big else 4, field)
    directories = [first]
    for i, offset in enumerate(directories):
        if offset is None or offset in directories[:i]:
            continue
        n = _unpack(data, offset, count_type)
        start = offset + np.dtype(count_type).itemsize
        n = min(n or 0, max(0, (len(data) - start) // entry.itemsize))  # entries past the end cannot be read
        entries = np.frombuffer(data, entry, count=n, offset=start) if n else np.zeros(0, entry)
        # A count whose values the file cannot hold is not read by Pillow either; float: no wrap-around.
        sizes = TIFF_TYPE_BYTES[np.minimum(entries["kind"], len(TIFF_TYPE_BYTES) - 1)]
        counts = np.minimum(entries["count"].astype(np.float64), len(data) / np.maximum(sizes, 1))
        totals["entries"] += n
        totals["values"] += counts[np.isin(entries["kind"], list(TIFF_NUMBERS))].sum()
        totals["rationals"] += counts[np.isin(entries["kind"], list(TIFF_RATIONALS))].sum()
        totals["parts"] += counts[np.isin(entries["tag"], TIFF_PART_TAGS)].sum() if image and i == 0 else 0
        exif = entries[(entries["tag"] == EXIF_IFD) & np.isin(entries["kind"], TIFF_POINTERS)]
        if i == 0 and len(exif):  # the date is read from the first directory's EXIF directory
            directories.append(int(exif["value"][-1]))
    cost = [(f"{int(totals['parts']):,} TIFF strips or tiles", totals["parts"] * TIFF_PART_BYTES),
            (f"{int(totals['values']):,} TIFF tag values", totals["values"] * TIFF_VALUE_BYTES),
            (f"{int(totals['rationals']):,} TIFF rational values", totals["rationals"] * TIFF_RATIONAL_BYTES),
            (f"{totals['entries']:,} TIFF directory entries", totals["entries"] * TIFF_ENTRY_BYTES)]
    return DecodeCost(tuple((what, int(n)) for what, n in cost if n))


def _unpack(data: bytes, offset: int, dtype: str) -> int | None:
    """The unsigned integer of ``dtype`` at ``offset``, None where ``data`` does not hold one."""
    size = np.dtype(dtype).itemsize
    if not 0 < offset <= len(data) - size:
        return None
    return int(np.frombuffer(data, dtype, count=1, offset=offset)[0])


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
        sub = exif.get_ifd(EXIF_IFD)
        # Only the date tags: Pillow expands a tag's values when it is read, and the others may be large arrays.
        values = [sub.get(tag, exif.get(tag)) for tag in DATE_TAGS]
    except Exception:  # corrupt EXIF is common and must not fail the photo
        return None
    for value in values:
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
