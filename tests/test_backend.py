"""The capture path on the other Keras backends (JAX here), in a subprocess:
KERAS_BACKEND must be set before Keras is imported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_jax_backend_records_activations_gradients_and_shift(tmp_path) -> None:
    path = tmp_path / "jax.h5"
    script = textwrap.dedent(f"""
        import warnings
        import numpy as np, keras
        import icsviz
        warnings.simplefilter("error")  # no warning at all, ours or JAX's (float64 truncation)
        assert keras.backend.backend() == "jax"
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu", name="h"),
                                  keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.3, name="drop"),
                                  keras.layers.Dense(3, activation="softmax", name="out")])
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(128, 6)).astype("float32"); y = rng.integers(0, 3, 128)
        probe = x[:32].copy(); probe[5, 0] = np.nan  # one NaN input: its row of h is NaN
        cb = icsviz.ICSCallback({str(path)!r}, probe=(x[:32], y[:32]), every_n_steps=3, gradient_shift=True)
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
        with warnings.catch_warnings(record=True) as caught:  # ours, naming the sample
            warnings.simplefilter("always")
            nan_cb = icsviz.ICSCallback({str(path)!r} + ".nan.h5", probe=(probe, y[:32]))
        assert [str(w.message)[:70] for w in caught] == [
            "icsviz: the probe's inputs (x) hold 1 non-finite values, in 1 of its 32 samples (sample 5)"[:70]
        ], caught
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[nan_cb])
        run = icsviz.open_run({str(path)!r})
        assert run.attrs["backend"] == "jax"
        assert run.layer_names == ["h:preact", "h", "bn", "out:preact", "out"], run.layer_names
        assert list(run.steps) == [0, 3, 6, 8, 9, 12, 15, 16], list(run.steps)
        assert (run.activations("h").counts.sum(1) == 32 * 16).all()
        g = run.gradients("h").grad_norm
        assert np.isfinite(g).all() and (g > 0).all()
        assert abs(run.ics("h").grad_cos[0] - 1.0) < 1e-5 and 0 < run.ics("bn").grad_cos[1] < 1
        nan_run = icsviz.open_run({str(path)!r} + ".nan.h5")
        acts = nan_run.activations("h:preact")
        assert acts.nonfinite[0] == 16 and acts.counts[0].sum() == 32 * 16 - 16
        # No batch-end hook, so Keras's JAX loop does not wait for each step's logs (the step
        # captures above were taken as the next step began); the captures still know their
        # steps (the optimizer's count).
        from keras.src.callbacks.callback_list import CallbackList
        epochs_only = icsviz.ICSCallback({str(path)!r} + ".epochs.h5", probe=(x[:32], y[:32]))
        assert CallbackList([epochs_only], model=model)._async_train
        assert CallbackList([cb], model=model)._async_train
        start = int(model.optimizer.iterations)
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[epochs_only])
        epochs_run = icsviz.open_run({str(path)!r} + ".epochs.h5")
        assert list(epochs_run.steps) == [start, start + 8, start + 16], (start, list(epochs_run.steps))
        # Dynamic loss scaling does not count the steps it skips: the steps are counted anyway.
        keras.mixed_precision.set_global_policy("mixed_float16")
        scaled = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu", name="h"),
                                   keras.layers.Dense(3, activation="softmax", name="out", dtype="float32")])
        scaled.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        big = x * 3e3  # overflows float16 gradients at the first loss scale: skipped steps
        scaled_cb = icsviz.ICSCallback({str(path)!r} + ".scaled.h5", probe=(big[:32], y[:32]))
        scaled.fit(big, y, epochs=2, batch_size=16, verbose=0, callbacks=[scaled_cb])
        keras.mixed_precision.set_global_policy("float32")
        assert int(scaled.optimizer.iterations) < 16  # some steps were skipped...
        assert list(icsviz.open_run({str(path)!r} + ".scaled.h5").steps) == [0, 8, 16]  # ...and counted
        # Snapshots (the weights at the last capture) are copies: they survive the donation
        # of the variables' buffers to the next training steps.
        from icsviz.capture import backend
        before = [np.array(v.value) for v in model.trainable_variables]
        snapshot = backend.snapshot(model.trainable_variables)
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        assert all(np.array_equal(np.asarray(s), b) for s, b in zip(snapshot, before))
        assert not np.array_equal(np.asarray(model.trainable_variables[0].value), before[0])
        print("JAX OK")
    """)
    run_script(script, "jax", "JAX OK")


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_jax_first_capture_can_compile_after_kerass_first_step(tmp_path) -> None:
    """The GPU's order, forced here on a CPU: the capture compiles once Keras's step has run,
    measures the same, and every path that needs the capture sooner lets it compile."""
    script = textwrap.dedent(f"""
        import threading
        import numpy as np, keras
        import icsviz
        from icsviz.capture import backend, program
        program._FIRST_STEP_WAIT_S = 600.0  # no fallback may hide a path that forgets to release
        events = []
        original = program.CaptureProgram._execute

        def execute(self, args):
            events.append(("capture", threading.current_thread().name))
            return original(self, args)

        program.CaptureProgram._execute = execute
        import jax
        compile_lowered = jax.stages.Lowered.compile

        def compile_logged(self, *args, **kwargs):
            events.append(("compile", threading.current_thread().name))
            return compile_lowered(self, *args, **kwargs)

        jax.stages.Lowered.compile = compile_logged

        class Batches(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                events.append(("batch", batch))

        class StopInFirstStep(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                raise KeyboardInterrupt("stopped by the user")

        def fit(callback, after_step, n=64, extra=()):
            backend._COMPILE_AFTER_FIRST_STEP = after_step
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="h"),
                                      keras.layers.Dense(3, activation="softmax", name="out")])
            model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
            rng = np.random.default_rng(0)
            x, y = rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)
            events.clear()
            # Batches before ICSCallback: a batch's beginning is logged before it releases the compile.
            history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[Batches(), callback, *extra])
            return history.history["loss"]

        def callback(name):
            rng = np.random.default_rng(1)
            probe = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 3, 32)
            return icsviz.ICSCallback({str(tmp_path)!r} + "/" + name, probe=probe)

        beside = fit(callback("beside.h5"), after_step=False)
        after = fit(callback("after.h5"), after_step=True)
        first = events.index(("compile", "icsviz-compile"))
        assert ("batch", 1) in events[:first], events  # it waited for the first step to end
        np.testing.assert_allclose(after, beside, rtol=1e-6)  # training untouched
        a = icsviz.open_run({str(tmp_path / "beside.h5")!r})
        b = icsviz.open_run({str(tmp_path / "after.h5")!r})
        assert list(b.steps) == list(a.steps) == [0, 4, 8]
        for name in ("h:preact", "h", "out"):  # the step-0 capture measured the starting weights
            np.testing.assert_array_equal(b.activations(name).counts, a.activations(name).counts)
        np.testing.assert_allclose(b.gradients(b.variable_names[0]).grad_norm,
                                   a.gradients(a.variable_names[0]).grad_norm, rtol=1e-5)
        # One step per epoch: no second batch begins; the epoch end's capture lets it compile.
        fit(callback("one.h5"), after_step=True, n=16)
        assert list(icsviz.open_run({str(tmp_path / "one.h5")!r}).steps) == [0, 1, 2]
        # A fit stopped in its first step: close() writes the first capture without waiting.
        stopped = callback("stopped.h5")
        try:
            fit(stopped, after_step=True, extra=[StopInFirstStep()])
            raise AssertionError("the fit was not stopped")
        except KeyboardInterrupt:
            pass
        assert ("compile", "icsviz-compile") not in events  # still waiting for the first step
        closing = threading.Thread(target=stopped.close, daemon=True)
        closing.start()
        closing.join(120)
        assert not closing.is_alive(), "close() waited for a first step that never came"
        run = icsviz.open_run({str(tmp_path / "stopped.h5")!r})
        assert list(run.steps) == [0] and run.status == "interrupted", (list(run.steps), run.status)
        print("AFTER-STEP OK")
    """)
    run_script(script, "jax", "AFTER-STEP OK")


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_jax_first_capture_compiles_beside_training_and_measures_the_starting_weights(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import threading, warnings
        import numpy as np, keras
        import icsviz
        from icsviz.capture import program
        warnings.simplefilter("error")
        threads = []
        compile_on = program.CaptureProgram.measure_in_background

        def data():
            rng = np.random.default_rng(0)
            return rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)

        def fit(path, background, fail=False):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="h"),
                                      keras.layers.Dense(3, activation="softmax", name="out")])
            model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
            program.CaptureProgram.measure_in_background = compile_on if background else program.CaptureProgram.measure
            original = program.CaptureProgram._execute

            def execute(self, args):
                threads.append(threading.current_thread().name)
                if fail and len(threads) == 1:
                    raise RuntimeError("simulated compile failure")
                return original(self, args)

            program.CaptureProgram._execute = execute
            x, y = data()
            try:
                history = model.fit(x, y, epochs=2, batch_size=16, verbose=0,
                                    callbacks=[icsviz.ICSCallback(path, probe=(x[:32], y[:32]))])
            finally:
                program.CaptureProgram._execute = original
            return history.history["loss"]

        loss_sync = fit({str(tmp_path / "sync.h5")!r}, background=False)
        assert all(name == threading.main_thread().name for name in threads), threads
        threads.clear()
        loss_bg = fit({str(tmp_path / "bg.h5")!r}, background=True)
        assert threads[0] == "icsviz-compile" and set(threads[1:]) == {{threading.main_thread().name}}, threads
        np.testing.assert_allclose(loss_bg, loss_sync, rtol=1e-6)  # training untouched
        sync, bg = icsviz.open_run({str(tmp_path / "sync.h5")!r}), icsviz.open_run({str(tmp_path / "bg.h5")!r})
        assert list(bg.steps) == list(sync.steps) == [0, 4, 8]
        for name in ("h:preact", "h", "out"):
            a, b = sync.activations(name), bg.activations(name)
            np.testing.assert_array_equal(b.counts, a.counts)
            np.testing.assert_allclose(b.quantiles, a.quantiles, rtol=1e-6, atol=1e-7)
        # the step-0 capture measured the weights before the first update, though it ran later
        np.testing.assert_allclose(bg.gradients(bg.variable_names[0]).grad_norm,
                                   sync.gradients(sync.variable_names[0]).grad_norm, rtol=1e-5)
        assert np.isnan(bg.gradients(bg.variable_names[0]).update_ratio[0])
        # A failure on the compiling thread: a warning, training goes on, the file stays readable.
        threads.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss_failed = fit({str(tmp_path / "failed.h5")!r}, background=True, fail=True)
        ours = [str(w.message) for w in caught if issubclass(w.category, icsviz.CaptureWarning)]
        assert ours and all("simulated compile failure" in m for m in ours), ours
        assert len(loss_failed) == 2
        assert icsviz.open_run({str(tmp_path / "failed.h5")!r}).num_captures == 0
        print("BACKGROUND OK")
    """)
    run_script(script, "jax", "BACKGROUND OK")


