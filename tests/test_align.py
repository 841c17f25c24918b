"""Chip geometry and face quality measures of the align stage."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from colortrend.stages.align import (
    CHIP_SIZE,
    AlignSettings,
    AlignStage,
    chip_template,
    chip_transform,
    cut_chips,
    face_size_px,
    filter_reasons,
    sharpness,
    transform_scale,
    yaw_proxy,
)

AAF = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "age" / "aaf"
needs_aaf = pytest.mark.skipif(not (AAF / "labels.csv").exists(), reason="../shared/data/age/aaf not present")


def place(template: np.ndarray, angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """The template moved into a photo by a known similarity."""
    a = math.radians(angle_deg)
    rotation = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return template @ rotation.T + np.array(shift)


def test_template_is_left_right_symmetric_and_inside_the_chip():
    """Flipping a chip left-right (a training augmentation) gives a chip of the same template."""
    t = chip_template()
    centre = t[:, 0].mean()
    mirrored = np.stack([2 * centre - t[[1, 0, 2, 4, 3], 0], t[[1, 0, 2, 4, 3], 1]], axis=1)
    assert np.abs(mirrored - t).max() < 0.05
    assert abs(centre - CHIP_SIZE / 2) < 0.5
    assert (t > 0).all() and (t < CHIP_SIZE).all()


def test_chip_transform_inverts_a_known_similarity():
    photo_points = place(chip_template(), angle_deg=17.0, scale=3.5, shift=(120.0, 80.0))
    matrix = chip_transform(photo_points)
    back = photo_points @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(back, chip_template(), atol=1e-9)
    assert transform_scale(matrix) == pytest.approx(1 / 3.5)


def test_pyramid_keeps_large_and_small_copies_of_a_face_alike():
    """A face 4x larger in the photo gives (almost) the same chip: the pyramid removes aliasing, not detail."""
    rng = np.random.default_rng(0)
    small = cv2.resize(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), (200, 200), interpolation=cv2.INTER_CUBIC)
    large = cv2.resize(small, (800, 800), interpolation=cv2.INTER_CUBIC)
    points = place(chip_template(), angle_deg=5.0, scale=2.5, shift=(30.0, 25.0))
    chip_small = cut_chips(small, points[None])[0].astype(float)
    # Pixel centres: x in the 4x copy is 4 x + 1.5.
    chip_large = cut_chips(large, points[None] * 4 + 1.5)[0].astype(float)
    assert np.abs(chip_small - chip_large).mean() < 3.0  # a plain bilinear warp of the large copy gives 10.6


def test_the_device_pyramid_is_opencvs_exactly():
    import torch

    from colortrend.stages.align import _pyr_down

    rng = np.random.default_rng(3)
    for shape in [(2, 2), (2, 7), (3, 5), (8, 8), (33, 64), (101, 57)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        np.testing.assert_array_equal(_pyr_down(torch.from_numpy(image).int()).numpy(), cv2.pyrDown(image))


def test_chips_cut_on_the_device_are_opencvs():
    """Faces small and large (from none to three pyramid levels), turned, past the photo's edge and outside it, from
    two photos at once: within one code of OpenCV's chips, nearly all pixels identical."""
    import torch

    from colortrend.stages.align import cut_chips_on_device

    rng = np.random.default_rng(4)
    photos = [cv2.resize(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), (800, 600), interpolation=cv2.INTER_CUBIC),
              rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)]
    faces = [(0, place(chip_template(), 0.0, 1.0, (2000.0, 2000.0)))]  # entirely outside: black
    for scale, angle, shift in [(0.8, 0.0, (300, 200)), (2.5, 12.0, (100, 50)), (6.0, -20.0, (20, 10)),
                                (11.0, 5.0, (-300, -100)), (1.5, 40.0, (550, 400))]:
        faces += [(p, place(chip_template(), angle, scale, shift)) for p in (0, 1)]
    copies = [torch.from_numpy(p) for p in photos]
    for size, chip_scale in [(64, 1.0), (96, 0.8), (112, 1.25)]:
        ours = cut_chips_on_device(copies, faces, size, chip_scale).numpy()
        reference = np.concatenate([cut_chips(photos[p], points[None], size, scale=chip_scale) for p, points in faces])
        difference = np.abs(ours.astype(int) - reference)
        assert difference.max() <= 1 and (difference == 0).mean() > 0.999
        assert ours[0].max() == 0


def test_chip_outside_the_photo_is_black():
    image = np.full((100, 100, 3), 200, np.uint8)
    points = place(chip_template(), 0.0, 1.0, (1000.0, 1000.0))
    assert cut_chips(image, points[None]).max() == 0


