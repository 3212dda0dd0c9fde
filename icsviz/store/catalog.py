"""Find the run files in a folder and summarize each, unreadable ones included.

A folder's summaries form its catalogue. It is kept on disk (one JSON file per
folder in the user's cache directory, see `cache_dir`) and keyed on each file's
path, size and modification time, so a file is read once and again only when
it changes: a folder of a thousand runs lists in milliseconds the second time,
in a new process too. Files are read in the check's worker process (a damaged
file may hang or crash the HDF5 library) and, for the app, on a background
thread: `FolderCatalog.entries()` answers at once with what is known and lists
the rest as pending while they are read.

Only regular `*.h5` files directly inside the folder are listed, and a run is
opened only through `resolve_run`, which refuses names that leave the folder:
a name typed into the app can never reach another file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np

from ..errors import ICSVizError, RunFileError
from .check import POOL_SIZE, RunCheck, check_run, failure_message, guarded
from .reader import Run, index_record, last_finite, open_run, seed_index, validation_accuracy

__all__ = [
    "RunEntry",
    "FolderCatalog",
    "catalog",
    "scan_runs",
    "is_run_file",
    "folders_with_runs",
    "summarize",
    "summary_of",
    "entry_for",
    "resolve_run",
    "cache_dir",
    "STALE_AFTER_S",
]

STALE_AFTER_S = 300  # a "training" file untouched this long was probably killed
CATALOG_VERSION = 4  # 4: recurrent layers count among the nonlinearities (the drift score); 3: the final accuracy is the last validated epoch's (validation_freq)
_SAVE_EVERY_S = 2.0  # the background reader saves its progress this often


@dataclass(frozen=True)
class RunEntry:
    """One file of a runs folder, readable or not (or not read yet: `pending`)."""

    path: Path
    name: str
    readable: bool
    error: str = ""
    model: str = ""
    dataset: str = ""
    epochs: int = 0
    captures: int = 0
    status: str = ""  # complete, training, stopped (killed?), interrupted, unreadable, not read yet
    best_val_accuracy: float = math.nan
    final_val_accuracy: float = math.nan
    drift_score: float = math.nan  # analysis.run_drift_score: median over the nonlinearities' inputs
    input_drift: tuple[tuple[str, float], ...] = ()  # analysis.input_drift: (layer, drift score) pairs
    created: str = ""  # ISO 8601 UTC, when the run file was created
    mtime_ns: int = 0
    size: int = 0
    damage: tuple[str, ...] = ()  # what `check_run` found damaged, one line each
    skip: tuple[str, ...] = ()  # damaged groups the views leave out ("/layers/<id>")
    damaged_layers: tuple[str, ...] = ()  # their layer names
    pending: bool = False  # listed, not read yet (the catalogue is reading it)

    @functools.cached_property
    def file(self) -> str:
        """The file's name in its folder (kept: the app asks it of every run on every rerun)."""
        return self.path.name

    @functools.cached_property
    def search_text(self) -> str:
        """What a run filter searches, lower case: file and run name, model, dataset, date."""
        return " ".join([self.file, self.name, self.model, self.dataset, self.date]).lower()

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

    @property
    def date(self) -> str:
        """YYYY-MM-DD the run was created (the file's modification date for older files)."""
        if self.created:
            return self.created[:10]
        return time.strftime("%Y-%m-%d", time.localtime(self.mtime_ns / 1e9)) if self.mtime_ns else ""

    def open(self) -> Run:
        """The run, without the parts found damaged (its index from the cache when it has it)."""
        seed_index(self.path, self.skip, lambda: _read_index_file(self.path))
        return open_run(self.path, skip=self.skip)


def resolve_run(folder: str | os.PathLike[str], name: str) -> Path:
    """The path of run file `name` inside `folder`, refusing anything outside it."""
    root = Path(folder).expanduser().resolve()
    candidate = (root / name).resolve()
    if candidate.parent != root or candidate.suffix != ".h5" or not candidate.is_file():
        raise RunFileError(f"{name!r} is not a run file in {root}")
    return candidate


# ---------------------------------------------------------------- one file
def _accuracies(run: Run) -> tuple[int, float, float]:
    """(epochs, best, final validation accuracy) from the history; NaN where absent."""
    try:
        history = run.history
        epochs = len(run.history_epochs)
    except ICSVizError:
        return 0, math.nan, math.nan
    found = validation_accuracy(history)
    val = np.asarray([] if found is None else found, float)
    finite = val[np.isfinite(val)]
    return (
        epochs,
        (float(finite.max()) if len(finite) else math.nan),
        last_finite(val),
    )


