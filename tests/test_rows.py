"""The writer's hot path: rows of many datasets in one HDF5 call (store/rows.py)."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest

from icsviz.store import rows
from icsviz.store.rows import RowBatch, RowWriter, flush

# (name, row shape, dtype, chunk rows): the kinds of per-capture datasets a capture writes
SHAPES = [
    ("counts", (64,), "int64", 16),
    ("edges", (65,), "float64", 15),
    ("quantiles", (13,), "float32", 64),
    ("zero_frac", (), "float32", 256),
    ("kind", (), "uint8", 256),
    ("unit_quantiles", (4, 13), "float32", 19),
]


def _create(path, libver: str = "v110") -> h5py.File:
    file = h5py.File(path, "w", libver=libver)
    for name, shape, dtype, chunk in SHAPES:
        file.create_dataset(
            name,
            shape=(0, *shape),
            maxshape=(None, *shape),
            chunks=(chunk, *shape),
            dtype=dtype,
            fletcher32=True,
        )
    file.swmr_mode = True
    return file


def _values(rng: np.random.Generator, n: int | None) -> list[np.ndarray]:
    lead = () if n is None else (n,)
    out = []
    for _, shape, dtype, _ in SHAPES:
        if np.dtype(dtype).kind == "f":
            out.append(rng.normal(size=(*lead, *shape)).astype(dtype))
        else:
            out.append(rng.integers(0, 200, size=(*lead, *shape)).astype(dtype))
    return out


def _write_run(file: h5py.File, seed: int, use_batch: bool) -> int:
    """Single rows and blocks of rows past several chunk boundaries; returns the row count."""
    rng = np.random.default_rng(seed)
    writers = [RowWriter(file[name]) for name, *_ in SHAPES]
    batch = RowBatch(writers)
    start = 0
    for n in (None, None, 5, None, 33, 1, None, 70, None):
        values = _values(rng, n)
        if use_batch:
            batch.write(start, values, rows=1 if n is None else n)
        else:
            for w, v in zip(writers, values):
                w.write_rows(start, v, 1 if n is None else n)
        start += 1 if n is None else n
        flush(file)
    return start


def _read(path, rows_written: int) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", swmr=True) as file:
        return {name: file[name][:rows_written] for name, *_ in SHAPES}


def test_one_call_for_many_datasets_writes_what_one_write_per_dataset_writes(tmp_path) -> None:
    assert rows._write_multi() is not None or h5py.version.hdf5_version_tuple < (1, 14), (
        "H5Dwrite_multi is in every HDF5 since 1.14 and should be found"
    )
    written = {}
    for use_batch in (True, False):
        path = tmp_path / f"{use_batch}.h5"
        with _create(path) as file:
            written[use_batch] = _write_run(file, seed=0, use_batch=use_batch)
    assert written[True] == written[False] == 114
    batched, one_by_one = _read(tmp_path / "True.h5", 114), _read(tmp_path / "False.h5", 114)
    rng = np.random.default_rng(0)
    first = _values(rng, None)
    for (name, *_), value in zip(SHAPES, first):
        np.testing.assert_array_equal(batched[name], one_by_one[name])
        np.testing.assert_array_equal(batched[name][0], value)  # the values given, bit for bit
        assert batched[name].shape[0] == 114


def test_without_h5dwrite_multi_the_rows_go_through_h5py(tmp_path, monkeypatch) -> None:
    """An HDF5 before 1.14 lacks the function: the same rows arrive one write at a time."""
    monkeypatch.setattr(rows, "_functions", {"H5Dwrite_multi": None, "H5Fflush": None})
    with _create(tmp_path / "old.h5") as file:
        n = _write_run(file, seed=3, use_batch=True)
    monkeypatch.undo()
    with _create(tmp_path / "new.h5") as file:
        _write_run(file, seed=3, use_batch=True)
    old, new = _read(tmp_path / "old.h5", n), _read(tmp_path / "new.h5", n)
    for name, *_ in SHAPES:
        np.testing.assert_array_equal(old[name], new[name])


def test_a_write_that_hdf5_refuses_raises_h5pys_own_error(tmp_path) -> None:
    path = tmp_path / "read-only.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("a", shape=(8, 3), maxshape=(None, 3), chunks=(8, 3), dtype="f4")
        file.create_dataset("b", shape=(8,), maxshape=(None,), chunks=(8,), dtype="i8")
    with h5py.File(path, "r") as file:
        batch = RowBatch([RowWriter(file["a"]), RowWriter(file["b"])])
        with pytest.raises(OSError, match="(?i)write"):
            batch.write(0, [np.ones(3, "f4"), 7])


def test_h5py_on_another_thread_meanwhile_is_safe(tmp_path) -> None:
    """The call runs without the GIL but under h5py's lock: another thread's h5py work (a
    checkpoint saved by the training thread) waits for it and both files come out right."""
    path = tmp_path / "run.h5"
    done = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            with _create(path) as file:
                batch = RowBatch([RowWriter(file[name]) for name, *_ in SHAPES])
                for row in range(300):
                    batch.write(row, [np.full(shape, row % 200, dtype) for _, shape, dtype, _ in SHAPES])
                    flush(file)
        except BaseException as exc:  # noqa: BLE001 - reported on the test's thread
            failures.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    other = tmp_path / "checkpoint.h5"
    rounds = 0
    while not done.is_set() or rounds < 5:
        with h5py.File(other, "w") as file:
            file["w"] = np.arange(1000.0) * rounds
        with h5py.File(other, "r") as file:
            np.testing.assert_array_equal(file["w"][()], np.arange(1000.0) * rounds)
        rounds += 1
    thread.join()
    assert not failures, failures
    written = _read(path, 300)
    for name, shape, dtype, _ in SHAPES:
        expected = np.broadcast_to(
            (np.arange(300) % 200).reshape((300,) + (1,) * len(shape)), (300, *shape)
        ).astype(dtype)
        np.testing.assert_array_equal(written[name], expected)


def test_datasets_of_one_row_shape_share_a_selection_and_grow_together(tmp_path) -> None:
    """One file space serves the datasets of one row shape and extent; a row past a dataset's
    own extent would be dropped without an error, so every row of every dataset is read back."""
    path = tmp_path / "shared.h5"
    rng = np.random.default_rng(5)
    with h5py.File(path, "w", libver="v110") as file:
        names = []
        for i in range(5):  # one row shape, one chunking: one group
            names.append(f"same{i}")
            file.create_dataset(names[-1], shape=(0, 8), maxshape=(None, 8), chunks=(4, 8), dtype="f4")
        # The same row shape with more rows allocated (rows a killed writer left): its own group.
        names.append("longer")
        file.create_dataset("longer", shape=(9, 8), maxshape=(None, 8), chunks=(4, 8), dtype="f4")
        names.append("ints")  # another dtype: another buffer
        file.create_dataset("ints", shape=(0, 8), maxshape=(None, 8), chunks=(4, 8), dtype="i4")
        names.append("scalar")
        file.create_dataset("scalar", shape=(0,), maxshape=(None,), chunks=(4,), dtype="f8")
        batch = RowBatch([RowWriter(file[name]) for name in names])
        expected: dict[str, list[np.ndarray]] = {name: [] for name in names}
        start = 0
        for n in (1, 3, 1, 7, 2, 1, 9):
            values = []
            for name in names:
                shape = (n,) if name == "scalar" else (n, 8)
                value = rng.integers(-50, 50, size=shape) if name == "ints" else rng.normal(size=shape)
                values.append(value if n > 1 else value[0])  # a single row comes without its axis
                expected[name].append(value.reshape(shape))
            batch.write(start, values, rows=n)
            start += n
        flush(file)
    with h5py.File(path, "r") as file:
        for name in names:
            want = np.concatenate(expected[name]).astype(file[name].dtype)
            np.testing.assert_array_equal(file[name][:start], want, err_msg=name)
            assert file[name].shape[0] >= start


def test_a_value_of_the_wrong_size_is_refused(tmp_path) -> None:
    """Sizes are checked one by one: two wrong sizes that add up to the right total too."""
    with h5py.File(tmp_path / "sizes.h5", "w") as file:
        for name in ("a", "b"):
            file.create_dataset(name, shape=(0, 4), maxshape=(None, 4), chunks=(8, 4), dtype="f4")
        batch = RowBatch([RowWriter(file["a"]), RowWriter(file["b"])])
        with pytest.raises(ValueError, match="reshape"):
            batch.write(0, [np.ones(3, "f4"), np.ones(5, "f4")])
        batch.write(0, [np.ones(4, "f4"), np.full(4, 2.0, "f4")])
        np.testing.assert_array_equal(file["b"][0], np.full(4, 2.0, "f4"))
