"""ICSCallback on real (tiny) Keras training runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from conftest import run_script
from icsviz import CaptureWarning, ICSCallback, IncompatibleRunError, RunExistsError, RunInUseError, open_run

HERE = Path(__file__).parent
TORCH = pytest.param(
    "torch",
    marks=pytest.mark.skipif(
        importlib.util.find_spec("torch") is None, reason="torch is not installed (pip install torch==2.13.0)"
    ),
)


def data(n=96, shape=(6,), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = (x.reshape(n, -1)[:, 0] > 0).astype("int64") + (x.reshape(n, -1)[:, 1] > 0)
    return x, y % classes


def compiled(model, lr=0.05):
    model.compile(keras.optimizers.SGD(lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def sequential():
    keras.utils.set_random_seed(0)
    return compiled(
        keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, name="d1"),
                keras.layers.Activation("relu", name="r1"),
                keras.layers.Dropout(0.2, name="drop"),
                keras.layers.Dense(3, activation="softmax", name="out"),
            ],
            name="seq",
        )
    )


def residual():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="stem")(inputs)
    h = keras.layers.Dense(8, activation="relu", name="branch_a")(x)
    h = keras.layers.Dense(8, name="branch_b")(h)
    x = keras.layers.Add(name="add")([x, h])
    x = keras.layers.ReLU(name="relu")(x)
    return compiled(
        keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(x), name="res")
    )


def nested():
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, keras.layers.Dense(8, activation="tanh", name="d")(inner_in), name="block")
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="stem")(inputs)
    x = inner(x)
    x = inner(x)  # a shared nested model, called twice
    return compiled(
        keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(x), name="outer")
    )


class TwoOutputs(keras.layers.Layer):
    def call(self, x):
        return x * 2.0, x - 1.0


def multi_output():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="stem")(inputs)
    a, b = TwoOutputs(name="split")(x)
    x = keras.layers.Add(name="merge")([a, b])
    return compiled(keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(x)))


def fit(model, path, epochs=2, probe=None, **kwargs):
    x, y = data()
    fit_kwargs = {k: kwargs.pop(k) for k in ("initial_epoch",) if k in kwargs}
    cb = ICSCallback(path, probe=probe if probe is not None else (x[:32], y[:32]), **kwargs)
    history = model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=16,
        verbose=0,
        validation_data=(x[:32], y[:32]),
        callbacks=[cb],
        **fit_kwargs,
    )
    return history, cb


def test_sequential_schedule_history_and_gradients(tmp_path) -> None:
    path = tmp_path / "seq.h5"
    history, _ = fit(sequential(), path, epochs=3, every_n_steps=4)
    with open_run(path) as run:
        assert run.status == "complete"
        assert run.layer_names == ["d1", "r1", "out:preact", "out"]
        # 6 steps per epoch: start, steps 4 / 8 / 12 / 16, and the three epoch ends (6, 12 is both: epoch wins)
        np.testing.assert_array_equal(run.steps, [0, 4, 6, 8, 12, 16, 18])
        assert run.capture_kinds == ["start", "step", "epoch", "step", "epoch", "step", "epoch"]
        np.testing.assert_allclose(run.epochs, [0, 4 / 6, 1, 1 + 2 / 6, 2, 2 + 4 / 6, 3])
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(run.history[key], history.history[key], rtol=1e-6)
        np.testing.assert_allclose(run.history["learning_rate"], 0.05)
        assert (run.history["epoch_time"] > 0).all()
        grads = run.gradients("d1")
        assert [v.rsplit("/", 2)[-2:] for v in grads.variables] == [["d1", "kernel"], ["d1", "bias"]]
        assert (grads.grad_norm > 0).all() and np.isfinite(grads.grad_norm).all()
        assert np.isnan(grads.update_ratio[0]).all() and (grads.update_ratio[1:, 0] > 0).all()
        acts = run.activations("r1")
        assert (acts.counts.sum(1) == 32 * 8).all()
        assert (acts.min >= 0).all() and (acts.zero_frac > 0).all()  # ReLU outputs
        assert run.attrs["model_name"] == "seq" and run.attrs["backend"] == keras.backend.backend()


@pytest.mark.skipif(
    keras.backend.backend() == "torch", reason="Keras's torch backend has no steps_per_execution"
)
def test_steps_per_execution_keeps_the_step_schedule_and_the_true_step_numbers(tmp_path) -> None:
    # With steps_per_execution=4 Keras calls the batch hooks every 4 steps, and numbers the
    # last call of a 10-step epoch "batch 11": step captures every 3 steps used to be never
    # taken (no hook lands on a multiple of 3), and the second epoch's steps were counted from 12.
    model = sequential()
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy", steps_per_execution=4)
    x, y = data(n=160)
    path = tmp_path / "spe.h5"
    cb = ICSCallback(path, probe=(x[:32], y[:32]), every_n_steps=3, batch_stats=True)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations) == 20
    with open_run(path) as run:
        # The first hook after each multiple of 3: steps 4 and 8, then the epoch's end at 10.
        np.testing.assert_array_equal(run.steps, [0, 4, 8, 10, 14, 18, 20])
        assert run.capture_kinds == ["start", "step", "step", "epoch", "step", "step", "epoch"]
        np.testing.assert_allclose(run.epochs, [0, 0.4, 0.8, 1, 1.4, 1.8, 2])
        expected_rows = [3, 7, 9, 13, 17, 19] if keras.backend.backend() == "tensorflow" else np.arange(20)
        np.testing.assert_array_equal(run.batch_steps, expected_rows)  # TF: an execution's last step


def _own_training_step(model, optimizer, loss_fn, x, y):
    """One step of a training loop written from scratch, as Keras's guide for each backend
    writes it: the gradients by the backend's own means, the update by the Keras optimizer."""
    backend = keras.backend.backend()
    variables = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
    elif backend == "jax":
        import jax

        def compute(trainable):
            non_trainable = [v.value for v in model.non_trainable_variables]
            predictions, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_fn(y, predictions)

        loss, grads = jax.value_and_grad(compute)([v.value for v in variables])
    else:
        import torch

        model.zero_grad()
        loss = loss_fn(y, model(x, training=True))
        loss.backward()
        grads = [v.value.grad for v in variables]
        with torch.no_grad():
            optimizer.apply(grads, variables)
        return loss
    optimizer.apply(grads, variables)
    return loss


