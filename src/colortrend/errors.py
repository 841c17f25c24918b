"""Typed errors the library raises; the CLI turns each into one line and an exit code."""


class ColortrendError(Exception):
    """Base class: something the user can fix, reported as one line."""

    exit_code = 1


class ConfigError(ColortrendError):
    """The config (or the environment it asks for) is invalid. Raised before anything is written."""

    exit_code = 2


class LockedError(ColortrendError):
    """Another live run holds the output folder."""

    exit_code = 3