def _rewrite_options():
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context

    config = config_pb2.ConfigProto()
    config.ParseFromString(context.context().function_call_options.config_proto_serialized)
    return config.graph_options.rewrite_options


def test_the_capture_function_runs_lightly_optimized_and_leaves_the_threads_options() -> None:
    tf = pytest.importorskip("tensorflow")
    from icsviz.capture import backend

    if backend.name() != "tensorflow":
        pytest.skip("TensorFlow's graph optimization only")
    seen = []

    def double(x):
        seen.append(_rewrite_options().disable_meta_optimizer)  # while TensorFlow traces it
        return x * 2.0

    before = _rewrite_options().SerializeToString()
    compiled = backend.compile_function(double)
    assert float(compiled(tf.constant(1.5))) == 3.0
    assert seen == [not tf.config.list_logical_devices("GPU")]  # no rewriting on a CPU-only machine
    assert _rewrite_options().SerializeToString() == before  # the user's own functions: untouched

    def broken(x):
        raise ValueError("tracing failed")

    with pytest.raises(ValueError, match="tracing failed"):
        backend.compile_function(broken)(tf.constant(1.0))
    assert _rewrite_options().SerializeToString() == before


@pytest.mark.parametrize("path", ["tensorflow", "generic"])
def test_histograms_count_each_row_on_its_own_grid_like_numpy(monkeypatch, path) -> None:
    import keras
    import numpy as np

    from icsviz.capture import backend

    if path == "generic":  # the index arithmetic JAX and torch use, run here on TensorFlow tensors
        monkeypatch.setattr(backend, "name", lambda: "generic")
    rng = np.random.default_rng(0)
    values = np.stack([rng.normal(size=500), np.round(rng.uniform(-4, 4, 500) * 4) / 4])  # row 1: on edges
    values = values.astype("float32")
    low, width = np.array([-4.0, -4.0]), np.array([0.25, 0.125])
    counts = keras.ops.convert_to_numpy(
        backend.histograms(
            keras.ops.convert_to_tensor(values),
            keras.ops.convert_to_tensor(low, "float64"),
            keras.ops.convert_to_tensor(width, "float64"),
            64,
        )
    )
    for row, first, step, got in zip(values, low, width, counts):
        expected, _ = np.histogram(row, bins=first + step * np.arange(65))
        np.testing.assert_array_equal(got, expected)
    single = backend.histogram(keras.ops.convert_to_tensor(values[1]), low[1], width[1], 64)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(single), counts[1])