def _drift(run: Run) -> tuple[float, tuple[tuple[str, float], ...]]:
    """(run_drift_score, input_drift pairs): the sweep table's number and the app's headline's."""
    from ..analysis import input_drift, run_drift_score  # analysis reads runs through this package

    try:
        scores = input_drift(run)
    except ICSVizError:
        return math.nan, ()
    return run_drift_score(run, scores=scores), tuple(scores.items())


def summary_of(path: Path) -> RunEntry:
    """Read and summarize one run file, in this process (the worker's task "summary")."""
    stat = path.stat()
    base = {"path": path, "mtime_ns": stat.st_mtime_ns, "size": stat.st_size}
    report = check_run(path)
    if not report.openable:
        return RunEntry(name=path.stem, readable=False, error=report.error, status="unreadable", **base)
    try:
        with open_run(path, skip=report.drop_groups) as run:
            attrs = run.attrs
            epochs, best, final = _accuracies(run)
            score, scores = _drift(run)
            status = run.status if "/status" not in {d.part for d in report.damage} else "interrupted"
            if status != "training":  # a growing file would leave a new version at every capture
                _write_index_file(run)
            return RunEntry(
                name=run.name,
                readable=True,
                model=str(attrs.get("model_name", "")),
                dataset=str(attrs.get("dataset", "")),
                epochs=epochs,
                captures=run.num_captures,
                status=status,
                best_val_accuracy=best,
                final_val_accuracy=final,
                drift_score=score,
                input_drift=scores,
                created=str(attrs.get("created", "")),
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


def _summarize(path: Path, stat: os.stat_result) -> RunEntry:
    """`summary_of` in the worker process: a file that hangs or crashes HDF5 is only unreadable."""
    base = {"path": path, "mtime_ns": stat.st_mtime_ns, "size": stat.st_size}
    result, failure = guarded("summary", path)
    if isinstance(result, RunEntry):
        # The version listed, as the caller spelled it: if the file changed while it was
        # read, the next listing sees a new version and reads it again.
        return dataclasses.replace(result, **base)
    error = result.error if isinstance(result, RunCheck) else failure_message(failure, path)
    return RunEntry(name=path.stem, readable=False, error=error, status="unreadable", **base)


def _pending(path: Path, stat: os.stat_result) -> RunEntry:
    return RunEntry(
        path=path,
        name=path.stem,
        readable=False,
        status="not read yet",
        mtime_ns=stat.st_mtime_ns,
        size=stat.st_size,
        pending=True,
    )


def _aged(entry: RunEntry) -> RunEntry:
    """A "training" run whose file has not changed for STALE_AFTER_S was probably killed."""
    if entry.status == "training" and time.time() - entry.mtime_ns / 1e9 > STALE_AFTER_S:
        return dataclasses.replace(entry, status="stopped (killed?)")
    return entry


# ---------------------------------------------------------------- on disk
def cache_dir() -> Path | None:
    """Where catalogues are kept: $ICSVIZ_CACHE_DIR, else $XDG_CACHE_HOME/icsviz or
    ~/.cache/icsviz. ICSVIZ_CACHE_DIR=off keeps none (every process reads the files again)."""
    chosen = os.environ.get("ICSVIZ_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "none", "0") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "icsviz"


def _cache_file(root: Path) -> Path | None:
    where = cache_dir()
    if where is None:
        return None
    digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:20]
    return where / f"catalog-{digest}.json"


def _index_file(path: Path) -> Path | None:
    """Where a run file's index of groups is kept: one file per run path, its latest version
    (`reader.index_record`). The app opens runs by the catalogue's entries: reading the index
    from every group's attributes was a third of choosing two runs never shown."""
    where = cache_dir()
    if where is None:
        return None
    digest = hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:20]
    return where / "indexes" / f"{digest}.json"


def _write_json(target: Path, payload: Any) -> bool:
    """Write `payload` to `target` atomically (a reader sees the old file or the new one);
    False when the folder cannot be written to (the caches here stay in memory then)."""
    temporary = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=target.parent, prefix=f".{target.stem}-", delete=False
        ) as out:
            temporary = out.name
            json.dump(payload, out)
        os.replace(temporary, target)
        return True
    except OSError:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        return False


def _write_index_file(run: Run) -> None:
    """Best effort (a cache): a folder we cannot write to only costs the next open its time."""
    record, target = index_record(run), _index_file(run.path)
    if record is not None and target is not None:
        _write_json(target, record)


def _read_index_file(path: Path) -> Any:
    target = _index_file(path)
    try:
        return json.loads(target.read_text(encoding="utf-8")) if target is not None else None
    except (OSError, ValueError):
        return None  # absent or damaged: the file is read


def _version() -> str:
    from .. import __version__

    return __version__


_NUMBERS = ("best_val_accuracy", "final_val_accuracy", "drift_score")  # NaN when absent: null in JSON


