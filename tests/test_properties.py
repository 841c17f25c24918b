"""Property tests: config parsing and photo decoding hold their promises on arbitrary inputs."""
from __future__ import annotations

import io
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from colortrend.config import load_from_dict
from colortrend.errors import ConfigError
from colortrend.stages.intake import InputSettings, IntakeStage, decode_image

BASE = {"name": "p", "input": {"paths": ["data/demo"]}, "output": "out/p"}
keys = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)
values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                   st.lists(st.integers(), max_size=3))


@given(section=st.sampled_from(["detect", "align", "age", "segment", "color", "histograms", "report", "privacy", ""]),
       key=keys, value=values)
@settings(max_examples=200, deadline=None)
def test_any_setting_either_loads_or_fails_with_one_line_naming_it(section, key, value):
    raw = {**BASE, section: {key: value}} if section else {**BASE, key: value}
    try:
        load_from_dict(raw)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith(f"{section}.{key}" if section else key) or message.startswith(section or key)


@given(data=st.binary(max_size=2048))
@settings(max_examples=150, deadline=None)
def test_arbitrary_bytes_never_escape_intake(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "x.jpg"
    path.write_bytes(data)
    row = IntakeStage(InputSettings(paths=("x",))).read_one(str(path))
    assert row["status"] in ("ok", "error", "too_large")
    assert (row["status"] == "ok") == (row["image"] is not None)
    assert row["status"] == "ok" or row["error"]


@given(w=st.integers(1, 300), h=st.integers(1, 300), mode=st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK", "I;16"]),
       fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "TIFF"]), max_side=st.integers(64, 400))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decoded_photos_are_rgb_uint8_of_the_declared_size(w, h, mode, fmt, max_side):
    pixels = np.random.default_rng(w * 1000 + h).integers(0, 255, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode) if mode != "I;16" else Image.fromarray(
        (pixels[:, :, 0].astype(np.uint16) * 257))
    buf = io.BytesIO()
    try:
        image.save(buf, fmt)
    except (OSError, KeyError, ValueError):
        return  # a mode this encoder cannot write: nothing to decode
    out = decode_image(buf.getvalue(), 10**8, max_side)
    assert (out["width"], out["height"]) == (w, h)
    arr = out["image"]
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert max(arr.shape[:2]) <= max(max_side, 1) or max(w, h) <= max_side
    assert arr.shape[1] == pytest.approx(w * out["analysis_scale"], abs=1)
