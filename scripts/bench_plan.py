"""Benchmark: what planning costs the coordinator, at N input photos, on a first run and when nothing is new.

Fabricates N tiny distinct input files and commits them as shards through the project's own commit code
(``colortrend.run._analyse``, the code a real run commits with; only the analysis itself is replaced by rows
made up from each file, so N can be 200,000 in a minute), then measures, each in a fresh process:

- ``colortrend status CONFIG --json`` on the empty output (all N photos pending): peak RSS and wall seconds;
- the first run that commits them (the fabricating step itself): peak RSS and wall seconds;
- ``colortrend run CONFIG`` with nothing new (a no-op nightly rerun, after one run has built the report):
  peak RSS and wall seconds;
- ``colortrend status CONFIG --json``: peak RSS and wall seconds;
- a run with one new photo, a copy of a committed one (analysis made up as above, duplicate marking real): peak
  RSS and wall seconds of what the coordinator holds to find that it is a duplicate;
- a nightly run with 1,000 new distinct photos, whose hashes touch every partition of the content-hash index:
  peak RSS and wall seconds;
- the content-hash index alone, as duplicate marking reads it for those 1,000 photos (every partition), in a
  process of its own: its peak RSS, and microseconds per committed hash looked up.

    python scripts/bench_plan.py --photos 20000 200000 --json

``--pending N [N ...]`` measures instead a first ``colortrend status`` (every photo pending: the whole plan is
made, as a first run makes it) over a manifest of N paths, one file each (planning never opens them, so they are
not written; each is listed as a file that cannot be read): peak RSS, wall seconds, and whether the plan spilled
to its temporary file.

    python scripts/bench_plan.py --pending 200000 2000000 10000000 --json

``--hash-index N [N ...]`` measures the content-hash index alone at N committed hashes: N entries written as
shard-sized deltas through the project's commit code (``write_delta``) and compacted (``compact``), as commits
leave them, then, in a fresh process, every partition read (as duplicate marking reads them for a nightly run's
new photos): peak RSS, the process's RSS before reading, seconds, and microseconds a lookup.

    python scripts/bench_plan.py --hash-index 1000000 4000000 --json

``--index-workers K [K ...]`` (with ``--hash-index``) then reads every partition as the Ray runner does, through
``K`` index actors (``colortrend.runners.ray.index_owners``) of a local Ray instance: each actor's resident memory
before and after, and milliseconds per batch of 16 lookups.

    python scripts/bench_plan.py --hash-index 1000000 --index-workers 1 4 --json

``--committed-rows N`` (with ``--photos``) sets planning's in-memory limit of committed photos
(``colortrend.plan.COMMITTED_ROWS``) in every measured process: with N below the photos, a no-op rerun and
``status`` compare them with the listing a range of keys at a time, as an output past the limit is compared.

    python scripts/bench_plan.py --photos 200000 --committed-rows 65536 --json

Prints one line per N and, with ``--json``, one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_FOLDER = 1000
LIMIT_VAR = "BENCH_PLAN_COMMITTED_ROWS"  # --committed-rows, passed to every measured process
# The CLI run with planning's in-memory limit of committed photos set from LIMIT_VAR (when set).
CLI = ("import os, sys; import colortrend.plan as plan; from colortrend.cli import main; "
       f"plan.COMMITTED_ROWS = int(os.environ.get({LIMIT_VAR!r}, plan.COMMITTED_ROWS)); "
       "sys.argv[0] = 'colortrend'; main()")
NIGHTLY = 1000  # new photos of the nightly run: their hashes touch every one of the index's 256 partitions


def fabricate_inputs(folder: Path, n: int, start: int = 0) -> None:
    """``n`` distinct tiny files (numbered from ``start``), 1,000 per sub-folder (as an upload tree would hold them)."""
    for i in range(start, start + n):
        sub = folder / f"d{i // PER_FOLDER:05d}"
        if i == start or i % PER_FOLDER == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"p{i:08d}.jpg").write_bytes(b"photo %d" % i)


class MadeUpRunner:
    """Stands in for the analysis: every photo a ``no_face`` row with its real content hash and size, or a
    ``duplicate`` one where the pipeline's own duplicate marking says so."""

    def execute(self, pipeline, tasks, seen, progress=None):
        import pyarrow as pa

        from colortrend.pipeline import ShardResult, mark_duplicates

        schemas = pipeline.schemas
        for task in tasks:
            data = [Path(p).read_bytes() for p in task.paths]
            n = len(task.photo_ids)
            rows = {name: [None] * n for name in schemas["photos"].names}
            rows.update(photo_id=task.photo_ids, path=task.paths, status=["ok"] * n,
                        content_hash=[hashlib.sha256(d).hexdigest() for d in data],
                        file_bytes=[len(d) for d in data], n_faces=[0] * n, n_persons=[0] * n, image=[None] * n)
            mark_duplicates(rows, seen)
            rows["status"] = ["duplicate" if s == "duplicate" else "no_face" for s in rows["status"]]
            del rows["image"]
            tables = {"photos": pa.Table.from_pydict(rows, schema=schemas["photos"]),
                      "faces": schemas["faces"].empty_table(), "garments": schemas["garments"].empty_table()}
            yield ShardResult(task.shard_id, tables, {}, [], task)


