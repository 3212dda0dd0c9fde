"""Per-step mode (batch_stats=True): statistics of each training batch, measured inside
the training step, equal to numpy's on the same batch, and the user's training untouched."""

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

import keras
import numpy as np
import pytest

from conftest import run_script
from icsviz import CaptureWarning, ICSCallback, open_run

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
BACKEND = keras.backend.backend()
TENSORFLOW_ONLY = pytest.mark.skipif(BACKEND != "tensorflow", reason="written with TensorFlow's own API")


def _model(mixed: bool = False) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(6, 3, activation="relu", name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(5, activation="softmax", name="out", dtype="float32" if mixed else None),
        ]
    )


def _data(n: int = 96) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 5, n)


def _probe() -> tuple[np.ndarray, np.ndarray]:
    x, y = _data()
    return x[:32], y[:32]


def _fit(
    callbacks: list, lr: float = 0.05, epochs: int = 2, **compile_args
) -> tuple[keras.Model, list[float]]:
    model = _model()
    model.compile(keras.optimizers.SGD(lr), "sparse_categorical_crossentropy", **compile_args)
    x, y = _data()
    history = model.fit(x, y, epochs=epochs, batch_size=BATCH, verbose=0, shuffle=False, callbacks=callbacks)
    return model, history.history["loss"]


def _ours(caught: list) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]


def test_rows_match_numpy_on_each_training_batch(tmp_path: Path) -> None:
    # lr 0: the weights never move, so each step's layer output is the sub-model on that batch.
    path = tmp_path / "steps.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = _fit([ICSCallback(path, probe=_probe(), batch_stats=True, flush_every=4)], lr=0.0)
    assert not _ours(caught)
    x, _ = _data()
    with open_run(path) as run:
        assert run.has_batch_stats
        np.testing.assert_array_equal(run.batch_steps, np.arange(12))
        np.testing.assert_allclose(run.batch_epochs, np.arange(12) / 6)
        assert run.batch_layer_names == run.layer_names  # every captured layer, per step too
        for name in ("conv:preact", "conv", "bn"):
            acts = run.batch_activations(name)
            for step in (0, 5, 7):
                layer = model.get_layer(name.split(":")[0])
                sub = keras.Model(model.inputs, layer.output)
                batch = x[(step % 6) * BATCH : (step % 6 + 1) * BATCH]
                values = keras.ops.convert_to_numpy(sub(batch, training=True))
                if name.endswith(":preact"):  # the Dense/Conv output before relu
                    w, b = layer.get_weights()
                    values = np.asarray(keras.ops.conv(batch, w)) + b
                flat = values.ravel()
                # A 4096-value sample of a ~3500-value tensor: moments and quantiles close to exact.
                assert acts.counts[step].sum() == 4096 and acts.nonfinite[step] == 0
                assert flat.min() <= acts.min[step] and acts.max[step] <= flat.max()
                assert acts.edges[step][0] <= acts.min[step] and acts.max[step] <= acts.edges[step][-1]
                assert abs(acts.mean[step] - flat.mean()) < 0.05 * flat.std()
                assert abs(acts.std[step] - flat.std()) < 0.05 * flat.std()
                for level in (0.15, 0.5, 0.85):
                    value = acts.quantile(level)[step]  # ranks with ties (ReLU zeros) are a range
                    below, at_most = np.mean(flat < value), np.mean(flat <= value)
                    assert below - 0.03 < level < at_most + 0.03, (name, step, level, below, at_most)
                if name == "conv":
                    assert abs(acts.zero_frac[step] - np.mean(flat == 0)) < 0.03
                units = acts.tracked_units
                for i, unit in enumerate(units):
                    column = values[..., unit].ravel()
                    median = acts.unit_quantiles[step, i, list(acts.q).index(0.5)]
                    assert np.mean(column < median) - 0.06 < 0.5 < np.mean(column <= median) + 0.06


def test_every_nth_step_keeps_the_rows_of_those_steps(tmp_path: Path) -> None:
    every, full = tmp_path / "every3.h5", tmp_path / "all.h5"
    _fit([ICSCallback(full, probe=_probe(), batch_stats=True, flush_every=4)], lr=0.0)
    _fit([ICSCallback(every, probe=_probe(), batch_stats=3, flush_every=4)], lr=0.0)
    with open_run(every) as kept, open_run(full) as run:
        np.testing.assert_array_equal(kept.batch_steps, [0, 3, 6, 9])
        assert kept.attrs["config"]["batch_stats_every"] == 3
        same, all_rows = kept.batch_activations("bn"), run.batch_activations("bn")
        # lr 0 and no shuffling: the kept rows are exactly those steps' rows of the full record.
        np.testing.assert_array_equal(same.counts, all_rows.counts[[0, 3, 6, 9]])
        np.testing.assert_array_equal(same.mean, all_rows.mean[[0, 3, 6, 9]])
    for bad in (-1, 2.5, "yes"):
        with pytest.raises(ValueError, match="batch_stats must be"):
            ICSCallback(tmp_path / "bad.h5", probe=_probe(), batch_stats=bad)


