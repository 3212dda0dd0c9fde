"""Every layer family is captured, with values equal to numpy's: TF in process,
JAX in a subprocess (KERAS_BACKEND must be set before Keras is imported)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from model_zoo import EXPECTED, ZOO, check_recorded

from icsviz import CaptureWarning, ICSCallback, open_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_is_recorded_with_exact_values_tensorflow(name: str, tmp_path: Path) -> None:
    names = check_recorded(name, tmp_path / f"{name}.h5")
    assert names[-2:] == ["head:preact", "head"]


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(
            "jax",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("jax") is None,
                reason="jax is not installed (pip install 'jax[cpu]')",
            ),
        ),
        pytest.param(
            "torch",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torch") is None,
                reason="torch is not installed (pip install torch==2.13.0, a CPU build)",
            ),
        ),
    ],
)
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
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0 and f"ZOO OK {len(ZOO)}" in proc.stdout, proc.stderr[-3000:]


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
