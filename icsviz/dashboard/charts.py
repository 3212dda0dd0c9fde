"""Vega-Lite specs for the app's views. Each takes a frame from `data` and returns a spec.

The specs are plain dicts, written out rather than built with Altair: Altair
builds and checks a chart in 30-120 ms, and a page of a dozen charts paid most
of a second on every rerun (a new layer, a filter, the play button). A dict
costs microseconds. The frames travel in the spec's `datasets`, which
Streamlit sends as Arrow. Every spec is checked against the Vega-Lite schema
in the tests (`tests/test_charts.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..palette import run_color
from ..store.reader import curve_panels, metric_label

__all__ = [
    "Spec",
    "curves_chart",
    "curve_metrics",
    "metric_title",
    "role_drift_chart",
    "histogram_chart",
    "ridgeline_chart",
    "heatmap_chart",
    "percentile_chart",
    "unit_chart",
    "drift_heatmap",
    "drift_lines",
    "gradient_chart",
    "ics_chart",
]

Spec = dict[str, Any]
SCHEMA = "https://vega.github.io/schema/vega-lite/v6.4.1.json"
_RULE = {"type": "rule", "color": "gray", "strokeDash": [2, 2]}  # the capture on display


# ---------------------------------------------------------------- building blocks
def _q(field: str, **props: Any) -> dict[str, Any]:
    return {"field": field, "type": "quantitative", **props}


def _n(field: str, **props: Any) -> dict[str, Any]:
    return {"field": field, "type": "nominal", **props}


def _numbers(values: Any, channel: str = "axis") -> dict[str, Any]:
    """An axis's label format for these values: Vega's default writes a vanishing layer's
    3e-12 as "-0.000000000000..." and the densities of so narrow a histogram as
    "6,000,000,000,00...", so magnitudes below 0.001 or from 10^6 up read "3e-12"; others keep
    Vega's own (0.25, 1,200)."""
    magnitudes = np.abs(np.asarray(values, float).ravel())
    magnitudes = magnitudes[np.isfinite(magnitudes) & (magnitudes > 0)]
    if not len(magnitudes) or 1e-3 <= magnitudes.max() < 1e6:
        return {}
    return {channel: {"format": ".2~e", "labelExpr": "datum.value === 0 ? '0' : datum.label"}}  # not 0e+0


def _spec(datasets: dict[str, pd.DataFrame], **props: Any) -> Spec:
    """A top-level spec: its frames by name (Streamlit sends them as Arrow) and the schema."""
    return {**props, "datasets": datasets, "$schema": SCHEMA}


def _view(name: str, frame: pd.DataFrame, **props: Any) -> Spec:
    """A top-level spec of one view drawing one frame, the dataset `name`."""
    return _spec({name: frame}, data={"name": name}, **props)


def _room_for_runs(height: int, runs: Sequence[str], row: int = 30) -> int:
    """`height`, or taller where the runs' legend needs it (a sweep's ten runs compared). `row`:
    30 pixels a run where the legend shows dots (areas, circles), 20 where it shows lines."""
    return max(height, _CHART_TITLE + _LEGEND_TITLE + row * len(runs))


def _legend_height(df: pd.DataFrame) -> int:
    """Pixels that the layer legend takes as Streamlit draws it: a title, then a row per named
    layer, or the depth scale's gradient (200 pixels long by default) and its labels."""
    layers = df["layer"].nunique()
    return _LEGEND_TITLE + (_LEGEND_ROW * layers if layers <= _NAMED_LAYERS else 200 + _LEGEND_ROW)


# Measured in headless Chromium on Streamlit's theme: rows of lines 20 pixels apart, 40 between
# two legends, the chart's title above them; the chart's height is all of it.
_LEGEND_TITLE, _LEGEND_ROW, _LEGEND_GAP, _CHART_TITLE = 24, 20, 40, 56


def _run_color(runs: Sequence[str]) -> dict[str, Any]:
    """One colour per run, the same in every chart (runs in the order they are chosen)."""
    scale = {"domain": list(runs), "range": [run_color(i) for i in range(max(1, len(runs)))]}
    return _n("run", title="run", scale=scale)


# Epochs with no more digits than they have ("2", "2.5"): a single capture's axis read 0.000000.
# About ten ticks whatever the width: a run of 3 epochs had 31 labels, one every 0.1.
_EPOCH_AXIS = {"format": "~g", "tickCount": 10}


