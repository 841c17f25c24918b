"""The correct and dominant stages on hand-built batches: a synthetic photo with garments of known colours, and a
real CCP photo whose ground-truth mask stands in for the parser."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from colortrend.color.kmeans import palettes
from colortrend.color.space import delta_e2000, rgb_to_lab
from colortrend.color.white_balance import apply_cast
from colortrend.models.parse_classes import LOWER, PARSE_CLASSES, UPPER, ccp_lookup
from colortrend.stages.correct import ColorSettings, CorrectStage
from colortrend.stages.dominant import COLUMNS, DominantStage
from colortrend.stages.segment import PARSER_WEIGHTS

CCP = Path(__file__).resolve().parents[1] / "../shared/data/parsing/ccp"
RED, NAVY, GREY = (170, 30, 40), (28, 34, 60), (128, 128, 128)
SKIN = PARSE_CLASSES.index("skin")


def synthetic_batch() -> dict[str, list]:
    """Photo 0: a grey scene with two people; the first wears a red top over navy trousers (upper 1,600 px, lower
    2,400 px), the second was not parsed. Photo 1 failed earlier in the pipeline."""
    rng = np.random.default_rng(0)
    image = np.full((200, 160, 3), GREY, np.float64)
    labels = np.zeros((110, 40), np.uint8)
    labels[:5] = SKIN
    labels[10:50], labels[50:110] = UPPER, LOWER
    image[60:100, 20:60] = RED
    image[100:160, 20:60] = NAVY
    image += rng.normal(0, 2, image.shape)
    photo = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return {
        "photo_id": ["a", "b"], "status": ["ok", "error"], "error": [None, "unreadable"],
        "image": [photo, None],
        "landmarks": [np.zeros((2, 10), np.float32), np.zeros((0, 10), np.float32)],
        "person_parse": [[(20, 50, labels), None], []],
    }


def test_correct_none_passes_the_photo_through():
    batch = CorrectStage(ColorSettings(white_balance="none"))(synthetic_batch())
    assert batch["image_wb"][0] is batch["image"][0]
    assert batch["wb_method"] == ["none", None]
    assert (batch["wb_gain_r"][0], batch["wb_gain_g"][0], batch["wb_gain_b"][0]) == (1.0, 1.0, 1.0)
    assert batch["image_wb"][1] is None


def test_correct_removes_a_cast_and_records_gains():
    batch = synthetic_batch()
    batch["image"][0] = apply_cast(batch["image"][0], (1.0, 0.85, 0.7))
    batch = CorrectStage(ColorSettings(white_balance="gray_world"))(batch)
    assert batch["wb_method"][0] == "gray_world"
    assert batch["wb_gain_b"][0] > batch["wb_gain_g"][0] > batch["wb_gain_r"][0]
    # The background is grey and (garments excluded) the only thing the estimate sees: it comes back grey.
    background = rgb_to_lab(batch["image_wb"][0][5:40, 100:150].reshape(-1, 3).mean(0))
    assert np.hypot(background[1], background[2]) < 1.5


def test_dominant_measures_each_person_and_part():
    batch = DominantStage(ColorSettings())(CorrectStage(ColorSettings(white_balance="none"))(synthetic_batch()))
    assert [len(batch[c][0]) for c in COLUMNS] == [2] * len(COLUMNS)
    assert all(batch[c][1] == [] for c in COLUMNS)
    assert all(batch[c][0][1] is None for c in COLUMNS)  # the unparsed person

    dominant = tuple(batch[f"dominant_{c}"][0][0] for c in "rgb")
    assert delta_e2000(rgb_to_lab(np.array(dominant, np.uint8)), rgb_to_lab(np.array(NAVY, np.uint8))) < 2
    assert batch["dominant_share"][0][0] == pytest.approx(0.6, abs=0.01)
    assert (batch["color_name"][0][0], batch["color_name_zh"][0][0]) == ("navy", "藏青")
    lab = [batch[f"dominant_lab_{c}"][0][0] for c in "lab"]
    assert lab == pytest.approx(rgb_to_lab(np.array(dominant, np.uint8)), abs=1.0)
    palette = batch["palette"][0][0]
    assert [p["share"] for p in palette] == pytest.approx([0.6, 0.4], abs=0.01)
    upper = tuple(batch[f"upper_{c}"][0][0] for c in "rgb")
    lower = tuple(batch[f"lower_{c}"][0][0] for c in "rgb")
    assert delta_e2000(rgb_to_lab(np.array([upper, lower], np.uint8)),
                       rgb_to_lab(np.array([RED, NAVY], np.uint8))) == pytest.approx([0, 0], abs=2)


def test_small_garment_parts_get_no_colour_of_their_own():
    settings = ColorSettings(white_balance="none", min_part_px=2000)
    batch = DominantStage(settings)(CorrectStage(settings)(synthetic_batch()))
    assert batch["upper_r"][0][0] is None and batch["lower_r"][0][0] is not None
    assert batch["dominant_r"][0][0] is not None


def test_dominant_columns_fit_the_declared_schema():
    batch = DominantStage(ColorSettings())(CorrectStage(ColorSettings())(synthetic_batch()))
    for field in DominantStage.garment_fields:
        values = [v for per_photo in batch[field.name] for v in per_photo]
        assert pa.array(values, type=field.type).type == field.type
    for field in CorrectStage.photo_fields:
        assert pa.array(batch[field.name], type=field.type).null_count == 1


def test_settings_are_validated_with_the_key_name():
    with pytest.raises(ValueError, match="^k:"):
        ColorSettings(k=0)
    with pytest.raises(ValueError, match="^max_gain:"):
        ColorSettings(max_gain=0.5)


@pytest.mark.skipif(not CCP.exists(), reason="needs ../shared/data/parsing/ccp")
def test_real_photo_matches_clustering_its_garment_pixels():
    """A CCP photo with its ground-truth labels as the person's parse: the stage measures exactly those pixels."""
    from PIL import Image

    image = np.asarray(Image.open(CCP / "images/0008.jpg").convert("RGB"))
    labels = ccp_lookup()[np.asarray(Image.open(CCP / "masks/0008.png"))]
    labels[labels == 255] = 0  # ambiguous classes: not garment
    batch = {"photo_id": ["0008"], "status": ["ok"], "error": [None], "image": [image],
             "landmarks": [np.zeros((1, 10), np.float32)], "person_parse": [[(0, 0, labels)]]}
    settings = ColorSettings(white_balance="none")
    batch = DominantStage(settings)(CorrectStage(settings)(batch))
    pixels = image[np.isin(labels, (UPPER, LOWER))]
    expected = palettes([pixels])[0]
    assert tuple(batch[f"dominant_{c}"][0][0] for c in "rgb") == tuple(int(v) for v in expected.dominant_rgb)
    assert batch["dominant_share"][0][0] == pytest.approx(expected.dominant_share)