def _to_json(entry: RunEntry) -> dict[str, Any]:
    out = dataclasses.asdict(entry)
    out["path"] = entry.path.name
    for field in _NUMBERS:
        out[field] = None if math.isnan(out[field]) else out[field]
    return out


def _from_json(root: Path, item: dict[str, Any]) -> RunEntry:
    fields = {f.name for f in dataclasses.fields(RunEntry)}
    values = {k: v for k, v in item.items() if k in fields}
    name = Path(values.pop("path")).name  # a file name, never a path out of the folder
    for field in ("damage", "skip", "damaged_layers"):
        values[field] = tuple(str(v) for v in values.get(field, ()))
    values["input_drift"] = tuple(
        (str(layer), float(score)) for layer, score in values.get("input_drift", ())
    )
    for field in _NUMBERS:
        values[field] = math.nan if values.get(field) is None else float(values[field])
    return RunEntry(path=root / name, **values)


# ---------------------------------------------------------------- a folder
_BY_KEY: dict[tuple[str, int, int], RunEntry] = {}  # every summary this process knows, for entry_for
_MAX_BY_KEY = 16384


def _remember(entry: RunEntry) -> None:
    if len(_BY_KEY) >= _MAX_BY_KEY:
        _BY_KEY.clear()
    _BY_KEY[entry.key] = entry