def test_a_training_loop_of_ones_own_drives_the_callback_through_a_callback_list(tmp_path) -> None:
    # Keras's guide to writing a training loop from scratch: the callbacks called by hand. The
    # model is never compiled: activations are recorded, gradients skipped with one warning.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="h"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    optimizer, loss_fn = (
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    path = tmp_path / "loop.h5"
    callbacks = keras.callbacks.CallbackList(
        [ICSCallback(path, probe=(x[:32], y[:32]), every_n_steps=4, batch_stats=True)],
        model=model,
        epochs=2,
        steps=6,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callbacks.on_train_begin()
        for epoch in range(2):
            callbacks.on_epoch_begin(epoch)
            for batch in range(6):
                callbacks.on_train_batch_begin(batch)
                xb, yb = x[batch * 16 : (batch + 1) * 16], y[batch * 16 : (batch + 1) * 16]
                loss = _own_training_step(model, optimizer, loss_fn, xb, yb)
                callbacks.on_train_batch_end(batch, {"loss": loss})
            callbacks.on_epoch_end(epoch, {"loss": loss})
        callbacks.on_train_end()
    ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(ours) == 2, ours
    assert "is not compiled (no optimizer, no loss), so gradient statistics are skipped" in ours[0]
    # The per-step mode measures inside Keras's own step, which this loop never runs: said once.
    assert "an epoch went by without Keras's own training step" in ours[1]
    with open_run(path) as run:
        assert run.status == "complete" and run.capture_kinds == ["start", "step", "epoch", "step", "epoch"]
        np.testing.assert_array_equal(run.steps, [0, 4, 6, 8, 12])  # every 4th step, and epoch ends
        hidden = keras.ops.convert_to_numpy(keras.Model(model.inputs, model.get_layer("h").output)(x[:32]))
        np.testing.assert_allclose(run.activations("h").mean[-1], float(np.mean(hidden)), rtol=1e-5)
        assert np.isnan(run.gradients("h").grad_norm).all()  # not measured, and not zeros


def test_a_loop_that_never_begins_a_batch_is_told_where_step_captures_are_taken(tmp_path) -> None:
    # On JAX and torch a step capture is taken as the next step begins (ICSCallback has no
    # batch-end hook there, so Keras's loop never waits for a step's logs); a loop that only
    # calls on_train_batch_end is told so. TensorFlow's keep the batch-end hook.
    model = sequential()
    x, y = data()
    path = tmp_path / "ends_only.h5"
    callbacks = keras.callbacks.CallbackList(
        [ICSCallback(path, probe=(x[:32], y[:32]), every_n_steps=2)], model=model, epochs=1, steps=6
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callbacks.on_train_begin()
        callbacks.on_epoch_begin(0)
        for batch in range(6):
            xb, yb = x[batch * 16 : (batch + 1) * 16], y[batch * 16 : (batch + 1) * 16]
            logs = model.train_on_batch(xb, yb, return_dict=True)
            callbacks.on_train_batch_end(batch, logs)
        callbacks.on_epoch_end(0, logs)
        callbacks.on_train_end()
    ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    with open_run(path) as run:
        if keras.backend.backend() == "tensorflow":
            assert ours == []
            np.testing.assert_array_equal(run.steps, [0, 2, 4, 6])
        else:
            assert len(ours) == 1 and "never called on_train_batch_begin" in ours[0], ours
            np.testing.assert_array_equal(run.steps, [0, 6])  # the epoch's end still counts its steps


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="written with TensorFlow's own API")
def test_a_model_compiled_without_a_loss_records_its_activations(tmp_path) -> None:
    # The loss made in a train_step of the user's own (Keras's "customizing fit" guide), compile()
    # given only the optimizer: the loss on the probe cannot be computed, the rest can.
    import tensorflow as tf

    class OwnLoss(keras.Sequential):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = keras.losses.sparse_categorical_crossentropy(y, self(x, training=True))
            self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
            return {"loss": tf.reduce_mean(loss)}

    keras.utils.set_random_seed(0)
    model = OwnLoss(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="h"),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1))
    x, y = data()
    path = tmp_path / "own.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x, y, epochs=2, batch_size=16, verbose=0, callbacks=[ICSCallback(path, probe=(x[:32], y[:32]))]
        )
    ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert (
        len(ours) == 1
        and "computing the loss and gradients on the probe (gradient statistics are skipped" in ours[0]
    ), ours
    assert "No loss to compute" in ours[0]  # Keras's own words for the cause
    with open_run(path) as run:
        assert run.num_captures == 3 and run.layer_names == ["h:preact", "h", "out:preact", "out"]
        hidden = keras.Model(model.inputs, model.get_layer("h").output)(x[:32], training=True)
        np.testing.assert_allclose(run.activations("h").mean[-1], float(np.mean(hidden)), rtol=1e-5)


def test_functional_residual_block(tmp_path) -> None:
    fit(residual(), tmp_path / "res.h5", epochs=1)
    with open_run(tmp_path / "res.h5") as run:
        assert run.layer_names == [
            "stem",
            "branch_a:preact",
            "branch_a",
            "branch_b",
            "add",
            "relu",
            "out:preact",
            "out",
        ]
        stem, add = run.activations("stem"), run.activations("add")
        assert stem.counts.shape == (2, 64) and add.unit_mean.shape == (2, 8)


def test_augmentation_and_noise_draw_the_same_at_every_capture(tmp_path) -> None:
    # The probe runs in training mode, where RandomFlip/RandomRotation and GaussianNoise draw
    # afresh at each call: pinned, so that with weights that never move (a rate of 0) every
    # capture is the same, and drift can only come from the weights.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.RandomFlip("horizontal")(inputs)
    h = keras.layers.RandomRotation(0.2)(h)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(h)
    h = keras.layers.GaussianNoise(0.5)(h)
    h = keras.layers.Dropout(0.5)(h)
    outputs = keras.layers.Dense(2, activation="softmax", name="out")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8, 8, 3)).astype("float32"), rng.integers(0, 2, 32)
    path = tmp_path / "aug.h5"
    model.fit(
        x, y, epochs=2, batch_size=8, verbose=0, callbacks=[ICSCallback(path, probe=(x, y), every_n_steps=2)]
    )
    with open_run(path) as run:
        assert run.num_captures == 5 and run.layer_names == ["conv:preact", "conv", "out:preact", "out"]
        for name in run.layer_names:
            acts = run.activations(name)
            assert (acts.counts == acts.counts[0]).all(), name
            np.testing.assert_array_equal(
                acts.quantiles, np.broadcast_to(acts.quantiles[0], acts.quantiles.shape)
            )
        # The flip and rotation did act: the capture differs from the un-augmented input's.
        plain = keras.Model(inputs, model.get_layer("conv").output)
        assert not np.isclose(
            float(np.mean(keras.ops.convert_to_numpy(plain(x, training=False)))),
            run.activations("conv").mean[0],
            rtol=1e-4,
        )


def test_nested_and_shared_model(tmp_path) -> None:
    fit(nested(), tmp_path / "nested.h5", epochs=1)
    with open_run(tmp_path / "nested.h5") as run:
        assert run.layer_names == [
            "stem",
            "block/d:preact",
            "block/d",
            "block/d:preact#2",
            "block/d#2",
            "out:preact",
            "out",
        ]
        first, second = run.activations("block/d"), run.activations("block/d#2")
        assert not np.allclose(first.mean, second.mean)  # two calls, two distributions
        assert [v.rsplit("/", 1)[-1] for v in run.variables_of("block/d")] == ["kernel", "bias"]


def test_layer_with_several_outputs(tmp_path) -> None:
    fit(multi_output(), tmp_path / "multi.h5", epochs=1)
    with open_run(tmp_path / "multi.h5") as run:
        assert "split[0]" in run.layer_names and "split[1]" in run.layer_names
        a, b = run.activations("split[0]"), run.activations("split[1]")
        stem = run.activations("stem")
        np.testing.assert_allclose(a.mean, 2 * stem.mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b.mean, stem.mean - 1, rtol=1e-4, atol=1e-5)


def test_probe_without_labels_warns_once_and_skips_gradients(tmp_path) -> None:
    x, _ = data()
    with pytest.warns(CaptureWarning, match="no labels") as record:
        fit(sequential(), tmp_path / "nolabels.h5", probe=x[:16])
    assert len([w for w in record if issubclass(w.category, CaptureWarning)]) == 1
    with open_run(tmp_path / "nolabels.h5") as run:
        assert np.isnan(run.gradients("d1").grad_norm).all()
        assert np.isfinite(run.gradients("d1").weight_norm).all()
        assert run.activations("d1").counts.sum(1)[0] == 16 * 8


def test_probe_from_a_dataset(tmp_path) -> None:
    import tensorflow as tf

    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)
    fit(sequential(), tmp_path / "ds.h5", probe=ds, epochs=1)
    with open_run(tmp_path / "ds.h5") as run:
        assert run.activations("d1").counts.sum(1)[0] == 20 * 8
        assert np.isfinite(run.gradients("out").grad_norm).all()


def test_argument_errors_are_raised_early() -> None:
    x, y = data()
    with pytest.raises(ValueError, match="Received: every_n_steps=0"):
        ICSCallback("r.h5", probe=x, every_n_steps=0)
    with pytest.raises(ValueError, match="histogram_bins"):
        ICSCallback("r.h5", probe=x, histogram_bins=1)
    with pytest.raises(ValueError, match="Received: quantile_sample=8"):
        ICSCallback("r.h5", probe=x, quantile_sample=8)
    with pytest.raises(ValueError, match="or None for every value. Received: max_values=0"):
        ICSCallback("r.h5", probe=x, max_values=0)
    with pytest.raises(ValueError, match="probe=None"):
        ICSCallback("r.h5", probe=None)
    with pytest.raises(ValueError, match="0 samples"):
        ICSCallback("r.h5", probe=x[:0])
    with pytest.raises(ValueError, match="JSON"):
        ICSCallback("r.h5", probe=x, metadata={"f": object()})


