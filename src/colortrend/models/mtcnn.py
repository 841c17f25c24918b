"""Batched MTCNN face detector: boxes, scores and 5 landmarks for many differently sized photos at once.

The networks and weights are facenet-pytorch 2.5.3's P-, R- and O-Net (the weights ship inside its wheel; the
classes are redefined in :mod:`colortrend.models.mtcnn_nets` so its package need not be imported). Its own
``MTCNN.detect`` loop does per-image, per-scale and per-candidate work in Python and batches only equal-sized images;
this cascade batches across photos instead:

1. Every photo (downscaled to ``max_side`` if larger) gets its own image pyramid, each copy resized from the one
   before: halvings down to the pyramid's top (crop sources for faces too small for any level), then the levels
   P-Net scans. Each pyramid step packs the photos' copies side by side at even offsets into one canvas, and all
   canvases share one flat uint8 buffer on the device. Each copy depends only on its own photo, and even offsets
   keep P-Net's stride-2 grid on every photo's grid. On a CPU OpenCV makes the copies; on a GPU torch makes them
   there with OpenCV's weights, so the host only uploads each photo (``use_device_paths``).
2. P-Net scans each level canvas in row strips (on a CPU a strip's activations stay in cache; on CUDA a strip is
   the whole canvas). A window counts only if it lies inside one photo, whose index becomes the candidate's
   owner. Every NMS is exact within each owner: P-Net's on the canvas's integer coordinates, the others one owner
   at a time (``_nms_per_photo``), with ties in candidate order, which is each photo's own.
3. R-Net and O-Net see every candidate of every photo together. Their crops are gathered from the buffer in one
   indexing operation: 2x2 samples per output pixel from the owner's smallest copy on which the box still spans
   the crop size, which averages like facenet's area resize. Samples outside the photo read black, as in the
   original MTCNN.

So a photo's results do not depend on which other photos share its batch, nor where in it: the pipeline's resumed
runs must equal clean ones. What remains is the networks' float rounding, which varies with the shapes of a call
(measured on the 37 demo photos, one by one against batches of 3, 4, 7 and 37: equal to 3e-5 pixels).

Nothing at full resolution is ever converted to float, which on a CPU would cost as much as P-Net itself, and the
networks read raw 0..255 pixels (MTCNN's input scaling is folded into their first convolution).

Geometry is continuous: a box ``(x1, y1, x2, y2)`` covers ``x1 <= x < x2`` with pixel ``i`` spanning ``[i, i + 1)``;
landmarks are in the same frame, which makes them numerically equal to facenet-pytorch's (its boxes' x1 and y1 are
1-based, one more than here). Thresholds, NMS and the regressions follow facenet-pytorch, so results agree with it up
to resize interpolation (measured by scripts/bench_detect.py). One deliberate difference: facenet cuts a box that
sticks out of the photo down to its inside part and stretches that, distorting faces at the photo's edge; here the
outside is black instead.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from colortrend.models.mtcnn_nets import nms, pretrained

#: Photos are detected in groups of at most this many pixels (a larger photo alone is fine): bounds memory while
#: keeping batches large.
GROUP_PIXELS = 16_000_000
#: Work per network call by device type: (P-Net input pixels per strip, R-/O-Net crop pixels per call). On a CPU
#: small pieces keep the activations in cache, which measured 2-3x faster than one large batch; a GPU wants big ones.
WORK_PIXELS = {"cpu": (1 << 17, 1 << 16), "cuda": (GROUP_PIXELS, 1 << 21)}
#: Samples per crop pixel along each axis; crop sources are picked so that samples are at most 1 pixel apart.
CROP_SUBSAMPLES = 2
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
class _Pyramid:
    """The resized copies of a group of photos: copy l of every photo is packed into canvas l of a flat buffer."""

    pixels: torch.Tensor  # (N,) int32, the 4 bytes R, G, B, unused of one pixel (one 4-byte gather per sample is
    # several times faster than three 1-byte ones); all canvases one after another, each row-major
    starts: torch.Tensor  # (L,) int64 first pixel of each canvas in `pixels`
    canvas_shapes: list[tuple[int, int]]  # (height, width) of each canvas
    canvas_widths: torch.Tensor  # (L,) int64, the same widths on the device
    offsets: torch.Tensor  # (P, L, 2) int64 y, x of each photo's copy in each canvas
    sizes: torch.Tensor  # (P, L, 2) int64 height, width of each copy; 0 where a photo is too small for a level
    scales: torch.Tensor  # (P, L, 2) float32 copy pixels per photo pixel along y and x (after size rounding)
    n_octaves: int  # copies 0 .. n_octaves - 1 are the photo and its halvings (crop sources only); P-Net scans the rest
    photo_shapes: torch.Tensor  # (P, 2) float32 height, width of each photo as detected
    photo_scales: np.ndarray  # (P,) detected pixels per original pixel (< 1 where max_side downscaled the photo)


class FaceDetector:
    """MTCNN cascade over lists of RGB uint8 photos of any sizes; see the module docstring for how it batches.

    Args:
        device: "cpu" or "cuda". On CUDA the three networks run in fp16: on 20 CCP photos (fp16 emulated on CPU)
            the same faces, scores within 0.001, landmarks moved 0.2 px (median of the mean over the 5 points),
            less than the 0.8 px the cascade's answer moves when a photo is shifted by one pixel.
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
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.min_face_px = min_face_px
        self.thresholds = thresholds
        self.scale_factor = scale_factor
        self.max_side = max_side
        self.pnet, self.rnet, self.onet = (
            _take_raw_pixels(net).eval().to(self.device, self.dtype, memory_format=torch.channels_last)
            for net in pretrained()
        )
        self.use_device_paths(self.device.type != "cpu")

    def use_device_paths(self, on: bool) -> None:
        """Work as on a GPU (the pyramid resampled by torch on the device, so the host only uploads each photo,
        and the GPU's large network calls) or as on a CPU (OpenCV's pyramid, calls sized for its caches). The
        detect stage sets it from its ``ops_device``: the tests and the GPU budget run the GPU's way on a CPU."""
        self.pyramid_on_device = on
        self._strip_pixels, self._crop_pixels = WORK_PIXELS["cuda" if on else "cpu"]

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect faces in each of ``images`` (H x W x 3 uint8 RGB, sizes may differ); one result per image."""
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or image.size == 0:
                raise ValueError(f"image {i}: expected H x W x 3 uint8, got {image.shape} {image.dtype}")
        shapes = [self._detection_shape(image.shape) for image in images]
        results: list[Detections] = []
        for group in _groups(shapes, GROUP_PIXELS):
            pyramid = self._pyramid([images[i] for i in group], [shapes[i] for i in group])
            boxes, owner = self._propose(pyramid)
            boxes, owner = self._refine(pyramid, boxes, owner)
            boxes, scores, points, owner = self._output(pyramid, boxes, owner)
            results.extend(_split(pyramid, boxes, scores, points, owner))
        return results

    def _detection_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        height, width = shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        return max(1, round(height * scale)), max(1, round(width * scale))

    def _pyramid(self, images: list[np.ndarray], shapes: list[tuple[int, int]]) -> _Pyramid:
        """Copies of every photo at the octave and pyramid scales, packed per scale into one buffer."""
        top = PNET_WINDOW / self.min_face_px
        scales = [1.0]
        while scales[-1] / 2 > top:
            scales.append(scales[-1] / 2)
        n_octaves = len(scales)
        shortest = np.array([min(shape) for shape in shapes])
        level = top
        while shortest.max() * level >= PNET_WINDOW:  # facenet's stopping rule, per photo in `exists`
            scales.append(level)
            level *= self.scale_factor
        hw = np.array(shapes)
        sizes = np.maximum(1, np.rint(hw[:, None, :] * np.array(scales)[None, :, None])).astype(np.int64)
        exists = np.ones(sizes.shape[:2], bool)
        exists[:, n_octaves:] = shortest[:, None] * np.array(scales[n_octaves:])[None, :] >= PNET_WINDOW
        sizes[~exists] = 0

        offsets = np.zeros_like(sizes)
        canvas_shapes = []
        for k in range(len(scales)):
            # Even sizes give even offsets: P-Net's stride-2 grid then falls on each photo's own grid.
            offsets[:, k], height, width = _shelf_pack(sizes[:, k] + sizes[:, k] % 2)
            canvas_shapes.append((height, width))
        starts = np.cumsum([0] + [h * w for h, w in canvas_shapes])
        fill = self._fill_on_device if self.pyramid_on_device else self._fill_on_host
        buffer = fill(images, sizes, offsets, exists, n_octaves, starts, canvas_shapes)
        return _Pyramid(
            pixels=buffer.view(torch.int32)[:, 0].to(self.device),
            starts=torch.from_numpy(starts[:-1]).to(self.device),
            canvas_shapes=canvas_shapes,
            canvas_widths=torch.tensor([w for _, w in canvas_shapes], device=self.device),
            offsets=torch.from_numpy(offsets).to(self.device),
            sizes=torch.from_numpy(sizes).to(self.device),
            scales=torch.from_numpy((sizes / hw[:, None, :]).astype(np.float32)).to(self.device),
            n_octaves=n_octaves,
            photo_shapes=torch.from_numpy(hw.astype(np.float32)).to(self.device),
            photo_scales=np.array([h / image.shape[0] for (h, _), image in zip(shapes, images)], np.float32),
        )

    @staticmethod
    def _fill_on_host(images, sizes, offsets, exists, n_octaves, starts, canvas_shapes) -> torch.Tensor:
        """The canvases' buffer made with OpenCV on the host (the faster way on a CPU), as an (N, 4) uint8 tensor."""
        buffer = np.zeros((starts[-1], 4), np.uint8)
        canvases = [buffer[a:b].reshape(h, w, 4) for a, b, (h, w) in zip(starts[:-1], starts[1:], canvas_shapes)]
        for p, image in enumerate(images):
            (h, w), (y, x) = sizes[p, 0], offsets[p, 0]
            if (h, w) != image.shape[:2]:
                image = cv2.resize(image, (int(w), int(h)), interpolation=cv2.INTER_AREA)
            canvases[0][y : y + h, x : x + w] = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA)
            for k in range(1, len(canvas_shapes)):
                if not exists[p, k]:
                    break
                (h, w), (y, x), (py, px), (ph, pw) = sizes[p, k], offsets[p, k], offsets[p, k - 1], sizes[p, k - 1]
                # Each copy from the one before. Halvings average 2x2 blocks; pyramid levels are bilinear: OpenCV's
                # area resize is 10x slower at these ratios, and a cascade of bilinear steps smooths like a Gaussian
                # pyramid (agreement with facenet's area-resized pyramid measured no worse).
                interpolation = cv2.INTER_AREA if k < n_octaves else cv2.INTER_LINEAR
                canvases[k][y : y + h, x : x + w] = cv2.resize(
                    canvases[k - 1][py : py + ph, px : px + pw], (int(w), int(h)), interpolation=interpolation
                )
        return torch.from_numpy(buffer)

    def _fill_on_device(self, images, sizes, offsets, exists, n_octaves, starts, canvas_shapes) -> torch.Tensor:
        """The same copies made by torch on the detector's device: each photo crosses to it once, as uint8, and
        photos of one size are resized together (a few calls a level for all of them).

        OpenCV's own resampling weights (area for the photo and its halvings, bilinear for the levels), each copy
        rounded to whole codes before the next is made from it: codes differ by OpenCV's fixed-point rounding only
        (at most 1), which can still tip a borderline candidate (tests/test_detect.py compares the faces)."""
        from colortrend.color.torch_ops import opencv_resize, photo_on_device

        buffer = torch.zeros((int(starts[-1]), 4), dtype=torch.uint8, device=self.device)
        bounds = zip(starts[:-1], starts[1:], canvas_shapes)
        canvases = [buffer[int(a) : int(b)].view(h, w, 4) for a, b, (h, w) in bounds]
        same_size: dict[tuple[int, ...], list[int]] = {}
        for p, image in enumerate(images):
            same_size.setdefault(image.shape, []).append(p)
        for group in same_size.values():  # sizes and levels depend only on the photo's size: alike in a group
            copies = torch.stack([photo_on_device(images[p], self.device) for p in group]).float()  # (n, h, w, 3)
            first = group[0]
            for k in range(len(canvas_shapes)):
                if not exists[first, k]:
                    break
                h, w = (int(v) for v in sizes[first, k])
                if (h, w) != tuple(copies.shape[1:3]):
                    copies = opencv_resize(copies, (w, h), "area" if k < n_octaves else "linear").round_()
                codes = copies.to(torch.uint8)
                for row, p in enumerate(group):
                    y, x = (int(v) for v in offsets[p, k])
                    canvases[k][y : y + h, x : x + w, :3] = codes[row]
        return buffer

    def _propose(self, pyramid: _Pyramid) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: P-Net windows over the pyramid, merged by NMS per level and across levels, regressed, squared."""
        found = [pyramid.photo_shapes.new_zeros((0, 9))]
        owners = [pyramid.offsets.new_zeros(0)]
        for k in range(pyramid.n_octaves, len(pyramid.canvas_shapes)):
            cells, scores, reg = self._pnet_cells(_canvas(pyramid, k))
            corner = cells * PNET_STRIDE  # window's top-left (y, x) in the canvas
            offset, size = pyramid.offsets[:, k], pyramid.sizes[:, k]
            inside = ((corner[:, None] >= offset[None]) & (corner[:, None] + PNET_WINDOW <= offset + size)).all(dim=2)
            owner = inside.to(torch.uint8).argmax(dim=1)
            keep = inside.any(dim=1)
            corner, scores, reg, owner = corner[keep], scores[keep], reg[keep], owner[keep]
            # NMS on the canvas: photos' copies are disjoint there, so one plain NMS stays within each photo, and
            # integer coordinates make every IoU exact. That matters: two windows 4 pixels apart overlap by exactly
            # the threshold, 1/2, and in photo pixels rounding would settle such ties differently per batch layout.
            keep = nms(torch.cat([corner.flip(1), corner.flip(1) + PNET_WINDOW], dim=1).float(), scores, 0.5)
            corner, scores, reg, owner = corner[keep], scores[keep], reg[keep], owner[keep]
            # Photo pixels: undo the offset, then the copy's scale.
            yx = (corner - offset[owner]).to(torch.float32)
            scale = pyramid.scales[owner, k]
            windows = torch.cat([yx.flip(1), (yx + PNET_WINDOW).flip(1)], dim=1) / scale.flip(1).repeat(1, 2)
            found.append(torch.cat([windows, scores[:, None], reg], dim=1))
            owners.append(owner)
        found, owner = torch.cat(found), torch.cat(owners)
        keep = _nms_per_photo(found[:, :4], found[:, 4], owner, 0.7)
        return _square(_regress(found[keep, :4], found[keep, 5:])), owner[keep]

    def _pnet_cells(self, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P-Net over an (h, w, 4) canvas in row strips: (row, col) of cells over threshold, scores, regressions."""
        height, width, _ = canvas.shape
        out_rows = (height - PNET_WINDOW) // PNET_STRIDE + 1
        rows_per_strip = max(1, self._strip_pixels // (width * PNET_STRIDE))
        cells, scores, regs = [], [], []
        for r0 in range(0, out_rows, rows_per_strip):
            r1 = min(out_rows, r0 + rows_per_strip)
            # The input rows of output rows r0..r1-1; starting on an even row keeps the 2x2 pooling aligned.
            strip = canvas[PNET_STRIDE * r0 : PNET_STRIDE * (r1 - 1) + PNET_WINDOW]
            strip = strip[..., :3].permute(2, 0, 1)[None].to(self.dtype)
            reg, prob = self.pnet(strip.contiguous(memory_format=torch.channels_last))
            prob = prob[0, 1].float()
            hit = (prob >= self.thresholds[0]).nonzero()
            scores.append(prob[hit[:, 0], hit[:, 1]])
            regs.append(reg[0, :, hit[:, 0], hit[:, 1]].float().T)
            cells.append(hit + hit.new_tensor([r0, 0]))
        return torch.cat(cells), torch.cat(scores), torch.cat(regs)

    def _refine(self, pyramid: _Pyramid, boxes: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: R-Net rescoring and regression of every candidate."""
        reg, prob = self._run(self.rnet, pyramid, boxes, owner, 24)
        score = prob[:, 1]
        passed = score > self.thresholds[1]
        boxes, score, reg, owner = boxes[passed], score[passed], reg[passed], owner[passed]
        keep = _nms_per_photo(boxes, score, owner, 0.7)
        return _square(_regress(boxes[keep], reg[keep])), owner[keep]

    def _output(
        self, pyramid: _Pyramid, boxes: torch.Tensor, owner: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 3: O-Net scores, final boxes and landmarks, then facenet's "Min" NMS (drops boxes inside boxes)."""
        reg, marks, prob = self._run(self.onet, pyramid, boxes, owner, 48)
        score = prob[:, 1]
        passed = score > self.thresholds[2]
        boxes, score, reg, marks, owner = boxes[passed], score[passed], reg[passed], marks[passed], owner[passed]
        size = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
        points = boxes[:, None, :2] + size * torch.stack([marks[:, :5], marks[:, 5:]], dim=2)
        boxes = _regress(boxes, reg)
        keep = _nms_min(boxes, score, owner, 0.7)
        return boxes[keep], score[keep], points[keep], owner[keep]

    def _run(
        self, net: torch.nn.Module, pyramid: _Pyramid, boxes: torch.Tensor, owner: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, ...]:
        """R-Net or O-Net over ``size`` x ``size`` crops of all boxes, in calls of bounded size; float32 outputs."""
        n = len(boxes)
        if n == 0:  # the networks flatten with view(n, -1), which an empty batch cannot do: run one dummy box
            boxes, owner = boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]]), owner.new_zeros(1)
        step = max(1, self._crop_pixels // size**2)
        outs = [
            net(self._crops(pyramid, boxes[i : i + step], owner[i : i + step], size).to(self.dtype))
            for i in range(0, len(boxes), step)
        ]
        return tuple(torch.cat(parts)[:n].float() for parts in zip(*outs))

    def _crops(self, pyramid: _Pyramid, boxes: torch.Tensor, owner: torch.Tensor, size: int) -> torch.Tensor:
        """``size`` x ``size`` crops (float, 0..255, channels-last) of square ``boxes`` in photo pixels."""
        # Source: the owner's smallest copy on which the box spans at least `size` pixels (the photo when none does).
        side = boxes[:, 2] - boxes[:, 0]
        fits = (side[:, None] * pyramid.scales[owner, :, 1] >= size) & (pyramid.sizes[owner, :, 0] > 0)
        level = (fits * torch.arange(fits.shape[1], device=boxes.device)).argmax(dim=1)
        scale, offset = pyramid.scales[owner, level], pyramid.offsets[owner, level]
        copy_size, canvas_width = pyramid.sizes[owner, level], pyramid.canvas_widths[level]

        n = size * CROP_SUBSAMPLES
        t = (torch.arange(n, device=boxes.device, dtype=boxes.dtype) + 0.5) / n
        xs = boxes[:, 0:1] + t * side[:, None]  # (crops, n) sample positions in photo pixels
        ys = boxes[:, 1:2] + t * (boxes[:, 3] - boxes[:, 1])[:, None]
        photo = pyramid.photo_shapes[owner]
        inside = ((ys >= 0) & (ys < photo[:, 0:1]))[:, :, None] & ((xs >= 0) & (xs < photo[:, 1:2]))[:, None, :]
        # Clamping only keeps indices in bounds: the samples it moves lie outside the photo and are zeroed below.
        px = torch.minimum((xs * scale[:, 1:2]).long().clamp(min=0), copy_size[:, 1:2] - 1) + offset[:, 1:2]
        py = torch.minimum((ys * scale[:, 0:1]).long().clamp(min=0), copy_size[:, 0:1] - 1) + offset[:, 0:1]
        index = pyramid.starts[level][:, None, None] + py[:, :, None] * canvas_width[:, None, None] + px[:, None, :]
        samples = pyramid.pixels.index_select(0, index.view(-1)).view(torch.uint8).view(*index.shape, 4)
        samples = samples[..., :3] * inside[..., None]  # (crops, n, n, 3)
        return F.avg_pool2d(samples.permute(0, 3, 1, 2).float(), CROP_SUBSAMPLES)


def _canvas(pyramid: _Pyramid, k: int) -> torch.Tensor:
    """Canvas ``k`` as an (h, w, 4) uint8 view."""
    start, (height, width) = int(pyramid.starts[k]), pyramid.canvas_shapes[k]
    return pyramid.pixels[start : start + height * width].view(torch.uint8).view(height, width, 4)


def _split(
    pyramid: _Pyramid, boxes: torch.Tensor, scores: torch.Tensor, points: torch.Tensor, owner: torch.Tensor
) -> list[Detections]:
    """Per-photo results in original photo pixels, by score descending."""
    scale = torch.from_numpy(pyramid.photo_scales).to(boxes.device)[owner]
    boxes_np = (boxes / scale[:, None]).cpu().numpy()
    points_np = (points / scale[:, None, None]).cpu().numpy()
    scores_np, owner_np = scores.cpu().numpy(), owner.cpu().numpy()
    order = np.lexsort((-scores_np, owner_np))
    bounds = np.cumsum(np.bincount(owner_np, minlength=len(pyramid.photo_scales)))[:-1]
    return [
        Detections(boxes=b, scores=s, landmarks=p)
        for b, s, p in zip(
            np.split(boxes_np[order], bounds), np.split(scores_np[order], bounds), np.split(points_np[order], bounds)
        )
    ]


def _take_raw_pixels(net: torch.nn.Module) -> torch.nn.Module:
    """Fold MTCNN's input scaling, (x - 127.5) / 128, into the first convolution, so the net reads 0..255 pixels.

    conv(s * x + c) = (s * W) conv x + (b + c * sum(W)) exactly (the convolutions are unpadded); it saves two passes
    over every input pixel.
    """
    with torch.no_grad():
        net.conv1.bias += -127.5 * 0.0078125 * net.conv1.weight.sum(dim=(1, 2, 3))
        net.conv1.weight *= 0.0078125
    return net


def _groups(shapes: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Consecutive groups of indices whose total pixels stay within ``budget`` (a group holds at least one)."""
    groups: list[list[int]] = []
    total = 0
    for i, (h, w) in enumerate(shapes):
        if not groups or total + h * w > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += h * w
    return groups


def _shelf_pack(sizes: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Pack (h, w) rectangles tallest first into rows of a near-square canvas: (n, 2) offsets (y, x), height, width.

    Empty (0-sized) rectangles get offset (0, 0) and take no room.
    """
    limit = max(int(sizes[:, 1].max()), math.isqrt(int((sizes[:, 0] * sizes[:, 1]).sum())))
    offsets = np.zeros_like(sizes)
    x = y = row_height = width = 0
    for i in np.argsort(-sizes[:, 0], kind="stable"):
        h, w = (int(v) for v in sizes[i])
        if h == 0:
            break
        if x + w > limit:
            x, y, row_height = 0, y + row_height, 0
        offsets[i] = (y, x)
        x += w
        row_height = max(row_height, h)
        width = max(width, x)
    return offsets, max(y + row_height, 1), max(width, 1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """MTCNN's box regression: offsets of each side as fractions of the box's width or height."""
    return boxes + reg * (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Squares with the boxes' centres and longer sides (the networks' crops are square)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], dim=1)


def _nms_per_photo(boxes: torch.Tensor, scores: torch.Tensor, owner: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices kept by NMS run on each owner's boxes alone, ascending (so each photo's candidates keep their order).

    Not torchvision's ``batched_nms``: it shifts each owner's boxes by a multiple of the largest coordinate, which
    rounds them differently per owner index and so makes near-threshold overlaps depend on a photo's batch.
    """
    keep = torch.zeros_like(owner, dtype=torch.bool)
    for indices in owner.argsort(stable=True).split(torch.bincount(owner).tolist()):
        keep[indices[nms(boxes[indices], scores[indices], threshold)]] = True
    return keep.nonzero()[:, 0]


def _nms_min(boxes: torch.Tensor, scores: torch.Tensor, owner: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS within each owner, overlap measured over the *smaller* box's area; indices kept."""
    order = scores.argsort(descending=True, stable=True)  # ties (saturated scores) by candidate order
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter = (torch.minimum(b[:, None, 2:], b[None, :, 2:]) - torch.maximum(b[:, None, :2], b[None, :, :2])).clamp(min=0)
    overlap = inter.prod(dim=2) / torch.minimum(area[:, None], area[None, :])
    same_photo = owner[order][:, None] == owner[order][None, :]
    suppresses = ((overlap > threshold) & same_photo).cpu().numpy()
    # Few candidates survive O-Net (a handful per photo), so a plain greedy pass is cheap.
    removed = np.zeros(len(b), bool)
    keep = []
    for i in range(len(b)):
        if not removed[i]:
            keep.append(i)
            removed |= suppresses[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]
