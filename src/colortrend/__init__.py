"""colortrend: which clothing colours each age group and birth cohort wears, measured from photos of people."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "histograms", "read"]


def read(output: str, table: str):
    """Committed rows of ``table`` (photos, faces, garments, histograms) under ``output`` (a folder or fsspec URL),
    as a pandas DataFrame."""
    from colortrend.run import read as _read

    return _read(output, table)


def histograms(garments, **settings):
    """The ``histograms/`` table, as a pandas DataFrame, from a garments DataFrame (the columns of the ``garments``
    table, e.g. ``colortrend.read(output, "garments")``).

    ``settings`` are the ``histograms.*`` config keys (``cohorts=[("95后", 1995, 1999), ...]``,
    ``age_calibration_path=...``, ``bootstrap=...``, ``min_persons=...``), validated as the config is: an unknown
    key or a wrong value raises :class:`colortrend.errors.ConfigError` naming it. Re-cut cohorts in a notebook
    without rerunning the pipeline.
    """
    from colortrend.aggregate.histograms import HistogramSettings, build_histograms
    from colortrend.config import parse_section
    from colortrend.errors import ConfigError

    parsed = parse_section(HistogramSettings, settings, "histograms")
    try:
        return build_histograms(garments, parsed).to_pandas()
    except ValueError as exc:  # a garments table without a needed column, an unreadable calibration or sales file
        raise ConfigError(str(exc)) from None
