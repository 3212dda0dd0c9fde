"""The run file's writes, in order, on a thread of their own.

Writing a capture is Python and HDF5 work on the host: 30-50 ms for the
reference CNN, 0.3 s for MobileNetV2's 151 layers, paid by the training loop
while it waited. Here the callback hands each write to one writer thread and
returns to training; a capture counts as committed once the thread has
written and flushed it, exactly as before (a kill -9 loses at most the writes
still queued, never a committed one). At most `depth` writes wait: beyond
that `submit` blocks, so a slow disk slows training instead of filling memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

__all__ = ["WriteQueue"]

_STOP = object()


class WriteQueue:
    """Runs submitted writes one by one, in order, on one daemon thread.

    The first write that raises stops the writing: later ones are dropped and
    `failure` holds (what, exception) for the caller to report on its own thread.
    """

    def __init__(self, name: str, depth: int = 2) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self.failure: tuple[str, BaseException] | None = None
        self._thread = threading.Thread(target=self._run, name=f"icsviz-writer {name}", daemon=True)
        self._thread.start()

    def submit(self, what: str, write: Callable[[], None]) -> None:
        """Queue `write` (described as `what` should it fail); blocks while `depth` wait."""
        if not self._thread.is_alive():
            raise RuntimeError("the write queue is closed")
        self._queue.put((what, write))

    def drain(self) -> None:
        """Wait until every write submitted so far has run (or was dropped after a failure)."""
        if self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        """Drain, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                what, write = item  # type: ignore[misc]
                if self.failure is None:
                    write()
            except BaseException as exc:  # noqa: BLE001 - reported by the callback, on its thread
                self.failure = (what, exc)
            finally:
                self._queue.task_done()