def _capture_axis(df: pd.DataFrame, **axis: Any) -> dict[str, Any]:
    """`axis` for a heatmap's epoch axis: a run of one capture, whose cell is centred on it
    (`time_edges`), gets that one epoch as its only tick instead of -0.4 ... 0.4."""
    if len(df) and df["t0"].nunique() == 1:
        return {**axis, "values": [float((df["t0"].iloc[0] + df["t1"].iloc[0]) / 2)]}
    return axis


def _epoch_rule(name: str) -> Spec:
    return {"data": {"name": name}, "mark": _RULE, "encoding": {"x": _q("epoch")}}


def _rule_frame(epoch: float) -> pd.DataFrame:
    return pd.DataFrame({"epoch": [epoch]})


# ---------------------------------------------------------------- charts
def curves_chart(df: pd.DataFrame, runs: Sequence[str], current_epoch: float | None = None) -> Spec:
    """Accuracy and loss, training (dashed) and validation (solid), one panel each; a metric
    no run recorded (a model compiled without accuracy) gets no panel, not an empty one."""
    datasets: dict[str, pd.DataFrame] = {}
    if current_epoch is not None:
        datasets["capture"] = _rule_frame(current_epoch)
    panels = []
    few = df["epoch"].nunique() <= 3
    # Only the splits recorded: a run fitted without validation data has no "validation" entry.
    splits = [split for split in ("training", "validation") if split in set(df["split"])]
    dashes = {"training": [4, 3], "validation": [1, 0]}
    for metric in curve_metrics(df):
        datasets[metric] = df[df["metric"] == metric]
        line = {
            "data": {"name": metric},
            # Dots only where there are few epochs (a line through one draws nothing): with
            # them the legend shows dots too, not the dashes that tell training from validation.
            "mark": {"type": "line", "point": {"size": 12}} if few else {"type": "line"},
            "encoding": {
                # Whole epochs: no tick at 1.2 on a run of four.
                "x": _q("epoch", title="epoch", axis={"tickMinStep": 1, "format": "d"}),
                # "~g": a constant accuracy's lone tick read "0.512500"
                "y": _q("value", title=metric, scale={"zero": False}, axis={"format": "~g"}),
                "color": _run_color(runs),
                "strokeDash": _n(
                    "split",
                    title="data",
                    scale={"domain": splits, "range": [dashes[split] for split in splits]},
                ),
                "tooltip": [_n("run"), _n("split"), _q("epoch"), _q("value", format=".4f")],
            },
        }
        layers = [line, _epoch_rule("capture")] if current_epoch is not None else [line]
        panels.append({"layer": layers, "height": 230, "title": metric_title(metric)})
    # The legend below the panels: on the right it was cut off in a narrow page.
    return _spec(
        datasets,
        hconcat=panels,
        resolve={"scale": {"color": "shared", "strokeDash": "shared"}},
        config={"legend": {"orient": "bottom", "direction": "horizontal", "labelLimit": 320}},
    )


def curve_metrics(df: pd.DataFrame) -> list[str]:
    """The panels of the training curves: accuracy (or, for a model compiled without it, the
    first metric it recorded, such as a regression's mae), then the loss; only those with rows.
    A `train_step` of the user's own that logs no "loss" (a GAN's "d_loss" and "g_loss") gets
    its first two metrics."""
    return curve_panels(list(dict.fromkeys(df["metric"])))


def metric_title(metric: str) -> str:
    """A panel's title: "Accuracy", "Loss", and Keras's short metric names as the
    abbreviations they are ("MAE"); a metric object's "sparse_categorical_accuracy" is the accuracy
    (`metric_label`)."""
    label = metric_label(metric)
    return label[:1].upper() + label[1:]


def role_drift_chart(df: pd.DataFrame, runs: Sequence[str], paired: bool = True) -> Spec:
    """Drift score of the input of each nonlinearity (model order), runs side by side, log scale.
    `paired`: the runs' nonlinearities are paired by role (named by the first run's); else the
    k-th of each run stands at k, and the tooltip names its tensor."""
    x_title = (
        "nonlinearity" if paired else "k-th nonlinearity of each run (not paired: the runs differ in depth)"
    )
    # A score of 0 (an input that never moved, a dead layer) or none has no place on a log
    # scale: in the data, Vega's domain reached 0 and the axis lost every tick
    # (`data.off_log_scale` says what was left out).
    df = df[df["score"] > 0]
    return _view(
        "scores",
        df,
        mark={"type": "circle", "size": 110, "opacity": 0.9},  # dots: bars have no baseline on a log scale
        encoding={
            "x": _n("role", sort={"field": "order"}, title=x_title, axis={"labelAngle": 0}),
            "xOffset": _n("run", sort=list(runs)),
            "y": _q("score", title="W1 / step-0 std", **_log_score_axis(df["score"])),
            "color": _run_color(runs),
            "tooltip": [_n("run"), _n("role"), _n("layer"), _q("score", format=".3~g")],
        },
        # Streamlit fits the whole chart, title and axes included, into this height: at 200 the
        # plot was 80 px and Vega dropped the 0.3 and 3 labels of the log axis.
        height=_room_for_runs(300, runs),
        title="How far the input of each nonlinearity drifted (drift score, log scale)",
    )