def test_step_rows_reach_the_host_on_the_writers_thread(tmp_path: Path, monkeypatch) -> None:
    from icsviz.capture.batch_stats import StepStatistics

    threads: list[str] = []
    original = StepStatistics.rows

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(StepStatistics, "rows", recording)
    _fit([ICSCallback(tmp_path / "t.h5", probe=_probe(), batch_stats=True, flush_every=4)], lr=0.0)
    # Two epochs of 6 steps, flushed after 4 steps and at each epoch's end (steps 0-3, 4-5, 6-9,
    # 10-11): the copies, which wait for the device, leave the training thread.
    assert len(threads) == 4 and all(name.startswith("icsviz-writer") for name in threads), threads
    with open_run(tmp_path / "t.h5") as run:
        np.testing.assert_array_equal(run.batch_steps, np.arange(12))


def test_by_default_step_rows_are_written_by_the_clock(tmp_path: Path, monkeypatch) -> None:
    from icsviz.capture import callback
    from icsviz.capture.batch_stats import StepStatistics

    sizes: list[int] = []
    original = StepStatistics.rows
    monkeypatch.setattr(
        StepStatistics, "rows", lambda self, taken: (sizes.append(len(taken)), original(self, taken))[1]
    )
    monkeypatch.setattr(callback, "_FLUSH_SECONDS", 0.0)  # a step that lasts 2 s: each step written
    _fit([ICSCallback(tmp_path / "slow.h5", probe=_probe(), batch_stats=True)], lr=0.0)
    assert sizes == [1] * 12
    sizes.clear()
    monkeypatch.setattr(callback, "_FLUSH_SECONDS", 1e9)  # fast steps: written at the step cap
    monkeypatch.setattr(callback, "_FLUSH_MAX_STEPS", 5)
    _fit([ICSCallback(tmp_path / "fast.h5", probe=_probe(), batch_stats=True)], lr=0.0)
    assert sizes == [5, 1, 5, 1]  # epochs of 6 steps: the rest at each epoch's end
    with open_run(tmp_path / "fast.h5") as fast, open_run(tmp_path / "slow.h5") as slow:
        np.testing.assert_array_equal(fast.batch_steps, np.arange(12))
        np.testing.assert_array_equal(
            fast.batch_activations("bn").counts, slow.batch_activations("bn").counts
        )
        assert fast.attrs["config"]["flush_every"] is None and fast.attrs["config"]["flush_seconds"] == 1e9


def test_a_failure_reading_step_rows_turns_the_mode_off_and_captures_go_on(
    tmp_path: Path, monkeypatch
) -> None:
    from icsviz.capture import callback

    calls = []
    original = callback.unpack

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            # Slow to fail, as a lagging writer is: later rows are queued before training hears
            # of it, and none of them is written (the rows stop at the last good one).
            time.sleep(1.0)
            raise FloatingPointError("a made-up failure of the rows' conversion")
        return original(*args, **kwargs)

    monkeypatch.setattr(callback, "unpack", failing_second)
    path = tmp_path / "f.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, loss = _fit([ICSCallback(path, probe=_probe(), batch_stats=True, flush_every=4)], epochs=3)
    ours = _ours(caught)
    assert len(ours) == 1 and "made-up failure" in ours[0] and "probe captures go on" in ours[0], ours
    assert all(np.isfinite(loss))
    with open_run(path) as run:
        np.testing.assert_array_equal(run.batch_steps, [0, 1, 2, 3])  # the first flush only
        assert len(run.epochs) == 4 and run.status == "complete"  # step 0 and every epoch's capture
    assert "icsviz_hooks" not in vars(model.train_function)  # the model has its own step back


def test_layers_are_restored_after_probe_and_step_interception(tmp_path: Path) -> None:
    model = _model()
    before = {layer.name: dict(layer.__dict__) for layer in model.layers}
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    model.fit(
        *_data(),
        epochs=1,
        batch_size=BATCH,
        verbose=0,
        callbacks=[ICSCallback(tmp_path / "r.h5", probe=_probe(), batch_stats=True)],
    )
    for layer in model.layers:
        assert layer.__dict__.get("activation") is before[layer.name].get("activation"), layer.name
        assert "call" not in layer.__dict__, layer.name