def test_a_folder_as_path_is_refused_and_a_name_the_app_would_not_list_warned(tmp_path) -> None:
    x, _ = data()
    with pytest.raises(ValueError, match=r"is a folder: pass a file inside it, e\.g\. path='.*run\.h5'"):
        ICSCallback(tmp_path, probe=x)
    with pytest.warns(CaptureWarning, match=r"'run\.hdf5' does not end in \.h5.*'run\.hdf5\.h5'"):
        ICSCallback(tmp_path / "run.hdf5", probe=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ICSCallback(tmp_path / "run.h5", probe=x)  # no warning


def test_layer_filters_are_checked_early_and_recorded_as_given() -> None:
    x, y = data()
    with pytest.raises(ValueError, match="Received: 3"):
        ICSCallback("r.h5", probe=x, layers=["d1", 3])
    assert ICSCallback("r.h5", probe=x, layers="d*").layers == ["d*"]  # not ["d", "*"]
    predicate = ICSCallback("r.h5", probe=x, layers=lambda layer: True).layers
    assert isinstance(predicate, list) and len(predicate) == 1 and callable(predicate[0])


def test_a_filter_that_matches_no_layer_records_the_weights_with_one_warning(tmp_path) -> None:
    path = tmp_path / "none.h5"
    model = sequential()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, path, epochs=2, layers=["nope"])
    ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(ours) == 1 and "'nope'" in ours[0] and "d1" in ours[0], ours
    with open_run(path) as run:
        assert run.layer_names == [] and run.num_captures == 3 and run.status == "complete"
        grads = run.gradients("d1")
        assert np.isfinite(grads.grad_norm).all() and (grads.grad_norm > 0).all()
        kernel = model.get_layer("d1").kernel.numpy()
        np.testing.assert_allclose(grads.weight_norm[-1, 0], np.linalg.norm(kernel), rtol=1e-5)


def test_a_path_under_home_written_with_a_tilde_is_expanded(tmp_path, monkeypatch) -> None:
    from icsviz import check_run
    from icsviz.store.catalog import scan_runs

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    fit(sequential(), "~/runs/a.h5", epochs=1)
    assert (tmp_path / "home" / "runs" / "a.h5").is_file() and not (tmp_path / "~").exists()
    with open_run("~/runs/a.h5") as run:
        assert run.num_captures == 2
    assert check_run("~/runs/a.h5").ok
    assert [entry.path.name for entry in scan_runs("~/runs")] == ["a.h5"]


def test_the_quantile_sample_size_is_the_users_choice_and_recorded(tmp_path) -> None:
    import h5py

    fit(sequential(), tmp_path / "whole.h5", epochs=1)
    fit(sequential(), tmp_path / "small.h5", epochs=1, quantile_sample=16)
    sizes = {}
    for name in ("whole", "small"):
        with open_run(tmp_path / f"{name}.h5") as run:
            lid = run.layer("d1").id
            acts = run.activations("d1")
        with h5py.File(tmp_path / f"{name}.h5", "r") as f:
            sizes[name] = int(f["layers"][lid].attrs["quantile_sample"])
        assert (np.diff(acts.quantiles, axis=1) >= 0).all()  # ordered levels, inside the range
        assert (acts.quantiles[:, 0] >= acts.min).all() and (acts.quantiles[:, -1] <= acts.max).all()
    assert sizes == {"whole": 32 * 8, "small": 16}  # a 32-sample probe of 8 units: used whole by default


def test_the_value_budget_is_the_users_choice_and_none_measures_every_value(tmp_path) -> None:
    keras.utils.set_random_seed(0)
    model = compiled(
        keras.Sequential(
            [
                keras.Input((12, 12, 3)),
                keras.layers.Conv2D(8, 3, name="conv"),  # probe 32: 32 x 10 x 10 x 8 = 25,600 values
                keras.layers.Flatten(),
                keras.layers.Dense(3, activation="softmax", name="out"),
            ]
        ),
        lr=0.0,  # the weights stay as built: numpy measures the same tensor the captures did
    )
    x, y = data(64, shape=(12, 12, 3))
    probe = (x[:32], y[:32])
    whole = tmp_path / "whole.h5"
    for path, budget in ((whole, None), (tmp_path / "budget.h5", 4096)):
        cb = ICSCallback(path, probe=probe, max_values=budget)
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    values = keras.ops.convert_to_numpy(
        keras.Model(model.inputs, model.get_layer("conv").output)([probe[0]])
    ).astype("float64")
    with open_run(whole) as run:
        layer, acts = run.layer("conv"), run.activations("conv")
        assert (layer.n_values, layer.value_sample) == (25_600, "all")
        assert run.config["max_values"] is None
        np.testing.assert_allclose(acts.mean[-1], values.mean(), rtol=1e-5)
        np.testing.assert_allclose(acts.std[-1], values.std(), rtol=1e-5)
        np.testing.assert_allclose(acts.unit_mean[-1], values.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)
        assert acts.counts[-1].sum() == 25_600
    with open_run(tmp_path / "budget.h5") as run:
        layer, sampled = run.layer("conv"), run.activations("conv")
        assert (layer.n_values, layer.value_sample) == (4096, "rows")  # 512 rows of 8 channels
        assert run.config["max_values"] == 4096
        assert sampled.counts[-1].sum() == 4096
        assert sampled.mean[-1] != acts.mean[-1]  # a sample, within the documented error
        assert abs(sampled.mean[-1] - values.mean()) < 0.05 * values.std()
        assert (sampled.min[-1], sampled.max[-1]) == (acts.min[-1], acts.max[-1])  # always exact


def test_existing_file_is_refused_before_training_and_overwritten_on_request(tmp_path) -> None:
    path = tmp_path / "r.h5"
    fit(sequential(), path, epochs=1)
    model = sequential()
    with pytest.raises(RunExistsError, match="overwrite=True"):
        fit(model, path, epochs=1)
    assert int(model.optimizer.iterations.numpy()) == 0  # no step was taken
    fit(sequential(), path, epochs=2, overwrite=True)
    with open_run(path) as run:
        assert len(run.history_epochs) == 2


def test_resume_with_initial_epoch_appends(tmp_path) -> None:
    path = tmp_path / "resume.h5"
    model = sequential()
    fit(model, path, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)  # nothing missing: nothing said
        fit(model, path, epochs=4, initial_epoch=2)
    with open_run(path) as run:
        np.testing.assert_array_equal(run.history_epochs, [0, 1, 2, 3])
        np.testing.assert_allclose(run.epochs, [0, 1, 2, 3, 4])  # epoch 2 is not captured twice
        assert run.steps[-1] == 24
    with pytest.raises(IncompatibleRunError, match="another model"):
        fit(residual(), path, epochs=3, initial_epoch=2)


def test_a_resume_from_weights_alone_goes_on_counting_the_runs_steps(tmp_path) -> None:
    """Keras's usual resume in a new process: a fresh model, `load_weights`, `fit(initial_epoch=2)`.
    Its optimizer counts from 0 again; the run's steps (probe captures and per-step rows) go on
    from those recorded instead of starting over below them. Resuming at an earlier epoch goes
    on from that epoch's step."""
    path = tmp_path / "resume.h5"
    x, y = data()  # 6 steps an epoch
    model = sequential()
    fit(model, path, epochs=2, every_n_steps=4, batch_stats=True)
    again = sequential()  # a new process: new optimizer, iterations 0
    again.set_weights(model.get_weights())
    fit(again, path, epochs=4, initial_epoch=2, every_n_steps=4, batch_stats=True)
    with open_run(path) as run:
        assert run.steps.tolist() == [0, 4, 6, 8, 12, 16, 18, 20, 24]
        np.testing.assert_allclose(run.epochs, [0, 4 / 6, 1, 8 / 6, 2, 16 / 6, 3, 20 / 6, 4])
        assert run.batch_steps.tolist() == list(range(24))
    rewound = sequential()
    rewound.set_weights(model.get_weights())
    fit(rewound, path, epochs=2, initial_epoch=1, batch_stats=True)  # epochs 2 to 4 are replaced
    with open_run(path) as run:
        assert run.steps.tolist() == [0, 4, 6, 12]
        np.testing.assert_allclose(run.epochs, [0, 4 / 6, 1, 2])
        assert run.batch_steps.tolist() == list(range(12))


