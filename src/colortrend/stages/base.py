"""The contract every stage follows.

A *batch* is one shard's worth of photos held column-wise: ``dict[str, list]`` with one list entry per photo
(the layout Ray Data calls a "numpy"/"pandas" batch, so the same stage objects run under either runner).

* Photo-level columns hold one value per photo (``photo_id``, ``status``, ``image`` ...).
* Face-level columns hold, per photo, a numpy array (or list) whose first dimension is that photo's face count
  (``face_box``: (n, 4), ``age``: (n,) ...). A photo whose status is not ``ok`` has n = 0.

Stages add columns and never drop rows: a photo that fails inside a stage gets ``status="error"`` and a message in
``error`` instead of raising. Each stage declares its data flow: the columns it ``reads``, the in-memory columns it
``adds`` for later stages (``image``, ``person_parse``, ...: never written), and the columns it contributes to each
output table (its ``*_fields`` schemas, from which the tables on disk are built). The pipeline checks, when it
builds a chain, that every column a stage reads is added by an earlier stage.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import pyarrow as pa

Batch = dict[str, list]


class Stage(ABC):
    """One step of the per-photo chain: declared outputs, lazy model loading, a batch transform."""

    name: ClassVar[str]
    #: Batch columns this stage reads; each must be added by an earlier stage of the chain.
    reads: ClassVar[tuple[str, ...]] = ()
    #: In-memory batch columns this stage adds for later stages, besides its table columns; never written.
    adds: ClassVar[tuple[str, ...]] = ()
    #: Runs a network: on a GPU when there is one (under Ray, an actor pool holding a GPU per actor).
    uses_accelerator: ClassVar[bool] = False
    #: Columns this stage contributes to each output table (photos / faces / garments).
    photo_fields: ClassVar[pa.Schema] = pa.schema([])
    face_fields: ClassVar[pa.Schema] = pa.schema([])
    garment_fields: ClassVar[pa.Schema] = pa.schema([])

    #: Where a stage with both a host path (numpy, OpenCV, Pillow) and a torch path for the work around its networks
    #: (decode, white balance, k-means, the parser's mapping back) runs that work: None picks the torch path on the
    #: stage's device when that is a GPU, the host path otherwise (faster on a CPU). The tests set "cpu" to run the
    #: torch path against the host one.
    ops_device: str | None = None

    def __init__(self, settings: Any = None, device: str = "cpu"):
        self.settings = settings
        self.device = device
        self._ready = False

    @classmethod
    def provides(cls) -> tuple[str, ...]:
        """Every column this stage puts in the batch: its in-memory ``adds`` and its table columns."""
        return (*cls.adds, *cls.photo_fields.names, *cls.face_fields.names, *cls.garment_fields.names)

    # Models load here, once per worker, not in __init__: stage objects must pickle cheaply for Ray.
    def setup(self) -> None:  # optional hook: stages without a model need none
        pass

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    @abstractmethod
    def process(self, batch: Batch) -> Batch:
        """Add this stage's columns to ``batch`` and return it."""

    def __call__(self, batch: Batch) -> Batch:
        self.ensure_setup()
        return self.process(batch)

    def torch_device(self) -> str | None:
        """The device of the torch path (see ``ops_device``), or None for the host path."""
        return self.ops_device or (self.device if self.device.startswith("cuda") else None)

    def model_files(self) -> list[str]:
        """Paths of the weight files this stage uses (their checksums go into the fingerprint)."""
        return []

    def fingerprint_settings(self) -> Any:
        """The settings that change this stage's output (override to leave out e.g. where inputs come from)."""
        return self.settings

    def fingerprint(self) -> str:
        """Changes whenever this stage's settings or model change: stored in completion markers."""
        h = hashlib.sha256(self.name.encode())
        h.update(json.dumps(_plain(self.fingerprint_settings()), sort_keys=True, default=str).encode())
        from colortrend.models import file_checksum

        for path in self.model_files():
            h.update(file_checksum(path).encode())
        return h.hexdigest()[:16]

    def __getstate__(self):  # drop loaded models when pickled to a Ray worker
        state = self.__dict__.copy()
        for key in [k for k in state if k.startswith("_model")]:
            state[key] = None
        state["_ready"] = False
        return state


def _plain(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj


def ok_indices(batch: Batch) -> list[int]:
    """Indices of photos still being analysed (decoded, not a duplicate, no error)."""
    return [i for i, s in enumerate(batch["status"]) if s == "ok"]


def fail(batch: Batch, i: int, message: str, status: str = "error") -> None:
    """Mark photo ``i`` as failed with a one-line message; later stages skip it and it keeps no face rows."""
    batch["status"][i] = status
    batch["error"][i] = message
    if "n_faces" in batch:
        batch["n_faces"][i] = 0
