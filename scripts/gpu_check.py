"""Every GPU check in one run (a few minutes): speed against facenet-pytorch, per-stage time, GPU memory, and
that the GPU's tables match the CPU's.

    python scripts/gpu_check.py --photos 1000 --out "$OUT"        # what scripts/gpu_check.sh runs on a GPU host
    python scripts/gpu_check.py --device cpu --photos 40 --out /tmp/check   # the same logic on a CPU, to test it

1. ``--photos`` distinct photos are made from ``data/demo`` (mirrored, shifted in brightness, re-encoded: distinct
   bytes, so none is skipped as a duplicate; the sizes stay those of the demo photos).
2. On them, each as a fresh process: ``colortrend run`` end to end, facenet-pytorch's MTCNN loop (one photo per
   call, as its README does it) and its batched mode (a list of same-size photos per call). GPU memory is sampled
   with nvidia-smi during each.
3. The demo photos are analysed on the CPU and on ``--device``; the tables must agree: the same faces (boxes within
   IoU 0.9), ages within 0.5 years, dominant colours within CIEDE2000 1.
4. The colour work and JPEG decode alone (``colour_and_decode``): white balance and k-means palettes by the numpy
   path and by the torch path on ``--device``, JPEG decode by Pillow and by ``decode_jpegs`` on ``--device``, on
   the same photos: milliseconds per photo (or per person) of each, and their largest differences (gains,
   corrected pixels, dominant colours in CIEDE2000, shares, decoded pixels). ``--only colour`` runs just this.

One JSON object goes to stdout and to ``OUT/gpu_check.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"

FACENET = r"""
import json, sys, time
from collections import defaultdict
from pathlib import Path
import torch
from PIL import Image
from facenet_pytorch import MTCNN
folder, device, mode = sys.argv[1], sys.argv[2], sys.argv[3]
paths = sorted(p for p in Path(folder).rglob("*.jpg"))
mtcnn = MTCNN(keep_all=True, device=device)
t0 = time.perf_counter()
faces = 0
if mode == "loop":
    for p in paths:
        boxes, _, _ = mtcnn.detect(Image.open(p).convert("RGB"), landmarks=True)
        faces += 0 if boxes is None else len(boxes)
else:  # batched: facenet-pytorch takes a list of same-size images per call
    by_size = defaultdict(list)
    for p in paths:
        image = Image.open(p).convert("RGB")
        by_size[image.size].append(image)
    for images in by_size.values():
        for start in range(0, len(images), 32):
            boxes, _, _ = mtcnn.detect(images[start:start + 32], landmarks=True)
            faces += sum(0 if b is None else len(b) for b in boxes)
