"""Find the run files in a folder and summarize each, unreadable ones included.

Only regular `*.h5` files directly inside the folder are listed, and a run is
opened only through `resolve_run`, which refuses names that leave the folder:
a name typed into the app can never reach another file.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ICSVizError, RunFileError
from .check import guarded_check
from .reader import Run, open_run

__all__ = ["RunEntry", "scan_runs", "summarize", "entry_for", "resolve_run", "STALE_AFTER_S"]

STALE_AFTER_S = 300  # a "training" file untouched this long was probably killed


@dataclass(frozen=True)
class RunEntry:
    """One file of a runs folder, readable or not."""

    path: Path
    name: str
    readable: bool
    error: str = ""
    model: str = ""
    dataset: str = ""
    epochs: int = 0
    captures: int = 0
    status: str = ""  # complete, training, stopped (killed?), interrupted, unreadable
    best_val_accuracy: float = math.nan
    mtime_ns: int = 0
    size: int = 0
    damage: tuple[str, ...] = ()  # what `check_run` found damaged, one line each
    skip: tuple[str, ...] = ()  # damaged groups the views leave out ("/layers/<id>")
    damaged_layers: tuple[str, ...] = ()  # their layer names

    @property
    def key(self) -> tuple[str, int, int]:
        """Changes whenever the file does: a cache key that re-reads growing runs."""
        return (str(self.path), self.mtime_ns, self.size)

    @property
    def live(self) -> bool:
        return self.status == "training"

    @property
    def damaged(self) -> bool:
        return bool(self.damage)

    def open(self) -> Run:
        """The run, without the parts found damaged."""
        return open_run(self.path, skip=self.skip)


def resolve_run(folder: str | os.PathLike[str], name: str) -> Path:
    """The path of run file `name` inside `folder`, refusing anything outside it."""
    root = Path(folder).resolve()
    candidate = (root / name).resolve()
    if candidate.parent != root or candidate.suffix != ".h5" or not candidate.is_file():
        raise RunFileError(f"{name!r} is not a run file in {root}")
    return candidate


def _summarize(path: Path, stat: os.stat_result) -> RunEntry:
    base = {"path": path, "mtime_ns": stat.st_mtime_ns, "size": stat.st_size}
    # Read everything once in a worker process first: a damaged file may hang or
    # crash the HDF5 library, and the app must survive both.
    report = guarded_check(path)
    if not report.openable:
        return RunEntry(name=path.stem, readable=False, error=report.error, status="unreadable", **base)
    try:
        with open_run(path, skip=report.drop_groups) as run:
            attrs = run.attrs
            try:
                history = run.history
                epochs = len(run.history_epochs)
            except ICSVizError:
                history, epochs = {}, 0
            val = history.get("val_accuracy", np.array([]))
            best = float(np.nanmax(val)) if len(val) and np.isfinite(val).any() else math.nan
            status = run.status if "/status" not in {d.part for d in report.damage} else "interrupted"
            if status == "training" and time.time() - stat.st_mtime > STALE_AFTER_S:
                status = "stopped (killed?)"
            return RunEntry(
                name=run.name,
                readable=True,
                model=str(attrs.get("model_name", "")),
                dataset=str(attrs.get("dataset", "")),
                epochs=epochs,
                captures=run.num_captures,
                status=status,
                best_val_accuracy=best,
                damage=tuple(d.describe() for d in report.damage),
                skip=report.drop_groups,
                damaged_layers=report.drop_layer_names,
                **base,
            )
    except ICSVizError as exc:
        return RunEntry(name=path.stem, readable=False, error=str(exc), status="unreadable", **base)
    except Exception as exc:  # noqa: BLE001 - a broken file must never break the listing
        return RunEntry(
            name=path.stem, readable=False, error=f"{type(exc).__name__}: {exc}", status="unreadable", **base
        )


# Summaries by (path, mtime, size): a file is read again only when it changed.
_SUMMARIES: dict[tuple[str, int, int], RunEntry] = {}
_MAX_SUMMARIES = 4096


def summarize(path: Path) -> RunEntry:
    """The summary of one run file, from the cache while the file is unchanged."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    entry = _SUMMARIES.get(key)
    if entry is None:
        entry = _summarize(path, stat)
        if len(_SUMMARIES) >= _MAX_SUMMARIES:
            _SUMMARIES.clear()
        _SUMMARIES[key] = entry
    return entry


def entry_for(key: tuple[str, int, int]) -> RunEntry | None:
    """The cached summary of a file version, if it was scanned."""
    return _SUMMARIES.get(key)


def scan_runs(folder: str | os.PathLike[str]) -> list[RunEntry]:
    """Every `*.h5` file directly in `folder`, sorted by name, each summarized."""
    root = Path(folder)
    if not root.is_dir():
        return []
    files = [p for p in sorted(root.iterdir()) if p.suffix == ".h5" and p.is_file() and not p.is_symlink()]
    return [summarize(p) for p in files]
