"""The age network port, the age stage, `eval age` and `train age` on real faces."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from colortrend.config import default_config
from colortrend.errors import ConfigError
from colortrend.evaluate.age import age_metrics, predict_ages
from colortrend.labelled import LABELLED_MIN_FACE_PX, analyse_labelled, read_age_labels
from colortrend.models.age_net import ARCHITECTURES, AgeNet, Lite0AgeNet, load_age_net, padded_add, save_age_net
from colortrend.stages.age import DLIB_WEIGHTS, AgeSettings, AgeStage, resolve_weights

HERE = Path(__file__).resolve().parent
AGE_DATA = HERE.parent / ".." / "shared" / "data" / "age"
needs_age_data = pytest.mark.skipif(
    not (AGE_DATA / "aaf" / "labels.csv").exists() or not (AGE_DATA / "utkface" / "labels.csv").exists(),
    reason="../shared/data/age not present",
)


def labelled_stages(upto: str) -> list:
    """The run's chain up to ``upto`` as `eval age` builds it."""
    from colortrend.pipeline import build_stages

    return build_stages(default_config(".", device="cpu", detect={"min_face_px": LABELLED_MIN_FACE_PX}), "cpu", upto)


def few_faces_csv(tmp_path: Path, per_set: int = 3) -> Path:
    """A labels.csv listing a few AAF and UTKFace photos by absolute path, plus one photo without a face."""
    rows = []
    for name in ("aaf", "utkface"):
        labels = pd.read_csv(AGE_DATA / name / "labels.csv")
        picked = labels.iloc[np.linspace(0, len(labels) - 1, per_set).astype(int)]
        rows += [(str((AGE_DATA / name / p).resolve()), a) for p, a in zip(picked["path"], picked["age"])]
    blank = tmp_path / "blank.png"
    import cv2

    cv2.imwrite(str(blank), np.full((120, 120, 3), 128, np.uint8))
    rows.append((str(blank), 30))
    csv = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["path", "age"]).to_csv(csv, index=False)
    return csv


def test_padded_add_pads_trailing_channels_rows_and_columns():
    a = torch.ones(1, 2, 3, 3)
    b = torch.full((1, 4, 2, 2), 10.0)
    out = padded_add(a, b)
    assert out.shape == (1, 4, 3, 3)
    assert out[0, 0, 0, 0] == 11 and out[0, 0, 2, 2] == 1  # b's missing last row/column are zeros
    assert out[0, 3, 0, 0] == 10 and out[0, 3, 2, 2] == 0  # a's missing channels are zeros


def test_port_matches_onnxruntime_reference():
    """Shipped fp16 weights against probabilities onnxruntime gave for the original ONNX on real chips."""
    fixture = np.load(HERE / "fixtures" / "age_dlib_reference.npz")
    net = load_age_net(DLIB_WEIGHTS)
    with torch.no_grad():
        logits = net(torch.from_numpy(fixture["chips"]).permute(0, 3, 1, 2))
    p = logits.softmax(dim=1).numpy()
    reference = fixture["probabilities"]
    ages = net.class_ages.numpy()
    assert np.abs(p - reference).max() < 1e-2  # fp16 weights; the fp32 port agrees to 5e-6
    assert np.abs(p @ ages - reference @ ages).max() < 0.2


def test_moments_of_a_known_distribution():
    net = AgeNet(5)
    mean, sd = net.moments(torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]))
    assert mean.item() == pytest.approx(2.0, abs=1e-4) and sd.item() == pytest.approx(1.0, abs=1e-4)


def test_median_of_a_known_distribution():
    """Each age class spreads over one year: the median moves smoothly through it as the probabilities change."""
    from colortrend.stages.age import median_and_sd

    p = np.zeros((4, 101))
    p[0, 30] = 1.0  # all in one class: its centre
    p[1, [20, 40]] = 0.5  # split evenly: the top of the lower class
    p[2, [20, 40]] = [0.25, 0.75]  # a quarter below: a third of the way into the upper class
    p[3, [0, 1]] = [0.75, 0.25]  # under one year spreads over [0, 0.5]
    median, sd = median_and_sd(p)
    np.testing.assert_allclose(median, [30.0, 20.5, 39.5 + 1 / 3, 1 / 3], atol=1e-5)
    np.testing.assert_allclose(sd, [0.0, 10.0, np.sqrt(0.25 * 0.75) * 20, np.sqrt(0.75 * 0.25) * 0.75], atol=1e-4)


