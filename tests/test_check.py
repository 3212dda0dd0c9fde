"""Damage: checksums, located damage, repair, the guard, and a seeded corruption test."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import damage_chunk, tiny_capture, tiny_layout
from corruption_worker import corrupt, start_worker
from icsviz import DamagedRunError, RunFileError, open_run, repair_run
from icsviz.store import check
from icsviz.store.check import check_run, guarded_check
from icsviz.store.writer import RunWriter


def make_run(path: Path, captures: int = 6, epochs: int = 3) -> Path:
    layout = tiny_layout()
    with RunWriter.create(path, layout, {"run_name": "demo", "model_name": "m"}) as w:
        for step in range(captures):
            w.write_capture(tiny_capture(layout, step))
        for epoch in range(epochs):
            w.write_epoch(epoch, {"loss": 1.0 / (epoch + 1), "val_accuracy": 0.1 * epoch})
    return path


def storage(ds: h5py.Dataset) -> str:
    layout = ds.id.get_create_plist().get_layout()
    if layout == h5py.h5d.COMPACT:
        return "compact"
    return "checksummed" if ds.fletcher32 else "unprotected"


def datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def test_every_dataset_is_checksummed_while_training_and_after_compaction(tmp_path) -> None:
    layout = tiny_layout()
    w = RunWriter.create(tmp_path / "r.h5", layout, {})
    w.write_capture(tiny_capture(layout, 0))
    w.write_epoch(0, {"loss": 1.0})
    for f in (h5py.File(tmp_path / "r.h5", "r", swmr=True), None):
        if f is None:
            w.close()
            f = h5py.File(tmp_path / "r.h5", "r")
        kinds = {name: storage(f[name]) for name in datasets(f)}
        f.close()
        assert kinds and set(kinds.values()) <= {"compact", "checksummed"}, kinds
        assert kinds["status"] == "compact" and kinds["layers/000_dense/tracked_units"] == "compact"


def test_a_damaged_chunk_is_our_error_naming_file_and_dataset_and_the_rest_reads(tmp_path) -> None:
    path = make_run(tmp_path / "r.h5")
    with open_run(path) as run:
        expected = run.activations("block/relu").mean.copy()
    damage_chunk(path, "layers/000_dense/hist_counts")
    with open_run(path) as run:
        with pytest.raises(DamagedRunError, match=r"r\.h5.*/layers/000_dense/hist_counts.*checksum") as info:
            run.activations("dense")
        assert info.value.dataset == "/layers/000_dense/hist_counts"
        np.testing.assert_array_equal(run.activations("block/relu").mean, expected)


def test_check_locates_the_damage_and_repair_keeps_everything_else(tmp_path) -> None:
    path = make_run(tmp_path / "r.h5", captures=150)
    with open_run(path) as run:
        relu = run.activations("block/relu")
        steps = run.steps.copy()
    damage_chunk(path, "layers/000_dense/unit_mean", chunk=1)  # rows 64-127 of one layer
    damage_chunk(path, "captures/epoch", chunk=2)  # rows 128-149 of the capture index
    report = check_run(path)
    assert report.openable and not report.ok
    assert {d.part for d in report.damage} == {"/layers/000_dense/unit_mean", "/captures/epoch"}
    assert report.drop_groups == ("/layers/000_dense",) and report.drop_layer_names == ("dense",)
    assert report.drop_captures == tuple(range(128, 150))
    assert "rows 64-127" in report.summary() and "keeps 128 of 150 captures" in report.summary()

    out = repair_run(path)
    assert out == tmp_path / "r.repaired.h5" and path.exists()  # the original is left as it is
    assert check_run(out).ok
    with open_run(out) as run:
        assert run.layer_names == ["block/relu"] and run.status == "interrupted"
        np.testing.assert_array_equal(run.steps, steps[:128])
        np.testing.assert_array_equal(run.activations("block/relu").counts, relu.counts[:128])
        assert len(run.history["loss"]) == 3


def test_check_reads_only_committed_rows_and_reports_nothing_for_damage_past_them(tmp_path) -> None:
    """Rows past the capture index (a capture being written when the writer died) are never
    read, and repair cuts them off: damage there is not the run's."""
    path = make_run(tmp_path / "r.h5", captures=64)  # compacted: exactly one chunk of 64 rows
    with h5py.File(path, "r+") as f:
        ds = f["layers/000_dense/unit_mean"]
        assert ds.chunks[0] == 64 and ds.shape[0] == 64
        ds.resize(65, axis=0)
        ds[64] = 1.0  # a second chunk, holding only this uncommitted row
    damage_chunk(path, "layers/000_dense/unit_mean", chunk=1)
    report = check_run(path)
    assert report.ok, report.summary()
    with open_run(path) as run:
        assert run.num_captures == 64 and run.activations("dense").unit_mean.shape[0] == 64
    damage_chunk(path, "layers/000_dense/unit_mean", chunk=0)  # and a committed row's chunk is
    assert {d.part for d in check_run(path).damage} == {"/layers/000_dense/unit_mean"}


