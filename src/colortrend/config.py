"""YAML config -> typed, frozen dataclasses, validated before any model loads.

Every section is a dataclass; field types drive validation, so an unknown key or a wrong type fails with one line
that names the key (``color.white_balance: expected one of ...``). Stage sections are declared next to the stage
that reads them (``DetectSettings`` lives in ``stages/detect.py``) and only composed here.
"""
from __future__ import annotations

import dataclasses
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from colortrend.errors import ConfigError
from colortrend.stages.age import AgeSettings
from colortrend.stages.align import AlignSettings
from colortrend.stages.correct import ColorSettings
from colortrend.stages.detect import DetectSettings
from colortrend.aggregate.histograms import HistogramSettings
from colortrend.stages.intake import InputSettings
from colortrend.aggregate.report import ReportSettings
from colortrend.stages.segment import SegmentSettings

@dataclass(frozen=True)
class PrivacySettings:
    # Store keyed hashes instead of paths: photo ids and paths are HMACs under the output's own secret
    # (OUTPUT/_secret.key, created once, 0600), and no input location goes into _runs/ or the report.
    hash_paths: bool = False
    # Optional extra secret mixed into the stored path hashes; never recorded.
    salt: str = ""


@dataclass(frozen=True)
class Config:
    name: str
    input: InputSettings
    # Output folder or fsspec URL (s3://bucket/prefix): every table is a sub-folder of Parquet shards.
    output: str
    # auto = CUDA when available; `cuda` without a GPU is a config error.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Photos decoded and pushed through the models together (GPU memory scales with it).
    batch_size: int = 16
    # Photos per committed shard: the unit of resumption after a crash.
    shard_size: int = 256
    # Decoder threads that prepare the next batch while the models run.
    decode_workers: int = 2
    # Threads for the work after the models (white balance, k-means, tables), each on a batch of its own while the
    # models run the next. None: 1 when the models run on the CPU (they need its cores), the cores minus two beside
    # a GPU.
    cpu_workers: int | None = None
    # Under Ray: processes that run the model stages on each GPU, each with its own models. One process's own host
    # work (uploads, crops, chips, per-call dispatch) caps it near 150-175 photos/s (scripts/bench.py), far below a
    # GPU, so a GPU needs several feeding it. None: half the cluster's cores per GPU. The local runner is one process.
    gpu_workers: int | None = None
    # Under Ray: actors holding the content-hash index duplicate marking reads, each the partitions its share of the
    # hashes falls in, so the index a nightly run reads is spread over the cluster's memory. None: one per node.
    index_workers: int | None = None
    detect: DetectSettings = field(default_factory=DetectSettings)
    align: AlignSettings = field(default_factory=AlignSettings)
    age: AgeSettings = field(default_factory=AgeSettings)
    segment: SegmentSettings = field(default_factory=SegmentSettings)
    color: ColorSettings = field(default_factory=ColorSettings)
    histograms: HistogramSettings = field(default_factory=HistogramSettings)
    report: ReportSettings = field(default_factory=ReportSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)

    def __post_init__(self) -> None:
        if not self.output.strip():
            raise ValueError("output: name a folder (or URL) for the tables; an empty value would write here")
        for name in ("batch_size", "shard_size", "decode_workers", "cpu_workers", "gpu_workers", "index_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.output.startswith("~"):
            object.__setattr__(self, "output", os.path.expanduser(self.output))


def cpu_workers(cfg: Config, device: str) -> int:
    """``cfg.cpu_workers``, or its default for the device the models run on."""
    if cfg.cpu_workers is not None:
        return cfg.cpu_workers
    return max(1, (os.cpu_count() or 1) - 2) if device.startswith("cuda") else 1


def gpu_workers(cfg: Config, cores_per_gpu: float) -> int:
    """``cfg.gpu_workers``, or its default: half the cores beside each GPU (the model stages' share of the host's
    work, measured by ``scripts/bench.py``: about 60 %; the rest feed the CPU steps)."""
    if cfg.gpu_workers is not None:
        return cfg.gpu_workers
    return max(1, int(cores_per_gpu // 2))


def index_workers(cfg: Config, nodes: int) -> int:
    """``cfg.index_workers``, or its default: one actor per node of the cluster."""
    return cfg.index_workers if cfg.index_workers is not None else max(1, nodes)


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Config:
    """Read, merge ``overrides`` (dotted keys, e.g. ``{"device": "cpu"}``), and validate a config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_section(Config, raw, "")


def default_config(photo: str, **overrides: Any) -> Config:
    """Defaults for commands that analyse one photo outside any run (``colortrend explain``)."""
    return load_from_dict({"name": "explain", "input": {"paths": [photo]}, "output": ".", **overrides})


def load_from_dict(raw: dict[str, Any]) -> Config:
    return parse_section(Config, raw, "")


def parse_section(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types with the key's dotted name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(fields)
        raise ConfigError(f"{_join(prefix, str(unknown[0]))}: unknown key (known keys: {known})")
    values = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:  # __post_init__ checks raise ValueError("key: message")
        raise ConfigError(_join(prefix, str(exc)) if prefix else str(exc)) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value if value is not None else {}, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: unexpected value {_describe(value)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{key}: expected one of {choices}; got {_describe(value)}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if args and args[-1] is Ellipsis and isinstance(value, str):
                value = [value]  # a single path or name where a list is expected
            else:
                raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported setting type {tp}")  # a bug in a settings class, not in the YAML


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain YAML-able data (saved with every run)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


HIDDEN = "(hidden: privacy)"


def recorded(cfg: Config) -> dict:
    """The resolved config as written under the output (``_runs/``, the report): never the salt; with
    ``privacy.hash_paths`` no location either (input folders, output, file settings), since file and folder names
    say whose photos these are."""
    def hide(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: hide(v) for k, v in value.items()}
        if isinstance(value, list):
            return [hide(v) for v in value]
        is_location = isinstance(value, str) and any(mark in value for mark in ("/", "\\", os.sep))
        return HIDDEN if is_location else value

    out = to_dict(cfg)
    if out["privacy"]["salt"]:
        out["privacy"]["salt"] = HIDDEN
    if cfg.privacy.hash_paths:
        out = {k: v if k in ("name", "privacy") else hide(v) for k, v in out.items()}
        out["input"]["paths"] = [HIDDEN] * len(cfg.input.paths)  # a bare folder name has no slash to spot
        out["output"] = HIDDEN
    return out


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 3, 3, 30, 30
    return short


#: reprlib stops at a few items and levels: a YAML alias bomb must not be expanded to say it is wrong.
_SHORT_REPR = _short_repr()


def _describe(value: Any) -> str:
    text = _SHORT_REPR.repr(value)
    return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"
