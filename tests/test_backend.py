"""The capture path on the other Keras backends (JAX here), in a subprocess:
KERAS_BACKEND must be set before Keras is imported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
        nan_cb = icsviz.ICSCallback({str(path)!r} + ".nan.h5", probe=(probe, y[:32]))
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
        print("JAX OK")
    """)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "JAX OK" in proc.stdout, proc.stderr[-3000:]