def test_a_named_datatype_is_read_and_a_short_dataset_is_damage_that_repair_drops(tmp_path) -> None:
    """Objects a run never holds, as an edited file may: a named datatype (the check crashed
    with AttributeError on it), an empty attribute (repair crashed with TypeError on it) and a
    layer dataset shorter than the capture index, whose rows no longer line up with the steps
    (the check passed it)."""
    path = make_run(tmp_path / "r.h5", captures=10)
    with h5py.File(path, "r+") as f:
        f["layers/000_dense/named_type"] = np.dtype("f4")
        f.attrs["note"] = h5py.Empty("f4")  # an empty attribute: read by the check, kept by repair
    assert check_run(path).ok
    with h5py.File(path, "r+") as f:
        f["layers/000_dense/unit_mean"].resize(8, axis=0)
    with open_run(path) as run:  # the reader says so too, and reads the other layers
        with pytest.raises(DamagedRunError, match=r"/layers/000_dense/unit_mean \(it holds 8 rows for 10"):
            run.activations("dense")
        assert run.activations("block/relu").mean.shape == (10,)
    report = check_run(path)
    assert [(d.part, d.rows) for d in report.damage] == [("/layers/000_dense/unit_mean", (8, 9))]
    assert "holds 8 rows for 10 captures" in report.summary()
    assert report.drop_groups == ("/layers/000_dense",) and report.drop_captures == ()
    out = repair_run(path)
    with open_run(out) as run:
        assert run.layer_names == ["block/relu"] and run.num_captures == 10
    with h5py.File(out, "r") as f:
        assert isinstance(f.attrs["note"], h5py.Empty) and f.attrs["note"].dtype == np.dtype("f4")


def test_a_destroyed_header_cannot_be_repaired_and_says_so(tmp_path) -> None:
    path = make_run(tmp_path / "r.h5")
    data = bytearray(path.read_bytes())
    data[48:4096] = bytes(4096 - 48)  # the superblock's root group and what follows
    path.write_bytes(bytes(data))
    report = check_run(path)
    assert not report.openable and str(path) in report.summary()
    with pytest.raises(RunFileError, match="cannot be repaired"):
        repair_run(path)


def test_another_programs_hdf5_file_is_named_as_such_not_as_damaged(tmp_path) -> None:
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        f["kernel"] = np.arange(6.0)
    for report in (check_run(path), guarded_check(path)):
        assert not report.openable
        assert report.error == f"{path} is HDF5 but not an icsviz run (no schema_version)"
    with pytest.raises(RunFileError, match="not an icsviz run"):
        open_run(path)


def test_the_guard_reports_a_file_that_takes_too_long_and_keeps_working(tmp_path) -> None:
    path = make_run(tmp_path / "r.h5")
    assert guarded_check(path).ok
    slow = guarded_check(path, timeout=0.0)  # as if HDF5 hung: the worker is killed
    assert slow.hang and not slow.openable and "did not finish" in slow.error
    assert guarded_check(path).ok  # a fresh worker takes over


def test_the_guard_serves_callers_on_two_threads_with_two_workers(tmp_path) -> None:
    path = make_run(tmp_path / "r.h5")
    check.stop_workers()
    first, second = check._take(), check._take()  # two callers at once: two processes
    assert first.process.pid != second.process.pid and check._LIVE == check.POOL_SIZE == 2
    waiting = threading.Thread(target=lambda: got.append(check.guarded("check", path)))
    got: list = []
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive() and not got  # a third caller waits for a worker to be given back
    check._give_back(first, alive=True)
    waiting.join(30)
    assert got and got[0][0].ok and got[0][1] == ""
    check._give_back(second, alive=False)  # a killed worker makes room for a new one
    assert check._LIVE == 1 and first.process.poll() is None and second.process.poll() is not None
    check.stop_workers()
    assert check._LIVE == 0 and first.process.poll() is not None


def test_workers_started_ahead_of_time_serve_the_first_files(tmp_path) -> None:
    path = make_run(tmp_path / "r.h5")
    check.stop_workers()
    check.start_workers()
    started = {w.process.pid for w in check._IDLE}
    assert len(started) == check.POOL_SIZE and check._LIVE == check.POOL_SIZE
    check.start_workers()  # idempotent: the app calls it on every run of its script
    assert {w.process.pid for w in check._IDLE} == started
    assert guarded_check(path).ok
    assert {w.process.pid for w in check._IDLE} == started  # no new process was needed


def test_the_catalogue_reads_two_files_at_once_in_two_workers(tmp_path) -> None:
    from icsviz.store.catalog import FolderCatalog

    for name in ("a", "b"):
        make_run(tmp_path / f"{name}.h5")
    check.stop_workers()
    runs = FolderCatalog(tmp_path)
    runs.read_now(["a.h5", "b.h5"])
    assert check._LIVE == 2 and len(check._IDLE) == 2  # one each, both given back
    assert [e.readable and not e.pending for e in runs.entries(background=False)] == [True, True]