def test_the_capture_function_still_runs_when_tensorflows_call_options_cannot_be_set(monkeypatch) -> None:
    tf = pytest.importorskip("tensorflow")
    from tensorflow.core.protobuf import config_pb2

    from icsviz.capture import backend

    if backend.name() != "tensorflow":
        pytest.skip("TensorFlow's graph optimization only")

    def unknown(*args, **kwargs):
        raise AttributeError("this TensorFlow has no such config")

    before = _rewrite_options().SerializeToString()
    compiled = backend.compile_function(lambda x: x + 1.0)
    monkeypatch.setattr(config_pb2, "ConfigProto", unknown)
    assert float(compiled(tf.constant(1.0))) == 2.0  # TensorFlow's default optimization instead
    monkeypatch.undo()
    assert _rewrite_options().SerializeToString() == before


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_jax_on_a_cpu_compiles_the_capture_lightly_with_the_same_statistics() -> None:
    script = textwrap.dedent("""
        import numpy as np, keras, jax
        from icsviz.capture import backend
        assert jax.default_backend() == "cpu"

        def stats(x):
            return {"mean": jax.numpy.mean(x, 0), "max": jax.numpy.max(x), "hist": jax.numpy.sort(x[:, 0])}

        asked = []
        jit = jax.jit
        jax.jit = lambda fn, **kwargs: asked.append(kwargs) or jit(fn, **kwargs)
        compiled = backend.compile_function(stats)
        jax.jit = jit
        light_options = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
        assert asked[-1] == {"compiler_options": light_options}, asked
        x = np.random.default_rng(0).normal(size=(512, 8)).astype("float32")
        light, default = compiled(x), jax.jit(stats)(x)
        for key in light:
            np.testing.assert_array_equal(np.asarray(light[key]), np.asarray(default[key]))
        print("JAX OK")
    """)
    run_script(script, "jax", "JAX OK")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_compiles_without_the_options_its_xla_does_not_know() -> None:
    """XLA's debug options come and go between releases: one this JAX rejects is left out,
    the others kept, and the capture still compiles."""
    script = textwrap.dedent("""
        import numpy as np, jax
        from icsviz.capture import backend
        wanted = {"xla_backend_optimization_level": 1, "xla_no_such_option_in_any_release": True}
        assert backend._known_options(jax, wanted) == {"xla_backend_optimization_level": 1}
        assert backend._known_options(jax, {"xla_no_such_option_in_any_release": 1}) == {}
        compiles = []
        backend._compiles_with = lambda jax, options: compiles.append(options) or True
        assert backend._known_options(jax, {}) == {} and compiles == []  # a GPU's: nothing compiled
        backend._CPU_COMPILER_OPTIONS = wanted
        compiled = backend.compile_function(lambda x: x * 2.0)
        assert float(compiled(np.float32(3.0))) == 6.0
        print("JAX OK")
    """)
    run_script(script, "jax", "JAX OK")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_traces_the_statistics_without_nested_functions_and_the_same_values() -> None:
    """`inlined_calls`: jnp's own compiled functions (take, clip, ...) are traced into the
    statistics, not nested in them (each nested one was traced and lowered on its own)."""
    script = textwrap.dedent("""
        import numpy as np, keras, jax
        from icsviz.capture import backend
        from icsviz.capture.batched import all_layer_stats
        from icsviz.capture.layers import select_layers
        from icsviz.capture.program import CaptureProgram
        from icsviz.capture.stats import CaptureOptions
        from icsviz.models import build_model

        keras.utils.set_random_seed(0)
        model = build_model("bn", (32, 32, 3), 10)
        model.compile("sgd", "sparse_categorical_crossentropy")
        program = CaptureProgram(model, select_layers(model), CaptureOptions(), with_gradients=True)
        x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype("float32")
        y = np.arange(16) % 10
        program.run(x, y, 0.01, step=0, epoch=0.0, time=0.0, kind="start")  # plans the layers
        shapes = [plan.shape for plan in program.traced]
        rng = np.random.default_rng(1)
        tensors = [rng.normal(size=shape).astype("float32") for shape in shapes]

        def statistics(inline):
            def fn(ts):
                if inline:
                    with backend.inlined_calls():
                        return all_layer_stats(ts, program.traced, program.options)
                return all_layer_stats(ts, program.traced, program.options)
            return fn

        def nested(jaxpr):
            return sum(eqn.primitive.name in ("pjit", "jit") for eqn in jaxpr.jaxpr.eqns)

        assert nested(jax.make_jaxpr(statistics(False))(tensors)) > 0  # what inlining removes
        assert nested(jax.make_jaxpr(statistics(True))(tensors)) == 0
        inlined, plain = jax.jit(statistics(True))(tensors), jax.jit(statistics(False))(tensors)
        for key in plain:
            np.testing.assert_array_equal(np.asarray(inlined[key]), np.asarray(plain[key]))
        print("INLINED OK")
    """)
    run_script(script, "jax", "INLINED OK")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_gathers_the_samples_in_one_gather_that_trusts_its_indices() -> None:
    """The capture's indices are in range by construction: on JAX each gather is one XLA
    gather, without jnp.take's mapping of negative indices and filling of out-of-range ones,
    and it takes what numpy takes on every axis, for indices of one and two dimensions."""
    script = textwrap.dedent("""
        import numpy as np, jax
        from icsviz.capture import backend
        values = np.random.default_rng(0).normal(size=(5, 6, 7)).astype("float32")
        for axis in (0, 1, 2, -1):
            size = values.shape[axis]
            for index in (np.array([size - 1, 0, 2], "int32"), np.array([[1, 0], [size - 1, 3]], "int32")):
                taken = jax.jit(lambda v: backend._jax_gather(v, index, axis))(values)
                np.testing.assert_array_equal(np.asarray(taken), np.take(values, index, axis=axis))
        jaxpr = jax.make_jaxpr(lambda v: backend._jax_gather(v, np.array([4, 1], "int32"), 1))(values)
        primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
        assert primitives == ["gather"], primitives
        assert "PROMISE_IN_BOUNDS" in str(jaxpr.jaxpr.eqns[0].params["mode"])
        print("GATHER OK")
    """)
    run_script(script, "jax", "GATHER OK")


