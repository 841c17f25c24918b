"""The batched MTCNN detector and the detect stage, on the demo photos (CCP street shots, one main person each)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from colortrend.models.mtcnn import Detections, FaceDetector
from colortrend.stages.detect import DetectSettings, DetectStage


def rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(box_iou(torch.from_numpy(a[None]), torch.from_numpy(b[None]))[0, 0])


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def photos(demo_photos) -> list[np.ndarray]:
    return [rgb(p) for p in demo_photos]


@pytest.fixture(scope="module")
def found(detector, photos) -> list[Detections]:
    return detector.detect(photos)


def test_finds_the_main_person_in_nearly_every_demo_photo(found, photos):
    assert len(photos) == 37
    strong = [d.boxes[d.scores >= 0.9] for d in found]
    assert sum(len(boxes) > 0 for boxes in strong) >= 36
    # The main person's face is the biggest strong one, and CCP shoots people whole: it sits in the upper half.
    for boxes, image in zip(strong, photos):
        if len(boxes):
            biggest = boxes[np.argmax(boxes[:, 2] - boxes[:, 0])]
            assert biggest[3] < image.shape[0] / 2


def test_boxes_landmarks_and_order_are_consistent(found, photos):
    for d, image in zip(found, photos):
        h, w = image.shape[:2]
        assert d.boxes.dtype == d.scores.dtype == d.landmarks.dtype == np.float32
        assert d.boxes.shape == (len(d), 4) and d.landmarks.shape == (len(d), 5, 2)
        assert (np.diff(d.scores) <= 0).all() and ((d.scores > 0.7) & (d.scores <= 1)).all()
        strong = d.scores >= 0.9
        boxes, points = d.boxes[strong], d.landmarks[strong]
        assert (boxes[:, :2] >= -1).all() and (boxes[:, 2] <= w + 1).all() and (boxes[:, 3] <= h + 1).all()
        assert ((boxes[:, 2] - boxes[:, 0]) >= 20).all()
        # Landmarks: inside their box, eyes above nose above mouth, left (in the image) before right.
        assert (points >= boxes[:, None, :2] - 2).all() and (points <= boxes[:, None, 2:] + 2).all()
        eyes_y, nose_y, mouth_y = points[:, :2, 1].max(axis=1), points[:, 2, 1], points[:, 3:, 1].min(axis=1)
        assert (eyes_y < nose_y).all() and (nose_y < mouth_y).all()
        assert (points[:, 0, 0] < points[:, 1, 0]).all() and (points[:, 3, 0] < points[:, 4, 0]).all()


def test_no_face_in_flat_colour_or_noise(detector):
    rng = np.random.default_rng(0)
    blank = np.full((480, 640, 3), (120, 160, 200), np.uint8)
    noise = rng.integers(0, 256, (600, 400, 3), dtype=np.uint8)
    tiny = np.full((8, 8, 3), 90, np.uint8)  # smaller than any face the detector searches
    assert [len(d) for d in detector.detect([blank, noise, tiny])] == [0, 0, 0]
    assert [len(d) for d in detector.detect([tiny])] == [0]
    assert detector.detect([]) == []


def test_a_face_cut_by_the_photo_edge_is_found_whole(detector, photos, found):
    """Crops reaching outside the photo read black (as in the original MTCNN), not a stretched inside part."""
    for image, whole in zip(photos[:4], found[:4]):
        _, y1, _, y2 = whole.boxes[0]
        cut = int(y1 + 0.2 * (y2 - y1))  # the top fifth of the face is cut off
        result = detector.detect([np.ascontiguousarray(image[cut:])])[0]
        assert result.scores[0] >= 0.9
        box = result.boxes[0] + np.float32([0, cut, 0, cut])
        assert iou(box, whole.boxes[0]) > 0.7 and box[1] < cut


def test_a_batch_of_mixed_sizes_finds_what_each_photo_alone_finds(detector, photos, found):
    """Shrunk, padded to landscape, oversized (beyond max_side) and untouched photos share one call."""
    base = photos[:4]
    mixed = [
        cv2.resize(base[0], None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA),
        cv2.copyMakeBorder(base[1], 40, 0, 100, 600, cv2.BORDER_CONSTANT, value=(30, 30, 30)),
        cv2.resize(base[2], None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC),  # detected downscaled to 1280
        base[3],
    ]
    assert mixed[1].shape[1] > mixed[1].shape[0] and max(mixed[2].shape) > 1280
    expected = [
        found[0].boxes[0] * 0.75,
        found[1].boxes[0] + np.float32([100, 40, 100, 40]),
        found[2].boxes[0] * 3,
        found[3].boxes[0],
    ]
    # Resizing moves the cascade's answer by a few pixels (facenet's too), so the same face overlaps by > 0.7 only.
    for result, box in zip(detector.detect(mixed), expected):
        assert iou(result.boxes[0], box) > 0.7
    # An unchanged photo gives the same answer in any company.
    alone = detector.detect([base[3]])[0]
    np.testing.assert_allclose(alone.boxes, found[3].boxes, atol=1e-3)
    np.testing.assert_allclose(alone.landmarks, found[3].landmarks, atol=1e-3)


def test_results_do_not_depend_on_the_batch_layout(detector, photos):
    """A run resumed with other batches must equal a clean run: batched as 4 + 2 or one by one, the same faces."""
    batched = detector.detect(photos[:4]) + detector.detect(photos[4:6])
    for k, together in enumerate(batched):
        alone = detector.detect([photos[k]])[0]
        assert len(together) == len(alone) > 0, k
        np.testing.assert_allclose(together.boxes, alone.boxes, atol=1e-3, err_msg=f"photo {k}")
        np.testing.assert_allclose(together.scores, alone.scores, atol=1e-3, err_msg=f"photo {k}")
        np.testing.assert_allclose(together.landmarks, alone.landmarks, atol=1e-3, err_msg=f"photo {k}")


def test_the_pyramid_made_on_the_device_finds_the_faces_the_host_path_finds(photos, found):
    """A GPU host resamples the pyramid with torch instead of OpenCV and runs the networks in large calls (here on
    the CPU): only OpenCV's fixed-point rounding differs, which tips a borderline candidate now and then, as fp16
    does; the faces stay the same."""
    on_device = FaceDetector()
    on_device.use_device_paths(True)
    strong = [(k, i) for k, d in enumerate(found) for i in np.flatnonzero(d.scores >= 0.9)]
    overlaps, landmark_px = [], []
    for k, result in enumerate(on_device.detect(photos)):
        for i in np.flatnonzero(found[k].scores >= 0.9):
            best = max(range(len(result)), key=lambda j: iou(found[k].boxes[i], result.boxes[j]), default=None)
            overlaps.append(0.0 if best is None else iou(found[k].boxes[i], result.boxes[best]))
            if best is not None:
                landmark_px.append(np.abs(found[k].landmarks[i] - result.landmarks[best]).mean())
    assert len(overlaps) == len(strong) >= 36
    assert sum(o > 0.7 for o in overlaps) >= len(strong) - 1
    assert np.median(overlaps) > 0.9 and np.median(landmark_px) < 1.0


def test_agrees_with_facenet_pytorch(photos, found):
    """Same networks, different resizing: about as close as facenet is to itself on the photo shifted by 1 px."""
    from facenet_pytorch import MTCNN

    reference = MTCNN(min_face_size=40, select_largest=False)
    landmark_px = []
    for k in range(6):
        boxes, scores, points = reference.detect(photos[k], landmarks=True)
        top = int(np.argmax(scores))
        theirs = boxes[top].astype(np.float32) - np.float32([1, 1, 0, 0])  # facenet's x1, y1 are 1-based
        assert iou(found[k].boxes[0], theirs) > 0.7
        assert abs(found[k].scores[0] - scores[top]) < 0.1
        landmark_px.append(np.linalg.norm(found[k].landmarks[0] - np.asarray(points[top], np.float32), axis=1).mean())
    assert max(landmark_px) < 5.0 and np.mean(landmark_px) < 2.5


def test_stage_writes_columns_and_isolates_a_failing_photo(photos):
    stage = DetectStage(DetectSettings(max_faces=1), "cpu")
    batch = {
        "status": ["ok", "error", "ok", "ok"],
        "error": [None, "cannot read file", None, None],
        "image": [photos[0], None, np.zeros((30, 40), np.uint8), np.full((300, 200, 3), 77, np.uint8)],
    }
    out = stage(batch)
    assert out["status"] == ["ok", "error", "error", "ok"]
    assert "face detection failed" in out["error"][2] and out["error"][1] == "cannot read file"
    assert out["n_faces"] == [1, 0, 0, 0]
    for name in ("face_idx", "box_x1", "box_y1", "box_x2", "box_y2", "det_score"):
        assert [len(v) for v in out[name]] == [1, 0, 0, 0]
    assert out["landmarks"][0].shape == (1, 10) and out["landmarks"][2].shape == (0, 10)
    assert out["det_score"][0][0] >= 0.9 and out["face_idx"][0].tolist() == [0]
    assert set(stage.face_fields.names) <= set(out) and set(stage.photo_fields.names) <= set(out)
    assert len(stage.model_files()) == 3 and len(stage.fingerprint()) == 16


def test_faces_that_fill_the_frame_are_found_by_the_retry_inside_a_border(photos, found):
    # Tight crops (the face box, 10 % inset: chin and forehead cut off), like close selfies and FairFace crops.
    crops, centres = [], []
    for image, faces in zip(photos, found):
        if not len(faces):
            continue
        x1, y1, x2, y2 = faces.boxes[0]
        dx, dy = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
        top, left = int(max(0, y1 + dy)), int(max(0, x1 + dx))
        crops.append(np.ascontiguousarray(image[top:int(y2 - dy), left:int(x2 - dx)]))
        centres.append(((x1 + x2) / 2 - left, (y1 + y2) / 2 - top))

    def detect(border):
        stage = DetectStage(DetectSettings(retry_border=border), "cpu")
        return stage({"status": ["ok"] * len(crops), "error": [None] * len(crops), "image": list(crops)})

    plain, retried = detect(0.0), detect(0.25)
    found_plain = sum(n > 0 for n in plain["n_faces"])
    found_retried = sum(n > 0 for n in retried["n_faces"])
    assert found_retried >= found_plain + 0.2 * len(crops)
    for k, n in enumerate(retried["n_faces"]):
        if n and not plain["n_faces"][k]:  # found in the border, reported in the crop's own pixels
            x1, y1, x2, y2 = (retried[c][k][0] for c in ("box_x1", "box_y1", "box_x2", "box_y2"))
            assert x1 < centres[k][0] < x2 and y1 < centres[k][1] < y2
    with pytest.raises(ValueError, match="retry_border"):
        DetectSettings(retry_border=2.0)


def test_our_mtcnn_networks_are_facenet_pytorchs():
    """The P-, R- and O-Net defined in colortrend load facenet-pytorch's weights and compute what its own do."""
    import torch
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    from colortrend.models.mtcnn_nets import pretrained

    torch.manual_seed(0)
    inputs = {"pnet": torch.rand(2, 3, 40, 56), "rnet": torch.rand(5, 3, 24, 24), "onet": torch.rand(5, 3, 48, 48)}
    with torch.inference_mode():
        for ours, theirs, name in zip(pretrained(), (PNet().eval(), RNet().eval(), ONet().eval()), inputs):
            for a, b in zip(ours(inputs[name]), theirs(inputs[name])):
                assert torch.equal(a, b), name


def test_detecting_faces_imports_no_torchvision_package():
    """torchvision's Python package costs about 1.4 s to import (all its models); the detector needs only its NMS."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from colortrend.models.mtcnn import FaceDetector;"
            "FaceDetector().detect([np.zeros((64, 64, 3), np.uint8)]);"
            "print(sorted(m for m in ('torchvision', 'facenet_pytorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
