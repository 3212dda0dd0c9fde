"""Keras masks (padding): probe captures describe the data positions only, equal to numpy's
statistics over them; a mask that does not fit is said so and the layer recorded whole."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from test_program import capture as capture_once

from icsviz import CaptureWarning, ICSCallback, open_run
from icsviz.capture.layers import select_layers
from icsviz.capture.masks import makes_masks
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions
from icsviz.store.schema import QUANTILES

L = keras.layers
PAD = 100.0  # the padding index's embedding: far outside the data's range


def padded_tokens(n: int = 64, steps: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 50, (n, steps))
    for row, length in enumerate(rng.integers(2, steps + 1, n)):
        x[row, length:] = 0
    return x, rng.integers(0, 2, n)


def text_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((12,), dtype="int32"),
            L.Embedding(50, 8, mask_zero=True, name="emb"),
            L.LSTM(6, return_sequences=True, name="lstm"),
            L.Dense(5, activation="tanh", name="td"),  # per time step, the mask passed on
            L.GlobalAveragePooling1D(name="pool"),
            L.Dense(2, activation="softmax", name="out"),
        ]
    )
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    emb = model.get_layer("emb")
    weights = keras.ops.convert_to_numpy(emb.embeddings).copy()
    weights[0] = PAD  # counted, the padding would be every histogram's maximum
    emb.embeddings.assign(weights)
    return model


def outputs_of(model: keras.Model, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    inner = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names])
    outputs = inner(x, training=False)
    outputs = outputs if len(names) > 1 else [outputs]  # one output comes alone
    return {n: keras.ops.convert_to_numpy(o) for n, o in zip(names, outputs)}


def capture(model: keras.Model, x: np.ndarray, y: np.ndarray, **options) -> tuple[CaptureProgram, dict]:
    """One capture with `CaptureOptions(**options)`: the program and {tensor: (plan, stats)}."""
    program, result = capture_once(model, x, y, options=CaptureOptions(**options), with_gradients=True)
    return program, {plan.name: (plan, stats) for plan, stats in zip(program.traced, result.layers)}


def test_only_models_with_a_mask_source_pay_the_masks_pass() -> None:
    assert makes_masks(text_model())
    assert makes_masks(keras.Sequential([keras.Input((4, 3)), L.Masking(), L.SimpleRNN(2)]))
    assert not makes_masks(keras.Sequential([keras.Input((4, 3)), L.SimpleRNN(2), L.Dense(2)]))
    assert not makes_masks(
        keras.Sequential([keras.Input((4,), dtype="int32"), L.Embedding(9, 2), L.Flatten()])
    )


def test_padding_is_left_out_of_every_statistic() -> None:
    model = text_model()
    x, y = padded_tokens()
    data = x != 0
    _, captured = capture(model, x, y, quantile_sample=8192)  # quantiles over every data value
    expected = outputs_of(model, x, ["emb", "lstm", "td"])
    expected["td:preact"] = np.arctanh(np.clip(expected["td"], -0.999999, 0.999999))
    for name in ("emb", "lstm", "td", "td:preact"):
        plan, stats = captured[name]
        values = expected[name][data]  # (data positions, units)
        assert plan.spec().value_sample == "mask" and plan.n_values == values.size
        assert stats.hist_counts.sum() == values.size
        tol = 2e-3 if name == "td:preact" else 1e-5  # arctanh of float32 tanh
        np.testing.assert_allclose(
            stats.moments[:4], [values.mean(), values.std(), values.min(), values.max()], rtol=tol, atol=tol
        )
        np.testing.assert_allclose(stats.unit_mean, values.mean(0), rtol=tol, atol=tol)
        if name != "td:preact":
            np.testing.assert_allclose(stats.quantiles, np.quantile(values, QUANTILES), rtol=1e-5, atol=1e-6)
        assert stats.moments[3] < PAD / 2  # the padding's 100 never counted
    # The pooled output carries no mask: all of it, as before.
    assert captured["out"][0].spec().value_sample == "all"


def test_the_value_budget_samples_data_rows_and_the_range_stays_exact_over_them() -> None:
    model = text_model()
    x, y = padded_tokens()
    data = x != 0
    _, captured = capture(model, x, y, max_values=400)
    emb = outputs_of(model, x, ["emb"])["emb"][data]
    plan, stats = captured["emb"]
    assert plan.spec().value_sample == "mask, rows" and plan.n_values == 400 and plan.budget_cut
    assert plan.row_index.max() < len(emb)  # rows counted among the data rows
    assert stats.hist_counts.sum() == 400
    np.testing.assert_allclose(stats.unit_mean, emb[plan.row_index].mean(0), rtol=1e-5, atol=1e-6)
    assert stats.moments[2] == emb.min() and stats.moments[3] == emb.max()  # exact, padding out


def test_a_masking_layer_before_a_recurrent_layer() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 3)),
            L.Masking(0.0),
            L.SimpleRNN(4, return_sequences=True, name="rnn"),
            L.Flatten(),
            L.Dense(2),
        ]
    )
    model.compile("sgd", "mse")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6, 3)).astype("float32")
    x[:, 4:] = 0.0
    _, captured = capture(model, x, rng.normal(size=(40, 2)).astype("float32"))
    plan, stats = captured["rnn"]
    values = outputs_of(model, x, ["rnn"])["rnn"][:, :4]
    assert plan.n_values == values.size and stats.hist_counts.sum() == values.size
    np.testing.assert_allclose(stats.moments[:2], [values.mean(), values.std()], rtol=1e-5, atol=1e-6)


class KeepsTheMask(L.Layer):
    """Sums over time but passes the (batch, time) mask on: it no longer fits the output."""

    def call(self, inputs, mask=None):
        return keras.ops.sum(inputs, axis=1)

    def compute_mask(self, inputs, mask=None):
        return mask


class DropsTheMask(L.Layer):
    def call(self, inputs):
        return inputs + 0.0  # a new tensor: the input's mask stays on the input

    def compute_mask(self, inputs, mask=None):
        return None


def test_a_mask_that_does_not_fit_its_output_is_said_so_and_every_value_recorded() -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,), dtype="int32")
    hidden = L.Embedding(50, 4, mask_zero=True, name="emb")(inputs)
    summed = KeepsTheMask(name="sum")(hidden)
    unmasked = DropsTheMask(name="drop")(L.Activation("relu", name="act")(summed))
    model = keras.Model(inputs, L.Dense(2, name="out")(unmasked))
    model.compile("sgd", "mse")
    x, _ = padded_tokens(n=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, captured = capture(model, x, np.zeros((16, 2), "float32"))
    messages = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert any("'sum'" in m and "every position, padding included" in m for m in messages), messages
    plan, stats = captured["sum"]
    assert plan.spec().value_sample == "all" and stats.hist_counts.sum() == 16 * 4
    assert captured["emb"][0].spec().value_sample == "mask"


@pytest.mark.parametrize("batch_stats", [False, True])
def test_a_recorded_run_of_a_padded_model(tmp_path, batch_stats) -> None:
    model = text_model()
    x, y = padded_tokens(n=128)
    path = tmp_path / "text.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = ICSCallback(path, probe=(x[:64], y[:64]), batch_stats=batch_stats)
        model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[callback])
    assert [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)] == []
    values = outputs_of(model, x[:64], ["lstm"])["lstm"][x[:64] != 0]
    for _ in range(2):  # read from the file, then from the index the first reading kept
        with open_run(path) as run:
            assert run.layer("lstm").value_sample == "mask" and run.layer("lstm").padding_left_out
            assert run.layer("out").value_sample == "all" and not run.layer("out").padding_left_out
    with open_run(path) as run:
        acts = run.activations("lstm")
        assert (acts.counts.sum(1) == values.size).all() and run.num_captures == 3
        np.testing.assert_allclose(acts.mean[-1], values.mean(), rtol=1e-4, atol=1e-6)
        if batch_stats:  # every step's sample of 4,096 values, all from data positions
            emb = run.batch_activations("emb")
            assert len(run.batch_steps) == 8 and (emb.counts.sum(1) == 4096).all()
            assert np.nanmax(emb.quantiles) < PAD / 2 and (emb.std < 1).all()  # the padding's 100s left out


def test_per_step_rows_sample_the_data_positions_of_each_training_batch(tmp_path) -> None:
    """The last step's rows against numpy over that batch's data positions (the weights it saw)."""
    model = text_model()
    x, y = padded_tokens(n=64, seed=3)
    path = tmp_path / "steps.h5"
    callback = ICSCallback(path, probe=(x[:32], y[:32]), batch_stats=True)
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")  # the weights stay
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, shuffle=False, callbacks=[callback])
    batch = x[32:]
    out = outputs_of(model, batch, ["emb", "lstm"])
    with open_run(path) as run:
        for name in ("emb", "lstm"):
            data = out[name][batch != 0].ravel()
            rows = run.batch_activations(name)
            q = np.asarray(rows.q)
            ranks = np.searchsorted(np.sort(data), rows.quantiles[-1]) / data.size
            assert np.abs(ranks - q).max() < 0.04, (name, ranks, q)  # a sample of 4,096, some twice
            assert abs(rows.mean[-1] - data.mean()) < 0.05 * data.std()
            assert rows.max[-1] <= data.max() and rows.min[-1] >= data.min()


def test_a_sample_that_fell_on_padding_takes_a_data_value_of_its_own_part() -> None:
    from icsviz.capture.batch_stats import _data_only

    def run(values: np.ndarray, data: np.ndarray, sizes: list[int]) -> np.ndarray:
        out = _data_only(keras.ops.convert_to_tensor(values), keras.ops.convert_to_tensor(data), sizes)
        return keras.ops.convert_to_numpy(out)

    values = np.arange(1, 17, dtype="float32")
    data = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0], bool)
    out = run(values, data, [10, 6])  # a layer's sample of 10, a tracked unit's of 6
    np.testing.assert_array_equal(out[data], values[data])  # data samples stay where they are
    first, second = slice(0, 10), slice(10, 16)
    assert set(out[first][~data[first]]) <= set(values[first][data[first]])  # from its own part
    assert len(set(out[first][~data[first]])) > 1  # spread over its data
    assert set(out[second]) == {15.0}  # the only data value of the second part
    out = run(values, np.r_[data[:10], np.zeros(6, bool)], [10, 6])
    assert np.isnan(out[10:]).all() and not np.isnan(out[:10]).any()  # all padding: no values


def test_reading_the_masks_changes_nothing_in_the_model() -> None:
    from icsviz.capture.masks import probe_masks

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32", batch_size=4),
            L.Embedding(20, 3, mask_zero=True),
            L.LSTM(2, stateful=True, return_sequences=True, name="lstm"),
            L.Dense(1),
        ]
    )
    x = np.array([[1, 2, 3, 0, 0, 0]] * 4)
    model(x)  # the stateful LSTM now holds states
    states = [keras.ops.convert_to_numpy(s).copy() for s in model.get_layer("lstm").states]
    masks = probe_masks(model, select_layers(model), (x * 3) % 20)
    np.testing.assert_array_equal(masks["lstm"], np.tile([True] * 3 + [False] * 3, (4, 1)))
    for before, after in zip(states, model.get_layer("lstm").states):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(after), before)


class Shortens(L.Layer):
    """Drops the last two time steps but passes the whole mask on: it no longer fits."""

    def call(self, inputs, mask=None):
        return inputs[:, :-2, :] * 2.0

    def compute_mask(self, inputs, mask=None):
        return mask


def test_a_mask_of_other_positions_in_the_per_step_mode_is_said_so_and_training_goes_on(tmp_path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((12,), dtype="int32"),
            L.Embedding(50, 4, mask_zero=True, name="emb"),
            Shortens(name="short"),
            DropsTheMask(name="drop"),
            L.Flatten(),
            L.Dense(2, activation="softmax", name="out"),
        ]
    )
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = padded_tokens(n=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x,
            y,
            epochs=1,
            batch_size=16,
            verbose=0,
            callbacks=[ICSCallback(tmp_path / "short.h5", probe=(x[:16], y[:16]), batch_stats=True)],
        )
    ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert any("'short'" in m and "every position, padding included" in m for m in ours), ours
    assert any("per-step rows of 'short'" in m and "do not cover their positions" in m for m in ours), ours
    assert len(history.history["loss"]) == 1
    with open_run(tmp_path / "short.h5") as run:
        assert (run.batch_activations("short").counts.sum(1) == 4096).all() and len(run.batch_steps) == 4
        assert run.activations("emb").counts[-1].sum() == (x[:16] != 0).sum() * 4  # its own mask fits
