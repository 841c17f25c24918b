"""Refit the final linear layer (``fc``) of each shipped age network on cached features, keeping everything before it.

Step 1, ``features``: every labelled photo goes through the pipeline's own detect -> align path (the training
code's cached landmarks, :func:`colortrend.training.age.detect_landmarks`, and its chip cutting,
:func:`colortrend.training.age.validation_chips`: the chips the age stage cuts), and each shipped network's
penultimate features (the input of its ``fc``) are stored for the chip and its mirror image, training and validation
faces alike, with the labels and the validation mask (:func:`colortrend.evaluate.age.validation_mask`)::

    OMP_NUM_THREADS=1 python scripts/refit_age_heads.py features /tmp/age-features A/aaf/labels.csv A/utkface/labels.csv
    OMP_NUM_THREADS=1 python scripts/refit_age_heads.py features /tmp/age-features A/fairface/labels.csv

Step 2, ``refit``: each network's ``fc`` is trained again, from its shipped weights, on the *training* faces'
features only, with the training loss (:func:`colortrend.training.age.age_loss`: Gaussian label distribution or
interval-censored band likelihood, plus L1) and the training sampler's weights
(:func:`colortrend.training.age.sampling_weights`), both orientations as two samples. ``--score`` prints the
validation figures of the mixture (the age stage's median of the four networks' flip-averaged distributions) for
the shipped heads and the refitted ones; ``--save DIR`` writes the networks with their new heads (shipped format,
:func:`colortrend.models.age_net.save_age_net`)::

    python scripts/refit_age_heads.py refit /tmp/age-features --young-weight 3 --score --save runs/refit
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from colortrend.evaluate.age import COHORT_WINDOW, EVAL_MIN_FACE_PX, YOUNG, read_labels, validation_mask
from colortrend.models.age_net import build_age_net, load_age_net, save_age_net
from colortrend.stages.age import FINETUNED_WEIGHTS, median_and_sd

CHUNK = 128  # photos whose chips are cut and passed through the networks at a time


def network_features(net, chips: np.ndarray) -> np.ndarray:
    """(n, 2, D) float32: the input of ``net.fc`` for uint8 chips (n, S, S, 3) and their mirror images."""
    captured: list[torch.Tensor] = []
    hook = net.fc.register_forward_pre_hook(lambda _module, args: captured.append(args[0].float()))
    try:
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(chips)).permute(0, 3, 1, 2)
            net(pixels)
            net(pixels.flip(3))
    finally:
        hook.remove()
    return torch.stack(captured, dim=1).numpy()


def cache_features(out_dir: Path, labels_csv: str, log=print) -> Path:
    """Write ``out_dir/<folder>.npz``: labels, validation mask, found mask and each network's (n, 2, D) features."""
    from colortrend.training.age import detect_landmarks, validation_chips

    labels = read_labels(labels_csv)
    landmarks = detect_landmarks(labels, "cpu", EVAL_MIN_FACE_PX, log)
    found = ~np.isnan(landmarks[:, 0, 0])
    nets = {path.stem: load_age_net(path) for path in FINETUNED_WEIGHTS}
    features = {name: np.zeros((len(labels), 2, net.fc.in_features), np.float32) for name, net in nets.items()}
    rows = np.flatnonzero(found)
    started = time.time()
    for start in range(0, len(rows), CHUNK):
        part = rows[start : start + CHUNK]
        for name, net in nets.items():
            chips = validation_chips(labels["file"].iloc[part], landmarks[part], int(net.chip_size),
                                     float(net.chip_scale))
            features[name][part] = network_features(net, chips)
        if (start // CHUNK) % 10 == 0:
            log(f"{labels_csv}: {start + len(part)}/{len(rows)} faces, {time.time() - started:.0f} s")
    out = out_dir / f"{Path(labels_csv).parent.name}.npz"
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out, path=labels["path"].to_numpy(str), lo=labels["age_lo"].to_numpy(np.float32),
             hi=labels["age_hi"].to_numpy(np.float32), group=labels["group"].astype(str).to_numpy(str),
             is_val=validation_mask(labels["path"].tolist()), found=found,
             **{f"features_{name}": value for name, value in features.items()})
    log(f"wrote {out} in {time.time() - started:.0f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    features = commands.add_parser("features", help="cache the networks' penultimate features")
    features.add_argument("out_dir", type=Path)
    features.add_argument("labels", nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "features":
        for csv in args.labels:
            cache_features(args.out_dir, csv)


if __name__ == "__main__":
    main()
