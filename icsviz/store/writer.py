"""RunWriter: append captures and epoch metrics to an HDF5 run file.

The writer knows nothing of Keras: it takes numpy arrays laid out by a
`RunLayout`. Every dataset and attribute is created before SWMR mode is switched
on, so that readers (the app) can follow the file while it grows. The length
of ``/captures/step`` is the commit marker: all other rows of a capture are
written and flushed first, so a reader never sees half a capture, and a process
killed at any moment leaves every capture that was committed before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import IncompatibleRunError, RunExistsError, RunFileError
from .schema import CAPTURE_KINDS, SCHEMA_VERSION, LayerSpec, RunLayout, VariableSpec

__all__ = ["RunWriter", "LayerCapture", "Capture", "layout_from_file", "repair_run"]

# Compressed chunks that are rewritten on every append do not fit their old
# space, and HDF5 never reuses the space they leave: a compressed file grows by
# megabytes a capture. So the writer writes small uncompressed chunks (rewritten
# in place) and compacts the file into a compressed copy when it closes.
_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
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


def _encode(names: list[str]) -> np.ndarray:
    return np.array([n.encode("utf-8")[:128] for n in names], dtype=_NAME_DTYPE)


def _extendable(group: h5py.Group, name: str, row_shape: tuple[int, ...], dtype: Any) -> None:
    """A dataset of zero rows that grows along its first axis."""
    row_size = int(np.prod(row_shape)) if row_shape else 1
    rows_per_chunk = max(1, min(256, 4096 // row_size))
    group.create_dataset(
        name,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        chunks=(rows_per_chunk, *row_shape),
        dtype=dtype,
    )


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

    def __init__(self, file: h5py.File, layout: RunLayout) -> None:
        self._file = file
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
                f"{path} already exists. Pass overwrite=True to replace it, choose "
                "another path, or resume the run with initial_epoch > 0."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            file = h5py.File(path, "w", libver="latest")
        except OSError as exc:
            raise RunFileError(f"cannot create run file {path}: {exc}") from exc
        _create_layout(file, layout, metadata)
        return cls(file, layout)

    @classmethod
    def resume(cls, path: str | os.PathLike[str], layout: RunLayout, *, from_epoch: int) -> RunWriter:
        """Reopen `path` to append to it, dropping what was recorded after `from_epoch`.

        Captures taken after the end of epoch `from_epoch` (0-based epochs
        completed: the `initial_epoch` of `fit`) and history rows of epochs
        >= `from_epoch` belong to a timeline that the resumed training
        replaces, so they are removed.
        """
        path = Path(path)
        try:
            file = h5py.File(path, "a", libver="latest")
        except OSError as exc:
            if not _left_open_by_dead_writer(exc):
                raise RunFileError(f"cannot reopen {path} to resume the run: {exc}") from exc
            repair_run(path)  # a killed writer left the SWMR flags set
            file = h5py.File(path, "a", libver="latest")
        try:
            stored = layout_from_file(file)
            difference = stored.describe_difference(layout)
            if difference is not None:
                raise IncompatibleRunError(
                    f"{path} holds a run of another model or layer set ({difference}). "
                    "Pass overwrite=True to replace it, or write to another path."
                )
            _truncate(file, from_epoch)
        except BaseException:
            file.close()
            raise
        return cls(file, layout)

    # ------------------------------------------------------------------ writing
    @property
    def num_captures(self) -> int:
        return int(self._file["captures/step"].shape[0])

    @property
    def last_capture_epoch(self) -> float | None:
        """The epoch of the last committed capture (None before the first)."""
        n = self.num_captures
        return float(self._file["captures/epoch"][n - 1]) if n else None

    def write_capture(self, capture: Capture) -> None:
        """Append one capture; it becomes visible to readers atomically."""
        f = self._file
        t = self.num_captures
        if len(capture.layers) != len(self._layer_ids):
            raise ValueError(f"capture has {len(capture.layers)} layers, the layout {len(self._layer_ids)}")
        rows: list[tuple[str, Any]] = [
            ("captures/epoch", capture.epoch),
            ("captures/time", capture.time),
            ("captures/kind", CAPTURE_KINDS[capture.kind]),
        ]
        for lid, stats in zip(self._layer_ids, capture.layers):
            g = f"layers/{lid}/"
            rows += [
                (g + "hist_counts", stats.hist_counts),
                (g + "hist_edges", stats.hist_edges),
                (g + "quantiles", stats.quantiles),
                (g + "moments", stats.moments),
                (g + "zero_frac", stats.zero_frac),
                (g + "nonfinite", stats.nonfinite),
                (g + "unit_mean", stats.unit_mean),
                (g + "unit_std", stats.unit_std),
                (g + "unit_quantiles", stats.unit_quantiles),
            ]
        for i, vid in enumerate(self._variable_ids):
            g = f"variables/{vid}/"
            rows += [
                (g + "grad_norm", capture.grad_norm[i]),
                (g + "weight_norm", capture.weight_norm[i]),
                (g + "update_ratio", capture.update_ratio[i]),
            ]
        for i, iid in enumerate(self._ics_ids):
            g = f"ics/{iid}/"
            diff = capture.ics_grad_diff[i] if len(capture.ics_grad_diff) else np.nan
            cos = capture.ics_grad_cos[i] if len(capture.ics_grad_cos) else np.nan
            rows += [(g + "grad_diff", diff), (g + "grad_cos", cos)]
        for name, value in rows:
            _append_row(f[name], t, value)
        f.flush()
        _append_row(f["captures/step"], t, capture.step)  # the commit marker, last
        f.flush()

    def write_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Append one row of epoch metrics (new metric names become new columns)."""
        f = self._file
        names_ds, values_ds, epoch_ds = f["history/names"], f["history/values"], f["history/epoch"]
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
        self._file["status"][()] = status.encode()
        self._file.flush()

    def close(self, status: str = "complete", *, compact: bool = True) -> None:
        """Mark the run's final status, close the file and compact it.

        Compacting rewrites the file compressed (a fraction of its size) and
        atomically replaces it. Safe to call twice.
        """
        if not self._file.id.valid:
            return
        try:
            self._set_status(status)
        finally:
            self._file.close()
        if compact:
            _rewrite(self.path, status=status)

    @property
    def closed(self) -> bool:
        return not self._file.id.valid

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close("complete" if exc_type is None else "interrupted")


