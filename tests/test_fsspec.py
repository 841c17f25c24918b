"""Inputs and outputs behind fsspec URLs: the in-memory filesystem stands in for s3:// and friends."""
from __future__ import annotations

import shutil
import uuid

import fsspec
import pandas as pd
import pytest

from colortrend import read
from colortrend.config import load_from_dict
from colortrend.errors import ConfigError
from colortrend.io.discover import discover
from colortrend.run import run, status

N_PHOTOS = 3


@pytest.fixture
def memory():
    """A fresh prefix on fsspec's memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    prefix = f"/t-{uuid.uuid4().hex}"
    yield fs, f"memory://{prefix}"
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


def config(inputs: list[str], output: str, **extra):
    return load_from_dict({"name": "fsspec", "input": {"paths": inputs, "year": 2016}, "output": output,
                           "device": "cpu", "batch_size": 4, "shard_size": 2,
                           "histograms": {"min_persons": 1, "bootstrap": 20}, **extra})


def by_file_name(output: str) -> dict[str, pd.DataFrame]:
    """The tables with photo ids (hashes of the full path) replaced by file names, to compare across filesystems."""
    photos = read(output, "photos")
    name = dict(zip(photos["photo_id"], photos["path"].str.rsplit("/", n=1).str[-1]))
    out = {}
    for table in ("photos", "faces", "garments"):
        df = read(output, table).drop(columns=["path", "duplicate_of"], errors="ignore")
        df["photo_id"] = df["photo_id"].map(name)
        keys = [k for k in ("photo_id", "face_idx") if k in df.columns]
        out[table] = df.sort_values(keys).reset_index(drop=True)
    return out


def test_memory_filesystem_end_to_end_equals_a_local_run(memory, demo_photos, tmp_path):
    fs, root = memory
    local_in = tmp_path / "photos"
    local_in.mkdir()
    for photo in demo_photos[:N_PHOTOS]:
        fs.pipe_file(f"{root}/photos/{photo.name}", photo.read_bytes())
        shutil.copy(photo, local_in / photo.name)
    for folder in (f"{root}/photos", str(local_in)):
        fsspec.open(f"{folder}/not-a-photo.jpg", "wb").open().close()  # zero bytes: an error row, not a crash
    fs.pipe_file(f"{root}/photos/.cache/thumb.jpg", demo_photos[0].read_bytes())  # hidden folders are not inputs

    summary = run(config([f"{root}/photos"], f"{root}/out"), progress=False)
    assert sum(summary.photos.values()) == N_PHOTOS + 1 and summary.shards == 2
    photos = read(f"{root}/out", "photos")
    assert photos["path"].str.startswith(f"{root}/photos/").all()
    assert dict(photos.groupby("status").size()) == {"ok": N_PHOTOS, "error": 1}
    assert fs.exists(f"{root}/out/report/index.html") and fs.glob(f"{root}/out/report/*.png")
    assert fs.find(f"{root}/out/_staging") == [] and not fs.exists(f"{root}/out/_lock")

    run(config([str(local_in)], str(tmp_path / "out")), progress=False)
    remote, local = by_file_name(f"{root}/out"), by_file_name(str(tmp_path / "out"))
    for table in remote:
        pd.testing.assert_frame_equal(remote[table], local[table], check_exact=False, rtol=1e-4, atol=1e-3, obj=table)

    cfg = config([f"{root}/photos"], f"{root}/out")
    rerun = run(cfg, progress=False)
    assert rerun.shards == 0 and rerun.aggregates == "up to date"
    fs.pipe_file(f"{root}/photos/new/{demo_photos[N_PHOTOS].name}", demo_photos[N_PHOTOS].read_bytes())
    incremental = run(cfg, progress=False)
    assert sum(incremental.photos.values()) == 1 and incremental.aggregates == "rebuilt"
    state = status(cfg)
    assert state["photos_committed"] == N_PHOTOS + 2 and state["photos_pending"] == 0
    assert state["report"] == f"memory://{root[len('memory://'):]}/out/report/index.html"


def test_remote_globs_and_manifests(memory):
    fs, root = memory
    for name in ("a.jpg", "b.png", "sub/c.jpg", ".hidden/d.jpg"):
        fs.pipe_file(f"{root}/in/{name}", b"x")
    fs.pipe_file(f"{root}/list.csv", b"path\nin/a.jpg\nin/sub/c.jpg\n")  # relative to the manifest
    assert discover((f"{root}/in/**/*.jpg",)) == [f"{root}/in/a.jpg", f"{root}/in/sub/c.jpg"]
    assert discover((f"{root}/list.csv",)) == [f"{root}/in/a.jpg", f"{root}/in/sub/c.jpg"]
    assert len(discover((f"{root}/in",))) == 3
    with pytest.raises(ConfigError, match=r"input.paths\[0\]: .* does not exist"):
        discover((f"{root}/nowhere",))
    with pytest.raises(ConfigError, match=r"input.paths\[0\]: pattern .* matches no file"):
        discover((f"{root}/in/*.tif",))


def test_unknown_protocol_and_memory_on_ray_are_config_errors(memory, tmp_path):
    _, root = memory
    with pytest.raises(ConfigError, match=r"input.paths\[0\]: 'nosuchfs://bucket/photos'"):
        discover(("nosuchfs://bucket/photos",))
    with pytest.raises(ConfigError, match="memory://.*Ray"):
        run(config([str(tmp_path)], f"{root}/out"), executor="ray", progress=False)


def test_file_urls_are_local_paths(tmp_path, demo_photos):
    (tmp_path / "a.jpg").write_bytes(demo_photos[0].read_bytes())
    assert discover((f"file://{tmp_path}",)) == discover((str(tmp_path),)) == [str(tmp_path / "a.jpg")]