def check_step_count(folder: Path, accumulate: bool, mixed: bool) -> None:
    """Steps with `gradient_accumulation_steps=2` (6 batches of 16 an epoch, 3 updates) or without,
    in float32 or under mixed precision (whose loss scaling skips the first steps, their
    gradients too large for float16), through two fits with one callback."""
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = data()
    model = residual()
    optimizer = keras.optimizers.SGD(0.05, gradient_accumulation_steps=2 if accumulate else None)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == mixed
    path = folder / "steps.h5"
    callback = ICSCallback(path, probe=(x[:32], y[:32]), every_n_steps=4, batch_stats=True)
    model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, callbacks=[callback])
    with open_run(path) as run:
        assert run.steps.tolist() == [0, 4, 6, 8, 12], run.steps
        np.testing.assert_allclose(run.epochs, [0, 4 / 6, 1, 8 / 6, 2])
        assert run.batch_steps.tolist() == list(range(12)), run.batch_steps
        np.testing.assert_allclose(run.batch_epochs, np.arange(12) / 6)
        # The last capture measured the weights fit left.
        stem = keras.Model(model.inputs, model.get_layer("stem").output)
        stem = keras.ops.convert_to_numpy(stem(x[:32])).astype("float32")
        np.testing.assert_allclose(
            run.activations("stem").mean[-1], stem.mean(), rtol=1e-3 if mixed else 1e-5, atol=1e-7
        )
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=[callback])
    with open_run(path) as run:  # the second fit goes on from step 12
        assert run.steps.tolist() == [0, 4, 6, 8, 12, 16, 18], run.steps
        assert run.capture_kinds[-3:] == ["epoch", "step", "epoch"], run.capture_kinds
        assert run.batch_steps.tolist() == list(range(18)), run.batch_steps


@pytest.mark.parametrize(
    ("backend", "accumulate", "mixed"),
    [
        ("tensorflow", True, False),
        ("jax", True, False),
        pytest.param("torch", True, False, marks=TORCH.marks),
        ("tensorflow", True, True),
        ("jax", True, True),
        ("jax", False, True),
    ],
)
def test_steps_are_the_training_batches_under_accumulation_and_mixed_precision(
    backend: str, accumulate: bool, mixed: bool, tmp_path: Path
) -> None:
    """Keras's `optimizer.iterations` counts updates under gradient accumulation (one per 2
    batches here): on JAX and torch two captures a step apart were numbered alike (steps 0, 4,
    4, 8, 8) and the per-step rows of one batch in two were lost. On JAX mixed precision's
    optimizer does not count the steps its loss scaling skips: a second fit with the callback
    went back (steps 12, 12, 16, 17; per-step rows 11 to 16 after 0 to 11). Steps are the batches
    trained, as Keras's progress bar counts them, on every backend."""
    script = f"""
        from pathlib import Path
        from test_callback import check_step_count
        check_step_count(Path({str(tmp_path)!r}), accumulate={accumulate}, mixed={mixed})
        print("STEPS OK")
    """
    run_script(textwrap.dedent(script), backend, marker="STEPS OK")


def test_a_resume_after_an_epoch_whose_metrics_never_reached_the_file_says_so(tmp_path) -> None:
    # BackupAndRestore saves at the epoch's end; a process killed just then had not written the
    # epoch's metrics row yet, and the resumed fit starts after that epoch.
    path = tmp_path / "gap.h5"
    model = sequential()
    fit(model, path, epochs=3)
    with h5py.File(path, "a") as f:  # as the kill left it: epoch 3's row never written
        for name in ("history/values", "history/epoch"):
            f[name].resize(2, axis=0)
    with pytest.warns(CaptureWarning, match=r"no metrics for epoch 3 \(as Keras counts.*from epoch 4"):
        fit(model, path, epochs=4, initial_epoch=3)
    with open_run(path) as run:
        np.testing.assert_array_equal(run.history_epochs, [0, 1, 3])
        np.testing.assert_allclose(run.epochs, [0, 1, 2, 3, 4])


def test_second_fit_with_the_same_callback_continues_the_run(tmp_path) -> None:
    path = tmp_path / "again.h5"
    x, y = data()
    model = sequential()
    cb = ICSCallback(path, probe=(x[:16], y[:16]))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    with open_run(path) as run:
        np.testing.assert_array_equal(run.history_epochs, [0, 1, 2])
        np.testing.assert_array_equal(run.steps, [0, 6, 12, 18])


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_same_callback_again_continues_its_run_and_counts_epochs_once(tmp_path, overwrite) -> None:
    """overwrite=True replaces a file found before the first fit, never the callback's own run;
    an initial_epoch is counted from the run's start, fit() again from 0 continues it."""
    path = tmp_path / "again.h5"
    path.write_bytes(b"an older file")
    x, y = data()
    model = sequential()
    cb = ICSCallback(path, probe=(x[:16], y[:16]), overwrite=True)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    cb.overwrite = overwrite  # either way: the run is the callback's own now
    model.fit(x, y, epochs=4, initial_epoch=2, batch_size=16, verbose=0, callbacks=[cb])
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    with open_run(path) as run:
        np.testing.assert_array_equal(run.history_epochs, [0, 1, 2, 3, 4])
        np.testing.assert_allclose(run.epochs, [0, 1, 2, 3, 4, 5])
        np.testing.assert_array_equal(run.steps, [0, 6, 12, 18, 24, 30])


class CtrlC(keras.callbacks.Callback):
    """A user's Ctrl-C after the fourth training step (after ICSCallback's hooks for it: on
    JAX and torch, a step capture is taken as the next step begins)."""

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 4:
            raise KeyboardInterrupt


def test_fit_again_after_an_interrupted_fit_continues_the_run(tmp_path) -> None:
    """Ctrl-C in a notebook: Keras skips on_train_end, so the file was still open, and the next
    fit with the same callback found its own run "in use by another training process"."""
    path = tmp_path / "notebook.h5"
    x, y = data()
    model = sequential()
    cb = ICSCallback(path, probe=(x[:16], y[:16]), every_n_steps=2)

    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[cb, CtrlC()])
    with open_run(path) as run:
        assert run.status == "training"  # open until the callback closes it
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
    with open_run(path) as run:
        assert run.status == "complete"
        np.testing.assert_array_equal(run.history_epochs, [0, 1])
        assert run.steps[0] == 0 and run.steps[-1] == 4 + 12 and np.all(np.diff(run.steps) > 0)
        assert np.isfinite(run.activations("d1").mean).all()


def test_close_finishes_an_interrupted_fit(tmp_path) -> None:
    path = tmp_path / "notebook.h5"
    x, y = data()
    cb = ICSCallback(path, probe=(x[:16], y[:16]), every_n_steps=2)

    with pytest.raises(KeyboardInterrupt):
        sequential().fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[cb, CtrlC()])
    cb.close()
    cb.close()  # nothing open: nothing happens
    with open_run(path) as run:
        assert run.status == "interrupted"
        np.testing.assert_array_equal(run.steps, [0, 2, 4])  # the waiting step captures are written


