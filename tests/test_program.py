"""The compiled statistics, checked against numpy on models with known outputs."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions, dyadic_bin_width

# Tests whose expected values come from TensorFlow's own gradient tape.
TAPE_REFERENCE = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the reference gradients come from a tf.GradientTape over the model",
)


def identity_model(units: int) -> keras.Model:
    """A linear Activation: its output is exactly its input, NaN and Inf included."""
    inputs = keras.Input((units,))
    model = keras.Model(inputs, keras.layers.Activation("linear", name="ident")(inputs))
    model.compile("sgd", "mse")
    return model


def capture(model, x, y=None, options=None, with_gradients=None, lr=0.0):
    options = options or CaptureOptions()
    program = CaptureProgram(
        model, select_layers(model), options, with_gradients if with_gradients is not None else y is not None
    )
    result = program.run(
        keras.ops.convert_to_tensor(x),
        None if y is None else keras.ops.convert_to_tensor(y),
        lr,
        step=0,
        epoch=0.0,
        time=0.0,
        kind="start",
    )
    return program, result


@given(
    low=st.floats(-1e6, 1e6, allow_nan=False),
    span=st.floats(0, 1e6, allow_nan=False),
    bins=st.sampled_from([2, 8, 64, 100]),
)
@settings(max_examples=200, deadline=None)
def test_dyadic_grid_covers_range_with_power_of_two_width(low, span, bins) -> None:
    high = low + span
    first, width = dyadic_bin_width(low, high, bins)
    assert first <= low and high < first + bins * width
    assert math.log2(width) == int(math.log2(width))  # a power of two
    assert first / width == math.floor(first / width)  # aligned to the width
    # Never wider than twice the smallest width that could hold the range.
    assert width <= 4 * max(span / bins, max(abs(low), abs(high)) * 2.0**-24, 2.0**-100)


def test_the_device_grid_is_numpys_in_float64_constant_layers_included() -> None:
    """`dyadic_grid` (keras.ops, in the capture) against `dyadic_grid_np`: the same first edges
    and widths, bit for bit, in float64. A constant layer's grid is narrower than float32 can
    resolve around its value (Keras 3.15's torch floor, ceil and maximum of float64 were float32:
    every edge came out 2.5)."""
    from icsviz.capture import backend
    from icsviz.capture.stats import dyadic_grid, dyadic_grid_np

    low = np.asarray([2.5, 0.0, -1.0, 1e-30, -3e5, 7.0, 1000.0], "float32")
    high = np.asarray([2.5, 0.0, 3.0, 2e-30, 4e5, 7.0 + 2**-20, 1000.5], "float32")
    first, width = dyadic_grid(keras.ops.convert_to_tensor(low), keras.ops.convert_to_tensor(high), 64)
    first, width = keras.ops.convert_to_numpy(first), keras.ops.convert_to_numpy(width)
    expected_first, expected_width = dyadic_grid_np(low, high, 64)
    assert first.dtype == np.dtype(backend.wide_float()) == width.dtype
    if first.dtype == np.float64:
        np.testing.assert_array_equal(first, expected_first)
        np.testing.assert_array_equal(width, expected_width)
        edges = first[0] + width[0] * np.arange(65)
        assert np.all(np.diff(edges) > 0)  # 65 distinct edges around a constant 2.5
    else:  # JAX without x64: the grid in float32, as documented
        np.testing.assert_allclose(width, expected_width, rtol=0)


def test_statistics_match_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(256, 6)).astype("float32")
    x[:, 2] = 0.0  # a dead unit: zero fraction 1/6
    model = identity_model(6)
    program, result = capture(model, x)
    assert [t.name for t in program.traced] == ["ident"]
    stats = result.layers[0]
    flat = x.ravel()
    np.testing.assert_allclose(stats.moments, [flat.mean(), flat.std(), flat.min(), flat.max()], rtol=1e-5)
    assert stats.zero_frac == pytest.approx(1 / 6)
    assert stats.nonfinite == 0
    np.testing.assert_allclose(stats.unit_mean, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.unit_std, x.std(0), rtol=1e-4, atol=1e-6)
    # Histogram: exact counts on the stored (dyadic) edges.
    edges = stats.hist_edges
    first, width = dyadic_bin_width(float(flat.min()), float(flat.max()), 64)
    assert edges[0] == first and edges[1] - edges[0] == width
    expected, _ = np.histogram(flat, bins=edges)
    np.testing.assert_array_equal(stats.hist_counts, expected)
    assert stats.hist_counts.sum() == flat.size
    # Quantiles: exact (linear interpolation) when the layer fits the sample.
    from icsviz.store.schema import QUANTILES

    np.testing.assert_allclose(stats.quantiles, np.quantile(flat, QUANTILES), rtol=1e-5, atol=1e-5)
    tracked = program.traced[0].tracked_units
    assert tracked == (0, 2, 5) or len(tracked) == 3
    for i, unit in enumerate(tracked):
        np.testing.assert_allclose(
            stats.unit_quantiles[i], np.quantile(x[:, unit], QUANTILES), rtol=1e-5, atol=1e-5
        )


def test_nonfinite_values_are_counted_and_excluded() -> None:
    x = np.arange(40, dtype="float32").reshape(10, 4)
    x[0, 0], x[3, 1], x[5, 2] = np.nan, np.inf, -np.inf
    _, result = capture(identity_model(4), x)
    stats = result.layers[0]
    finite = x[np.isfinite(x)]
    assert stats.nonfinite == 3
    assert stats.hist_counts.sum() == finite.size == 37
    expected, _ = np.histogram(finite, bins=stats.hist_edges)
    np.testing.assert_array_equal(stats.hist_counts, expected)
    np.testing.assert_allclose(
        stats.moments, [finite.mean(), finite.std(), finite.min(), finite.max()], rtol=1e-5
    )
    assert np.isfinite(stats.quantiles).all()
    unit0 = x[:, 0][np.isfinite(x[:, 0])]
    assert stats.unit_mean[0] == pytest.approx(unit0.mean())


def test_all_nonfinite_layer_gives_nan_moments_and_empty_histogram() -> None:
    x = np.full((8, 3), np.nan, dtype="float32")
    _, result = capture(identity_model(3), x)
    stats = result.layers[0]
    assert stats.nonfinite == 24 and stats.hist_counts.sum() == 0
    assert np.isnan(stats.moments).all() and np.isnan(stats.quantiles).all()


def test_value_budget_uses_a_fixed_sample_of_rows_but_exact_range() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 8)).astype("float32")
    program, _ = capture(identity_model(8), x, options=CaptureOptions(max_values=80))
    plan = program.traced[0]
    outside = int(np.setdiff1d(np.arange(100), plan.row_index)[0])
    x[outside, 3] = 50.0  # outside the budget: still the exact max
    program, result = capture(identity_model(8), x, options=CaptureOptions(max_values=80))
    plan = program.traced[0]
    assert plan.samples == 100 and plan.n_values == 80 and len(plan.row_index) == 10
    stats = result.layers[0]
    assert stats.hist_counts.sum() == 80
    assert stats.moments[3] == 50.0
    np.testing.assert_allclose(stats.unit_mean, x[plan.row_index].mean(0), rtol=1e-5, atol=1e-6)


def test_conv_units_are_channels_and_quantiles_use_a_fixed_sample() -> None:
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 1, name="c", kernel_initializer="ones", bias_initializer="zeros")
    model = keras.Model(inputs, conv(inputs))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    options = CaptureOptions(quantile_sample=1000)
    program, result = capture(model, x, options=options)
    plan = program.traced[0]
    assert plan.n_units == 4 and plan.quantile_index is not None and len(plan.quantile_index) == 1000
    out = x.sum(-1, keepdims=True).repeat(4, -1)
    np.testing.assert_allclose(result.layers[0].unit_mean, out.reshape(-1, 4).mean(0), rtol=1e-4, atol=1e-5)
    sample = out.ravel()[plan.quantile_index]
    from icsviz.store.schema import QUANTILES

    np.testing.assert_allclose(
        result.layers[0].quantiles, np.quantile(sample, QUANTILES), rtol=1e-4, atol=1e-4
    )
    # The same positions every capture: a second run gives identical quantiles.
    again = program.run(keras.ops.convert_to_tensor(x), None, 0.0, step=1, epoch=0.0, time=0.0, kind="step")
    np.testing.assert_array_equal(again.layers[0].quantiles, result.layers[0].quantiles)


def small_classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(8, activation="tanh", name="h1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.Dense(8, activation="relu", name="h2")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


@TAPE_REFERENCE
def test_gradient_norms_match_gradient_tape_and_model_is_untouched() -> None:
    model = small_classifier()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.integers(0, 3, size=32)
    before = [v.numpy().copy() for v in model.variables]
    program, result = capture(model, x, y)
    after = [v.numpy() for v in model.variables]
    for a, b in zip(before, after):  # weights, BN moving stats, dropout seed
        np.testing.assert_array_equal(a, b)
    # Reference: the same loss in training mode with the same pinned dropout state.
    with tf.GradientTape() as tape:
        mapping = [(v, p) for v, p in zip(model.non_trainable_variables, program._pinned)]
        with keras.StatelessScope(state_mapping=mapping):
            pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=pred, training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    expected = [float(tf.norm(g)) for g in grads]
    np.testing.assert_allclose(result.grad_norm, expected, rtol=1e-4)
    np.testing.assert_allclose(
        result.weight_norm, [float(tf.norm(v)) for v in model.trainable_variables], rtol=1e-5
    )
    assert np.isnan(result.update_ratio).all()  # nothing to compare with yet
    names = [t.name for t in program.traced]
    assert names == ["h1:preact", "h1", "bn", "h2:preact", "h2", "out:preact", "out"]
    # Fixed dropout masks: two captures of the same weights agree exactly.
    again = program.run(
        keras.ops.convert_to_tensor(x),
        keras.ops.convert_to_tensor(y),
        0.0,
        step=1,
        epoch=0.0,
        time=0.0,
        kind="step",
    )
    np.testing.assert_array_equal(again.layers[4].hist_counts, result.layers[4].hist_counts)
    kernels = np.array(["kernel" in v.path or "gamma" in v.path for v in model.trainable_variables])
    np.testing.assert_array_equal(again.update_ratio[kernels], 0.0)  # weights did not move
    assert np.isnan(again.update_ratio[~kernels]).all()  # zero biases: undefined


@TAPE_REFERENCE
def test_the_probes_sample_weights_weight_its_loss_as_in_training() -> None:
    model = small_classifier()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.integers(0, 3, size=32)
    weights = np.where(y == 0, 5.0, 0.2).astype("float32")  # a rare class weighted up
    program = CaptureProgram(model, select_layers(model), CaptureOptions(), with_gradients=True)
    weighted = program.run(
        *(keras.ops.convert_to_tensor(a) for a in (x, y)),
        0.0,
        step=0,
        epoch=0.0,
        time=0.0,
        kind="start",
        sample_weight=keras.ops.convert_to_tensor(weights),
    )
    _, unweighted = capture(model, x, y)
    with tf.GradientTape() as tape:
        mapping = [(v, p) for v, p in zip(model.non_trainable_variables, program._pinned)]
        with keras.StatelessScope(state_mapping=mapping):
            pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=pred, sample_weight=weights, training=True)
    expected = [float(tf.norm(g)) for g in tape.gradient(loss, model.trainable_variables)]
    np.testing.assert_allclose(weighted.grad_norm, expected, rtol=1e-4)
    assert np.all(np.abs(weighted.grad_norm - unweighted.grad_norm) > 1e-3 * unweighted.grad_norm)
    # The activations do not depend on the weights of the loss.
    np.testing.assert_array_equal(weighted.layers[1].hist_counts, unweighted.layers[1].hist_counts)


def test_update_ratio_measures_weight_change() -> None:
    model = small_classifier()
    x = np.ones((4, 5), "float32")
    program, _ = capture(model, x)
    kernel = model.get_layer("h1").kernel
    old = kernel.numpy()
    kernel.assign(old * 1.5)
    result = program.run(keras.ops.convert_to_tensor(x), None, 0.0, step=1, epoch=1.0, time=0.0, kind="epoch")
    index = [v.path for v in model.trainable_variables].index(kernel.path)
    assert result.update_ratio[index] == pytest.approx(0.5, rel=1e-5)
    assert np.isnan(result.grad_norm).all()  # no labels, no gradients


_UPDATE_RATIO_SCRIPT = """
import numpy as np, keras
from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.BatchNormalization(), keras.layers.Dense(3, activation="softmax")])
model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
program = CaptureProgram(model, select_layers(model), CaptureOptions(), with_gradients=True)
xt, yt = keras.ops.convert_to_tensor(x[:32]), keras.ops.convert_to_tensor(y[:32])

