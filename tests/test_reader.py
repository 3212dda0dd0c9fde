from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import deep_layout, tiny_capture
from icsviz import SCHEMA_VERSION, MissingDataError, RunFileError, SchemaVersionError, open_run
from icsviz.store.writer import RunWriter


@pytest.fixture
def run_path(tmp_path, layout):
    path = tmp_path / "ok.h5"
    with RunWriter.create(path, layout, {"run_name": "ok"}) as w:
        for step in range(4):
            w.write_capture(tiny_capture(layout, step))
    return path


def test_missing_file(tmp_path) -> None:
    with pytest.raises(RunFileError, match="no such run file"):
        open_run(tmp_path / "nope.h5")


def test_a_folder_says_to_open_a_file_in_it(tmp_path) -> None:
    with pytest.raises(RunFileError, match=r"is a folder, not a run file: open one of the \.h5 files in it"):
        open_run(tmp_path)


def test_empty_file(tmp_path) -> None:
    path = tmp_path / "empty.h5"
    path.write_bytes(b"")
    with pytest.raises(RunFileError, match="empty"):
        open_run(path)


def test_not_hdf5(tmp_path) -> None:
    path = tmp_path / "notes.h5"
    path.write_text("hello")
    with pytest.raises(RunFileError, match="not an HDF5 file"):
        open_run(path)


def test_truncated_file(tmp_path, run_path) -> None:
    data = run_path.read_bytes()
    path = tmp_path / "cut.h5"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(RunFileError, match=str(path.name)):
        open_run(path)


