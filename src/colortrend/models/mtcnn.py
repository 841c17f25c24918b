"""Batched MTCNN face detector: boxes, scores and 5 landmarks for many differently sized photos at once.

The networks and weights are facenet-pytorch 2.5.3's P-, R- and O-Net (the weights ship inside its wheel). Its own
``MTCNN.detect`` loop does per-image, per-scale and per-candidate work in Python and batches only equal-sized images;
this cascade batches across photos instead:

1. Every photo (downscaled to ``max_side`` if larger) is shelf-packed into one canvas. Each pyramid level is the
   whole canvas resized once, and P-Net runs over it in horizontal strips (strips keep the CPU's working set in
   cache; on CUDA a strip is the whole level). A candidate window counts only if it lies inside one photo, whose
   index becomes the candidate's owner, so NMS is ``batched_nms`` keyed by owner.
2. R-Net and O-Net see every candidate of every photo in one call each. Their crops come from ``roi_align`` on
   the pyramid level closest above the crop size, so each output pixel averages at most a few samples (an area
   resize, like facenet's), and crop pixels outside the owner photo are zero (black), as in the original MTCNN.

Geometry is continuous: a box ``(x1, y1, x2, y2)`` covers ``x1 <= x < x2`` with pixel ``i`` spanning ``[i, i + 1)``;
landmarks are in the same frame, which makes them numerically equal to facenet-pytorch's. Thresholds, NMS overlaps
and the regressions follow facenet-pytorch, so results agree with it up to resize interpolation (measured in
scripts/bench_detect.py). One deliberate difference: facenet crops a box that sticks out of the photo to its inside
part and stretches that, so faces at a photo's edge get distorted crops; here they are zero-padded instead.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, roi_align

#: Photos are detected in canvases of at most this many pixels (one photo may exceed it alone): bounds memory
#: (the float canvas takes 12 bytes a pixel) while keeping batches large.
CANVAS_PIXELS = 16_000_000
#: P-Net input pixels per strip on CPU: small enough for its activations (about 60 bytes a pixel) to stay in cache.
CPU_STRIP_PIXELS = 1 << 18
#: Candidate crops per R-Net/O-Net call, bounding their activation memory.
CROP_BATCH = 2048
#: P-Net's window side and stride in pixels of a pyramid level.
PNET_WINDOW, PNET_STRIDE = 12, 2


@dataclass(frozen=True)
class Detections:
    """Faces found in one photo, by score descending, in that photo's pixel coordinates."""

    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (n,) float32 O-Net face probability
    landmarks: np.ndarray  # (n, 5, 2) float32 x, y of left eye, right eye, nose, mouth left, mouth right

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class _Canvas:
    """Photos packed side by side into one image tensor, and where each one sits."""

    pixels: torch.Tensor  # (1, 3, H, W) float, 0..255, zero outside the photos
    rects: torch.Tensor  # (n, 4) x1, y1, x2, y2 of each photo in canvas pixels
    scales: np.ndarray  # (n,) canvas pixels per original photo pixel (< 1 where the photo was downscaled)
    min_sides: np.ndarray  # (n,) shorter side of each photo in canvas pixels