def test_training_is_untouched_losses_weights_and_saved_model(tmp_path: Path) -> None:
    plain, plain_loss = _fit([])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched, loss = _fit([ICSCallback(tmp_path / "w.h5", probe=_probe(), batch_stats=True)])
    assert not _ours(caught)
    assert loss == plain_loss  # bit for bit
    for a, b in zip(plain.get_weights(), watched.get_weights()):
        np.testing.assert_array_equal(a, b)

    def names(model: keras.Model) -> list[str]:
        return [v.path.split("/", 1)[1] for v in model.variables]  # without the model's own name

    assert names(watched) == names(plain)
    assert "train_step" not in watched.__dict__  # the hooks are gone after fit
    watched.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert len(reloaded.weights) == len(plain.weights)
    # A second fit without the callback trains as usual (Keras's own train function back).
    watched.fit(*_data(), epochs=1, batch_size=BATCH, verbose=0)


@pytest.mark.parametrize(
    "setting",
    [{"jit_compile": True}, {"steps_per_execution": 3}, {"run_eagerly": True}],
    ids=["jit_compile", "steps_per_execution", "run_eagerly"],
)
def test_compile_settings_keep_working(setting: dict, tmp_path: Path) -> None:
    if BACKEND == "torch" and "run_eagerly" not in setting:
        pytest.skip("Keras on torch refuses steps_per_execution > 1; its jit_compile warning is tested apart")
    plain, plain_loss = _fit([], **setting)
    path = tmp_path / "s.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, loss = _fit([ICSCallback(path, probe=_probe(), batch_stats=True)], **setting)
    assert not _ours(caught)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    with open_run(path) as run:
        steps = run.batch_steps
        if "steps_per_execution" in setting and BACKEND == "tensorflow":  # a row per execution: its last step
            np.testing.assert_array_equal(steps, [2, 5, 8, 11])
        else:
            np.testing.assert_array_equal(steps, np.arange(12))
        assert np.isfinite(run.batch_activations("bn").mean).all()


@TENSORFLOW_ONLY
def test_custom_train_step_and_mixed_precision(tmp_path: Path) -> None:
    import tensorflow as tf

    class Custom(keras.Sequential):
        def train_step(self, data):  # the guide's custom step
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(y=y, y_pred=y_pred)
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(grads, self.trainable_variables)
            return {"loss": loss}

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = Custom(_model(mixed=True).layers)
        model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
        path = tmp_path / "custom.h5"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(
                *_data(),
                epochs=1,
                batch_size=BATCH,
                verbose=0,
                callbacks=[ICSCallback(path, probe=_probe(), batch_stats=True)],
            )
        assert not _ours(caught)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    with open_run(path) as run:
        np.testing.assert_array_equal(run.batch_steps, np.arange(6))
        acts = run.batch_activations("conv")
        assert np.isfinite(acts.quantiles).all() and (acts.counts.sum(1) == 4096).all()