@pytest.mark.skipif(not CCP.exists(), reason="needs ../shared/data/parsing/ccp")
def test_a_cuda_stages_torch_path_writes_the_cpu_rows():
    """The stages' torch path (what a cuda device runs; here on this CPU) against their numpy path, on two CCP
    photos under a cast with their ground-truth parses and the synthetic batch: the same rows within the stated
    tolerances (gains 1e-6 relative, dominant colours CIEDE2000 0.5, shares 0.01)."""
    from PIL import Image

    batch = synthetic_batch()
    for number in ("0016", "0024"):
        image = apply_cast(np.asarray(Image.open(CCP / f"images/{number}.jpg").convert("RGB")), (1.0, 0.85, 0.7))
        labels = ccp_lookup()[np.asarray(Image.open(CCP / f"masks/{number}.png"))]
        labels[labels == 255] = 0
        for key, value in [("photo_id", number), ("status", "ok"), ("error", None), ("image", image),
                           ("landmarks", np.zeros((0, 10), np.float32)), ("person_parse", [(0, 0, labels)])]:
            batch[key].append(value)
    settings = ColorSettings(white_balance="gray_world")

    def analyse(ops_device):
        correct, dominant = CorrectStage(settings), DominantStage(settings)
        correct.ops_device = dominant.ops_device = ops_device
        return dominant(correct({key: list(values) for key, values in batch.items()}))

    reference, ours = analyse(None), analyse("cpu")
    assert reference["wb_method"] == ours["wb_method"] == ["gray_world", None, "gray_world", "gray_world"]
    for c in "rgb":
        assert ours[f"wb_gain_{c}"][2:] == pytest.approx(reference[f"wb_gain_{c}"][2:], rel=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(ours["image_wb"], reference["image_wb"]) if a is not None)
    for i in (0, 2, 3):
        for j, measured in enumerate(reference["dominant_share"][i]):
            if measured is None:
                assert ours["dominant_share"][i][j] is None
                continue
            lab = [np.array([run[f"dominant_lab_{c}"][i][j] for c in "lab"]) for run in (ours, reference)]
            assert float(delta_e2000(*lab)) <= 0.5
            assert ours["dominant_share"][i][j] == pytest.approx(measured, abs=0.01)
            assert ours["color_name"][i][j] == reference["color_name"][i][j]


def test_color_metrics_scores_clear_photos_separately():
    from colortrend.evaluate.color import color_metrics, format_color_metrics

    rows = pd.DataFrame({
        "gt_lab_l": [50.0, 50.0, 50.0, 50.0, np.nan],
        "gt_share": [0.9, 0.8, 0.4, 0.7, np.nan],
        "delta_e": [1.0, 3.0, 20.0, np.nan, np.nan],  # the fourth photo was missed, the fifth has no garment
    })
    metrics = color_metrics(rows, clear_share=0.6)
    assert (metrics["n"], metrics["missed"], metrics["no_garment"]) == (3, 1, 1)
    assert metrics["median"] == 3.0 and metrics["mean"] == 8.0
    assert metrics["clear"] == {"median": 2.0, "p90": 2.8, "mean": 2.0, "n": 2, "missed": 1}
    assert "median 3.0" in format_color_metrics(metrics)


@pytest.mark.skipif(not CCP.exists(), reason="needs ../shared/data/parsing/ccp")
@pytest.mark.skipif(not PARSER_WEIGHTS.exists(), reason="the trained parser is not shipped yet")
def test_eval_color_on_validation_photos(tmp_path):
    """Photos the parser never trained on (CCP ids divisible by 8): the pipeline's colour of the main person lies
    near the ground truth's."""
    from colortrend.evaluate.color import predict_colors

    numbers = [f"{i:04d}" for i in range(8, 8 * 13, 8)]  # the first 12 validation photos
    labels = pd.DataFrame({"image": [str(CCP / f"images/{n}.jpg") for n in numbers],
                           "mask": [str(CCP / f"masks/{n}.png") for n in numbers]})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    table = predict_colors(tmp_path / "labels.csv")
    assert list(table["image"]) == list(labels["image"])
    scored = table.dropna(subset=["delta_e"])
    assert len(scored) >= 10
    # Outfits of several equal colours can flip their largest cluster; the median is robust to those few.
    assert scored["delta_e"].median() < 3
    clear = scored[scored["gt_share"] >= 0.5]  # one colour clearly dominates: the target population
    assert len(clear) >= 2 and clear["delta_e"].median() < 3
    assert (scored[["pred_r", "pred_g", "pred_b"]].to_numpy() <= 255).all()
