from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny_capture, tiny_layout
from icsviz import RunInUseError, open_run, repair_run
from icsviz.store.lock import WriterLock, lock_path
from icsviz.store.writer import RunWriter


def test_a_second_writer_is_refused_naming_the_file_and_the_first_is_unharmed(tmp_path) -> None:
    layout = tiny_layout()
    path = tmp_path / "r.h5"
    first = RunWriter.create(path, layout, {})
    first.write_capture(tiny_capture(layout, 0))
    with pytest.raises(RunInUseError, match=rf"{path}.*pid {os.getpid()}"):
        RunWriter.create(path, layout, {}, overwrite=True)
    with pytest.raises(RunInUseError):
        RunWriter.resume(path, layout, from_epoch=0)
    with pytest.raises(RunInUseError):
        repair_run(path)
    first.write_capture(tiny_capture(layout, 1))
    first.close()
    with open_run(path) as run:
        assert run.steps.tolist() == [0, 1] and run.status == "complete"
    assert not lock_path(path).exists()  # released and tidied on close


def test_a_killed_writer_leaves_no_lock_behind(tmp_path) -> None:
    path = tmp_path / "r.h5"
    code = (
        "import sys, time; from pathlib import Path; from icsviz.store.lock import WriterLock;"
        f"WriterLock(Path({str(path)!r})).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=str(proc.pid)):
            WriterLock(path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.time() + 10
    lock = WriterLock(path)
    while True:  # the kernel drops a dead process's flock at once
        try:
            lock.acquire()
            break
        except RunInUseError:
            assert time.time() < deadline
            time.sleep(0.05)
    assert lock.held
    lock.release()
