"""Rows appended to many datasets at once: the writer's hot path.

A capture appends one row to every per-capture dataset, about 1,800 of them for
MobileNetV2's 151 layers. Through h5py each row is a library call of ~13 µs
made with Python's lock (the GIL) held: 24 ms a capture, plus 14 ms for the
flush after it, all of it time in which the training thread cannot run Python.
HDF5 1.14's `H5Dwrite_multi` takes every row in one call (6 ms), and called
through ctypes it runs, like `H5Fflush`, with the GIL released. h5py's own lock
(`phil`) is held around both, as h5py holds it around each of its calls: the
library is not thread-safe, and nothing else may enter it meanwhile.

An HDF5 older than 1.14 has no `H5Dwrite_multi`: the rows then go one by one
through h5py. A call that fails is repeated through h5py, which raises h5py's own
error (a full disk is an OSError there, as everywhere else).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

import h5py
import numpy as np

from .files import hdf5_library

try:
    from h5py._objects import phil  # h5py's lock around every call into HDF5
except ImportError:  # an h5py that keeps it elsewhere: its own calls only, never HDF5's behind its back
    phil = None

__all__ = ["RowWriter", "RowBatch", "append_rows", "flush"]

_H5P_DEFAULT = 0
_H5F_SCOPE_LOCAL = 0
_POINTERS = ctypes.c_void_p
_functions: dict[str, Any] = {}


def _library_function(name: str, argtypes: list[Any]) -> Callable[..., int] | None:
    """An HDF5 C function of h5py's own library, or None where that library lacks it."""
    if name not in _functions:
        library = hdf5_library() if phil is not None else None
        function = getattr(library, name, None) if library is not None else None
        if function is not None:
            function.argtypes = argtypes
            function.restype = ctypes.c_int  # herr_t
        _functions[name] = function
    return _functions[name]


def _write_multi() -> Callable[..., int] | None:
    # herr_t H5Dwrite_multi(size_t count, hid_t dset_id[], hid_t mem_type_id[], hid_t mem_space_id[],
    #                       hid_t file_space_id[], hid_t dxpl_id, const void *buf[])
    return _library_function("H5Dwrite_multi", [ctypes.c_size_t, *[_POINTERS] * 4, ctypes.c_int64, _POINTERS])


def _flush_file() -> Callable[..., int] | None:
    # herr_t H5Fflush(hid_t object_id, H5F_scope_t scope)
    return _library_function("H5Fflush", [ctypes.c_int64, ctypes.c_int])


