"""The person/garment parser on real photos: the segment stage, its multi-person handling and `eval parsing`."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from colortrend.evaluate.parsing import evaluate_parsing, main_person_labels, parsing_stages
from colortrend.labelled import analyse_labelled
from colortrend.models.parse_classes import GARMENT_CLASSES, ccp_lookup
from colortrend.models.parser_crops import crop_box
from colortrend.stages.segment import SegmentSettings

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "data" / "demo"
CCP = HERE.parent / ".." / "shared" / "data" / "parsing" / "ccp"
needs_ccp = pytest.mark.skipif(not (CCP / "labels.csv").exists(), reason="../shared/data/parsing/ccp not present")
#: Demo photos from CCP's validation split (never trained on) whose labels are in ../shared.
LABELLED = ("ccp_0008.jpg", "ccp_0016.jpg", "ccp_0024.jpg")


@pytest.fixture(scope="module")
def stages():
    return parsing_stages(DEMO / "labels.csv")


@pytest.fixture(scope="module")
def demo_batch(stages):
    return analyse_labelled(stages, [str(DEMO / name) for name in LABELLED])


def ccp_mask(photo_name: str) -> np.ndarray:
    """CCP label ids of a demo photo (``ccp_0008.jpg`` -> ``masks/0008.png``)."""
    return cv2.imread(str(CCP / "masks" / photo_name.removeprefix("ccp_").replace(".jpg", ".png")), -1)


def garment_iou(pred: np.ndarray, ccp_ids: np.ndarray) -> float:
    truth = ccp_lookup()[ccp_ids]
    scored = truth != 255
    p, t = np.isin(pred, GARMENT_CLASSES) & scored, np.isin(truth, GARMENT_CLASSES)
    return (p & t).sum() / (p | t).sum()


def test_clothed_person_is_parsed_inside_their_box(demo_batch):
    geometry = SegmentSettings().geometry
    for i in range(len(LABELLED)):
        face = int(np.argmax(demo_batch["box_x2"][i] - demo_batch["box_x1"][i]))
        x0, y0, labels = demo_batch["person_parse"][i][face]
        x1, y1 = x0 + labels.shape[1], y0 + labels.shape[0]
        # The mask lies in the photo and in the crop cut around this face, and the person box is its extent.
        height, width = demo_batch["image"][i].shape[:2]
        cx1, cy1, cx2, cy2 = crop_box([demo_batch[f"box_{c}"][i][face] for c in ("x1", "y1", "x2", "y2")], geometry)
        assert max(0, cx1) <= x0 < x1 <= min(width, cx2) and max(0, cy1) <= y0 < y1 <= min(height, cy2)
        person_box = [demo_batch[f"person_{c}"][i][face] for c in ("x1", "y1", "x2", "y2")]
        assert person_box == [x0, y0, x1, y1]
        # A street-fashion photo: clothes cover a good part of the frame.
        assert demo_batch["clothing_px"][i][face] > 0.1 * height * width
        assert demo_batch["clothing_px"][i][face] == demo_batch["upper_px"][i][face] + demo_batch["lower_px"][i][face]


@needs_ccp
def test_garments_match_the_labels(demo_batch):
    for i, name in enumerate(LABELLED):
        iou = garment_iou(main_person_labels(demo_batch, i), ccp_mask(name))
        assert iou > 0.8, (name, iou)


@needs_ccp
def test_half_body_photos_are_parsed(stages, tmp_path):
    """The top of a street photo stands in for a half-body selfie: the crop runs past the photo's bottom edge."""
    paths, truths = [], []
    for name in LABELLED[:2]:
        photo = cv2.imread(str(DEMO / name))
        top = int(0.45 * photo.shape[0])
        cv2.imwrite(str(tmp_path / name), photo[:top])
        paths.append(str(tmp_path / name))
        truths.append(ccp_mask(name)[:top])
    batch = analyse_labelled(stages, paths)
    for i, truth in enumerate(truths):
        assert garment_iou(main_person_labels(batch, i), truth) > 0.85


def test_two_people_in_one_photo_get_separate_masks(stages, tmp_path):
    left, right = (cv2.imread(str(DEMO / name)) for name in LABELLED[:2])
    height = min(left.shape[0], right.shape[0])
    pair = tmp_path / "pair.jpg"
    cv2.imwrite(str(pair), np.concatenate([left[:height], right[:height]], axis=1))
    batch = analyse_labelled(stages, [str(pair)])
    boxes = np.stack([batch[f"box_{c}"][0] for c in ("x1", "y1", "x2", "y2")], axis=1)
    width = left.shape[1]
    owned = np.zeros((height, 2 * width), np.int32)
    for side in (0, 1):  # the largest face on each half is that photo's person
        on_side = np.flatnonzero(((boxes[:, 0] + boxes[:, 2]) / 2 >= width) == bool(side))
        face = on_side[np.argmax(boxes[on_side, 2] - boxes[on_side, 0])]
        x0, y0, labels = batch["person_parse"][0][face]
        garments = np.zeros_like(owned, dtype=bool)
        garments[y0:y0 + labels.shape[0], x0:x0 + labels.shape[1]] = np.isin(labels, GARMENT_CLASSES)
        owned[y0:y0 + labels.shape[0], x0:x0 + labels.shape[1]] += labels > 0
        # Each person's clothes lie on their own half of the photo.
        assert garments[:, side * width:(side + 1) * width].sum() > 0.97 * garments.sum() > 0
    assert owned.max() == 1  # no pixel belongs to both