def _log_score_axis(scores: pd.Series) -> dict[str, Any]:
    """A log scale and 1-3-10 ticks that cover the scores (drift of 500 had no tick at all when
    the ticks stopped at 100), and a domain around them when they are all one value (Vega then
    drew overlapping labels of nothing)."""
    values = scores[np.isfinite(scores) & (scores > 0)]
    scale: dict[str, Any] = {"type": "log", "nice": False, "padding": 12}
    if values.empty:
        return {"scale": scale}
    low, high = float(values.min()), float(values.max())
    if high / low < 3:  # one value, or nearly: a decade around it
        low, high = low / 3, high * 3
        scale["domain"] = [low, high]
    decades = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
    ticks = [float(f"{m * 10.0**e:.1g}") for e in decades for m in (1, 3)]  # 0.3, not 0.30000000000000004
    ticks = [t for t in ticks if low / 3 <= t <= high * 3]
    return {"scale": scale, "axis": {"values": ticks}}


def histogram_chart(df: pd.DataFrame, runs: Sequence[str], x_domain: Sequence[float]) -> Spec:
    """One histogram per run at the chosen capture, overlaid on shared axes."""
    return _view(
        "histogram",
        df,
        mark={"type": "area", "interpolate": "step", "fillOpacity": 0.25, "line": True},
        encoding={
            "x": _q(
                "x", title="activation", scale={"domain": list(x_domain), "nice": False}, **_numbers(x_domain)
            ),
            "y": _q("density", title="density", stack=None, **_numbers(df["density"])),
            "color": _run_color(runs),
            "tooltip": [
                _n("run"),
                _q("epoch", format=".2f"),
                _q("x", format=".3g"),
                _q("density", format=".3g"),
            ],
        },
        height=_room_for_runs(260, runs),
    )


def ridgeline_chart(df: pd.DataFrame, title: str, x_domain: Sequence[float], step: int = 26) -> Spec:
    """Joy plot: one density per capture, stacked from the start (top) to the end."""
    return _view(
        "densities",
        df,
        mark={
            "type": "area",
            "interpolate": "monotone",
            "fillOpacity": 0.7,
            "stroke": "white",
            "strokeWidth": 0.6,
        },
        encoding={
            "x": _q(
                "x", title="activation", scale={"domain": list(x_domain), "nice": False}, **_numbers(x_domain)
            ),
            # A range reaching above the row: each density overlaps the row before it.
            "y": _q("density", axis=None, scale={"range": [step, -step * 2]}),
            "fill": _q("epoch", title="epoch", scale={"scheme": "viridis"}, legend={"format": "~g"}),
            "row": _q(
                "epoch",
                title=None,
                sort="ascending",
                header={"labelAngle": 0, "labelAlign": "left", "format": ".0f", "labelPadding": 2},
            ),
            "tooltip": [_q("epoch", format=".2f"), _q("x", format=".3g")],
        },
        title=title,
        height=step,
        width=280,
        bounds="flush",
        config={"facet": {"spacing": 0}, "view": {"stroke": None}},
    )


def heatmap_chart(
    df: pd.DataFrame, title: str, y_domain: Sequence[float], color_domain: Sequence[float] | None = None
) -> Spec:
    """Histogram against time: bins (y) by captures (x), colour = log10 density.

    `color_domain`: the log-density range shared by the panels shown side by side.
    """
    color_scale: dict[str, Any] = {"scheme": "inferno"}
    if color_domain:
        color_scale["domain"] = list(color_domain)
    return _view(
        "heatmap",
        df,
        mark={"type": "rect"},
        encoding={
            "x": _q("t0", title="epoch", axis=_capture_axis(df)),
            "x2": {"field": "t1"},
            "y": _q(
                "y0",
                title="activation",
                scale={"domain": list(y_domain), "nice": False},
                **_numbers(y_domain),
            ),
            "y2": {"field": "y1"},
            "color": _q("log_density", title="log10 density", scale=color_scale),
            "tooltip": [
                _q("t0", title="epoch", format=".2f"),
                _q("y0", title="from", format=".3g"),
                _q("y1", title="to", format=".3g"),
                _q("log_density", format=".2f"),
            ],
        },
        title=title,
        height=260,
    )


