"""Peak memory of photo intake on a structurally hostile file: a TIFF laid out with one strip per row (issue 16:
1 x 10,000,000 pixels, 90 MB, took 4.15 GB to decode although it declares only 10 megapixels).

Intake (``IntakeStage``, the pipeline's own first stage, ``decode_workers`` threads) reads ``--copies`` such files
in a fresh process; the same is done with one small demo photo as the baseline. Prints each process's peak
resident memory, the statuses and messages intake gave, and with ``--json`` one JSON object on the last line.

    python scripts/measure_decode_memory.py --rows 10000000 --copies 3 --json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
from colortrend.stages.intake import InputSettings, IntakeStage
paths = sys.argv[1:]
stage = IntakeStage(InputSettings(paths=("unused",)), workers=2)
out = stage({"photo_id": [str(i) for i in range(len(paths))], "path": paths})
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "status": out["status"], "error": out["error"]}))
"""


def strip_tiff(rows: int) -> bytes:
    """A little-endian RGB TIFF 1 pixel wide and ``rows`` high, one uncompressed strip per row."""
    data_at, strip_bytes = 8, 3
    offsets_at = data_at + rows * strip_bytes
    counts_at = offsets_at + 4 * rows
    bits_at = counts_at + 2 * rows
    ifd_at = bits_at + 6

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        inline = np.array([value], "<u2").tobytes() + b"\0\0" if kind == 3 and count == 1 else np.array(
            [value], "<u4").tobytes()
        return np.array([tag, kind], "<u2").tobytes() + np.array([count], "<u4").tobytes() + inline

    entries = [entry(256, 4, 1, 1), entry(257, 4, 1, rows), entry(258, 3, 3, bits_at), entry(259, 3, 1, 1),
               entry(262, 3, 1, 2), entry(273, 4, rows, offsets_at), entry(277, 3, 1, 3), entry(278, 4, 1, 1),
               entry(279, 3, rows, counts_at)]
    return b"".join([
        b"II*\0", np.array([ifd_at], "<u4").tobytes(),
        bytes([128]) * (rows * strip_bytes),
        (data_at + np.arange(rows, dtype="<u4") * strip_bytes).tobytes(),
        np.full(rows, strip_bytes, "<u2").tobytes(),
        np.array([8, 8, 8], "<u2").tobytes(),
        np.array([len(entries)], "<u2").tobytes(), *entries, b"\0\0\0\0",
    ])


def intake_peak(paths: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *paths], capture_output=True, text=True)
    if out.returncode:
        return {"peak_mb": None, "status": ["process died"], "error": [out.stderr.strip()[-300:]]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="pixel rows = strips of the TIFF")
    parser.add_argument("--copies", type=int, default=1, help="such files in one intake batch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = strip_tiff(args.rows)
        paths = []
        for i in range(args.copies):
            path = Path(tmp) / f"strips-{i}.tif"
            path.write_bytes(data[:8] + bytes([i % 256]) + data[9:])  # one pixel differs: distinct files
            paths.append(str(path))
        baseline = intake_peak([str(sorted((ROOT / "data" / "demo").glob("*.jpg"))[0])])
        hostile = intake_peak(paths)
    result = {"rows": args.rows, "file_mb": round(len(data) / 1e6, 1), "copies": args.copies,
              "baseline_peak_mb": round(baseline["peak_mb"], 1),
              "hostile_peak_mb": None if hostile["peak_mb"] is None else round(hostile["peak_mb"], 1),
              "status": hostile["status"], "error": hostile["error"][0]}
    print(f"{args.copies} x {result['file_mb']} MB strip TIFF ({args.rows:,} strips): peak "
          f"{result['hostile_peak_mb']} MB (one demo photo: {result['baseline_peak_mb']} MB); "
          f"status {hostile['status']}: {result['error']}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