def test_default_weights_resolve_and_bad_path_is_reported():
    shipped = resolve_weights("default")
    assert len(shipped) == 4 and all(p.is_file() for p in shipped)
    views = {(type(net), int(net.chip_size), float(net.chip_scale)) for net in map(load_age_net, shipped)}
    assert len(views) == len(shipped)  # each network sees the face differently: that is why they are averaged
    assert {type(net) for net in map(load_age_net, shipped)} == {AgeNet, Lite0AgeNet}
    assert resolve_weights("dlib") == [DLIB_WEIGHTS]
    with pytest.raises(ConfigError, match="age.weights"):
        resolve_weights("/nonexistent/age.pt")


@needs_age_data
def test_eval_on_a_few_faces(tmp_path):
    csv = few_faces_csv(tmp_path)
    predictions = predict_ages(csv, batch_size=4)
    assert list(predictions.columns[:3]) == ["path", "age", "predicted_age"]
    assert predictions["path"].tolist() == pd.read_csv(csv)["path"].tolist()
    assert np.isnan(predictions["predicted_age"].iloc[-1])  # the blank photo
    found = predictions["predicted_age"].iloc[:-1]
    assert found.notna().all() and found.between(0, 100).all()
    assert (predictions["age_sd"].iloc[:-1] > 0).all()
    metrics = age_metrics(predictions)
    assert metrics["n"] == 6 and metrics["missed"] == 1
    assert metrics["mae"] < 25 and set(metrics["mae_by_band"]) == {"0-12", "13-19", "20-29", "30-39", "40-49",
                                                                    "50-59", "60+"}
    assert {"recall", "precision"} <= set(metrics["window_17_21"])
    assert set(metrics["bias_by_band"]) == set(metrics["mae_by_band"]) and "bias_16_21" in metrics
    json.dumps(metrics)  # what `eval age --json` prints


