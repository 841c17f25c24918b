"""Compare colortrend's batched MTCNN with facenet-pytorch's own detect loop: speed and agreement on the same photos.

    python scripts/bench_detect.py --min-face 20 --limit 100 ../shared/data/parsing/ccp/images

Both detectors run in this process on the same decoded photos (decoding is not timed), alternately for --rounds
rounds; the best round of each is reported, since other processes on a shared machine only ever slow a round down.
Agreement: a face of ours matches a facenet face when each is the other's best overlap with IoU > 0.5; for matched
faces the IoU and the mean distance between corresponding landmarks are reported. facenet reports x1 and y1 1-based,
so 1 is subtracted from them first (colortrend's boxes are continuous, see colortrend.models.mtcnn). --noise-floor
also compares facenet with itself on every photo shifted by one pixel (first row and column cut off): how much the
cascade's answer moves under a perturbation far smaller than any resize difference.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

from colortrend.models.mtcnn import Detections, FaceDetector


def load_photos(paths: list[str], limit: int | None) -> list[np.ndarray]:
    """RGB photos under ``paths``; ``limit`` of them evenly spaced in path order (AAF's paths sort by age)."""
    files = sorted(
        f
        for p in map(Path, paths)
        for f in (p.rglob("*") if p.is_dir() else [p])
        if f.suffix.lower() in (".jpg", ".png")
    )
    if limit is not None and limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]


def facenet_detect(mtcnn, images: list[np.ndarray]) -> list[Detections]:
    """facenet-pytorch's loop, one photo at a time (it batches only equal sizes), as colortrend Detections."""
    out = []
    for image in images:
        boxes, scores, points = mtcnn.detect(image, landmarks=True)
        if boxes is None:
            boxes, scores, points = np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
        order = np.argsort(-np.asarray(scores, np.float32))
        boxes = np.asarray(boxes, np.float32)[order] - np.float32([1, 1, 0, 0])
        out.append(Detections(boxes, np.asarray(scores, np.float32)[order], np.asarray(points, np.float32)[order]))
    return out


def agreement(ours: list[Detections], theirs: list[Detections], min_score: float) -> dict:
    """Face counts, mutual-best IoU > 0.5 matches and landmark distances, over faces scoring >= min_score."""
    counts = {"ours": 0, "facenet": 0, "matched": 0, "photos_with_face": 0, "top_face_found": 0}
    landmark_px, ious = [], []
    for a, b in zip(ours, theirs):
        a_keep, b_keep = a.scores >= min_score, b.scores >= min_score
        counts["ours"] += int(a_keep.sum())
        counts["facenet"] += int(b_keep.sum())
        if not b_keep.any():
            continue
        counts["photos_with_face"] += 1
        if not a_keep.any():
            continue
        iou = box_iou(torch.from_numpy(a.boxes[a_keep]), torch.from_numpy(b.boxes[b_keep])).numpy()
        counts["top_face_found"] += int(iou[:, 0].max() > 0.5)  # facenet's best-scoring face
        for i, j in enumerate(iou.argmax(axis=1)):
            if iou[i, j] > 0.5 and iou[:, j].argmax() == i:
                counts["matched"] += 1
                ious.append(iou[i, j])
                dist = np.linalg.norm(a.landmarks[a_keep][i] - b.landmarks[b_keep][j], axis=1)
                landmark_px.append(dist.mean())
    lm = np.array(landmark_px) if landmark_px else np.zeros(1)
    return {
        **counts,
        "iou_median": round(float(np.median(ious)), 3) if ious else None,
        "landmark_px_mean": round(float(lm.mean()), 2),
        "landmark_px_median": round(float(np.median(lm)), 2),
        "landmark_px_p95": round(float(np.percentile(lm, 95)), 2),
    }


def best_rate(fn, n: int, rounds: int) -> tuple[float, list]:
    """Photos per second of the fastest of ``rounds`` calls of ``fn``, and that call's result."""
    best, result = 0.0, []
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        best = max(best, n / (time.perf_counter() - start))
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="photo files or folders (searched recursively for .jpg/.png)")
    parser.add_argument("--min-face", type=int, default=40)
    parser.add_argument("--limit", type=int, default=None, help="use N photos, evenly spaced in path order")
    parser.add_argument("--batch", type=int, default=32, help="photos per FaceDetector.detect call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-facenet-timing", action="store_true", help="run facenet once, for agreement only")
    parser.add_argument("--noise-floor", action="store_true", help="also compare facenet with itself, shifted 1 px")
    args = parser.parse_args()

    from facenet_pytorch import MTCNN

    torch.set_num_threads(args.threads)
    images = load_photos(args.paths, args.limit)
    if not images:
        parser.error(f"no .jpg/.png photos under {' '.join(args.paths)}")
    ours_detector = FaceDetector(device=args.device, min_face_px=args.min_face)
    facenet = MTCNN(min_face_size=args.min_face, device=args.device, select_largest=False)
    ours_detector.detect(images[:2]), facenet_detect(facenet, images[:2])  # warm-up

    def run_ours() -> list[Detections]:
        return [d for i in range(0, len(images), args.batch) for d in ours_detector.detect(images[i : i + args.batch])]

    ours_rate, ours = best_rate(run_ours, len(images), args.rounds)
    facenet_rounds = 1 if args.skip_facenet_timing else args.rounds
    facenet_rate, theirs = best_rate(lambda: facenet_detect(facenet, images), len(images), facenet_rounds)
    sizes = {f"{im.shape[1]}x{im.shape[0]}" for im in images}
    report = {
        "photos": len(images),
        "sizes": sorted(sizes)[:5] + (["..."] if len(sizes) > 5 else []),
        "min_face": args.min_face,
        "threads": args.threads,
        "device": args.device,
        "ours_photos_per_s": round(ours_rate, 2),
        "facenet_photos_per_s": None if args.skip_facenet_timing else round(facenet_rate, 2),
        "all_faces": agreement(ours, theirs, 0.0),
        "faces_score_ge_0.9": agreement(ours, theirs, 0.9),
        "photos_without_face_score_ge_0.9": {
            "ours": sum(not (d.scores >= 0.9).any() for d in ours),
            "facenet": sum(not (d.scores >= 0.9).any() for d in theirs),
        },
    }
    if args.noise_floor:
        shifted = facenet_detect(facenet, [np.ascontiguousarray(im[1:, 1:]) for im in images])
        shifted = [Detections(d.boxes + 1, d.scores, d.landmarks + 1) for d in shifted]
        report["facenet_vs_itself_shifted_1px_score_ge_0.9"] = agreement(shifted, theirs, 0.9)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
