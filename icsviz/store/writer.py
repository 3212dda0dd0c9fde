"""RunWriter: append captures and epoch metrics to an HDF5 run file.

The writer knows nothing of Keras: it takes numpy arrays laid out by a
`RunLayout`. Every dataset and attribute is created before SWMR mode is switched
on, so that readers (the app) can follow the file while it grows. The length
of ``/captures/step`` is the commit marker: all other rows of a capture are
written and flushed first, so a reader never sees half a capture, and a process
killed at any moment leaves every capture that was committed before.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from ..errors import DamagedRunError, IncompatibleRunError, RunExistsError, RunFileError
from .files import hdf5_library, open_for_reading, read_attributes
from .lock import WriterLock
from .rows import RowBatch, RowWriter, append_rows, flush
from .schema import (
    CAPTURE_KINDS,
    SCHEMA_VERSION,
    BatchLayerSpec,
    LayerSpec,
    RunLayout,
    VariableSpec,
    decode_status,
    encode_text,
    is_per_batch,
    is_per_capture,
)

if TYPE_CHECKING:
    from .check import RunCheck

__all__ = ["RunWriter", "LayerCapture", "Capture", "layout_from_file", "repair_run", "closed_status"]

# Compressed chunks that are rewritten on every append do not fit their old
# space, and HDF5 never reuses the space they leave: a compressed file grows by
# megabytes a capture. So the writer writes small uncompressed chunks (rewritten
# in place) and compacts the file into a compressed copy when it closes.
_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
# Every chunk carries a Fletcher-32 checksum, so a changed byte is an error, never a
# wrong number. Small fixed datasets are stored compact, inside their object
# header, which HDF5 checksums itself.
_CHECKSUM: dict[str, Any] = {"fletcher32": True}
_COMPACT_LIMIT = 32 * 1024  # bytes; HDF5 allows up to 64 KiB in an object header
_NAME_DTYPE = "S128"  # fixed-length UTF-8 strings: safe under SWMR, unlike vlen data


@dataclass
class LayerCapture:
    """The statistics of one captured tensor at one capture (host numpy arrays)."""

    hist_counts: np.ndarray  # (B,) int
    hist_edges: np.ndarray  # (B+1,)
    quantiles: np.ndarray  # (Q,)
    moments: np.ndarray  # (K,) in RunLayout.moment_names order
    zero_frac: float
    nonfinite: int
    unit_mean: np.ndarray  # (C,)
    unit_std: np.ndarray  # (C,)
    unit_quantiles: np.ndarray  # (U, Q)


@dataclass
class Capture:
    """One capture: where it was taken and what it measured."""

    step: int
    epoch: float
    time: float
    kind: str  # a key of schema.CAPTURE_KINDS
    layers: list[LayerCapture]
    grad_norm: np.ndarray  # (V,) NaN where unavailable
    weight_norm: np.ndarray  # (V,)
    update_ratio: np.ndarray  # (V,) NaN at the first capture
    ics_grad_diff: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (L_ics,)
    ics_grad_cos: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class BatchRows:
    """Statistics of S training steps (per-step mode), one row per step.

    `layers` follows `RunLayout.batch_layers`; each entry maps a dataset name
    (hist_counts, hist_range, quantiles, moments, zero_frac, nonfinite,
    unit_quantiles) to an array with S rows.
    """

    step: np.ndarray
    epoch: np.ndarray
    time: np.ndarray
    layers: list[dict[str, np.ndarray]]

    def __len__(self) -> int:
        return len(self.step)


# A layer's per-capture datasets: named as LayerCapture's fields, written in their order.
LAYER_DATASETS: tuple[str, ...] = tuple(f.name for f in fields(LayerCapture))

BATCH_DATASETS: tuple[str, ...] = (
    "hist_counts",
    "hist_range",
    "quantiles",
    "moments",
    "zero_frac",
    "nonfinite",
    "unit_quantiles",
)


def _encode(names: list[str]) -> np.ndarray:
    return np.array([n.encode("utf-8")[:128] for n in names], dtype=_NAME_DTYPE)


# Chunk sizes, in values. Each flush while a run is written rewrites every chunk a capture
# touched, whole and checksummed: one capture's row is 1/16 of a 1,024-value chunk of a 64-bin
# histogram, against 1/64 of a 4,096-value one. Beside a training step the write runs with cold
# caches, and rewriting less is what counts there (`benchmarks/live_chunks.py`: the BN CNN's write
# 23 % less CPU time, MobileNetV2's 13 %). The per-step rows are written a hundred steps at a time
# and keep large chunks; the compacted file keeps the 4,096-value chunks it always had.
_LIVE_CHUNK_VALUES = 1024
_STEP_CHUNK_VALUES = 16384
_COMPACT_CHUNK_VALUES = 4096


def _rows_per_chunk(row_shape: tuple[int, ...], values: int, rows: int) -> int:
    """Rows of `row_shape` in a chunk of about `values` values: at least 1, at most `rows`."""
    row_size = int(np.prod(row_shape)) if row_shape else 1
    return max(1, min(rows, values // row_size))


def _extendable(
    group: h5py.Group,
    name: str,
    row_shape: tuple[int, ...],
    dtype: Any,
    *,
    rows: int = 256,
    values: int = _LIVE_CHUNK_VALUES,
) -> None:
    """A dataset of zero rows that grows along its first axis, in chunks of about `values`
    values (`rows`: at most this many rows per chunk)."""
    group.create_dataset(
        name,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        chunks=(_rows_per_chunk(row_shape, values, rows), *row_shape),
        dtype=dtype,
        **_CHECKSUM,
    )


# Links stay inside their (checksummed) group header instead of moving to HDF5's dense
# storage past 8 of them: damage in dense link storage can make the library free memory
# twice while it reports the damage, which no caller survives. (Attributes keep HDF5's
# default: compact attributes hung the library on a zeroed block.)
_COMPACT_LINKS = (65535, 65534)


# The file format of HDF5 1.10, the oldest that has SWMR, and no newer: HDF5's "latest"
# means the writing library's newest, and a file written by HDF5 2.0 (h5py 3.16) that way
# could not be read by HDF5 1.14 (h5py 3.15 and older): "bad version number for layout message".
_FORMAT = ("v110", "v110")


def _new_file(path: Path) -> h5py.File:
    """A fresh file in the 1.10 format; the root's 6 links are compact by default."""
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)  # _FORMAT, low-level
    return h5py.File(h5py.h5f.create(os.fsencode(path), h5py.h5f.ACC_TRUNC, fcpl=fcpl, fapl=fapl))


