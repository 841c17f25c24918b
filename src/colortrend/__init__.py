"""colortrend: which clothing colours each age group and birth cohort wears, measured from photos of people."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "read"]


def read(output: str, table: str):
    """Committed rows of ``table`` (photos, faces, garments, histograms) under ``output`` (a folder or fsspec URL),
    as a pandas DataFrame."""
    from colortrend.run import read as _read

    return _read(output, table)