if device == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"photos": len(paths), "faces": faces, "loop_s": time.perf_counter() - t0}))
"""


class GpuMemory:
    """Peak GPU memory in use (MiB) while a block runs, sampled with nvidia-smi; None without one."""

    def __init__(self):
        self.peak: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                used = max(int(v) for v in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_photos(n: int, folder: Path) -> None:
    """``n`` distinct JPEGs from the demo photos: mirrored or not, brightness shifted, re-encoded."""
    import cv2
    import numpy as np

    sources = sorted(p for p in DEMO.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = [cv2.imread(str(p)) for p in sources]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = images[i % len(images)]
        variant = i // len(images)
        if variant % 2:
            image = image[:, ::-1]
        shift = (variant // 2) % 7 - 3
        image = np.clip(image.astype(np.int16) + shift, 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{i:06d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90 + variant % 6])


def colortrend_run(photos: Path, output: Path, device: str, cpu_workers: int | None = None) -> dict:
    config = output.parent / f"{output.name}.yaml"
    config.write_text(json.dumps({"name": "gpu-check", "input": {"paths": [str(photos)], "year": 2016},
                                  "output": str(output), "device": device, "cpu_workers": cpu_workers}))
    t0 = time.perf_counter()
    with GpuMemory() as memory:
        proc = subprocess.run([sys.executable, "-m", "colortrend.cli", "run", str(config), "--no-progress"],
                              capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"colortrend run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((output / "_runs" / "latest.json").read_text())["summary"]
    n = sum(summary["photos"].values())
    stages = summary["stage_seconds"]
    analysis = summary.get("analysis_seconds") or sum(stages.values())
    return {"photos": n, "cpu_workers": cpu_workers, "wall_s": wall, "photos_per_s": n / wall,
            "photos_per_s_analysis": n / analysis,
            "stage_s": stages, "faces": summary["faces"], "persons": summary["persons"],
            "gpu_peak_mib": memory.peak}


def facenet(photos: Path, device: str, mode: str) -> dict:
    t0 = time.perf_counter()
    with GpuMemory() as memory:
        proc = subprocess.run([sys.executable, "-c", FACENET, str(photos), device, mode],
                              capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    result = json.loads(proc.stdout.splitlines()[-1])
    return {**result, "wall_s": wall, "photos_per_s": result["photos"] / wall,
            "photos_per_s_loop": result["photos"] / result["loop_s"], "gpu_peak_mib": memory.peak}


def compare_tables(cpu_out: Path, gpu_out: Path) -> dict:
    """Faces matched by photo and box (IoU >= 0.9); their ages and their persons' dominant colours compared."""
    import numpy as np
    import pandas as pd

    from colortrend.color.space import delta_e2000, rgb_to_lab

    def load(out: Path, table: str) -> pd.DataFrame:
        return pd.read_parquet(out / table)

    cpu_faces, gpu_faces = load(cpu_out, "faces"), load(gpu_out, "faces")
    matched, unmatched, age_diff = 0, 0, []
    for pid, cpu_rows in cpu_faces.groupby("photo_id"):
        gpu_rows = gpu_faces[gpu_faces.photo_id == pid]
        for _, face in cpu_rows.iterrows():
            iou = [_iou(face, other) for _, other in gpu_rows.iterrows()]
            if iou and max(iou) >= 0.9:
                matched += 1
                other = gpu_rows.iloc[int(np.argmax(iou))]
                if pd.notna(face.age) and pd.notna(other.age):
                    age_diff.append(abs(float(face.age) - float(other.age)))
            else:
                unmatched += 1
    extra = len(gpu_faces) - matched
    keys = ["photo_id", "face_idx"]
    rgb = ["dominant_r", "dominant_g", "dominant_b"]
    garments = load(cpu_out, "garments")[keys + rgb].merge(load(gpu_out, "garments")[keys + rgb], on=keys,
                                                           suffixes=("_cpu", "_gpu"))
    delta = delta_e2000(rgb_to_lab(garments[[f"{c}_cpu" for c in rgb]].to_numpy(float)),
                        rgb_to_lab(garments[[f"{c}_gpu" for c in rgb]].to_numpy(float)))
    return {"faces_cpu": len(cpu_faces), "faces_gpu": len(gpu_faces), "faces_matched": matched,
            "faces_only_cpu": unmatched, "faces_only_gpu": extra,
            "age_max_abs_diff": max(age_diff, default=0.0), "age_within_0_5": all(d <= 0.5 for d in age_diff),
            "persons_compared": len(garments), "colour_max_delta_e": float(np.max(delta, initial=0.0)),
            "colour_within_delta_e_1": bool(np.all(delta <= 1.0)),
            "match": unmatched == 0 and extra == 0 and all(d <= 0.5 for d in age_diff) and bool(np.all(delta <= 1))}