def percentile_chart(
    df: pd.DataFrame,
    runs: Sequence[str],
    pairs: Sequence[tuple[float, float]],
    title: str,
    current_epoch: float | None = None,
) -> Spec:
    """Quantile bands over training (Ioffe & Szegedy Fig. 1), median as a line; a dotted rule
    marks the capture on display."""
    datasets = {"bands": df}
    opacity = 0.25 if len(pairs) == 1 else 0.12
    # A run's first capture (a live run's first minutes): an area over one epoch has no width,
    # so each band is a bar at it and the median a dot.
    single = df["epoch"].nunique() <= 1
    band = (
        {"type": "rule", "strokeWidth": 10, "opacity": 2 * opacity}
        if single
        else {"type": "area", "opacity": opacity}
    )
    layers = []
    values = _numbers(df[[column for column in df.columns if column.startswith("q")] + ["median"]])
    for low, high in pairs:
        lo, hi = f"q{round(low * 100):02d}", f"q{round(high * 100):02d}"
        layers.append(
            {
                "data": {"name": "bands"},
                "mark": band,
                "encoding": {
                    "x": _q("epoch", title="epoch", axis=_EPOCH_AXIS),
                    "y": _q(lo, title="activation", **values),
                    "y2": {"field": hi},
                    "color": _run_color(runs),
                    "tooltip": [
                        _n("run"),
                        _q("epoch", format=".2f"),
                        _q(lo, format=".3g"),
                        _q(hi, format=".3g"),
                    ],
                },
            }
        )
    layers.append(
        {
            "data": {"name": "bands"},
            "mark": {"type": "line", "point": {"size": 40}}
            if df["epoch"].nunique() <= 3
            else {"type": "line"},
            "encoding": {
                "x": _q("epoch"),
                "y": _q("median"),
                "color": _run_color(runs),
                "tooltip": [_n("run"), _q("epoch", format=".2f"), _q("median", format=".3g")],
            },
        }
    )
    if current_epoch is not None:
        datasets["capture"] = _rule_frame(current_epoch)
        layers.append(_epoch_rule("capture"))
    return _spec(datasets, layer=layers, height=_room_for_runs(260, runs), title=title)


def unit_chart(df: pd.DataFrame, title: str, stat: str, limit: float | None = None) -> Spec:
    """Per-unit mean or std (y: unit) over captures (x, labelled by epoch).

    `limit`: the colour range shared by the panels side by side (means: -limit..limit,
    centred on zero; stds: 0..limit).
    """
    if stat == "mean":
        bound = limit if limit else float(df["value"].abs().max() or 1.0)
        scale: dict[str, Any] = {"scheme": "redblue", "domain": [-bound, bound], "reverse": True}
    else:
        scale = {"scheme": "viridis", **({"domain": [0, limit]} if limit else {})}
    return _view(
        "units",
        df,
        mark={"type": "rect"},
        encoding={
            "x": _q("t0", title="epoch (time →)", scale={"nice": False}, axis=_capture_axis(df)),
            "x2": {"field": "t1"},
            "y": {"field": "unit", "type": "ordinal", "title": "unit", "axis": {"labelOverlap": True}},
            "color": _q("value", title=f"unit {stat}", scale=scale, **_numbers(df["value"], "legend")),
            "tooltip": [_q("unit"), _q("epoch", format=".2f"), _q("value", format=".4g")],
        },
        title=title,
        height=260,
    )


# Up to this many captures a drift heatmap gives each its own column, from it to the next;
# beyond, captures are binned (the largest drift of each bin shown): thousands of step captures.
_HEATMAP_COLUMNS = 60


