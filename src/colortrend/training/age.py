"""``colortrend train age``: train an age network on labelled face folders, through the pipeline's own alignment.

Each training photo goes through the same steps as in a run: decoded like intake decodes it, the most confident
face found by the pipeline's MTCNN (detections are cached under ``/tmp/colortrend-cache``, keyed by the labels file
and the detector's code), and the chip cut by :func:`colortrend.stages.align.cut_chips`. Augmentation perturbs the
*landmarks* (small rotation, scale and shift) before the cut, so augmented chips are chips the aligner could have
produced; then a horizontal flip, colour jitter and an occasional loss of resolution (faces in crowd photos are
small).

Chip size: dlib's network read 64-px chips, but it is fully convolutional, and fine-tuned on 96-px chips (the same
template, scaled) it sees more detail and scores better (validation MAE 5.36 / 5.18 against 5.53 / 5.24 at 64 px,
All-Age-Faces / UTKFace); the size is stored with the weights so the age stage cuts chips to match. So is the
chip scale (the framing: below 1 the chip shows more hair, ears and neck, above 1 the inner face closer up).
Networks trained on different sizes and framings err differently, and the shipped default averages four of them.

Validation: the photos :func:`colortrend.labelled.validation_mask` holds out (15 % of each folder, by a hash of
the path) are never trained on; the epoch with the lowest mean of the per-folder validation MAEs is kept.

Architectures (``arch``): ``aresnet10`` fine-tunes dlib's age network; ``lite0`` trains EfficientNet-Lite0 from its
ImageNet weights (the ``train`` extra). Overfitting is the limit here (a full fine-tune of dlib's network reached
3.0 years on its training photos and 5.7 on held-out ones), so the stem and first blocks keep their initial weights
(and frozen batch norms their statistics), weight decay is strong, and the weights validated and saved are an
exponential moving average of the trained ones. ImageNet features are further from age than dlib's, so ``lite0``
trains with a higher learning rate and a shorter average (:data:`ARCHITECTURE_DEFAULTS`).

Head and loss: dlib's head grows from 81 classes (ages 0..80) to ``max_age + 1``; new classes start as copies of the
80-year class, damped so the initial predictions barely move (``lite0``'s head is new, ``max_age + 1`` classes).
A face labelled with an exact age is scored by cross-entropy against a Gaussian label distribution (width growing
with age, as labels of older faces are less precise) plus the L1 error of the expected age. A face labelled with an
age *band* (FairFace: 10-19, 20-29, ...) says only that the true age lies inside it: its loss is the negative log
of the probability the network gives the band (an interval-censored likelihood), plus the L1 distance of the
expected age from the band (0 inside). Neither ever pretends a band's midpoint is the age.

Sampling: each face is drawn with weight (faces sharing its label key) ** -``balance_power``, the key being the
5-year bin of an exact age or the band itself, times ``young_weight`` for faces aged 10-29 (the cohorts a photo
collection of one year splits most finely), so rare ages and the young are seen as often as they matter.
Validation scores each network by its expected age (for band labels: its distance from the band, 0 inside); the
age stage reports the median of the networks' mixture, which scores a little better still.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler

from colortrend.labelled import LABELLED_MIN_FACE_PX, analyse_labelled, load_rgb, read_age_labels, validation_mask
from colortrend.models import file_checksum
from colortrend.models.age_net import AgeModel, AgeNet, Lite0AgeNet, architecture_of, build_age_net, save_age_net
from colortrend.models.efficientnet_lite import imagenet_state
from colortrend.stages.age import DLIB_WEIGHTS, AgeSettings, age_distributions
from colortrend.stages.align import cut_chips

CACHE_DIR = Path(os.environ.get("COLORTREND_CACHE", "/tmp/colortrend-cache"))
#: ``init_weights`` of a lite0 network: EfficientNet-Lite0's ImageNet weights (the ``train`` extra).
IMAGENET = "imagenet"


#: Per architecture, what fine-tuning starts from and the settings that differ: dlib's age network is already an
#: age model, so it moves gently; EfficientNet-Lite0 starts from ImageNet features and must move further.
ARCHITECTURE_DEFAULTS = {
    "aresnet10": {"init_weights": str(DLIB_WEIGHTS), "lr": 2e-4, "frozen_blocks": 1, "ema_decay": 0.999},
    "lite0": {"init_weights": IMAGENET, "lr": 1e-3, "frozen_blocks": 3, "ema_decay": 0.998},
}


@dataclass(frozen=True)
class AgeTrainConfig:
    """Hyper-parameters of :func:`train_age` (saved with the metrics). ``None`` takes the architecture's default
    (:data:`ARCHITECTURE_DEFAULTS`)."""

    arch: str = "aresnet10"  # network: "aresnet10" (dlib's, fine-tuned) or "lite0" (EfficientNet-Lite0 from ImageNet)
    epochs: int = 28
    seed: int = 0
    chip_size: int = 96  # side of the chips trained on (stored with the weights; the age stage cuts this side)
    chip_scale: float = 1.0  # face scale in the chip (stored too): 1.0 = the aligner's template, < 1 shows more head
    batch_size: int = 64
    lr: float | None = None  # AdamW peak learning rate (linear warm-up, cosine decay)
    weight_decay: float = 0.05
    warmup_steps: int = 200
    frozen_blocks: int | None = None  # the stem and this many blocks keep their initial weights (less overfitting)
    ema_decay: float | None = None  # validation and the saved weights use this exponential moving average
    max_age: int = 100  # the head covers ages 0..max_age; older labels are clipped
    l1_weight: float = 0.5  # weight of |expected age - age| next to the label-distribution cross-entropy
    balance_power: float = 0.5  # sampling weight = (photos with the same label key) ** -balance_power
    young_weight: float = 1.5  # and this much more for faces aged 10-29 (see the module docstring)
    samples_per_epoch: int | None = None  # faces drawn per epoch (default: as many as there are training faces)
    max_rotation_deg: float = 8.0  # landmark jitter: rotation, relative scale, shift (fraction of the eye distance)
    max_scale: float = 0.06
    max_shift: float = 0.06
    low_res_prob: float = 0.2  # chance a chip is shrunk to 24-48 px and back
    init_weights: str | None = None  # an age weights file of the same architecture, or "imagenet" for lite0
    threads: int = 1  # torch threads in the training process
    workers: int = 1  # processes decoding photos and cutting chips
    min_face_px: float = LABELLED_MIN_FACE_PX

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURE_DEFAULTS:
            raise ValueError(f"arch: one of {', '.join(ARCHITECTURE_DEFAULTS)}, not {self.arch!r}")
        for key, value in ARCHITECTURE_DEFAULTS[self.arch].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)


# ---------------------------------------------------------------------------------------------------------------
# Data


def detect_landmarks(labels: pd.DataFrame, device: str, min_face_px: float, log: Callable[[str], None] = print):
    """Landmarks (n, 5, 2) of the most confident face of each photo in ``labels`` (NaN where none), cached.

    The photos go through the run's chain up to ``detect`` with a run's settings, faces searched down to
    ``min_face_px``. The cache key covers the photo list and the chain's settings and the detect stage's and
    detector's source files: editing either invalidates it.
    """
    from colortrend.config import default_config
    from colortrend.models import mtcnn
    from colortrend.pipeline import build_stages

    cfg = default_config(".", device=device, detect={"min_face_px": int(min_face_px)})
    stages = build_stages(cfg, device, upto="detect")
    sources = (inspect.getsourcefile(type(stages[-1])), inspect.getsourcefile(mtcnn))
    key = hashlib.sha1()
    settings = repr([(stage.name, stage.fingerprint_settings()) for stage in stages])
    for part in (*map(file_checksum, sources), settings, *labels["file"]):
        key.update(part.encode())
    path = CACHE_DIR / "age-landmarks" / f"{key.hexdigest()[:20]}.npy"
    if path.exists():
        return np.load(path)
    landmarks = np.full((len(labels), 5, 2), np.nan, np.float32)
    started = time.time()
    for start in range(0, len(labels), 64):
        files = labels["file"].iloc[start : start + 64]
        batch = analyse_labelled(stages, files.tolist())
        for k, marks in enumerate(batch["landmarks"]):
            if len(marks):
                landmarks[start + k] = marks[0].reshape(5, 2)
        if (start // 64) % 20 == 0:
            log(f"detect {start + len(files)}/{len(labels)} photos, {time.time() - started:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, landmarks)
    return landmarks


def jitter_landmarks(points: np.ndarray, rng: np.random.Generator, cfg: AgeTrainConfig) -> np.ndarray:
    """A random similarity (rotation, scale, shift) of the 5 landmarks about their centre."""
    centre = points.mean(axis=0)
    eye_distance = float(np.linalg.norm(points[1] - points[0]))
    angle = math.radians(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    scale = 1.0 + rng.uniform(-cfg.max_scale, cfg.max_scale)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shift = rng.uniform(-cfg.max_shift, cfg.max_shift, size=2) * eye_distance
    return (points - centre) @ rotation.T + centre + shift


def jitter_colour(chip: np.ndarray, rng: np.random.Generator, cfg: AgeTrainConfig) -> np.ndarray:
    """Brightness, contrast and saturation jitter, and sometimes a loss of resolution; uint8 in, uint8 out."""
    x = chip.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.7, 1.3)  # saturation
    x = (x - x.mean()) * rng.uniform(0.75, 1.25) + x.mean() * rng.uniform(0.75, 1.25)  # contrast, brightness
    x = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < cfg.low_res_prob:
        side = int(rng.integers(24, 49))
        small = cv2.resize(x, (side, side), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, chip.shape[:2][::-1], interpolation=cv2.INTER_LINEAR)
    return x


class ChipDataset(Dataset):
    """Training chips: item ``(photo index, draw seed)`` -> (3, S, S) uint8 tensor of an augmented chip, and the
    label's (first, last) age, equal for an exact age."""

    def __init__(self, files: Sequence[str], landmarks: np.ndarray, ages: np.ndarray, cfg: AgeTrainConfig):
        self.files, self.landmarks, self.ages, self.cfg = list(files), landmarks, ages, cfg  # ages: (n, 2) lo, hi

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, draw = key
        rng = np.random.default_rng(draw)
        points = jitter_landmarks(self.landmarks[index].astype(np.float64), rng, self.cfg)
        chip = cut_chips(load_rgb(self.files[index]), points[None], self.cfg.chip_size, scale=self.cfg.chip_scale)[0]
        if rng.random() < 0.5:
            chip = chip[:, ::-1]  # the chip template is left-right symmetric to within a pixel
        chip = jitter_colour(chip, rng, self.cfg)
        return torch.from_numpy(np.ascontiguousarray(chip)).permute(2, 0, 1), torch.from_numpy(self.ages[index])


