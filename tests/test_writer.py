from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import tiny_capture, tiny_layout
from icsviz import IncompatibleRunError, RunExistsError, open_run
from icsviz.store.writer import RunWriter, repair_run


def test_roundtrip_values(tmp_path, layout) -> None:
    path = tmp_path / "r.h5"
    with RunWriter.create(path, layout, {"run_name": "demo", "model_name": "m", "config": {"a": 1}}) as w:
        for step in range(3):
            w.write_capture(tiny_capture(layout, step))
        w.write_epoch(0, {"loss": 2.0, "accuracy": 0.5})
        w.write_epoch(1, {"loss": 1.0, "accuracy": 0.75, "val_loss": 1.5})  # a new metric mid-run
    with open_run(path) as run:
        assert run.status == "complete"
        assert run.name == "demo" and run.config == {"a": 1}
        assert run.layer_names == ["dense", "block/relu"]
        np.testing.assert_array_equal(run.steps, [0, 1, 2])
        np.testing.assert_allclose(run.epochs, [0.0, 0.1, 0.2])
        acts = run.activations("dense")
        assert acts.counts.shape == (3, 8) and acts.edges.shape == (3, 9)
        np.testing.assert_array_equal(acts.counts[2], np.arange(8) + 2)
        np.testing.assert_allclose(acts.mean, [0, 1, 2])
        np.testing.assert_allclose(acts.std, [1, 2, 3])
        np.testing.assert_allclose(acts.max, [1, 2, 3])
        np.testing.assert_array_equal(acts.nonfinite, [0, 1, 0])
        np.testing.assert_array_equal(acts.tracked_units, [0, 3])
        assert acts.unit_quantiles.shape == (3, 2, len(acts.q))
        np.testing.assert_allclose(acts.quantile(0.5), [0, 1, 2], atol=1e-6)
        history = run.history
        np.testing.assert_allclose(history["loss"], [2.0, 1.0])
        assert np.isnan(history["val_loss"][0]) and history["val_loss"][1] == 1.5
        grads = run.gradients("dense")
        assert grads.variables == ["dense/kernel", "dense/bias"]
        np.testing.assert_allclose(grads.grad_norm[:, 0], [0, 0.5, 1.0])
        np.testing.assert_allclose(grads.total_grad_norm, np.sqrt(2) * np.array([0, 0.5, 1.0]), rtol=1e-6)
        assert np.isnan(grads.update_ratio[0, 0]) and grads.update_ratio[1, 0] == pytest.approx(0.01)
        np.testing.assert_allclose(run.ics("dense").grad_diff, [0, 0.1, 0.2], rtol=1e-6)


def test_rows_beyond_commit_marker_are_invisible(tmp_path, layout) -> None:
    path = tmp_path / "r.h5"
    with RunWriter.create(path, layout, {}) as w:
        w.write_capture(tiny_capture(layout, 0))
        w.write_capture(tiny_capture(layout, 1))
    # Simulate a writer killed between the data rows and the marker of capture 3.
    with h5py.File(path, "a") as f:
        for name in ("captures/epoch", "layers/000_dense/hist_counts"):
            f[name].resize(3, axis=0)
    with open_run(path) as run:
        assert run.num_captures == 2
        assert run.activations("dense").counts.shape[0] == 2
        assert len(run.epochs) == 2


def test_refuses_to_overwrite_and_overwrites_when_asked(tmp_path, layout) -> None:
    path = tmp_path / "r.h5"
    RunWriter.create(path, layout, {}).close()
    with pytest.raises(RunExistsError, match="overwrite=True"):
        RunWriter.create(path, layout, {})
    RunWriter.create(path, layout, {}, overwrite=True).close()


