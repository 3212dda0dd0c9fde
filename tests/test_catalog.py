from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_capture
from icsviz import RunFileError, analysis, open_run
from icsviz.store import catalog as catalog_module
from icsviz.store.catalog import resolve_run, scan_runs
from icsviz.store.writer import RunWriter


def test_scan_lists_good_and_bad_files_with_reasons(tmp_path, layout) -> None:
    with RunWriter.create(tmp_path / "b_good.h5", layout, {"run_name": "good", "model_name": "net"}) as w:
        w.write_capture(tiny_capture(layout, 0))
        w.write_epoch(0, {"val_accuracy": 0.25})
        w.write_epoch(1, {"val_accuracy": 0.75})
    (tmp_path / "a_empty.h5").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    entries = scan_runs(tmp_path)
    assert [e.path.name for e in entries] == ["a_empty.h5", "b_good.h5"]
    bad, good = entries
    assert not bad.readable and bad.status == "unreadable" and "empty" in bad.error
    assert good.readable and good.status == "complete" and good.model == "net"
    assert good.epochs == 2 and good.captures == 1 and good.best_val_accuracy == 0.75
    assert scan_runs(tmp_path / "missing") == []


def test_links_out_of_the_folder_are_not_listed(tmp_path, layout) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    RunWriter.create(outside / "secret.h5", layout, {}).close()
    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(outside / "secret.h5", runs / "link.h5")
    assert scan_runs(runs) == []
    found = catalog_module.catalog(runs)
    found.read_now(["link.h5", "../outside/secret.h5"])  # names from a page: the same rules
    assert not found._known and found.entries(background=False) == []


def test_resolve_refuses_traversal(tmp_path, layout) -> None:
    RunWriter.create(tmp_path / "ok.h5", layout, {}).close()
    assert resolve_run(tmp_path, "ok.h5") == (tmp_path / "ok.h5").resolve()
    for name in ("../ok.h5", "/etc/passwd", "ok.h5/../../x.h5", "missing.h5", "sub/ok.h5"):
        with pytest.raises(RunFileError):
            resolve_run(tmp_path, name)


def _sweep(folder: Path, layout, n: int = 3) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"run{i}.h5"
        with RunWriter.create(path, layout, {"run_name": f"run{i}", "model_name": "net"}) as w:
            for step in range(3):
                w.write_capture(tiny_capture(layout, step, value=1.0 + i * step))
            w.write_epoch(0, {"val_accuracy": 0.5})
            w.write_epoch(1, {"val_accuracy": 0.25 * (i + 1)})
        paths.append(path)
    return paths


def _new_process() -> None:
    """Forget what this process knows, as a new app process would."""
    catalog_module._CATALOGS.clear()
    catalog_module._BY_KEY.clear()


def test_a_folder_is_read_once_and_its_catalogue_kept_on_disk(tmp_path, layout, monkeypatch) -> None:
    folder = tmp_path / "sweep"
    paths = _sweep(folder, layout)
    first = scan_runs(folder)
    assert [e.final_val_accuracy for e in first] == [0.25, 0.5, 0.75]
    assert [e.best_val_accuracy for e in first] == [0.5, 0.5, 0.75]
    with open_run(paths[2]) as run:
        assert first[2].drift_score == pytest.approx(analysis.run_drift_score(run))
        assert dict(first[2].input_drift) == pytest.approx(analysis.input_drift(run))  # the app's headline
        assert first[2].created == run.attrs["created"] and first[2].date == run.attrs["created"][:10]
    assert all(np.isfinite(e.drift_score) for e in first)
    stored = list(catalog_module.cache_dir().glob("catalog-*.json"))
    assert stored, "the catalogue is kept on disk"

    _new_process()

    def unread(path, stat):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(catalog_module, "_summarize", unread)
    assert scan_runs(folder) == first  # from disk: no file opened
    monkeypatch.undo()

    # A file that changes is read again; a removed one leaves the catalogue.
    with RunWriter.resume(paths[0], layout, from_epoch=2) as w:
        w.write_epoch(2, {"val_accuracy": 0.9})
    paths[1].unlink()
    again = scan_runs(folder)
    assert [e.path.name for e in again] == ["run0.h5", "run2.h5"]
    assert again[0].final_val_accuracy == 0.9 and again[0].epochs == 3
    # An epoch without validation (fit(validation_freq=2)): the final accuracy stays the last
    # validated epoch's, not NaN.
    with RunWriter.resume(paths[0], layout, from_epoch=3) as w:
        w.write_epoch(3, {"accuracy": 0.95})
    assert scan_runs(folder)[0].final_val_accuracy == 0.9


def test_a_damaged_catalogue_is_only_a_cache(tmp_path, layout) -> None:
    folder = tmp_path / "sweep"
    _sweep(folder, layout, n=2)
    expected = scan_runs(folder)
    for stored in catalog_module.cache_dir().glob("catalog-*.json"):
        stored.write_text('{"version": 1, "entries": [{"path": 3')
    _new_process()
    assert scan_runs(folder) == expected


