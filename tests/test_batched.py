"""The statistics of all layers at once give what `layer_stats` gives one layer at a time."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from test_program import capture

from icsviz.capture import batched, program
from icsviz.capture.batched import all_layer_stats, split
from icsviz.capture.stats import CaptureOptions, layer_stats, plan_tensor


class _Layer:  # what plan_tensor reads of a layer: its class name and data format
    data_format = "channels_last"


class _ChannelsFirst:
    data_format = "channels_first"


def _tensors() -> list[tuple[str, object, np.ndarray]]:
    rng = np.random.default_rng(3)
    relu = np.maximum(rng.normal(0.5, 2.0, (16, 6, 6, 8)), 0).astype("float32")  # many exact zeros
    return [
        ("conv", _Layer(), relu),
        ("dense", _Layer(), rng.normal(3.0, 0.1, (16, 10)).astype("float32")),
        ("wide", _Layer(), rng.standard_t(3, (16, 40, 64)).astype("float32")),  # > the quantile sample
        ("first", _ChannelsFirst(), rng.uniform(-1, 1, (16, 5, 4, 4)).astype("float32")),
        ("one", _Layer(), np.full((16, 1), 2.5, "float32")),  # one unit, constant
        # Tensors of the shapes above: reduced stacked with them (see batched.groups)
        ("conv2", _Layer(), rng.normal(-2.0, 0.5, (16, 6, 6, 8)).astype("float32")),
        ("wide2", _Layer(), rng.uniform(0, 8, (16, 40, 64)).astype("float32")),
        ("dense2", _Layer(), np.round(rng.normal(0, 4, (16, 10))).astype("float32")),  # values on bin edges
    ]


@pytest.mark.parametrize(
    "options",
    [
        CaptureOptions(),
        # budget cut to 4 samples, quantile and unit-row samples smaller than the layers
        CaptureOptions(max_values=2000, quantile_sample=256, unit_quantile_sample=8, hist_bins=16),
    ],
    ids=["defaults", "sampled"],
)
def test_all_layers_at_once_equal_one_layer_at_a_time(options) -> None:
    cases = _tensors()
    plans = [
        plan_tensor(name, layer, "output", x.shape, i, options) for i, (name, layer, x) in enumerate(cases)
    ]
    tensors = [keras.ops.convert_to_tensor(x) for _, _, x in cases]
    together = split(
        keras.tree.map_structure(keras.ops.convert_to_numpy, all_layer_stats(tensors, plans, options)),
        plans,
        options.hist_bins,
    )
    assert len(together) == len(cases)
    for (name, _, _), plan, tensor, got in zip(cases, plans, tensors, together):
        alone = keras.tree.map_structure(
            keras.ops.convert_to_numpy, layer_stats(tensor, plan, options, masked=False)
        )
        assert set(got) == set(alone), name
        np.testing.assert_array_equal(got["hist_counts"], alone["hist_counts"], err_msg=name)
        np.testing.assert_array_equal(got["hist_edges"], alone["hist_edges"], err_msg=name)
        np.testing.assert_array_equal(got["quantiles"], alone["quantiles"], err_msg=name)
        np.testing.assert_array_equal(got["unit_quantiles"], alone["unit_quantiles"], err_msg=name)
        np.testing.assert_allclose(got["unit_mean"], alone["unit_mean"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(got["unit_std"], alone["unit_std"], rtol=1e-5, atol=1e-7, err_msg=name)
        # Layer mean/std from the units (parallel formula) against the one-layer program's.
        np.testing.assert_allclose(got["moments"], alone["moments"], rtol=1e-5, atol=1e-6, err_msg=name)
        assert got["zero_frac"] == pytest.approx(float(alone["zero_frac"]))
        assert int(got["nonfinite"]) == 0 and bool(got["all_finite"]) and bool(alone["all_finite"])
    assert sorted(map(len, batched.groups(plans))) == [1, 1, 2, 2, 2]  # the groups were exercised
    conv = together[0]
    assert 0.3 < conv["zero_frac"] < 0.5  # the ReLU's zeros are counted
    assert conv["moments"][2] == 0.0  # and its minimum is exactly zero


def test_tensors_are_grouped_by_the_shape_of_their_budgeted_values() -> None:
    options = CaptureOptions(max_values=1024)
    shapes = [(8, 4, 4, 16), (8, 16), (8, 8, 8, 16), (8, 4, 4, 16), (4, 8, 8, 16), (64, 16), (8, 16)]
    plans = [plan_tensor(f"t{i}", _Layer(), "output", s, i, options) for i, s in enumerate(shapes)]
    # (8, 4, 4, 16) holds 2048 values: cut to 64 rows of 16; so are (8, 8, 8, 16) and (4, 8, 8, 16).
    # (64, 16) holds 1024 values, 64 rows, none cut: its own group.
    assert batched.groups(plans) == [[0, 2, 3, 4], [1, 6], [5]]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("max_values", [None, 16], ids=["whole", "budget-cut"])
def test_a_layer_with_nan_or_inf_is_flagged_and_the_others_still_measured(max_values, value) -> None:
    options = CaptureOptions(max_values=max_values)  # 16: two of the eight rows kept
    good = np.linspace(-1, 1, 64, dtype="float32").reshape(8, 8)
    bad = good.copy()
    bad[5, 4] = value
    plans = [plan_tensor(n, _Layer(), "output", (8, 8), i, options) for i, n in enumerate(("good", "bad"))]
    out = split(
        keras.tree.map_structure(
            keras.ops.convert_to_numpy,
            all_layer_stats(
                [keras.ops.convert_to_tensor(good), keras.ops.convert_to_tensor(bad)], plans, options
            ),
        ),
        plans,
        options.hist_bins,
    )
    assert bool(out[0]["all_finite"]) and not bool(out[1]["all_finite"])
    if max_values is None:
        np.testing.assert_allclose(out[0]["quantiles"][6], np.median(good), rtol=1e-6)  # the 50 % level
    else:  # the NaN's row is left out of the sample, yet the capture is flagged (every value checked)
        assert plans[1].budget_cut and 5 not in set(plans[1].row_index)


def test_a_capture_with_nan_is_measured_again_masked() -> None:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Activation("linear", name="ident")(inputs))
    x = np.arange(32, dtype="float32").reshape(8, 4)
    x[2, 1] = np.nan
    _, result = capture(model, x)
    layer = result.layers[0]
    assert layer.nonfinite == 1 and layer.hist_counts.sum() == 31
    finite = x[np.isfinite(x)]
    assert layer.moments[0] == pytest.approx(finite.mean())


def test_when_batching_fails_the_layers_are_measured_one_by_one(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ValueError("no batching today")

    monkeypatch.setattr(program, "all_layer_stats", broken)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="relu", name="d")(inputs))
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prog, result = capture(model, x)
    assert any("layer by layer" in str(w.message) and "no batching today" in str(w.message) for w in caught)
    assert [t.name for t in prog.traced] and len(result.layers) == len(prog.traced)
    y = keras.ops.convert_to_numpy(model(x))
    out = result.layers[[t.name for t in prog.traced].index("d")]
    np.testing.assert_allclose(out.unit_mean, y.mean(axis=0), rtol=1e-5)
    assert batched.all_layer_stats is not broken  # the module itself is untouched


def test_the_value_budget_keeps_a_fixed_sample_of_rows_across_every_sample() -> None:
    options = CaptureOptions(max_values=4096)
    x = np.random.default_rng(5).normal(size=(16, 12, 10, 4)).astype("float32")  # 1920 rows of 4 units
    plan = plan_tensor("conv", _Layer(), "output", x.shape, 0, options)
    assert plan.n_values == 4096 and plan.samples == 16 and plan.spec().value_sample == "rows"
    assert len(np.unique(plan.row_index)) == 1024 and plan.row_index.max() < 1920
    assert len(np.unique(plan.row_index // 120)) == 16  # rows from every probe sample
    again = plan_tensor("conv", _Layer(), "output", x.shape, 0, options)
    np.testing.assert_array_equal(plan.row_index, again.row_index)  # every capture, the same rows
    kept = x.reshape(-1, 4)[plan.row_index]
    out = split(
        keras.tree.map_structure(
            keras.ops.convert_to_numpy, all_layer_stats([keras.ops.convert_to_tensor(x)], [plan], options)
        ),
        [plan],
        options.hist_bins,
    )[0]
    np.testing.assert_allclose(out["unit_mean"], kept.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(out["unit_std"], kept.std(axis=0), rtol=1e-5)
    assert out["hist_counts"].sum() == kept.size
    np.testing.assert_allclose(out["quantiles"][6], np.median(kept), rtol=1e-6)
    assert out["moments"][2] == x.min() and out["moments"][3] == x.max()  # the range: every value
    small = plan_tensor("dense", _Layer(), "output", (64, 60), 1, options)
    assert small.row_index is None and small.n_values == 3840 and small.spec().value_sample == "all"