def weights():
    return [np.asarray(keras.ops.convert_to_numpy(v.value), "float64") for v in model.trainable_variables]

program.run(xt, yt, 0.5, step=0, epoch=0.0, time=0.0, kind="start")
for epoch in (1, 2):
    before = weights()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # on JAX the steps donate the old buffers
    after = weights()
    capture = program.run(xt, yt, 0.5, step=4 * epoch, epoch=float(epoch), time=0.0, kind="epoch")
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(after, before)]
    np.testing.assert_allclose(capture.update_ratio, np.where(np.isinf(expected), np.nan, expected), rtol=1e-5)
    # kernels and gamma; the biases and beta start at zero: undefined until they moved
    assert np.isfinite(capture.update_ratio).sum() == (3 if epoch == 1 else 6), capture.update_ratio
# One trainable variable, 1-D and a whole number of flat.py's blocks (no padding): the capture's
# flat copy of the weights is that variable itself, and must still be a copy (JAX hands an
# input returned as is back).
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1024, trainable=False),
                          keras.layers.LayerNormalization(center=False),
                          keras.layers.Dense(3, activation="softmax", trainable=False)])
model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
assert [tuple(v.shape) for v in model.trainable_variables] == [(1024,)]
program = CaptureProgram(model, select_layers(model), CaptureOptions(), with_gradients=True)
program.run(xt, yt, 0.5, step=0, epoch=0.0, time=0.0, kind="start")
for epoch in (1, 2):
    before = weights()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    after = weights()
    capture = program.run(xt, yt, 0.5, step=4 * epoch, epoch=float(epoch), time=0.0, kind="epoch")
    expected = np.linalg.norm(after[0] - before[0]) / np.linalg.norm(before[0])
    assert expected > 0
    np.testing.assert_allclose(capture.update_ratio, [expected], rtol=1e-5)
