"""Every layer family is captured, with values equal to numpy's: TF in process,
JAX in a subprocess (KERAS_BACKEND must be set before Keras is imported)."""

from __future__ import annotations

import importlib.util
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from model_zoo import EXPECTED, TF_ZOO, ZOO, check_recorded

from conftest import run_script
from icsviz import CaptureWarning, ICSCallback, open_run

JAX = pytest.param(
    "jax",
    marks=pytest.mark.skipif(
        importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
    ),
)
TORCH = pytest.param(
    "torch",
    marks=pytest.mark.skipif(
        importlib.util.find_spec("torch") is None,
        reason="torch is not installed (pip install torch==2.13.0, a CPU build)",
    ),
)


@pytest.mark.parametrize("name", sorted(ZOO) + sorted(TF_ZOO))
def test_zoo_model_is_recorded_with_exact_values_tensorflow(name: str, tmp_path: Path) -> None:
    if name in TF_ZOO and keras.backend.backend() != "tensorflow":
        pytest.skip(
            f"{name} takes strings, which only TensorFlow's tensors hold (the suite runs on another backend)"
        )
    names = check_recorded(name, tmp_path / f"{name}.h5")
    assert names[-2:] == ["head:preact", "head"]


@pytest.mark.parametrize("backend", [JAX, TORCH])
def test_zoo_is_recorded_with_exact_values_on_other_backends(backend: str, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import keras
        from pathlib import Path
        from model_zoo import ZOO, check_recorded
        assert keras.backend.backend() == {backend!r}
        for name in sorted(ZOO):
            check_recorded(name, Path({str(tmp_path)!r}) / (name + ".h5"))
        print("ZOO OK", len(ZOO))
    """)
    run_script(script, backend, marker=f"ZOO OK {len(ZOO)}", timeout=900)


@pytest.mark.parametrize("backend", ["tensorflow", JAX, TORCH])
def test_layers_called_in_a_compiled_loop_cost_only_themselves(backend: str, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import warnings, keras
        from model_zoo import looped_layer
        from icsviz import CaptureWarning, ICSCallback, open_run
        keras.utils.set_random_seed(0)
        model, x, y = looped_layer()
        model.compile("sgd", "sparse_categorical_crossentropy")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[
                ICSCallback({str(tmp_path / "loop.h5")!r}, probe=(x[:32], y[:32]), batch_stats=True)])
        ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
        with open_run({str(tmp_path / "loop.h5")!r}) as run:
            print("NAMES", run.layer_names, run.batch_layer_names, run.status, len(run.steps))
        print("WARNINGS", len(ours), ours)
    """)
    proc = run_script(script, backend)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = next(line for line in proc.stdout.splitlines() if line.startswith("NAMES"))
    warned = next(line for line in proc.stdout.splitlines() if line.startswith("WARNINGS"))
    if backend == "torch":  # eager: each turn of the loop is a call of its own, as a shared layer's
        assert "'looped/cell', 'looped/cell:preact#2', 'looped/cell#2'" in names, names
        assert warned.startswith("WARNINGS 0"), warned
    else:  # compiled: the loop's tensors are left out, the loop's result is recorded
        layers = "['stem', 'looped', 'head:preact', 'head']"
        assert f"NAMES {layers} {layers} complete 2" == names, names
        assert (
            warned.startswith("WARNINGS 1") and "'looped/cell:preact', 'looped/cell' not recorded" in warned
        )


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_rematerialized_layers_are_recorded_where_their_checkpoint_returns(tmp_path: Path) -> None:
    # On JAX a layer under keras.RematScope runs inside jax.checkpoint. (TensorFlow's Keras
    # cannot train such a model at all; torch records inside the checkpoint as usual.)
    script = textwrap.dedent(f"""
        import warnings, keras, numpy as np
        from icsviz import CaptureWarning, ICSCallback, open_run
        L = keras.layers
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 2, 64)
        for where in ("layers", "model"):
            keras.utils.set_random_seed(0)
            with keras.RematScope(mode="full"):
                inputs = keras.Input((6,))
                hidden = L.Dense(8, activation="relu", name="hidden")(inputs)
                out = L.Dense(2, activation="softmax", name="out")(hidden)
                if where == "model":
                    model = keras.Model(inputs, out)
            if where == "layers":
                model = keras.Model(inputs, out)
            model.compile("sgd", "sparse_categorical_crossentropy")
            expected = np.asarray(keras.Model(inputs, hidden)(x[:32]))
            path = {str(tmp_path)!r} + f"/{{where}}.h5"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[ICSCallback(path, probe=(x[:32], y[:32]))])
            ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
            with open_run(path) as run:
                names = run.layer_names
                mean = float(run.activations("hidden").mean[0]) if "hidden" in names else None
            print(where.upper(), names, mean, float(expected.mean()), ours)
    """)
    proc = run_script(script, "jax")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {
        line.split(" ", 1)[0]: line
        for line in proc.stdout.splitlines()
        if line.startswith(("LAYERS", "MODEL"))
    }
    # Layers built in the scope: their outputs, with their values; the fused pre-activations
    # stay inside the checkpoint and are named in one warning.
    layers = lines["LAYERS"]
    assert layers.startswith("LAYERS ['hidden', 'out'] "), layers
    recorded, expected = (float(v) for v in layers.split("] ", 1)[1].split(" ")[:2])
    assert abs(recorded - expected) < 1e-5, layers
    assert "'hidden:preact', 'out:preact' not recorded" in layers and "RematScope" in layers
    # A model built in the scope is one checkpoint: nothing inside it, and the warning says how.
    assert lines["MODEL"].startswith("MODEL [] None"), lines["MODEL"]
    assert "build the model outside the scope" in lines["MODEL"]