def test_resume_appends_and_drops_the_replaced_timeline(tmp_path, layout) -> None:
    path = tmp_path / "r.h5"
    with RunWriter.create(path, layout, {}) as w:
        for step in range(0, 40, 10):  # epochs 0, 1, 2, 3
            w.write_capture(tiny_capture(layout, step))
        for epoch in range(3):
            w.write_epoch(epoch, {"loss": float(epoch)})
    with RunWriter.resume(path, layout, from_epoch=2) as w:  # a checkpoint after epoch 2
        w.write_capture(tiny_capture(layout, 30, value=-1))
        w.write_epoch(2, {"loss": 9.0})
    with open_run(path) as run:
        np.testing.assert_array_equal(run.steps, [0, 10, 20, 30])
        assert run.activations("dense").mean[-1] == -30
        np.testing.assert_array_equal(run.history_epochs, [0, 1, 2])
        np.testing.assert_allclose(run.history["loss"], [0, 1, 9])


def test_a_run_recorded_before_value_sample_was_kept_still_resumes(tmp_path, layout) -> None:
    import dataclasses
    import json

    import h5py

    path = tmp_path / "old.h5"
    RunWriter.create(path, layout, {}).close()
    with h5py.File(path, "r+") as f:  # as written before 2026-11-26: no value_sample in the layout
        raw = json.loads(f.attrs["layout"])
        for spec in raw["layers"]:
            spec.pop("value_sample")
        f.attrs["layout"] = json.dumps(raw)
    today = dataclasses.replace(
        layout, layers=tuple(dataclasses.replace(s, value_sample="all") for s in layout.layers)
    )
    with RunWriter.resume(path, today, from_epoch=0) as w:  # the same layers, measured whole
        w.write_capture(tiny_capture(today, 0))
    with open_run(path) as run:
        assert run.num_captures == 1


def test_resume_refuses_another_layout(tmp_path, layout) -> None:
    path = tmp_path / "r.h5"
    RunWriter.create(path, layout, {}).close()
    with pytest.raises(IncompatibleRunError, match="another model or layer set"):
        RunWriter.resume(path, tiny_layout(units=7), from_epoch=1)