def test_a_run_file_removed_while_open_is_a_warning_at_the_end_and_at_exit(tmp_path) -> None:
    """The file went away under an open run (a temporary folder cleaned, a user's `rm`): closing
    it at the end of training, or at the interpreter's exit for a fit that ended in an
    exception, says so in one warning instead of a traceback."""
    x, y = data()

    class Remove(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                (tmp_path / "ends.h5").unlink()

    ends = ICSCallback(tmp_path / "ends.h5", probe=(x[:16], y[:16]))
    with pytest.warns(CaptureWarning, match=r"ends\.h5 was removed or renamed while the run was written"):
        history = sequential().fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[ends, Remove()])
    assert len(history.history["loss"]) == 2  # training finished

    crashed = ICSCallback(tmp_path / "crashed.h5", probe=(x[:16], y[:16]), every_n_steps=2)
    with pytest.raises(KeyboardInterrupt):
        sequential().fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[crashed, CtrlC()])
    (tmp_path / "crashed.h5").unlink()
    with pytest.warns(
        CaptureWarning, match=r"closing the run file .*crashed\.h5 failed .*removed or renamed"
    ):
        crashed._finalizer()  # what the interpreter's exit runs for an open run
    assert not crashed._finalizer.alive


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_new_callback_closes_the_file_an_interrupted_fit_left_open(tmp_path, overwrite) -> None:
    """The notebook cell ran again after Ctrl-C: its new callback cannot reach the old one, which
    still held the file. The old run is finished as close() would, then the usual rules apply."""
    path = tmp_path / "notebook.h5"
    x, y = data()
    old = ICSCallback(path, probe=(x[:16], y[:16]), every_n_steps=2)
    with pytest.raises(KeyboardInterrupt):
        sequential().fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[old, CtrlC()])

    again = ICSCallback(path, probe=(x[:16], y[:16]), overwrite=overwrite)
    with pytest.warns(CaptureWarning, match=r"still open for writing by an earlier ICSCallback .*Ctrl-C"):
        if overwrite:
            sequential().fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[again])
        else:
            with pytest.raises(RunExistsError):
                sequential().fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[again])
    with open_run(path) as run:
        if overwrite:
            assert run.status == "complete"
            np.testing.assert_array_equal(run.steps, [0, 6])
        else:
            assert run.status == "interrupted"
            np.testing.assert_array_equal(run.steps, [0, 2, 4])
    old.close()  # already closed: nothing happens


def test_a_run_closed_after_a_change_of_directory_leaves_nothing_to_close_again(
    tmp_path, monkeypatch
) -> None:
    """A relative path resolves anew after `cd`: the run is forgotten under the name it was opened
    with, so a later callback on it finds nothing left open and says nothing."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    x, y = data()
    cb = ICSCallback("notebook.h5", probe=(x[:16], y[:16]), every_n_steps=2)
    with pytest.raises(KeyboardInterrupt):
        sequential().fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[cb, CtrlC()])
    monkeypatch.chdir(tmp_path / "elsewhere")
    cb.close()
    monkeypatch.chdir(tmp_path)
    again = ICSCallback("notebook.h5", probe=(x[:16], y[:16]), overwrite=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sequential().fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[again])
    assert not [w for w in caught if "still open for writing" in str(w.message)]
    with open_run(tmp_path / "notebook.h5") as run:
        assert run.status == "complete"


def test_a_fit_still_running_on_another_thread_keeps_its_file(tmp_path) -> None:
    path = tmp_path / "busy.h5"
    x, y = data()
    running, release = threading.Event(), threading.Event()

    class Hold(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                running.set()
                release.wait(60)

    first = ICSCallback(path, probe=(x[:16], y[:16]))
    worker = threading.Thread(
        target=lambda: sequential().fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[first, Hold()])
    )
    worker.start()
    try:
        assert running.wait(120)
        second = ICSCallback(path, probe=(x[:16], y[:16]), overwrite=True)
        with pytest.raises(RunInUseError, match=r"open for writing in this process .*still running"):
            sequential().fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[second])
    finally:
        release.set()
        worker.join(120)
    with open_run(path) as run:
        assert run.status == "complete" and run.num_captures == 2


def test_the_same_callback_on_another_model_is_refused_and_its_run_kept(tmp_path) -> None:
    path = tmp_path / "one.h5"
    x, y = data()
    cb = ICSCallback(path, probe=(x[:16], y[:16]), overwrite=True)
    sequential().fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    with pytest.raises(IncompatibleRunError, match=r"ICSCallback of its own, with another path"):
        residual().fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[cb])
    with open_run(path) as run:
        assert run.attrs["model_name"] == "seq" and run.num_captures == 2 and run.status == "complete"


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="at lr 1e12 JAX's and torch's softmax crossentropy saturate to a finite loss instead of NaN",
)
def test_diverging_run_counts_nonfinite_values_and_keeps_training(tmp_path) -> None:
    path = tmp_path / "nan.h5"
    model = sequential()
    model.compile(keras.optimizers.SGD(1e12), "sparse_categorical_crossentropy")
    x, y = data()
    history, _ = fit(model, path, epochs=3)
    assert len(history.history["loss"]) == 3
    with open_run(path) as run:
        out = run.activations("out:preact")
        assert out.nonfinite[-1] > 0
        assert out.counts[-1].sum() == 32 * 3 - out.nonfinite[-1]


@pytest.mark.parametrize(("every", "per_call"), [(2, 1), (5, 1), (2, 3)])
def test_a_dataset_of_unknown_length_records_what_one_of_known_length_does(tmp_path, every, per_call) -> None:
    """A tf.data pipeline with a filter has no length Keras knows (`fit` says steps=None): each
    epoch's step captures and per-step rows get their place in it once it ends, and a step
    capture at its last step stands as its end, as with the same data of known length. With
    steps_per_execution=3 Keras numbers such an epoch's last call as if it ran 3 steps (6 of 5):
    the steps are counted as the optimizer counts them."""
    tf = pytest.importorskip("tensorflow")
    if per_call > 1 and keras.backend.backend() == "torch":
        pytest.skip("Keras's torch backend has no steps_per_execution")
    x, y = data(n=80)  # 5 steps of 16
    known = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    unknown = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True).batch(16)
    assert int(unknown.cardinality()) == int(tf.data.UNKNOWN_CARDINALITY)
    runs = {}
    for name, dataset in (("known", known), ("unknown", unknown)):
        path = tmp_path / f"{name}.h5"
        model = residual()  # no dropout: Keras draws its masks differently from a dataset of unknown length
        model.compile(
            keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy", steps_per_execution=per_call
        )
        model.fit(
            dataset, epochs=3, verbose=0,
            callbacks=[ICSCallback(path, probe=(x[:32], y[:32]), every_n_steps=every, batch_stats=True)],
        )  # fmt: skip
        runs[name] = open_run(path)
    with runs["known"] as known_run, runs["unknown"] as unknown_run:
        assert unknown_run.steps.tolist() == known_run.steps.tolist()
        np.testing.assert_allclose(unknown_run.epochs, known_run.epochs)
        assert unknown_run.epochs.tolist() == [s / 5 for s in known_run.steps.tolist()]
        assert unknown_run.capture_kinds == known_run.capture_kinds
        assert unknown_run.steps[-1] == 15
        if per_call == 1:
            expected = [0, 2, 4, 5, 6, 8, 10, 12, 14, 15] if every == 2 else [0, 5, 10, 15]
            assert unknown_run.steps.tolist() == expected
            np.testing.assert_allclose(unknown_run.batch_epochs, np.arange(15) / 5)
        assert unknown_run.batch_steps.tolist() == known_run.batch_steps.tolist()
        np.testing.assert_allclose(unknown_run.batch_epochs, known_run.batch_epochs)
        np.testing.assert_allclose(
            unknown_run.activations("stem").mean, known_run.activations("stem").mean, rtol=1e-6
        )


def stateful_rnn():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 3), batch_size=8)
    h = keras.layers.LSTM(4, stateful=True, name="lstm")(inputs)
    return compiled(keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(h)))


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras's stateful LSTM does not train on torch (its states are updated in place)",
)
def test_a_stateful_rnn_is_measured_from_zero_states_and_its_training_states_left_alone(tmp_path) -> None:
    x, y = data(n=48, shape=(5, 3))
    plain = stateful_rnn()
    expected_losses = plain.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0).history["loss"]
    model = stateful_rnn()
    path = tmp_path / "stateful.h5"
    # Its states hold batches of 8: a probe of 16 is cut to its first 8, with one warning.
    with pytest.warns(
        CaptureWarning, match="whose states hold batches of 8 samples: the first 8 of the probe's 16"
    ):
        history = model.fit(
            x, y, epochs=2, batch_size=8, shuffle=False, verbose=0,
            callbacks=[ICSCallback(path, probe=(x[:16], y[:16]), every_n_steps=4)],
        )  # fmt: skip
    assert history.history["loss"] == expected_losses
    states = [keras.ops.convert_to_numpy(v) for v in model.get_layer("lstm").states]
    for state, plain_state in zip(
        states, [keras.ops.convert_to_numpy(v) for v in plain.get_layer("lstm").states]
    ):
        np.testing.assert_array_equal(state, plain_state)  # the captures left training's states alone
    if keras.backend.backend() == "tensorflow":  # Keras's JAX trainer keeps them at zero in fit
        assert all(np.abs(s).max() > 0.01 for s in states)
    # Every capture starts from zero states: the last one is the trained LSTM on the probe's first
    # 8 samples as the start of a sequence, not carried on from the last training batch.
    model.get_layer("lstm").reset_states()
    lstm = keras.ops.convert_to_numpy(keras.Model(model.inputs, model.get_layer("lstm").output)(x[:8]))
    with open_run(path) as run:
        assert run.config["probe_size"] == 8
        out = run.activations("lstm")
        np.testing.assert_allclose([out.mean[-1], out.std[-1]], [lstm.mean(), lstm.std()], rtol=1e-5)
        assert run.gradients("lstm/lstm_cell/kernel").grad_norm[-1] > 0
    # A probe smaller than the batch cannot run: captures are off, with the fix; training goes on.
    with pytest.warns(CaptureWarning, match=r"and the probe has 4: pass a probe of exactly 8 samples"):
        stateful_rnn().fit(
            x,
            y,
            epochs=1,
            batch_size=8,
            verbose=0,
            callbacks=[ICSCallback(tmp_path / "small.h5", probe=(x[:4], y[:4]))],
        )
    assert not (tmp_path / "small.h5").exists()


def test_a_failure_inside_capture_warns_and_training_goes_on(tmp_path, monkeypatch) -> None:
    from icsviz.capture.program import CaptureProgram

    original = CaptureProgram.measure

    def flaky(self, *args, **kwargs):
        # The first epoch's capture fails (on JAX the start's goes through measure_in_background).
        if kwargs["kind"] == "epoch":
            raise RuntimeError("simulated capture bug")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CaptureProgram, "measure", flaky)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history, _ = fit(sequential(), tmp_path / "flaky.h5", epochs=3)
    messages = [str(w.message) for w in record if issubclass(w.category, CaptureWarning)]
    assert len(messages) == 1 and "simulated capture bug" in messages[0]
    assert len(history.history["loss"]) == 3
    with open_run(tmp_path / "flaky.h5") as run:
        assert run.num_captures == 1  # the start; later captures are off
        assert len(run.history_epochs) == 3  # metrics are still recorded


def _run_script(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's retracing warning")
def test_a_sweep_of_models_in_one_process_logs_no_retracing_warning(tmp_path) -> None:
    """Each capture program traces once; TensorFlow counted those traces across programs and
    warned about "excessive retracing" of icsviz's function from the sixth model on."""
    proc = _run_script(
        f"""
        import numpy as np, keras
        from icsviz import ICSCallback
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 12)).astype("float32"); y = rng.integers(0, 3, 64)
        for i in range(8):
            model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8 + i, activation="relu"),
                                      keras.layers.Dense(3, activation="softmax")])
            model.compile("sgd", "sparse_categorical_crossentropy")
            callback = ICSCallback({str(tmp_path)!r} + f"/sweep{{i}}.h5", probe=(x, y))
            model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "retracing" not in proc.stderr, proc.stderr[-2000:]
    for i in range(8):
        with open_run(tmp_path / f"sweep{i}.h5") as run:
            assert run.num_captures == 3
            assert run.activations(run.layer_names[0]).unit_mean.shape == (3, 8 + i)


def test_mirrored_strategy_on_two_logical_cpus(tmp_path) -> None:
    path = tmp_path / "mirrored.h5"
    proc = _run_script(f"""
        import numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from icsviz import ICSCallback, open_run
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        with strategy.scope():
            model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="h"),
                                      keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(3, name="out")])
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 6)).astype("float32"); y = rng.integers(0, 3, 64)
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[ICSCallback({str(path)!r}, probe=(x[:16], y[:16]))])
        run = open_run({str(path)!r})
        print("CAPTURES", run.num_captures, "LAYERS", ",".join(run.layer_names),
              "GRAD", bool(np.isfinite(run.gradients("h").grad_norm).all()))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CAPTURES 3 LAYERS h:preact,h,bn,out GRAD True" in proc.stdout