def test_a_ctrl_c_during_a_step_with_host_callbacks_is_raised_after_it() -> None:
    import signal
    import threading

    from icsviz.capture.backend import interrupts_held

    def ctrl_c() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Python handles it at its next line

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            ctrl_c()
            reached.append("the rest of the step")
    assert reached == ["the rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C goes through at once
        with interrupts_held():
            ctrl_c()
            ctrl_c()
            reached.append("not reached")
    assert reached == ["the rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    with interrupts_held():  # no Ctrl-C: nothing raised
        reached.append("quiet")

    # A handler of the user's stays in place and does its own job.
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(1))
    try:
        with interrupts_held():
            ctrl_c()
        assert pressed == [1]
    finally:
        signal.signal(signal.SIGINT, previous)

    # Off the main thread (which Python never interrupts) the handler cannot be set: nothing changes.
    failures: list[BaseException] = []

    def elsewhere() -> None:
        try:
            with interrupts_held():
                reached.append("thread")
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert not failures and reached[-2:] == ["quiet", "thread"]


def _pytest_on(backend: str, *args: str) -> subprocess.CompletedProcess:
    """pytest with `args` in a fresh Python with Keras on `backend`, the project importable."""
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_keras_masks_leave_the_padding_out_on_jax() -> None:
    proc = _pytest_on("jax", str(ROOT / "tests" / "test_masks.py"))
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)
def test_jax_weights_deleted_by_an_interrupted_fit_are_named_as_the_cause(tmp_path) -> None:
    # Keras's JAX trainer donates the variables to each step: a fit stopped in the middle
    # leaves them deleted. The next fit's capture says so instead of an XLA buffer error.
    script = textwrap.dedent(f"""
        import warnings
        import numpy as np, keras
        from icsviz import CaptureWarning, ICSCallback
        from icsviz.capture.backend import deleted_variables
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
        model.compile("sgd", "mse")
        x, y = np.ones((8, 4), "float32"), np.ones((8, 3), "float32")
        assert deleted_variables(model) == []
        model.get_layer("d").kernel.value.delete()  # as a donated buffer is
        assert deleted_variables(model) == ["sequential/d/kernel"], deleted_variables(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model.fit(x, y, verbose=0, callbacks=[ICSCallback({str(tmp_path / "d.h5")!r}, probe=(x, y))])
            except RuntimeError as exc:
                assert "deleted" in str(exc)  # Keras's own error
        ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
        assert len(ours) == 1 and "weights are deleted" in ours[0] and "Ctrl-C" in ours[0], ours
        print("DELETED OK")
    """)
    run_script(script, "jax", "DELETED OK")


