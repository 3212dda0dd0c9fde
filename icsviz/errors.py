"""Exceptions and warnings raised by icsviz.

Every error a user can trigger with bad input derives from `ICSVizError`, so a
caller can catch one type. Each subclass also derives from the closest builtin
(`OSError`, `ValueError`, `KeyError`) so that generic handlers keep working.
"""

from __future__ import annotations

import sys
import warnings

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


# Frames that are not the user's: ours, the frameworks that call a callback's hooks, and the
# standard library's machinery between them (threads, finalizers, context managers).
_NOT_THE_USERS = frozenset(
    {"icsviz", "keras", "tensorflow", "jax", "jaxlib", "torch", "optree", "absl", "namex"}
    | {"threading", "concurrent", "weakref", "atexit", "contextlib", "functools", "warnings"}
)


def warn_capture(message: str) -> None:
    """Issue a `CaptureWarning`, "icsviz: " and `message`, at the user's own line (their `model.fit(...)` or
    `ICSCallback(...)`), not at the line of icsviz or Keras that happened to notice.

    As pandas' `find_stack_level`: the first frame outside icsviz and the frameworks
    that call it. A writer thread or an exit-time finalizer has no such frame; the
    warning then points at its caller.
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _NOT_THE_USERS:
        frame, level = frame.f_back, level + 1
    warnings.warn(f"icsviz: {message}", CaptureWarning, stacklevel=level if frame is not None else 2)
