"""Find damage in run files, and save what can be saved.

`check_run(path)` reads every byte a reader could ask for: every attribute,
every dataset, chunk by chunk where a whole read fails, so that damage is
located down to the capture rows it costs. The result says what is damaged
and what a repair keeps. `guarded_check(path)` does the same in a worker
process with a time limit, for callers that must survive whatever the HDF5
library does with a damaged file (hang, or crash the interpreter): the app,
`icsviz check` and `icsviz info`.

What a repair keeps (`RunCheck.plan`): damage inside a layer, a variable or a
gradient-shift group drops that group and keeps every capture; damage in the
capture index (/captures) drops the captures of the damaged rows; damaged
history rows are dropped; a damaged status becomes "interrupted".
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pickle
import select
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import DamagedRunError, RunFileError
from .files import damage_hint, open_for_reading, read_attributes, reading, short_rows, truncation
from .schema import SCHEMA_VERSION, decode_status, decode_text, is_per_batch, is_per_capture

__all__ = ["Damage", "RunCheck", "check_run", "guarded_check", "CHECK_TIMEOUT_S"]

CHECK_TIMEOUT_S = 10.0
_GROUPS = ("layers", "variables", "ics")


@dataclass(frozen=True)
class Damage:
    """One part of a file that does not read back as written."""

    part: str  # HDF5 path: "/layers/003_conv2/hist_counts", "/layers/003_conv2", "/status", ...
    reason: str
    rows: tuple[int, ...] = ()  # capture (or history) rows lost, when the damage is row-wise

    def describe(self) -> str:
        where = self.part
        if self.rows:
            where += f" rows {_ranges(self.rows)}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class RunCheck:
    """What `check_run` found in one file."""

    path: Path
    openable: bool  # header and capture index are intact: the run opens and has a timeline
    error: str = ""  # why not, when not openable
    captures: int = 0  # committed captures in the file
    layers: tuple[str, ...] = ()  # captured layer names the file lists (intact groups only)
    damage: tuple[Damage, ...] = ()
    drop_groups: tuple[str, ...] = ()  # "/layers/<id>" ... that a repair leaves out
    drop_layer_names: tuple[str, ...] = ()  # their names, where the name could be read
    drop_captures: tuple[int, ...] = ()  # capture rows a repair leaves out
    drop_history: tuple[int, ...] = ()  # history rows a repair leaves out
    history_lost: bool = False  # the whole history is unreadable
    hang: bool = field(default=False)  # the guarded check ran out of time

    @property
    def ok(self) -> bool:
        return self.openable and not self.damage

    def summary(self) -> str:
        """A few lines for people: the verdict, the damage, what a repair keeps."""
        if not self.openable:
            return f"{self.path}: UNREADABLE: {self.error}"
        if self.ok:
            return (
                f"{self.path}: ok ({_counted(self.captures, 'capture')}, "
                f"{_counted(len(self.layers), 'layer')}, every checksum matches)"
            )
        kept = self.captures - len(self.drop_captures)
        lines = [f"{self.path}: DAMAGED ({_counted(len(self.damage), 'damaged part')})"]
        lines += [f"  - {d.describe()}" for d in self.damage]
        saved = f"  repair keeps {kept} of {self.captures} captures"
        if self.drop_layer_names:
            names = ", ".join(self.drop_layer_names[:6]) + (" ..." if len(self.drop_layer_names) > 6 else "")
            saved += (
                f" and leaves out the damaged layer{'s' if len(self.drop_layer_names) > 1 else ''} {names}"
            )
        others = len(self.drop_groups) - len(self.drop_layer_names)
        if others:
            saved += f" and {_counted(others, 'damaged gradient-statistics group')}"
        if self.history_lost:
            saved += ", loses the epoch history"
        elif self.drop_history:
            saved += f", drops history rows {_ranges(self.drop_history)}"
        lines.append(saved + f": `icsviz repair {self.path}`")
        return "\n".join(lines)


def _counted(n: int, noun: str) -> str:
    """`n` and the noun, plural unless one: "1 layer", "3 layers"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _checked(exc: RunFileError, path: Path) -> str:
    """A reader's message as `check` reports it: without its advice to run `icsviz check`."""
    return str(exc).replace("the file is damaged: " + damage_hint(path), "the file is damaged")


def _ranges(rows: tuple[int, ...]) -> str:
    parts, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)


