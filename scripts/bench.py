"""Benchmark: the whole colortrend pipeline vs the bare facenet-pytorch MTCNN loop, on the same photos.

Both run as fresh processes (cold: imports and model loading included), one after the other, on the same device.
Prints one JSON object: photos/s of each (over the whole process and over the processing loop alone), their
ratio, colortrend's time per stage, and peak resident memory of each process.

It also measures the GPU budget on the CPU: in a third process the chain runs twice over the photos (the first
pass loads the models), timing every outermost ``torch.nn.Module`` call. What is left of each stage's time is the
work around the networks (decode, pyramids and NMS, warps, crops, white balance, k-means, tables), the part a GPU
host must feed from its CPU cores: ``cpu_ms_per_photo_outside_networks`` and the cores it takes at 2,000 photos/s.
A third pass runs the chain as a GPU host does (every stage's torch path for the device, on this CPU) and clocks
every outermost torch call: what is left is work only the host can do (``device_paths``: ms a photo by stage, and
the torch calls a photo that a GPU would run as launches, which the figure leaves out). The model stages' part of
it is what one process holding the models spends a photo: the most photos/s one such process can feed a GPU.

    python scripts/bench.py data/demo --device cpu --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FACENET_LOOP = r"""
import json, sys, time
from pathlib import Path
import torch
from PIL import Image
from facenet_pytorch import MTCNN
paths = sorted(p for p in Path(sys.argv[1]).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
mtcnn = MTCNN(keep_all=True, device=sys.argv[2], min_face_size=int(sys.argv[3]))
t0 = time.perf_counter()
faces = 0
for p in paths:
    boxes, probs, landmarks = mtcnn.detect(Image.open(p).convert("RGB"), landmarks=True)
    faces += 0 if boxes is None else len(boxes)
print(json.dumps({"photos": len(paths), "faces": faces, "loop_s": time.perf_counter() - t0}))
"""


BUDGET = r"""
import contextlib, json, sys, threading, time
import torch
from colortrend.config import default_config
from colortrend.io.discover import discover, photo_id_for
from colortrend.pipeline import Pipeline, ShardTask

torch.set_num_threads(int(sys.argv[3]))
paths = discover((sys.argv[1],))
cfg = default_config(sys.argv[1], device=sys.argv[2])
pipeline = Pipeline(cfg, device=sys.argv[2])
local = threading.local()
network = {}
networks = {}  # every module called outermost: the networks, hooked alone in the device-path passes

def pre(module, args):  # only the outermost module call counts: a network, not its layers
    local.depth = getattr(local, "depth", 0) + 1
    if local.depth == 1:
        local.t0, local.owner = time.perf_counter(), type(module).__name__
        networks[id(module)] = module

def post(module, args, out):
    local.depth -= 1
    if local.depth == 0:
        if sys.argv[2] == "cuda":
            torch.cuda.synchronize()
        network[local.owner] = network.get(local.owner, 0.0) + time.perf_counter() - local.t0

task = ShardTask("budget", [photo_id_for(p) for p in paths], paths)

def serial_pass(clock=None):  # one thread, step after step: each stage's time is its own, nothing beside it
    seconds = {}
    steps = pipeline.steps({})
    for batch in pipeline.batches([task]):
        for step in steps:
            if clock is not None:
                clock.stage = step.name
            batch = step(batch)
        if clock is not None:
            clock.stage = "tables"
        started = time.perf_counter()
        parts = pipeline.shard_parts(batch)
        seconds["tables"] = seconds.get("tables", 0.0) + time.perf_counter() - started
        for part in parts:
            for name, value in part.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + value
    return seconds

serial_pass()  # warm-up: models load, caches fill
hooks = (torch.nn.modules.module.register_module_forward_pre_hook(pre),
         torch.nn.modules.module.register_module_forward_hook(post))
network.clear()
stage_s = serial_pass()
for hook in hooks:
    hook.remove()

# As a GPU host runs the chain: every stage that has a torch path for the device takes it (JPEG decode, white
# balance, k-means, the parser's mapping back), here on this CPU, and every outermost torch call is clocked. What
# is left of a stage's time is work only the host can do (Python, numpy, OpenCV, reading files): on a GPU the
# torch calls become launches of device work, so the figure leaves out the launches themselves (counted).
# Reading a tensor's attribute (.shape, .dtype) goes through the clock too: host work, not a launch.
# Forward passes of the networks are also clocked whole: the budget the issue sets is the host's work outside them.
# (Inside them, the Python between layers reads several times slower here than a GPU host would spend, as it runs
# with caches the CPU's own arithmetic has just flushed: the parser's 135 calls leave 17 ms between them at 16
# crops, 1.8 ms at one 32-px input.)
for stage in pipeline.stages:
    stage.ops_device = "cpu"

class TorchClock(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.depth, self.stage, self.in_network, self.network_t0 = 0, None, 0, 0.0
        self.figures = {}  # (stage, what) -> calls or seconds

    def add(self, what, value):
        key = (self.stage, what)
        self.figures[key] = self.figures.get(key, 0) + value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.depth == 0 and getattr(func, "__name__", None) == "__get__":
            self.add("attribute_reads", 1)
            return func(*args, **(kwargs or {}))
        self.depth += 1
        t0 = time.perf_counter() if self.depth == 1 else 0.0
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.depth -= 1
            if self.depth == 0:
                elapsed = time.perf_counter() - t0
                where = "in_networks" if self.in_network else "outside_networks"
                self.add("calls_" + where, 1)
                self.add("torch_s_" + where, elapsed)

    def enter_network(self, module, args):
        self.in_network += 1
        if self.in_network == 1:
            self.add("forwards", 1)
            self.network_t0 = time.perf_counter()

    def leave_network(self, module, args, out):
        self.in_network -= 1
        if self.in_network == 0:
            self.add("network_s", time.perf_counter() - self.network_t0)

def clock_overhead(calls=5000, pairs=9):  # what the clock adds to the host's side: tiny calls, attribute reads
    x = torch.zeros(4)
    added = []
    for work in (lambda: x.add(1), lambda: x.shape):
        differences = []  # the median of several pairs: one pair swings by several microseconds on a busy machine
        for _ in range(pairs):
            walls = []
            for clocked in (False, True):
                with TorchClock() if clocked else contextlib.nullcontext():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        work()
                    walls.append(time.perf_counter() - t0)
            differences.append((walls[1] - walls[0]) / calls)
        added.append(max(0.0, sorted(differences)[pairs // 2]))
    return added  # per call, per attribute read

serial_pass()  # warm-up of the torch paths
overhead, read_overhead = clock_overhead()
from colortrend.color.torch_ops import DEVICE_COPIES

passes = []  # three, as the host's share is a small difference of two larger times: the medians are reported
for _ in range(3):
    uploaded = DEVICE_COPIES.uploaded_bytes
    with TorchClock() as clock:
        # Hooks on the networks alone: global ones would also run at every layer, inside the forward passes.
        hooks = [hook for net in networks.values() for hook in (net.register_forward_pre_hook(clock.enter_network),
                                                                 net.register_forward_hook(clock.leave_network))]
        try:
            seconds = serial_pass(clock)
        finally:
            for hook in hooks:
                hook.remove()
    clocked = {}
    for (stage, what), value in clock.figures.items():
        clocked.setdefault(stage, {})[what] = value
    passes.append({"stage_s": seconds, "clocked": clocked,
                   "uploaded_bytes": DEVICE_COPIES.uploaded_bytes - uploaded})
print(json.dumps({"photos": len(paths), "stage_s": stage_s, "network_s": network, "device_paths": passes,
                  "clock_overhead_s": overhead, "read_overhead_s": read_overhead,
                  "model_stages": [stage.name for stage in pipeline.stages if stage.uses_accelerator]}))
"""


def timed_process(cmd: list[str], env: dict) -> tuple[float, str, float]:
    """Wall seconds, stdout and peak RSS (MB) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/env", "python", "-c",
         "import resource, subprocess, sys, json; p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
         "sys.stderr.write(p.stderr); print(p.stdout);"
         "print(json.dumps({'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}));"
         "sys.exit(p.returncode)", *cmd],
        capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return wall, "\n".join(lines[:-1]), json.loads(lines[-1])["peak_mb"]


def run_colortrend(photos: Path, device: str, env: dict, **settings) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(json.dumps({"name": "bench", "input": {"paths": [str(photos)], "year": 2016},
                                      "output": str(Path(tmp) / "out"), "device": device, **settings}))
        command = [sys.executable, "-m", "colortrend.cli", "run", str(config), "--no-progress"]
        wall, _, peak = timed_process(command, env)
        record = json.loads((Path(tmp) / "out" / "_runs" / "latest.json").read_text())
    summary = record["summary"]
    photos_n = sum(summary["photos"].values())
    stages = summary["stage_seconds"]
    return {"wall_s": wall, "photos": photos_n, "faces": summary["faces"], "persons": summary["persons"],
            "stage_s": stages, "analyse_s": summary.get("analysis_seconds", sum(stages.values())), "peak_mb": peak}


def run_facenet(photos: Path, device: str, min_face: int, env: dict) -> dict:
    wall, out, peak = timed_process([sys.executable, "-c", FACENET_LOOP, str(photos), device, str(min_face)], env)
    result = json.loads(out.splitlines()[-1])
    return {"wall_s": wall, "photos": result["photos"], "faces": result["faces"], "loop_s": result["loop_s"],
            "peak_mb": peak}


def run_budget(photos: Path, device: str, threads: int, env: dict) -> dict:
    _, out, _ = timed_process([sys.executable, "-c", BUDGET, str(photos), device, str(threads)], env)
    result = json.loads(out.splitlines()[-1])
    n, stage_s, network_s = result["photos"], result["stage_s"], result["network_s"]
    outside_ms = (sum(stage_s.values()) - sum(network_s.values())) / n * 1000
    passes = result["device_paths"]
    overhead, read_overhead = result["clock_overhead_s"], result["read_overhead_s"]

    def host_share(count_forwards_whole: bool) -> dict[str, float]:
        """Each stage's host-only work, ms a photo (median of the passes): its time less its clocked torch calls and
        what clocking them added (calibrated per call); with ``count_forwards_whole``, less its networks' forward
        passes too (the issue's budget), otherwise with the Python inside them kept as host work."""
        def one(p: dict, stage: str) -> float:
            c = p["clocked"].get(stage, {})
            clocked = (c.get("torch_s_outside_networks", 0.0) + overhead * c.get("calls_outside_networks", 0)
                       + read_overhead * c.get("attribute_reads", 0))
            if count_forwards_whole:
                clocked += c.get("network_s", 0.0)
            else:
                clocked += c.get("torch_s_in_networks", 0.0) + overhead * c.get("calls_in_networks", 0)
            return (p["stage_s"][stage] - clocked) / n * 1000
        return {k: statistics.median(one(p, k) for p in passes) for k in passes[0]["stage_s"]}

    def per_photo(key: str) -> float:
        return sum(c.get(key, 0) for c in passes[0]["clocked"].values()) / n

    host_ms_by_stage = host_share(count_forwards_whole=True)
    host_ms = sum(host_ms_by_stage.values())
    with_forwards_by_stage = host_share(count_forwards_whole=False)
    with_forwards = sum(with_forwards_by_stage.values())
    # The model stages' share runs in the processes that hold the models: what one of them spends a photo caps
    # what it can feed its GPU (Ray gives each GPU gpu_workers of them; the local runner is one process).
    model_ms = sum(host_ms_by_stage.get(name, 0.0) for name in result["model_stages"])
    return {"photos": n, "torch_threads": threads, "stage_s": stage_s, "network_s": network_s,
            "stage_ms_per_photo": {k: v / n * 1000 for k, v in stage_s.items()},
            "cpu_ms_per_photo_outside_networks": outside_ms,
            "cores_for_2000_photos_per_s": 2000 * outside_ms / 1000,
            # The chain on its device paths: the host's own work per photo outside the networks' forward passes,
            # leaving out the torch calls a GPU runs (their launches: torch_calls_per_photo of them).
            "device_paths": {"host_ms_per_photo": host_ms, "host_ms_per_photo_by_stage": host_ms_by_stage,
                             # launches on a GPU: outside the forward passes, and inside them
                             "torch_calls_per_photo": per_photo("calls_outside_networks")
                             + per_photo("calls_in_networks"),
                             "torch_calls_in_forwards_per_photo": per_photo("calls_in_networks"),
                             "network_forwards_per_photo": per_photo("forwards"),
                             # the same with the Python inside the forward passes kept as host work, as this CPU
                             # runs it (an upper bound: see the comment in BUDGET)
                             "host_ms_per_photo_with_python_in_forwards": with_forwards,
                             "host_ms_per_photo_by_stage_with_python_in_forwards": with_forwards_by_stage,
                             # what crosses to the device after intake (photos not decoded there, label maps)
                             "uploaded_mb_per_photo": passes[0]["uploaded_bytes"] / n / 1e6,
                             "clock_overhead_us_per_call": overhead * 1e6,
                             "clock_overhead_us_per_attribute_read": read_overhead * 1e6,
                             "attribute_reads_per_photo": per_photo("attribute_reads"),
                             "cores_for_2000_photos_per_s": 2000 * host_ms / 1000,
                             "model_stages_host_ms_per_photo": model_ms,
                             "photos_per_s_one_model_process_feeds": 1000 / model_ms if model_ms else None,
                             "model_processes_for_2000_photos_per_s": 2000 * model_ms / 1000}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photos", type=Path, help="folder of photos")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; medians are reported")
    ap.add_argument("--facenet-min-face", type=int, default=20, help="facenet-pytorch's default min_face_size")
    ap.add_argument("--cpu-workers", type=int, help="colortrend's cpu_workers setting (default: its default)")
    ap.add_argument("--json", action="store_true", help="print only the figures, as one JSON object on one line")
    ap.add_argument("--budget-threads", type=int, default=1,
                    help="torch threads for the GPU-budget pass (1: milliseconds of one core)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    runs = {"colortrend": [], "facenet": []}
    for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits both alike
        settings = {} if args.cpu_workers is None else {"cpu_workers": args.cpu_workers}
        runs["colortrend"].append(run_colortrend(args.photos, args.device, env, **settings))
        runs["facenet"].append(run_facenet(args.photos, args.device, args.facenet_min_face, env))
    budget = run_budget(args.photos, args.device, args.budget_threads, env)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    n = runs["colortrend"][0]["photos"]
    ct_wall, fn_wall = med("colortrend", "wall_s"), med("facenet", "wall_s")
    ct_loop, fn_loop = med("colortrend", "analyse_s"), med("facenet", "loop_s")
    stage_names = runs["colortrend"][0]["stage_s"].keys()
    figures = {
        "photos": n,
        "device": args.device,
        "cpu_workers": args.cpu_workers,
        "repeat": args.repeat,
        "colortrend": {"photos_per_s_process": n / ct_wall, "photos_per_s_analysis": n / ct_loop,
                       "wall_s": ct_wall, "peak_mb": med("colortrend", "peak_mb"),
                       "faces": runs["colortrend"][0]["faces"], "persons": runs["colortrend"][0]["persons"],
                       "stage_s": {s: statistics.median(r["stage_s"][s] for r in runs["colortrend"])
                                   for s in stage_names}},
        "facenet_mtcnn_loop": {"photos_per_s_process": n / fn_wall, "photos_per_s_loop": n / fn_loop,
                               "wall_s": fn_wall, "peak_mb": med("facenet", "peak_mb"),
                               "faces": runs["facenet"][0]["faces"], "min_face_size": args.facenet_min_face},
        "ratio_process": fn_wall / ct_wall,
        "ratio_loop": fn_loop / ct_loop,
        "gpu_budget": budget,
        "cpu_ms_per_photo_outside_networks": budget["cpu_ms_per_photo_outside_networks"],
        "cores_for_2000_photos_per_s": budget["cores_for_2000_photos_per_s"],
        "host_ms_per_photo_on_device_paths": budget["device_paths"]["host_ms_per_photo"],
    }
    if not args.json:
        ct, fn = figures["colortrend"], figures["facenet_mtcnn_loop"]
        print(f"{n} photos, {args.repeat} runs each, medians")
        print(f"colortrend run      {ct['photos_per_s_process']:.2f} photos/s (process), "
              f"{ct['photos_per_s_analysis']:.2f} (analysis), peak {ct['peak_mb']:.0f} MB")
        print(f"facenet MTCNN loop  {fn['photos_per_s_process']:.2f} photos/s (process), "
              f"{fn['photos_per_s_loop']:.2f} (loop), peak {fn['peak_mb']:.0f} MB")
        print(f"ratio               {figures['ratio_process']:.2f}x (process), {figures['ratio_loop']:.2f}x (loop)")
        print("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in ct["stage_s"].items()))
        print(f"outside networks    {budget['cpu_ms_per_photo_outside_networks']:.1f} ms/photo of one core: "
              f"{budget['cores_for_2000_photos_per_s']:.0f} cores feed 2,000 photos/s")
        paths = budget["device_paths"]
        print(f"on device paths     {paths['host_ms_per_photo']:.1f} ms/photo of host-only work outside forward passes "
              f"({paths['host_ms_per_photo_with_python_in_forwards']:.1f} with the Python inside them; "
              f"{paths['torch_calls_per_photo']:.0f} torch calls a photo left to the device)")
        print(f"model stages        {paths['model_stages_host_ms_per_photo']:.1f} ms/photo of it: one process feeds "
              f"a GPU at most {paths['photos_per_s_one_model_process_feeds']:.0f} photos/s "
              f"({paths['model_processes_for_2000_photos_per_s']:.0f} of them for 2,000/s)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