def test_sigkill_mid_training_leaves_every_flushed_capture(tmp_path) -> None:
    """Train in a subprocess, kill -9 it mid-training, and read what it wrote."""
    path = tmp_path / "killed.h5"
    marker = tmp_path / "captures.txt"
    script = f"""
        import numpy as np, keras
        from icsviz import ICSCallback
        class Report(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                # after ICSCallback's own hooks, which queued the capture of the step before
                # (TensorFlow's in its batch-end hook, JAX's and torch's as this step begins);
                # flush() waits until it is written: from here on it is committed
                ics.flush()
                with open({str(marker)!r}, "a") as f:
                    f.write(f"{{int(self.model.optimizer.iterations.numpy())}}\\n")
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(3, activation="softmax")])
        model.compile("sgd", "sparse_categorical_crossentropy")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(640, 6)).astype("float32"); y = rng.integers(0, 3, 640)
        ics = ICSCallback({str(path)!r}, probe=(x[:64], y[:64]), every_n_steps=3)
        model.fit(x, y, epochs=1000, batch_size=32, verbose=0, callbacks=[ics, Report()])
    """
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if marker.exists() and len(marker.read_text().split()) >= 50:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.kill()  # SIGKILL: no handler, no atexit, no flush
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -9
    last_reported = int(marker.read_text().split()[-1])
    with open_run(path) as run:
        assert run.status == "training"  # it never closed
        steps = run.steps
        # Every capture committed before the last step count it reported is there, in order:
        # every 3rd step except an epoch's last step (640 / 32 = 20 steps an epoch), where the
        # epoch capture replaces it.
        step_captures = {s for s in range(3, last_reported + 1, 3) if s % 20}
        expected = sorted({0} | step_captures | set(range(20, last_reported + 1, 20)))
        assert list(steps[: len(expected)]) == expected
        acts = run.activations(run.layer_names[0])
        assert acts.counts.shape[0] == len(steps) and (acts.counts.sum(1) > 0).all()
        assert len(run.history_epochs) >= 1


def test_a_full_disk_gives_one_warning_training_finishes_and_committed_captures_stay(tmp_path) -> None:
    """RLIMIT_FSIZE stands in for a full disk: after epoch 2 the file may grow by 20 kB only."""
    path = tmp_path / "full.h5"
    script = f"""
        import os, resource, signal, warnings
        import numpy as np, keras
        from icsviz import ICSCallback
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of killing us
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(256, 8)).astype("float32"); y = rng.integers(0, 3, 256)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(3, activation="softmax")])
        model.compile("adam", "sparse_categorical_crossentropy")
        committed = []
        class FillTheDisk(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == 1:
                    committed.append(capture._writer.num_captures)
                    limit = os.path.getsize({str(path)!r}) + 20_000
                    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        capture = ICSCallback({str(path)!r}, probe=(x[:64], y[:64]), every_n_steps=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history = model.fit(x, y, epochs=8, batch_size=16, verbose=0, callbacks=[capture, FillTheDisk()])
        ours = [str(w.message) for w in caught if "icsviz" in str(w.message)]
        print("EPOCHS", len(history.history["loss"]), "COMMITTED", committed[0], "WARNINGS", len(ours))
        print("MESSAGE", ours[0] if ours else "")
    """
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=300
    )
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert proc.returncode == 0, proc.stderr[-2000:]  # HDF5 used to crash at exit after the failed write
    assert "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
    epochs, committed, warned = (
        out["EPOCHS"].split()[0],
        int(out["EPOCHS"].split()[2]),
        out["EPOCHS"].split()[4],
    )
    assert epochs == "8" and warned == "1", proc.stdout
    assert "nothing more is written" in out["MESSAGE"] and str(path) in out["MESSAGE"]
    with open_run(path) as run:  # the file opens, with at least what was committed before the disk filled
        assert run.num_captures >= committed >= 2
        steps = run.steps
        assert steps[0] == 0 and np.all(np.diff(steps) > 0)
        assert np.isfinite(run.activations(run.layer_names[0]).mean).all()


