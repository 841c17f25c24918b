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