def test_hdf5_but_not_a_run(tmp_path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(RunFileError, match="not an icsviz run"):
        open_run(path)


def test_newer_schema_names_both_versions(tmp_path, run_path) -> None:
    with h5py.File(run_path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(SchemaVersionError, match=rf"version 99.*up to {SCHEMA_VERSION}"):
        open_run(run_path)
    assert issubclass(SchemaVersionError, RunFileError)


def test_unknown_names_list_what_exists(run_path) -> None:
    with open_run(run_path) as run:
        with pytest.raises(MissingDataError, match="dense"):
            run.activations("conv9")
        with pytest.raises(MissingDataError, match="not recorded"):
            run.activations("dense").quantile(0.42)
        with pytest.raises(MissingDataError, match="not tracked"):
            run.activations("dense").unit_quantile(2, 0.5)
        np.testing.assert_allclose(run.activations("dense").unit_quantile(3, 0.5), np.arange(4), atol=1e-6)
        assert run.activations("000_dense").name == "dense"  # ids work too


def test_a_closed_run_and_a_name_that_is_not_a_string_say_so(run_path) -> None:
    with open_run(run_path) as run:
        with pytest.raises(TypeError, match="layers are named by strings, e.g. 'dense'.*Received: 3"):
            run.activations(3)
        first = run.activations("dense")
    assert first.counts.shape[0] == 4  # what was read inside stays readable
    for read in (lambda: run.tracked_units("dense"), lambda: run.attrs, lambda: run.refresh()):
        with pytest.raises(ValueError, match="this Run is closed; read it inside `with open_run"):
            read()  # h5py's own error for a closed file read as "the file is damaged"


def test_live_reader_follows_a_growing_file(tmp_path, layout) -> None:
    """A reader in another process sees captures appear while the writer runs."""
    import subprocess
    import sys
    import textwrap
    import time

    path = tmp_path / "live.h5"
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from conftest import tiny_capture, tiny_layout
        from icsviz.store.writer import RunWriter
        layout = tiny_layout()
        w = RunWriter.create({str(path)!r}, layout, {{}})
        w.write_capture(tiny_capture(layout, 0))
        open({str(go)!r}, "w").close()
        for step in range(1, 6):
            time.sleep(0.3)
            w.write_capture(tiny_capture(layout, step))
        w.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not go.exists():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        run = open_run(path)
        seen = [run.num_captures]
        while proc.poll() is None:
            run.refresh()
            seen.append(run.num_captures)
            assert len(run.activations("dense").counts) == run.num_captures
            time.sleep(0.1)
        run.refresh()
        seen.append(run.num_captures)
        assert seen[0] >= 1 and seen[-1] == 6
        assert len(set(seen)) >= 3, seen  # saw intermediate states, not only the end
        assert run.status == "complete"
        run.close()
    finally:
        proc.wait(30)


def test_activations_are_read_once_per_committed_length_and_read_only(run_path) -> None:
    with open_run(run_path) as run:
        first = run.activations("dense")
        assert run.activations("000_dense") is first  # the same read, by name or id
        with pytest.raises(ValueError, match="read-only"):
            first.counts[0, 0] = 99
        copy = first.counts.copy()
        copy[0, 0] = 99  # a copy is the user's to change
        assert first.counts[0, 0] != 99


def test_each_variables_layer_is_read_once_however_many_layers_ask(tmp_path, monkeypatch) -> None:
    from icsviz.store.reader import Run

    # 30 layers of two variables each: finding each layer's by reading every variable's
    # attribute again made a deep model's Gradients tab quadratic (36 s for NASNetMobile).
    deep = deep_layout(30)
    path = tmp_path / "deep.h5"
    with RunWriter.create(path, deep, {"run_name": "deep"}) as w:
        w.write_capture(tiny_capture(deep, 0))
    reads, groups = [], []
    attribute, read_groups = Run._attribute, Run._groups
    monkeypatch.setattr(Run, "_attribute", lambda self, *a: reads.append(a) or attribute(self, *a))
    monkeypatch.setattr(Run, "_groups", lambda self, root: groups.append(root) or read_groups(self, root))
    with open_run(path) as run:
        assert run.trainable_layers == [f"d{k}" for k in range(30)]
        for k in range(30):
            assert run.variables_of(f"d{k}") == [f"d{k}/kernel", f"d{k}/bias"]
            assert run.gradients(f"d{k}").grad_norm.shape == (1, 2)
    # The 60 variables' attributes are read once, with the run's index, not per layer asked.
    assert groups.count("variables") == 1
    assert not [a for a in reads if a[1] == "layer"]


def test_another_open_of_the_same_file_version_shares_the_read(run_path, layout) -> None:
    with open_run(run_path) as run, open_run(run_path) as again:
        assert again.activations("dense") is run.activations("dense")
    from icsviz.store.writer import RunWriter

    with open_run(run_path) as run:
        before = run.activations("dense")
    with RunWriter.resume(run_path, layout, from_epoch=99) as writer:  # the file changes
        writer.write_capture(tiny_capture(layout, 10))
    with open_run(run_path) as changed:
        after = changed.activations("dense")
        assert after is not before and len(after.counts) == len(before.counts) + 1


def test_an_index_record_is_used_only_when_it_holds_every_field(run_path) -> None:
    from icsviz.store import reader

    with open_run(run_path) as run:
        record = reader.index_record(run)
        expected = run.layer(run.layer_names[0])
    assert record is not None and "value_sample" in record["layers"][0]
    stale = {
        **record,
        "layers": [{k: v for k, v in item.items() if k != "value_sample"} for item in record["layers"]],
    }
    reader._INDEXES.clear()
    assert not reader.seed_index(run_path, (), lambda: stale)  # kept before value_sample: the file is read
    assert record["variable_layers"] == {"dense/kernel": "dense", "dense/bias": "dense"}
    before_owners = {k: v for k, v in record.items() if k != "variable_layers"}
    assert not reader.seed_index(run_path, (), lambda: before_owners)  # kept before them: read
    assert reader.seed_index(run_path, (), lambda: record)
    with open_run(run_path) as run:
        assert run.layer(run.layer_names[0]) == expected
        assert run.variables_of("dense") == ["dense/kernel", "dense/bias"]


def test_the_accuracy_is_found_whatever_keras_named_it() -> None:
    from icsviz.store.reader import accuracy_of, validation_accuracy

    assert accuracy_of(["loss", "mae"]) is None
    assert accuracy_of(["loss", "top_k", "sparse_categorical_accuracy"]) == "sparse_categorical_accuracy"
    assert accuracy_of(["binary_accuracy", "accuracy"]) == "accuracy"  # metrics=["accuracy"] first
    named = {
        "loss": np.ones(2),
        "sparse_categorical_accuracy": np.zeros(2),
        "val_sparse_categorical_accuracy": np.arange(2.0),
    }
    np.testing.assert_array_equal(validation_accuracy(named), [0.0, 1.0])
    assert validation_accuracy({"val_accuracy": np.ones(1)}) is not None  # only the validation row recorded
    assert validation_accuracy({"loss": np.ones(1), "accuracy": np.ones(1)}) is None  # no validation data


def test_last_finite_is_the_last_epoch_with_a_value() -> None:
    from icsviz.store.reader import last_finite

    assert last_finite(np.array([np.nan, 0.5, np.nan, 0.6, np.nan])) == 0.6  # validation_freq=2
    assert last_finite(np.array([0.1, 0.2])) == 0.2
    assert np.isnan(last_finite(np.array([np.nan]))) and np.isnan(last_finite(None))
    assert np.isnan(last_finite(np.array([])))


def test_which_way_a_metric_improves_is_read_from_its_name() -> None:
    from icsviz.store.reader import better

    assert [
        better(m) for m in ("accuracy", "sparse_categorical_accuracy", "auc", "precision", "r2_score")
    ] == [1] * 5
    assert [better(m) for m in ("loss", "mae", "mse", "d_loss", "kl_divergence", "mean_squared_error")] == [
        -1
    ] * 6
    assert better("my_score") is None
