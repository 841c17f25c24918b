"""The docs say what the code does: the configuration reference lists every setting with the code's default."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

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


def test_every_data_file_of_the_package_ships_in_the_wheel():
    import fnmatch

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the dev extra brings tomli, the same parser
        import tomli as tomllib
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["colortrend"]
    package = ROOT / "src" / "colortrend"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data and all(any(fnmatch.fnmatch(d, g) for g in globs) for d in data), data


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_imports_against_the_current_package(script, monkeypatch):
    """The measurements in docs/ name these scripts: a refactor of the package must not leave one broken."""
    import importlib.util

    monkeypatch.setattr("sys.argv", [script])
    spec = importlib.util.spec_from_file_location(f"script_{script[:-3]}", ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # the scripts run their work under `if __name__ == "__main__"`
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("colortrend",):
            raise
        pytest.skip(f"{script} needs {exc.name}, which the dev extra does not install")