def test_a_jax_run_refused_for_an_existing_file_leaves_no_compile_to_abort_the_exit(tmp_path) -> None:
    # The first capture compiles on a thread of its own; a run refused once that capture was
    # traced (its file exists) used to leave the compile running, and XLA aborted the
    # interpreter's exit ("terminate called ...", exit status 134) after the user's own code ended.
    path = tmp_path / "taken.h5"
    path.write_bytes(b"a file the user already has")
    script = textwrap.dedent(f"""
        import numpy as np, keras, threading
        from icsviz import ICSCallback, RunExistsError
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu")])
        model.compile("sgd", "mse")
        x, y = np.ones((8, 4), "float32"), np.ones((8, 3), "float32")
        try:
            model.fit(x, y, verbose=0, callbacks=[ICSCallback({str(path)!r}, probe=(x, y))])
        except RunExistsError:
            print("REFUSED OK")
        assert not [t for t in threading.enumerate() if t.name == "icsviz-compile"]
    """)
    proc = run_script(script, "jax")
    assert proc.returncode == 0 and "REFUSED OK" in proc.stdout, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    assert path.read_bytes() == b"a file the user already has"


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed (pip install torch==2.13.0)"
)
def test_torch_results_reach_numpy_without_numpys_deprecation_warning() -> None:
    # Keras's convert_to_numpy calls np.array(tensor): under NumPy 2 a DeprecationWarning per
    # array (hundreds a capture), and with `-W error` a capture that failed.
    script = textwrap.dedent("""
        import warnings
        import numpy as np, torch
        from icsviz.capture import backend
        warnings.simplefilter("error")
        tree = {"grad": torch.ones(3, requires_grad=True) * 2, "half": torch.full((2,), 0.5, dtype=torch.bfloat16),
                "int": torch.arange(4), "plain": np.float32(1.5)}
        out = backend.to_numpy(tree)
        assert out["grad"].tolist() == [2.0, 2.0, 2.0] and out["half"].dtype == np.float32
        assert out["half"].tolist() == [0.5, 0.5] and out["int"].tolist() == [0, 1, 2, 3]
        assert float(out["plain"]) == 1.5
        print("TORCH NUMPY OK")
    """)
    run_script(script, "torch", "TORCH NUMPY OK")


