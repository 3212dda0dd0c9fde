"""The writer's thread: writes in order, bounded, the first failure kept for the caller."""

from __future__ import annotations

import threading
import time

import pytest

from icsviz.capture.write_queue import WriteQueue


def test_writes_run_in_order_on_their_own_thread() -> None:
    done: list[tuple[int, str]] = []
    writes = WriteQueue("order")
    for i in range(20):
        writes.submit(f"write {i}", lambda i=i: done.append((i, threading.current_thread().name)))
    writes.drain()
    assert [i for i, _ in done] == list(range(20))
    assert {name for _, name in done} == {"icsviz-writer order"}
    writes.close()
    with pytest.raises(RuntimeError, match="closed"):
        writes.submit("late", lambda: None)


def test_submit_blocks_while_the_queue_is_full() -> None:
    gate = threading.Event()
    writes = WriteQueue("bounded", depth=2)
    writes.submit("held", gate.wait)  # taken by the thread, which then waits on the gate
    time.sleep(0.1)
    writes.submit("a", lambda: None)
    writes.submit("b", lambda: None)  # the queue is now full
    blocked = threading.Thread(target=writes.submit, args=("c", lambda: None))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # a fourth write waits for room: memory stays bounded
    gate.set()
    blocked.join(5)
    assert not blocked.is_alive()
    writes.close()


def test_the_first_failure_stops_the_writing_and_is_kept() -> None:
    done: list[str] = []

    def fail() -> None:
        raise OSError(28, "No space left on device")

    writes = WriteQueue("failing")
    writes.submit("capture 1", lambda: done.append("1"))
    writes.submit("capture 2", fail)
    writes.submit("capture 3", lambda: done.append("3"))
    writes.drain()
    assert done == ["1"]  # nothing after the failure is written
    what, exc = writes.failure
    assert what == "capture 2" and isinstance(exc, OSError)
    writes.close()