def test_repair_makes_a_crashed_swmr_file_plain_readable(tmp_path, layout) -> None:
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "crash.h5"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path.parent)!r})
        from conftest import tiny_capture, tiny_layout
        from icsviz.store.writer import RunWriter
        layout = tiny_layout()
        w = RunWriter.create({str(path)!r}, layout, {{}})
        for step in range(5):
            w.write_capture(tiny_capture(layout, step))
        os.kill(os.getpid(), 9)
    """)
    env = {**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)}
    proc = subprocess.run([sys.executable, "-c", script], env=env)
    assert proc.returncode == -9
    with pytest.raises(OSError):
        h5py.File(path, "r")  # the SWMR flags are still set
    with open_run(path) as run:  # the SWMR reader needs no repair
        assert run.num_captures == 5 and run.status == "training"
    repair_run(path)
    with h5py.File(path, "r") as f:
        assert f["captures/step"].shape == (5,)
    with open_run(path) as run:
        assert run.status == "interrupted"
        np.testing.assert_array_equal(run.steps, np.arange(5))


def test_repairing_a_run_its_writer_closed_changes_nothing(tmp_path, layout, capsys) -> None:
    """`icsviz repair` on a healthy finished run used to rewrite it marked "interrupted"."""
    from icsviz.cli import main

    path = tmp_path / "done.h5"
    with RunWriter.create(path, layout, {}) as w:
        for step in range(3):
            w.write_capture(tiny_capture(layout, step))
    before = path.read_bytes()
    assert repair_run(path) == path and path.read_bytes() == before
    assert main(["repair", str(path)]) == 0
    assert (
        "needs no repair (complete, closed by its writer, every checksum matches)" in capsys.readouterr().out
    )
    assert path.read_bytes() == before
    copy = repair_run(path, tmp_path / "copy.h5")  # a copy keeps the status too
    with open_run(copy) as run:
        assert run.status == "complete" and run.num_captures == 3


def test_files_are_written_in_the_hdf5_1_10_format_whatever_the_library(tmp_path, layout) -> None:
    # HDF5's "latest" is the writing library's newest format: files written by HDF5 2.0
    # (h5py 3.16) that way were unreadable with h5py 3.15 and older. The bounds pin 1.10.
    v110 = (h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)
    path = tmp_path / "r.h5"
    writer = RunWriter.create(path, layout, {"model_name": "x"})
    assert writer._file.id.get_access_plist().get_libver_bounds() == v110
    writer.write_capture(tiny_capture(layout, 0))
    writer.close("interrupted", compact=False)
    resumed = RunWriter.resume(path, layout, from_epoch=0)
    assert resumed._file.id.get_access_plist().get_libver_bounds() == v110
    resumed.close("complete")  # compaction rewrites the file through the same bounds
    with open_run(path) as run:
        assert list(run.steps) == [0]


def test_a_format_too_new_for_this_library_says_how_to_read_it(tmp_path) -> None:
    from icsviz import DamagedRunError
    from icsviz.store.files import reading

    path = tmp_path / "new.h5"
    with pytest.raises(DamagedRunError) as caught:
        with reading(path, "/captures/step"):
            raise KeyError("Unable to synchronously open object (bad version number for layout message)")
    message = str(caught.value)
    assert "bad version number for layout message" in message
    assert "pip install -U h5py" in message and h5py.version.hdf5_version in message
    assert f"icsviz check {path}" in message  # it may still be damage


def _batch_layout():
    import dataclasses

    from icsviz.store.schema import BatchLayerSpec

    layout = tiny_layout()
    specs = (BatchLayerSpec("dense", 0, 4, (0, 3), 64, 16), BatchLayerSpec("block/relu", 1, 4, (1,), 64, 16))
    return dataclasses.replace(layout, batch_layers=specs)


def _batch_rows(layout, steps: list[int]):
    from icsviz.store.writer import BatchRows

    s, b, q = len(steps), layout.hist_bins, len(layout.quantiles)
    value = np.asarray(steps, "f8")
    layers = [
        {
            "hist_counts": np.tile(np.arange(b, dtype="i4"), (s, 1)) + value[:, None].astype("i4"),
            "hist_range": np.stack([value, value + 1], axis=1),
            "quantiles": np.linspace(0, 1, q)[None, :] + value[:, None],
            "moments": np.stack([value, value + 1, -value, value + 2], axis=1),
            "zero_frac": value / 100,
            "nonfinite": np.asarray(steps, "i4") % 2,
            "unit_quantiles": np.zeros((s, len(spec.tracked_units), q)) + value[:, None, None],
        }
        for spec in layout.batch_layers
    ]
    return BatchRows(step=np.asarray(steps, "i8"), epoch=value / 10, time=value, layers=layers)


def test_per_step_rows_grow_by_chunks_and_only_committed_rows_are_read(tmp_path) -> None:
    layout = _batch_layout()
    path = tmp_path / "steps.h5"
    with RunWriter.create(path, layout, {}) as w:
        w.write_batches(_batch_rows(layout, [0, 1, 2]))
        w.write_batches(_batch_rows(layout, [3, 4]))
        with h5py.File(path, "r", swmr=True) as f:  # mid-run: data rows a chunk ahead of the marker
            assert f["batches/step"].shape[0] == 5
            assert f["batches/layers/000_dense/quantiles"].shape[0] > 5
        with open_run(path) as run:
            np.testing.assert_array_equal(run.batch_steps, [0, 1, 2, 3, 4])
            acts = run.batch_activations("dense")
            np.testing.assert_allclose(acts.mean, [0, 1, 2, 3, 4])
            np.testing.assert_array_equal(acts.counts[4], np.arange(layout.hist_bins) + 4)
            assert acts.unit_quantiles.shape == (5, 2, len(layout.quantiles))
    with h5py.File(path, "r") as f:  # compacted at close: exactly the committed rows
        assert f["batches/layers/000_dense/quantiles"].shape[0] == 5


def test_per_step_rows_written_without_their_marker_are_replaced(tmp_path) -> None:
    layout = _batch_layout()
    path = tmp_path / "steps.h5"
    with RunWriter.create(path, layout, {}) as w:
        w.write_batches(_batch_rows(layout, [0, 1]))
    with h5py.File(path, "a") as f:  # a writer killed between the data rows and the marker
        ds = f["batches/layers/000_dense/moments"]
        ds.resize(4, axis=0)
        ds[2:4] = 99.0
    with open_run(path) as run:
        np.testing.assert_array_equal(run.batch_steps, [0, 1])
        np.testing.assert_allclose(run.batch_activations("dense").mean, [0, 1])
    with RunWriter.resume(path, layout, from_epoch=1) as w:  # both rows are of epoch 0
        w.write_batches(_batch_rows(layout, [10, 11, 12]))
    with open_run(path) as run:
        np.testing.assert_array_equal(run.batch_steps, [0, 1, 10, 11, 12])
        np.testing.assert_allclose(run.batch_activations("dense").mean, [0, 1, 10, 11, 12])


def test_compaction_keeps_every_committed_value_and_attribute(tmp_path) -> None:
    from icsviz.store.writer import _rewrite

    layout = _batch_layout()
    raw = tmp_path / "raw.h5"
    w = RunWriter.create(raw, layout, {"run_name": "keep", "config": {"lr": 0.1}})
    for step in range(3):
        w.write_capture(tiny_capture(layout, step))
    w.write_batches(_batch_rows(layout, [0, 1, 2, 3]))
    w.write_epoch(0, {"loss": 1.5})
    w.close(compact=False)
    with h5py.File(raw, "a") as f:  # text stored variable-length, as h5py writes a str by default
        f["layers"].attrs["note"] = "ünïcode text"
    compact = _rewrite(raw, status="complete", out=tmp_path / "compact.h5")
    with h5py.File(raw, "r") as before, h5py.File(compact, "r") as after:
        committed = {"captures": before["captures/step"].shape[0], "batches": before["batches/step"].shape[0]}
        seen = []

        def same(name: str, old) -> None:
            new = after[name]
            for key, value in old.attrs.items():
                if key == "note":  # now fixed-length UTF-8 text, as icsviz writes text elsewhere
                    assert new.attrs.get_id(key).dtype.kind == "S" and new.attrs[key].decode() == value
                else:
                    assert new.attrs.get_id(key).dtype == old.attrs.get_id(key).dtype, (name, key)
                    np.testing.assert_array_equal(new.attrs[key], value)
            assert sorted(new.attrs) == sorted(old.attrs), name
            if not isinstance(old, h5py.Dataset):
                return
            seen.append(name)
            assert new.dtype == old.dtype and new.maxshape == old.maxshape, name
            rows = old.shape[0] if old.shape else None
            if old.maxshape and old.maxshape[0] is None and not name.startswith("history"):
                rows = committed["batches" if name.startswith("batches") else "captures"]
                assert (new.compression, new.shuffle, new.fletcher32) == ("gzip", True, True), name
            np.testing.assert_array_equal(new[()], old[()] if rows is None else old[:rows], err_msg=name)

        before.visititems(same)
        assert "layers/000_dense/quantiles" in seen and "batches/layers/000_dense/moments" in seen
    with open_run(compact) as run:
        assert run.name == "keep" and run.num_captures == 3 and list(run.batch_steps) == [0, 1, 2, 3]


def test_captures_written_together_equal_those_written_one_by_one(tmp_path, layout) -> None:
    captures = [tiny_capture(layout, step, value=0.5) for step in range(7)]
    with RunWriter.create(tmp_path / "one.h5", layout, {}) as w:
        for capture in captures:
            w.write_capture(capture)
    with RunWriter.create(tmp_path / "together.h5", layout, {}) as w:
        w.write_captures(captures[:1])
        w.write_captures(captures[1:5])
        assert w.num_captures == 5  # the marker grew by exactly the captures written
        w.write_captures([])
        w.write_captures(captures[5:])
    with h5py.File(tmp_path / "one.h5", "r") as one, h5py.File(tmp_path / "together.h5", "r") as together:
        compared = []

        def same(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset) and name != "status":
                np.testing.assert_array_equal(together[name][()], obj[()], err_msg=name)
                compared.append(name)

        one.visititems(same)
        assert "layers/000_dense/hist_counts" in compared and "ics/000_dense/grad_cos" in compared
    with open_run(tmp_path / "together.h5") as run:
        np.testing.assert_array_equal(run.steps, np.arange(7))
        np.testing.assert_allclose(run.activations("dense").mean, 0.5 * np.arange(7))


def test_an_epoch_of_unknown_length_places_its_rows_when_it_ends(tmp_path) -> None:
    """A dataset of unknown cardinality: the first epoch's step captures and per-step rows are
    written at epoch 0, then placed once the epoch's 5 steps are known; a step capture at its
    last step becomes its end; the capture that ended the epoch before is left alone."""
    import dataclasses

    layout = _batch_layout()
    path = tmp_path / "unknown.h5"

    def at(step: int, epoch: float, kind: str = "step"):
        return dataclasses.replace(tiny_capture(layout, step, kind=kind), epoch=epoch)

    with RunWriter.create(path, layout, {}) as w:
        w.write_captures([at(0, 0.0, "start"), at(2, 0.0), at(4, 0.0)])
        rows = _batch_rows(layout, [0, 1, 2, 3, 4])
        w.write_batches(dataclasses.replace(rows, epoch=np.zeros(5)))
        w.write_captures([at(5, 0.0)])
        w.place_in_epoch(0.0, 0, 5)
        # The second epoch, written where the first one's length put its rows, was 4 steps long.
        w.write_captures([at(7, 1.4), at(9, 1.8)])
        w.write_batches(dataclasses.replace(_batch_rows(layout, [5, 6, 7, 8]), epoch=1 + np.arange(4) / 5))
        w.place_in_epoch(1.0, 5, 4)
    with open_run(path) as run:
        np.testing.assert_array_equal(run.steps, [0, 2, 4, 5, 7, 9])
        np.testing.assert_allclose(run.epochs, [0.0, 0.4, 0.8, 1.0, 1.5, 2.0])
        assert run.capture_kinds == ["start", "step", "step", "epoch", "step", "epoch"]
        np.testing.assert_allclose(run.batch_epochs, [0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 1.75])
        np.testing.assert_allclose(run.activations("dense").mean, [0, 2, 4, 5, 7, 9])  # values untouched


def test_a_run_is_written_in_small_chunks_and_compacted_into_the_usual_ones(tmp_path) -> None:
    """While a run is written each flush rewrites every chunk a capture touched: those chunks are
    about 1,024 values (a 64-bin histogram's 16 rows); the compacted file keeps 4,096-value chunks
    of at most 64 rows, whatever the live ones were, and every row crosses both intact."""
    layout = tiny_layout(units=100, bins=64)
    path = tmp_path / "r.h5"
    w = RunWriter.create(path, layout, {})
    for step in range(40):  # rows across three live chunks of the histograms
        w.write_capture(tiny_capture(layout, step))
    with h5py.File(path, "r", swmr=True) as f:
        assert f["layers/000_dense/hist_counts"].chunks == (16, 64)
        assert f["layers/000_dense/unit_mean"].chunks == (10, 100)
        assert f["layers/000_dense/quantiles"].chunks == (
            1024 // len(layout.quantiles),
            len(layout.quantiles),
        )
        assert f["captures/epoch"].chunks == (256,)
    w.close()
    with h5py.File(path, "r") as f:
        assert f["layers/000_dense/hist_counts"].chunks == (64, 64)
        assert f["layers/000_dense/hist_edges"].chunks == (63, 65)
        assert f["layers/000_dense/unit_mean"].chunks == (40, 100)
        assert f["captures/epoch"].chunks == (64,)
    with open_run(path) as run:
        acts = run.activations("dense")
        np.testing.assert_array_equal(acts.counts, np.arange(64)[None, :] + np.arange(40)[:, None])
        np.testing.assert_allclose(acts.mean, np.arange(40))
        np.testing.assert_array_equal(run.steps, np.arange(40))


def test_per_step_rows_keep_their_large_chunks(tmp_path) -> None:
    """Written a hundred steps at a time: chunks of about 16,384 values, at most 1,024 rows."""
    layout = _batch_layout()  # 8 bins, 2 tracked units of the dense layer, 13 quantiles
    with RunWriter.create(tmp_path / "steps.h5", layout, {}) as w:
        assert w._ds("batches/layers/000_dense/hist_counts").chunks == (1024, 8)
        assert w._ds("batches/layers/000_dense/unit_quantiles").chunks == (630, 2, 13)
        assert w._ds("batches/step").chunks == (1024,)