class _ReadOnlyActivationDense(keras.layers.Dense):
    """A user layer whose fused activation is a read-only property."""

    @property
    def activation(self):  # type: ignore[override]
        return keras.activations.relu

    @activation.setter
    def activation(self, value):  # Dense.__init__ assigns it; ignore
        pass


class _Ragged(keras.layers.Layer):
    """Output with a dimension unknown while tracing (the positive values only)."""

    def call(self, x):
        import tensorflow as tf

        return tf.boolean_mask(x, x > 0)

    def compute_output_shape(self, shape):
        return (None,)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the unmeasurable layer is a tf.boolean_mask"
)
def test_a_layer_that_cannot_be_intercepted_or_measured_costs_only_itself(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)

    class Model(keras.Model):
        def __init__(self):
            super().__init__()
            self.readonly = _ReadOnlyActivationDense(6, activation="relu", name="readonly")
            self.ragged = _Ragged(name="ragged")  # a side computation, measured and refused
            self.out = keras.layers.Dense(2, activation="softmax", name="out")

        def call(self, x):
            h = self.readonly(x)
            self.ragged(h)
            return self.out(h)

    side = Model()
    side.compile("sgd", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 2, 32)
    path = tmp_path / "partial.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        side.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[ICSCallback(path, probe=(x, y))])
    messages = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(messages) == 2, messages
    assert any("'readonly'" in m and "pre-activation" in m and "cannot be replaced" in m for m in messages)
    assert any("'ragged'" in m and "unknown while tracing" in m for m in messages)
    with open_run(path) as run:
        assert run.layer_names == ["readonly", "out:preact", "out"]
        assert len(run.steps) == 2 and run.status == "complete"


def test_recurrent_layers_have_no_pre_activation_and_units_on_the_last_axis(tmp_path: Path) -> None:
    from icsviz.capture.layers import select_layers

    model, _, _ = ZOO["lstm"]()
    selected = {s.name: s for s in select_layers(model)}
    assert selected["lstm_seq"].kind == "recurrent" and not selected["lstm_seq"].capture_preactivation
    assert EXPECTED["lstm"] == ["lstm_seq", "lstm_last"]


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="strings, which only TensorFlow's tensors hold"
)
def test_string_inputs_are_measured_at_every_step_too(tmp_path: Path) -> None:
    """The per-step mode samples every training batch of a model whose traced shapes lost the
    batch size (TextVectorization's ragged tokens): each step's row over the batch's values."""
    from model_zoo import text_vectorization

    keras.utils.set_random_seed(0)
    model, x, y = text_vectorization()
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    path = tmp_path / "text.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x,
            y,
            epochs=1,
            batch_size=16,
            verbose=0,
            callbacks=[ICSCallback(path, probe=(x[:16], y[:16]), batch_stats=True)],
        )
    assert not [w for w in caught if issubclass(w.category, CaptureWarning)]
    with open_run(path) as run:
        assert run.batch_layer_names == ["embed", "lstm", "head:preact", "head"]
        assert run.batch_steps.tolist() == [0, 1, 2, 3]
        lstm = run.batch_activations("lstm")
        # An LSTM's outputs are tanh-bounded, and each step's sample is of its own batch.
        assert np.all(np.abs(lstm.min) <= 1) and np.all(np.abs(lstm.max) <= 1)
        assert len(np.unique(lstm.mean)) == 4


@pytest.mark.parametrize("backend", ["tensorflow", JAX, TORCH])
@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_a_quantized_model_is_recorded_while_it_is_fine_tuned(
    backend: str, mode: str, tmp_path: Path
) -> None:
    """`model.quantize(...)`, then training (LoRA on an int8 layer, or float8 training): Keras
    calls a quantized layer's `quantized_call`, not its `call`, and only the fused
    pre-activations were recorded (the outputs "d1", "d2", "out" missing, also per step)."""
    script = textwrap.dedent(f"""
        import warnings, keras, numpy as np
        from icsviz import CaptureWarning, ICSCallback, open_run
        rng = np.random.default_rng(0)
        x = rng.normal(size=(128, 8)).astype("float32")
        y = (x[:, 0] > 0).astype("int64")
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="d1"),
            keras.layers.Dense(16, activation="tanh", name="d2"),
            keras.layers.Dense(2, activation="softmax", name="out"),
        ])
        model.quantize({mode!r})
        if {mode!r} == "int8":
            model.get_layer("d2").enable_lora(4)
        model.compile("adam", "sparse_categorical_crossentropy")
        path = {str(tmp_path / "quantized.h5")!r}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, epochs=2, batch_size=32, verbose=0,
                      callbacks=[ICSCallback(path, probe=(x[:32], y[:32]), every_n_steps=2, batch_stats=True)])
        assert not [w for w in caught if issubclass(w.category, CaptureWarning)], [str(w.message) for w in caught]
        with open_run(path) as run:
            assert run.layer_names == ["d1:preact", "d1", "d2:preact", "d2", "out:preact", "out"], run.layer_names
            assert run.batch_layer_names == run.layer_names
            for name in ("d1", "d2"):
                sub = keras.Model(model.inputs, model.get_layer(name).output)
                values = keras.ops.convert_to_numpy(sub(x[:32], training=True))
                acts = run.activations(name)
                np.testing.assert_allclose([acts.mean[-1], acts.std[-1]], [values.mean(), values.std()], rtol=1e-5)
                assert np.isfinite(run.batch_activations(name).mean).all()
        print("QUANTIZED OK")
    """)
    run_script(script, backend, marker="QUANTIZED OK")