def test_the_catalogue_reads_new_files_in_the_background(tmp_path, layout) -> None:
    folder = tmp_path / "sweep"
    _sweep(folder, layout, n=4)
    runs = catalog_module.catalog(folder)
    listed = runs.entries()  # answers at once
    assert len(listed) == 4 and all(e.pending or e.readable for e in listed)
    assert runs.wait(60)
    _new_process()  # what the background reader read is on disk once wait() returns
    done = catalog_module.catalog(folder).entries()
    assert not any(e.pending for e in done) and [e.status for e in done] == ["complete"] * 4
    assert runs.pending == 0


def test_a_run_left_training_is_shown_as_stopped_once_stale(tmp_path, layout) -> None:
    folder = tmp_path / "live"
    folder.mkdir()
    writer = RunWriter.create(folder / "live.h5", layout, {})
    writer.write_capture(tiny_capture(layout, 0))
    try:
        assert scan_runs(folder)[0].status == "training"
        old = time.time() - catalog_module.STALE_AFTER_S - 60
        os.utime(folder / "live.h5", (old, old))
        assert scan_runs(folder)[0].status == "stopped (killed?)"
    finally:
        writer.close()


def test_no_catalogue_on_disk_when_turned_off(tmp_path, layout, monkeypatch) -> None:
    monkeypatch.setenv("ICSVIZ_CACHE_DIR", "off")
    folder = tmp_path / "sweep"
    _sweep(folder, layout, n=1)
    assert catalog_module.cache_dir() is None
    assert scan_runs(folder)[0].readable


def test_files_read_for_the_page_are_kept_on_disk_too(tmp_path, layout) -> None:
    folder = tmp_path / "pair"
    _sweep(folder, layout, n=2)
    runs = catalog_module.catalog(folder)
    runs.read_now(["run0.h5", "run1.h5"])  # what the app does for the runs it shows first
    assert not any(e.pending for e in runs.entries(background=False))
    _new_process()
    assert not any(e.pending for e in catalog_module.catalog(folder).entries(background=False))


def _tiny_run(path: Path, layout, captures: int = 2, close: bool = True) -> RunWriter:
    w = RunWriter.create(path, layout, {"run_name": path.stem, "model_name": "net"})
    for step in range(captures):
        w.write_capture(tiny_capture(layout, step))
    if close:
        w.close()
    return w


def test_runs_opened_from_the_catalogue_take_their_index_from_the_cache(
    tmp_path, layout, monkeypatch
) -> None:
    from icsviz.store import reader

    path = tmp_path / "r.h5"
    _tiny_run(path, layout)
    entry = catalog_module.summary_of(path)
    with open_run(path) as run:
        expected = (run.layer_names, run.variable_names, run.ics_layer_names)
    reader._INDEXES.clear()

    def no_attributes(self, root):  # what reading the index from the file would do
        raise AssertionError(f"read /{root} from the file")

    with monkeypatch.context() as patch:
        patch.setattr(reader.Run, "_groups", no_attributes)
        with entry.open() as run:  # a new process's first open: the index comes from the cache
            assert (run.layer_names, run.variable_names, run.ics_layer_names) == expected
            assert run.layer(run.layer_names[0]).n_units == layout.layers[0].n_units

    # The file changes: the cached index (an older version) is not used, the file is read.
    reader._INDEXES.clear()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as a rewrite would
    with monkeypatch.context() as patch:
        patch.setattr(reader.Run, "_groups", no_attributes)
        with pytest.raises(AssertionError, match="from the file"):
            catalog_module.RunEntry(path=path, name="r", readable=True).open()
    with catalog_module.RunEntry(path=path, name="r", readable=True).open() as run:
        assert run.num_captures == 2 and run.layer_names == expected[0]


def test_a_damaged_index_cache_is_ignored_and_a_training_run_leaves_none(tmp_path, layout) -> None:
    from icsviz.store import reader

    path = tmp_path / "r.h5"
    _tiny_run(path, layout)
    catalog_module.summary_of(path)
    index = catalog_module._index_file(path)
    assert index is not None and index.exists()
    good = index.read_text()
    index.write_text("{not json")
    reader._INDEXES.clear()
    with catalog_module.summary_of(path).open() as run:  # read from the file, and cached again
        assert run.num_captures == 2
    assert index.read_text() == good  # rewritten
    record = json.loads(good)
    del record["layers"]  # the right version, another shape (an edited file, another icsviz)
    index.write_text(json.dumps(record))
    reader._INDEXES.clear()
    entry = catalog_module.RunEntry(path=path, name="r", readable=True)
    with entry.open() as run:  # read from the file
        assert run.num_captures == 2 and run.layer_names == [spec.name for spec in layout.layers]
    live = tmp_path / "live.h5"
    writer = _tiny_run(live, layout, close=False)
    try:
        assert catalog_module.summary_of(live).status == "training"
        assert not catalog_module._index_file(live).exists()
    finally:
        writer.close()