def _append_row(ds: h5py.Dataset, row: int, value: Any) -> None:
    if ds.shape[0] <= row:
        ds.resize(row + 1, axis=0)
    ds[row] = value


def _create_layout(file: h5py.File, layout: RunLayout, metadata: Mapping[str, Any]) -> None:
    from .. import __version__  # late: the package imports this module

    attrs = file.attrs
    attrs["schema_version"] = SCHEMA_VERSION
    attrs["icsviz_version"] = __version__
    attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    attrs["hist_bins"] = layout.hist_bins
    attrs["capture_kinds"] = json.dumps(CAPTURE_KINDS)
    for key, value in metadata.items():
        attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
    file.create_dataset("status", data=b"training", dtype="S16")

    captures = file.create_group("captures")
    for name, dtype in (("step", "i8"), ("epoch", "f8"), ("time", "f8"), ("kind", "u1")):
        _extendable(captures, name, (), dtype)

    b, q, k = layout.hist_bins, len(layout.quantiles), len(layout.moment_names)
    layers = file.create_group("layers")
    for index, (lid, spec) in enumerate(zip(layout.layer_ids(), layout.layers)):
        g = layers.create_group(lid)
        g.attrs.update(
            name=spec.name,
            class_name=spec.class_name,
            kind=spec.kind,
            index=index,
            output_shape=json.dumps(list(spec.output_shape)),
            n_units=spec.n_units,
            n_values=spec.n_values,
            samples=spec.samples,
            quantile_sample=spec.quantile_sample,
        )
        _extendable(g, "hist_counts", (b,), "i8")
        _extendable(g, "hist_edges", (b + 1,), "f8")
        _extendable(g, "quantiles", (q,), "f4")
        g["quantiles"].attrs["q"] = np.asarray(layout.quantiles)
        _extendable(g, "moments", (k,), "f8")
        g["moments"].attrs["names"] = json.dumps(list(layout.moment_names))
        _extendable(g, "zero_frac", (), "f4")
        _extendable(g, "nonfinite", (), "i8")
        _extendable(g, "unit_mean", (spec.n_units,), "f4")
        _extendable(g, "unit_std", (spec.n_units,), "f4")
        g.create_dataset("tracked_units", data=np.asarray(spec.tracked_units, dtype="i4"))
        u, tq = len(spec.tracked_units), len(layout.tracked_quantiles)
        _extendable(g, "unit_quantiles", (u, tq), "f4")
        g["unit_quantiles"].attrs["q"] = np.asarray(layout.tracked_quantiles)

    variables = file.create_group("variables")
    for index, (vid, vspec) in enumerate(zip(layout.variable_ids(), layout.variables)):
        g = variables.create_group(vid)
        g.attrs.update(name=vspec.name, layer=vspec.layer, index=index, shape=json.dumps(list(vspec.shape)))
        for name in ("grad_norm", "weight_norm", "update_ratio"):
            _extendable(g, name, (), "f4")

    ics = file.create_group("ics")
    for index, (iid, name) in enumerate(zip(layout.ics_ids(), layout.ics_layers)):
        g = ics.create_group(iid)
        g.attrs.update(name=name, index=index)
        _extendable(g, "grad_diff", (), "f4")
        _extendable(g, "grad_cos", (), "f4")

    history = file.create_group("history")
    history.create_dataset("names", shape=(0,), maxshape=(None,), dtype=_NAME_DTYPE, chunks=(64,))
    history.create_dataset("values", shape=(0, 0), maxshape=(None, None), dtype="f8", chunks=(64, 16))
    _extendable(history, "epoch", (), "i8")
    attrs["layout"] = json.dumps(asdict(layout))


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
    )