class _Walker:
    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self.file = file
        self.damage: list[Damage] = []
        self.rows = int(file["captures/step"].shape[0]) if "captures/step" in file else 0

    def fail(self, part: str, exc: DamagedRunError, rows: tuple[int, ...] = ()) -> None:
        self.damage.append(Damage(part, exc.reason, rows))

    def attributes(self, part: str, obj: h5py.HLObject) -> bool:
        try:
            with reading(self.path, part):
                for _ in read_attributes(obj):  # reading is the check
                    pass
            return True
        except DamagedRunError as exc:
            self.fail(part, exc)
            return False

    def dataset(self, part: str, ds: h5py.Dataset) -> None:
        # Objects are handed down the walk: looking each one up again by its full path
        # was a third of the time.
        if not self.attributes(part, ds):
            return
        try:
            with reading(self.path, part):
                shape = ds.shape
                per_capture = is_per_capture(part, ds.maxshape)
                rows = self.rows if per_capture else (shape[0] if shape else None)
                whole = rows is None or rows == shape[0]
        except DamagedRunError as exc:
            self.fail(part, exc)
            return
        if per_capture and rows is not None and shape[0] < rows:
            # The writer adds a capture's rows before its index entry: a dataset with fewer rows
            # than the index was cut or edited, and its rows no longer line up with the steps.
            missing = tuple(range(shape[0], rows))
            self.damage.append(Damage(part, short_rows(shape[0], rows), missing))
            return
        try:
            with reading(self.path, part):
                _read_rows(ds, shape, None if whole else rows)
            return
        except DamagedRunError as exc:
            if not ds.chunks or rows is None or is_per_batch(part, ds.maxshape):
                self.fail(part, exc)
                return
            first = exc
        bad: list[int] = []
        step = ds.chunks[0]
        for start in range(0, rows, step):  # locate the damaged chunks
            try:
                with reading(self.path, part):
                    ds[start : min(rows, start + step)]  # noqa: B018
            except RunFileError:
                bad.extend(range(start, min(rows, start + step)))
        if not bad:  # the whole read failed, every part read: count it all as damaged
            bad = list(range(rows))
        self.fail(part, first, tuple(bad))

    def group(self, part: str, group: h5py.Group) -> None:
        if not self.attributes(part, group):
            return
        try:
            with reading(self.path, part):
                names = list(group.id)  # the links' names, as stored (bytes)
        except DamagedRunError as exc:
            self.fail(part, exc)
            return
        for name in names:
            path = f"{part.rstrip('/')}/{name.decode('utf-8', 'replace')}"
            try:
                with reading(self.path, path):
                    child = h5py.h5o.open(group.id, name)
            except DamagedRunError as exc:  # a link that cannot be followed, or a damaged header
                self.fail(path, exc)
                continue
            if isinstance(child, h5py.h5g.GroupID):
                self.group(path, h5py.Group(child))
            elif isinstance(child, h5py.h5d.DatasetID):
                self.dataset(path, h5py.Dataset(child))
            else:  # a named datatype (no run has one): its attributes are all there is to read
                self.attributes(path, h5py.Datatype(child))


def _read_rows(ds: h5py.Dataset, shape: tuple[int, ...], rows: int | None) -> None:
    """Read a dataset whole (`rows` None) or its first `rows` rows, through the low-level API."""
    dsid = ds.id
    if rows is None:
        if ds.dtype.kind == "O" or not shape or 0 in shape:  # variable-length or scalar: h5py's way
            ds[()]  # noqa: B018 - reading is the check
            return
        dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, np.empty(shape, dsid.dtype))
        return
    if rows <= 0:
        return
    selection = dsid.get_space()
    selection.select_hyperslab((0,) * len(shape), (rows, *shape[1:]))
    out = np.empty((rows, *shape[1:]), dsid.dtype)
    dsid.read(h5py.h5s.create_simple(out.shape), selection, out)


def check_run(path: str | os.PathLike[str]) -> RunCheck:
    """Read everything in a run file and report what is damaged and what a repair keeps.

    Runs in this process: a damaged file can in rare cases hang or crash the
    HDF5 library, so use `guarded_check` where that must not matter.
    """
    path = Path(path).expanduser()
    try:
        file, _ = open_for_reading(path)
    except RunFileError as exc:
        return RunCheck(path, openable=False, error=_checked(exc, path))
    with file:
        try:
            with reading(path, "/captures/step"):
                walker = _Walker(path, file)
        except RunFileError as exc:
            return RunCheck(
                path, openable=False, error=f"{_checked(exc, path)}: the capture index is unreadable"
            )
        short = truncation(path)
        if short:
            walker.damage.append(Damage("(end of file)", short.split(" is ", 1)[-1]))
        walker.group("/", file)
        return _verdict(path, file, walker)


