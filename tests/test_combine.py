"""``colortrend combine``: outputs cut by inputs give the table one output holding everything would give."""
from __future__ import annotations

import datetime
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from click.testing import CliRunner

import colortrend
from colortrend.cli import main
from colortrend.color.names import NAMED_COLORS
from colortrend.config import load_from_dict
from colortrend.io.store import Store
from colortrend.pipeline import Pipeline


def commit_persons(out, first: int, n: int, seed: int, shards: int = 2) -> pd.DataFrame:
    """Commit ``n`` one-person photos in ``shards`` shards through the store, as a run commits them; their
    garment rows."""
    cfg = load_from_dict({"name": "x", "input": {"paths": ["x"]}, "output": str(out)})
    pipeline = Pipeline(cfg)
    fingerprints = pipeline.fingerprints()
    store = Store(out)
    store.prepare()
    rng = np.random.default_rng(seed)
    palette = np.array([c.rgb for c in NAMED_COLORS[:6]])
    ids = np.array([f"p{i:06d}" for i in range(first, first + n)])
    year = rng.integers(2015, 2017, n).astype(np.int32)
    age = rng.uniform(10, 50, n).astype(np.float32)
    rgb = palette[rng.integers(0, len(palette), n)].astype(np.uint8)
    known = {"photo_id": ids, "path": np.char.add("/photos/", ids), "status": np.full(n, "ok"),
             "content_hash": np.char.add("h", ids), "taken_year": year, "face_idx": np.zeros(n, np.int32),
             "age": age, "age_sd": np.full(n, 3.0, np.float32), "quality_ok": rng.random(n) > 0.1,
             "dominant_r": rgb[:, 0], "dominant_g": rgb[:, 1], "dominant_b": rgb[:, 2]}
    for s, rows in enumerate(np.array_split(np.arange(n), shards)):
        tables = {name: pa.table({f.name: pa.array(known[f.name][rows], f.type) if f.name in known
                                  else pa.nulls(len(rows), f.type) for f in schema}, schema=schema)
                  for name, schema in pipeline.schemas.items()}
        store.commit_shard(f"s{first}-{s}", tables, {
            "fingerprint": fingerprints[pipeline.stages[-1].name], "stages": fingerprints, "seconds": {},
            "replaces": [], "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    return pd.DataFrame({k: v for k, v in known.items() if k != "path"})


def snapshot(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(folder) for f in files}


def config(tmp_path, output, **histograms) -> str:
    path = tmp_path / f"{os.path.basename(output)}.yaml"
    extra = "".join(f", {k}: {v}" for k, v in histograms.items())
    path.write_text(f"name: year\ninput: {{paths: [{tmp_path}]}}\noutput: {output}\n"
                    f"histograms: {{min_persons: 5, bootstrap: 50{extra}}}\n")
    return str(path)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    a = commit_persons(root / "january", 0, 700, seed=1)
    b = commit_persons(root / "february", 700, 500, seed=2, shards=3)
    for month, age_model in (("january", "aaaa"), ("february", "bbbb")):  # their last runs' models
        (root / month / "_runs" / "latest.json").write_text(f'{{"models": {{"age": "{age_model}", "parser": "cccc"}}}}')
    return root, pd.concat([a, b], ignore_index=True)


def test_combined_table_is_the_table_of_all_persons_and_the_sources_are_untouched(parts, tmp_path):
    root, persons = parts
    sources = [str(root / "january"), str(root / "february")]
    before = {s: snapshot(s) for s in sources}
    result = CliRunner().invoke(main, ["combine", config(tmp_path, tmp_path / "year"), *sources])
    assert result.exit_code == 0, result.output
    assert "combined 2 outputs (5 shards" in result.output
    combined = colortrend.read(str(tmp_path / "year"), "histograms")
    expected = colortrend.histograms(persons, min_persons=5, bootstrap=50)
    keys = ["group_type", "group", "bin_id"]
    got, want = combined.sort_values(keys).reset_index(drop=True), expected.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    page = (tmp_path / "year" / "report" / "index.html").read_text(encoding="utf-8")
    assert "differs between outputs: aaaa, bbbb" in page and "cccc" in page  # other weights are said, not hidden
    assert {s: snapshot(s) for s in sources} == before  # nothing written into what it read, not even partials
    again = CliRunner().invoke(main, ["combine", config(tmp_path, tmp_path / "year"), *sources])
    assert again.exit_code == 0, again.output  # an earlier combine's folder is its own to rewrite


@pytest.mark.parametrize("case, wanted", [
    ("twice", "named twice"),
    ("not-an-output", "holds no committed shard"),
    ("into-a-run-output", "is not a combined output"),
    ("into-a-source", "is the config's output"),
    ("foreign-target", "is not a combined output"),
])
def test_bad_combinations_are_one_line_and_write_nothing(parts, tmp_path, case, wanted):
    root, _ = parts
    january, february = str(root / "january"), str(root / "february")
    target = tmp_path / "year"
    sources = [january, february]
    if case == "twice":
        sources = [january, january]
    elif case == "not-an-output":
        (tmp_path / "empty").mkdir()
        sources = [january, str(tmp_path / "empty")]
    elif case == "into-a-run-output":
        target = root / "february"
        sources = [january]
    elif case == "into-a-source":
        target = root / "january"
    elif case == "foreign-target":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    before = {s: snapshot(s) for s in (january, february)}
    result = CliRunner().invoke(main, ["combine", config(tmp_path, target), *sources])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and wanted in result.output, result.output
    assert {s: snapshot(s) for s in (january, february)} == before
    if case == "foreign-target":
        assert sorted(os.listdir(target)) == ["notes.txt"]


def test_a_run_refuses_a_combined_output(parts, tmp_path):
    root, _ = parts
    target = tmp_path / "year"
    assert CliRunner().invoke(main, ["combine", config(tmp_path, target), str(root / "january")]).exit_code == 0
    (tmp_path / "photos").mkdir()
    result = CliRunner().invoke(main, ["run", config(tmp_path, target)])
    assert result.exit_code == 2 and "output of `colortrend combine`" in result.output, result.output


def test_a_damaged_source_is_one_line_and_a_later_combine_into_the_same_folder_works(parts, tmp_path):
    """A damaged shard in a source stops the combine with one line naming it; the target keeps nothing half
    written, and a later combine (after a kill too) writes there."""
    import shutil

    root, _ = parts
    damaged = tmp_path / "march"
    shutil.copytree(root / "february", damaged)
    garments = sorted((damaged / "garments").glob("part-*.parquet"))[0]
    garments.write_bytes(garments.read_bytes()[:100])
    target = tmp_path / "year"
    result = CliRunner().invoke(main, ["combine", config(tmp_path, target), str(root / "january"), str(damaged)])
    assert result.exit_code == 2 and garments.name in result.output, result.output
    assert not (target / "histograms").exists() and not (target / "report").exists()
    from colortrend.io.lock import LOCK_NAME

    (target / LOCK_NAME).write_text("")  # what a combine killed with -9 leaves behind
    again = CliRunner().invoke(main, ["combine", config(tmp_path, target), str(root / "january")])
    assert again.exit_code == 0, again.output
