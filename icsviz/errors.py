"""Exceptions and warnings raised by icsviz.

Every error a user can trigger with bad input derives from `ICSVizError`, so a
caller can catch one type. Each subclass also derives from the closest builtin
(`OSError`, `ValueError`, `KeyError`) so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "ICSVizError",
    "RunFileError",
    "SchemaVersionError",
    "DamagedRunError",
    "RunInUseError",
    "RunExistsError",
    "IncompatibleRunError",
    "MissingDataError",
    "DataNotFoundError",
    "CaptureWarning",
]


class ICSVizError(Exception):
    """Base class of every error raised by icsviz."""


class RunFileError(ICSVizError, OSError):
    """A run file is missing, empty, truncated, not HDF5 or not an icsviz run."""


class SchemaVersionError(RunFileError):
    """A run file was written with a newer schema than this icsviz can read."""


class DamagedRunError(RunFileError):
    """Part of a run file cannot be read back as written: a failed checksum or a broken structure.

    `dataset` names the part of the file that failed ("" when the whole file
    is unreadable). `icsviz check FILE` lists every damaged part and
    `icsviz repair FILE` saves the readable captures into a new file.
    """

    def __init__(self, message: str, *, path: str = "", dataset: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.dataset = dataset
        self.reason = reason or message  # what went wrong, without the file and the advice


class RunInUseError(RunFileError):
    """Another training process is writing this run file right now."""


class RunExistsError(ICSVizError, FileExistsError):
    """A fresh run would overwrite an existing run file."""


class IncompatibleRunError(ICSVizError, ValueError):
    """A resumed run does not match the run already stored in the file.

    `difference` says what differs, in words ("" when not known).
    """

    def __init__(self, message: str, difference: str = "") -> None:
        super().__init__(message)
        self.difference = difference


class MissingDataError(ICSVizError, KeyError):
    """A quantity was asked for that the run did not record."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(ICSVizError, FileNotFoundError):
    """A data set could be neither found locally nor downloaded."""


class CaptureWarning(UserWarning):
    """Something in icsviz's own capture code failed; training goes on."""