def _verdict(path: Path, file: h5py.File, walker: _Walker) -> RunCheck:
    damage = list(walker.damage)
    header = [d for d in damage if d.part == "/" or d.part in ("/layers", "/variables", "/ics", "/captures")]
    try:
        with reading(path, "the file's attributes"):
            version = int(file.attrs["schema_version"])
        if version > SCHEMA_VERSION:
            return RunCheck(path, False, f"schema version {version} is newer than this icsviz reads")
    except (RunFileError, KeyError) as exc:
        header.append(Damage("/", str(exc)))
    index = [d for d in damage if d.part.startswith("/captures/")]
    if header or any(not d.rows for d in index):
        worst = (header or [d for d in index if not d.rows])[0]
        return RunCheck(
            path,
            openable=False,
            error=f"{worst.describe()}: the run's header or capture index is damaged, nothing can be read",
            captures=walker.rows,
            damage=tuple(damage),
        )
    try:
        with reading(path, "/status"):
            decode_status(file["status"][()])
    except DamagedRunError as exc:
        if not any(d.part == "/status" for d in damage):  # a checksum failure is in the list already
            damage.append(Damage("/status", exc.reason))

    drop_groups: list[str] = []
    for d in damage:
        parts = d.part.split("/")
        if len(parts) >= 2 and parts[1] == "batches":
            # Training-step rows are a series of their own: a repair keeps the probe captures
            # and leaves all of them out rather than a series with holes.
            if "/batches" not in drop_groups:
                drop_groups.append("/batches")
        elif len(parts) >= 3 and parts[1] in _GROUPS:
            group = "/".join(parts[:3])
            if group not in drop_groups:
                drop_groups.append(group)
    names = []
    layers = []
    for lid in _safe_keys(file, "layers"):
        name = _name_of(file, f"layers/{lid}")
        if f"/layers/{lid}" in drop_groups:
            names.append(name or lid)
        elif name:
            layers.append(name)
    history = [d for d in damage if d.part.startswith("/history")]
    return RunCheck(
        path,
        openable=True,
        captures=walker.rows,
        layers=tuple(layers),
        damage=tuple(damage),
        drop_groups=tuple(drop_groups),
        drop_layer_names=tuple(names),
        drop_captures=tuple(sorted({r for d in index for r in d.rows})),
        drop_history=tuple(sorted({r for d in history for r in d.rows})),
        history_lost=any(not d.rows for d in history),
    )


def _safe_keys(file: h5py.File, group: str) -> list[str]:
    try:
        return list(file[group])
    except Exception:  # noqa: BLE001 - damage is already recorded
        return []


def _name_of(file: h5py.File, group: str) -> str:
    try:
        return str(decode_text(file[group].attrs["name"]))
    except Exception:  # noqa: BLE001
        return ""


# ---------------------------------------------------------------- the guard
class _Worker:
    """A Python process that reads run files for us, one request at a time.

    A plain subprocess, not multiprocessing: spawn would re-import the
    caller's __main__ (the Streamlit script), and fork is unsafe with HDF5
    files open. Requests and answers are single lines ("<task> <hex path>";
    a base64 pickle).
    """

    def __init__(self, code: str = "from icsviz.store.check import _serve; _serve()") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        self.answered = False  # until its first answer, a request also waits for its start

    def ask(self, path: Path, timeout: float, task: str = "check") -> Any:
        """The worker's answer for `path`, or None when it hung or died."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(task.encode() + b" " + os.fsencode(path.resolve()).hex().encode() + b"\n")
        self.process.stdin.flush()
        return self.wait(timeout)

    def wait(self, timeout: float) -> Any:
        """The answer to the last question, if it comes within `timeout` seconds, else None."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.process.stdout.readline()
        return pickle.loads(base64.b64decode(line)) if line else None

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def _task(name: str) -> Any:
    if name == "summary":  # the catalog's summary of a run (imported here: catalog imports this module)
        from .catalog import summary_of

        return summary_of
    return check_run