print("UPDATE RATIOS OK")
"""


_FROZEN_SCRIPT = """
import os, tempfile, warnings
import numpy as np, keras, icsviz
warnings.simplefilter("error", icsviz.CaptureWarning)
keras.utils.set_random_seed(0)
base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu", name="h")])
base.trainable = False
model = keras.Sequential([base, keras.layers.Dense(3, activation="softmax", name="out")])
model.layers[-1].trainable = False
model.compile("sgd", "sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 3, 64)
path = os.path.join(tempfile.mkdtemp(), "frozen.h5")
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "The model does not have any trainable weights")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[icsviz.ICSCallback(path, probe=(x[:16], y[:16]))])
with icsviz.open_run(path) as run:
    assert run.num_captures == 3 and run.variable_names == [], (run.num_captures, run.variable_names)
    h = keras.ops.convert_to_numpy(base(x[:16]))
    np.testing.assert_allclose(run.activations("sequential/h").mean[-1], h.mean(), rtol=1e-5)
print("FROZEN OK")
"""


def _on_backend(backend: str, script: str, marker: str) -> None:
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and marker in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_update_ratios_after_training_steps_equal_numpys(backend: str) -> None:
    """The weights a capture measured stay, copied by the capture itself, for the next one's
    update ratios: through training steps that update the variables in place (TensorFlow,
    torch) or donate their buffers (JAX)."""
    _on_backend(backend, _UPDATE_RATIO_SCRIPT, "UPDATE RATIOS OK")


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_a_model_without_trainable_variables_is_captured(backend: str) -> None:
    """A frozen model (feature extraction, evaluation) is recorded; torch's autograd refused
    the empty list of variables and the run got no capture."""
    _on_backend(backend, _FROZEN_SCRIPT, "FROZEN OK")


@TAPE_REFERENCE
@pytest.mark.parametrize("floatx", ["float32", "float64"])
def test_gradient_shift_matches_a_hand_computed_step(floatx: str) -> None:
    # float64 (keras.backend.set_floatx): the stepped weights used to be float32, and the
    # whole capture failed on a dtype mismatch.
    previous, policy = keras.backend.floatx(), keras.config.dtype_policy()
    keras.backend.set_floatx(floatx)
    keras.config.set_dtype_policy(floatx)  # another test may have set one, which floatx leaves
    try:
        _check_gradient_shift()
    finally:
        keras.backend.set_floatx(previous)
        keras.config.set_dtype_policy(policy)


def _check_gradient_shift() -> None:
    model = small_classifier()
    assert model.get_layer("h1").kernel.dtype == keras.backend.floatx()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.integers(0, 3, size=32)
    lr = 0.5
    program, result = capture(model, x, y, options=CaptureOptions(gradient_shift=True), lr=lr)
    assert program.ics_layers == ("h1", "bn", "h2", "out")
    assert result.ics_grad_diff[0] == pytest.approx(0.0, abs=1e-7)  # nothing precedes h1
    assert result.ics_grad_cos[0] == pytest.approx(1.0, abs=1e-6)

    variables = model.trainable_variables
    pinned = program._pinned

    def grads_at(values):
        with tf.GradientTape() as tape:
            tensors = [tf.convert_to_tensor(v) for v in values]
            tape.watch(tensors)
            mapping = list(zip(variables, tensors)) + list(zip(model.non_trainable_variables, pinned))
            with keras.StatelessScope(state_mapping=mapping):
                pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=pred, training=True)
        return tape.gradient(loss, tensors)

    base = grads_at([v.value for v in variables])
    owners = program._owner
    h2 = [i for i, o in enumerate(owners) if o == "h2"]
    before_h2 = [i for i, o in enumerate(owners) if o in ("h1", "bn")]
    stepped = [
        v.value - lr * g if i in before_h2 else v.value for i, (v, g) in enumerate(zip(variables, base))
    ]
    shifted = grads_at(stepped)
    g = np.concatenate([base[i].numpy().ravel() for i in h2]).astype("float64")
    g2 = np.concatenate([shifted[i].numpy().ravel() for i in h2]).astype("float64")
    assert result.ics_grad_diff[2] == pytest.approx(np.linalg.norm(g - g2), rel=1e-3)
    assert result.ics_grad_cos[2] == pytest.approx(g @ g2 / np.linalg.norm(g) / np.linalg.norm(g2), rel=1e-4)
    assert result.ics_grad_diff[2] > 1e-4  # a real shift at this learning rate


def test_a_monotone_maps_range_is_taken_from_its_input_and_stays_exact(monkeypatch) -> None:
    """ReLU-like outputs of captured tensors take their range from the input's (no pass over
    their own values): the same min and max as every value gives, with values outside the
    budgeted rows."""
    inputs = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    relu = keras.layers.Activation("relu", name="relu")(conv)
    six = keras.layers.ReLU(0.5, name="six")(conv)  # clips at 0.5: the max is the clip
    leaky = keras.layers.LeakyReLU(0.1, name="leaky")(conv)
    fused = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="fused")(leaky)
    tanh = keras.layers.Activation("tanh", name="tanh")(conv)  # approximated: measured itself
    outputs = keras.layers.Concatenate()([relu, six, fused, tanh])
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    program, result = capture(model, x, options=CaptureOptions(max_values=64))
    derived = {t.name: t.range_from for t in program.traced if t.range_from is not None}
    assert derived == {"relu": "conv", "six": "conv", "leaky": "conv", "fused": "fused:preact"}
    names = [t.name for t in program.traced]
    probe = keras.Model(inputs, [conv, relu, six, leaky, fused, tanh])(x)
    pre = keras.Model(inputs, model.get_layer("fused").input)(x)
    weights = model.get_layer("fused").get_weights()
    fused_pre = keras.ops.convert_to_numpy(keras.ops.conv(pre, weights[0], padding="same")) + weights[1]
    values = dict(
        zip(["conv", "relu", "six", "leaky", "fused", "tanh"], map(keras.ops.convert_to_numpy, probe))
    )
    values["fused:preact"] = fused_pre
    outside = 0
    for name, plan, stats in zip(names, program.traced, result.layers):
        assert plan.budget_cut
        every = values[name].reshape(-1, 4)
        np.testing.assert_allclose(stats.moments[2:], [every.min(), every.max()], rtol=1e-6, atol=1e-6)
        if name in derived:
            outside += every[plan.row_index].max() < every.max()
    assert outside >= 1  # some derived range was set by values the budget left out
    # Bit for bit the range a pass over each tensor's own values gives.
    from icsviz.capture import batched

    monkeypatch.setattr(batched, "_derived_ranges", lambda plans, dtypes: {})
    _, own = capture(model, x, options=CaptureOptions(max_values=64))
    for mapped, measured in zip(result.layers, own.layers):
        np.testing.assert_array_equal(mapped.moments, measured.moments)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mapped_ranges_are_exact_under_mixed_precision(policy, monkeypatch) -> None:
    """The map is applied in the tensors' own dtype: the same bits as a pass over the values."""
    from icsviz.capture import batched

    keras.mixed_precision.set_global_policy(policy)
    try:
        inputs = keras.Input((6, 6, 3))
        conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
        leaky = keras.layers.LeakyReLU(0.1, name="leaky")(conv)
        fused = keras.layers.Conv2D(4, 3, padding="same", activation="leaky_relu", name="fused")(leaky)
        model = keras.Model(inputs, fused)
        x = np.random.default_rng(5).normal(size=(16, 6, 6, 3)).astype("float32") * 30
        options = CaptureOptions(max_values=64)
        program, mapped = capture(model, x, options=options)
        assert {t.name: t.range_from for t in program.traced if t.range_from} == {
            "leaky": "conv",
            "fused": "fused:preact",
        }
        monkeypatch.setattr(batched, "_derived_ranges", lambda plans, dtypes: {})
        _, measured = capture(model, x, options=options)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for one, other in zip(mapped.layers, measured.layers):
        np.testing.assert_array_equal(one.moments, other.moments)
