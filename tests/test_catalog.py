from __future__ import annotations

import os

import pytest

from conftest import tiny_capture
from icsviz import RunFileError
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


def test_resolve_refuses_traversal(tmp_path, layout) -> None:
    RunWriter.create(tmp_path / "ok.h5", layout, {}).close()
    assert resolve_run(tmp_path, "ok.h5") == (tmp_path / "ok.h5").resolve()
    for name in ("../ok.h5", "/etc/passwd", "ok.h5/../../x.h5", "missing.h5", "sub/ok.h5"):
        with pytest.raises(RunFileError):
            resolve_run(tmp_path, name)