def _serve() -> None:
    """The worker's loop: "<task> <hex path>" in, a base64 pickle of the task's answer out."""
    # The summary's imports now: a worker started ahead of time pays them before any request.
    _task("summary")
    from .. import analysis  # noqa: F401 - the summary's drift scores

    for line in sys.stdin.buffer:
        task, _, hex_path = line.decode().strip().rpartition(" ")
        path = Path(os.fsdecode(bytes.fromhex(hex_path)))
        try:
            result = _task(task)(path)
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            result = RunCheck(path, openable=False, error=f"{type(exc).__name__}: {exc}")
        sys.stdout.buffer.write(base64.b64encode(pickle.dumps(result)) + b"\n")
        sys.stdout.buffer.flush()


POOL_SIZE = 2  # worker processes at most: a new folder's first pair is read at once, one file each
_IDLE: list[_Worker] = []
_LIVE = 0  # workers started and not killed, idle or busy
_POOL = threading.Condition()  # the app serves several sessions on threads


def _take() -> _Worker:
    """An idle worker, a new one while fewer than POOL_SIZE live, else the next one given back."""
    global _LIVE
    with _POOL:
        while True:
            while _IDLE:
                worker = _IDLE.pop()  # the most recently used: warm, its files in the OS cache
                if worker.process.poll() is None:
                    return worker
                _LIVE -= 1
            if _LIVE < POOL_SIZE:
                _LIVE += 1
                break
            _POOL.wait()
    try:
        return _Worker()
    except BaseException:
        with _POOL:
            _LIVE -= 1
            _POOL.notify()
        raise


def start_workers(count: int = POOL_SIZE) -> None:
    """Start worker processes, without waiting for them, until `count` live.

    The app calls it before it loads its page, so that the first files it reads
    do not wait for a worker's imports (about half a second each).
    """
    global _LIVE
    with _POOL:
        missing = max(0, min(count, POOL_SIZE) - _LIVE)
        _LIVE += missing
    started: list[_Worker] = []
    try:
        for _ in range(missing):
            started.append(_Worker())
    finally:
        with _POOL:
            _LIVE -= missing - len(started)
            _IDLE.extend(started)
            _POOL.notify_all()


def stop_workers() -> None:
    """End the idle worker processes (a busy one is not touched: it goes back to the pool)."""
    global _LIVE
    with _POOL:
        idle, _IDLE[:] = list(_IDLE), []
        _LIVE -= len(idle)
    for worker in idle:
        worker.kill()


def _give_back(worker: _Worker, alive: bool) -> None:
    global _LIVE
    if not alive:
        worker.kill()
    with _POOL:
        if alive:
            _IDLE.append(worker)
        else:
            _LIVE -= 1
        _POOL.notify()


def guarded(task: str, path: Path, timeout: float = CHECK_TIMEOUT_S) -> tuple[Any, str]:
    """(answer, "") from a worker process, or (None, "hang" / "crash") when it failed on `path`.

    The worker is killed after `timeout` seconds, so that a file that hangs the
    HDF5 library or crashes it cannot take the caller down with it. Callers on
    several threads are served by up to POOL_SIZE workers at once.
    """
    worker = _take()
    try:
        # A fresh worker also pays its start (imports, about half a second).
        result = worker.ask(path, timeout + (0.0 if worker.answered else 5.0), task)
    except (OSError, ValueError, pickle.UnpicklingError):
        result = None
    if result is not None:
        worker.answered = True
        _give_back(worker, alive=True)
        return result, ""
    hung = worker.process.poll() is None
    _give_back(worker, alive=False)
    return None, "hang" if hung else "crash"


def failure_message(failure: str, path: Path, timeout: float = CHECK_TIMEOUT_S) -> str:
    """Why a guarded read of `path` gave no answer, for people."""
    if failure == "hang":
        return (
            f"reading it did not finish within {timeout:.0f} s: the HDF5 library hangs on this "
            f"damaged file; `icsviz repair {path}` may save its captures"
        )
    return "the HDF5 library crashed while reading it: the file is damaged beyond reading"


def guarded_check(path: str | os.PathLike[str], timeout: float = CHECK_TIMEOUT_S) -> RunCheck:
    """`check_run` in a worker process that is killed after `timeout` seconds.

    A file that hangs the HDF5 library or crashes it is reported as unreadable
    instead of taking the caller down with it.
    """
    path = Path(path).expanduser()
    result, failure = guarded("check", path, timeout)
    if result is not None:
        return dataclasses.replace(result, path=path)  # as the caller spelled it
    return RunCheck(
        path, openable=False, error=failure_message(failure, path, timeout), hang=failure == "hang"
    )