def _truncate(file: h5py.File, from_epoch: int) -> None:
    """Drop captures after epoch `from_epoch` and history rows of later epochs."""
    committed = int(file["captures/step"].shape[0])
    epochs = file["captures/epoch"][:committed]
    keep = int(np.searchsorted(epochs, from_epoch, side="right"))
    _truncate_rows(file, min(keep, committed))
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


def repair_run(path: str | os.PathLike[str]) -> Path:
    """Make a run file left by a killed writer openable by plain h5py again.

    A writer killed in SWMR mode leaves the file's consistency flags set: SWMR
    readers (icsviz, ``h5py.File(path, "r", swmr=True)``) still read every
    committed capture, but ``h5py.File(path)`` and append mode refuse it. This
    copies the committed content into a fresh compressed file, marks it
    "interrupted" and atomically replaces the original. Returns the path.
    """
    return _rewrite(Path(path), status="interrupted")


def _rewrite(path: Path, *, status: str) -> Path:
    """Copy the committed content of a run into a fresh compressed file, in place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        src = h5py.File(path, "r", swmr=True, libver="latest")
    except OSError as exc:
        raise RunFileError(f"cannot rewrite {path}: {exc}") from exc
    try:
        with src, h5py.File(tmp, "w", libver="latest") as dst:
            rows = int(src["captures/step"].shape[0]) if "captures/step" in src else None
            _copy_group(src, dst, rows)
            if "status" in dst:
                dst["status"][()] = status.encode()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _copy_group(src: h5py.Group, dst: h5py.Group, rows: int | None) -> None:
    """Recursive copy that compresses datasets and keeps only committed rows."""
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    for name, obj in src.items():
        if isinstance(obj, h5py.Group):
            _copy_group(obj, dst.create_group(name), rows)
            continue
        data = obj[()]
        per_capture = rows is not None and obj.maxshape[:1] == (None,) and "history" not in obj.name
        if per_capture:
            data = data[:rows]
        if obj.maxshape == obj.shape or not obj.chunks:  # fixed-size: copy as is
            new = dst.create_dataset(name, data=data, dtype=obj.dtype)
        else:
            chunks = tuple(max(1, min(c, 64)) if i == 0 else c for i, c in enumerate(obj.chunks))
            new = dst.create_dataset(
                name, data=data, dtype=obj.dtype, maxshape=obj.maxshape, chunks=chunks, **_COMPRESSION
            )
        for key, value in obj.attrs.items():
            new.attrs[key] = value


def _truncate_rows(file: h5py.File, rows: int) -> None:
    """Cut per-capture datasets to the committed number of rows."""

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and not name.startswith("history/"):
            if obj.maxshape[:1] == (None,) and obj.shape[0] > rows:
                obj.resize(rows, axis=0)

    file.visititems(visit)
