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
