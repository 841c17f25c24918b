"""Config: typed, validated before any model loads; one line naming the key on any mistake."""
from __future__ import annotations

from pathlib import Path

import pytest

from colortrend.config import Config, load_config, to_dict
from colortrend.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = "name: t\ninput: {paths: [data/demo], year: 2016}\noutput: out/t\n"


@pytest.mark.parametrize("name", ["demo.yaml", "2016.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)
    assert cfg.input.paths and cfg.output


def test_production_config_values_are_the_code_defaults():
    """configs/2016.yaml documents the defaults: every stage setting it spells out is the code's default."""
    from colortrend.config import load_from_dict

    shipped = to_dict(load_config(ROOT / "configs" / "2016.yaml"))
    defaults = to_dict(load_from_dict({"name": "x", "input": {"paths": ["x"]}, "output": "x"}))
    for section, values in defaults.items():
        if isinstance(values, dict) and section != "input":
            for key, value in values.items():
                assert shipped[section][key] == value, f"{section}.{key}: 2016.yaml says {shipped[section][key]!r}"


def test_production_config_spells_out_every_default():
    """configs/2016.yaml documents all stages: every settings field appears in it."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "2016.yaml").read_text())
    defaults = to_dict(load_config(ROOT / "configs" / "2016.yaml"))
    for section, values in defaults.items():
        if isinstance(values, dict):
            missing = set(values) - set(raw.get(section) or {})
            assert not missing, f"{section}: {sorted(missing)} not spelled out in configs/2016.yaml"


@pytest.mark.parametrize(
    "text, message",
    [
        (MINIMAL + "colour: {}\n", r"^colour: unknown key"),
        (MINIMAL + "color: {white_balanse: none}\n", r"^color.white_balanse: unknown key"),
        (MINIMAL + "color: {white_balance: purple}\n", r"^color.white_balance: expected one of"),
        (MINIMAL + "batch_size: many\n", r"^batch_size: expected an integer, got str"),
        (MINIMAL + "device: tpu\n", r"^device: expected one of auto, cpu, cuda"),
        (MINIMAL + "detect: {min_score: yes}\n", r"^detect.min_score: expected a number"),
        ("name: t\noutput: o\n", r"^input: required key is missing"),
        ("name: t\ninput: {paths: []}\noutput: o\n", r"^input.paths: at least one"),
        ("- just\n- a list\n", r"expected a mapping"),
        ("name: [unclosed\n", r"not valid YAML"),
        (MINIMAL + "age: {weights: []}\n", r"^age.weights: name at least one network"),
        (MINIMAL + "age: {weights: [default, 3]}\n", r"^age.weights\[1\]: expected a string"),
    ],
)
def test_mistakes_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_overrides_and_single_path_string(tmp_path):
    cfg = load_config(write(tmp_path, "name: t\ninput: {paths: data/demo}\noutput: o\n"), {"device": "cpu"})
    assert cfg.input.paths == ("data/demo",)
    assert cfg.device == "cpu"
    assert cfg.age.weights == ("default",)  # one network name alone is a list of one
    single = load_config(write(tmp_path, "name: t\ninput: {paths: x}\noutput: o\nage: {weights: dlib}\n"))
    assert single.age.weights == ("dlib",)


def test_config_round_trips_through_its_saved_form(tmp_path):
    import yaml

    cfg = load_config(ROOT / "configs" / "2016.yaml")
    saved = write(tmp_path, yaml.safe_dump(to_dict(cfg), allow_unicode=True))
    assert load_config(saved) == cfg


def test_the_recorded_config_never_holds_the_salt_and_with_hash_paths_no_location():
    from colortrend.config import HIDDEN, load_from_dict, recorded

    raw = {"name": "t", "input": {"paths": ["/photos/alice", "bob"]}, "output": "out/x",
           "histograms": {"age_calibration_path": "/photos/alice/labels.csv"}, "privacy": {"salt": "s3cret"}}
    plain = recorded(load_from_dict(raw))
    assert plain["privacy"]["salt"] == HIDDEN and plain["input"]["paths"] == ["/photos/alice", "bob"]
    hashed = recorded(load_from_dict({**raw, "privacy": {"hash_paths": True, "salt": "s3cret"}}))
    assert "alice" not in str(hashed) and "bob" not in str(hashed) and "s3cret" not in str(hashed)
    assert hashed["output"] == hashed["histograms"]["age_calibration_path"] == HIDDEN
    assert hashed["color"] == plain["color"] and hashed["name"] == "t"  # settings that name no place stay