class FolderCatalog:
    """The summaries of one folder's run files, kept on disk and read in the background.

    `entries()` lists the folder (one `stat` per file) and answers at once: the
    summary of every file it knows in its current version, a pending entry for
    each other file, which a background thread then reads. `entries(wait=True)`
    reads them first. Thread-safe: the app's sessions share one catalogue per folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._known: dict[str, RunEntry] = {}  # file name -> summary of the version last read
        self._todo: list[tuple[Path, os.stat_result]] = []
        self._reader: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._dirty = False
        self._file = _cache_file(root)
        self._load()

    # -- on disk
    def _load(self) -> None:
        if self._file is None or not self._file.is_file():
            return
        try:
            stored = json.loads(self._file.read_text("utf-8"))
            if stored.get("version") != CATALOG_VERSION or stored.get("icsviz") != _version():
                return  # written by another icsviz: its verdicts may not hold
            if stored.get("folder") != str(self.root):
                return
            known = {}
            for item in stored["entries"]:
                entry = _from_json(self.root, item)
                known[entry.path.name] = entry
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return  # a damaged or foreign catalogue is only a cache: read the files again
        self._known = known
        for entry in known.values():
            _remember(entry)

    def save(self) -> None:
        """Write the catalogue (atomically; a folder we cannot write to keeps it in memory only)."""
        if self._file is None:
            return
        with self._lock:
            if not self._dirty:
                return
            payload = {
                "version": CATALOG_VERSION,
                "icsviz": _version(),
                "folder": str(self.root),
                "entries": [_to_json(e) for e in self._known.values() if not e.pending],
            }
            self._dirty = False
        if not _write_json(self._file, payload):
            with self._lock:
                self._dirty = True  # try again next time

    # -- listing
    def _listing(self) -> list[tuple[str, os.stat_result]]:
        """(file name, stat) of every run file, by name. Names, not paths: building a Path per
        file cost more than the stat at 1000 files, on every rerun of the app."""
        if not self.root.is_dir():
            return []
        out = []
        with os.scandir(self.root) as items:
            for item in items:
                if not is_run_file(item):
                    continue
                try:
                    out.append((item.name, item.stat()))
                except OSError:
                    continue  # removed while we looked
        out.sort(key=lambda pair: pair[0])
        return out

    def _current(self, name: str, stat: os.stat_result) -> RunEntry | None:
        entry = self._known.get(name)
        if entry is not None and entry.mtime_ns == stat.st_mtime_ns and entry.size == stat.st_size:
            return entry
        return None

    def entries(self, *, wait: bool = False, background: bool = True) -> list[RunEntry]:
        """Every run file of the folder, sorted by name; unread ones pending unless `wait`.

        Pending files are read on a background thread unless `background` is False.
        """
        listing = self._listing()
        with self._lock:
            names = {name for name, _ in listing}
            gone = [name for name in self._known if name not in names]
            for name in gone:
                del self._known[name]
            self._dirty |= bool(gone)
            todo = [(self.root / name, stat) for name, stat in listing if self._current(name, stat) is None]
        if wait:
            for path, stat in todo:
                self._read(path, stat)
            self.save()
        elif todo and background:
            self._start(todo)
        with self._lock:
            found = [(name, stat, self._current(name, stat)) for name, stat in listing]
        return [_aged(entry) if entry else _pending(self.root / name, stat) for name, stat, entry in found]

    def read_now(self, names: list[str]) -> None:
        """Read these files now if they are pending (the runs a page is about to show).

        Only the named files are looked at (a `stat` each, the listing's rules), not
        the whole folder. Several are read at once, one worker process each (up to
        `check.POOL_SIZE`): a new folder's first pair costs one file's time.
        """
        todo: list[tuple[Path, os.stat_result]] = []
        for name in dict.fromkeys(names):
            path = self.root / name
            try:
                stat = path.lstat()
            except OSError:
                continue  # gone: the next listing says so
            if not (name.endswith(".h5") and Path(name).name == name and S_ISREG(stat.st_mode)):
                continue  # not a file the listing would show (a link, a folder, a path)
            with self._lock:
                known = self._current(name, stat) is not None
            if not known:
                todo.append((path, stat))
        if len(todo) > 1:
            with ThreadPoolExecutor(min(len(todo), POOL_SIZE), thread_name_prefix="icsviz-read") as pool:
                list(pool.map(lambda item: self._read(*item), todo))
        elif todo:
            self._read(*todo[0])
        if todo:
            self.save()  # also when no background reader follows (a folder of only these runs)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._todo) + (0 if self._idle.is_set() else 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the background reader is done (True) or `timeout` passes (False)."""
        return self._idle.wait(timeout)

    # -- reading
    def _read(self, path: Path, stat: os.stat_result) -> RunEntry:
        entry = _summarize(path, stat)
        with self._lock:
            self._known[path.name] = entry
            self._dirty = True
        _remember(entry)
        return entry

    def _start(self, todo: list[tuple[Path, os.stat_result]]) -> None:
        with self._lock:
            self._todo = todo  # the newest listing wins: files changed since are read in their new version
            if self._reader is not None and self._reader.is_alive():
                return
            self._idle.clear()
            self._reader = threading.Thread(
                target=self._read_all, name=f"icsviz-catalog {self.root}", daemon=True
            )
            self._reader.start()

    def _read_all(self) -> None:
        saved = time.monotonic()
        try:
            while True:
                with self._lock:
                    if not self._todo:
                        break
                    path, stat = self._todo.pop(0)
                    if self._current(path.name, stat) is not None:
                        continue  # read meanwhile (read_now)
                try:
                    self._read(path, stat)
                except OSError:
                    continue  # removed or unreadable at the OS level: the next listing says so
                if time.monotonic() - saved > _SAVE_EVERY_S:
                    self.save()
                    saved = time.monotonic()
        finally:
            self.save()  # before `wait()` returns: a process that exits then keeps the catalogue
            with self._lock:
                self._idle.set()


_CATALOGS: dict[Path, FolderCatalog] = {}
_CATALOGS_LOCK = threading.Lock()


def catalog(folder: str | os.PathLike[str]) -> FolderCatalog:
    """The catalogue of `folder`, one per folder and process."""
    root = Path(folder).expanduser().resolve()
    with _CATALOGS_LOCK:
        found = _CATALOGS.get(root)
        if found is None:
            found = _CATALOGS[root] = FolderCatalog(root)
        return found


def scan_runs(folder: str | os.PathLike[str]) -> list[RunEntry]:
    """Every `*.h5` file directly in `folder`, sorted by name, each summarized (read now if needed)."""
    if not Path(folder).expanduser().is_dir():
        return []
    return catalog(folder).entries(wait=True)


def is_run_file(item: os.DirEntry[str]) -> bool:
    """Whether a folder's entry is a run file the catalogue lists: a regular `*.h5` file, not a
    link (a link could lead out of the folder)."""
    try:
        return item.name.endswith(".h5") and not item.is_symlink() and item.is_file()
    except OSError:
        return False  # removed while we looked


def folders_with_runs(folder: str | os.PathLike[str], limit: int = 3) -> list[str]:
    """The names of `folder`'s subfolders that hold run files (`*.h5` directly in them), by
    name, at most `limit`: what to point at when `folder` itself holds none."""
    found: list[str] = []
    try:
        with os.scandir(Path(folder).expanduser()) as items:
            subfolders = sorted(item.path for item in items if item.is_dir() and not item.is_symlink())
        for sub in subfolders:
            with contextlib.suppress(OSError), os.scandir(sub) as inner:
                if any(is_run_file(entry) for entry in inner):
                    found.append(Path(sub).name)
            if len(found) == limit:
                break
    except OSError:
        return found
    return found


def summarize(path: Path) -> RunEntry:
    """The summary of one run file, from its folder's catalogue while the file is unchanged."""
    found = catalog(path.parent)
    found.read_now([path.name])
    for entry in found.entries(background=False):  # one file asked for: not the whole folder
        if entry.path.name == path.name:
            return entry
    return _summarize(path, path.stat())


def entry_for(key: tuple[str, int, int]) -> RunEntry | None:
    """The summary of a file version, if this process has read or loaded it."""
    return _BY_KEY.get(key)
