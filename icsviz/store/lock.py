"""One writer per run file, across processes.

HDF5 drops its own file lock once a writer switches to SWMR mode (so that
readers can attach), which leaves nothing to stop a second training from
truncating or compacting a file that the first one is still writing. A writer
therefore holds an exclusive `flock` on a hidden sidecar file
(`.NAME.h5.lock`) for as long as it is open. The operating system releases it
when the process dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import RunInUseError

try:
    import fcntl
except ImportError:  # Windows: no flock; HDF5's own locking is all there is
    fcntl = None  # type: ignore[assignment]

__all__ = ["WriterLock", "lock_path"]


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


class WriterLock:
    """An exclusive, non-blocking lock on writing one run file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        if fcntl is None:
            return self
        target = lock_path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
                os.close(fd)
                if holder == str(os.getpid()):
                    raise RunInUseError(
                        f"{self.path} is open for writing in this process (pid {holder}) by an earlier "
                        "writer: an ICSCallback whose fit is still running, or ended in an exception "
                        "(Ctrl-C) without closing the file. Fit again with that callback to continue its "
                        "run, call its close(), or give this run another path"
                    ) from None
                raise RunInUseError(
                    f"{self.path} is being written by another training process (pid {holder}); "
                    "two runs cannot share one file: give this run another path, or wait until "
                    "the other one ends"
                ) from None
            # The holder before us may have unlinked the lock file after we opened it: retry on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(target).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            lock_path(self.path).unlink()  # unlinked while held: a waiter retries on a fresh file
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