class FaceDetector:
    """MTCNN cascade over lists of RGB uint8 photos of any sizes; see the module docstring for how it batches.

    Args:
        device: "cpu" or "cuda". On CUDA the three networks run in fp16 (their outputs change by less than the
            resize differences that separate this detector from facenet-pytorch's).
        min_face_px: smallest face side searched, in pixels of the photo as detected (after ``max_side``); the
            pyramid starts at scale 12 / min_face_px, so larger values are much faster.
        thresholds: P-, R- and O-Net face probability thresholds (facenet-pytorch's defaults).
        scale_factor: ratio between consecutive pyramid levels.
        max_side: photos whose longer side exceeds this are downscaled to it before detection (results are mapped
            back), so a 30-megapixel photo costs no more than a 1280-pixel one.
    """

    def __init__(
        self,
        device: str = "cpu",
        min_face_px: int = 40,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
        max_side: int = 1280,
    ):
        if min_face_px < PNET_WINDOW:
            raise ValueError(f"min_face_px must be at least {PNET_WINDOW} (P-Net's window), got {min_face_px}")
        if not 0.0 < scale_factor < 1.0:
            raise ValueError(f"scale_factor must be between 0 and 1, got {scale_factor}")
        # facenet_pytorch's package __init__ imports its other models too; only the MTCNN module is needed.
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.min_face_px = min_face_px
        self.thresholds = thresholds
        self.scale_factor = scale_factor
        self.max_side = max_side
        self.pnet, self.rnet, self.onet = (
            net.eval().to(self.device, self.dtype) for net in (PNet(), RNet(), ONet())
        )
        self._strip_pixels = CPU_STRIP_PIXELS if self.device.type == "cpu" else CANVAS_PIXELS

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect faces in each of ``images`` (H x W x 3 uint8 RGB, sizes may differ); one result per image."""
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected H x W x 3 uint8, got {image.shape} {image.dtype}")
        results: list[Detections] = []
        for chunk in _chunks([self._detection_size(im.shape) for im in images], CANVAS_PIXELS):
            results.extend(self._detect_canvas(self._make_canvas([images[i] for i in chunk])))
        return results

    def _detection_size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        h, w = shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))

    def _make_canvas(self, images: list[np.ndarray]) -> _Canvas:
        sizes = [self._detection_size(im.shape) for im in images]
        offsets, height, width = _shelf_pack(sizes)
        canvas = np.zeros((height, width, 3), np.uint8)
        for image, (h, w), (y, x) in zip(images, sizes, offsets):
            if (h, w) != image.shape[:2]:
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            canvas[y : y + h, x : x + w] = image
        hw = np.array(sizes, np.float32)
        rects = np.concatenate([offsets[:, ::-1], offsets[:, ::-1] + hw[:, ::-1]], axis=1)
        # Uploading uint8 and converting on the device moves 4x less data to a GPU.
        pixels = torch.from_numpy(canvas).to(self.device).permute(2, 0, 1)[None].float().contiguous()
        return _Canvas(
            pixels=pixels,
            rects=torch.from_numpy(rects).to(self.device),
            scales=np.array([h / im.shape[0] for (h, _), im in zip(sizes, images)], np.float32),
            min_sides=hw.min(axis=1),
        )

    def _detect_canvas(self, canvas: _Canvas) -> list[Detections]:
        levels = self._pyramid(canvas)
        boxes, owner = self._propose(canvas, levels)
        boxes, owner = self._refine(canvas, levels, boxes, owner)
        boxes, scores, points, owner = self._output(canvas, levels, boxes, owner)
        return self._split(canvas, boxes, scores, points, owner)

    def _pyramid(self, canvas: _Canvas) -> list[tuple[torch.Tensor, float]]:
        """Canvas resized to scales (12 / min_face_px) * scale_factor**k while some photo still holds a window."""
        _, _, height, width = canvas.pixels.shape
        levels = []
        scale = PNET_WINDOW / self.min_face_px
        source = canvas.pixels
        while canvas.min_sides.max() * scale >= PNET_WINDOW:
            size = (max(PNET_WINDOW, round(height * scale)), max(PNET_WINDOW, round(width * scale)))
            # Each level is resized from the one above: the same area filter, at a fraction of the cost.
            source = F.interpolate(source, size=size, mode="area")
            levels.append((source, scale))
            scale *= self.scale_factor
        return levels

    def _propose(self, canvas: _Canvas, levels: list[tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: P-Net windows over the pyramid, merged by NMS, regressed and squared."""
        _, _, height, width = canvas.pixels.shape
        all_boxes, all_owner = [], []
        for level, _ in levels:
            # Actual scales after rounding the level size, so windows map back exactly.
            sy, sx = level.shape[2] / height, level.shape[3] / width
            cells, scores, reg = self._pnet_cells(level)
            ij = cells.to(torch.float32) * PNET_STRIDE
            windows = torch.stack(
                [ij[:, 1] / sx, ij[:, 0] / sy, (ij[:, 1] + PNET_WINDOW) / sx, (ij[:, 0] + PNET_WINDOW) / sy], dim=1
            )
            owner, inside = _owner(windows, canvas.rects)
            windows, scores, reg, owner = windows[inside], scores[inside], reg[inside], owner[inside]
            keep = batched_nms(windows, scores, owner, 0.5)
            all_boxes.append(torch.cat([windows[keep], scores[keep, None], reg[keep]], dim=1))
            all_owner.append(owner[keep])
        if not all_boxes:  # every photo is smaller than min_face_px
            return canvas.pixels.new_zeros((0, 4)), canvas.rects.new_zeros(0, dtype=torch.long)
        found = torch.cat(all_boxes)
        owner = torch.cat(all_owner)
        keep = batched_nms(found[:, :4], found[:, 4], owner, 0.7)
        found, owner = found[keep], owner[keep]
        boxes = _square(_regress(found[:, :4], found[:, 5:9]))
        return boxes, owner

    def _pnet_cells(self, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P-Net over one level in row strips: (row, col) of cells over threshold, their scores and regressions."""
        _, _, height, width = level.shape
        out_rows = (height - PNET_WINDOW) // PNET_STRIDE + 1
        rows_per_strip = max(1, self._strip_pixels // (width * PNET_STRIDE))
        cells, scores, regs = [], [], []
        for r0 in range(0, out_rows, rows_per_strip):
            r1 = min(out_rows, r0 + rows_per_strip)
            # Input rows of output rows r0..r1-1; an even start keeps the 2x2 pooling aligned with the full level.
            strip = level[:, :, PNET_STRIDE * r0 : PNET_STRIDE * (r1 - 1) + PNET_WINDOW]
            strip = ((strip - 127.5) * 0.0078125).to(self.dtype).contiguous(memory_format=torch.channels_last)
            reg, prob = self.pnet(strip)
            prob = prob[0, 1].float()
            hit = (prob >= self.thresholds[0]).nonzero()
            scores.append(prob[hit[:, 0], hit[:, 1]])
            regs.append(reg[0, :, hit[:, 0], hit[:, 1]].float().T)
            hit[:, 0] += r0
            cells.append(hit)
        return torch.cat(cells), torch.cat(scores), torch.cat(regs)

    def _refine(
        self, canvas: _Canvas, levels: list[tuple[torch.Tensor, float]], boxes: torch.Tensor, owner: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: R-Net rescoring and regression of every candidate."""
        reg, prob = self._run(self.rnet, self._crops(canvas, levels, boxes, owner, 24))
        score = prob[:, 1]
        passed = score > self.thresholds[1]
        boxes, score, reg, owner = boxes[passed], score[passed], reg[passed], owner[passed]
        keep = batched_nms(boxes, score, owner, 0.7)
        return _square(_regress(boxes[keep], reg[keep])), owner[keep]

    def _output(
        self, canvas: _Canvas, levels: list[tuple[torch.Tensor, float]], boxes: torch.Tensor, owner: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 3: O-Net scores, final boxes and landmarks, then facenet's "Min" NMS (drops boxes inside boxes)."""
        reg, marks, prob = self._run(self.onet, self._crops(canvas, levels, boxes, owner, 48))
        score = prob[:, 1]
        passed = score > self.thresholds[2]
        boxes, score, reg, marks, owner = boxes[passed], score[passed], reg[passed], marks[passed], owner[passed]
        size = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
        points = boxes[:, None, :2] + size * torch.stack([marks[:, :5], marks[:, 5:]], dim=2)
        boxes = _regress(boxes, reg)
        keep = _nms_min(boxes, score, owner, 0.7)
        return boxes[keep], score[keep], points[keep], owner[keep]

    def _crops(
        self,
        canvas: _Canvas,
        levels: list[tuple[torch.Tensor, float]],
        boxes: torch.Tensor,
        owner: torch.Tensor,
        size: int,
    ) -> torch.Tensor:
        """``size`` x ``size`` network inputs of ``boxes`` (canvas pixels), black outside the owner photo."""
        crops = boxes.new_zeros((len(boxes), 3, size, size))
        # Source: the smallest image on which the box is still at least `size` wide (else the canvas itself), so
        # roi_align's adaptive sampling averages at most ~2x2 samples per output pixel, like an area resize.
        sources = [(canvas.pixels, 1.0)] + levels
        scales = torch.tensor([s for _, s in sources], device=boxes.device)
        side = boxes[:, 2] - boxes[:, 0]
        fits = side[:, None] * scales[None, :] >= size
        choice = (fits.cumsum(dim=1) * fits).argmax(dim=1)  # last level where the box still fits (0 if none)
        for index, (source, _) in enumerate(sources):
            picked = (choice == index).nonzero()[:, 0]
            if len(picked):
                sy, sx = source.shape[2] / canvas.pixels.shape[2], source.shape[3] / canvas.pixels.shape[3]
                rois = boxes[picked] * boxes.new_tensor([sx, sy, sx, sy])
                crops[picked] = roi_align(source, [rois], size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        # Output pixels whose centre falls outside the owner photo (off the canvas or on a neighbour) read black.
        t = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
        xs = boxes[:, 0:1] + t * side[:, None]
        ys = boxes[:, 1:2] + t * (boxes[:, 3] - boxes[:, 1])[:, None]
        rect = canvas.rects[owner]
        in_x = (xs >= rect[:, 0:1]) & (xs < rect[:, 2:3])
        in_y = (ys >= rect[:, 1:2]) & (ys < rect[:, 3:4])
        crops *= (in_y[:, :, None] & in_x[:, None, :])[:, None]
        return (crops - 127.5) * 0.0078125

    def _run(self, net: torch.nn.Module, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run R-Net or O-Net over all crops, CROP_BATCH at a time; outputs as float32."""
        n = len(crops)
        if n == 0:  # the networks flatten with view(n, -1), which an empty batch cannot do: run one dummy crop
            crops = crops.new_zeros((1, *crops.shape[1:]))
        outs = [net(crops[i : i + CROP_BATCH].to(self.dtype)) for i in range(0, len(crops), CROP_BATCH)]
        return tuple(torch.cat(parts)[:n].float() for parts in zip(*outs))

    def _split(
        self, canvas: _Canvas, boxes: torch.Tensor, scores: torch.Tensor, points: torch.Tensor, owner: torch.Tensor
    ) -> list[Detections]:
        """Per-photo results in original photo pixels, by score descending."""
        offsets = canvas.rects[owner, :2]
        scale = torch.from_numpy(canvas.scales).to(boxes.device)[owner]
        boxes = ((boxes - offsets.repeat(1, 2)) / scale[:, None]).cpu().numpy()
        points = ((points - offsets[:, None, :]) / scale[:, None, None]).cpu().numpy()
        scores_np, owner_np = scores.cpu().numpy(), owner.cpu().numpy()
        order = np.lexsort((-scores_np, owner_np))
        bounds = np.cumsum(np.bincount(owner_np, minlength=len(canvas.scales)))[:-1]
        return [
            Detections(boxes=b.astype(np.float32), scores=s.astype(np.float32), landmarks=p.astype(np.float32))
            for b, s, p in zip(
                np.split(boxes[order], bounds), np.split(scores_np[order], bounds), np.split(points[order], bounds)
            )
        ]


def _chunks(sizes: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Consecutive groups of indices whose total pixels stay within ``budget`` (a group holds at least one)."""
    groups: list[list[int]] = []
    total = 0
    for i, (h, w) in enumerate(sizes):
        if not groups or total + h * w > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += h * w
    return groups


def _shelf_pack(sizes: list[tuple[int, int]]) -> tuple[np.ndarray, int, int]:
    """Pack (h, w) rectangles tallest first into rows of a near-square canvas: (n, 2) offsets (y, x), height, width."""
    limit = max(max(w for _, w in sizes), math.isqrt(sum(h * w for h, w in sizes)))
    offsets = np.zeros((len(sizes), 2), np.int64)
    x = y = row_height = width = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i][0]):
        h, w = sizes[i]
        if x + w > limit:
            x, y, row_height = 0, y + row_height, 0
        offsets[i] = (y, x)
        x += w
        row_height = max(row_height, h)
        width = max(width, x)
    return offsets, y + row_height, width


def _owner(windows: torch.Tensor, rects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the photo rectangle wholly containing each window, and whether there is one."""
    inside = (
        (windows[:, None, 0] >= rects[None, :, 0])
        & (windows[:, None, 1] >= rects[None, :, 1])
        & (windows[:, None, 2] <= rects[None, :, 2])
        & (windows[:, None, 3] <= rects[None, :, 3])
    )
    return inside.to(torch.uint8).argmax(dim=1), inside.any(dim=1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply MTCNN's box regression: offsets as fractions of the box's width and height."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + reg * size


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Squares with the boxes' centres and longer sides (the networks' crops are square)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], dim=1)


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, owner: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS within each owner where overlap is intersection over the *smaller* box's area; kept indices."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    corner_lo = torch.maximum(b[:, None, :2], b[None, :, :2])
    corner_hi = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (corner_hi - corner_lo).clamp(min=0).prod(dim=2)
    overlap = inter / torch.minimum(area[:, None], area[None, :])
    same = owner[order][:, None] == owner[order][None, :]
    suppresses = ((overlap > threshold) & same).cpu().numpy()
    # Candidates after O-Net are few (a handful per photo), so the greedy pass is a short loop.
    removed = np.zeros(len(b), bool)
    keep = []
    for i in range(len(b)):
        if not removed[i]:
            keep.append(i)
            removed |= suppresses[i]
    return order[torch.as_tensor(keep, device=boxes.device)]
