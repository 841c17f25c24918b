"""Refit the final linear layer (``fc``) of each age network on cached features, keeping everything before it.

Step 1, ``features``: every labelled photo goes through the pipeline's own detect -> align path (the training
code's cached landmarks, :func:`colortrend.training.age.detect_landmarks`, and the chips the age stage cuts,
:func:`colortrend.stages.align.cut_chips` at each network's side and framing), and each network's penultimate
features (the input of its ``fc``) are stored, for validation faces also of the mirror image (the age stage averages
both), with the labels and the validation mask (:func:`colortrend.labelled.validation_mask`)::

    A=../shared/data/age
    OMP_NUM_THREADS=1 python scripts/refit_age_heads.py features /tmp/age-features $A/aaf/labels.csv \
        $A/utkface/labels.csv $A/fairface/labels.csv

Step 2, ``refit``: each network's ``fc`` is trained again, from its weights, on the *training* faces' features
only, with the training loss (:func:`colortrend.training.age.age_loss`: Gaussian label distribution or
interval-censored band likelihood, plus L1) and the training sampler's weights
(:func:`colortrend.training.age.sampling_weights`). It prints the validation figures the targets name (the age
stage's estimate: the median of the networks' mixture of flip-averaged distributions) for the heads as they are
and as refitted, then all the refitted figures as JSON; ``--save DIR`` writes the networks with their new heads in
the shipped format (:func:`colortrend.models.age_net.save_age_net`), for ``colortrend eval age --weights``::

    python scripts/refit_age_heads.py refit /tmp/age-features --epochs 3 --young-weight 3 --save runs/refit

The model card (``docs/models.md``, "Head refits") gives the figures of every variant tried.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from colortrend.evaluate.age import COHORT_WINDOW, YOUNG
from colortrend.labelled import LABELLED_MIN_FACE_PX, read_age_labels, validation_mask
from colortrend.models.age_net import build_age_net, load_age_net, save_age_net
from colortrend.stages.age import FINETUNED_WEIGHTS, median_and_sd

CHUNK = 128  # photos whose chips are cut and passed through the networks at a time


def network_features(net, chips: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """(n, 2, D) float32: the input of ``net.fc`` for uint8 chips (n, S, S, 3) and, where ``mirror`` is true, their
    mirror images (zeros elsewhere)."""
    captured: list[torch.Tensor] = []
    hook = net.fc.register_forward_pre_hook(lambda _module, args: captured.append(args[0].float()))
    out = np.zeros((len(chips), 2, net.fc.in_features), np.float32)
    try:
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(chips)).permute(0, 3, 1, 2)
            net(pixels)
            if mirror.any():
                net(pixels[torch.from_numpy(mirror)].flip(3))
    finally:
        hook.remove()
    out[:, 0] = captured[0].numpy()
    if mirror.any():
        out[mirror, 1] = captured[1].numpy()
    return out


def cache_features(out_dir: Path, labels_csv: str, weights: Sequence[Path] = FINETUNED_WEIGHTS, log=print) -> Path:
    """Write ``out_dir/<folder>.npz``: labels, validation mask, found mask and each network's (n, 2, D) features.

    Validation faces get both orientations (the age stage averages them); training faces only the chip as cut, the
    CPU's time going to more faces rather than their mirror images."""
    from colortrend.labelled import load_rgb
    from colortrend.stages.align import cut_chips
    from colortrend.training.age import detect_landmarks

    labels = read_age_labels(labels_csv)
    landmarks = detect_landmarks(labels, "cpu", LABELLED_MIN_FACE_PX, log)
    found = ~np.isnan(landmarks[:, 0, 0])
    is_val = validation_mask(labels["path"].tolist())
    nets = {path.stem: load_age_net(path) for path in weights}
    features = {name: np.zeros((len(labels), 2, net.fc.in_features), np.float32) for name, net in nets.items()}
    rows = np.flatnonzero(found)
    started = time.time()
    for start in range(0, len(rows), CHUNK):
        part = rows[start : start + CHUNK]
        images = [load_rgb(f) for f in labels["file"].iloc[part]]  # decoded once for every network
        for name, net in nets.items():
            # the chips the age stage cuts (validation_chips of the training code, without decoding again)
            size, scale = int(net.chip_size), float(net.chip_scale)
            chips = np.concatenate([cut_chips(image, landmarks[i][None], size, scale=scale)
                                    for image, i in zip(images, part)])
            features[name][part] = network_features(net, chips, is_val[part])
        if (start // CHUNK) % 10 == 0:
            log(f"{labels_csv}: {start + len(part)}/{len(rows)} faces, {time.time() - started:.0f} s")
    out = out_dir / f"{Path(labels_csv).parent.name}.npz"
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out, path=labels["path"].to_numpy(str), lo=labels["age_lo"].to_numpy(np.float32),
             hi=labels["age_hi"].to_numpy(np.float32), group=labels["group"].astype(str).to_numpy(str),
             is_val=is_val, found=found, **{f"features_{name}": value for name, value in features.items()})
    log(f"wrote {out} in {time.time() - started:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Refit

SETS = ("aaf", "utkface", "fairface")
MAX_AGE = 100  # the heads cover ages 0..100; older labels are clipped, as in training


def load_features(feature_dir: Path, sets: tuple[str, ...] = SETS) -> dict[str, dict[str, np.ndarray]]:
    return {name: dict(np.load(feature_dir / f"{name}.npz")) for name in sets}


def shipped_heads(networks: list[str] | None = None) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Per network (file stem in the package's weights folder; default the shipped four): its ``fc`` (float32,
    dlib's widened to ages 0..100 as training widens it) and class ages."""
    from colortrend.models import WEIGHTS_DIR
    from colortrend.training.age import widen_head

    heads = {}
    for path in [WEIGHTS_DIR / f"{n}.pt" for n in networks] if networks else FINETUNED_WEIGHTS:
        net = widen_head(build_age_net(torch.load(path, map_location="cpu", weights_only=True)), MAX_AGE + 1)
        heads[path.stem] = (net.fc, net.class_ages)
    return heads


def training_rows(data: dict[str, dict[str, np.ndarray]], balance_power: float, young_weight: float,
                  set_shares: dict[str, float] | None, sets: tuple[str, ...] = SETS,
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Training faces of ``sets`` (found, not held out): features per network (m, D), labels (m, 2) and the
    training sampler's weights, each set's total rescaled to its share when ``set_shares`` is given."""
    from colortrend.training.age import sampling_weights

    data = {name: part for name, part in data.items() if name in sets}
    features: dict[str, list[np.ndarray]] = {}
    labels, weights = [], []
    for name, part in data.items():
        keep = part["found"] & ~part["is_val"]
        for key in part:
            if key.startswith("features_"):
                features.setdefault(key.removeprefix("features_"), []).append(part[key][keep, 0])
        labels.append(np.stack([part["lo"][keep], part["hi"][keep]], axis=1).clip(0, MAX_AGE))
        weights.append(np.ones(int(keep.sum())))
    ages = np.concatenate(labels).astype(np.float32)
    pooled = sampling_weights(ages, balance_power, young_weight)  # rare labels by the counts of all sets, as trained
    if set_shares:
        bounds = np.cumsum([0, *map(len, weights)])
        for (name, _), lo, hi in zip(data.items(), bounds[:-1], bounds[1:]):
            pooled[lo:hi] *= set_shares[name] / pooled[lo:hi].sum()
    return {k: np.concatenate(v) for k, v in features.items()}, ages, pooled


def refit_head(fc: torch.nn.Module, class_ages: torch.Tensor, features: np.ndarray, labels: np.ndarray,
               weights: np.ndarray, epochs: int, lr: float, l1_weight: float = 0.5, weight_decay: float = 0.05,
               batch_size: int = 256, seed: int = 0, per_epoch=None) -> torch.nn.Linear:
    """A copy of ``fc`` trained on the chips' features (m, D) with :func:`age_loss`, each epoch m faces drawn with
    ``weights``; AdamW with a cosine-decayed ``lr``."""
    from colortrend.training.age import age_loss

    head = torch.nn.Linear(fc.in_features, fc.out_features)
    head.load_state_dict(fc.state_dict())
    holder = torch.nn.Module()
    holder.register_buffer("class_ages", class_ages.float())
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    x_all, y_all, p = torch.from_numpy(features), torch.from_numpy(labels), weights / weights.sum()
    steps = epochs * (len(p) // batch_size)
    step = 0
    for epoch in range(epochs):
        picks = torch.from_numpy(rng.choice(len(p), size=len(p), p=p))
        for start in range(0, len(picks) - batch_size + 1, batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
            rows = picks[start : start + batch_size]
            loss = age_loss(holder, head(x_all[rows]), y_all[rows], l1_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if per_epoch is not None:
            per_epoch(epoch + 1, head)
    return head


def distributions(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """(n, classes) float64: the flip-averaged distribution of a head over (n, 2, D) features, as the age stage."""
    with torch.no_grad():
        x = torch.from_numpy(features)
        return ((head(x[:, 0]).softmax(1) + head(x[:, 1]).softmax(1)) / 2).double().numpy()


def combine(views: list[np.ndarray], weights: list[float] | None = None, rule: str = "median") -> np.ndarray:
    """Age estimates from per-network distributions: the median of their (weighted) mixture, as the age stage does
    (``median``), or its mean (``mean``)."""
    weights = np.ones(len(views)) if weights is None else np.asarray(weights, float)
    mixture = sum(w * v for w, v in zip(weights, views)) / weights.sum()
    if rule == "mean":
        return mixture @ np.r_[0.25, np.arange(1, mixture.shape[1])]
    return median_and_sd(mixture)[0].astype(np.float64)


def validation_predictions(part: dict[str, np.ndarray], estimate: np.ndarray) -> pd.DataFrame:
    """A :func:`predict_ages`-like table of a set's validation photos (NaN where no face) for ``age_metrics``."""

    val = part["is_val"]
    predicted = np.full(len(val), np.nan)
    predicted[part["found"] & val] = estimate
    exact = part["lo"] == part["hi"]
    return pd.DataFrame({"path": part["path"][val], "age": np.where(exact, part["lo"], np.nan)[val],
                         "predicted_age": predicted[val], "age_lo": part["lo"][val], "age_hi": part["hi"][val],
                         "group": part["group"][val] if not exact.all() else None})


def score(data: dict[str, dict[str, np.ndarray]], estimates: dict[str, np.ndarray]) -> dict:
    """The figures the targets name, per set, from the validation estimates of each set."""
    from colortrend.evaluate.age import age_metrics

    young, window = f"bias_{YOUNG[0]}_{YOUNG[1]}", f"window_{COHORT_WINDOW[0]}_{COHORT_WINDOW[1]}"
    out = {}
    for name, part in data.items():
        m = age_metrics(validation_predictions(part, estimates[name]))
        if "band_accuracy" in m:
            out[name] = {"band_accuracy": m["band_accuracy"], "east_asian": m["band_accuracy_by_group"]["East Asian"],
                         "teens_under_20": m["teens_estimated_under_20"], "band_mae": m["band_mae"],
                         "by_band": m["band_accuracy_by_band"]}
        else:
            out[name] = {"mae": m["mae"], young: m[young], "recall_17_21": m[window]["recall"],
                         "precision_17_21": m[window]["precision"], "bias": m["bias"],
                         "mae_by_band": m["mae_by_band"], "bias_by_band": m["bias_by_band"]}
    return out


def summary(figures: dict) -> str:
    a, u, f = figures["aaf"], figures["utkface"], figures["fairface"]
    return (f"AAF {a['mae']:.3f} b16-21 {a['bias_16_21']:+.2f} rec {a['recall_17_21']:.3f} | UTK {u['mae']:.3f} "
            f"b16-21 {u['bias_16_21']:+.2f} | FF {f['band_accuracy']:.3f} EA {f['east_asian']:.3f} "
            f"teen {f['teens_under_20']:.3f}")


def val_views(data, heads: dict[str, torch.nn.Module]) -> dict[str, list[np.ndarray]]:
    """Per set, each network's validation distributions."""
    return {name: [distributions(heads[net], part[f"features_{net}"][part["found"] & part["is_val"]])
                   for net in heads] for name, part in data.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    features = commands.add_parser("features", help="cache the networks' penultimate features")
    features.add_argument("out_dir", type=Path)
    features.add_argument("labels", nargs="+")
    features.add_argument("--weights", type=Path, nargs="+", default=list(FINETUNED_WEIGHTS),
                          help="age networks whose features are cached (default: the shipped four)")
    refit = commands.add_parser("refit", help="refit the heads on the training faces' cached features")
    refit.add_argument("feature_dir", type=Path)
    refit.add_argument("--young-weight", type=float, default=1.5, help="sampling weight of faces aged 10-29")
    refit.add_argument("--balance-power", type=float, default=0.5, help="(faces sharing the label key) ** -power")
    refit.add_argument("--set-shares", help="e.g. aaf=1,utkface=1,fairface=1: each set's share of the draws")
    refit.add_argument("--epochs", type=int, default=3)
    refit.add_argument("--lr", type=float, default=1e-3)
    refit.add_argument("--seed", type=int, default=0)
    refit.add_argument("--networks", help="comma-separated weight file stems (default: the shipped four)")
    refit.add_argument("--train-sets", default=",".join(SETS), help="sets whose training faces refit the heads "
                       "(validation is scored on all three)")
    refit.add_argument("--network-weights", help="e.g. 1,1,2,2: weights of the four networks in the mixture")
    refit.add_argument("--young-prior", help="e.g. 14-22:1.0: each network's probability of ages 14-22 times e^1.0 "
                       "(as adding 1.0 to the biases of those classes), for shipped and refitted heads alike")
    refit.add_argument("--rule", choices=["median", "mean"], default="median", help="estimate from the mixture")
    refit.add_argument("--save", type=Path, help="write the networks with their refitted heads to this folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "features":
        for csv in args.labels:
            cache_features(args.out_dir, csv, args.weights)
        return
    data = load_features(args.feature_dir)
    shares = ({k: float(v) for k, v in (item.split("=") for item in args.set_shares.split(","))}
              if args.set_shares else None)
    features, labels, weights = training_rows(data, args.balance_power, args.young_weight, shares,
                                              tuple(args.train_sets.split(",")))
    heads = shipped_heads(args.networks.split(",") if args.networks else None)
    mixture_weights = [float(w) for w in args.network_weights.split(",")] if args.network_weights else None

    def estimates(views: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        if args.young_prior:
            ages, tilt = args.young_prior.split(":")
            lo, hi = map(int, ages.split("-"))
            factor = np.where((np.arange(MAX_AGE + 1) >= lo) & (np.arange(MAX_AGE + 1) <= hi), np.exp(float(tilt)), 1)
            views = {k: [p * factor / (p * factor).sum(1, keepdims=True) for p in v] for k, v in views.items()}
        return {k: combine(v, mixture_weights, args.rule) for k, v in views.items()}

    print("shipped heads:", summary(score(data, estimates(val_views(data, {n: fc for n, (fc, _) in heads.items()})))))
    refitted = {name: refit_head(fc, ages, features[name], labels, weights, args.epochs, args.lr, seed=args.seed)
                for name, (fc, ages) in heads.items()}
    figures = score(data, estimates(val_views(data, refitted)))
    print("refitted heads:", summary(figures))
    print(json.dumps(figures))
    if args.save:
        from colortrend.models import WEIGHTS_DIR
        from colortrend.training.age import widen_head

        for name, head in refitted.items():
            net = widen_head(build_age_net(torch.load(WEIGHTS_DIR / f"{name}.pt", map_location="cpu",
                                                      weights_only=True)), MAX_AGE + 1)
            net.fc.load_state_dict(head.state_dict())
            save_age_net(net, args.save / f"{name}.pt")
        print(f"wrote {len(refitted)} networks to {args.save}")


if __name__ == "__main__":
    main()