def colour_and_decode(photos: Path, device: str, repeats: int = 3) -> dict:
    """The torch colour path and device JPEG decode against the CPU code, on ``photos`` (best of ``repeats``)."""
    import numpy as np

    from colortrend.color import torch_ops
    from colortrend.color.kmeans import palettes
    from colortrend.color.space import delta_e2000
    from colortrend.color.white_balance import apply_cast, white_balance
    from colortrend.stages.intake import decode_image, decode_jpegs

    def best(run) -> tuple[float, object]:
        run()  # warm-up: CUDA context, kernels, caches
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
        return min(times), out

    paths = sorted(photos.glob("*.jpg"))
    data = [p.read_bytes() for p in paths]
    t_pil, pil = best(lambda: [decode_image(d, 10**8, 2048)["image"] for d in data])

    def on_device():
        jobs = [decode_image(d, 10**8, 2048, defer_jpeg=True).pop("jpeg") for d in data]
        return decode_jpegs(jobs, device)

    t_dev, dev = best(on_device)
    refused = sum(image is None for image in dev)
    diffs = [np.abs(a.astype(np.int16) - b) for a, b in zip(pil, dev) if b is not None and a.shape == b.shape]
    figures: dict = {"decode": {
        "photos": len(data), "pillow_ms_per_photo": 1e3 * t_pil / len(data),
        "device_ms_per_photo": 1e3 * t_dev / len(data), "device_refused": refused,
        "shape_mismatches": sum(b is not None and a.shape != b.shape for a, b in zip(pil, dev)),
        "max_abs_diff": int(max((d.max() for d in diffs), default=0)),
        "mean_abs_diff": float(np.mean([d.mean() for d in diffs])) if diffs else None}}

    # Every other photo under a warm cast, so that most photos are corrected; a fifth of each left out.
    images = [apply_cast(image, (1.0, 0.85, 0.7)) if i % 2 else image for i, image in enumerate(pil)]
    rng = np.random.default_rng(0)
    excludes = [rng.random(image.shape[:2]) < 0.2 for image in images]
    for method in ("shades_of_gray", "gray_edge"):
        t_np, ref = best(lambda: [white_balance(im, method, exclude=ex) for im, ex in zip(images, excludes)])
        t_t, ours = best(lambda: torch_ops.white_balance_batch(images, method, device, excludes=excludes))
        figures[f"white_balance_{method}"] = {
            "photos": len(images), "numpy_ms_per_photo": 1e3 * t_np / len(images),
            "torch_ms_per_photo": 1e3 * t_t / len(images),
            "max_gain_rel_diff": float(max(np.abs(a.gains / b.gains - 1).max() for a, b in zip(ours, ref))),
            "max_pixel_diff": int(max(np.abs(a.image.astype(np.int16) - b.image).max() for a, b in zip(ours, ref))),
            "methods_equal": all(a.method == b.method for a, b in zip(ours, ref))}

    # Persons: the central third of each photo, in four horizontal bands (a few thousand pixels each).
    people = []
    for image in images:
        h, w = image.shape[:2]
        centre = image[h // 3:2 * h // 3, w // 3:2 * w // 3]
        people.extend(band.reshape(-1, 3) for band in np.array_split(centre, 4))
    t_np, ref = best(lambda: palettes(people))
    t_t, ours = best(lambda: torch_ops.palettes(people, device))
    figures["palettes"] = {
        "persons": len(people), "numpy_ms_per_person": 1e3 * t_np / len(people),
        "torch_ms_per_person": 1e3 * t_t / len(people),
        "max_dominant_delta_e": float(max(delta_e2000(a.dominant_lab, b.dominant_lab) for a, b in zip(ours, ref))),
        "max_share_diff": float(max(abs(a.dominant_share - b.dominant_share) for a, b in zip(ours, ref))),
        "identical": sum(np.array_equal(a.lab, b.lab) and np.array_equal(a.share, b.share)
                         for a, b in zip(ours, ref))}
    return figures


def _iou(a, b) -> float:
    ix = max(0.0, min(a.box_x2, b.box_x2) - max(a.box_x1, b.box_x1))
    iy = max(0.0, min(a.box_y2, b.box_y2) - max(a.box_y1, b.box_y1))
    inter = ix * iy
    union = ((a.box_x2 - a.box_x1) * (a.box_y2 - a.box_y1) + (b.box_x2 - b.box_x1) * (b.box_y2 - b.box_y1)
             - inter)
    return inter / union if union > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=1000, help="distinct photos for the speed runs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    ap.add_argument("--only", choices=["colour"], help="run only the colour-and-decode comparison")
    ap.add_argument("--colour-photos", type=int, default=200, help="photos for the colour-and-decode comparison")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    figures: dict = {"device": args.device, "photos": args.colour_photos if args.only else args.photos}
    if args.device == "cuda":
        import torch

        figures["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        figures["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_photos(args.colour_photos if args.only else args.photos, tmp / "photos")
        figures["make_photos_s"] = time.perf_counter() - t0
        if args.only == "colour":
            figures["colour_and_decode"] = colour_and_decode(tmp / "photos", args.device)
            return _write(figures, args.out)
        figures["colortrend_run"] = colortrend_run(tmp / "photos", tmp / "out-speed", args.device)
        # The same photos with the work after the models in one thread (the default beside a GPU: cores minus two).
        figures["colortrend_run_one_cpu_worker"] = colortrend_run(tmp / "photos", tmp / "out-one", args.device,
                                                                  cpu_workers=1)
        figures["facenet_loop"] = facenet(tmp / "photos", args.device, "loop")
        figures["facenet_batched"] = facenet(tmp / "photos", args.device, "batched")
        run, loop = figures["colortrend_run"], figures["facenet_loop"]
        if "photos_per_s" in loop:
            figures["ratio_vs_facenet_loop"] = run["photos_per_s"] / loop["photos_per_s"]
        if "photos_per_s" in figures["facenet_batched"]:
            figures["ratio_vs_facenet_batched"] = run["photos_per_s"] / figures["facenet_batched"]["photos_per_s"]
        colortrend_run(DEMO, tmp / "out-cpu", "cpu")
        colortrend_run(DEMO, tmp / "out-device", args.device)
        figures["tables_cpu_vs_device"] = compare_tables(tmp / "out-cpu", tmp / "out-device")
        # The first photos of the speed set: demo-sized JPEGs, distinct bytes.
        subset = tmp / "colour-photos"
        subset.mkdir()
        for path in sorted((tmp / "photos").glob("*.jpg"))[:args.colour_photos]:
            os.link(path, subset / path.name)
        figures["colour_and_decode"] = colour_and_decode(subset, args.device)
    _write(figures, args.out)


def _write(figures: dict, out: Path) -> None:
    text = json.dumps(figures, indent=1, default=str)
    (out / "gpu_check.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