def test_labels_without_an_age_column_are_refused(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,years\na.jpg,20\n")
    with pytest.raises(ConfigError, match="expected columns path and age"):
        predict_ages(csv)
    csv.write_text("path,age_lo,age_hi\na.jpg,20,10\n")
    with pytest.raises(ConfigError, match="row 2 has no valid age or age band"):
        predict_ages(csv)


needs_fairface = pytest.mark.skipif(not (AGE_DATA / "fairface" / "labels.csv").exists(),
                                    reason="../shared/data/age/fairface not present")


def few_banded_faces_csv(tmp_path: Path, n: int = 8) -> Path:
    """FairFace rows (age bands, race groups) spread over the file, paths made absolute."""
    labels = pd.read_csv(AGE_DATA / "fairface" / "labels.csv")
    picked = labels.iloc[np.linspace(0, len(labels) - 1, n).astype(int)].copy()
    picked["path"] = [str((AGE_DATA / "fairface" / p).resolve()) for p in picked["path"]]
    csv = tmp_path / "bands.csv"
    picked.to_csv(csv, index=False)
    return csv


@needs_fairface
def test_eval_scores_age_bands_per_band_and_group(tmp_path):
    csv = few_banded_faces_csv(tmp_path)
    predictions = predict_ages(csv, batch_size=4)
    assert predictions["age"].isna().all() and (predictions["age_lo"] <= predictions["age_hi"]).all()
    metrics = age_metrics(predictions)
    assert metrics["n"] + metrics["missed"] == 8
    scored = predictions.dropna(subset=["predicted_age"])
    inside = ((scored["predicted_age"] + 0.5) // 1).between(scored["age_lo"], scored["age_hi"])
    assert metrics["band_accuracy"] == pytest.approx(inside.mean(), abs=1e-4)
    assert set(metrics["band_accuracy_by_group"]) == set(scored["group"])
    assert sum(metrics["n_by_band"].values()) == metrics["n"]
    json.dumps(metrics)


def test_band_loss_rewards_probability_inside_the_band():
    from colortrend.training.age import age_loss

    net = AgeNet(101)
    ages = net.class_ages
    inside = torch.where((ages >= 10) & (ages <= 19), 4.0, -4.0)[None]  # logits: the mass inside 10-19
    outside = torch.where((ages >= 30) & (ages <= 39), 4.0, -4.0)[None]
    band = torch.tensor([[10.0, 19.0]])
    assert age_loss(net, inside, band, 0.5) < 0.5 < age_loss(net, outside, band, 0.5) - 5
    # An exact age is a band of one year: the Gaussian target, unchanged by the band code.
    exact = torch.tensor([[25.0, 25.0]])
    peaked = torch.where(ages == 25, 8.0, 0.0)[None]
    assert age_loss(net, peaked, exact, 0.5) < age_loss(net, inside, exact, 0.5)


@needs_age_data
def test_age_stage_batches_faces_of_several_photos(tmp_path):
    labels = read_age_labels(few_faces_csv(tmp_path, per_set=2))
    batch = analyse_labelled(labelled_stages("align"), labels["file"].tolist())
    batch["status"][0] = "error"  # a failed photo is skipped
    out = AgeStage(AgeSettings(weights="dlib"))(batch)
    assert len(out["age"][0]) == 0
    for i in range(1, 4):
        assert len(out["age"][i]) == len(out["landmarks"][i]) >= 1
        assert 0 < out["age"][i][0] < 100 and out["age"][i].dtype == np.float32


@needs_age_data
def test_the_device_path_cuts_the_same_chips_and_gives_the_same_ages(tmp_path):
    """What the age stage does on a cuda device (chips cut from the photos' device copies), here on this CPU,
    against OpenCV's chips: every network's chips within one code, the ages within 0.05 years."""
    labels = read_age_labels(few_faces_csv(tmp_path, per_set=3))
    batch = analyse_labelled(labelled_stages("align"), labels["file"].tolist())
    photos = [i for i, marks in enumerate(batch["landmarks"]) if len(marks)]
    host, device = AgeStage(), AgeStage()
    host.setup()
    device._models, device.ops_device = host._models, "cpu"
    for size, scale in host.chip_geometry:
        ours, reference = device.chips(batch, photos, size, scale).numpy(), host.chips(batch, photos, size, scale)
        assert ours.shape == reference.shape
        assert np.abs(ours.astype(int) - reference).max() <= 1
    on_host, on_device = host(dict(batch)), device(dict(batch))
    assert sum(len(a) for a in on_host["age"]) >= 6
    for a, b in zip(on_host["age"], on_device["age"]):
        np.testing.assert_allclose(b, a, atol=0.05)


@needs_age_data
def test_age_is_the_mixture_of_every_network_and_chip_scale(tmp_path):
    from colortrend.stages.age import FINETUNED_WEIGHTS
    from colortrend.stages.align import TEMPLATE_SCALE, chip_template, cut_chips

    labels = read_age_labels(few_faces_csv(tmp_path, per_set=2))
    batch = analyse_labelled(labelled_stages("align"), labels["file"].tolist())
    photos = [i for i, marks in enumerate(batch["landmarks"]) if len(marks)]
    aligned = np.concatenate([cut_chips(batch["image"][i], np.asarray(batch["landmarks"][i]).reshape(-1, 5, 2),
                                        template=chip_template(scale=TEMPLATE_SCALE)) for i in photos])
    np.testing.assert_array_equal(AgeStage().chips(batch, photos), aligned)  # 64 px at scale 1: align's chip
    scales = (0.94, 1.0, 1.06)
    views = [AgeStage(AgeSettings(weights=str(w), scales=(s,)))(dict(batch)) for w in FINETUNED_WEIGHTS for s in scales]
    averaged = AgeStage(AgeSettings(scales=scales))(dict(batch))
    twice = AgeStage(AgeSettings(weights=("dlib", "dlib")))(dict(batch))  # same-size networks share their chips
    once = AgeStage(AgeSettings(weights="dlib"))(dict(batch))
    for i in range(len(labels)):
        np.testing.assert_allclose(twice["age"][i], once["age"][i], rtol=1e-6)
    for i in range(len(labels)):
        if not len(batch["landmarks"][i]):
            continue
        ages = np.array([out["age"][i] for out in views])
        # The median of a mixture lies between the medians of its parts (to the float32 rounding of the ages).
        assert (averaged["age"][i] >= ages.min(axis=0) - 1e-4).all()
        assert (averaged["age"][i] <= ages.max(axis=0) + 1e-4).all()
        assert np.abs(ages - np.median(ages, axis=0)).max() < 8  # views of the same face agree roughly
        spread = np.array([out["age_sd"][i] for out in views])
        assert (averaged["age_sd"][i] >= spread.min(axis=0) - 1e-4).all()  # a mixture is never narrower


@needs_age_data
@pytest.mark.parametrize("arch", ["aresnet10", "lite0"])
def test_train_a_step_writes_weights(tmp_path, monkeypatch, arch):
    from colortrend.training import age as training

    monkeypatch.setattr(training, "CACHE_DIR", tmp_path / "cache")
    config = training.AgeTrainConfig(arch=arch, epochs=1, batch_size=4, workers=0, warmup_steps=1, chip_scale=0.9)
    csvs = [AGE_DATA / "aaf" / "labels.csv"]
    if (AGE_DATA / "fairface" / "labels.csv").exists():  # band labels train alongside exact ages
        csvs.append(AGE_DATA / "fairface" / "labels.csv")
    metrics = training.train_age(csvs, tmp_path / "out", config, max_photos=12, log=lambda _: None)
    weights = tmp_path / "out" / "age_finetuned.pt"
    assert weights.is_file() and (tmp_path / "out" / "metrics.json").is_file()
    net = load_age_net(weights)
    assert type(net) is ARCHITECTURES[arch]
    assert net.fc.out_features == config.max_age + 1
    assert int(net.chip_size) == config.chip_size  # the age stage cuts chips of the size trained on...
    assert float(net.chip_scale) == config.chip_scale  # ...and of the scale trained on
    assert metrics["history"][0]["train_loss"] > 0
    assert metrics["config"]["lr"] == training.ARCHITECTURE_DEFAULTS[arch]["lr"]  # the resolved recipe is recorded
    result = age_metrics(predict_ages(few_faces_csv(tmp_path, per_set=1), weights=str(weights)))
    assert result["n"] == 2


def test_lite0_network_survives_saving_and_folding(tmp_path):
    """A lite0 network written as fp16 and loaded with its batch norms folded predicts what it did in training."""
    torch.manual_seed(0)
    net = Lite0AgeNet(n_classes=101, chip_size=80, chip_scale=0.85)
    for module in net.modules():  # batch-norm statistics as training leaves them, not the identity of a new layer
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    net.eval()
    save_age_net(net, tmp_path / "lite.pt")
    loaded = load_age_net(tmp_path / "lite.pt")
    assert type(loaded) is Lite0AgeNet and int(loaded.chip_size) == 80 and float(loaded.chip_scale) == 0.85
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    chips = torch.randint(0, 256, (4, 3, 80, 80), dtype=torch.uint8)
    with torch.inference_mode():
        before, after = net(chips), loaded(chips)
    assert before.std() > 0.03  # logits that differ by class and chip, so a wrong fold shows
    np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-3)  # fp16 storage rounds the weights


def test_moving_average_averages_batch_norm_and_keeps_the_chip_geometry():
    """The saved network is the average of the trained one: its batch-norm statistics are averaged like its weights
    (statistics of the live weights would not match the averaged ones), and its constants are not rounded."""
    from colortrend.training.age import moving_average, update_average

    torch.manual_seed(0)
    net = Lite0AgeNet(n_classes=101, chip_size=48, chip_scale=0.85)
    ema = moving_average(net, decay=0.9)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(4):
        net.train()
        loss = net(torch.randint(0, 256, (8, 3, 48, 48), dtype=torch.uint8)).logsumexp(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_average(ema, net)
    live, averaged = net.encoder.blocks[5].expand.bn, ema.module.encoder.blocks[5].expand.bn
    assert not torch.allclose(averaged.running_var, live.running_var)
    assert not torch.allclose(ema.module.fc.weight, net.fc.weight)
    assert int(ema.module.chip_size) == 48 and float(ema.module.chip_scale) == 0.85
    assert torch.equal(ema.module.class_ages, net.class_ages)