def drift_heatmap(
    df: pd.DataFrame, title: str, field: str, max_value: float, decades_from: float | None = None
) -> Spec:
    """Layers (y, model order) by captures (x), colour = drift: linear up to `decades_from`
    (1, the step-0 std, by default) and by decades above it (`analysis.drift_colours`)."""
    if df["epoch"].nunique() <= _HEATMAP_COLUMNS:  # a few captures: no gaps between them
        x = {
            "x": _q("t0", title="epoch", scale={"nice": False}, axis=_capture_axis(df, **_EPOCH_AXIS)),
            "x2": {"field": "t1"},
        }
    else:
        x = {"x": _q("epoch", title="epoch", bin={"maxbins": _HEATMAP_COLUMNS}, axis=_EPOCH_AXIS)}
    return _view(
        "drift",
        df,
        mark={"type": "rect"},
        encoding={
            **x,
            "y": _n(
                "layer", sort={"field": "order"}, title=None, axis={"labelOverlap": False, "labelLimit": 220}
            ),
            "color": _q(
                field,
                aggregate="max",
                title="shift (step-0 std)",
                # symlog: the logits' large shifts no longer flatten every other layer to white
                scale={
                    "type": "symlog",
                    "constant": decades_from or 1.0,
                    "scheme": "oranges",
                    "domain": [0, max(max_value, 1e-9)],
                    "clamp": True,
                },
            ),
            "tooltip": [_n("layer"), _q("epoch", format=".2f"), _q(field, aggregate="max", format=".3f")],
        },
        title=title,
        height={"step": 16},
    )


def drift_lines(df: pd.DataFrame, runs: Sequence[str], field: str, title: str) -> Spec:
    return _view(
        "drift",
        df,
        mark={"type": "line"},
        encoding={
            "x": _q("epoch", title="epoch", axis=_EPOCH_AXIS),
            "y": _q(field, title="shift (step-0 std)"),
            "color": _run_color(runs),
            "tooltip": [_n("run"), _n("layer"), _q("epoch", format=".2f"), _q(field, format=".3f")],
        },
        title=title,
        height=_room_for_runs(230, runs, row=_LEGEND_ROW),
    )


# Up to this many layers a chart's legend names each; beyond, it is a depth scale (the
# gradients of a 200-layer MLP listed 201 names in a legend that scrolled).
_NAMED_LAYERS = 12


def _layer_color(df: pd.DataFrame) -> dict[str, Any]:
    """Layers coloured by depth (model order), from the input side (dark) to the output: the
    "color" channel, and "detail" (one line per layer) where there are too many to name."""
    if df["layer"].nunique() <= _NAMED_LAYERS:
        return {"color": _n("layer", sort={"field": "order"}, scale={"scheme": "viridis"})}
    last = int(df["order"].max())
    legend = {"values": [0, last], "labelExpr": "datum.value === 0 ? 'first' : 'last'"}  # as the PNGs
    depth = _q("order", title="layer depth", scale={"scheme": "viridis"}, legend=legend)
    return {"color": depth, "detail": _n("layer")}


def gradient_chart(df: pd.DataFrame, field: str, title: str) -> Spec:
    """One line per layer (model order), log scale; with a dot per capture when there are
    few (a line through one capture draws nothing)."""
    shown = df[df[field] > 0]  # zeros have no place on a log axis
    few = shown["epoch"].nunique() <= 3
    return _view(
        "gradients",
        shown,
        mark={"type": "line", "point": {"size": 20}} if few else {"type": "line"},
        encoding={
            "x": _q("epoch", title="epoch", axis=_EPOCH_AXIS),
            "y": _q(field, title=field.replace("_", " "), scale={"type": "log"}),
            **_layer_color(shown),
            "tooltip": [_n("layer"), _q("epoch", format=".2f"), _q(field, format=".3g")],
        },
        title=title,
        height=max(260, _CHART_TITLE + _legend_height(shown)),  # 12 layers' names need 320
    )


def ics_chart(df: pd.DataFrame, field: str, title: str) -> Spec:
    # Two legends, the layers' and the runs' (dashes), one under the other: the chart is as
    # tall as they are, or Streamlit cuts off the last runs' names (5 layers and 2 runs were
    # already too many for a 240-pixel chart).
    runs = _LEGEND_GAP + _LEGEND_TITLE + _LEGEND_ROW * df["run"].nunique()
    return _view(
        "shift",
        df,
        mark={"type": "line"},
        encoding={
            "x": _q("epoch", title="epoch", axis=_EPOCH_AXIS),
            "y": _q(field, title=field.replace("_", " ")),
            **_layer_color(df),
            "strokeDash": _n("run"),
        },
        title=title,
        height=max(240, _CHART_TITLE + _legend_height(df) + runs),
    )
