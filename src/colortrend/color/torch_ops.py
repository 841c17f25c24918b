"""The colour work as batched torch ops, for a stage whose device is a GPU.

The numpy/OpenCV code in ``white_balance`` and ``kmeans`` is the reference and stays the CPU path (it is faster on
a CPU: ``scripts/gpu_check.py --only colour`` measures both). Here the same arithmetic runs as a few
kernels over many photos or persons at once:

* white balance: photos of one size are stacked; the downscaled linear copy is OpenCV's ``INTER_AREA`` written as
  two matrix products with OpenCV's own weights, so the estimate sees the same pixels; the gains' 8-bit tables are
  the CPU's (bit-identical corrected photos for the same gains).
* k-means: each person's garment pixels found in their label map, sampled and read from the white-balanced photo,
  highlights dropped and colour histograms built, then greedy k-means++ seeding from the same uniform draws as
  the CPU path and the same Lloyd iterations, for all persons of the batch at once; merging close clusters is the
  CPU's code (a few centres a person). Results agree within float32 rounding of distances (a tie may fall the
  other way): dominant colours within CIEDE2000 0.5 and shares within 0.01, tested on real garments (identical on
  the first 100 CCP photos).

torch is imported by the functions, never by this module's importers: ``--help`` stays fast.
"""
from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from colortrend.color import kmeans as cpu_kmeans
from colortrend.color import space
from colortrend.color import white_balance as cpu_wb
from colortrend.color.white_balance import Correction

#: Half-width of the grey-edge blur: OpenCV's kernel for a float image is round(sigma * 8 + 1) | 1 taps wide.
EDGE_RADIUS = (round(cpu_wb.EDGE_SIGMA * 8 + 1) | 1) // 2
#: Persons clustered in one padded array on the device: large, since padding costs little there.
DEVICE_CHUNK = 4096


# ---- resizing as OpenCV does -------------------------------------------------------------------------------------
# A resize along one axis is a few taps per output pixel: (target, taps) source indices and weights, applied as one
# gather and a weighted sum, so the work grows with the output (a dense matrix product grows with output x input,
# 60 GFLOP for one 12-megapixel photo reduced to 1280 pixels).