def test_tensorflow_results_reach_numpy_with_their_values_and_dtypes() -> None:
    # Through Tensor.numpy() (Keras's convert_to_numpy took 8x as long on the training thread).
    import keras
    import numpy as np

    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow's tensors: run with KERAS_BACKEND=tensorflow")
    import tensorflow as tf

    from icsviz.capture import backend

    tree = {
        "stats": {"f": tf.constant([1.5, -2.5]), "d": tf.constant(0.1, tf.float64)},
        "counts": [tf.constant([[1, 2]], tf.int32), tf.constant([True, False])],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = backend.to_numpy(tree)
    f, d = out["stats"]["f"], out["stats"]["d"]
    assert isinstance(f, np.ndarray) and f.dtype == np.float32 and f.tolist() == [1.5, -2.5]
    assert isinstance(d, np.ndarray) and d.dtype == np.float64 and d.shape == () and float(d) == 0.1
    assert out["counts"][0].dtype == np.int32 and out["counts"][0].tolist() == [[1, 2]]
    assert out["counts"][1].dtype == np.bool_ and out["counts"][1].tolist() == [True, False]
    with warnings.catch_warnings():  # a Variable is read through Keras, as before (NumPy 2 warns there)
        warnings.simplefilter("ignore", DeprecationWarning)
        variable = backend.to_numpy([keras.Variable([3.0, 4.0])])[0]
    assert isinstance(variable, np.ndarray) and variable.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_training_loops_of_ones_own_on_the_backends_without_a_batch_end_hook(backend: str) -> None:
    """There the step captures are taken as the next step begins: the training-loop tests of
    test_callback.py, run on that backend (the steps of a model never compiled, the warning for
    a loop that never begins a batch)."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    tests = "training_loop_of_ones_own or never_begins_a_batch"
    proc = _pytest_on(backend, "tests/test_callback.py", "-k", tests)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_a_tensor_of_a_compiled_loops_body_is_not_reachable_after_the_loop() -> None:
    import tensorflow as tf

    from icsviz.capture import backend

    if backend.name() != "tensorflow":
        pytest.skip("the TensorFlow check; JAX's and torch's run in test_zoo's looped layer")
    seen: dict[str, object] = {}

    @tf.function
    def loop(x):
        def body(i, h):
            seen["inner"] = tf.tanh(h)
            return i + 1, seen["inner"]

        _, y = tf.while_loop(lambda i, h: i < 3, body, (0, x))
        usable = backend.reachable()
        return tf.constant([usable(seen["inner"]), usable(y), usable(x)])

    assert loop(tf.ones(3)).numpy().tolist() == [False, True, True]
    assert backend.reachable()(tf.ones(3))  # eager: everything is
