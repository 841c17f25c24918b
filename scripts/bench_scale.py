"""The coordinator at scale: time and peak memory of planning and of building histograms and report over N
committed persons.

    python scripts/bench_scale.py --persons 1000000 --json [--baseline-src /path/to/other/src]

Fabricates committed shards through the project's own commit code (``Store.commit_shard`` with the pipeline's real
table schemas and a marker like a run's): one photo, one face and one measured person per row, plausible random
ages (8-70), photo years (2015-2017), garment colours (a mix of palette colours with measurement noise), 10 % of
faces failing the quality filters. Arrays are built with numpy/pyarrow directly. The fabricated output is kept and
reused by later runs with the same ``--persons`` and ``--shard-size``.

Then ``build_aggregates(force=True)`` runs in a fresh subprocess (so its peak RSS is its own): ``cold`` with no cached
partials (every shard read once), ``warm`` with them. ``--baseline-src`` runs the same measurement on another source
tree (e.g. ``git archive`` of an older commit) over the same output, for a side-by-side figure.
Planning (``colortrend.plan.plan``, what every run and ``status`` do first) runs the same way over the committed
output with one new photo to list: it reads the committed photos' ids and input columns, never the rows.
Prints one JSON object on the last line: ``aggregate_s``, ``aggregate_peak_mb`` (cold), ``aggregate_warm_s``,
``aggregate_warm_peak_mb``, ``plan_s``, ``plan_peak_mb``, and the ``baseline_`` figures when asked.
``--plan-only`` measures planning alone (with ``--shard-size 256``, a run's default: as many commit records as a
real output of that size holds).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
MEASURE = """
import json, resource, sys, time
from colortrend.config import load_from_dict
from colortrend.io.store import Store
from colortrend.run import build_aggregates
cfg = load_from_dict(json.loads(sys.argv[1]))
t = time.perf_counter()
build_aggregates(cfg, Store(cfg.output), force=True)
print(json.dumps({"s": time.perf_counter() - t,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
MEASURE_PLAN = """
import json, resource, sys, time
from colortrend.config import load_from_dict
from colortrend.io.store import Store
from colortrend.pipeline import Pipeline
from colortrend.run import plan
cfg = load_from_dict(json.loads(sys.argv[1]))
pipeline = Pipeline(cfg)
t = time.perf_counter()
the_plan = plan(cfg, pipeline, Store(cfg.output))
print(json.dumps({"s": time.perf_counter() - t, "tasks": len(the_plan.tasks),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


#: Bumped when the fabricated output's layout changes, so an older one is made again.
FORMAT = 2


def config(out: Path) -> dict:
    return {"name": "bench_scale", "input": {"paths": [str(out.parent / f"{out.name}-inputs")]}, "output": str(out)}


def one_new_photo(out: Path) -> None:
    """The input folder planning lists: one small photo, not yet analysed."""
    import cv2

    folder = out.parent / f"{out.name}-inputs"
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "new.png"), np.full((8, 8, 3), 128, np.uint8))


def fabricate(out: Path, persons: int, shard_size: int, seed: int = 0) -> float:
    """Commit ``persons`` one-person photos in shards of ``shard_size``; returns the seconds it took."""
    import pyarrow as pa

    from colortrend.color.names import NAMED_COLORS
    from colortrend.config import load_from_dict
    from colortrend.io.store import Store
    from colortrend.pipeline import Pipeline

    t0 = time.perf_counter()
    cfg = load_from_dict(config(out))
    pipeline = Pipeline(cfg)
    schemas, fingerprints = pipeline.schemas, pipeline.fingerprints()
    store = Store(out)
    store.prepare()
    rng = np.random.default_rng(seed)
    palette = np.array([c.rgb for c in NAMED_COLORS], dtype=np.float64)
    popularity = rng.dirichlet(np.ones(len(palette)))
    for s, start in enumerate(range(0, persons, shard_size)):
        n = min(shard_size, persons - start)
        ids = np.char.add("p", np.char.zfill(np.arange(start, start + n).astype(str), 10))
        year = rng.integers(2015, 2018, n).astype(np.int32)
        age = rng.uniform(8, 70, n).astype(np.float32)
        rgb = np.clip(palette[rng.choice(len(palette), n, p=popularity)] + rng.normal(0, 12, (n, 3)), 0, 255)
        quality = rng.random(n) > 0.1
        known = {
            "photo_id": ids, "path": np.char.add(np.char.add("/photos/", ids), ".jpg"), "status": np.full(n, "ok"),
            "content_hash": np.char.add("h", ids), "taken_year": year, "face_idx": np.zeros(n, np.int32),
            "n_faces": np.ones(n, np.int32), "n_persons": np.ones(n, np.int32), "age": age,
            "age_sd": np.full(n, 3.0, np.float32), "birth_year": (year - age).astype(np.float32),
            "quality_ok": quality, "dominant_r": rgb[:, 0].round().astype(np.uint8),
            "dominant_g": rgb[:, 1].round().astype(np.uint8), "dominant_b": rgb[:, 2].round().astype(np.uint8),
        }
        tables = {name: pa.table({f.name: pa.array(known[f.name], f.type) if f.name in known else
                                  pa.nulls(n, f.type) for f in schema}, schema=schema)
                  for name, schema in schemas.items()}
        marker = {"fingerprint": fingerprints[pipeline.stages[-1].name],  # ids live in the photos file, as a run's
                  "stages": fingerprints, "seconds": {}, "replaces": [],
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        store.commit_shard(f"bench{s:06d}", tables, marker)
    (out / "_bench.json").write_text(json.dumps({"persons": persons, "shard_size": shard_size, "format": FORMAT}))
    return time.perf_counter() - t0


def measure(out: Path, src: Path, code: str = MEASURE) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(config(out))], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"measuring under {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--persons", type=int, required=True)
    parser.add_argument("--shard-size", type=int, default=10_000, help="persons per committed shard")
    parser.add_argument("--out", type=Path, default=None, help="where the fabricated output lives (kept)")
    parser.add_argument("--baseline-src", type=Path, default=None, help="another source tree to measure beside")
    parser.add_argument("--plan-only", action="store_true", help="measure planning only, not aggregation")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = args.out or Path(tempfile.gettempdir()) / f"colortrend-bench-scale-{args.persons}-{args.shard_size}"
    want = {"persons": args.persons, "shard_size": args.shard_size, "format": FORMAT}
    fabricate_s = None
    if not (out / "_bench.json").exists() or json.loads((out / "_bench.json").read_text()) != want:
        shutil.rmtree(out, ignore_errors=True)
        fabricate_s = fabricate(out, args.persons, args.shard_size)
    one_new_photo(out)
    result = {"persons": args.persons, "shards": -(-args.persons // args.shard_size), "shard_size": args.shard_size,
              "fabricate_s": None if fabricate_s is None else round(fabricate_s, 1)}
    if args.baseline_src:
        if not args.plan_only:
            base = measure(out, args.baseline_src)
            result |= {"baseline_aggregate_s": round(base["s"], 2),
                       "baseline_aggregate_peak_mb": round(base["peak_mb"])}
        try:  # a tree from before markers stopped listing photo ids cannot plan over this output
            base = measure(out, args.baseline_src, MEASURE_PLAN)
            result |= {"baseline_plan_s": round(base["s"], 2), "baseline_plan_peak_mb": round(base["peak_mb"])}
        except SystemExit as exc:
            result |= {"baseline_plan_error": str(exc).strip().splitlines()[-1][:200]}
    if not args.plan_only:
        shutil.rmtree(out / "_partials", ignore_errors=True)  # cold: every shard read once
        cold, warm = measure(out, SRC), measure(out, SRC)
        result |= {"aggregate_s": round(cold["s"], 2), "aggregate_peak_mb": round(cold["peak_mb"]),
                   "aggregate_warm_s": round(warm["s"], 2), "aggregate_warm_peak_mb": round(warm["peak_mb"])}
    planned = measure(out, SRC, MEASURE_PLAN)
    result |= {"plan_s": round(planned["s"], 2), "plan_peak_mb": round(planned["peak_mb"]),
               "plan_tasks": planned["tasks"]}
    if not args.json:
        for key, value in result.items():
            print(f"{key:28s} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