@TENSORFLOW_ONLY
def test_distribution_strategy_warns_once_and_probe_captures_go_on(tmp_path: Path) -> None:
    # Two logical CPUs must be configured before TensorFlow starts: a subprocess.
    path = tmp_path / "mirrored.h5"
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from test_batch_stats import _model, _data, _probe
        from icsviz import CaptureWarning, ICSCallback, open_run
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = _model()
            model.compile("sgd", "sparse_categorical_crossentropy")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(*_data(), epochs=1, batch_size=16, verbose=0,
                      callbacks=[ICSCallback({str(path)!r}, probe=_probe(), batch_stats=True)])
        ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
        run = open_run({str(path)!r})
        print("WARNINGS", len(ours), "|", ours[0] if ours else "")
        print("BATCHES", run.has_batch_stats, "CAPTURES", run.num_captures)
    """)
    proc = run_script(script, "tensorflow", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "WARNINGS 1 | icsviz: batch_stats=True is off for this run: training runs on 2 replicas"
        in proc.stdout
    )
    assert "BATCHES False CAPTURES 2" in proc.stdout


def test_old_files_without_batches_say_so(tmp_path: Path) -> None:
    from icsviz import MissingDataError

    path = tmp_path / "plain.h5"
    _fit([ICSCallback(path, probe=_probe())], epochs=1)
    with open_run(path) as run:
        assert not run.has_batch_stats and len(run.batch_steps) == 0
        with pytest.raises(MissingDataError, match="without batch_stats=True"):
            run.batch_activations("conv")


def test_killed_run_keeps_every_flushed_step(tmp_path: Path) -> None:
    path = tmp_path / "killed.h5"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import keras
        from test_batch_stats import _model, _data, _probe
        from icsviz import ICSCallback

        class Kill(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 4:  # after the flush at step 4 (flush_every=4), before the next
                    cb.flush()  # the rows handed to the writer's thread are in the file
                    os.kill(os.getpid(), signal.SIGKILL)

        model = _model(); model.compile("sgd", "sparse_categorical_crossentropy")
        cb = ICSCallback({str(path)!r}, probe=_probe(), batch_stats=True, flush_every=4)
        model.fit(*_data(), epochs=1, batch_size=16, verbose=0, callbacks=[cb, Kill()])
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300
    )
    assert proc.returncode == -9
    with open_run(path) as run:
        np.testing.assert_array_equal(run.batch_steps, [0, 1, 2, 3])
        assert np.isfinite(run.batch_activations("bn").mean).all()


def _other_backend(backend: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import keras, numpy as np
        assert keras.backend.backend() == {backend!r}
        from test_batch_stats import _fit, _probe
        from icsviz import CaptureWarning, ICSCallback, open_run
        _, plain = _fit([])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, loss = _fit([ICSCallback({str(tmp_path / "b.h5")!r}, probe=_probe(), batch_stats=True, flush_every=5)])
        assert not [w for w in caught if issubclass(w.category, CaptureWarning)], [str(w.message) for w in caught]
        np.testing.assert_allclose(loss, plain, rtol=1e-6)
        run = open_run({str(tmp_path / "b.h5")!r})
        assert list(run.batch_steps) == list(range(12)), run.batch_steps
        acts = run.batch_activations("bn")
        assert (acts.counts.sum(1) == 4096).all() and np.isfinite(acts.quantiles).all()
        assert abs(acts.mean[0]) < 0.1 and abs(acts.std[0] - 1) < 0.1  # BN output on its own batch
        print("BATCH STATS OK")
    """)
    return run_script(script, backend)


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_per_step_mode_on_jax(tmp_path: Path) -> None:
    proc = _other_backend("jax", tmp_path)
    assert proc.returncode == 0 and "BATCH STATS OK" in proc.stdout, proc.stderr[-3000:]