def _group(parent: h5py.Group, name: str) -> h5py.Group:
    """A new group that keeps its links compact."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    library = hdf5_library()  # h5py has no setter for the links' phase change
    if library is not None:
        library.H5Pset_link_phase_change(ctypes.c_int64(gcpl.id), *(ctypes.c_uint(n) for n in _COMPACT_LINKS))
    return h5py.Group(h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl))


def _fixed(group: h5py.Group, name: str, data: Any, dtype: Any = None) -> h5py.Dataset:
    """A dataset that never grows: compact (checksummed with its header) when small."""
    data = np.asarray(data, dtype=dtype)
    if data.nbytes > _COMPACT_LIMIT or data.size == 0:
        chunks = data.shape if data.size else None
        return group.create_dataset(name, data=data, chunks=chunks, **(_CHECKSUM if chunks else {}))
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    space = h5py.h5s.create(h5py.h5s.SCALAR) if data.ndim == 0 else h5py.h5s.create_simple(data.shape)
    dataset = h5py.Dataset(
        h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(data.dtype), space, dcpl=dcpl)
    )
    dataset[()] = data
    return dataset


class RunWriter:
    """Writes one run file. Create with `RunWriter.create` or `RunWriter.resume`.

    Example:

    ```python
    writer = RunWriter.create("runs/demo.h5", layout, {"model_name": "demo"})
    writer.write_capture(capture)
    writer.write_epoch(0, {"loss": 1.2, "val_accuracy": 0.4})
    writer.close()
    ```
    """

    def __init__(self, file: h5py.File, layout: RunLayout, lock: WriterLock) -> None:
        self._file = file
        self._lock = lock
        # Datasets stay open while the writer is: reopening them per row costs time, and a
        # dataset closed after a failed write leaves HDF5 a half-closed id that crashes it at exit.
        self._datasets: dict[str, h5py.Dataset] = {}
        self._capture_batch: RowBatch | None = None  # every per-capture dataset, in _capture_names order
        self._steps_batch: RowBatch | None = None  # every per-step dataset but the marker
        self._detached = False  # after a failed write, HDF5 writes to /dev/null (see _detach)
        self.layout = layout
        self.path = Path(file.filename)
        self._layer_ids = layout.layer_ids()
        self._variable_ids = layout.variable_ids()
        self._ics_ids = layout.ics_ids()
        self._history_names = [n.decode("utf-8") for n in file["history/names"][()]]
        self._file.swmr_mode = True  # from here on: no new objects or attributes
        self._set_status("training")

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        layout: RunLayout,
        metadata: Mapping[str, Any],
        *,
        overwrite: bool = False,
    ) -> RunWriter:
        """Create a new run file (refusing to replace one unless `overwrite`)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise RunExistsError(
                f"{path} already exists. Pass overwrite=True (--overwrite on the command line) to replace it, choose "
                "another path, or resume the run with initial_epoch > 0."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(path).acquire()  # before "w" truncates a file another run is writing
        try:
            try:
                file = _new_file(path)
            except OSError as exc:
                raise RunFileError(f"cannot create run file {path}: {exc}") from exc
            _create_layout(file, layout, metadata)
            return cls(file, layout, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def resume(cls, path: str | os.PathLike[str], layout: RunLayout, *, from_epoch: int) -> RunWriter:
        """Reopen `path` to append to it, dropping what was recorded after `from_epoch`.

        Captures taken after the end of epoch `from_epoch` (0-based epochs
        completed: the `initial_epoch` of `fit`) and history rows of epochs
        >= `from_epoch` belong to a timeline that the resumed training
        replaces, so they are removed.
        """
        path = Path(path)
        lock = WriterLock(path).acquire()  # the flags below mean "killed" only if nobody holds it
        try:
            file = h5py.File(path, "a", libver=_FORMAT)
        except OSError as exc:
            if not _left_open_by_dead_writer(exc):
                lock.release()
                raise RunFileError(f"cannot reopen {path} to resume the run: {exc}") from exc
            try:
                _rewrite(path, status="interrupted")  # a killed writer left the SWMR flags set
                file = h5py.File(path, "a", libver=_FORMAT)
            except BaseException:
                lock.release()
                raise
        try:
            stored = layout_from_file(file)
            difference = stored.describe_difference(layout)
            if difference is not None:
                raise IncompatibleRunError(
                    f"{path} holds a run of another model or layer set ({difference}). "
                    "Pass overwrite=True (--overwrite on the command line) to replace it, or write to another path.",
                    difference,
                )
            _truncate(file, from_epoch)
        except BaseException:
            file.close()
            lock.release()
            raise
        return cls(file, layout, lock)

    # ------------------------------------------------------------------ writing
    def _ds(self, name: str) -> h5py.Dataset:
        dataset = self._datasets.get(name)
        if dataset is None:
            dataset = self._datasets[name] = self._file[name]
        return dataset

    def _batch(self, names: Sequence[str]) -> RowBatch:
        return RowBatch([RowWriter(self._ds(name)) for name in names])

    @property
    def num_captures(self) -> int:
        return int(self._ds("captures/step").shape[0])

    @property
    def last_capture_epoch(self) -> float | None:
        """The epoch of the last committed capture (None before the first)."""
        n = self.num_captures
        return float(self._ds("captures/epoch")[n - 1]) if n else None

    def epochs_without_metrics(self, before: int) -> list[int]:
        """The epochs (0-based) from the run's first up to `before` that have no history row:
        a process killed right after an epoch, before its row reached the file."""
        n = self.num_captures
        if not n:
            return []
        start = int(self._ds("captures/epoch")[0])
        recorded = set(self._ds("history/epoch")[()].tolist())  # its length is the rows committed
        return [e for e in range(start, before) if e not in recorded]

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turn a failed write into a RunFileError, leaving the file as the failure found it."""
        if self._detached:
            raise RunFileError(f"{self.path}: an earlier write failed; nothing more is written")
        try:
            yield
        except (OSError, RuntimeError) as exc:
            self._detach()
            raise RunFileError(
                f"writing {what} to {self.path} failed ({exc}); the file keeps every capture committed before"
            ) from exc

    def _detach(self) -> None:
        """Send HDF5's further writes to /dev/null.

        After a failed write (a full disk) HDF5 still holds dirty data it cannot flush; closing
        a dataset or the file then fails halfway, and the half-closed ids crash the library at
        interpreter exit. Behind /dev/null every later flush succeeds and the bytes on disk stay
        exactly as they were when the write failed.
        """
        self._detached = True
        try:
            descriptor = self._file.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, descriptor)
            finally:
                os.close(null)
        except (OSError, RuntimeError, TypeError, ValueError):
            pass  # another file driver: nothing to redirect

    def write_capture(self, capture: Capture) -> None:
        """Append one capture; it becomes visible to readers atomically."""
        self.write_captures([capture])

    def write_captures(self, captures: Sequence[Capture]) -> None:
        """Append several captures, one write per dataset for all of them; they become
        visible to readers together, atomically. (A write costs about the same for one row
        as for a dozen: a deep model's capture is some 2,000 of them.)"""
        if not captures:
            return
        with self._writing("a capture" if len(captures) == 1 else f"{len(captures)} captures"):
            self._write_captures(captures)

    def _write_captures(self, captures: Sequence[Capture]) -> None:
        t = self.num_captures
        if self._capture_batch is None:
            self._capture_batch = self._batch(self._capture_names())
        columns = [self._capture_values(capture) for capture in captures]
        if len(columns) == 1:
            self._capture_batch.write(t, columns[0])
        else:
            self._capture_batch.write(t, [np.stack(column) for column in zip(*columns)], rows=len(columns))
        flush(self._file)
        # The commit marker, last, exact length.
        append_rows(self._ds("captures/step"), t, np.asarray([capture.step for capture in captures]))
        flush(self._file)

    def _capture_names(self) -> list[str]:
        """Every per-capture dataset but the marker, in `_capture_values`' order."""
        names = ["captures/epoch", "captures/time", "captures/kind"]
        for lid in self._layer_ids:
            names += [f"layers/{lid}/{name}" for name in LAYER_DATASETS]
        for vid in self._variable_ids:
            names += [f"variables/{vid}/{name}" for name in ("grad_norm", "weight_norm", "update_ratio")]
        for iid in self._ics_ids:
            names += [f"ics/{iid}/grad_diff", f"ics/{iid}/grad_cos"]
        return names

    def _capture_values(self, capture: Capture) -> list[Any]:
        """The row of every dataset in `_capture_names`, in its order."""
        if len(capture.layers) != len(self._layer_ids):
            raise ValueError(f"capture has {len(capture.layers)} layers, the layout {len(self._layer_ids)}")
        values: list[Any] = [capture.epoch, capture.time, CAPTURE_KINDS[capture.kind]]
        for stats in capture.layers:
            values += [getattr(stats, name) for name in LAYER_DATASETS]
        for i in range(len(self._variable_ids)):
            values += [capture.grad_norm[i], capture.weight_norm[i], capture.update_ratio[i]]
        for i in range(len(self._ics_ids)):
            values += [
                capture.ics_grad_diff[i] if len(capture.ics_grad_diff) else np.nan,
                capture.ics_grad_cos[i] if len(capture.ics_grad_cos) else np.nan,
            ]
        return values

    @property
    def num_batch_rows(self) -> int:
        return int(self._ds("batches/step").shape[0]) if self.layout.batch_layers else 0

    def write_batches(self, rows: BatchRows) -> None:
        """Append the statistics of several training steps; committed together, atomically."""
        if not len(rows):
            return
        with self._writing("training-batch statistics"):
            self._write_batches(rows)

    def _write_batches(self, rows: BatchRows) -> None:
        if len(rows.layers) != len(self.layout.batch_layers):
            raise ValueError(
                f"{len(rows.layers)} batch layers, the layout has {len(self.layout.batch_layers)}"
            )
        start, n = self.num_batch_rows, len(rows)
        if self._steps_batch is None:
            names = ["batches/epoch", "batches/time"]
            for spec in self.layout.batch_layers:
                names += [f"batches/layers/{self._layer_ids[spec.index]}/{name}" for name in BATCH_DATASETS]
            self._steps_batch = self._batch(names)
        values: list[Any] = [rows.epoch, rows.time]
        for stats in rows.layers:
            values += [stats[name] for name in BATCH_DATASETS]
        # These grow a chunk at a time: rows past the marker are not committed.
        self._steps_batch.write(start, values, rows=n)
        flush(self._file)
        # The commit marker, last, exact length.
        append_rows(self._ds("batches/step"), start, np.asarray(rows.step))
        flush(self._file)
        assert self.num_batch_rows == start + n

    def place_in_epoch(self, epoch: float, first_step: int, steps: int) -> None:
        """Give the rows of an epoch whose length was not known while it ran (a dataset of
        unknown cardinality) their place in it: the step captures and per-step rows with steps
        from `first_step` to `first_step + steps` get the epoch `epoch + (step - first_step) /
        steps`. A step capture at the epoch's last step is its end: kind "epoch", at epoch + 1.

        Only rows written with a place from `epoch` on are moved, so the capture that ended the
        epoch before, at `first_step`, is left alone."""
        with self._writing("the places of an epoch's rows"):
            self._place("captures", epoch, first_step, steps, first_step + 1, first_step + steps)
            if self.layout.batch_layers:
                self._place("batches", epoch, first_step, steps, first_step, first_step + steps - 1)
            flush(self._file)

    def _place(self, group: str, epoch: float, first: int, steps: int, low: int, high: int) -> None:
        committed = int(self._ds(f"{group}/step").shape[0])
        start = max(0, committed - steps - 1)  # an epoch's rows are the last ones, one per step at most
        step = self._ds(f"{group}/step")[start:committed]
        epochs_ds = self._ds(f"{group}/epoch")
        placed = epochs_ds[start:committed]
        moved = (step >= low) & (step <= high) & (placed >= epoch)
        if group == "captures":
            kinds = self._ds("captures/kind")[start:committed]
            moved &= kinds == CAPTURE_KINDS["step"]
        if not moved.any():
            return
        placed = np.where(moved, epoch + (step - first) / steps, placed)
        epochs_ds[start:committed] = placed
        if group == "captures":
            end = moved & (step == first + steps)
            if end.any():
                self._ds("captures/kind")[start:committed] = np.where(end, CAPTURE_KINDS["epoch"], kinds)

    def write_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Append one row of epoch metrics (new metric names become new columns)."""
        with self._writing("the epoch metrics"):
            self._write_epoch(epoch, metrics)

    def _write_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        f = self._file
        names_ds, values_ds, epoch_ds = (self._ds(f"history/{n}") for n in ("names", "values", "epoch"))
        new = [str(k) for k in metrics if str(k) not in self._history_names]
        if new:
            self._history_names += new
            names_ds.resize(len(self._history_names), axis=0)
            names_ds[-len(new) :] = _encode(new)
            values_ds.resize(len(self._history_names), axis=1)
            if values_ds.shape[0]:
                values_ds[:, -len(new) :] = np.nan
        row = np.full(len(self._history_names), np.nan)
        for key, value in metrics.items():
            try:
                row[self._history_names.index(str(key))] = float(value)
            except (TypeError, ValueError):
                continue  # non-scalar log entries are not metrics
        e = epoch_ds.shape[0]
        _append_row(values_ds, e, row)
        f.flush()
        _append_row(epoch_ds, e, epoch)
        f.flush()

    def _set_status(self, status: str) -> None:
        self._ds("status")[()] = status.encode()
        self._file.flush()

    def close(self, status: str = "complete", *, compact: bool = True) -> None:
        """Mark the run's final status, close the file and compact it.

        Compacting rewrites the file compressed (a fraction of its size) and
        atomically replaces it. Safe to call twice.
        """
        if not self._file.id.valid:
            return
        try:
            try:
                self._set_status(status)
            finally:
                self._capture_batch = self._steps_batch = None
                self._datasets.clear()
                self._file.close()
            if compact and not self._detached:  # detached: the disk holds what it held
                if not self.path.exists():
                    raise RunFileError(
                        f"{self.path} was removed or renamed while the run was written: nothing to "
                        "compact (a renamed file keeps its captures, with the status 'training')"
                    )
                _rewrite(self.path, status=status)
        finally:
            self._lock.release()

    @property
    def closed(self) -> bool:
        return not self._file.id.valid

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close("complete" if exc_type is None else "interrupted")


def _append_row(ds: h5py.Dataset, row: int, value: Any) -> None:
    append_rows(ds, row, np.asarray([value]))


def _set_attrs(obj: h5py.Group | h5py.Dataset, **values: Any) -> None:
    """Attributes with text stored as fixed-length UTF-8 (see `encode_text`)."""
    for key, value in values.items():
        obj.attrs[key] = encode_text(value) if isinstance(value, str) else value


def _create_layout(file: h5py.File, layout: RunLayout, metadata: Mapping[str, Any]) -> None:
    from .. import __version__  # late: the package imports this module

    _set_attrs(
        file,
        schema_version=SCHEMA_VERSION,
        icsviz_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hist_bins=layout.hist_bins,
        capture_kinds=json.dumps(CAPTURE_KINDS),
    )
    for key, value in metadata.items():
        _set_attrs(file, **{key: json.dumps(value) if isinstance(value, (dict, list, tuple)) else value})
    _fixed(file, "status", b"training", "S16")

    captures = _group(file, "captures")
    for name, dtype in (("step", "i8"), ("epoch", "f8"), ("time", "f8"), ("kind", "u1")):
        _extendable(captures, name, (), dtype)

    b, q, k = layout.hist_bins, len(layout.quantiles), len(layout.moment_names)
    layers = _group(file, "layers")
    for index, (lid, spec) in enumerate(zip(layout.layer_ids(), layout.layers)):
        g = _group(layers, lid)
        _set_attrs(
            g,
            name=spec.name,
            class_name=spec.class_name,
            kind=spec.kind,
            index=index,
            output_shape=json.dumps(list(spec.output_shape)),
            n_units=spec.n_units,
            n_values=spec.n_values,
            samples=spec.samples,
            quantile_sample=spec.quantile_sample,
            value_sample=spec.value_sample,
            inputs=json.dumps(list(spec.inputs)),
        )
        _extendable(g, "hist_counts", (b,), "i8")
        _extendable(g, "hist_edges", (b + 1,), "f8")
        _extendable(g, "quantiles", (q,), "f4")
        g["quantiles"].attrs["q"] = np.asarray(layout.quantiles)
        _extendable(g, "moments", (k,), "f8")
        _set_attrs(g["moments"], names=json.dumps(list(layout.moment_names)))
        _extendable(g, "zero_frac", (), "f4")
        _extendable(g, "nonfinite", (), "i8")
        _extendable(g, "unit_mean", (spec.n_units,), "f4")
        _extendable(g, "unit_std", (spec.n_units,), "f4")
        _fixed(g, "tracked_units", spec.tracked_units, "i4")
        u, tq = len(spec.tracked_units), len(layout.tracked_quantiles)
        _extendable(g, "unit_quantiles", (u, tq), "f4")
        g["unit_quantiles"].attrs["q"] = np.asarray(layout.tracked_quantiles)

    variables = _group(file, "variables")
    for index, (vid, vspec) in enumerate(zip(layout.variable_ids(), layout.variables)):
        g = _group(variables, vid)
        _set_attrs(g, name=vspec.name, layer=vspec.layer, index=index, shape=json.dumps(list(vspec.shape)))
        for name in ("grad_norm", "weight_norm", "update_ratio"):
            _extendable(g, name, (), "f4")

    ics = _group(file, "ics")
    for index, (iid, name) in enumerate(zip(layout.ics_ids(), layout.ics_layers)):
        g = _group(ics, iid)
        _set_attrs(g, name=name, index=index)
        _extendable(g, "grad_diff", (), "f4")
        _extendable(g, "grad_cos", (), "f4")

    if layout.batch_layers:
        _create_batches(file, layout)

    history = _group(file, "history")
    history.create_dataset(
        "names", shape=(0,), maxshape=(None,), dtype=_NAME_DTYPE, chunks=(64,), **_CHECKSUM
    )
    history.create_dataset(
        "values", shape=(0, 0), maxshape=(None, None), dtype="f8", chunks=(64, 16), **_CHECKSUM
    )
    _extendable(history, "epoch", (), "i8")
    _set_attrs(file, layout=json.dumps(asdict(layout)))


def _create_batches(file: h5py.File, layout: RunLayout) -> None:
    """/batches: one row per training step, committed by the length of /batches/step."""
    batches = _group(file, "batches")

    def rows(group: h5py.Group, name: str, row_shape: tuple[int, ...], dtype: str) -> None:
        _extendable(group, name, row_shape, dtype, rows=1024, values=_STEP_CHUNK_VALUES)

    _set_attrs(batches, source="training batches, measured inside the training step (per-step mode)")
    for name, dtype in (("step", "i8"), ("epoch", "f8"), ("time", "f8")):
        rows(batches, name, (), dtype)
    b, q, k = layout.hist_bins, len(layout.quantiles), len(layout.moment_names)
    layers = _group(batches, "layers")
    ids = layout.layer_ids()
    for spec in layout.batch_layers:
        g = _group(layers, ids[spec.index])
        _set_attrs(
            g,
            name=spec.name,
            index=spec.index,
            n_units=spec.n_units,
            sample=spec.sample,
            unit_sample=spec.unit_sample,
        )
        rows(g, "hist_counts", (b,), "i4")
        rows(g, "hist_range", (2,), "f8")  # first edge, bin width
        rows(g, "quantiles", (q,), "f4")
        g["quantiles"].attrs["q"] = np.asarray(layout.quantiles)
        rows(g, "moments", (k,), "f4")
        _set_attrs(g["moments"], names=json.dumps(list(layout.moment_names)))
        rows(g, "zero_frac", (), "f4")
        rows(g, "nonfinite", (), "i4")
        _fixed(g, "tracked_units", spec.tracked_units, "i4")
        rows(g, "unit_quantiles", (len(spec.tracked_units), len(layout.tracked_quantiles)), "f4")
        g["unit_quantiles"].attrs["q"] = np.asarray(layout.tracked_quantiles)


def layout_from_file(file: h5py.File) -> RunLayout:
    """The RunLayout a file was created with (from its ``layout`` attribute)."""
    raw = json.loads(file.attrs["layout"])
    return RunLayout(
        layers=tuple(
            LayerSpec(
                **{
                    **spec,
                    "output_shape": tuple(spec["output_shape"]),
                    "tracked_units": tuple(spec["tracked_units"]),
                    "inputs": tuple(spec.get("inputs", ())),
                }
            )
            for spec in raw["layers"]
        ),
        variables=tuple(VariableSpec(**{**spec, "shape": tuple(spec["shape"])}) for spec in raw["variables"]),
        ics_layers=tuple(raw["ics_layers"]),
        hist_bins=int(raw["hist_bins"]),
        quantiles=tuple(raw["quantiles"]),
        moment_names=tuple(raw["moment_names"]),
        tracked_quantiles=tuple(raw["tracked_quantiles"]),
        batch_layers=tuple(
            BatchLayerSpec(**{**spec, "tracked_units": tuple(spec["tracked_units"])})
            for spec in raw.get("batch_layers", ())
        ),
    )


def _truncate(file: h5py.File, from_epoch: int) -> None:
    """Drop captures after epoch `from_epoch` and history rows of later epochs."""
    committed = int(file["captures/step"].shape[0])
    epochs = file["captures/epoch"][:committed]
    keep = int(np.searchsorted(epochs, from_epoch, side="right"))
    _truncate_rows(file, min(keep, committed))
    if "batches/step" in file:
        marked_steps = int(file["batches/step"].shape[0])
        keep_steps = int(np.sum(file["batches/epoch"][:marked_steps] < from_epoch))

        def cut(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and is_per_batch("batches/" + name, obj.maxshape):
                if obj.shape[0] > keep_steps:
                    obj.resize(keep_steps, axis=0)

        file["batches"].visititems(cut)
    marked = int(file["history/epoch"].shape[0])
    history_epochs = file["history/epoch"][:marked]
    keep_rows = int(np.sum(history_epochs < from_epoch))
    for name in ("history/values", "history/epoch"):
        if file[name].shape[0] > keep_rows:
            file[name].resize(keep_rows, axis=0)


def _left_open_by_dead_writer(exc: OSError) -> bool:
    """True for HDF5's 'file is already open for write' flag error.

    A live writer holds a file lock and fails differently ("unable to lock
    file"), so a run that is still training is never mistaken for a dead one.
    """
    text = str(exc)
    return "already open for" in text and "lock" not in text


def repair_run(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Save every readable capture of a damaged or killed run into a clean file. Returns its path.

    A file left by a killed writer (HDF5's "open for writing" flags set, so
    plain ``h5py.File(path)`` refuses it) but otherwise intact is rewritten in
    place, marked "interrupted"; an intact run its writer closed is left as it
    is (its path is returned). A damaged file is copied to `out` (default:
    ``NAME.repaired.h5`` beside it; the original is left as it is) without
    the parts that fail their checksums: a damaged layer, variable or
    gradient-shift group is left out whole, damaged rows of the capture index
    drop those captures, damaged history rows are dropped. `icsviz check`
    says beforehand what that keeps.

    Raises:
        DamagedRunError: the header or the whole capture index is damaged,
            so nothing can be saved.
        RunInUseError: a training process is writing the file.
    """
    from .check import check_run  # check reads through the reader side only

    path = Path(path).expanduser()
    lock = WriterLock(path).acquire()  # never under a live writer
    try:
        report = check_run(path)
        if not report.openable:
            raise DamagedRunError(f"{path} cannot be repaired: {report.error}", path=str(path))
        closed = closed_status(path) if report.ok else None
        if report.ok and out is None:
            # A run closed cleanly needs nothing; one a killed writer left is marked interrupted.
            return path if closed is not None else _rewrite(path, status="interrupted")
        target = (
            Path(out).expanduser()
            if out is not None
            else path.with_name(f"{path.stem}.repaired{path.suffix}")
        )
        if target.resolve() == path.resolve() and not report.ok:
            raise ValueError(
                f"repair writes the saved captures to a new file; pass an `out` other than {path}"
            )
        return _rewrite(path, status=closed or "interrupted", out=target, plan=report)
    finally:
        lock.release()


def closed_status(path: str | os.PathLike[str]) -> str | None:
    """The status of a run file its writer closed ("complete" or "interrupted"), or None for one a
    killed writer left open (HDF5's SWMR flags still set, or /status still "training")."""
    file, swmr = open_for_reading(Path(path).expanduser())
    with file:
        status = decode_status(file["status"][()])
    return None if swmr or status == "training" else status


def _rewrite(path: Path, *, status: str, out: Path | None = None, plan: RunCheck | None = None) -> Path:
    """Copy the committed content of a run into a fresh compressed file (in place unless `out`).

    With a `plan` from `check_run`, the damaged groups and rows it lists are left out.
    """
    out = path if out is None else out
    tmp = out.with_name(out.name + ".tmp")
    src, _ = open_for_reading(path)
    try:
        with src, _new_file(tmp) as dst:
            rows = int(src["captures/step"].shape[0]) if "captures/step" in src else None
            copy = _Copy(rows, plan)
            copy.batch_rows = int(src["batches/step"].shape[0]) if "batches/step" in src else None
            copy.group(src, dst)
            if "status" in dst:
                dst["status"][()] = status.encode()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class _Copy:
    """Recursive copy that compresses datasets, keeps only committed rows and leaves out damage."""

    def __init__(self, rows: int | None, plan: RunCheck | None) -> None:
        self.rows = rows
        self.skip = set(plan.drop_groups) if plan else set()
        self.drop_captures = set(plan.drop_captures) if plan else set()
        self.drop_history = set(plan.drop_history) if plan else set()
        self.history_lost = bool(plan and plan.history_lost)
        self.batch_rows: int | None = None  # committed training-step rows (per-step mode)
        self._dcpls: dict[tuple[Any, ...], Any] = {}  # creation property lists, one per kind of dataset

    def group(self, src: h5py.Group, dst: h5py.Group) -> None:
        _copy_attrs(src, dst)
        for name in src:
            if f"{src.name.rstrip('/')}/{name}" in self.skip:
                continue  # by path: a damaged object may not even open
            obj = src[name]
            if isinstance(obj, h5py.Group):
                self.group(obj, _group(dst, name))
            else:
                self.dataset(obj, dst, name)

    def dataset(self, obj: h5py.Dataset, dst: h5py.Group, name: str) -> None:
        # Each property read is a library call: read them once (2,000 datasets in a deep model's run).
        path, maxshape, shape, dtype, chunks = obj.name, obj.maxshape, obj.shape, obj.dtype, obj.chunks
        history = path.startswith("/history/")
        if history and self.history_lost:
            data = np.zeros((0,) * len(shape), dtype)
        elif history and path != "/history/names":
            data = _kept_rows(obj, shape[0], self.drop_history)
        elif self.rows is not None and is_per_capture(path, maxshape):
            data = _kept_rows(obj, self.rows, self.drop_captures)
        elif self.batch_rows is not None and is_per_batch(path, maxshape):
            data = obj[: self.batch_rows]
        else:
            data = obj[()]
        if maxshape == shape or not chunks:  # fixed-size: copy as is
            new = _fixed(dst, name, data, dtype)
        else:
            if is_per_capture(path, maxshape):  # the compacted chunks, whatever the live ones were
                chunks = (_rows_per_chunk(shape[1:], _COMPACT_CHUNK_VALUES, 64), *chunks[1:])
            else:
                cap = 1024 if is_per_batch(path, maxshape) else 64
                chunks = tuple(max(1, min(c, cap)) if i == 0 else c for i, c in enumerate(chunks))
            new = self._compressed(dst, name, np.asarray(data, dtype), maxshape, chunks)
        _copy_attrs(obj, new)

    def _compressed(
        self,
        dst: h5py.Group,
        name: str,
        data: np.ndarray,
        maxshape: tuple[int | None, ...],
        chunks: tuple[int, ...],
    ) -> h5py.Dataset:
        """A compressed, checksummed copy of `data`, made through h5py's low-level API: a deep
        model's run has about 2,000 of these, and the high-level `create_dataset` (argument
        checks, a new property list each) was a third of closing the file."""
        key = (data.dtype.str, chunks, maxshape)
        dcpl = self._dcpls.get(key)
        if dcpl is None:
            dcpl = h5py.filters.fill_dcpl(
                h5py.h5p.create(h5py.h5p.DATASET_CREATE),
                data.shape,
                data.dtype,
                chunks,
                _COMPRESSION["compression"],
                _COMPRESSION["compression_opts"],
                _COMPRESSION["shuffle"],
                _CHECKSUM["fletcher32"],
                maxshape,
                None,
                None,
            )
            dcpl.set_obj_track_times(False)  # as h5py's create_dataset: equal runs, equal bytes
            self._dcpls[key] = dcpl
        unlimited = tuple(h5py.h5s.UNLIMITED if m is None else m for m in maxshape)
        space = h5py.h5s.create_simple(data.shape, unlimited)
        dataset = h5py.h5d.create(
            dst.id, name.encode(), h5py.h5t.py_create(data.dtype, logical=True), space, dcpl=dcpl
        )
        if data.size:
            dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(data))
        return h5py.Dataset(dataset)


def _copy_attrs(src: h5py.HLObject, dst: h5py.HLObject) -> None:
    """Copy every attribute as stored (type and shape), through the low-level API; text that
    h5py reads as `str` (variable-length, from older files) is stored fixed-length as elsewhere,
    and an empty attribute stays empty."""
    for attribute, value, stored in read_attributes(src):
        if not stored:  # through h5py's conversions
            _set_attrs(dst, **{attribute.name.decode("utf-8"): value})
            continue
        copy = h5py.h5a.create(dst.id, attribute.name, attribute.get_type(), attribute.get_space())
        copy.write(value)


def _kept_rows(ds: h5py.Dataset, rows: int, drop: set[int]) -> np.ndarray:
    """The first `rows` rows without those in `drop`, reading around damaged chunks."""
    if not drop:
        return ds[:rows]
    step = max(1, ds.chunks[0] if ds.chunks else rows)
    blocks = []
    for start in range(0, rows, step):
        keep = [r - start for r in range(start, min(rows, start + step)) if r not in drop]
        if keep:
            blocks.append(ds[start : min(rows, start + step)][np.asarray(keep)])
    return np.concatenate(blocks) if blocks else np.zeros((0, *ds.shape[1:]), ds.dtype)


def _truncate_rows(file: h5py.File, rows: int) -> None:
    """Cut per-capture datasets to the committed number of rows."""

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and is_per_capture(name, obj.maxshape) and obj.shape[0] > rows:
            obj.resize(rows, axis=0)

    file.visititems(visit)