def test_a_second_training_on_a_file_in_use_is_refused_and_the_first_is_unharmed(tmp_path) -> None:
    from icsviz import RunInUseError

    path = tmp_path / "shared.h5"
    x, y = data()
    first_model, second_model = compiled(sequential()), compiled(sequential())

    class SecondTraining(keras.callbacks.Callback):
        """Starts a second fit on the same file while the first one is writing it."""

        refused: Exception | None = None

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                try:
                    second_model.fit(
                        x,
                        y,
                        epochs=1,
                        verbose=0,
                        callbacks=[ICSCallback(path, probe=(x[:16], y[:16]), overwrite=True)],
                    )
                except RunInUseError as exc:
                    SecondTraining.refused = exc

    first_model.fit(
        x,
        y,
        epochs=3,
        verbose=0,
        callbacks=[ICSCallback(path, probe=(x[:16], y[:16])), SecondTraining()],
    )
    assert SecondTraining.refused is not None and str(path) in str(SecondTraining.refused)
    with open_run(path) as run:
        assert run.status == "complete" and run.epochs.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert len(run.history["loss"]) == 3


def test_captures_are_written_on_the_writer_thread_and_all_are_in_the_file(tmp_path, monkeypatch) -> None:
    from icsviz.store.writer import RunWriter

    threads: list[str] = []
    original = RunWriter.write_captures

    def slow_write(self, captures):
        threads.append(threading.current_thread().name)
        time.sleep(0.05)  # a slow disk: training does not wait for it
        original(self, captures)

    monkeypatch.setattr(RunWriter, "write_captures", slow_write)
    path = tmp_path / "threaded.h5"
    x, y = data()
    model = compiled(sequential())
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[ICSCallback(path, probe=(x[:32], y[:32]))])
    assert threads and all(name.startswith("icsviz-writer") for name in threads)
    with open_run(path) as run:  # on_train_end waited for every queued capture
        assert run.num_captures == len(threads) == 4 and run.status == "complete"


def crash_fit(path, hook: str, at: int, epochs: int, **options) -> None:
    """A fit whose user callback raises in `hook` (after ICSCallback's) when its index is `at`;
    then the ICSCallback is dropped, so its finalizer writes what waits and closes the file."""
    import gc

    x, y = data()

    def crash(index, logs=None):
        if index == at:
            raise RuntimeError("the user's training crashed")

    ics = ICSCallback(path, probe=(x[:32], y[:32]), **options)
    with pytest.raises(RuntimeError, match="crashed"):
        sequential().fit(
            x,
            y,
            epochs=epochs,
            batch_size=16,
            verbose=0,
            callbacks=[ics, keras.callbacks.LambdaCallback(**{hook: crash})],
        )
    del ics
    gc.collect()


def test_a_crash_in_training_leaves_every_capture_taken_before_it(tmp_path) -> None:
    path = tmp_path / "crashed.h5"
    crash_fit(path, "on_epoch_end", 1, epochs=5)  # after ICSCallback queued the capture of epoch 2
    with open_run(path) as run:
        assert list(run.epochs) == [0.0, 1.0, 2.0] and run.status == "interrupted"


def test_frequent_step_captures_are_written_together_with_the_same_values(tmp_path, monkeypatch) -> None:
    from icsviz.capture import callback
    from icsviz.store.writer import RunWriter

    sizes: list[int] = []
    original = RunWriter.write_captures

    def recording(self, captures):
        sizes.append(len(captures))
        original(self, captures)

    monkeypatch.setattr(RunWriter, "write_captures", recording)
    monkeypatch.setattr(callback, "_FLUSH_SECONDS", 0.0)  # each capture written on its own
    fit(sequential(), tmp_path / "alone.h5", epochs=2, every_n_steps=1)
    assert sizes == [1] * 13  # step 0, 5 step captures and the epoch's, twice (6 steps an epoch)
    sizes.clear()
    monkeypatch.setattr(callback, "_FLUSH_SECONDS", 1e9)  # steps far faster than the clock
    monkeypatch.setattr(callback, "_CAPTURES_PER_WRITE", 4)
    fit(sequential(), tmp_path / "together.h5", epochs=2, every_n_steps=1)
    # Four step captures at a time; the epoch capture takes the rest with it.
    assert sizes == [1, 4, 2, 4, 2]
    with open_run(tmp_path / "alone.h5") as alone, open_run(tmp_path / "together.h5") as together:
        np.testing.assert_array_equal(together.steps, alone.steps)
        assert together.capture_kinds == alone.capture_kinds and together.capture_kinds.count("step") == 10
        np.testing.assert_array_equal(together.epochs, alone.epochs)
        for name in alone.layer_names:
            a, b = alone.activations(name), together.activations(name)
            np.testing.assert_array_equal(b.counts, a.counts)
            np.testing.assert_array_equal(b.quantiles, a.quantiles)
            np.testing.assert_array_equal(b.unit_quantiles, a.unit_quantiles)
        np.testing.assert_array_equal(together.gradients("d1").grad_norm, alone.gradients("d1").grad_norm)


def test_a_crash_leaves_the_step_captures_still_waiting_to_be_written(tmp_path, monkeypatch) -> None:
    from icsviz.capture import callback

    monkeypatch.setattr(callback, "_FLUSH_SECONDS", 1e9)  # every step capture waits for the epoch's
    path = tmp_path / "crashed.h5"
    crash_fit(path, "on_train_batch_end", 3, epochs=2, every_n_steps=1)  # after the fourth step
    # TensorFlow captures step 4 in its batch-end hook, before the crash; JAX and torch as the
    # next step begins, which never comes.
    expected = [0, 1, 2, 3, 4] if keras.backend.backend() == "tensorflow" else [0, 1, 2, 3]
    with open_run(path) as run:
        assert list(run.steps) == expected and run.status == "interrupted"
        assert np.isfinite(run.activations("d1").mean).all()


