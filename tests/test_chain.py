"""The stage chain as code declares it: what each stage reads and adds, checked when a chain is built, and the
partial chains that eval, train and explain build from the real stages."""
from __future__ import annotations

import subprocess
import sys


def test_stages_and_the_parser_vocabulary_import_without_torch():
    """Building a chain, reading a config or knowing which class is a garment loads no network code."""
    code = ("import sys; import colortrend.config, colortrend.pipeline, colortrend.models.parse_classes, "
            "colortrend.models.parser_crops;"
            "from colortrend.stages import age, align, correct, detect, dominant, intake, segment;"
            "print(sorted(m for m in ('torch', 'torchvision', 'facenet_pytorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_stage_reading_what_no_earlier_stage_adds_is_refused_when_the_chain_is_built():
    import pytest

    from colortrend.pipeline import ChainError, check_chain
    from colortrend.stages.detect import DetectStage
    from colortrend.stages.dominant import DominantStage
    from colortrend.stages.intake import InputSettings, IntakeStage

    intake, detect = IntakeStage(InputSettings(paths=("photos",))), DetectStage()
    with pytest.raises(ChainError, match=r"stage dominant reads person_parse, image_wb, which no stage before it adds "
                                         r"\(chain: intake -> detect -> dominant\)"):
        check_chain([intake, detect, DominantStage()])
    with pytest.raises(ChainError, match="stage detect reads status, image"):
        check_chain([detect, intake])  # the right stages in the wrong order
    assert check_chain([intake, detect]) == [intake, detect]


def test_each_stage_reads_and_adds_exactly_what_it_declares(demo_photos):
    """Every stage of the real chain, on a real photo, given only the columns it declares it reads: it runs, and it
    adds every column it declares and nothing else (so the declarations are the data flow, not a comment)."""
    from colortrend.config import default_config
    from colortrend.pipeline import INPUT_COLUMNS, build_stages

    photo = str(demo_photos[0])
    batch: dict = {"photo_id": ["p"], "path": [photo]}
    for stage in build_stages(default_config(photo, device="cpu"), "cpu"):
        # status and error: where any stage marks a photo failed (stages.base.fail)
        given = {k: batch[k] for k in (*INPUT_COLUMNS, *stage.reads, "status", "error") if k in batch}
        out = stage(dict(given))
        added = set(out) - set(given)
        assert added <= set(stage.provides()), (stage.name, added - set(stage.provides()))
        assert set(stage.provides()) <= set(out), (stage.name, set(stage.provides()) - set(out))
        batch.update(out)
    assert batch["status"] == ["ok"] and batch["n_faces"][0] >= 1 and batch["dominant_r"][0][0] is not None


def test_partial_chains_hold_only_the_stages_their_last_stage_needs():
    import pytest

    from colortrend.config import default_config
    from colortrend.pipeline import build_stages

    cfg = default_config(".", device="cpu")
    names = {upto: [s.name for s in build_stages(cfg, "cpu", upto)]
             for upto in ("detect", "age", ("align", "age"), "segment", "dominant")}
    assert names == {"detect": ["intake", "detect"], "age": ["intake", "detect", "age"],
                     ("align", "age"): ["intake", "detect", "align", "age"],
                     "segment": ["intake", "detect", "segment"],
                     "dominant": ["intake", "detect", "segment", "correct", "dominant"]}
    with pytest.raises(ValueError, match="no stage named 'colour'"):
        build_stages(cfg, "cpu", "colour")


def test_eval_age_scores_the_ages_a_run_writes(demo_photos, tmp_path):
    """`eval age` runs the run's own chain with the run's settings: on the same photos and config it predicts, for the
    most confident face, the very age the run stores; and a detect setting applies to it as to a run."""
    import shutil

    import pandas as pd

    from colortrend import read
    from colortrend.config import load_from_dict
    from colortrend.evaluate.age import predict_ages
    from colortrend.run import run

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in demo_photos[:3]:
        shutil.copy(p, photos / p.name)
    raw = {"name": "t", "input": {"paths": [str(photos)], "year": 2016}, "output": str(tmp_path / "out"),
           "device": "cpu", "detect": {"min_score": 0.9}, "histograms": {"bootstrap": 10}}
    cfg = load_from_dict(raw)
    run(cfg, progress=False)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"path": sorted(f"photos/{p.name}" for p in photos.iterdir()), "age": 30}).to_csv(csv, index=False)
    predicted = predict_ages(csv, cfg=cfg).set_index("path")["predicted_age"]

    faces, stored = read(str(tmp_path / "out"), "faces"), read(str(tmp_path / "out"), "photos")
    first = faces[faces["face_idx"] == 0].merge(stored[["photo_id", "path"]], on="photo_id")
    by_name = {"photos/" + p.rsplit("/", 1)[-1]: a for p, a in zip(first["path"], first["age"])}
    assert len(by_name) >= 2 and predicted.notna().sum() == len(by_name)
    for name, age in by_name.items():
        assert abs(predicted[name] - age) < 1e-4, name
    none_kept = load_from_dict({**raw, "detect": {"max_faces": 0}})
    assert predict_ages(csv, cfg=none_kept)["predicted_age"].isna().all()


def test_on_the_device_paths_a_photo_crosses_to_the_device_once_and_no_stage_writes_to_the_shared_copy(
        demo_photos, tmp_path):
    """The whole chain as a GPU host runs it (every torch path, here on the CPU): JPEGs decoded on the device are
    never uploaded again, a PNG is uploaded once and shared by detect, segment and white balance, each person's label
    map once for white balance and the dominant stage, the white-balanced photos never cross; every shared copy still
    holds its array when the chain is done, and the copies go when the batch does."""
    import gc

    import numpy as np
    from PIL import Image

    from colortrend.color.torch_ops import DEVICE_COPIES
    from colortrend.config import default_config
    from colortrend.pipeline import build_stages

    png = tmp_path / "as-png.png"
    Image.open(demo_photos[0]).convert("RGB").save(png)
    paths = [str(p) for p in demo_photos[:5]] + [str(png)]
    held_before = len(DEVICE_COPIES)
    batch: dict = {"photo_id": paths, "path": paths}
    uploaded = DEVICE_COPIES.uploaded_bytes
    for stage in build_stages(default_config(paths[0], device="cpu"), "cpu"):
        stage.ops_device = "cpu"
        batch = stage(batch)
    assert batch["status"] == ["ok"] * len(paths) and sum(len(p) for p in batch["person_parse"]) >= 5
    labels = [parse[2] for parses in batch["person_parse"] for parse in parses if parse is not None]
    crossed = batch["image"][-1].nbytes + sum(label.nbytes for label in labels)  # the PNG and each label map, once
    assert DEVICE_COPIES.uploaded_bytes - uploaded == crossed
    # Photos, white-balanced photos (made on the device) and label maps: each shared copy is its array.
    for array in [*batch["image"], *batch["image_wb"], *labels]:
        shared = DEVICE_COPIES.get(array, "cpu")
        assert not array.flags.writeable and np.array_equal(shared.numpy(), array)
    assert DEVICE_COPIES.uploaded_bytes - uploaded == crossed
    del batch, shared, array, labels
    gc.collect()
    assert len(DEVICE_COPIES) == held_before
