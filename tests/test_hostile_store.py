"""Hostile disks and users against the output store: damaged shards, malformed markers, changed inputs, the output
read as input, symlink loops, the umask, a full disk, a folder in the lock's place. Real runs on small real
photos; each case is what a user would check afterwards (tables, exit code, one line, files left)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import colortrend
from colortrend.cli import main
from colortrend.config import load_config
from colortrend.errors import OutputError
from colortrend.io.discover import discover
from colortrend.io.store import Store
from colortrend.run import run, status
from conftest import encoded, rgb_image


def write_config(folder: Path, inputs, output: Path, **extra) -> Path:
    inputs = inputs if isinstance(inputs, list) else [str(inputs)]
    cfg = {"name": "hostile", "input": {"paths": inputs, "year": 2016}, "output": str(output), "device": "cpu",
           "batch_size": 2, "shard_size": 2, "histograms": {"min_persons": 1, "bootstrap": 20}, **extra}
    path = folder / f"{output.name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def rows(output: Path, table: str = "photos") -> pd.DataFrame:
    return colortrend.read(str(output), table).sort_values("photo_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def committed(tmp_path_factory, demo_photos):
    """A first run over two demo photos and two faceless images, two shards; tests copy its output."""
    root = tmp_path_factory.mktemp("hostile-store")
    photos = root / "photos"
    photos.mkdir()
    for p in demo_photos[:2]:
        shutil.copy(p, photos / p.name)
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (photos / f"plain{i}.png").write_bytes(encoded(rgb_image(color=colour), "PNG"))
    output = root / "out"
    run(load_config(str(write_config(root, photos, output))))
    return photos, output


@pytest.fixture
def copied(committed, tmp_path):
    """A copy of the committed output (same inputs), with its config."""
    photos, output = committed
    out = tmp_path / "out"
    shutil.copytree(output, out, symlinks=True)
    return write_config(tmp_path, photos, out), out


def shard_file(out: Path, table: str) -> Path:
    """The committed file of ``table`` of the first shard that has rows in it."""
    for marker in sorted((out / "_markers").glob("*.json")):
        record = json.loads(marker.read_text())
        if record["rows"].get(table):
            return out / record["files"][table]
    raise AssertionError(f"no shard with {table} rows")


# ---- A damaged committed shard ------------------------------------------------------------------------------------
DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zeroed": lambda p: p.write_bytes(b"\0" * p.stat().st_size),
    "replaced": lambda p: p.write_bytes(p.read_bytes()[:-9] + b"XXXXXXXXX"),  # same size, other bytes
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("table", ["photos", "garments"])
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_shard_is_named_by_readers_and_redone_by_the_next_run(copied, committed, table, how):
    config, out = copied
    before = {name: rows(out, name) for name in ("photos", "garments")}
    damaged = shard_file(out, table)
    DAMAGE[how](damaged)

    info = status(load_config(str(config)))  # never crashes: it names the shard and counts its photos pending
    assert len(info["shards_damaged"]) == 1 and damaged.name in next(iter(info["shards_damaged"].values()))
    assert info["photos_pending"] > 0
    with pytest.raises(OutputError, match=damaged.name):  # the rows are not what was committed: say so
        colortrend.read(str(out), table)
    result = cli("report", config)
    assert result.exit_code == 2 and damaged.name in result.output and len(result.output.splitlines()) == 1

    summary = run(load_config(str(config)))
    assert summary.photos and summary.aggregates == "rebuilt"
    for name, expected in before.items():  # redone: the same rows as before the damage
        pd.testing.assert_frame_equal(rows(out, name).drop(columns=["input_mtime_ns"], errors="ignore"),
                                      expected.drop(columns=["input_mtime_ns"], errors="ignore"),
                                      check_exact=False, rtol=1e-4, atol=1e-3)
    again = status(load_config(str(config)))
    assert again["shards_damaged"] == {} and again["photos_pending"] == 0


def test_markers_written_before_sizes_were_recorded_keep_working(copied):
    config, out = copied
    for marker in (out / "_markers").glob("*.json"):
        record = json.loads(marker.read_text())
        for key in ("bytes", "sha256", "mtime_ns"):
            record.pop(key)
        marker.write_text(json.dumps(record))
    assert status(load_config(str(config)))["photos_pending"] == 0  # nothing to redo
    assert run(load_config(str(config))).photos == {}
    truncated = shard_file(out, "faces")
    DAMAGE["truncated"](truncated)  # still found: the Parquet footer no longer parses
    assert truncated.name in next(iter(status(load_config(str(config)))["shards_damaged"].values()))
    run(load_config(str(config)))
    assert status(load_config(str(config)))["shards_damaged"] == {}


# ---- A marker of the wrong shape ----------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [
    b"not json {",
    b"\xff\xfe",
    b"[1, 2, 3]",
    json.dumps({"fingerprint": "x"}).encode(),  # no files
    json.dumps({"files": {"photos": "../../elsewhere.parquet"}}).encode(),  # names a file it does not own
    json.dumps({"files": {"photos": "photos/part-bad.parquet"}, "rows": {"photos": "many"}}).encode(),
])
def test_a_marker_of_the_wrong_shape_stops_with_one_line_naming_it(copied, content):
    config, out = copied
    (out / "_markers" / "bad.json").write_bytes(content)
    files_before = sorted(p for p in out.rglob("*") if p.is_file())
    for command in ("run", "status", "report"):
        result = cli(command, config)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and "_markers/bad.json" in result.output
    files_after = sorted(p for p in out.rglob("*") if p.is_file())
    assert files_after == files_before  # nothing deleted or moved on a guess


# ---- Changed inputs -----------------------------------------------------------------------------------------------
@pytest.fixture
def own_inputs(tmp_path):
    photos = tmp_path / "in"
    photos.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (photos / f"p{i}.png").write_bytes(encoded(rgb_image(color=colour), "PNG"))
    config = write_config(tmp_path, photos, tmp_path / "out")
    run(load_config(str(config)))
    return photos, config, tmp_path / "out"


def test_a_photo_replaced_under_the_same_name_is_analysed_again(own_inputs):
    photos, config, out = own_inputs
    before = rows(out)
    (photos / "p1.png").write_bytes(encoded(rgb_image(80, 60, color=(250, 250, 0)), "PNG"))
    info = status(load_config(str(config)))
    assert info["photos_changed"] == 1 and info["photos_pending"] >= 1
    run(load_config(str(config)))
    after = rows(out)
    assert len(after) == len(before) == 3
    changed = after[after.path.str.endswith("p1.png")].iloc[0]
    old_hash = before[before.path.str.endswith("p1.png")].iloc[0].content_hash
    assert changed.width == 80 and changed.content_hash != old_hash
    assert changed.input_bytes == (photos / "p1.png").stat().st_size
    assert status(load_config(str(config)))["photos_pending"] == 0


def test_same_size_other_bytes_are_noticed_by_mtime(own_inputs):
    photos, config, out = own_inputs
    target = photos / "p0.png"
    data = encoded(rgb_image(color=(201, 30, 30)), "PNG")
    assert len(data) == target.stat().st_size  # same size: only the mtime tells
    target.write_bytes(data)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    assert status(load_config(str(config)))["photos_changed"] == 1


def test_an_error_row_of_a_file_caught_mid_copy_is_retried_once_it_is_whole(own_inputs):
    photos, config, out = own_inputs
    whole = encoded(rgb_image(300, 200, color=(10, 120, 60)), "JPEG")
    (photos / "late.jpg").write_bytes(whole[:40])  # the copy is still running at 02:00
    run(load_config(str(config)))
    assert rows(out).set_index("path").loc[str(photos / "late.jpg"), "status"] == "error"
    (photos / "late.jpg").write_bytes(whole)
    run(load_config(str(config)))
    row = rows(out).set_index("path").loc[str(photos / "late.jpg")]
    assert row.status == "no_face" and row.width == 300 and len(rows(out)) == 4


# ---- The output read as input --------------------------------------------------------------------------------------
def test_an_output_inside_its_input_folder_is_never_ingested(tmp_path, own_inputs):
    photos, _, _ = own_inputs
    nested = photos / "results"
    config = write_config(tmp_path, photos, nested)
    for _ in range(2):  # the second run sees the first one's Parquet, JSON and PNGs, and must ignore them
        run(load_config(str(config)))
    assert sorted(Path(p).name for p in rows(nested).path) == ["p0.png", "p1.png", "p2.png"]
    assert status(load_config(str(config)))["photos_pending"] == 0


@pytest.mark.parametrize("way", ["symlinked output", "glob", "manifest", "symlinked file"])
def test_the_output_is_not_listed_however_an_input_reaches_it(tmp_path, own_inputs, way):
    photos, _, out = own_inputs  # out: a committed output, beside the inputs
    inside = photos / "out-here"
    shutil.copytree(out, inside)
    exclude = str(inside)
    if way == "symlinked output":  # the output named through a link: its real path is inside the input
        os.symlink(photos, tmp_path / "link")
        exclude = str(tmp_path / "link" / "out-here")
        entry = str(photos)
    elif way == "glob":
        entry = str(photos / "**")
    elif way == "manifest":
        listed = [str(p.relative_to(photos)) for p in photos.rglob("*") if p.is_file()]
        (tmp_path / "list.csv").write_text("path\n" + "\n".join(f"in/{p}" for p in listed) + "\n")
        entry = str(tmp_path / "list.csv")
    else:  # a symlinked file pointing into the output
        os.symlink(inside / "_runs" / "latest.json", photos / "innocent.jpg")
        entry = str(photos)
    found = discover((entry,), exclude=exclude)
    assert sorted(Path(p).name for p in found) == ["p0.png", "p1.png", "p2.png"]


def test_an_input_inside_the_output_is_a_config_error(own_inputs, tmp_path):
    _, _, out = own_inputs
    config = write_config(tmp_path, str(out / "photos"), out)
    result = cli("run", config)
    assert result.exit_code == 2 and "inside the output folder" in result.output


# ---- Symlink loops in globs ---------------------------------------------------------------------------------------
def test_glob_and_walk_never_follow_symlink_loops(tmp_path):
    root = tmp_path / "loops"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"a")
    (root / "sub" / "b.jpg").write_bytes(b"b")
    os.symlink(root, root / "sub" / "up")  # two loops
    os.symlink(root / "sub", root / "sub" / "self")
    os.symlink(root, tmp_path / "again")  # the same folder through a link: listed once
    expected = [str(root / "a.jpg"), str(root / "sub" / "b.jpg")]
    for pattern in ("**", "**/*.jpg", "*/**/*.jpg", "**/"):
        found = discover((str(root / pattern),))
        assert sorted(found) == sorted(expected) or (pattern == "*/**/*.jpg" and found == expected[1:]), pattern
    assert discover((str(root), str(tmp_path / "again"))) == expected


# ---- Permissions ---------------------------------------------------------------------------------------------------
def test_files_and_folders_honour_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        store = Store(tmp_path / "out")
        store.prepare()
        import pyarrow as pa

        table = pa.table({"photo_id": ["a"], "x": [1.0]})
        store.commit_shard("s", {"photos": table, "faces": table, "garments": table}, {"fingerprint": "f"})
        store.write_json("_runs/latest.json", {"a": 1})
        from colortrend.io.lock import RunLock

        with RunLock(tmp_path / "out"):
            lock_mode = stat.S_IMODE(os.stat(tmp_path / "out" / "_lock").st_mode)
    finally:
        os.umask(old)
    assert lock_mode == 0o664
    for path in (tmp_path / "out").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o775 if path.is_dir() else 0o664), (path, oct(mode))


# ---- A full disk --------------------------------------------------------------------------------------------------
def test_a_full_disk_while_writing_shards_is_one_line_and_leaves_nothing_half_written(own_inputs, monkeypatch):
    import colortrend.io.store as store_module

    photos, config, out = own_inputs
    for i in range(3, 7):
        (photos / f"p{i}.png").write_bytes(encoded(rgb_image(color=(i * 30, 90, 90)), "PNG"))
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "_runs" not in p.parts)
    real_write = store_module._write
    written = []

    def write(fd, data):
        written.append(len(data))
        if len(written) > 2:  # the first shard's index delta and photos file go in; then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(store_module, "_write", write)
    result = cli("run", config, "--no-progress")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "No space left on device" in result.output and str(out) in result.output
    after = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and "_runs" not in p.parts)
    assert after == before  # no staged file, no hidden temporary, no new part or marker
    assert not (out / "_lock").exists()  # released
    monkeypatch.setattr(store_module, "_write", real_write)
    assert cli("run", config, "--no-progress").exit_code == 0
    assert len(rows(out)) == 7


# ---- A folder in the lock's place ---------------------------------------------------------------------------------
def test_a_lock_path_that_is_a_folder_is_one_line_exit_2(copied):
    config, out = copied
    (out / "_lock").mkdir()
    result = cli("run", config, "--no-progress")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "_lock is a folder" in result.output
    assert cli("status", config).exit_code == 0  # status still answers


# ---- The content-hash index ---------------------------------------------------------------------------------------
def by_name(out: Path) -> pd.DataFrame:
    return rows(out).assign(name=lambda df: df.path.map(lambda p: Path(p).name)).set_index("name")


def test_a_new_copy_of_an_old_photo_is_its_duplicate_and_a_run_reads_one_partition(own_inputs, monkeypatch):
    from colortrend.io.hash_index import HashIndex

    photos, config, out = own_inputs
    shutil.copy(photos / "p1.png", photos / "p1 again.png")
    read_partitions = []
    real_load = HashIndex._load
    monkeypatch.setattr(HashIndex, "_load", lambda self, prefix: read_partitions.append(prefix) or
                        real_load(self, prefix))
    summary = run(load_config(str(config)))
    assert summary.photos == {"duplicate": 1}
    table = by_name(out)
    assert table.loc["p1 again.png", "duplicate_of"] == table.loc["p1.png", "photo_id"]
    assert read_partitions == [table.loc["p1.png", "content_hash"][:2]]  # one photo, one partition


def test_a_redone_shard_is_no_duplicate_of_itself_and_its_old_bytes_are_forgotten(own_inputs):
    photos, config, out = own_inputs
    old_bytes = (photos / "p1.png").read_bytes()
    assert run(load_config(str(config)), full=True).photos == {"no_face": 3}  # every shard replaced in place
    (photos / "p1.png").write_bytes(encoded(rgb_image(80, 60, color=(250, 250, 0)), "PNG"))
    run(load_config(str(config)))  # p1's shard is redone under the same id, with other bytes
    (photos / "old p1.png").write_bytes(old_bytes)
    shutil.copy(photos / "p1.png", photos / "new p1.png")
    summary = run(load_config(str(config)))
    table = by_name(out)
    assert summary.photos == {"no_face": 1, "duplicate": 1}
    assert table.loc["old p1.png", "status"] == "no_face"  # those bytes are no longer committed anywhere
    assert table.loc["new p1.png", "duplicate_of"] == table.loc["p1.png", "photo_id"]
    assert len(list((out / "_index" / "hashes" / "delta").iterdir())) == len(list((out / "_markers").iterdir()))


def test_an_index_written_by_a_commit_killed_before_its_marker_does_not_count(own_inputs):
    import pyarrow as pa

    from colortrend.io import hash_index
    from colortrend.io.store import parquet_bytes

    photos, config, out = own_inputs
    late = encoded(rgb_image(color=(9, 99, 199)), "PNG")
    (photos / "late.png").write_bytes(late)
    ghost = pa.table({"content_hash": [hashlib.sha256(late).hexdigest()], "status": ["no_face"],
                      "photo_id": ["0123456789abcdef"]})
    # what a run killed after writing a shard's index delta, before its marker (the commit point), leaves
    stray = out / hash_index.delta_path("feedfacefeedface", "0badc0de")
    stray.write_bytes(parquet_bytes(hash_index.entries(ghost, "feedfacefeedface", "0badc0de")))
    summary = run(load_config(str(config)))
    assert summary.photos == {"no_face": 1} and any("feedfacefeedface" in a for a in summary.recovered)
    assert not stray.exists()


def test_an_output_written_before_the_index_gets_it_built_once(own_inputs):
    photos, config, out = own_inputs
    shutil.rmtree(out / "_index")
    for marker in (out / "_markers").glob("*.json"):  # as runs before the index wrote them
        record = json.loads(marker.read_text())
        del record["hash_index"]
        marker.write_text(json.dumps(record))
    assert run(load_config(str(config))).shards == 0  # nothing new: nothing is built
    shutil.copy(photos / "p2.png", photos / "p2 again.png")
    assert run(load_config(str(config))).photos == {"duplicate": 1}
    table = by_name(out)
    assert table.loc["p2 again.png", "duplicate_of"] == table.loc["p2.png", "photo_id"]
    markers = [json.loads(m.read_text()) for m in (out / "_markers").glob("*.json")]
    assert all("hash_index" in m for m in markers)
    assert len(list((out / "_index" / "hashes" / "delta").iterdir())) == len(markers)
    assert status(load_config(str(config)))["photos_pending"] == 0