@functools.lru_cache(maxsize=1024)  # photos come in a few sizes; a crop's or an odd size's taps cost ~50 us
def area_taps(source: int, target: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """OpenCV's ``INTER_AREA`` weights along one axis for a reduction (target <= source), as (target, taps) source
    indices and weights.

    Each output pixel averages the source pixels its footprint covers, by the covered fraction; OpenCV leaves out a
    partly covered pixel whose share is under 1e-3 (``computeResizeAreaTab``), and so does this. Cached: never
    modify the arrays returned.
    """
    scale = source / target
    start = np.arange(target) * scale
    end = start + scale
    cell = np.minimum(scale, source - start)
    last = np.minimum(np.floor(end), source - 1).astype(np.int64)
    first = np.minimum(np.ceil(start).astype(np.int64), last)
    head = first - start > 1e-3  # the partly covered pixel before the whole ones
    tail = end - last > 1e-3  # and the one after them
    begin = np.where(head, first - 1, first)
    taps = max(1, int((np.where(tail, last + 1, last) - begin).max()))
    index = begin[:, None] + np.arange(taps)
    weights = np.where((index >= first[:, None]) & (index < last[:, None]), 1.0 / cell[:, None], 0.0)
    weights = np.where(head[:, None] & (index == first[:, None] - 1), ((first - start) / cell)[:, None], weights)
    partial = np.minimum(np.minimum(end - last, 1.0), cell) / cell
    weights = np.where(tail[:, None] & (index == last[:, None]), partial[:, None], weights)
    return np.minimum(index, source - 1), weights.astype(np.float32)


@functools.lru_cache(maxsize=1024)
def area_fallback_taps(source: int, target: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """The 2-tap weights ``INTER_AREA`` falls back to when either axis is enlarged (``cv::resize``'s coefficients
    and its clamps at the edges), as (target, 2) source indices and weights."""
    inverse = target / source
    scale = 1.0 / inverse  # as OpenCV computes it: 37 * (150 / 185) is 30.000000000000004, 37 / (185 / 150) 29.99...
    d = np.arange(target)
    sx = np.floor(d * scale).astype(np.int64)
    fx = ((d + 1) - (sx + 1) * inverse).astype(np.float32)
    fx = np.where(fx <= 0, 0.0, fx - np.floor(fx))
    edge = sx >= source - 1
    fx, sx = np.where(edge, 0.0, fx), np.where(edge, source - 1, sx)
    index = np.stack([sx, np.minimum(sx + 1, source - 1)], axis=1)
    return index, np.stack([1.0 - fx, fx], axis=1).astype(np.float32)


def opencv_resize(images, size: tuple[int, int], interpolation: str):
    """(N, H, W, C) float tensor resized to ``size`` = (width, height) as ``cv2.resize`` does, unrounded:
    ``"area"`` is ``INTER_AREA`` (true area averages when both axes shrink, OpenCV's 2-tap fallback otherwise),
    ``"linear"`` ``INTER_LINEAR`` (torch's bilinear sampling is OpenCV's, to float rounding)."""
    import torch.nn.functional as F

    height, width = images.shape[1:3]
    if (width, height) == size:
        return images
    if interpolation == "linear":
        nchw = F.interpolate(images.permute(0, 3, 1, 2), size=(size[1], size[0]), mode="bilinear",
                             align_corners=False)
        return nchw.permute(0, 2, 3, 1)
    taps = area_taps if size[0] <= width and size[1] <= height else area_fallback_taps
    rows = _taps_on(taps, height, size[1], images.device, images.dtype, images.dim() - 2)
    columns = _taps_on(taps, width, size[0], images.device, images.dtype, images.dim() - 3)
    return _resample(_resample(images, *rows, 1), *columns, 2)


@functools.lru_cache(maxsize=1024)
def _taps_on(taps, source: int, target: int, device, dtype, trailing: int):
    """``taps(source, target)`` as tensors on ``device``: the flat source indices, and the weights shaped to
    broadcast over ``trailing`` dimensions after the resampled one. Cached, so a resize of a known size uploads
    nothing (each upload is a copy the host waits on)."""
    import torch

    index, weights = taps(source, target)
    flat = torch.from_numpy(index.reshape(-1)).to(device)
    return flat, torch.from_numpy(weights).to(device, dtype).view(*weights.shape, *([1] * trailing))


def _resample(images, index, weights, dim: int):
    """``images`` resampled along ``dim`` by (target, taps) source indices (flat) and weights, on their device."""
    target, taps = weights.shape[:2]
    gathered = images.index_select(dim, index).view(*images.shape[:dim], target, taps, *images.shape[dim + 1:])
    return (gathered * weights).sum(dim + 1)


def to_device(array: NDArray, device: str):
    """A tensor on ``device`` holding ``array`` (copied when numpy marks it read-only, as decoded photos are)."""
    import torch

    if not array.flags.writeable:
        return torch.tensor(array, device=device)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


class DeviceCopies:
    """Each photo's copy on a device, made once per process and shared by the stages that need it there (detect's
    pyramid, segment's crops, white balance, dominant), so a photo crosses to the GPU once, or never when the GPU
    decoded it or made it (:meth:`put`); the persons' label maps likewise cross once for white balance and the
    dominant stage. Only read-only arrays (decoded photos and label maps are) are shared, since they cannot change;
    a copy lives as long as its array. The shared tensor must not be written to."""

    def __init__(self):
        self._copies: dict[tuple[int, str], tuple[weakref.ref, object]] = {}
        self._lock = threading.RLock()  # re-entrant: an array freed while the lock is held drops its own entry
        self.uploaded_bytes = 0  # what crossed to a device through :meth:`get` (scripts/bench.py reports it)

    def get(self, image: NDArray, device: str):
        held = None if image.flags.writeable else self._copies.get((id(image), str(device)))
        if held is not None and held[0]() is image:
            return held[1]
        tensor = to_device(image, device)
        with self._lock:
            self.uploaded_bytes += image.nbytes
        self.put(image, tensor, device)
        return tensor

    def put(self, image: NDArray, tensor, device: str) -> None:
        """``tensor`` (on ``device``) is ``image``'s copy there."""
        if image.flags.writeable:
            return
        key = (id(image), str(device))
        with self._lock:
            self._copies[key] = (weakref.ref(image, lambda _, key=key: self._drop(key)), tensor)

    def _drop(self, key: tuple[int, str]) -> None:
        with self._lock:
            self._copies.pop(key, None)

    def __len__(self) -> int:
        return len(self._copies)


#: This process's shared device copies of photos.
DEVICE_COPIES = DeviceCopies()


def photo_on_device(image: NDArray[np.uint8], device: str):
    """``image`` on ``device``: this process's shared copy (:class:`DeviceCopies`); never write to it."""
    return DEVICE_COPIES.get(image, device)


# ---- white balance ----------------------------------------------------------------------------------------------

def white_balance_batch(images: Sequence[NDArray[np.uint8]], method: str, device: str, *,
                        landmarks: Sequence[NDArray | None] | None = None,
                        excludes: Sequence[NDArray[np.bool_] | cpu_wb.Regions | None] | None = None,
                        max_gain: float = 3.0,
                        min_cast_deg: float = 2.0) -> list[Correction]:
    """``white_balance`` of each photo, estimated and applied on ``device``; returns what it would return.

    The ``skin`` method's estimate stays on the CPU (a few small face patches per photo); its fallback and every
    statistical estimate run batched on ``device``. An exclusion is a photo-sized mask or :class:`Regions`.
    """
    if method not in cpu_wb.WB_METHODS:
        raise ValueError(f"unknown white balance method {method!r}; expected one of {', '.join(cpu_wb.WB_METHODS)}")
    n = len(images)
    landmarks = landmarks if landmarks is not None else [None] * n
    # A photo-sized mask is one region: the estimate takes regions only.
    excludes = [cpu_wb.Regions(((0, 0, np.asarray(e, bool)),)) if isinstance(e, np.ndarray) else e
                for e in (excludes if excludes is not None else [None] * n)]
    methods = [method] * n
    illuminants: list[NDArray[np.float64] | None] = [None] * n
    if method == "skin":
        for i in range(n):
            illuminants[i] = cpu_wb.skin_illuminant(images[i], landmarks[i])
            if illuminants[i] is None:
                methods[i] = "shades_of_gray"
    statistical = [i for i in range(n) if methods[i] != "none" and illuminants[i] is None]
    for i, estimate in zip(statistical, estimate_illuminants([images[i] for i in statistical],
                                                             [methods[i] for i in statistical],
                                                             [excludes[i] for i in statistical], device)):
        illuminants[i] = estimate
    gains: list[NDArray[np.float64] | None] = [None] * n
    results: list[Correction | None] = [None] * n
    for i in range(n):
        if illuminants[i] is None:
            results[i] = Correction(images[i], np.ones(3), cpu_wb._unit(np.ones(3)), "none")
        elif cpu_wb.angular_error(illuminants[i], np.ones(3)) < min_cast_deg:
            results[i] = Correction(images[i], np.ones(3), illuminants[i], methods[i])
        else:
            gains[i] = cpu_wb.illuminant_gains(illuminants[i], max_gain)
    todo = [i for i in range(n) if gains[i] is not None]
    for i, corrected in zip(todo, apply_gains_batch([images[i] for i in todo], [gains[i] for i in todo], device)):
        results[i] = Correction(corrected, gains[i], illuminants[i], methods[i])
    return results


@functools.lru_cache(maxsize=64)
def _table_on(table: bytes, device: str):
    """A bool lookup table (as bytes) on ``device``, uploaded once."""
    import torch

    return torch.frombuffer(bytearray(table), dtype=torch.bool).to(device)


def estimate_illuminants(images: Sequence[NDArray[np.uint8]], methods: Sequence[str],
                         excludes: Sequence[cpu_wb.Regions | None], device: str) -> list[NDArray | None]:
    """``estimate_illuminant`` of each photo, photos of one size and method as one stack on ``device``."""
    import torch

    results: list[NDArray | None] = [None] * len(images)
    lut = torch.from_numpy(cpu_wb._LINEAR_LUT).to(device)
    groups: dict[tuple, list[int]] = {}
    for i, (image, method) in enumerate(zip(images, methods)):
        groups.setdefault((image.shape, method), []).append(i)
    for (shape, method), members in groups.items():
        h, w = shape[:2]
        scale = min(1.0, cpu_wb.ESTIMATE_SIDE / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if method == "gray_edge" and min(size) <= EDGE_RADIUS:
            # Too small for the blur's mirrored border (torch mirrors once, OpenCV repeatedly): the CPU's code.
            for i in members:
                exclude = None if excludes[i] is None else excludes[i].mask(images[i].shape[:2])
                results[i] = cpu_wb.estimate_illuminant(images[i], method, exclude)
            continue
        codes = torch.stack([photo_on_device(images[i], device) for i in members])
        linear = opencv_resize(lut[codes.long()], size, "area")
        bad = codes.amax(-1) >= cpu_wb.CLIP_CODE
        for row, i in enumerate(members):
            regions = excludes[i]
            if regions is None:
                continue
            table = None if regions.table is None else _table_on(regions.table.tobytes(), device)
            for x0, y0, part in regions.parts:  # each person's crop crosses, not a photo-sized mask
                part_on_device = photo_on_device(part, device)
                if table is not None:
                    part_on_device = table[part_on_device.long()]
                bad[row, y0:y0 + part.shape[0], x0:x0 + part.shape[1]] |= part_on_device
        # A downscaled pixel is usable only when none of the pixels it averages is bad.
        usable = opencv_resize(bad.float()[..., None], size, "area")[..., 0] == 0
        if method == "gray_world":
            values, p = linear, 1
        elif method == "shades_of_gray":
            values, p = linear, cpu_wb.MINKOWSKI_P
        elif method == "gray_edge":
            values, usable, p = _edge_magnitude(linear), _erode(usable), cpu_wb.MINKOWSKI_P
        else:
            raise ValueError(f"{method!r} is not a statistical white balance method")
        weight = usable[..., None].double()
        count = weight.sum((1, 2))  # (N, 1)
        norm = ((values.double() ** p * weight).sum((1, 2)) / count.clamp(min=1)) ** (1 / p)
        norms, counts = norm.cpu().numpy(), count[:, 0].cpu().numpy()  # one copy back for the group, not one a photo
        for row, i in enumerate(members):
            estimate = norms[row]
            if counts[row] == 0 or not np.isfinite(estimate).all() or estimate.max() <= 0:
                continue  # nothing usable, or a black or flat photo: it says nothing about the light
            results[i] = cpu_wb._unit(estimate)
    return results


def _edge_magnitude(linear):
    """Gradient magnitude after a Gaussian blur, per channel: cv2.GaussianBlur (sigma ``EDGE_SIGMA``, the 9-tap
    kernel OpenCV picks for float images) then 3x3 Sobel, both with OpenCV's default mirrored border."""
    import torch
    import torch.nn.functional as F

    n, h, w, c = linear.shape
    x = linear.permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    taps = np.exp(-((np.arange(-EDGE_RADIUS, EDGE_RADIUS + 1) / cpu_wb.EDGE_SIGMA) ** 2) / 2)
    gauss = torch.tensor(taps / taps.sum(), dtype=x.dtype, device=x.device)

    def separable(image, column, row):
        pad_y, pad_x = len(column) // 2, len(row) // 2
        image = F.pad(image, (pad_x, pad_x, pad_y, pad_y), mode="reflect")  # reflect = OpenCV's REFLECT_101
        return F.conv2d(image, column.view(1, 1, -1, 1) * row.view(1, 1, 1, -1))

    blurred = separable(x, gauss, gauss)
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    diff = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    dx, dy = separable(blurred, smooth, diff), separable(blurred, diff, smooth)
    return torch.hypot(dx, dy).reshape(n, c, h, w).permute(0, 2, 3, 1)


def _erode(usable):
    """3x3 erosion of a (N, h, w) mask, the border counting as usable (OpenCV's default for erode)."""
    import torch.nn.functional as F

    bad = F.max_pool2d((~usable).float()[:, None], 3, stride=1, padding=1)[:, 0]
    return bad == 0


def apply_gains_batch(images: Sequence[NDArray[np.uint8]], gains: Sequence[NDArray[np.float64]],
                      device: str) -> list[NDArray[np.uint8]]:
    """``apply_gains`` of each photo on ``device``: the CPU's 8-bit tables, looked up there."""
    import torch

    if not images:
        return []
    # Every photo's three tables at once, apply_gains' own; one upload for all.
    tables = torch.from_numpy(cpu_wb.gain_tables(np.stack(gains)).reshape(len(images), -1)).to(device)
    channel = torch.arange(3, device=device) * 256  # channel c reads its own table
    out = []
    for image, table in zip(images, tables):
        pixels = photo_on_device(image, device).long() + channel
        corrected = table[pixels]
        on_host = corrected.cpu().numpy()
        on_host.flags.writeable = False  # shared with its device copy, which the dominant stage reads
        DEVICE_COPIES.put(on_host, corrected, device)
        out.append(on_host)
    return out


# ---- k-means ------------------------------------------------------------------------------------------------------

def palettes(pixel_sets: Sequence[NDArray[np.uint8]], device: str, k: int = 5, max_pixels: int = 4000,
             merge_delta_e: float = 6.0, max_iter: int = 30, seed: int = 0) -> list[cpu_kmeans.Palette | None]:
    """``kmeans.palettes`` on ``device``: the host samples and concatenates the pixel lists, the device does the
    rest (:func:`sample_palettes`)."""
    import torch

    samples = [cpu_kmeans.sample_pixels(p, max_pixels) for p in pixel_sets]
    sizes = torch.tensor([len(s) for s in samples], dtype=torch.long)
    pixels = np.concatenate(samples) if samples else np.zeros((0, 3), np.uint8)
    jobs = torch.repeat_interleave(torch.arange(len(samples)), sizes, output_size=len(pixels)).to(device)
    return sample_palettes(to_device(pixels, device), jobs, len(samples), k=k, merge_delta_e=merge_delta_e,
                           max_iter=max_iter, seed=seed)


def garment_palettes(images: Sequence[NDArray[np.uint8]], people: Sequence[tuple[int, int, int, NDArray[np.uint8]]],
                     parts: Sequence[tuple[NDArray[np.bool_], int]], device: str, max_pixels: int = 4000,
                     **options) -> list[list[cpu_kmeans.Palette | None]]:
    """For each person ``(image index, x0, y0, labels)`` (a label map of their box at (x0, y0) in the image), the
    palette of each part's pixels of that image, or None where the part has fewer pixels than it needs.

    A part is ``(table, min_pixels)``: ``table[label]`` says whether a pixel of that label belongs to it. What the
    dominant stage's host path does person by person (find the part's pixels, sample ``max_pixels`` of them evenly
    in row-major order, read them from the image) is here one pass over all label maps on ``device``. Photos and
    label maps are read from their shared device copies (:func:`photo_on_device`): a label map white balance has
    already sent does not cross again.
    """
    import torch

    n_people, n_parts = len(people), len(parts)
    if not n_people:
        return []
    labels = torch.cat([photo_on_device(p[3], device).reshape(-1) for p in people])  # shared with white balance
    area = torch.tensor([p[3].size for p in people])
    person = torch.repeat_interleave(torch.arange(n_people), area, output_size=int(area.sum())).to(device)
    tables = _table_on(np.stack([table for table, _ in parts]).tobytes(), device).view(n_parts, -1)
    # Every part's pixels of every person, in (part, person, row-major) order: job = part * n_people + person.
    part, at = tables[:, labels.long()].nonzero(as_tuple=True)
    jobs = part * n_people + person[at]
    found = torch.bincount(jobs, minlength=n_parts * n_people)
    needed = torch.tensor([need for _, need in parts], device=device).repeat_interleave(n_people)
    taken = torch.where(found >= needed, found.clamp(max=max_pixels), 0)
    # kmeans.sample_pixels of each job's positions: the (t * found) // taken-th of them, t < taken.
    n_taken = int(taken.sum())
    job = torch.repeat_interleave(torch.arange(len(taken), device=device), taken, output_size=n_taken)
    t = torch.arange(n_taken, device=device) - (torch.cumsum(taken, 0) - taken)[job]
    at = at[(torch.cumsum(found, 0) - found)[job] + t * found[job] // taken[job]]
    # Label-map position -> the photo's pixel, photos concatenated.
    meta = torch.tensor([[p[1], p[2], p[3].shape[1], images[p[0]].shape[1], 0] for p in people], dtype=torch.long)
    photo_of = [p[0] for p in people]
    used = sorted(set(photo_of))
    starts = np.cumsum([0] + [images[i].shape[0] * images[i].shape[1] for i in used])
    meta[:, 4] = torch.from_numpy(starts[np.searchsorted(used, photo_of)])
    x0, y0, width, photo_width, start = meta.to(device)[job % n_people].unbind(1)
    first = torch.cumsum(area, 0).to(device)[job % n_people] - area.to(device)[job % n_people]
    row, col = torch.div(at - first, width, rounding_mode="floor"), (at - first) % width
    pixels = torch.cat([photo_on_device(images[i], device).reshape(-1, 3) for i in used])
    pixels = pixels[start + (y0 + row) * photo_width + x0 + col]
    flat = sample_palettes(pixels, job, n_parts * n_people, **options)
    return [[flat[q * n_people + p] for q in range(n_parts)] for p in range(n_people)]


def sample_palettes(pixels, jobs, n_jobs: int, k: int = 5, merge_delta_e: float = 6.0, max_iter: int = 30,
                    seed: int = 0) -> list[cpu_kmeans.Palette | None]:
    """The palette of each job's pixels (``kmeans.palettes`` after its sampling), None for a job without any:
    (M, 3) uint8 pixels of every job on the device, and each pixel's job (M,) in 0..n_jobs-1. Highlights, colour
    bins, seeding and Lloyd iterations run there for all jobs at once; merging close clusters on the host."""
    import torch

    device = pixels.device
    results: list[cpu_kmeans.Palette | None] = [None] * n_jobs
    # kmeans.drop_highlights, job by job: clipped pixels go unless they are the majority of the job's.
    clipped = pixels.amax(1) >= cpu_kmeans.CLIP_CODE
    total = torch.bincount(jobs, minlength=n_jobs)
    keep = ~clipped | (2 * torch.bincount(jobs[clipped], minlength=n_jobs) >= total)[jobs]
    pixels, jobs = pixels[keep], jobs[keep]
    # kmeans._colour_bins: (job, 8x8x8 code) keys, sorted as the host's dense bincount orders each job's bins.
    q = (pixels >> 3).long()
    keys = jobs * (1 << 15) + ((q[:, 0] << 10) | (q[:, 1] << 5) | q[:, 2])
    keys, inverse, counts = torch.unique(keys, sorted=True, return_inverse=True, return_counts=True)
    sums = torch.zeros((len(keys), 3), dtype=torch.float64, device=device).index_add_(0, inverse, pixels.double())
    lab = rgb_to_lab(sums / counts[:, None]).float()
    bin_job = torch.div(keys, 1 << 15, rounding_mode="floor")
    per_job = torch.bincount(bin_job, minlength=n_jobs)
    rank = torch.arange(len(keys), device=device) - (torch.cumsum(per_job, 0) - per_job)[bin_job]
    per_job_host = per_job.cpu().numpy()
    todo = np.flatnonzero(per_job_host)
    todo = todo[np.argsort(per_job_host[todo], kind="stable")]  # chunks of similar bin counts waste little padding
    draws = torch.from_numpy(cpu_kmeans._seed_draws(k, seed)).to(device)
    for begin in range(0, len(todo), DEVICE_CHUNK):
        chunk = todo[begin:begin + DEVICE_CHUNK]
        row_of = torch.full((n_jobs,), -1, dtype=torch.long)
        row_of[torch.from_numpy(chunk)] = torch.arange(len(chunk))
        rows = row_of.to(device)[bin_job]
        mine = rows >= 0
        x = torch.zeros((len(chunk), int(per_job_host[chunk].max()), 3), dtype=torch.float32, device=device)
        w = torch.zeros(x.shape[:2], dtype=torch.float32, device=device)
        x[rows[mine], rank[mine]] = lab[mine]
        w[rows[mine], rank[mine]] = counts[mine].float()
        centres, weights = _lloyd(x, w, _kmeanspp(x, w, k, draws), max_iter)
        centres, weights = cpu_kmeans._merge_close(centres.cpu().numpy(), weights.cpu().numpy(), merge_delta_e)
        for i, palette in zip(chunk, cpu_kmeans.palettes_of_clusters(centres, weights)):
            results[i] = palette
    return results


def rgb_to_lab(rgb):
    """``space.rgb_to_lab`` of a float64 tensor of 0-255 sRGB (..., 3), on its device."""
    import torch

    v = rgb / 255.0
    linear = torch.where(v <= 0.04045, v / 12.92, ((v.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)
    # The matrix product written out element by element: a matmul's rounding may change with the number of rows,
    # and a person's colours must not depend on how many others share the batch.
    m = space.RGB_TO_XYZ
    r, g, b = linear.unbind(-1)
    xyz = torch.stack([m[i, 0] * r + m[i, 1] * g + m[i, 2] * b for i in range(3)], -1)
    t = xyz / torch.from_numpy(space.D65_WHITE).to(rgb.device)
    f = torch.where(t > space._EPS, t.clamp(min=0) ** (1 / 3), (space._KAPPA * t + 16) / 116)
    return torch.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _sq_dist(x, c):
    """Squared distances (P, N, m) between points (P, N, 3) and per-person points (P, m, 3), computed directly
    (no expansion, no TF32 matrix product: the same float32 rounding on every device)."""
    return ((x[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)


def _kmeanspp(x, w, k: int, draws):
    """``kmeans._kmeanspp`` in torch: the same candidates from the same draws."""
    import torch

    p_count = len(w)
    rows = torch.arange(p_count, device=x.device)
    last = (w > 0).sum(1) - 1
    closest = w.double()
    centres = torch.empty((p_count, k, 3), dtype=torch.float32, device=x.device)
    for c in range(k):
        cum = torch.cumsum(closest, 1)
        targets = draws[c][None, :] * cum[:, -1:]  # (P, trials)
        # The first point whose cumulative weight exceeds the target (numpy: count of cum <= target).
        idx = torch.minimum(torch.searchsorted(cum, targets, right=True), last[:, None])
        candidates = x[rows[:, None], idx]  # (P, trials, 3)
        trial = _sq_dist(x, candidates) * w[..., None]
        if c:
            trial = torch.minimum(closest[:, :, None], trial)
        best = trial.sum(1).argmin(1)
        centres[:, c] = candidates[rows, best]
        closest = trial[rows, :, best]  # float32 from here on, as in numpy
    return centres


def _lloyd(x, w, centres, max_iter: int):
    """``kmeans._lloyd`` in torch: persons leave the working set once their assignment stops changing."""
    import torch

    p_count, _, k = *w.shape, centres.shape[1]
    centres = centres.clone()
    counts = torch.zeros((p_count, k), dtype=torch.float64, device=x.device)
    labels = torch.full(w.shape, -1, dtype=torch.long, device=x.device)
    active = torch.arange(p_count, device=x.device)
    for _ in range(max_iter):
        xa, wa = x[active], w[active]
        new = _sq_dist(xa, centres[active]).argmin(-1)
        changed = (new != labels[active]).any(1)
        active, new, xa, wa = active[changed], new[changed], xa[changed], wa[changed]
        if not len(active):
            break
        labels[active] = new
        counts[active], sums = _cluster_sums(xa, wa, new, k)
        filled = counts[active] > 0
        centres[active] = torch.where(filled[..., None], (sums / counts[active].clamp(min=1e-12)[..., None]).float(),
                                      centres[active])
    else:
        final = _sq_dist(x[active], centres[active]).argmin(-1)
        counts[active], _ = _cluster_sums(x[active], w[active], final, k)
    return centres.double(), counts


def _cluster_sums(x, w, labels, k: int):
    """Per person and cluster: total weight (P, k) and weighted sum of points (P, k, 3), in float64."""
    import torch

    p_count = len(w)
    flat = (labels + (torch.arange(p_count, device=x.device) * k)[:, None]).reshape(-1)
    weights = w.reshape(-1).double()
    counts = torch.zeros(p_count * k, dtype=torch.float64, device=x.device).index_add_(0, flat, weights)
    sums = torch.zeros((p_count * k, 3), dtype=torch.float64, device=x.device)
    sums.index_add_(0, flat, x.reshape(-1, 3).double() * weights[:, None])
    return counts.view(p_count, k), sums.view(p_count, k, 3)