class RowWriter:
    """Appends rows to one per-capture or per-step dataset through h5py's low-level API.

    The high-level `ds[row] = value` (selection parsing, a resize per row) cost ~0.2 ms
    a row. Here the dataset grows a chunk's worth of rows at a time and each row is one
    hyperslab write. Rows past the commit marker (the length of /captures/step) are not
    committed: readers ignore them, resuming and compacting cut them off.
    """

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds = ds
        self.row_shape = tuple(ds.shape[1:])
        self.dtype = ds.dtype
        self.type = ds.id.get_type()  # the file's own type, so memory needs no conversion
        self.capacity = int(ds.shape[0])
        self.grow = max(1, int(ds.chunks[0]) if ds.chunks else 64)
        self.file_space = ds.id.get_space()
        self.offset_tail = (0,) * len(self.row_shape)
        self._memory: dict[int, h5py.h5s.SpaceID] = {}

    def rows_of(self, values: Any, rows: int) -> np.ndarray:
        """`values` as `rows` contiguous rows of this dataset's type."""
        return np.ascontiguousarray(np.asarray(values, dtype=self.dtype).reshape((rows, *self.row_shape)))

    def memory_space(self, rows: int) -> h5py.h5s.SpaceID:
        space = self._memory.get(rows)
        if space is None:
            space = self._memory[rows] = h5py.h5s.create_simple((rows, *self.row_shape))
        return space

    def select(self, start: int, rows: int) -> h5py.h5s.SpaceID:
        """The file space, grown if needed, with rows `start .. start + rows` selected."""
        if start + rows > self.capacity:
            self.capacity = ((start + rows - 1) // self.grow + 1) * self.grow
            self.ds.id.set_extent((self.capacity, *self.row_shape))
            self.file_space = self.ds.id.get_space()
        self.file_space.select_hyperslab((start, *self.offset_tail), (rows, *self.row_shape))
        return self.file_space

    def write_rows(self, start: int, values: Any, rows: int | None = None) -> None:
        """Rows `start`, `start + 1`, ... from the first axis of `values`, in one write."""
        data = self.rows_of(values, -1 if rows is None else rows)
        if len(data):
            self.ds.id.write(self.memory_space(len(data)), self.select(start, len(data)), data)


class RowBatch:
    """Datasets that are always written together, row for row: the rows of a capture, or of
    a run of training steps. One `write` is one HDF5 call, made without the GIL.

    The Python work around that call holds the GIL, and on a GPU the training step is Python
    work too (Keras dispatching kernels): every millisecond here is one the step can lose. So
    it does not grow with the number of datasets (MobileNetV2: 1,836): the values go into one
    buffer per dtype in one numpy call, and the datasets that share a row shape and an extent
    share one file space and one memory space, selected once per write. (HDF5 accepts any
    dataspace of a dataset's shape; a row selected past a dataset's own extent would be
    dropped silently, so the datasets of a group always grow together.)
    """

    def __init__(self, writers: Sequence[RowWriter]) -> None:
        self.writers = list(writers)
        count = len(self.writers)
        self._datasets = np.array([w.ds.id.id for w in self.writers], dtype=np.int64)
        self._types = np.array([w.type.id for w in self.writers], dtype=np.int64)
        self._memory = np.zeros(count, dtype=np.int64)
        self._files = np.zeros(count, dtype=np.int64)
        self._buffers = np.zeros(count, dtype=np.uintp)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, w in enumerate(self.writers):
            groups.setdefault((w.row_shape, w.capacity, w.grow), []).append(i)
        self._space_groups = [
            (np.array(members), [self.writers[i] for i in members]) for members in groups.values()
        ]
        by_dtype: dict[np.dtype[Any], list[int]] = {}
        for i, w in enumerate(self.writers):
            by_dtype.setdefault(w.dtype, []).append(i)
        self._dtype_groups = []
        for dtype, members in by_dtype.items():
            row_sizes = np.array([int(np.prod(self.writers[i].row_shape, dtype=np.int64)) for i in members])
            # Byte offset of each dataset's first row in the group's buffer, for one row per dataset.
            row_starts = (np.cumsum(row_sizes) - row_sizes) * dtype.itemsize
            self._dtype_groups.append(
                (dtype, members, np.array(members), row_sizes, row_starts.astype(np.uintp))
            )

    def write(self, start: int, values: Sequence[Any], rows: int = 1) -> None:
        """Rows `start .. start + rows` of every dataset: `values[i]` holds the i-th one's."""
        if len(values) != len(self.writers):
            raise ValueError(f"{len(values)} values for {len(self.writers)} datasets")
        write_multi = _write_multi()
        packed = self._pack(values, rows) if write_multi is not None and values else None
        if packed is None:
            self._write_each(start, [w.rows_of(value, rows) for w, value in zip(self.writers, values)])
            return
        for members, group in self._space_groups:
            lead = group[0]
            if start + rows > lead.capacity:  # grow them all, so their extents stay one
                for w in group[1:]:
                    w.select(start, rows)
            self._files[members] = lead.select(start, rows).id
            self._memory[members] = lead.memory_space(rows).id
        with phil:
            status = write_multi(
                len(values),
                self._datasets.ctypes.data,
                self._types.ctypes.data,
                self._memory.ctypes.data,
                self._files.ctypes.data,
                _H5P_DEFAULT,
                self._buffers.ctypes.data,
            )
        if status < 0:  # again through h5py: it succeeds, or raises its own error
            self._write_each(start, [w.rows_of(value, rows) for w, value in zip(self.writers, values)])

    def _pack(self, values: Sequence[Any], rows: int) -> list[np.ndarray] | None:
        """The rows of each dtype's datasets in one contiguous buffer, `_buffers` pointing into
        them (the buffers are returned: they must live until the write). None when a value has
        the wrong size: the per-dataset path then raises the error that names it."""
        buffers = []
        for dtype, members, indices, row_sizes, row_starts in self._dtype_groups:
            chosen = [values[i] for i in members]
            sizes = np.fromiter(map(np.size, chosen), dtype=np.int64, count=len(chosen))
            if not np.array_equal(sizes, row_sizes * rows):
                return None
            buffer = np.concatenate(chosen, axis=None, dtype=dtype, casting="unsafe")
            self._buffers[indices] = buffer.ctypes.data + row_starts * np.uintp(rows)
            buffers.append(buffer)
        return buffers

    def _write_each(self, start: int, data: Sequence[np.ndarray]) -> None:
        for w, block in zip(self.writers, data):
            w.write_rows(start, block)


def flush(file: h5py.File) -> None:
    """`file.flush()`, with the GIL released while HDF5 writes its dirty chunks."""
    flush_file = _flush_file()
    if flush_file is not None:
        with phil:
            if flush_file(file.id.id, _H5F_SCOPE_LOCAL) >= 0:
                return
    file.flush()  # no such function, or it failed: h5py's own call raises h5py's error


def append_rows(ds: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """Rows `start ..` of `ds` (a marker or history dataset) through h5py, resizing to fit exactly."""
    end = start + len(values)
    if ds.shape[0] < end:
        ds.resize(end, axis=0)
    ds[start:end] = values