def test_quality_measures_follow_the_geometry():
    frontal = place(chip_template(), angle_deg=30.0, scale=2.0, shift=(50.0, 60.0))
    assert abs(yaw_proxy(frontal)[0]) < 0.02  # roll does not read as yaw
    turned = frontal.copy()
    eye_axis = (frontal[1] - frontal[0]) / np.linalg.norm(frontal[1] - frontal[0])
    turned[2] += 0.3 * np.linalg.norm(frontal[1] - frontal[0]) * eye_axis  # nose towards the right eye
    assert yaw_proxy(turned)[0] > 0.5
    assert face_size_px(frontal * 3)[0] == pytest.approx(3 * face_size_px(frontal)[0])
    settings = AlignSettings(min_face_px=50, min_sharpness=10, max_yaw=0.5, min_score=0.9)
    reasons = filter_reasons(
        settings,
        face_px=np.array([40, 80, 80, 80, 80]),
        sharp=np.array([50, 5, 50, 50, 50]),
        yaw=np.array([0, 0, -0.7, 0, 0]),
        score=np.array([1, 1, 1, 0.5, 0.99]),
    )
    assert reasons == ["small", "blurred", "pose", "low_score", None]


def test_sharpness_drops_with_blur_and_ignores_black_padding():
    rng = np.random.default_rng(2)
    chip = cv2.resize(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), (64, 64), interpolation=cv2.INTER_CUBIC)
    blurred = cv2.GaussianBlur(chip, (0, 0), 2)
    framed = blurred.copy()
    framed[:8], framed[:, :8] = 0, 0  # a face at the photo's corner: black outside the photo
    sharp, soft, soft_framed = sharpness(np.stack([chip, blurred, framed]))
    assert sharp > 3 * soft
    assert soft_framed == pytest.approx(soft)


def test_align_stage_columns_per_photo():
    rng = np.random.default_rng(1)
    image = cv2.resize(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8), (300, 300), interpolation=cv2.INTER_NEAREST)
    faces = np.stack([place(chip_template(), 0, 2.0, (40, 40)), place(chip_template(), 10, 1.0, (150, 160))])
    batch = {
        "status": ["ok", "error", "ok"],
        "error": [None, "cannot decode", None],
        "image": [image, None, image],
        "landmarks": [faces.reshape(2, 10).astype(np.float32), np.zeros((0, 10)), np.zeros((0, 10), np.float32)],
        "det_score": [np.array([0.99, 0.5], np.float32), np.zeros(0), np.zeros(0, np.float32)],
    }
    out = AlignStage()(batch)
    assert "chips" not in out  # the chip is align's own measuring tool: the age stage cuts its networks' chips
    assert out["face_px"][0][0] == pytest.approx(2 * out["face_px"][0][1], rel=1e-4)
    assert out["filter_reason"][0][1] == "low_score"
    for field in AlignStage.face_fields.names:
        assert len(out[field][0]) == 2 and len(out[field][1]) == 0


@needs_aaf
def test_training_and_inference_cut_the_same_chip(tmp_path, monkeypatch):
    """The chip `train age` learns from is the chip the age stage feeds each network, bit for bit, at the chip
    size and scale stored with its weights."""
    from colortrend.models.age_net import AgeNet, save_age_net
    from colortrend.config import default_config
    from colortrend.labelled import LABELLED_MIN_FACE_PX, analyse_labelled, read_age_labels
    from colortrend.pipeline import build_stages
    from colortrend.stages.age import AgeSettings, AgeStage
    from colortrend.training import age as training

    monkeypatch.setattr(training, "CACHE_DIR", tmp_path)
    labels = read_age_labels(AAF / "labels.csv").iloc[[10, 4000]].reset_index(drop=True)
    landmarks = training.detect_landmarks(labels, "cpu", LABELLED_MIN_FACE_PX, log=lambda _: None)
    cfg = default_config(".", device="cpu", detect={"min_face_px": LABELLED_MIN_FACE_PX})
    pipeline = analyse_labelled(build_stages(cfg, "cpu", upto="align"), labels["file"].tolist())
    odd = tmp_path / "odd.pt"  # a network trained on 80-px chips that show more of the head
    save_age_net(AgeNet(chip_size=80, chip_scale=0.85), odd)
    age = AgeStage(AgeSettings(weights=("default", "dlib", str(odd))))
    age.setup()
    # dlib's network read the aligner's 64-px chips; the saved geometry comes back exactly (not rounded to fp16).
    assert age.chip_geometry[-2:] == [(CHIP_SIZE, 1.0), (80, 0.85)]

    for size, scale in set(age.chip_geometry):
        inference_chips = age.chips(pipeline, [0, 1], size, scale)
        assert inference_chips.shape == (2, size, size, 3)
        expected = training.validation_chips(labels["file"], landmarks, size, scale)
        np.testing.assert_array_equal(expected, inference_chips)