def commit_all(config: Path) -> None:
    """Plan and commit every new input through ``colortrend.run`` (what a run does, analysis made up); prints its
    peak RSS (MB) as JSON."""
    import colortrend.runners
    from colortrend.config import load_config
    from colortrend.io.lock import RunLock
    from colortrend.io.store import Store
    from colortrend.pipeline import Pipeline
    from colortrend.run import RunSummary, _analyse, plan

    colortrend.runners.get_runner = lambda name, **_: MadeUpRunner()
    cfg = load_config(str(config))
    store = Store(cfg.output)
    pipeline = Pipeline(cfg)
    store.prepare()
    with RunLock(cfg.output):
        the_plan = plan(cfg, pipeline, store)
        _analyse(cfg, pipeline, store, the_plan, "local", None, False, RunSummary())
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def read_index(config: Path) -> None:
    """Duplicate marking's reads of the hash index for ``NIGHTLY`` new photos (every partition), then a lookup of
    every committed hash; prints the peak RSS (MB) after the reads and the lookup's microseconds per hash as JSON."""
    import pyarrow.parquet as pq

    from colortrend.config import load_config
    from colortrend.io.hash_index import HashIndex, tokens_of
    from colortrend.io.store import Store

    store = Store(load_config(str(config)).output)
    index = HashIndex(store, tokens_of(store.markers()))
    for i in range(NIGHTLY):
        index.setdefault(hashlib.sha256(b"nightly %d" % i).hexdigest(), f"{i:016x}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before this script's own list below
    committed = [d for f in sorted((Path(store.url) / "photos").glob("*.parquet"))
                 for d in pq.read_table(f, columns=["content_hash"]).column(0).to_pylist()]
    t0 = time.perf_counter()
    found = sum(index.setdefault(d, "new") != "new" for d in committed)
    us = (time.perf_counter() - t0) / max(1, len(committed)) * 1e6
    if found != len(committed):
        raise SystemExit(f"the index found {found} of {len(committed)} committed hashes")
    print(json.dumps({"lookup_us": round(us, 2), "index_peak_mb": peak_mb}))


def measured(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of ``cmd`` run in a fresh process of its own."""
    wrapper = ("import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:], capture_output=True, "
               "text=True); sys.stderr.write(p.stderr[-3000:]); print(p.stdout); "
               "print(json.dumps({'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}));"
               "sys.exit(p.returncode)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return wall, json.loads(lines[-1])["peak_mb"], "\n".join(lines[:-1])


def bench(n: int, work: Path) -> dict:
    inputs = work / f"inputs-{n}"
    if not (inputs / ".complete").exists():
        fabricate_inputs(inputs, n)
        (inputs / ".complete").write_text("")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(json.dumps({"name": "bench", "input": {"paths": [str(inputs)], "year": 2016},
                                      "output": str(Path(tmp) / "out"), "device": "cpu", "shard_size": 256}))
        cli = [sys.executable, "-c", CLI]
        first_status_s, first_status_mb, first_status_out = measured([*cli, "status", str(config), "--json"])
        if json.loads(first_status_out.splitlines()[-1])["photos_pending"] != n:
            raise SystemExit(f"status on the empty output does not count {n} photos pending")
        first_s, first_mb, _ = measured([sys.executable, __file__, "--commit", str(config)])
        measured([*cli, "run", str(config), "--no-progress"])  # builds histograms and report once, as a run does
        run_s, run_mb, run_out = measured([*cli, "run", str(config), "--no-progress"])
        status_s, status_mb, status_out = measured([*cli, "status", str(config), "--json"])
        info = json.loads(status_out.splitlines()[-1])
        if info["photos_pending"] or info["photos_committed"] != n:
            raise SystemExit(f"not a no-op: {info['photos_committed']} committed, {info['photos_pending']} pending")
        copy = inputs / "d00000" / "p00000000.jpg"
        extra = Path(tmp) / "extra"
        extra.mkdir()
        shutil.copy(copy, extra / "copy.jpg")
        cfg = json.loads(config.read_text())
        cfg["input"]["paths"].append(str(extra))
        config.write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        new_out = subprocess.run([sys.executable, __file__, "--commit", str(config)], check=True, text=True,
                                 capture_output=True).stdout
        new_s = time.perf_counter() - t0
        nightly = Path(tmp) / "nightly"
        fabricate_inputs(nightly, NIGHTLY, start=n)
        cfg["input"]["paths"].append(str(nightly))
        config.write_text(json.dumps(cfg))
        nightly_s, nightly_mb, _ = measured([sys.executable, __file__, "--commit", str(config)])
        _, _, index_out = measured([sys.executable, __file__, "--index", str(config)])
        index = json.loads(index_out.splitlines()[-1])
        import pandas as pd

        photos = pd.concat(pd.read_parquet(p, columns=["path", "status"]) for p in (Path(tmp) / "out" /
                                                                                   "photos").glob("*.parquet"))
        if photos[photos.path == str(extra / "copy.jpg")].status.tolist() != ["duplicate"]:
            raise SystemExit("the new copy was not found to be a duplicate")
        if (photos[photos.path.str.startswith(str(nightly))].status == "no_face").sum() != NIGHTLY:
            raise SystemExit("the nightly run's new photos were not all analysed as new")
        return {"photos": n, "first_status_s": round(first_status_s, 2),
                "first_status_peak_mb": round(first_status_mb, 1), "first_run_s": round(first_s, 1),
                "first_run_peak_mb": round(first_mb, 1), "noop_run_s": round(run_s, 2),
                "noop_run_peak_mb": round(run_mb, 1), "status_s": round(status_s, 2),
                "status_peak_mb": round(status_mb, 1), "new_copy_run_s": round(new_s, 2),
                "new_copy_run_peak_mb": round(json.loads(new_out.splitlines()[-1])["peak_mb"], 1),
                "nightly_run_s": round(nightly_s, 2), "nightly_run_peak_mb": round(nightly_mb, 1),
                "hash_index_peak_mb": round(index["index_peak_mb"], 1), "hash_index_lookup_us": index["lookup_us"]}


def bench_pending(n: int, work: Path) -> dict:
    """A first ``colortrend status`` over a manifest of ``n`` paths, on an empty output."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = work / f"manifest-{n}.parquet"
    if not manifest.exists():
        paths = pa.array([f"/uploads/2016/d{i // PER_FOLDER:06d}/p{i:09d}.jpg" for i in range(n)])
        pq.write_table(pa.table({"path": paths}), manifest.with_suffix(".tmp"))
        manifest.with_suffix(".tmp").rename(manifest)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(json.dumps({"name": "bench", "input": {"paths": [str(manifest)], "year": 2016},
                                      "output": str(Path(tmp) / "out"), "device": "cpu", "shard_size": 256}))
        wall, peak, out = measured([sys.executable, "-m", "colortrend.cli", "status", str(config), "--json"])
        if json.loads(out.splitlines()[-1])["photos_pending"] != n:
            raise SystemExit(f"status does not count {n} photos pending")
    import colortrend.plan

    limit = getattr(colortrend.plan, "SPILL_ROWS", None)  # (a tree from before plans could spill: never)
    return {"pending": n, "first_status_s": round(wall, 2), "first_status_peak_mb": round(peak, 1),
            "spilled": limit is not None and n > limit}


def fabricate_index(root: Path, n: int, per: int = 256) -> dict[str, str]:
    """``n`` index entries (``n // per`` shards of ``per``) as commits and compaction leave them; their tokens."""
    import pyarrow as pa

    from colortrend.io import hash_index
    from colortrend.io.store import Store

    store = Store(str(root))
    store.prepare()
    tokens = {}
    for s in range(n // per):
        ids = [f"{(s * per + i) * 2654435761 % (1 << 64):016x}" for i in range(per)]
        photos = pa.table({"photo_id": ids, "status": ["ok"] * per,
                           "content_hash": [hashlib.sha256(b"%d" % (s * per + i)).hexdigest() for i in range(per)]})
        tokens[f"shard-{s:06d}"] = hash_index.new_token()
        hash_index.write_delta(store, f"shard-{s:06d}", tokens[f"shard-{s:06d}"], photos)
        if s % 1024 == 1023:
            hash_index.compact(store, tokens)
    hash_index.compact(store, tokens)
    return tokens


def read_whole_index(root: Path) -> None:
    """Every partition of the fabricated index read as duplicate marking reads them; prints figures as JSON."""
    from colortrend.io.hash_index import HashIndex
    from colortrend.io.store import Store

    tokens = json.loads((root / "tokens.json").read_text())
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    index = HashIndex(Store(str(root)), tokens)
    t0 = time.perf_counter()
    for p in range(256):
        index.setdefault(f"{p:02x}" + "f" * 62, "new")
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = len(tokens) * 256
    probe = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(0, n, max(1, n // 20000))]
    t0 = time.perf_counter()
    found = sum(index.setdefault(d, "new") != "new" for d in probe)
    us = (time.perf_counter() - t0) / len(probe) * 1e6
    if found != len(probe):
        raise SystemExit(f"the index found {found} of {len(probe)} committed hashes")
    print(json.dumps({"rss_before_mb": round(before_mb, 1), "peak_mb": round(peak_mb, 1),
                      "read_all_s": round(seconds, 2), "lookup_us": round(us, 2)}))


def read_spread_index(root: Path, workers: int) -> None:
    """Every partition of the fabricated index read through ``workers`` index actors, as the Ray runner reads them;
    prints each actor's resident MB before and after (its peak), and ms per batch of 16 lookups, as JSON."""
    from colortrend.io.hash_index import HashIndex
    from colortrend.io.store import Store
    from colortrend.runners.ray import RayRunner, SpreadFirstCopies, index_owners

    def resident_mb(pids: list[int], field: str) -> list[float]:
        values = []
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            line = next(entry for entry in status if entry.startswith(field))
            values.append(round(int(line.split()[1]) / 1024, 1))
        return values

    tokens = json.loads((root / "tokens.json").read_text())
    ray, started = RayRunner()._connect()
    try:
        owners = index_owners(ray, HashIndex(Store(str(root)), tokens), workers)
        ray.get([owner.partitions_read.remote() for owner in owners])  # every actor up, nothing read yet
        pids = ray.get([owner.__ray_call__.remote(lambda actor: os.getpid()) for owner in owners])
        before = resident_mb(pids, "VmRSS:")
        spread = SpreadFirstCopies(owners)
        t0 = time.perf_counter()
        for p in range(0, 256, 16):
            spread.setdefault_many([(f"{q:02x}" + "f" * 62, "new") for q in range(p, p + 16)])
        seconds = time.perf_counter() - t0
        n = len(tokens) * 256
        probe = [(hashlib.sha256(b"%d" % i).hexdigest(), "new") for i in range(0, n, max(1, n // 4000))]
        t1 = time.perf_counter()
        found = sum(sum(first != "new" for first in spread.setdefault_many(probe[i:i + 16]))
                    for i in range(0, len(probe), 16))
        batch_ms = (time.perf_counter() - t1) / (len(probe) / 16) * 1e3
        if found != len(probe):
            raise SystemExit(f"the index found {found} of {len(probe)} committed hashes")
        print(json.dumps({"index_workers": workers, "actor_rss_before_mb": before,
                          "actor_peak_mb": resident_mb(pids, "VmHWM:"), "read_all_s": round(seconds, 2),
                          "batch_of_16_ms": round(batch_ms, 2)}))
    finally:
        if started:
            ray.shutdown()


def bench_index(n: int, work: Path, index_workers: list[int] | None = None) -> dict:
    root = work / f"index-{n}"
    if not (root / "tokens.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        tokens = fabricate_index(root, n)
        (root / "tokens.json").write_text(json.dumps(tokens))
    _, _, out = measured([sys.executable, __file__, "--read-index", str(root)])
    result = {"hashes": n, **json.loads(out.splitlines()[-1])}
    for workers in index_workers or []:
        _, _, out = measured([sys.executable, __file__, "--read-index", str(root), "--spread", str(workers)])
        result.setdefault("spread", []).append(json.loads(out.splitlines()[-1]))
    return result


def main() -> None:
    # Every process measured imports colortrend from this script's own tree: an older checkout's copy of the
    # script measures that checkout, whatever is installed.
    own = str(Path(__file__).resolve().parents[1] / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (own, os.environ.get("PYTHONPATH")) if p)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--pending", type=int, nargs="+", help="a first status over manifests of N paths instead")
    parser.add_argument("--hash-index", type=int, nargs="+", help="the hash index alone at N committed hashes")
    parser.add_argument("--read-index", type=Path, help=argparse.SUPPRESS)  # its reading, in its own process
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "colortrend-bench-plan",
                        help="where the fabricated inputs are kept between runs (reused when present)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--commit", type=Path, help=argparse.SUPPRESS)  # the fabricating step, in its own process
    parser.add_argument("--index", type=Path, help=argparse.SUPPRESS)  # the hash index alone, in its own process
    parser.add_argument("--committed-rows", type=int, help="planning's in-memory limit of committed photos")
    parser.add_argument("--index-workers", type=int, nargs="+", help="with --hash-index: read through K actors")
    parser.add_argument("--spread", type=int, help=argparse.SUPPRESS)  # --read-index through that many actors
    args = parser.parse_args()
    if args.committed_rows:
        os.environ[LIMIT_VAR] = str(args.committed_rows)
    if LIMIT_VAR in os.environ:
        import colortrend.plan

        colortrend.plan.COMMITTED_ROWS = int(os.environ[LIMIT_VAR])
    if args.commit:
        commit_all(args.commit)
        return
    if args.index:
        read_index(args.index)
        return
    if args.read_index:
        if args.spread:
            read_spread_index(args.read_index, args.spread)
        else:
            read_whole_index(args.read_index)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.hash_index:
        results = [bench_index(n, args.work, args.index_workers) for n in args.hash_index]
        for result in results:
            print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        if args.json:
            print(json.dumps({"results": results}))
        return
    if args.pending:
        results = [bench_pending(n, args.work) for n in args.pending]
        for result in results:
            print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        if args.json:
            print(json.dumps({"results": results, "growth_mb": round(
                results[-1]["first_status_peak_mb"] - results[0]["first_status_peak_mb"], 1)}))
        return
    results = []
    for n in args.photos:
        result = bench(n, args.work)
        results.append(result)
        print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    if args.json:
        growth = {k: round(results[-1][k] - results[0][k], 1)
                  for k in ("first_status_peak_mb", "first_run_peak_mb", "noop_run_peak_mb", "status_peak_mb",
                            "new_copy_run_peak_mb", "nightly_run_peak_mb", "hash_index_peak_mb")}
        print(json.dumps({"results": results, "growth_mb": growth}))


if __name__ == "__main__":
    main()
