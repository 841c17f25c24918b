"""The docs say what the code does: the configuration reference lists every setting with the code's default."""
from __future__ import annotations

import re
from pathlib import Path

from colortrend.config import load_from_dict, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_gives_the_code_defaults():
    text = (ROOT / "docs" / "outputs.md").read_text(encoding="utf-8")
    defaults = to_dict(load_from_dict({"name": "x", "input": {"paths": ["x"]}, "output": "x"}))
    for section in ("detect", "align"):
        row = re.search(rf"^\| `{section}\.\*` \|.*$", text, re.MULTILINE).group(0)
        for key, value in defaults[section].items():
            shown = f"[{', '.join(f'{v:g}' for v in value)}]" if isinstance(value, list) else f"{value:g}"
            assert f"`{key}` {shown}" in row, f"docs/outputs.md, {section}.{key}: the code's default is {shown}"


def test_readme_commands_exist():
    from click.testing import CliRunner

    from colortrend.cli import main

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in sorted(set(re.findall(r"`colortrend ((?:eval |train )?[a-z]+)", readme))):
        result = CliRunner().invoke(main, [*command.split(), "--help"])
        assert result.exit_code == 0, f"colortrend {command}: {result.output}"
