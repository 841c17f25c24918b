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


class OutputError(ColortrendError):
    """The output folder is damaged (a file its commit record names is missing or altered, a record of the wrong
    shape) or cannot be written (disk full, read-only). One line naming the file and the problem."""

    exit_code = 2