@pytest.mark.parametrize("source", ["closed", "killed"])
def test_seeded_corruption_reads_right_or_gets_our_error_never_a_hang(tmp_path, source) -> None:
    """Bit flips, zeroed blocks and truncations: every case reads the original values or raises
    a RunFileError; no raw exception, no crash, no hang (2 s per case)."""
    path = make_run(tmp_path / "pristine.h5", captures=70)
    if source == "killed":  # a writer that died with the file open: SWMR flags set
        layout = tiny_layout()
        w = RunWriter.create(tmp_path / "killed.h5", layout, {"run_name": "k"})
        for step in range(20):
            w.write_capture(tiny_capture(layout, step))
        w._file.flush()
        shutil.copy(tmp_path / "killed.h5", tmp_path / "pristine-killed.h5")
        w.close(compact=False)
        path = tmp_path / "pristine-killed.h5"
    data = path.read_bytes()
    worker = start_worker()
    try:
        reference = worker.ask(path, 30)
        assert reference[0] == "ok" and reference[3], reference
        rng = np.random.default_rng(2026 if source == "closed" else 11)
        counts: dict[tuple[str, str], int] = {}
        started = time.monotonic()
        for case in range(150):
            kind = ("flip", "flip", "zero", "truncate")[case % 4]
            bad = tmp_path / f"case{case:03d}.h5"
            bad.write_bytes(corrupt(data, rng, kind))
            answer = worker.ask(bad, 2.0)
            if answer is None:
                pytest.fail(f"case {case} ({kind}) hung or crashed the reader: {bad}")
            verdict, *rest = answer
            assert verdict != "raw", f"case {case} ({kind}): raw {rest}"
            if verdict == "ok":
                assert rest[0] == reference[1], (
                    f"case {case} ({kind}) read different numbers without an error"
                )
            else:
                assert str(bad) in rest[1] or bad.name in rest[1], rest
            if answer[-2]:  # check_run found nothing: the file must read right
                assert verdict == "ok", f"case {case} ({kind}): check says ok, reading says {rest}"
            counts[(kind, verdict)] = counts.get((kind, verdict), 0) + 1
            bad.unlink()
        assert time.monotonic() - started < 120
        assert sum(v for (k, verdict), v in counts.items() if verdict == "ours") > 30, counts
        print(source, counts)
    finally:
        worker.kill()


def test_no_text_lives_in_the_unchecksummed_global_heap(tmp_path) -> None:
    """Variable-length strings live in HDF5's global heap, which has no checksum: a zeroed
    block there hung the reader (seen in the seeded corruption test). Every attribute and
    dataset of a new file, written and compacted, is fixed-size."""
    path = make_run(tmp_path / "run.h5")
    found: list[str] = []
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: object) -> None:
            for key in obj.attrs:
                if h5py.check_vlen_dtype(obj.attrs.get_id(key).dtype) is not None or (
                    h5py.check_string_dtype(obj.attrs.get_id(key).dtype) is not None
                    and h5py.check_string_dtype(obj.attrs.get_id(key).dtype).length is None
                ):
                    found.append(f"{name}@{key}")
            if isinstance(obj, h5py.Dataset) and h5py.check_string_dtype(obj.dtype) is not None:
                if h5py.check_string_dtype(obj.dtype).length is None:
                    found.append(name)

        visit("/", f)
        f.visititems(visit)
    assert found == []
    with open_run(path) as run:  # and the text reads back as str
        assert run.attrs["run_name"] == "demo" and run.layer_names == ["dense", "block/relu"]


def test_an_unreadable_file_is_reported_without_advice_to_run_check_on_it(tmp_path: Path) -> None:
    path = make_run(tmp_path / "cut.h5")
    path.write_bytes(path.read_bytes()[:3000])  # cut short while being copied
    report = check_run(path)
    assert not report.openable and "the file is truncated" in report.error
    assert "icsviz check" not in report.summary() and "icsviz repair" not in report.summary()
    with pytest.raises(DamagedRunError, match="run `icsviz check "):  # opening it still says what to run
        open_run(path)


def test_the_verdict_counts_in_words(tmp_path: Path) -> None:
    one, six = make_run(tmp_path / "one.h5", captures=1), make_run(tmp_path / "six.h5")
    assert f"{one}: ok (1 capture, " in check_run(one).summary()
    assert f"{six}: ok (6 captures, 2 layers, " in check_run(six).summary()
    damage_chunk(six, "layers/000_dense/unit_mean")
    summary = check_run(six).summary()
    assert f"{six}: DAMAGED (1 damaged part)" in summary
    assert "keeps 6 of 6 captures and leaves out the damaged layer dense:" in summary
    damage_chunk(six, "layers/001_block_relu/unit_mean")
    summary = check_run(six).summary()
    assert "(2 damaged parts)" in summary and "the damaged layers dense, block/relu:" in summary
