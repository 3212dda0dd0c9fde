"""Altair charts for the app's views. Each takes a frame from `data` and returns a chart."""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import pandas as pd

__all__ = [
    "curves_chart",
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

alt.data_transformers.disable_max_rows()  # frames are already reduced to what is drawn

RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _run_color(runs: Sequence[str]) -> alt.Color:
    return alt.Color(
        "run:N", title="run", scale=alt.Scale(domain=list(runs), range=RUN_COLORS[: max(1, len(runs))])
    )


def curves_chart(df: pd.DataFrame, runs: Sequence[str], current_epoch: float | None = None) -> alt.Chart:
    """Accuracy and loss, training (dashed) and validation (solid), one panel each."""
    panels = []
    for metric in ("accuracy", "loss"):
        part = df[df["metric"] == metric]
        base = (
            alt.Chart(part)
            .mark_line(point=alt.OverlayMarkDef(size=12))
            .encode(
                x=alt.X("epoch:Q", title="epoch"),
                y=alt.Y("value:Q", title=metric, scale=alt.Scale(zero=False)),
                color=_run_color(runs),
                strokeDash=alt.StrokeDash(
                    "split:N",
                    title="data",
                    scale=alt.Scale(domain=["training", "validation"], range=[[4, 3], [1, 0]]),
                ),
                tooltip=["run", "split", "epoch", alt.Tooltip("value:Q", format=".4f")],
            )
        )
        layers = [base]
        if current_epoch is not None:
            layers.append(
                alt.Chart(pd.DataFrame({"epoch": [current_epoch]}))
                .mark_rule(color="gray", strokeDash=[2, 2])
                .encode(x="epoch:Q")
            )
        panels.append(alt.layer(*layers).properties(title=metric.capitalize(), height=230))
    # The legend below the panels: on the right it was cut off in a narrow page.
    return (
        alt.hconcat(*panels)
        .resolve_scale(color="shared", strokeDash="shared")
        .configure_legend(orient="bottom", direction="horizontal", labelLimit=320)
    )


def role_drift_chart(df: pd.DataFrame, runs: Sequence[str]) -> alt.Chart:
    """Drift score of the input of each nonlinearity (model order), runs side by side, log scale."""
    return (
        alt.Chart(df, title="How far the input of each nonlinearity drifted (drift score, log scale)")
        .mark_circle(size=110, opacity=0.9)  # dots: bars have no baseline on a log scale
        .encode(
            x=alt.X("role:N", sort=alt.SortField("order"), title="nonlinearity", axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("run:N", sort=list(runs)),
            y=alt.Y(
                "score:Q",
                title="W1 / step-0 std",
                scale=alt.Scale(type="log", nice=False, padding=12),
                axis=alt.Axis(values=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100]),
            ),
            color=_run_color(runs),
            tooltip=["run", "role", "layer", alt.Tooltip("score:Q", format=".3f")],
        )
        .properties(height=200)
    )


def histogram_chart(df: pd.DataFrame, runs: Sequence[str], x_domain: Sequence[float]) -> alt.Chart:
    """One histogram per run at the chosen capture, overlaid on shared axes."""
    return (
        alt.Chart(df)
        .mark_area(interpolate="step", fillOpacity=0.25, line=True)
        .encode(
            x=alt.X("x:Q", title="activation", scale=alt.Scale(domain=list(x_domain), nice=False)),
            y=alt.Y("density:Q", title="density", stack=None),
            color=_run_color(runs),
            tooltip=[
                "run",
                alt.Tooltip("epoch:Q", format=".2f"),
                alt.Tooltip("x:Q", format=".3g"),
                alt.Tooltip("density:Q", format=".3g"),
            ],
        )
        .properties(height=260)
    )


def ridgeline_chart(df: pd.DataFrame, title: str, x_domain: Sequence[float], step: int = 26) -> alt.Chart:
    """Joy plot: one density per capture, stacked from the start (top) to the end."""
    return (
        alt.Chart(df, title=title)
        .mark_area(
            interpolate="monotone",
            fillOpacity=0.7,
            stroke="white",
            strokeWidth=0.6,
        )
        .encode(
            x=alt.X("x:Q", title="activation", scale=alt.Scale(domain=list(x_domain), nice=False)),
            y=alt.Y("density:Q", axis=None, scale=alt.Scale(range=[step, -step * 2])),
            fill=alt.Fill("epoch:Q", title="epoch", scale=alt.Scale(scheme="viridis")),
            row=alt.Row(
                "epoch:Q",
                title=None,
                sort="ascending",
                header=alt.Header(labelAngle=0, labelAlign="left", format=".0f", labelPadding=2),
            ),
            tooltip=[alt.Tooltip("epoch:Q", format=".2f"), alt.Tooltip("x:Q", format=".3g")],
        )
        .properties(height=step, width=280, bounds="flush")
        .configure_facet(spacing=0)
        .configure_view(stroke=None)
    )


def heatmap_chart(
    df: pd.DataFrame, title: str, y_domain: Sequence[float], color_domain: Sequence[float] | None = None
) -> alt.Chart:
    """Histogram against time: bins (y) by captures (x), colour = log10 density.

    `color_domain`: the log-density range shared by the panels shown side by side.
    """
    return (
        alt.Chart(df, title=title)
        .mark_rect()
        .encode(
            x=alt.X("t0:Q", title="epoch"),
            x2="t1:Q",
            y=alt.Y("y0:Q", title="activation", scale=alt.Scale(domain=list(y_domain), nice=False)),
            y2="y1:Q",
            color=alt.Color(
                "log_density:Q",
                title="log10 density",
                scale=alt.Scale(
                    scheme="inferno", domain=list(color_domain) if color_domain else alt.Undefined
                ),
            ),
            tooltip=[
                alt.Tooltip("t0:Q", title="epoch", format=".2f"),
                alt.Tooltip("y0:Q", title="from", format=".3g"),
                alt.Tooltip("y1:Q", title="to", format=".3g"),
                alt.Tooltip("log_density:Q", format=".2f"),
            ],
        )
        .properties(height=260)
    )


def percentile_chart(
    df: pd.DataFrame,
    runs: Sequence[str],
    pairs: Sequence[tuple[float, float]],
    title: str,
    current_epoch: float | None = None,
) -> alt.Chart:
    """Quantile bands over training (Ioffe & Szegedy Fig. 1), median as a line; a dotted rule
    marks the capture on display."""
    layers = []
    opacity = 0.25 if len(pairs) == 1 else 0.12
    for low, high in pairs:
        lo, hi = f"q{round(low * 100):02d}", f"q{round(high * 100):02d}"
        layers.append(
            alt.Chart(df)
            .mark_area(opacity=opacity)
            .encode(
                x=alt.X("epoch:Q", title="epoch"),
                y=alt.Y(f"{lo}:Q", title="activation"),
                y2=f"{hi}:Q",
                color=_run_color(runs),
                tooltip=[
                    "run",
                    alt.Tooltip("epoch:Q", format=".2f"),
                    alt.Tooltip(f"{lo}:Q", format=".3g"),
                    alt.Tooltip(f"{hi}:Q", format=".3g"),
                ],
            )
        )
    layers.append(
        alt.Chart(df)
        .mark_line()
        .encode(
            x="epoch:Q",
            y="median:Q",
            color=_run_color(runs),
            tooltip=["run", alt.Tooltip("epoch:Q", format=".2f"), alt.Tooltip("median:Q", format=".3g")],
        )
    )
    if current_epoch is not None:
        layers.append(
            alt.Chart(pd.DataFrame({"epoch": [current_epoch]}))
            .mark_rule(color="gray", strokeDash=[2, 2])
            .encode(x="epoch:Q")
        )
    return alt.layer(*layers).properties(title=title, height=260)


def unit_chart(df: pd.DataFrame, title: str, stat: str, limit: float | None = None) -> alt.Chart:
    """Per-unit mean or std (y: unit) over captures (x, labelled by epoch).

    `limit`: the colour range shared by the panels side by side (means: -limit..limit,
    centred on zero; stds: 0..limit).
    """
    if stat == "mean":
        bound = limit if limit else float(df["value"].abs().max() or 1.0)
        scale = alt.Scale(scheme="redblue", domain=[-bound, bound], reverse=True)
    else:
        scale = alt.Scale(scheme="viridis", domain=[0, limit] if limit else alt.Undefined)
    return (
        alt.Chart(df, title=title)
        .mark_rect()
        .encode(
            x=alt.X("t0:Q", title="epoch (time →)", scale=alt.Scale(nice=False)),
            x2="t1:Q",
            y=alt.Y("unit:O", title="unit", axis=alt.Axis(labelOverlap=True)),
            color=alt.Color("value:Q", title=f"unit {stat}", scale=scale),
            tooltip=["unit", alt.Tooltip("epoch:Q", format=".2f"), alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(height=260)
    )


def drift_heatmap(df: pd.DataFrame, title: str, field: str, max_value: float) -> alt.Chart:
    """Layers (y, model order) by captures (x), colour = drift."""
    return (
        alt.Chart(df, title=title)
        .mark_rect()
        .encode(
            x=alt.X("epoch:Q", title="epoch", bin=alt.Bin(maxbins=60)),
            y=alt.Y(
                "layer:N",
                sort=alt.SortField("order"),
                title=None,
                axis=alt.Axis(labelOverlap=False, labelLimit=220),
            ),
            color=alt.Color(
                f"max({field}):Q",
                title="shift (step-0 std)",
                # symlog: the logits' large shifts no longer flatten every other layer to white
                scale=alt.Scale(
                    type="symlog", scheme="oranges", domain=[0, max(max_value, 1e-9)], clamp=True
                ),
            ),
            tooltip=[
                "layer",
                alt.Tooltip("epoch:Q", format=".2f"),
                alt.Tooltip(f"max({field}):Q", format=".3f"),
            ],
        )
        .properties(height=alt.Step(16))
    )


def drift_lines(df: pd.DataFrame, runs: Sequence[str], field: str, title: str) -> alt.Chart:
    return (
        alt.Chart(df, title=title)
        .mark_line()
        .encode(
            x=alt.X("epoch:Q", title="epoch"),
            y=alt.Y(f"{field}:Q", title="shift (step-0 std)"),
            color=_run_color(runs),
            tooltip=[
                "run",
                "layer",
                alt.Tooltip("epoch:Q", format=".2f"),
                alt.Tooltip(f"{field}:Q", format=".3f"),
            ],
        )
        .properties(height=230)
    )


def gradient_chart(df: pd.DataFrame, field: str, title: str) -> alt.Chart:
    """One line per layer (model order), log scale."""
    data = df[df[field] > 0]
    return (
        alt.Chart(data, title=title)
        .mark_line()
        .encode(
            x=alt.X("epoch:Q", title="epoch"),
            y=alt.Y(f"{field}:Q", title=field.replace("_", " "), scale=alt.Scale(type="log")),
            color=alt.Color("layer:N", sort=alt.SortField("order"), scale=alt.Scale(scheme="viridis")),
            tooltip=["layer", alt.Tooltip("epoch:Q", format=".2f"), alt.Tooltip(f"{field}:Q", format=".3g")],
        )
        .properties(height=260)
    )


def ics_chart(df: pd.DataFrame, field: str, title: str) -> alt.Chart:
    return (
        alt.Chart(df, title=title)
        .mark_line()
        .encode(
            x=alt.X("epoch:Q", title="epoch"),
            y=alt.Y(f"{field}:Q", title=field.replace("_", " ")),
            color=alt.Color("layer:N", sort=alt.SortField("order"), scale=alt.Scale(scheme="viridis")),
            strokeDash="run:N",
        )
        .properties(height=240)
    )
