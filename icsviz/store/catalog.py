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
from .reader import open_run

__all__ = ["RunEntry", "scan_runs", "resolve_run", "STALE_AFTER_S"]

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

    @property
    def key(self) -> tuple[str, int, int]:
        """Changes whenever the file does: a cache key that re-reads growing runs."""
        return (str(self.path), self.mtime_ns, self.size)

    @property
    def live(self) -> bool:
        return self.status == "training"


def resolve_run(folder: str | os.PathLike[str], name: str) -> Path:
    """The path of run file `name` inside `folder`, refusing anything outside it."""
    root = Path(folder).resolve()
    candidate = (root / name).resolve()
    if candidate.parent != root or candidate.suffix != ".h5" or not candidate.is_file():
        raise RunFileError(f"{name!r} is not a run file in {root}")
    return candidate


def _summarize(path: Path) -> RunEntry:
    stat = path.stat()
    base = {"path": path, "mtime_ns": stat.st_mtime_ns, "size": stat.st_size}
    try:
        with open_run(path) as run:
            attrs = run.attrs
            history = run.history
            val = history.get("val_accuracy", np.array([]))
            best = float(np.nanmax(val)) if len(val) and np.isfinite(val).any() else math.nan
            status = run.status
            if status == "training" and time.time() - stat.st_mtime > STALE_AFTER_S:
                status = "stopped (killed?)"
            return RunEntry(
                name=run.name,
                readable=True,
                model=str(attrs.get("model_name", "")),
                dataset=str(attrs.get("dataset", "")),
                epochs=len(run.history_epochs),
                captures=run.num_captures,
                status=status,
                best_val_accuracy=best,
                **base,
            )
    except ICSVizError as exc:
        return RunEntry(name=path.stem, readable=False, error=str(exc), status="unreadable", **base)
    except Exception as exc:  # noqa: BLE001 - a broken file must never break the listing
        return RunEntry(
            name=path.stem, readable=False, error=f"{type(exc).__name__}: {exc}", status="unreadable", **base
        )


def scan_runs(folder: str | os.PathLike[str]) -> list[RunEntry]:
    """Every `*.h5` file directly in `folder`, sorted by name, each summarized."""
    root = Path(folder)
    if not root.is_dir():
        return []
    files = [p for p in sorted(root.iterdir()) if p.suffix == ".h5" and p.is_file() and not p.is_symlink()]
    return [_summarize(p) for p in files]
