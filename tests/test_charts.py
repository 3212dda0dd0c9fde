"""The app's Vega-Lite specs: valid against the schema, fed with the frames they were given,
and every encoded field present in the data it reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from altair.utils.schemapi import validate_jsonschema
from altair.vegalite.v6.schema.core import load_schema
from jsonschema.exceptions import ValidationError

from icsviz.dashboard import charts, data

SCHEMA = load_schema()
RUNS = ("a", "b")


def check(spec: charts.Spec) -> dict[str, pd.DataFrame]:
    """Validate `spec` as Streamlit sends it (frames apart) and check that every field an
    encoding names is a column of the dataset that view reads; returns the datasets."""
    datasets = spec["datasets"]
    assert all(isinstance(df, pd.DataFrame) for df in datasets.values())
    validate_jsonschema({k: v for k, v in spec.items() if k != "datasets"}, SCHEMA)

    def walk(view: Any, source: str | None) -> int:
        if isinstance(view, list):
            return sum(walk(v, source) for v in view)
        if not isinstance(view, dict):
            return 0
        source = view.get("data", {}).get("name", source)
        checked = 0
        for channel, encoding in view.get("encoding", {}).items():
            for enc in encoding if isinstance(encoding, list) else [encoding]:
                assert source in datasets, f"{channel}: no dataset {source!r}"
                assert enc["field"] in datasets[source].columns, (
                    f"{channel}: {enc['field']!r} not in {source}"
                )
                checked += 1
        return checked + sum(walk(view.get(k), source) for k in ("layer", "hconcat", "vconcat"))

    assert walk(spec, None) > 0
    return datasets


def test_every_chart_is_valid_and_reads_its_own_frames(tiny_runs) -> None:
    edges = data.shared_edges(tiny_runs, "dense")
    domain = (float(edges[0]), float(edges[-1]))
    run = tiny_runs["a"]
    curves = data.curves_frame(tiny_runs)
    specs = {
        "curves": charts.curves_chart(curves, RUNS, 2.0),
        "histogram": charts.histogram_chart(
            data.histogram_frame(tiny_runs, "dense", 2.0, edges), RUNS, domain
        ),
        "ridgeline": charts.ridgeline_chart(data.ridgeline_frame(run, "dense", edges), "a", domain),
        "heatmap": charts.heatmap_chart(data.heatmap_frame(run, "dense", edges), "a", domain, (-3.0, 0.5)),
        "bands": charts.percentile_chart(
            data.percentile_frame(tiny_runs, "dense", bands="tensorboard"),
            RUNS,
            data.BANDS["tensorboard"],
            "dense",
            2.0,
        ),
        "units": charts.unit_chart(data.unit_frame(run, "dense", "mean"), "a", "mean", 4.0),
        "stds": charts.unit_chart(data.unit_frame(run, "dense", "std"), "a", "std"),
        "drift": charts.drift_heatmap(data.drift_frame(tiny_runs), "a", "from_start", 2.0),
        "drift lines": charts.drift_lines(data.drift_frame(tiny_runs), RUNS, "mean_shift", "dense"),
        "gradients": charts.gradient_chart(data.gradient_frame(tiny_runs), "grad_norm", "a"),
        "shift": charts.ics_chart(data.ics_frame(tiny_runs), "grad_cos", "cos"),
    }
    for name, spec in specs.items():
        try:
            check(spec)
        except (AssertionError, ValidationError) as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    # The curves: one panel per metric, each fed its own rows, and the capture on display marked.
    datasets = specs["curves"]["datasets"]
    pd.testing.assert_frame_equal(datasets["accuracy"], curves[curves["metric"] == "accuracy"])
    assert datasets["capture"]["epoch"].tolist() == [2.0]
    # Shared scales arrive as given: the heatmap's colour range, the units' symmetric range.
    assert specs["heatmap"]["encoding"]["color"]["scale"]["domain"] == [-3.0, 0.5]
    assert specs["units"]["encoding"]["color"]["scale"]["domain"] == [-4.0, 4.0]
    assert "domain" not in specs["stds"]["encoding"]["color"]["scale"]  # no limit: Vega-Lite's own
    # TensorBoard's bands: three areas, a median line and the rule.
    marks = [layer["mark"]["type"] for layer in specs["bands"]["layer"]]
    assert marks == ["area", "area", "area", "line", "rule"]


def test_run_colours_follow_the_order_of_the_runs() -> None:
    frame = pd.DataFrame({"run": ["b", "a"], "x": [0.0, 1.0], "density": [1.0, 1.0], "epoch": [1.0, 1.0]})
    spec = charts.histogram_chart(frame, ("b", "a"), (0.0, 1.0))
    scale = spec["encoding"]["color"]["scale"]
    assert scale == {"domain": ["b", "a"], "range": ["#1f77b4", "#d62728"]}  # blue, red: as the figures'
    # A sweep of 20 runs compared: 20 colours, none the same (six made the 7th look like the 1st).
    runs = [f"lr{i}" for i in range(20)]
    wide = pd.DataFrame({"run": runs, "x": 0.0, "density": 1.0, "epoch": 1.0})
    colours = charts.histogram_chart(wide, runs, (0.0, 1.0))["encoding"]["color"]["scale"]["range"]
    assert len(set(colours)) == 20


def test_tiny_and_huge_values_get_exponent_labels() -> None:
    # A vanishing layer of a 200-layer MLP: activations of 1e-12, densities of 6e9, which
    # Vega's default labels wrote as "-0.000000000000..." and "6,000,000,000,00...".
    frame = pd.DataFrame({"run": "a", "x": [-3e-12, 5e-12], "density": [6e9, 1e9], "epoch": 1.0})
    spec = charts.histogram_chart(frame, ("a",), (-3e-12, 5e-12))
    check(spec)
    assert spec["encoding"]["x"]["axis"]["format"] == ".2~e"
    assert spec["encoding"]["y"]["axis"]["format"] == ".2~e"
    bands = pd.DataFrame({"run": "a", "epoch": [0.0, 1.0], "q15": -1e-12, "q85": 1e-12, "median": 0.0})
    spec = charts.percentile_chart(bands, ("a",), [(0.15, 0.85)], "t")
    check(spec)
    assert spec["layer"][0]["encoding"]["y"]["axis"]["format"] == ".2~e"
    heat = charts.heatmap_chart(
        pd.DataFrame({"t0": [0.0], "t1": [1.0], "y0": [0.0], "y1": [1e-12], "log_density": [12.0]}),
        "a",
        (0.0, 1e-12),
    )
    assert heat["encoding"]["y"]["axis"]["format"] == ".2~e"
    units = pd.DataFrame({"t0": [0.0], "t1": [1.0], "unit": [0], "epoch": [0.0], "value": [5e-16]})
    assert charts.unit_chart(units, "a", "mean")["encoding"]["color"]["legend"]["format"] == ".2~e"
    # Ordinary magnitudes keep Vega's own labels.
    spec = charts.histogram_chart(frame.assign(x=[-0.5, 2.0], density=[0.3, 0.1]), ("a",), (-0.5, 2.0))
    assert "axis" not in spec["encoding"]["x"] and "axis" not in spec["encoding"]["y"]


def test_many_layers_are_coloured_by_depth_not_named_one_by_one() -> None:
    def frame(layers: int) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "run": "a",
                "layer": [f"d{k}" for k in range(layers) for _ in range(2)],
                "order": [k for k in range(layers) for _ in range(2)],
                "epoch": [0.0, 1.0] * layers,
                "grad_norm": 0.5,
            }
        )

    few = charts.gradient_chart(frame(3), "grad_norm", "a")
    check(few)
    assert few["encoding"]["color"]["field"] == "layer" and "detail" not in few["encoding"]
    # A 200-layer MLP: a depth scale from first to last, one line per layer.
    many = charts.gradient_chart(frame(201), "grad_norm", "a")
    check(many)
    color = many["encoding"]["color"]
    assert color["field"] == "order" and color["type"] == "quantitative"
    assert color["legend"]["values"] == [0, 200] and many["encoding"]["detail"]["field"] == "layer"


def test_a_chart_is_as_tall_as_its_legends() -> None:
    """Streamlit draws a chart at its spec's height and cuts off what does not fit: a gradient
    shift chart of 5 layers and 2 runs lost its last run's name at 240 pixels (Chromium)."""

    def frame(layers: int, runs: int) -> pd.DataFrame:
        rows = [(r, k) for r in "abcdef"[:runs] for k in range(layers) for _ in range(2)]
        return pd.DataFrame(
            {
                "run": [r for r, _ in rows],
                "layer": [f"d{k}" for _, k in rows],
                "order": [k for _, k in rows],
                "epoch": [0.0, 1.0] * (len(rows) // 2),
                "grad_norm": 0.5,
                "grad_diff": 0.1,
            }
        )

    # Heights measured in headless Chromium where every name showed.
    assert charts.ics_chart(frame(1, 1), "grad_diff", "d")["height"] == 240  # room to spare
    assert charts.ics_chart(frame(5, 2), "grad_diff", "d")["height"] >= 284
    twelve = charts.ics_chart(frame(12, 3), "grad_diff", "d")["height"]
    assert twelve >= charts.ics_chart(frame(5, 2), "grad_diff", "d")["height"] + 7 * 20 + 20
    assert charts.gradient_chart(frame(3, 1), "grad_norm", "a")["height"] == 260
    assert charts.gradient_chart(frame(12, 1), "grad_norm", "a")["height"] >= 320
    # Ten runs of a sweep compared: the histogram's legend of dots needed 380 pixels.
    runs = [f"run{i:02d}" for i in range(10)]
    ten = pd.DataFrame({"run": runs, "x": 0.0, "density": 1.0, "epoch": 1.0})
    assert charts.histogram_chart(ten, runs, (0.0, 1.0))["height"] >= 380
    assert charts.histogram_chart(ten[:2], runs[:2], (0.0, 1.0))["height"] == 260
    # Beyond 12 layers a depth scale: its height no longer grows with the layers.
    depth = charts.gradient_chart(frame(40, 1), "grad_norm", "a")["height"]
    assert depth == charts.gradient_chart(frame(400, 1), "grad_norm", "a")["height"] >= 300


def test_gradients_leave_zeros_off_the_log_axis() -> None:
    frame = pd.DataFrame(
        {"run": "a", "layer": ["d"] * 3, "order": 0, "epoch": [0.0, 1.0, 2.0], "grad_norm": [0.0, 0.5, 0.25]}
    )
    spec = charts.gradient_chart(frame, "grad_norm", "a")
    shown = spec["datasets"]["gradients"]
    np.testing.assert_array_equal(shown["grad_norm"], [0.5, 0.25])
    assert spec["encoding"]["y"]["scale"] == {"type": "log"}


def test_a_misspelt_field_is_caught() -> None:
    frame = pd.DataFrame({"run": ["a"], "x": [0.0], "density": [1.0], "epoch": [1.0]})
    spec = charts.histogram_chart(frame, ("a",), (0.0, 1.0))
    spec["encoding"]["y"]["field"] = "densty"
    with pytest.raises(AssertionError, match="densty"):
        check(spec)
    spec["encoding"]["y"]["field"] = "density"
    spec["mark"]["type"] = "aera"
    with pytest.raises(ValidationError):
        check(spec)


def test_curves_leave_out_a_metric_no_run_recorded() -> None:
    frame = pd.DataFrame(
        {"run": "a", "epoch": [1, 2], "metric": "loss", "split": "training", "value": [1.0, 0.5]}
    )
    spec = charts.curves_chart(frame, ("a",), 1.0)
    assert [panel["title"] for panel in spec["hconcat"]] == ["Loss"]
    assert set(spec["datasets"]) == {"loss", "capture"}
    both = pd.concat([frame, frame.assign(metric="accuracy"), frame.assign(metric="auc")])
    assert charts.curve_metrics(both) == ["accuracy", "loss"]  # accuracy first, whatever else there is
    assert charts.curve_metrics(both[both.metric != "accuracy"]) == ["auc", "loss"]
    named = pd.concat([frame, frame.assign(metric="auc"), frame.assign(metric="sparse_categorical_accuracy")])
    assert charts.curve_metrics(named) == ["sparse_categorical_accuracy", "loss"]  # a metric object's name
    # A GAN's train_step logs a loss per model and no "loss": both get a panel.
    gan = pd.concat([frame.assign(metric="d_loss"), frame.assign(metric="g_loss")])
    assert charts.curve_metrics(gan) == ["d_loss", "g_loss"]
    spec = charts.curves_chart(gan, ("a",), 1.0)
    assert [panel["title"] for panel in spec["hconcat"]] == ["D_loss", "G_loss"]
    assert [charts.metric_title(m) for m in ("sparse_categorical_accuracy", "mae", "loss")] == [
        "Accuracy",
        "MAE",
        "Loss",
    ]


def test_few_captures_or_epochs_get_dots_many_get_lines_only() -> None:
    one = pd.DataFrame(
        {"run": "a", "layer": ["d", "e"], "order": [0, 1], "epoch": 0.0, "grad_norm": [2.0, 3.0]}
    )
    spec = charts.gradient_chart(one, "grad_norm", "a")
    check(spec)
    assert spec["mark"] == {"type": "line", "point": {"size": 20}}  # a line through one capture draws nothing
    assert spec["encoding"]["x"]["axis"] == {"format": "~g", "tickCount": 10}  # "0", not "0.000000"
    many = pd.DataFrame({"run": "a", "layer": "d", "order": 0, "epoch": np.arange(10.0), "grad_norm": 1.0})
    assert charts.gradient_chart(many, "grad_norm", "a")["mark"] == {"type": "line"}
    # Training curves: whole epochs on the axis, and dashes (not dots) in the legend once the
    # runs have more than a few epochs.
    curves = pd.DataFrame(
        {"run": "a", "epoch": np.arange(1, 11), "metric": "loss", "split": "training", "value": 1.0}
    )
    (panel,) = charts.curves_chart(curves, ("a",))["hconcat"]
    line = panel["layer"][0]
    assert line["mark"] == {"type": "line"}
    assert line["encoding"]["x"]["axis"] == {"tickMinStep": 1, "format": "d"}
    (panel,) = charts.curves_chart(curves.head(1), ("a",))["hconcat"]
    assert panel["layer"][0]["mark"]["point"] == {"size": 12}
    # A run fitted without validation data: no "validation" entry in the legend.
    assert line["encoding"]["strokeDash"]["scale"] == {"domain": ["training"], "range": [[4, 3]]}
    both = pd.concat([curves, curves.assign(split="validation")])
    (panel,) = charts.curves_chart(both, ("a",))["hconcat"]
    scale = panel["layer"][0]["encoding"]["strokeDash"]["scale"]
    assert scale == {"domain": ["training", "validation"], "range": [[4, 3], [1, 0]]}
    # Percentile bands of a run's first capture (a live run's first minutes): a bar per band and
    # a dot for the median, where an area and a line over one epoch drew nothing.
    first = pd.DataFrame({"run": "a", "epoch": [0.0], "q15": [-1.0], "q85": [1.0], "median": [0.0]})
    spec = charts.percentile_chart(first, ("a",), [(0.15, 0.85)], "d")
    check(spec)
    band, median = spec["layer"]
    assert band["mark"]["type"] == "rule" and band["encoding"]["y2"] == {"field": "q85"}
    assert median["mark"]["point"] == {"size": 40} and band["encoding"]["x"]["axis"]["format"] == "~g"
    later = pd.concat([first, first.assign(epoch=1.0), first.assign(epoch=2.0), first.assign(epoch=3.0)])
    band, median = charts.percentile_chart(later, ("a",), [(0.15, 0.85)], "d")["layer"]
    assert (band["mark"]["type"], median["mark"]) == ("area", {"type": "line"})


def test_a_drift_heatmap_spans_each_capture_to_the_next_and_bins_thousands() -> None:
    few = pd.DataFrame(
        {"layer": "d", "order": 0, "epoch": [0.0, 0.25, 1.0], "t0": [0.0, 0.25, 1.0], "t1": [0.25, 1.0, 1.75]}
    ).assign(from_start=[0.0, 0.5, 1.0])
    spec = charts.drift_heatmap(few, "a", "from_start", 1.0)
    check(spec)
    assert spec["encoding"]["x"]["field"] == "t0" and spec["encoding"]["x2"] == {"field": "t1"}
    epochs = np.arange(500) / 10
    many = pd.DataFrame({"layer": "d", "order": 0, "epoch": epochs, "t0": epochs, "t1": epochs + 0.1})
    spec = charts.drift_heatmap(many.assign(from_start=1.0), "a", "from_start", 1.0)
    check(spec)
    assert spec["encoding"]["x"]["bin"] == {"maxbins": 60} and "x2" not in spec["encoding"]
    # Linear up to the step-0 std, by decades above; or from where analysis.drift_colours says.
    assert spec["encoding"]["color"]["scale"]["constant"] == 1.0
    spec = charts.drift_heatmap(few, "a", "from_start", 1500.0, 0.02)
    check(spec)
    assert spec["encoding"]["color"]["scale"]["constant"] == 0.02
    assert spec["encoding"]["color"]["scale"]["domain"] == [0, 1500.0]


def test_drift_scores_get_ticks_where_they_are_and_one_value_a_domain_around_it() -> None:
    def y_axis(scores: list[float]) -> dict[str, Any]:
        frame = pd.DataFrame(
            {"role": "r", "order": range(len(scores)), "run": "a", "layer": "l", "score": scores}
        )
        spec = charts.role_drift_chart(frame, ["a"])
        check(spec)
        return spec["encoding"]["y"] if "encoding" in spec else spec["layer"][0]["encoding"]["y"]

    y = y_axis([501.0, 501.0])  # two runs, the same drift: a domain around it, ticks inside
    low, high = y["scale"]["domain"]
    assert (
        low < 501 < high
        and y["axis"]["values"]
        and all(low / 3 <= t <= high * 3 for t in y["axis"]["values"])
    )
    assert 300.0 in y["axis"]["values"] and 1000.0 in y["axis"]["values"]
    y = y_axis([0.02, 0.5, 40.0, float("nan")])
    assert "domain" not in y["scale"] and y["scale"]["type"] == "log"
    assert {0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0} <= set(y["axis"]["values"])
    # A dead layer's input never moves (score 0): the log scale reached 0 and lost every tick.
    frame = pd.DataFrame(
        {"role": "r", "order": range(4), "run": "a", "layer": "l", "score": [0.0, 0.02, 0.5, float("nan")]}
    )
    drawn = check(charts.role_drift_chart(frame, ["a"]))["scores"]
    assert list(drawn["score"]) == [0.02, 0.5]
