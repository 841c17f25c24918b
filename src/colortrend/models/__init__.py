"""Model architectures and the weights shipped with the package (nothing is downloaded at run time)."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: facenet-pytorch's MTCNN weight files (P-, R-, O-Net), inside its installed package.
FACENET_WEIGHTS = ("pnet.pt", "rnet.pt", "onet.pt")


def facenet_weights() -> list[Path]:
    """The MTCNN weight files in facenet-pytorch's wheel, found without importing the package (its ``__init__``
    imports torch, its other models and all of torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("facenet-pytorch is not installed (its wheel holds the face detector's weights)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [data / name for name in FACENET_WEIGHTS]


@functools.lru_cache(maxsize=None)
def file_checksum(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of a weight file: recorded with each run and in stage fingerprints."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def pick_device(requested: str = "auto") -> str:
    """``auto`` means CUDA when available; ``cuda`` without a usable GPU is a :class:`ConfigError` (every command
    that takes ``--device`` asks here before it loads a model)."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        from colortrend.errors import ConfigError

        raise ConfigError("device: cuda requested but no CUDA device is available (use auto or cpu)")
    return requested