def test_layers_named_with_the_marks_of_captured_names_are_measured_at_every_step(tmp_path: Path) -> None:
    """JAX and torch allow any layer name (TensorFlow's scopes refuse "#", ":" and spaces). A
    name holding one of the marks that captured names add ("out#x", "tanh:2") was cut at it, and
    its per-step rows were NaN with a warning that the step did not compute it."""
    script = textwrap.dedent(f"""
        import warnings, keras, numpy as np
        from icsviz import CaptureWarning, ICSCallback, open_run
        keras.utils.set_random_seed(0)
        names = ["dense 1", "tanh:2", "层.2", "out#x"]
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name=names[0]),
            keras.layers.Dense(8, name=names[1]),
            keras.layers.Activation("tanh", name=names[2]),
            keras.layers.Dense(3, activation="softmax", name=names[3]),
        ])
        model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(64, 8)).astype("float32"), rng.integers(0, 3, 64)
        path = {str(tmp_path / "marks.h5")!r}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0,
                      callbacks=[ICSCallback(path, probe=(x[:16], y[:16]), batch_stats=True)])
        assert not [w for w in caught if issubclass(w.category, CaptureWarning)], [str(w.message) for w in caught]
        with open_run(path) as run:
            assert run.batch_layer_names == run.layer_names == [
                "dense 1:preact", "dense 1", "tanh:2", "层.2", "out#x:preact", "out#x"
            ], run.layer_names
            for name in names:  # lr 0: each step's layer output is the sub-model on that batch
                sub = keras.Model(model.inputs, model.get_layer(name).output)
                values = keras.ops.convert_to_numpy(sub(x[16:32]))
                acts = run.batch_activations(name)
                assert acts.nonfinite[1] == 0 and np.isfinite(acts.mean).all(), name
                # the step's sample of 4096 values (docs/statistics.md: within 5 % of the std)
                assert abs(acts.mean[1] - values.mean()) < 0.05 * values.std(), name
        print("MARKS OK")
    """)
    run_script(script, "jax", marker="MARKS OK")


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (pip install torch==2.13.0, a CPU build); README gives a local run",
)
def test_per_step_mode_on_torch(tmp_path: Path) -> None:
    proc = _other_backend("torch", tmp_path)
    assert proc.returncode == 0 and "BATCH STATS OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (pip install torch==2.13.0, a CPU build); README gives a local run",
)
def test_torch_compile_turns_the_per_step_mode_off_with_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "compiled.h5"
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import numpy as np
        from test_batch_stats import _fit, _probe
        from icsviz import CaptureWarning, ICSCallback, open_run
        _, plain = _fit([], jit_compile=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, loss = _fit([ICSCallback({str(path)!r}, probe=_probe(), batch_stats=True)], jit_compile=True)
        ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
        np.testing.assert_allclose(loss, plain, rtol=1e-6)
        run = open_run({str(path)!r})
        print("WARNINGS", len(ours), "|", ours[0] if ours else "")
        print("BATCHES", run.has_batch_stats, "CAPTURES", run.num_captures)
    """)
    proc = run_script(script, "torch")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WARNINGS 1 | icsviz: batch_stats=True is off for this run: torch.compile" in proc.stdout, (
        proc.stdout
    )
    assert "jit_compile=False" in proc.stdout
    assert "BATCHES False CAPTURES 3" in proc.stdout, proc.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_jax_steps_return_the_vector_or_fall_back_to_a_host_callback(tmp_path: Path) -> None:
    # Keras's own step returns the vector (no host callback inside the step); a step that
    # drops it, and steps_per_execution > 1, go through jax.debug.callback: same rows, every step.
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import keras, numpy as np
        from test_batch_stats import BATCH, _data, _fit, _model, _probe
        from icsviz import CaptureWarning, ICSCallback, open_run
        import icsviz.capture.batch_stats as bs
        received = []
        original_receive = bs.StepStatistics._receive
        bs.StepStatistics._receive = lambda self, v: (received.append(1), original_receive(self, v))
        folder = {str(tmp_path)!r}

        def record(name, **compile_args):
            callback = ICSCallback(f"{{folder}}/{{name}}.h5", probe=_probe(), batch_stats=True, flush_every=4)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _, loss = _fit([callback], **compile_args)
            assert not [w for w in caught if issubclass(w.category, CaptureWarning)], caught
            with open_run(f"{{folder}}/{{name}}.h5") as run:
                return loss, list(run.batch_steps), run.batch_activations("bn"), run.batch_activations("conv")

        # No batch-end hook: Keras's JAX loop does not wait for each step's logs.
        from keras.src.callbacks.callback_list import CallbackList
        assert CallbackList([ICSCallback(f"{{folder}}/x.h5", probe=_probe(), batch_stats=True)])._async_train
        _, plain = _fit([])
        loss, steps, bn, conv = record("outputs")
        assert received == [] and steps == list(range(12)), (len(received), steps)
        np.testing.assert_allclose(loss, plain, rtol=1e-6)

        loss2, steps2, bn2, conv2 = record("callback", steps_per_execution=3)
        assert len(received) == 12 and steps2 == list(range(12)), (len(received), steps2)
        _, plain3 = _fit([], steps_per_execution=3)
        np.testing.assert_allclose(loss2, plain3, rtol=1e-6)
        for a, b in ((bn, bn2), (conv, conv2)):  # the same batches, the same weights: the same rows
            np.testing.assert_array_equal(a.counts, b.counts)
            np.testing.assert_allclose(a.quantiles, b.quantiles, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, atol=1e-7)

        # Mixed precision (Keras's step with a LossScaleOptimizer): still the outputs channel.
        received.clear()
        keras.mixed_precision.set_global_policy("mixed_float16")
        mixed_plain = _model(mixed=True)
        mixed_plain.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
        expected = mixed_plain.fit(*_data(), epochs=2, batch_size=BATCH, verbose=0, shuffle=False)
        mixed = _model(mixed=True)
        mixed.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
        history = mixed.fit(*_data(), epochs=2, batch_size=BATCH, verbose=0, shuffle=False,
                            callbacks=[ICSCallback(f"{{folder}}/mixed.h5", probe=_probe(), batch_stats=True)])
        keras.mixed_precision.set_global_policy("float32")
        np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=1e-6)
        assert received == []
        with open_run(f"{{folder}}/mixed.h5") as run:
            assert list(run.batch_steps) == list(range(12)) and list(run.steps) == [0, 6, 12]

        class Dropping(keras.Sequential):  # Keras's step, but it drops extra non-trainable state
            def train_step(self, state, data):
                logs, new = super().train_step(state, data)
                return logs, (new[0], new[1][: len(state[1])], *new[2:])

        bs._keras_own_jax_step = lambda model: True  # as if Keras's own step had changed
        received.clear()
        model = Dropping(_model().layers)
        model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
        history = model.fit(*_data(), epochs=2, batch_size=BATCH, verbose=0, shuffle=False,
                            callbacks=[ICSCallback(f"{{folder}}/dropping.h5", probe=_probe(), batch_stats=True)])
        np.testing.assert_allclose(history.history["loss"], plain, rtol=1e-6)
        assert len(received) == 12
        with open_run(f"{{folder}}/dropping.h5") as run:
            assert list(run.batch_steps) == list(range(12))
            np.testing.assert_array_equal(run.batch_activations("bn").counts, bn.counts)
        print("JAX CHANNELS OK")
    """)
    run_script(script, "jax", "JAX CHANNELS OK")


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_ctrl_c_during_jaxs_host_callbacks_is_a_keyboard_interrupt(tmp_path: Path) -> None:
    # Where JAX's step cannot return the vector (steps_per_execution > 1, a custom step), it
    # calls back with it. A Ctrl-C that Python handled there came out of the step as XLA's
    # "INTERNAL: CpuCallback error" (a ValueError). Here the SIGINT arrives inside the callback.
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import keras, numpy as np
        from test_batch_stats import _fit, _probe
        from icsviz import ICSCallback, open_run
        import icsviz.capture.batch_stats as bs

        calls = []
        def interrupting(original):
            def called(*args):
                calls.append(len(calls) + 1)
                if len(calls) == 8:
                    os.kill(os.getpid(), signal.SIGINT)  # handled at the next line of Python
                return original(*args)
            return called

        bs.StepStatistics._receive = interrupting(bs.StepStatistics._receive)
        path = {str(tmp_path / "receive.h5")!r}
        try:
            _fit([ICSCallback(path, probe=_probe(), batch_stats=True)], steps_per_execution=2)
            raise SystemExit("no interrupt")
        except KeyboardInterrupt:
            pass
        assert 8 <= len(calls) <= 12, calls  # stopped after the step of the 8th call
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # Ctrl-C again at once: the first one kept nothing behind.
        _fit([ICSCallback(path, probe=_probe(), batch_stats=True, overwrite=True)], epochs=1)
        with open_run(path) as run:
            assert run.status == "complete" and len(run.batch_steps) == 6, run.batch_steps
        print("INTERRUPTS OK")
    """)
    run_script(script, "jax", "INTERRUPTS OK")


def test_a_fit_that_raises_leaves_no_hooks_behind(tmp_path: Path) -> None:
    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise RuntimeError("the user's own callback fails")

    model = _model()
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    callback = ICSCallback(tmp_path / "boom.h5", probe=_probe(), batch_stats=True, flush_every=1)
    with pytest.raises(RuntimeError, match="own callback"):
        model.fit(*_data(), epochs=1, batch_size=BATCH, verbose=0, callbacks=[callback, Boom()])
    # The next fit without icsviz: the stale hooks give the model its own step back.
    history = model.fit(*_data(), epochs=2, batch_size=BATCH, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert "train_step" not in model.__dict__
    assert getattr(model.train_function, "icsviz_hooks", None) is None
    # And a next fit with icsviz records normally.
    model.fit(
        *_data(),
        epochs=1,
        batch_size=BATCH,
        verbose=0,
        callbacks=[ICSCallback(tmp_path / "again.h5", probe=_probe(), batch_stats=True)],
    )
    with open_run(tmp_path / "again.h5") as run:
        assert len(run.batch_steps) == 6


def test_two_callbacks_of_one_fit_leave_the_steps_to_the_first_and_say_so(tmp_path: Path) -> None:
    """Two ICSCallbacks with batch_stats=True on one model (a probe from the training set, one
    from the validation set): the second used to take the step's hooks from the first, whose
    per-step mode then stopped with a warning about a training loop of the user's own."""
    first = ICSCallback(tmp_path / "train_probe.h5", probe=_probe(), batch_stats=True)
    x, y = _data()
    second = ICSCallback(
        tmp_path / "val_probe.h5", probe=(x[-32:], y[-32:]), batch_stats=True, layers=["out"]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = _fit([first, second])
    assert _ours(caught) == [
        "icsviz: batch_stats=True is off for this run: another ICSCallback in this fit measures every "
        f"training step of model {model.name!r} already (its run: {tmp_path / 'train_probe.h5'}); give "
        "batch_stats=True to one of them. Probe captures go on."
    ]
    with open_run(tmp_path / "train_probe.h5") as run:
        assert run.batch_steps.tolist() == list(range(12))  # 2 epochs of 6 batches
    with open_run(tmp_path / "val_probe.h5") as run:
        assert not run.has_batch_stats and run.layer_names == ["out:preact", "out"] and run.num_captures == 3
    # The next fit, each callback alone: the second measures the steps now.
    model.fit(
        *_data(),
        epochs=1,
        batch_size=BATCH,
        verbose=0,
        callbacks=[ICSCallback(tmp_path / "alone.h5", probe=_probe(), batch_stats=True)],
    )
    with open_run(tmp_path / "alone.h5") as run:
        assert len(run.batch_steps) == 6


def test_rows_waiting_to_be_written_are_bounded_in_bytes(tmp_path: Path, monkeypatch) -> None:
    from icsviz.capture import callback
    from icsviz.capture.batch_stats import StepStatistics

    sizes: list[int] = []
    original = StepStatistics.rows
    monkeypatch.setattr(
        StepStatistics, "rows", lambda self, taken: (sizes.append(len(taken)), original(self, taken))[1]
    )
    monkeypatch.setattr(callback, "_FLUSH_SECONDS", 1e9)  # fast steps, by the clock: the step cap
    monkeypatch.setattr(StepStatistics, "row_bytes", property(lambda self: 1000))
    monkeypatch.setattr(callback, "_FLUSH_MAX_BYTES", 3500)  # three rows' worth
    _fit([ICSCallback(tmp_path / "a.h5", probe=_probe(), batch_stats=True)], lr=0.0)
    assert sizes == [3, 3, 3, 3]  # epochs of 6 steps
    sizes.clear()
    _fit([ICSCallback(tmp_path / "b.h5", probe=_probe(), batch_stats=True, flush_every=5)], lr=0.0)
    assert sizes == [3, 3, 3, 3]  # the bound holds whatever the schedule
    with open_run(tmp_path / "b.h5") as run:
        np.testing.assert_array_equal(run.batch_steps, np.arange(12))


def test_numpy_gives_each_step_of_a_batch_the_numbers_of_its_own_call() -> None:
    """`host_vectors` reduces several steps' samples per numpy call: each step's vector is
    the one it gets alone, bit for bit, across chunks, with NaN/Inf in one step only."""
    from icsviz.capture.batch_stats import BatchPlan, host_batch_vector, host_vectors, raw_size, unpack
    from icsviz.store.schema import QUANTILES, BatchLayerSpec

    rng = np.random.default_rng(3)
    plans = [
        BatchPlan.create(
            BatchLayerSpec(name=f"l{i}", index=i, n_units=8, tracked_units=units, sample=128, unit_sample=32),
            16,
            len(QUANTILES),
            seed=0,
        )
        for i, units in enumerate([(0, 7), (), (3,)])
    ]
    q = np.asarray(QUANTILES, "float32")
    steps = 37  # more than two chunks of steps
    raw = rng.standard_t(3, (steps, raw_size(plans))).astype("float32")
    raw[:, :50] = 0.0  # ties and zeros
    raw[5, [10, 200]] = [np.nan, -np.inf]  # one step's samples with NaN/Inf: the masked path
    together = host_vectors(raw, plans, q)
    for step in range(steps):
        main = raw[step, : 3 * 128].reshape(3, 128)
        units = raw[step, 3 * 128 :].reshape(3, 32)
        np.testing.assert_array_equal(together[step], host_batch_vector(main, units, bins=16, q=q))
    counted = unpack(together, plans)  # NaN/Inf left out of the statistics, and counted
    assert [int(layer["nonfinite"][5]) for layer in counted] == [1, 1, 0]
    assert all(int(layer["nonfinite"].sum()) == int(layer["nonfinite"][5]) for layer in counted)


def test_numpy_statistics_of_a_diverging_step_overflow_quietly_as_on_the_device() -> None:
    """Finite values near float32's largest (a diverging run): their sum, squares and grid
    overflow to inf as the device's do, without numpy's RuntimeWarning in the user's log; the
    range, counts and quantiles stay right."""
    import warnings

    from icsviz.capture.batch_stats import host_batch_vector
    from icsviz.store.schema import QUANTILES

    q = np.asarray(QUANTILES, "float32")
    main = np.linspace(-3e38, 3e38, 256, dtype="float32").reshape(2, 128)
    main[1] = np.abs(main[1]) / 3e18  # up to 1e20: its squares overflow float32, the values do not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vector = host_batch_vector(main, main[:, :32] * 0.5, bins=16, q=q)
    counts = vector[: 2 * 16].reshape(2, 16)
    moments = vector[2 * 16 + 2 * 2 + 2 * len(q) :][:8].reshape(2, 4)
    assert counts.sum(axis=1).tolist() == [128, 128]
    quantiles = vector[2 * 16 + 2 * 2 :][: 2 * len(q)].reshape(2, len(q))
    np.testing.assert_allclose(quantiles, np.quantile(main.astype("float64"), q, axis=1).T, rtol=1e-6)
    np.testing.assert_array_equal(
        moments[:, 2:], [[main[0].min(), main[0].max()], [main[1].min(), main[1].max()]]
    )
    assert np.isinf(moments[1, 1])  # the squares of 1e20
    np.testing.assert_allclose(moments[1, 0], main[1].astype("float64").mean(), rtol=1e-5)


def host_and_device_statistics_agree() -> None:
    """The statistics computed by numpy from the samples the compiled step hands out equal the
    device's, and on JAX so do the device's with numpy's sort: with NaN/Inf in a sample, and
    all finite (numpy's path without masks)."""
    for nonfinite in (True, False):
        _host_and_device_agree(nonfinite)


def _host_and_device_agree(nonfinite: bool) -> None:
    from icsviz.capture import backend
    from icsviz.capture.batch_stats import BatchPlan, batch_vector, host_vectors, raw_size, unpack
    from icsviz.store.schema import QUANTILES, BatchLayerSpec

    rng = np.random.default_rng(5)
    plans, samples = [], []
    for index, units in enumerate((4, 6, 3)):
        spec = BatchLayerSpec(
            name=f"t{index}",
            index=index,
            n_units=units,
            tracked_units=(0, units - 1),
            sample=256,
            unit_sample=64,
        )
        plans.append(BatchPlan.create(spec, 16, len(QUANTILES), seed=0))
        values = rng.standard_t(3, 256 + 2 * 64).astype("float32") * 10.0**index
        if nonfinite:
            values[[3, 200]] = [np.nan, np.inf]  # non-finite values go last in either sort
        values[:40] = 0.0  # ties
        values[40:48] = 0.5  # on a bin edge
        if nonfinite and index == 2:
            values[:256] = np.nan  # a layer whose sample holds no finite value: NaN statistics
        samples.append(keras.ops.convert_to_tensor(values))
    q = np.asarray(QUANTILES, "float32")
    compiled = backend.compile_function
    on_device = compiled(lambda *s: batch_vector(s, plans, q))
    on_host = compiled(lambda *s: batch_vector(s, plans, q, on_host=True))  # the samples, flat
    raw = keras.ops.convert_to_numpy(on_host(*samples))
    assert raw.shape == (raw_size(plans),)
    host, device = host_vectors(raw[None], plans, q)[0], keras.ops.convert_to_numpy(on_device(*samples))
    assert host.shape == device.shape and np.isfinite(host).sum() > 100
    assert (unpack(host[None], plans)[0]["nonfinite"] > 0).all() == nonfinite
    if nonfinite:
        empty = unpack(host[None], plans)[2]
        assert np.isnan(empty["moments"]).all() and empty["hist_counts"].sum() == 0
    for from_host, from_device in zip(unpack(host[None], plans), unpack(device[None], plans)):
        for field in ("hist_counts", "hist_range", "zero_frac", "nonfinite"):
            np.testing.assert_array_equal(from_host[field], from_device[field], err_msg=field)
        for field in ("quantiles", "unit_quantiles"):  # XLA may fuse the interpolation: an ulp
            np.testing.assert_allclose(from_host[field], from_device[field], rtol=2.5e-7, err_msg=field)
        # min and max exact; mean and std are float32 sums, added up in another order: equal to
        # a millionth of the layer's spread
        np.testing.assert_array_equal(from_host["moments"][..., 2:], from_device["moments"][..., 2:])
        spread = float(from_device["moments"][0, 1])
        np.testing.assert_allclose(
            from_host["moments"][..., :2], from_device["moments"][..., :2], rtol=1e-6, atol=1e-6 * spread
        )


def test_numpy_statistics_inside_the_step_give_the_devices_numbers() -> None:
    if keras.backend.backend() != "tensorflow":
        pytest.skip("this test is TensorFlow's; JAX's runs in its own process below")
    import tensorflow as tf

    from icsviz.capture import backend

    host_and_device_statistics_agree()
    model = _model()
    model.compile("sgd", "mse", jit_compile=False)
    assert backend.host_statistics_in_step(model) == (not tf.config.list_logical_devices("GPU"))
    model.compile("sgd", "mse", jit_compile=True)
    assert not backend.host_statistics_in_step(model)  # XLA cannot call Python: the device computes them


def test_torch_on_a_cpu_hands_out_the_samples() -> None:
    if keras.backend.backend() != "torch":
        pytest.skip("torch's choice: run with KERAS_BACKEND=torch")
    import torch

    from icsviz.capture import backend

    assert backend.host_statistics_in_step(_model()) == (not torch.cuda.is_available())


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_jax_on_a_cpu_hands_out_the_samples_and_numpy_gives_the_devices_numbers() -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import jax
        from test_batch_stats import _model, host_and_device_statistics_agree
        from icsviz.capture import backend
        host_and_device_statistics_agree()
        model = _model()
        model.compile("sgd", "mse")
        # On a GPU or TPU XLA computes them in the step.
        assert backend.host_statistics_in_step(model) == (jax.default_backend() == "cpu")
        print("STATISTICS AGREE")
    """)
    run_script(script, "jax", "STATISTICS AGREE", timeout=300)
