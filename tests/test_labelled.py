"""The one labelled-data module: both label formats, their fixed validation splits, and that evaluation and
training read labels through it (the split `train` holds out is the split `eval --split val` scores)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from colortrend.errors import ConfigError
from colortrend.labelled import is_validation, read_age_labels, read_mask_labels, validation_mask


def test_age_labels_exact_and_banded(tmp_path):
    exact = tmp_path / "exact.csv"
    exact.write_text("path,age,race\nimages/a.jpg,31,White\nimages/b.jpg,7,Black\n")
    labels = read_age_labels(exact)
    assert labels["age"].tolist() == [31, 7] and (labels["age_lo"] == labels["age"]).all()
    assert (labels["age_hi"] == labels["age"]).all() and labels["group"].tolist() == ["White", "Black"]
    assert labels["file"].tolist() == [str(tmp_path / "images/a.jpg"), str(tmp_path / "images/b.jpg")]
    bands = tmp_path / "bands.csv"
    bands.write_text("path,age_lo,age_hi\nc.jpg,10,19\n")
    labels = read_age_labels(bands)
    assert labels["age"].isna().all() and labels[["age_lo", "age_hi"]].values.tolist() == [[10, 19]]
    assert labels["group"].isna().all()


@pytest.mark.parametrize("text, message", [("path,years\na.jpg,20\n", "expected columns path and age"),
                                           ("path,age\na.jpg,20\nb.jpg,old\n", "row 3 has no valid age")])
def test_bad_age_labels_name_the_problem(tmp_path, text, message):
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_age_labels(csv)


def test_age_splits_partition_the_labels_stably(tmp_path):
    paths = [f"images/{i:05d}.jpg" for i in range(2000)]
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"path": paths, "age": 30}).to_csv(csv, index=False)
    train, val = read_age_labels(csv, "train"), read_age_labels(csv, "val")
    assert sorted(train["path"].tolist() + val["path"].tolist()) == paths
    assert 0.12 < len(val) / len(paths) < 0.18  # 15 % held out
    assert val["path"].tolist() == [p for p, v in zip(paths, validation_mask(paths)) if v]
    shuffled = paths[::-1]  # membership depends on the path alone, not on its position in the file
    assert set(np.array(shuffled)[validation_mask(shuffled)]) == set(val["path"])


def test_mask_labels_split_by_photo_number(tmp_path):
    rows = [(f"images/{n:04d}.jpg", f"masks/{n:04d}.png") for n in range(1, 33)]
    csv = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["image", "mask"]).to_csv(csv, index=False)
    val = read_mask_labels(csv, "val")
    assert val["image"].tolist() == ["images/0008.jpg", "images/0016.jpg", "images/0024.jpg", "images/0032.jpg"]
    assert val["mask_file"].tolist()[0] == str((tmp_path / "masks/0008.png").resolve())
    assert len(read_mask_labels(csv, "train")) == 28 and is_validation("ccp_0008.jpg")


def test_evaluation_and_training_share_the_labelled_module():
    """No second copy of a reader or split: what `train` holds out is what `eval --split val` scores."""
    import colortrend.evaluate.age as eval_age
    import colortrend.evaluate.parsing as eval_parsing
    import colortrend.labelled as labelled

    for module in (eval_age, eval_parsing):
        assert not hasattr(module, "read_labels") and getattr(module, "Split", labelled.Split) is labelled.Split
    import colortrend.training.age as train_age
    import colortrend.training.parsing as train_parsing

    assert train_age.validation_mask is labelled.validation_mask and train_age.read_age_labels is read_age_labels
    assert train_parsing.is_validation is labelled.is_validation