def test_the_quantiles_of_captures_are_computed_on_the_writers_thread(tmp_path, monkeypatch) -> None:
    from icsviz.capture import program

    threads: list[str] = []
    original = program.split

    def recording_split(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(program, "split", recording_split)
    fit(sequential(), tmp_path / "threads.h5", epochs=3)
    # The step-0 capture and each epoch's: their quantiles on the writer's thread, with the write.
    assert len(threads) == 4 and all(name.startswith("icsviz-writer") for name in threads), threads
    with open_run(tmp_path / "threads.h5") as run:
        quantiles = run.activations(run.layer_names[0]).quantiles
        assert quantiles.shape[0] == 4 and np.all(np.isfinite(quantiles))
        assert np.all(np.diff(quantiles, axis=1) >= 0)  # sorted levels give ordered quantiles


@pytest.mark.parametrize("backend", ["tensorflow", TORCH])  # a GAN's step is written per backend
def test_a_gans_generator_is_recorded_as_its_training_moves_it(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "generator.h5"
    script = textwrap.dedent(f"""
        import warnings, keras, numpy as np
        from model_zoo import LATENT, gan
        from icsviz import CaptureWarning, ICSCallback, open_run
        from icsviz.cli import info
        model = gan()
        real = np.random.default_rng(0).random((64, 4, 4, 1)).astype("float32")
        z = np.random.default_rng(1).normal(size=(16, LATENT)).astype("float32")
        generator = model.generator
        before = keras.Model(generator.inputs, generator.get_layer("g_relu").output)(z, training=True)
        before = keras.ops.convert_to_numpy(before)
        callback = ICSCallback({str(path)!r}, probe=z, submodel=generator, every_n_steps=2, batch_stats=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(real, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
        ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
        # Latent vectors have no labels: the activations and weights are what a generator's run holds.
        assert ours == [
            "icsviz: the probe has no labels, so gradient statistics are skipped; pass probe=(x, y) "
            "to record them."
        ], ours
        with open_run({str(path)!r}) as run:
            assert run.layer_names == ["g_fc", "g_bn", "g_relu", "g_out:preact", "g_out"]
            assert (run.attrs["model_name"], run.config["trained_model"]) == ("generator", "gan")
            # Not the idle RMSprop of super().compile(): the GAN steps optimizers of its own.
            assert run.config["optimizer"] is None and np.isnan(run.history["learning_rate"]).all()
            # The GAN's own optimizer (super().compile()'s) never steps: the callback counts (on
            # torch every step was numbered 0 from the second epoch on).
            assert run.steps.tolist() == [0, 2, 4, 6, 8], run.steps
            relu = run.activations("g_relu")
            np.testing.assert_allclose(
                [relu.mean[0], relu.std[0]], [before.mean(), before.std()], rtol=2e-4, atol=1e-6
            )
            # The generator's own weights, moved by the GAN's g_optimizer.
            assert run.variable_names[0] == "generator/g_fc/kernel"
            assert np.all(run.gradients(run.variable_names[0]).update_ratio[1:] > 0)
            # Its layers on every training batch, measured inside the GAN's step.
            assert run.batch_layer_names == run.layer_names and run.batch_steps.tolist() == list(range(8))
        assert "  model      generator  (181 parameters, inside gan)" in info({str(path)!r}).splitlines()
        # A second fit goes on from the last step (on TensorFlow it started again at 0).
        model.fit(real, epochs=1, batch_size=16, verbose=0, callbacks=[callback])
        with open_run({str(path)!r}) as run:
            assert run.steps.tolist() == [0, 2, 4, 6, 8, 10, 12], run.steps
            assert run.batch_steps.tolist() == list(range(12)), run.batch_steps
        print("GAN OK")
    """)
    run_script(script, backend, marker="GAN OK")


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed (pip install torch==2.13.0)"
)
def test_a_torch_module_inside_the_model_is_measured_and_left_as_it_was(tmp_path: Path) -> None:
    """`TorchModuleWrapper`: the module reads its own parameters, past Keras's StatelessScope, so
    the gradients taken of copies came out 0; and a capture's pass in training mode moved its
    BatchNorm's running statistics, which Keras does not track as variables."""
    script = textwrap.dedent(f"""
        import keras, numpy as np, torch
        from icsviz import ICSCallback, open_run
        rng = np.random.default_rng(0)
        x = rng.normal(size=(96, 6)).astype("float32")
        y = (x[:, 0] > 0).astype("int64")

        def build():
            keras.utils.set_random_seed(0)
            module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
            inputs = keras.Input((6,))
            h = keras.layers.TorchModuleWrapper(module, name="t", output_shape=(None, 8))(inputs)
            model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(h))
            model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
            return model, module

        plain, plain_module = build()
        expected = plain.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0).history["loss"]
        model, module = build()
        probe = (x[:32] * 3 + 1, y[:32])  # far from the training data: running statistics would show it
        path = {str(tmp_path / "torch_module.h5")!r}
        history = model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0,
                            callbacks=[ICSCallback(path, probe=probe, every_n_steps=2)])
        np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-6)
        bn, plain_bn = module[1], plain_module[1]
        np.testing.assert_allclose(bn.running_mean.numpy(), plain_bn.running_mean.numpy(), rtol=1e-6)
        np.testing.assert_allclose(bn.running_var.numpy(), plain_bn.running_var.numpy(), rtol=1e-6)
        assert int(bn.num_batches_tracked) == 12

        # The last capture against torch's own autograd on the probe, in training mode.
        with torch.enable_grad():
            out = model(torch.tensor(probe[0]), training=True)
            loss = model.compute_loss(x=None, y=torch.tensor(probe[1]), y_pred=out)
            grads = torch.autograd.grad(loss, list(module.parameters()))
        hidden = module(torch.tensor(probe[0])).detach().numpy()
        with open_run(path) as run:
            assert run.variable_names == ["t/0.weight", "t/0.bias", "t/1.weight", "t/1.bias", "out/kernel", "out/bias"]
            assert run.steps.tolist() == [0, 2, 4, 6, 8, 10, 12], run.steps
            norms = run.gradients("t").grad_norm[-1]
            np.testing.assert_allclose(norms, [float(g.norm()) for g in grads], rtol=1e-4, atol=1e-7)
            assert norms[0] > 0.01 and norms[1] < 1e-6  # a bias before BatchNorm has no gradient
            t = run.activations("t")
            np.testing.assert_allclose([t.mean[-1], t.std[-1]], [hidden.mean(), hidden.std()], rtol=1e-5)
        print("TORCH MODULE OK")
    """)
    run_script(script, "torch", marker="TORCH MODULE OK")


def test_a_submodel_must_be_a_model_inside_the_one_fit_trains(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="submodel must be a keras.Model inside the model fit trains"):
        ICSCallback(tmp_path / "r.h5", probe=np.zeros((4, 6)), submodel=keras.layers.Dense(3))
    model = sequential()
    stranger = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2, name="other")], name="stranger")
    x, y = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[ICSCallback(tmp_path / "s.h5", probe=x[:16], submodel=stranger)],
        )
    assert (
        "icsviz: submodel 'stranger' shares no trainable weights with model 'seq', which fit trains, so its "
        "captures will not move. Pass the model inside 'seq' (one of its attributes, e.g. gan.generator)."
    ) in [str(w.message) for w in caught]
    with open_run(tmp_path / "s.h5") as run:  # recorded all the same
        assert run.layer_names == ["other"]


@pytest.mark.parametrize(
    "backend",
    [
        "tensorflow",
        pytest.param(
            "jax",
            marks=pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed"),
        ),
        pytest.param(
            "torch",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torch") is None,
                reason="torch is not installed (pip install torch==2.13.0)",
            ),
        ),
    ],
)
def test_a_nested_encoder_is_recorded_alone_on_every_backend(backend: str, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import warnings, keras, numpy as np
        from icsviz import ICSCallback, open_run
        keras.utils.set_random_seed(0)
        encoder = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(5, activation="tanh", name="enc")], name="encoder"
        )
        inputs = keras.Input((6,))
        outputs = keras.layers.Dense(3, activation="softmax", name="head")(encoder(inputs))
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
        expected = keras.ops.convert_to_numpy(encoder(x[:16]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[
                ICSCallback({str(tmp_path / "enc.h5")!r}, probe=(x[:16], y[:16]), submodel=encoder)])
        # The encoder has no loss of its own: its activations and weights are recorded.
        assert [str(w.message) for w in caught if "icsviz" in str(w.message)] == [
            "icsviz: submodel 'encoder' is not compiled, so it has no loss of its own to take gradients "
            "of: gradient statistics are skipped, its activations and weights are recorded (compile it "
            "with a loss and an optimizer to have them)."
        ]
        with open_run({str(tmp_path / "enc.h5")!r}) as run:
            assert run.layer_names == ["enc:preact", "enc"], run.layer_names
            enc = run.activations("enc")
            np.testing.assert_allclose([enc.mean[0], enc.std[0]], [expected.mean(), expected.std()], rtol=2e-4)
            assert enc.mean[-1] != enc.mean[0]  # the encoder trains inside the model
            assert run.variable_names == ["encoder/enc/kernel", "encoder/enc/bias"]
            assert run.config["optimizer"] == "SGD"  # the model's, which trains the encoder inside it
            np.testing.assert_allclose(run.history["learning_rate"], 0.1)
        # Compiled, with a loss of its own: its gradients too; and every step capture measures
        # the weights that step left (on JAX, synced back into the model first).
        encoder.compile(keras.optimizers.SGD(0.1), "mse")
        path = {str(tmp_path / "compiled.h5")!r}
        target = np.zeros((16, 5), "float32")
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[
            ICSCallback(path, probe=(x[:16], target), submodel=encoder, every_n_steps=2)])
        with open_run(path) as run:
            assert run.steps.tolist() == [8, 10, 12, 14, 16], run.steps
            means = run.activations("enc").mean
            assert len(set(np.round(means, 7).tolist())) == 5, means
            grads = run.gradients("encoder/enc/kernel").grad_norm
            assert np.isfinite(grads).all() and (grads > 0).all()
        print("SUBMODEL OK")
    """)
    run_script(script, backend, marker="SUBMODEL OK")