def test_the_torch_mapping_a_gpu_runs_gives_the_opencv_parses(stages, tmp_path):
    # What segment does on a cuda device (probabilities mapped onto the photo and reduced there), here on this CPU,
    # against the OpenCV path on the same parser outputs: a single person, a group of two, and a face whose crop
    # runs past the photo's edge.
    left, right = (cv2.imread(str(DEMO / name)) for name in LABELLED[:2])
    height = min(left.shape[0], right.shape[0])
    pair = tmp_path / "pair.jpg"
    cv2.imwrite(str(pair), np.concatenate([left[:height], right[:height]], axis=1))
    half = tmp_path / "half.jpg"
    cv2.imwrite(str(half), cv2.imread(str(DEMO / LABELLED[2]))[: left.shape[0] // 2])
    segment = stages[-1]
    before = analyse_labelled(stages[:-1], [str(DEMO / LABELLED[0]), str(pair), str(half)])
    runs = {}
    for ops_device in (None, "cpu"):
        segment.ops_device = ops_device
        runs[ops_device] = segment({k: list(v) for k, v in before.items()})
    segment.ops_device = None
    compared = 0
    for opencv, torch_path in zip(runs[None]["person_parse"], runs["cpu"]["person_parse"]):
        assert [p is None for p in opencv] == [p is None for p in torch_path]
        for a, b in zip(opencv, torch_path):
            if a is None:
                continue
            canvas = [np.zeros((4000, 4000), np.uint8) for _ in range(2)]
            for c, (x0, y0, labels) in zip(canvas, (a, b)):
                c[y0:y0 + labels.shape[0], x0:x0 + labels.shape[1]] = labels
            union = (canvas[0] > 0) | (canvas[1] > 0)
            assert (canvas[0] == canvas[1])[union].mean() > 0.995  # ties of the bilinear weights aside
            compared += 1
    assert compared >= 4
    for column in ("clothing_px", "upper_px", "lower_px"):
        for a, b in zip(runs[None][column], runs["cpu"][column]):
            assert np.allclose(a, b, rtol=0.01, atol=20)


@needs_ccp
def test_eval_parsing_scores_and_writes_masks(tmp_path):
    labels = pd.read_csv(CCP / "labels.csv")
    rows = labels[labels["image"].isin([f"images/{n.removeprefix('ccp_')}" for n in LABELLED])]
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image": [str((CCP / p).resolve()) for p in rows["image"]],
                  "mask": [str((CCP / p).resolve()) for p in rows["mask"]]}).to_csv(csv, index=False)
    masks = tmp_path / "masks"
    metrics = evaluate_parsing(csv, save_masks_dir=masks)
    assert metrics["n"] == 3 and metrics["missed"] == 0
    assert metrics["iou"] > 0.8 and metrics["precision"] > 0.85 and metrics["recall"] > 0.85
    assert set(metrics["iou_by_class"]) == {"background", "skin", "hair", "upper", "lower", "shoes", "accessory"}
    for image in rows["image"]:
        written = cv2.imread(str(masks / Path(image).with_suffix(".png").name), cv2.IMREAD_UNCHANGED)
        photo = cv2.imread(str(CCP / image))
        assert written.shape == photo.shape[:2] and set(np.unique(written)) == {0, 255}


def test_crops_cut_on_the_device_are_the_crops_cut_by_opencv():
    # The parser's inputs as a GPU host cuts them (torch, here on this CPU) against OpenCV's: faces shrunk into the
    # crop, enlarged into it, and boxes running past every edge of the photo, which keep the grey pad.
    # OpenCV's own weights, so codes differ by its fixed-point rounding only.
    from colortrend.models.parser_crops import cut_crop
    from colortrend.models.parser_net import cut_crops_on_device

    geom = SegmentSettings().geometry
    image = cv2.cvtColor(cv2.imread(str(DEMO / LABELLED[0])), cv2.COLOR_BGR2RGB)
    height, width = image.shape[:2]
    faces = [(0.4 * width, 0.1 * height, 0.6 * width, 0.25 * height),  # shrunk
             (0.45 * width, 0.3 * height, 0.5 * width, 0.33 * height),  # enlarged: a small face's crop
             (-30.5, -20.25, 90.0, 100.0), (width - 60.0, height - 50.0, width + 40.0, height + 70.0)]
    boxes = [crop_box(np.array(face), geom) for face in faces]
    on_device = cut_crops_on_device([image], [0] * len(boxes), boxes, geom, "cpu").numpy()
    for box, crop in zip(boxes, on_device):
        expected = cut_crop(image, box, geom)
        difference = np.abs(crop.astype(int) - expected.astype(int))
        assert difference.max() <= 1 and difference.mean() < 0.2, box  # OpenCV's fixed-point rounding
        assert ((expected == 127).all(-1) == (crop == 127).all(-1)).mean() > 0.99  # the same padded area