def sampling_weights(ages: np.ndarray, power: float, young_weight: float) -> np.ndarray:
    """Weight of each face, labels (n, 2) first and last age: (faces with the same label key) ** -power, times
    ``young_weight`` for faces aged 10-29. The key is the 5-year bin of an exact age, or the band itself."""
    exact = ages[:, 0] == ages[:, 1]
    keys = np.where(exact, ages[:, 0] // 5, 1000 + ages[:, 0] * 1000 + ages[:, 1]).astype(np.int64)
    _, index, counts = np.unique(keys, return_inverse=True, return_counts=True)
    middle = ages.mean(axis=1)
    young = (middle >= 10) & (middle < 30)
    return counts[index].astype(np.float64) ** -power * np.where(young, young_weight, 1.0)


class BalancedSampler(Sampler):
    """Per epoch, ``n`` (photo index, draw seed) keys, drawn with replacement with :func:`sampling_weights`: rare
    ages are seen more often without repeating a few photos endlessly."""

    def __init__(self, weights: np.ndarray, n: int, seed: int):
        self.p, self.n, self.rng = weights / weights.sum(), n, np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        picks = self.rng.choice(len(self.p), size=self.n, p=self.p)
        seeds = self.rng.integers(0, 2**63 - 1, size=self.n)
        return iter(zip(picks.tolist(), seeds.tolist()))


def validation_chips(files: Sequence[str], landmarks: np.ndarray, size: int, scale: float = 1.0) -> np.ndarray:
    """Un-augmented chips, exactly as the pipeline cuts them for a network of this chip size and scale."""
    return np.concatenate([cut_chips(load_rgb(f), p[None], size, scale=scale) for f, p in zip(files, landmarks)])


# ---------------------------------------------------------------------------------------------------------------
# Model and loss


def widen_head(net: AgeNet, n_classes: int) -> AgeNet:
    """A copy of ``net`` whose head covers ``n_classes`` ages; new classes copy the last one, 6 nats less likely."""
    old = net.fc.weight.shape[0]
    if n_classes <= old:
        return net
    wide = AgeNet(n_classes)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.") and k != "class_ages"}
    wide.load_state_dict(state, strict=False)
    with torch.no_grad():
        wide.fc.weight[:old] = net.fc.weight
        wide.fc.bias[:old] = net.fc.bias
        wide.fc.weight[old:] = net.fc.weight[old - 1]
        wide.fc.bias[old:] = net.fc.bias[old - 1] - 6.0
    return wide


def initial_network(config: AgeTrainConfig) -> AgeModel:
    """The network fine-tuning starts from, its head covering ages 0..max_age and its chip geometry set."""
    n_classes = config.max_age + 1
    if config.init_weights == IMAGENET:
        if config.arch != "lite0":
            raise ValueError("init_weights: imagenet is for arch lite0")
        net: AgeModel = Lite0AgeNet(n_classes, config.chip_size)
        encoder, head = imagenet_state()
        net.encoder.load_state_dict(encoder)
        net.head.load_state_dict(head)
    else:
        net = build_age_net(torch.load(config.init_weights, map_location="cpu", weights_only=True))
        if architecture_of(net.state_dict()) != config.arch:
            raise ValueError(f"init_weights: {config.init_weights} is not a {config.arch} network")
        if isinstance(net, AgeNet):
            net = widen_head(net, n_classes)
    net.chip_size.fill_(config.chip_size)
    net.chip_scale.fill_(config.chip_scale)
    return net


def moving_average(net: AgeModel, decay: float) -> AveragedModel:
    """The exponential moving average of ``net`` that is validated and saved; kept by :func:`update_average`."""
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def update_average(ema: AveragedModel, net: AgeModel) -> None:
    """One step of the moving average (``ema`` averages buffers too): weights and batch-norm statistics are averaged
    alike, so the averaged weights are validated with statistics that match them; the other buffers (class ages,
    chip geometry, batch counts) are copied, as averaging could only round them."""
    ema.update_parameters(net)
    for (name, averaged), current in zip(ema.module.named_buffers(), net.buffers()):
        if not name.endswith(("running_mean", "running_var")):
            averaged.copy_(current)


def age_loss(net: AgeModel, logits: torch.Tensor, labels: torch.Tensor, l1_weight: float) -> torch.Tensor:
    """Mean loss over faces labelled (n, 2) first and last age: exact ages (first = last) by cross-entropy against a
    Gaussian over the classes (sigma = 1 + 0.05 * age); bands by -log P(band). Both plus ``l1_weight`` * the L1
    distance of the expected age from the label (0 inside a band)."""
    classes = net.class_ages
    lo, hi = labels[:, 0], labels[:, 1]
    exact = lo == hi
    log_p = F.log_softmax(logits, dim=1)
    sigma = 1.0 + 0.05 * lo
    target = torch.exp(-0.5 * ((classes[None, :] - lo[:, None]) / sigma[:, None]) ** 2)
    target = target / target.sum(dim=1, keepdim=True)
    gaussian = -(target * log_p).sum(dim=1)
    # Whole-year classes inside the band; class 0 (0.25 y) belongs to a band starting at 0.
    inside = (classes[None, :] >= lo[:, None] - 0.5) & (classes[None, :] <= hi[:, None] + 0.5)
    censored = -torch.logsumexp(log_p.masked_fill(~inside, float("-inf")), dim=1)
    expected = log_p.exp() @ classes
    distance = (lo - expected).clamp(min=0) + (expected - hi).clamp(min=0)
    return torch.where(exact, gaussian, censored).mean() + l1_weight * distance.mean()


def predict(net: AgeModel, chips: np.ndarray, flip_average: bool, device: str = "cpu") -> np.ndarray:
    """Expected ages of uint8 chips (N, S, S, 3), from the distributions the age stage mixes."""
    net.eval()
    probabilities = torch.from_numpy(age_distributions(net, chips, device, batch_size=512, flip_average=flip_average))
    return net.moments(probabilities.to(net.class_ages.device))[0].cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Training


def train_age(
    label_csvs: Sequence[str | Path],
    out_dir: str | Path,
    config: AgeTrainConfig = AgeTrainConfig(),
    device: str = "cpu",
    max_photos: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fine-tune the age network; writes ``out_dir/age_finetuned.pt`` (best epoch, fp16) and ``metrics.json``.

    ``max_photos`` caps the photos taken from each folder (for smoke tests). Returns the metrics dict: the config,
    per-epoch training loss and per-folder validation MAE, and the selected epoch.
    """
    out_dir = Path(out_dir)
    all_labels = [read_age_labels(csv) for csv in label_csvs]  # every file checked before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    # OpenCV's own thread pool is off: workers fork from this process, and a pool inherited through fork deadlocks.
    cv2.setNumThreads(0)
    torch.manual_seed(config.seed)

    train_parts, val_sets = [], {}
    for csv, labels in zip(label_csvs, all_labels):
        if max_photos is not None:
            labels = labels.iloc[:max_photos].reset_index(drop=True)
        landmarks = detect_landmarks(labels, device, config.min_face_px, log)
        found = ~np.isnan(landmarks[:, 0, 0])
        is_val = validation_mask(labels["path"].tolist())
        name = Path(csv).parent.name
        log(f"{name}: {len(labels)} photos, {int((~found).sum())} without a face, {int(is_val.sum())} held out")
        keep = found & ~is_val
        bands = labels[["age_lo", "age_hi"]].to_numpy(np.float32)
        train_parts.append((labels["file"][keep].tolist(), landmarks[keep], bands[keep]))
        held = found & is_val
        if held.any():
            chips = validation_chips(labels["file"][held], landmarks[held], config.chip_size, config.chip_scale)
            val_sets[name] = (chips, bands[held])
    files = [f for part in train_parts for f in part[0]]
    train_landmarks = np.concatenate([part[1] for part in train_parts])
    ages = np.concatenate([part[2] for part in train_parts]).clip(0, config.max_age).astype(np.float32)
    dataset = ChipDataset(files, train_landmarks, ages, config)

    net = initial_network(config).to(device)
    pretrained = net.pretrained_layers(config.frozen_blocks)
    for module in pretrained:
        module.requires_grad_(False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    ema = moving_average(net, config.ema_decay)
    steps_per_epoch = max(1, (config.samples_per_epoch or len(dataset)) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / config.warmup_steps)
        return config.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))

    # The sampler is iterated in this process, so one loader (and its worker processes) serves every epoch.
    weights = sampling_weights(ages, config.balance_power, config.young_weight)
    sampler = BalancedSampler(weights, steps_per_epoch * config.batch_size, config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        persistent_workers=config.workers > 0,
        worker_init_fn=_single_thread_worker,
    )
    flip_average = AgeSettings().flip_average  # as the pipeline predicts, at the framing trained on
    history: list[dict] = []
    best: dict | None = None
    step = 0
    for epoch in range(1, config.epochs + 1):
        net.train()
        for module in pretrained:  # frozen batch norms keep their pretrained statistics
            module.eval()
        started, losses = time.time(), []
        for chips, target in loader:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = age_loss(net, net(chips.to(device)), target.float().to(device), config.l1_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            update_average(ema, net)
            losses.append(loss.item())
            step += 1
        # Per validation folder: the mean distance of the estimate from the label (the MAE for exact ages; 0 inside
        # a band), and for banded folders the share of estimates inside the band.
        val_mae, val_band = {}, {}
        for name, (chips, band) in val_sets.items():
            estimate = predict(ema.module, chips, flip_average, device)
            distance = np.clip(band[:, 0] - estimate, 0, None) + np.clip(estimate - band[:, 1], 0, None)
            val_mae[name] = round(float(distance.mean()), 3)
            if (band[:, 0] != band[:, 1]).any():
                rounded = np.floor(estimate + 0.5)
                val_band[name] = round(float(((rounded >= band[:, 0]) & (rounded <= band[:, 1])).mean()), 4)
        score = float(np.mean(list(val_mae.values()))) if val_mae else 0.0
        record = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 4), "val_mae": val_mae,
                  "val_band_accuracy": val_band, "seconds": round(time.time() - started, 1)}
        history.append(record)
        log(json.dumps(record))
        if best is None or not val_mae or score < best["score"]:  # without validation faces, keep the last
            best = {"score": score, "epoch": epoch, "val_mae": val_mae}
            save_age_net(ema.module, out_dir / "age_finetuned.pt")
    metrics = {
        "config": asdict(config),
        "label_csvs": [str(c) for c in label_csvs],
        "n_train": len(dataset),
        "n_val": {name: len(age) for name, (_, age) in val_sets.items()},
        "history": history,
        "best_epoch": best["epoch"],
        "best_val_mae": best["val_mae"],
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _single_thread_worker(_: int) -> None:
    torch.set_num_threads(1)
