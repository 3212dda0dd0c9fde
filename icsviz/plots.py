"""Publication figures from run files (matplotlib, Agg): `icsviz plot`.

Each `figure_*` function takes {label: Run} and returns a matplotlib Figure;
`plot_runs` writes the whole set as PNG and PDF. A figure whose data a run did
not record says so in a `MissingDataError` (and `plot_runs` skips it with a note).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, works headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize, SymLogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogFormatterSciNotation, MaxNLocator  # noqa: E402

from . import analysis  # noqa: E402
from .errors import ICSVizError, MissingDataError  # noqa: E402
from .histograms import densities, rebin_captures, ridgeline_captures, shared_edges, time_edges  # noqa: E402
from .palette import run_color  # noqa: E402
from .store.reader import (  # noqa: E402
    ActivationStats,
    Run,
    accuracy_of,
    curve_panels,
    first_metric,
    metric_label,
    metric_names,
)

__all__ = [
    "STYLE",
    "figure_accuracy",
    "figure_metric",
    "left_out",
    "figure_loss",
    "figure_ioffe",
    "figure_ioffe_steps",
    "figure_layer",
    "figure_drift_matrix",
    "figure_drift_comparison",
    "figure_gradients",
    "figure_gradient_shift",
    "hidden_input_layer",
    "headline_metric",
    "second_metric",
    "plot_runs",
    "missing_glyphs_noted",
]

Runs = Mapping[str, Run]
FULL_WIDTH, PANEL_WIDTH = 7.0, 3.4  # inches: a two-column paper's page and column
# Fonts for the characters DejaVu Sans lacks (layer names in Chinese, Japanese or Korean, which
# Keras allows on JAX and torch): Matplotlib falls back glyph by glyph on the first installed.
_FALLBACK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK KR",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Hiragino Sans",
    "Apple SD Gothic Neo",
    "Malgun Gothic",
)


def _font_family() -> list[str]:
    """DejaVu Sans (Matplotlib's own), then the fallback fonts installed here."""
    from matplotlib import font_manager  # noqa: PLC0415

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(name for name in _FALLBACK_FONTS if name in installed)]


STYLE = {
    "font.family": _font_family(),
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.2,
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}
# A panel of a log axis whose values were all recorded as 0 (a saturated softmax's gradients
# under Keras's clipped cross-entropy): the values are there, unlike a probe without labels.
ALL_ZERO_NOTE = "every value recorded\nis 0: a log axis\ncannot show it"
# The drift comparison's bars: beyond this many, every n-th is labelled, about SHOWN_TICKS.
MAX_NAMED_BARS = 24
SHOWN_TICKS = 16


def _figure(
    width: float, height: float, ncols: int = 1, nrows: int = 1, **kwargs: object
) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width, height), squeeze=False, layout="constrained", **kwargs
    )
    return fig, axes


def _mark_divergence(ax: plt.Axes, run: Run, color: str, *, horizontal: bool = False) -> None:
    """A dotted rule and a cross where the run diverged (x = epoch, or y = epoch when `horizontal`)."""
    found = analysis.divergence(run)
    if found is None:
        return
    if horizontal:  # shade what comes after: the histograms there hold no finite values
        top = ax.get_ylim()[1]
        ax.axhspan(found.epoch, top, color="0.9", zorder=0, linewidth=0)
        ax.axhline(found.epoch, color="0.3", linestyle=":", linewidth=1.0)
        ax.text(
            sum(ax.get_xlim()) / 2,
            (found.epoch + top) / 2,
            f"NaN/Inf from epoch {found.epoch:g}",
            color="0.3",
            fontsize=7,
            ha="center",
            va="center",
        )
        return
    ax.axvline(found.epoch, color=color, linestyle=":", linewidth=1.0)
    ax.plot([found.epoch], [ax.get_ylim()[1]], "x", color=color, clip_on=False, markersize=6)
    ax.annotate(
        "diverged",
        (found.epoch, ax.get_ylim()[1]),
        xytext=(3, -9),
        textcoords="offset points",
        color=color,
        fontsize=6,
    )


# ---------------------------------------------------------------- runs a figure leaves out
def left_out(fig: Figure) -> list[str]:
    """Why a figure of several runs left some of them out (a run stopped before its first
    epoch, one without the layer): one line per run, empty when it drew them all."""
    return list(getattr(fig, "_icsviz_left_out", []))


def _drawn(fig: Figure, left: list[str]) -> Figure:
    fig._icsviz_left_out = left  # type: ignore[attr-defined]  # read by left_out()
    return fig


def _nothing_drawn(fig: Figure, left: list[str]) -> MissingDataError:
    plt.close(fig)
    return MissingDataError("; ".join(left))


class _PlainLogFormatter(LogFormatterSciNotation):
    """matplotlib's log-axis labels, on the same ticks, as plain numbers (0.006, 0.3, 200)
    where the whole axis lies from 0.001 to 10^4: within a decade its default labels read
    6 x 10^-1, 4 x 10^-1, ... Wider or smaller axes keep powers of ten on every tick."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        label = super().__call__(x, pos)
        low, high = sorted(self.axis.get_view_interval()) if self.axis is not None else (x, x)
        return f"{x:g}" if label and 1e-3 <= low and high < 1e4 else label


def _log_y(ax: plt.Axes) -> None:
    """A log y axis labelled by `_PlainLogFormatter`."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter())
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


# ---------------------------------------------------------------- the seed article's two plots
def _whole_epochs(ax: plt.Axes) -> None:
    """Ticks on whole epochs in steps of 1, 2, 5 or 10 (a 2-epoch run had ticks at 1.25,
    matplotlib's integer ticks alone put 50 epochs' at 0, 6, 12)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def _histories(runs: Runs) -> tuple[list[tuple[int, str, Mapping[str, np.ndarray], np.ndarray]], list[str]]:
    """(colour index, label, history, epochs counted from 1) of each run that finished an epoch,
    and why the others are left out (a run stopped before its first epoch ended)."""
    found, left = [], []
    for i, (label, run) in enumerate(runs.items()):
        if not len(run.history_epochs):
            left.append(f"{label}: no epoch has finished yet, so there are no per-epoch metrics")
            continue
        found.append((i, label, run.history, run.history_epochs + 1))
    return found, left


def headline_metric(runs: Runs) -> str | None:
    """The metric of the first training-curve figure, as the app's first panel: accuracy, or
    for a model compiled without it (a regression) the first metric it recorded (mae)."""
    return first_metric([name for run in runs.values() for name in run.metric_names])


def second_metric(runs: Runs) -> str | None:
    """The metric drawn in the loss figure's place, where no run logged a "loss": a train_step of
    the user's own that logs a loss per model (a GAN's "d_loss" and "g_loss") gets its second
    metric, as the app's second panel. None where the loss figure is drawn."""
    panels = curve_panels([name for run in runs.values() for name in run.metric_names])
    return None if len(panels) < 2 or panels[1] == "loss" else panels[1]


def figure_accuracy(runs: Runs) -> Figure:
    """Validation accuracy per epoch, one line per run (`figure_metric` of "accuracy")."""
    return figure_metric(runs, "accuracy")


def _curve(ax: plt.Axes, epochs: np.ndarray, values: np.ndarray, *style: str, **kwargs: Any) -> None:
    """A per-epoch curve through the epochs that have a value: `fit(validation_freq=k)` leaves
    the validation metrics NaN in between, and a line through NaNs draws nothing at all."""
    kept = np.isfinite(values)
    if not kept.all():  # mark the epochs measured, so that a line does not pass for them
        kwargs = {"marker": "o", "markersize": 2.5, **kwargs}
    ax.plot(epochs[kept], values[kept], *style, **kwargs)


def figure_metric(runs: Runs, metric: str | None = None) -> Figure:
    """A metric's validation curve per epoch, one line per run; a run fitted without validation
    data shows its training curve instead, dashed as in `figure_loss`. `metric`: accuracy by
    default, else the first the runs recorded (`headline_metric`)."""
    metric = metric or headline_metric(runs)
    if metric is None:
        raise MissingDataError("no run recorded a metric besides its loss (compile with metrics=[...])")
    fig, axes = _figure(PANEL_WIDTH, 2.4)
    ax = axes[0, 0]
    validated = True
    histories, left = _histories(runs)
    for i, label, history, epochs in histories:
        # Each run's own name for it: one run's "accuracy" is another's "cls_accuracy" (a
        # multi-output model) or "sparse_categorical_accuracy" (a metric object).
        own = (accuracy_of(metric_names(history)) or metric) if metric_label(metric) == "accuracy" else metric
        if f"val_{own}" in history:
            _curve(ax, epochs, history[f"val_{own}"], color=run_color(i), label=label)
        elif own in history:
            validated = False
            _curve(ax, epochs, history[own], "--", color=run_color(i), label=f"{label} (training)")
        elif metric.endswith("_loss"):  # one output's loss of another run's multi-output model
            left.append(f"{label}: no {metric} in its history (its model has no output of that name)")
        else:
            wanted = "accuracy" if metric_label(metric) == "accuracy" else metric
            left.append(f"{label}: no {wanted} in its history (compile the model with metrics=[{wanted!r}])")
    if len(left) == len(runs):
        raise _nothing_drawn(fig, left)
    name = metric_label(metric)
    which = f"validation {name}" if validated else name
    ax.set(xlabel="epoch", ylabel=which, title=which[:1].upper() + which[1:])
    _whole_epochs(ax)
    for i, run in enumerate(runs.values()):
        _mark_divergence(ax, run, run_color(i))
    ax.legend(frameon=False)
    return _drawn(fig, left)


def figure_loss(runs: Runs) -> Figure:
    """Training (dashed) and validation (solid) loss per epoch for each run."""
    fig, axes = _figure(PANEL_WIDTH, 2.4)
    ax = axes[0, 0]
    validated = False
    histories, left = _histories(runs)
    for i, label, history, epochs in histories:
        if "loss" not in history:
            left.append(f"{label}: no loss in its history")
            continue
        _curve(ax, epochs, history["loss"], "--", color=run_color(i), label=f"{label} (training)")
        if "val_loss" in history:
            validated = True
            _curve(ax, epochs, history["val_loss"], "-", color=run_color(i), label=f"{label} (validation)")
    if len(left) == len(runs):
        raise _nothing_drawn(fig, left)
    ax.set(
        xlabel="epoch", ylabel="loss", title="Training and validation loss" if validated else "Training loss"
    )
    _whole_epochs(ax)
    for i, run in enumerate(runs.values()):
        _mark_divergence(ax, run, run_color(i))
    ax.legend(frameon=False)
    return _drawn(fig, left)


# ---------------------------------------------------------------- Ioffe & Szegedy Fig. 1
def hidden_input_layer(run: Run) -> str:
    """The input of the last hidden nonlinearity: the last of `nonlinearity_inputs` but the
    output layer's own (a softmax).

    fc1 for the baseline CNN (feeding fc1_relu), fc1_bn for its BN twin, fc3 /
    fc3_bn for Ioffe's MLP: the quantity of Ioffe & Szegedy's Fig. 1 (b, c). For a
    model whose last hidden layer is an LSTM, that LSTM's input (its gates'
    pre-activations are out of reach). For a model with a linear output (a regression,
    logits), the last nonlinearity is a hidden one.
    """
    roles = analysis.nonlinearity_inputs(run)
    output = run.layers[-1].name if run.layers else None
    hidden = roles[:-1] if roles and roles[-1].nonlinearity == output else roles
    if hidden:
        return hidden[-1].layer
    raise MissingDataError(
        f"{run.path.name}: no hidden nonlinearity found to follow; choose a layer with "
        "`icsviz plot --ioffe-layer NAME` (or figure_ioffe(runs, layer=NAME))"
    )


def _panel_title(label: str, what: str, narrow: bool) -> str:
    """A run's panel title: "label: what"; on two lines where more than two panels share the
    width (four runs' titles ran into each other)."""
    return f"{label}\n{what}" if narrow else f"{label}: {what}"


def _ioffe_panel(
    ax: plt.Axes,
    label: str,
    name: str,
    acts: ActivationStats,
    x: np.ndarray,
    color: str,
    narrow: bool = False,
    **line: float,
) -> None:
    """One run's panel of Ioffe's Fig. 1: a tracked unit's 15/50/85 percentiles over `x`;
    `narrow` (more than two panels side by side): the title on two lines."""
    unit = int(acts.tracked_units[len(acts.tracked_units) // 2])
    lo, mid, hi = (acts.unit_quantile(unit, q) for q in (0.15, 0.5, 0.85))
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
    # One capture (a run stopped early) is a point: a line through it draws nothing.
    point = {"marker": "o", "markersize": 3} if len(x) < 2 else {}
    for series, style in ((lo, ":"), (mid, "-"), (hi, ":")):
        ax.plot(x, series, style, color=color, **point, **line)
    if len(x) == 1:
        ax.set_xticks(x)
    ax.set(title=_panel_title(label, f"{name}, unit {unit}", narrow))


def _ioffe_panels(
    runs: Runs, layer: str | None, read: Callable[[Run, str], ActivationStats]
) -> tuple[list[tuple[str, str, ActivationStats]], list[str]]:
    """(label, layer, statistics) of each run Fig. 1 can follow, and why the others are left
    out; an error when none is left."""
    panels, left = [], []
    for label, run in runs.items():
        try:
            name = layer or hidden_input_layer(run)
            acts = read(run, name)
            if not len(acts.tracked_units):
                raise MissingDataError(
                    f"{label}: layer {name!r} tracks no unit (ICSCallback(tracked_units=...))"
                )
        except MissingDataError as exc:
            left.append(str(exc))
            continue
        panels.append((label, name, acts))
    if not panels:
        raise MissingDataError("; ".join(left))
    return panels, left


def figure_ioffe(runs: Runs, layer: str | None = None) -> Figure:
    """15/50/85 percentiles of one tracked unit's input over training, runs side by side."""
    panels, left = _ioffe_panels(runs, layer, lambda run, name: run.activations(name))
    n = len(panels)
    fig, axes = _figure(FULL_WIDTH if n > 1 else PANEL_WIDTH, 2.4, ncols=n, sharey=True)
    for ax, (label, name, acts) in zip(axes[0], panels):
        _ioffe_panel(ax, label, name, acts, acts.epochs, run_color(list(runs).index(label)), narrow=n > 2)
        ax.set_xlabel("epoch")
        if len(acts.epochs) > 1 and np.all(np.mod(acts.epochs, 1) == 0):  # epoch captures: no tick at 0.5
            _whole_epochs(ax)
    axes[0, 0].set_ylabel(f"{_ioffe_quantity(layer)}\n(15th, 50th, 85th percentile)")
    return _drawn(fig, left)


def _ioffe_quantity(layer: str | None) -> str:
    """The y label: what the default layer is (the input of the last hidden nonlinearity);
    a layer the user chose is whatever it is."""
    return "input to the activation" if layer is None else "the unit's value"


def figure_ioffe_steps(runs: Runs, layer: str | None = None) -> Figure:
    """Ioffe & Szegedy's Fig. 1 at step resolution: the same unit's 15/50/85 percentiles on
    every training batch (per-step mode, `batch_stats=True`), runs side by side."""
    have = {label: run for label, run in runs.items() if run.has_batch_stats}
    if not have:
        raise MissingDataError("no run was recorded with batch_stats=True (per-step statistics)")
    panels, left = _ioffe_panels(have, layer, lambda run, name: run.batch_activations(name))
    left = [
        f"{label}: no per-step statistics (batch_stats=True)" for label in runs if label not in have
    ] + left
    n = len(panels)
    fig, axes = _figure(FULL_WIDTH if n > 1 else PANEL_WIDTH, 2.4, ncols=n, sharey=True)
    for ax, (label, name, acts) in zip(axes[0], panels):
        color = run_color(list(runs).index(label))
        _ioffe_panel(ax, label, name, acts, acts.steps, color, narrow=n > 2, linewidth=0.8)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a short run had ticks at 2.5, 7.5
    axes[0, 0].set_ylabel(f"{_ioffe_quantity(layer)}, each batch\n(15th, 50th, 85th percentile)")
    return _drawn(fig, left)


# ---------------------------------------------------------------- distributions per layer
def _shared_grid(runs: Runs, layer: str, bins: int = 80) -> np.ndarray:
    if not any(layer in run.layer_names for run in runs.values()):
        raise MissingDataError(f"no run has layer {layer!r}")
    return shared_edges(runs, layer, bins)


def figure_layer(runs: Runs, layer: str, rows: int = 8) -> Figure:
    """Per run (columns): ridgeline of the histograms over epochs (top), histogram vs time (bottom)."""
    have = {label: run for label, run in runs.items() if layer in run.layer_names}
    if not have:
        raise MissingDataError(f"no run has layer {layer!r}")
    grid = _shared_grid(have, layer)
    mids = (grid[:-1] + grid[1:]) / 2
    fig, axes = _figure(
        FULL_WIDTH if len(have) > 1 else PANEL_WIDTH,
        4.6,
        ncols=len(have),
        nrows=2,
        sharex=True,
        height_ratios=[1.2, 1],
    )
    heat_max = 0.0
    meshes = []
    for col, (label, run) in enumerate(have.items()):
        acts = run.activations(layer)
        dens = densities(rebin_captures(acts, grid), grid)
        picks = ridgeline_captures(run, rows)
        ax = axes[0, col]
        peak = max(float(dens[picks].max()), 1e-12)
        cmap = plt.get_cmap("viridis")  # the app's epoch colours: start dark, end bright
        last = max(len(picks) - 1, 1)
        for k, t in enumerate(picks):  # the start on top; each later ridge in front of the one above
            offset = (len(picks) - 1 - k) * 0.55
            y = dens[t] / peak + offset
            ax.fill_between(
                mids, offset, y, color=cmap(k / last), alpha=0.85, linewidth=0.4, edgecolor="white"
            )
            ax.text(grid[-1], offset + 0.05, f"{acts.epochs[t]:.0f}", fontsize=6, ha="right", va="bottom")
        ax.set(yticks=[], title=_panel_title(label, layer, len(have) > 2))
        ax.grid(False)
        heat = axes[1, col]
        with np.errstate(divide="ignore"):
            log = np.where(dens > 0, np.log10(dens), np.nan)
        heat_max = max(heat_max, float(np.nanmax(log)) if np.isfinite(log).any() else 0.0)
        edges_t = time_edges(acts.epochs)
        meshes.append(heat.pcolormesh(grid, edges_t, log, cmap="inferno", shading="flat", rasterized=True))
        heat.set(xlabel="activation", ylabel="epoch")
        if len(acts.epochs) == 1:
            heat.set_yticks(acts.epochs)  # one capture: its epoch, not a span of time
        heat.invert_yaxis()  # time runs down, as in the ridgeline above
        heat.grid(False)
        _mark_divergence(heat, run, "0.3", horizontal=True)
    low = min(np.nanmin(m.get_array()) for m in meshes if np.isfinite(m.get_array()).any())
    for mesh in meshes:
        mesh.set_clim(low, heat_max)
    fig.colorbar(meshes[-1], ax=axes[1, :].tolist(), label="log10 density", shrink=0.9)
    axes[0, 0].set_ylabel("epoch (top: start)")
    return fig


# ---------------------------------------------------------------- drift
def figure_drift_matrix(runs: Runs, metric: str = "w1") -> Figure:
    """Layers x captures drift from step 0 for each run, one shared colour scale. A run of one
    capture (stopped before its first epoch ended) has no drift yet: left out."""
    left = [
        f"{label}: one capture, nothing to drift from yet"
        for label, run in runs.items()
        if run.num_captures < 2
    ]
    runs = {label: run for label, run in runs.items() if run.num_captures >= 2}
    if not runs:
        raise MissingDataError("no run has a capture after step 0 yet (the drift is measured from it)")
    fig, axes = _figure(FULL_WIDTH if len(runs) > 1 else PANEL_WIDTH, 3.2, ncols=len(runs))
    mats = {label: analysis.drift_matrix(run, metric) for label, run in runs.items()}
    # Linear, or by decades where a few layers drift orders of magnitude more (analysis.drift_colours).
    colours = analysis.drift_colours(np.concatenate([m.ravel() for _, m in mats.values()]))
    norm: Normalize = (
        Normalize(vmin=0, vmax=colours.top)
        if colours.decades_from is None
        else SymLogNorm(linthresh=colours.decades_from, vmin=0, vmax=colours.top, base=10)
    )
    image = None
    for ax, (label, run) in zip(axes[0], runs.items()):
        names, matrix = mats[label]
        epochs = run.epochs
        edges_t = time_edges(epochs)
        image = ax.pcolormesh(
            edges_t,
            np.arange(len(names) + 1),
            matrix,
            cmap="magma_r",
            norm=norm,
            rasterized=True,
        )
        # Every layer named up to 32 of them; a deep model's every k-th (401 names had
        # overlapped into a black block).
        every = int(np.ceil(len(names) / 32)) or 1
        ax.set_yticks(np.arange(0, len(names), every) + 0.5, names[::every], fontsize=6)
        ax.invert_yaxis()
        narrow = len(runs) > 2  # the run alone over its panel, what is drawn once above them all
        ax.set(xlabel="epoch", title=label if narrow else f"{label}: drift from step 0")
        # Whole epochs, two or three ticks in a narrow panel (five runs' read "0.02.5").
        ax.xaxis.set_major_locator(
            MaxNLocator(nbins=2 if narrow else "auto", integer=True, steps=[1, 2, 5, 10])
        )
        if every > 1:
            ax.set_ylabel(f"layer (every {_ordinal(every)} named)")
        ax.grid(False)
        # A cell without a score (NaN) is left undrawn: the hatched background shows through.
        ax.patch.set(facecolor="white", edgecolor="0.75", hatch="////", linewidth=0)
    unit = "W1 / step-0 std" if metric == "w1" else metric
    fig.colorbar(image, ax=axes[0, :].tolist(), label=unit, shrink=0.9)
    if len(runs) > 2:
        fig.suptitle("Drift from step 0", fontsize=STYLE["axes.titlesize"])
    if any(np.isnan(matrix).any() for _, matrix in mats.values()):
        fig.supxlabel(  # below the panels, with room made for it by the layout
            "Hatched: no score (a layer constant at step 0, whose spread is 0, or non-finite values).",
            x=0.01,
            ha="left",
            fontsize=6,
            color="0.35",
        )
    return _drawn(fig, left)


def figure_drift_comparison(runs: Runs, metric: str = "w1", by: str = "role") -> Figure:
    """The drift score (time-averaged drift) of comparable tensors, runs side by side.

    By role (default): the input of each nonlinearity, whatever its name in each run
    (baseline `fc1`, BN `fc1_bn`), for runs with as many nonlinearities each; runs of different
    depths get each one's own inputs side by side, first to last. `by="name"`: layers of equal
    name.
    """
    summaries = {
        label: {d.layer: d.score for d in analysis.run_drift(run, metric)} for label, run in runs.items()
    }
    # Runs of different depths: each run's own k-th input at k, not paired (see same_depth).
    unpaired = by == "role" and not analysis.same_depth(runs)
    pairs = analysis.inputs_by_position(runs) if unpaired else analysis.pair_layers(runs, by=by)
    if not pairs:
        raise MissingDataError(
            "the runs share no nonlinearity to compare"
            if by == "role"
            else "the runs share no layer name to compare"
        )
    drawn = [summaries[label].get(name, np.nan) for _, names in pairs for label, name in names.items()]
    if not any(np.isfinite(score) and score > 0 for score in drawn):  # a log axis of nothing fails to draw
        raise MissingDataError(
            "no layer has moved from its first capture yet (a drift score needs captures after step 0)"
        )
    fig, axes = _figure(FULL_WIDTH, 2.8)
    ax = axes[0, 0]
    width = 0.8 / len(runs)
    x = np.arange(len(pairs))
    for i, (label, scores) in enumerate(summaries.items()):
        values = [scores.get(names.get(label, ""), np.nan) for _, names in pairs]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, color=run_color(i), label=label)
    every = 1 if len(pairs) <= MAX_NAMED_BARS else math.ceil(len(pairs) / SHOWN_TICKS)
    if by == "role" and every == 1:
        ticks = [
            # Up to two names on one line; more (runs of different models) one per line.
            role.replace("input of ", "")
            + "\n"
            + (" / " if len(set(names.values())) <= 2 else "\n").join(dict.fromkeys(names.values()))
            for role, names in pairs
        ]
    else:  # a deep model's hundreds of bars: every n-th one labelled, without its layers' names
        ticks = [role.replace("input of ", "") for role, _ in pairs]
    slanted = by == "name" or (every > 1 and not unpaired)  # names, not numbers: room to spare
    ax.set_xticks(
        x[::every],
        ticks[::every],
        rotation=45 if slanted else 0,
        ha="right" if slanted else "center",
        fontsize=6,
    )
    _log_y(ax)
    ax.set(
        ylabel="drift score (W1 / step-0 std)" if metric == "w1" else f"drift score ({metric})",
        title=(
            "How far the input of each nonlinearity drifted, averaged over training"
            if by == "role"
            else "How far each layer drifted, averaged over training"
        ),
    )
    labelled = f"; every {_ordinal(every)} labelled" if every > 1 else ""
    if unpaired:
        ax.set_xlabel(
            "k-th nonlinearity of each run (its input; not paired: the runs differ in depth"
            + (f")\n{labelled[2:]}" if labelled else ")")
        )
    elif by == "role":
        ax.set_xlabel(f"nonlinearity (its input in each run{labelled})")
    elif every > 1:
        ax.set_xlabel(f"layer (every {_ordinal(every)} named)")
    _legend_clear_of_bars(ax)
    return fig


def _legend_clear_of_bars(ax: plt.Axes) -> None:
    """The legend where matplotlib finds room, or above the axes where every corner holds a
    bar (a deep run's hundreds of them): a legend drawn over data hides it."""
    legend = ax.legend(frameon=False)
    renderer = ax.figure.canvas.get_renderer()
    ax.figure.draw_without_rendering()  # the constrained layout settles where everything goes
    box = legend.get_window_extent(renderer)
    if any(box.overlaps(bar.get_window_extent(renderer)) for bar in ax.patches):
        legend.remove()  # above the axes instead, the runs in one row: the layout makes room
        ax.figure.legend(
            frameon=False, loc="outside upper center", ncols=min(4, len(ax.get_legend_handles_labels()[0]))
        )


# ---------------------------------------------------------------- gradients
def _depth_panels(
    runs: Runs,
    layers_of: Callable[[Run], list[str]],
    rows: Sequence[tuple[Callable[[Run, str], np.ndarray], str, bool]],
    empty_notes: Sequence[str] = (),
) -> tuple[Figure, list[bool]]:
    """One column per run (titled with its label), one row per (series of a layer, quantity,
    log scale) in `rows`; a panel with nothing to draw says its row's `empty_notes` (or "not
    recorded").

    Rows share their y axis across runs; a layer's colour is its depth (the same
    colour map for every run, one colour bar), and with a dozen layers or fewer
    each line is named at its end. Also returns, per row, whether any value was finite.
    """
    fig, axes = _figure(
        FULL_WIDTH if len(runs) > 1 else PANEL_WIDTH,
        2.3 * len(rows),
        ncols=len(runs),
        nrows=len(rows),
        sharex="col",  # runs of 3 and 50 epochs side by side: each its own epochs
        sharey="row",
    )
    notes = list(empty_notes) + ["not recorded"] * (len(rows) - len(empty_notes))
    cmap = plt.get_cmap("viridis")
    drawn = [False] * len(rows)
    for col, (label, run) in enumerate(runs.items()):
        layers = layers_of(run)
        named = len(layers) <= 12
        in_panel = [False] * len(rows)
        zeros = [False] * len(rows)  # values recorded, every one 0: not the same as none
        for k, layer in enumerate(layers):
            color = cmap(k / max(len(layers) - 1, 1))
            for row, (series_of, _, log) in enumerate(rows):
                series = np.asarray(series_of(run, layer), float)
                drawn[row] |= bool(np.isfinite(series).any())
                if log:  # zeros (the first layer's gradient shift) have no place on a log axis
                    zeros[row] |= bool((series == 0).any())
                    series = np.where(series > 0, series, np.nan)
                if not np.isfinite(series).any():
                    continue
                in_panel[row] = True
                point = {"marker": "o", "markersize": 2} if np.isfinite(series).sum() < 2 else {}
                axes[row, col].plot(run.epochs, series, color=color, linewidth=1.0, **point)
                if named:
                    last = np.flatnonzero(np.isfinite(series))[-1]
                    axes[row, col].annotate(
                        layer,
                        (run.epochs[last], series[last]),
                        xytext=(2, 0),
                        textcoords="offset points",
                        fontsize=6,
                        color=color,
                        va="center",
                    )
        for row, (_, quantity, log) in enumerate(rows):
            if log:
                _log_y(axes[row, col])
            if col == 0:
                axes[row, col].set_ylabel(quantity)
            if not in_panel[row]:  # say so, rather than leave a blank panel to guess at
                axes[row, col].text(
                    0.5,
                    0.5,
                    ALL_ZERO_NOTE if zeros[row] else notes[row],
                    transform=axes[row, col].transAxes,
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="0.45",
                )
        axes[0, col].set_title(label)
        axes[-1, col].set(xlabel="epoch")
        if len(run.epochs) == 1:  # one capture: its epoch, not -0.05 ... 0.05
            axes[-1, col].set_xticks(run.epochs)
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes[:, -1].tolist(), ticks=[0, 1], shrink=0.6, label="layer depth")
    bar.ax.set_yticklabels(["first", "last"])
    return fig, drawn


def figure_gradients(runs: Runs) -> Figure:
    """Per run: gradient norm (top) and update ratio (bottom) per layer, log scale."""
    fig, drawn = _depth_panels(
        runs,
        lambda run: run.trainable_layers,
        [
            (lambda run, layer: run.gradients(layer).total_grad_norm, "gradient norm", True),
            (lambda run, layer: run.gradients(layer).total_update_ratio, "update ratio ||ΔW|| / ||W||", True),
        ],
        empty_notes=["no gradients:\nthe probe had\nno labels", "no update ratio:\nit needs two\ncaptures"],
    )
    if not drawn[0]:
        plt.close(fig)
        raise MissingDataError("no run recorded gradients (its probe had no labels)")
    return fig


def figure_gradient_shift(runs: Runs) -> Figure:
    """The Santurkar et al. gradient shift per layer over training, runs side by side.

    Top: ||G - G'||, how far a layer's gradient moves when the layers before it take
    one step (log scale); bottom: cos(G, G'). Layers coloured by depth, as in
    `figure_gradients`.
    """
    have = {label: run for label, run in runs.items() if run.has_ics}
    if not have:
        raise MissingDataError("no run recorded the gradient shift (ICSCallback(gradient_shift=True))")
    fig, _ = _depth_panels(
        have,
        lambda run: run.ics_layer_names,
        [
            (lambda run, layer: run.ics(layer).grad_diff, "gradient shift ||G − G′||", True),
            (lambda run, layer: run.ics(layer).grad_cos, "cos(G, G′)", False),
        ],
    )
    return fig


# ---------------------------------------------------------------- the whole set
@dataclass(frozen=True)
class Planned:
    name: str
    make: Callable[[], Figure]


def _progress(done: int, total: int, name: str) -> None:
    width = 24
    filled = int(width * done / max(total, 1))
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name}"
    if sys.stderr.isatty():
        print(f"\r{line:<80}", end="" if done < total else "\n", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


# Beyond this many layers `plot_runs` draws per-layer figures for the most drifted only: a
# 200-layer MLP's 401 took 2.5 minutes and filled a folder nobody reads through.
MAX_LAYER_FIGURES = 24
MOST_DRIFTED = 12


def plot_runs(
    runs: Runs,
    out_dir: str | os.PathLike[str],
    *,
    layers: Sequence[str] | str | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    progress: bool = True,
    ioffe_layer: str | None = None,
) -> tuple[list[Path], list[str]]:
    """Write every figure for `runs` into `out_dir`. Returns (files written, notes on skipped figures).

    `layers`: the per-layer figures: by default every layer, or for runs of more than
    `MAX_LAYER_FIGURES` layers the `MOST_DRIFTED` that drifted most (a note says so); "all"
    for every layer whatever the depth. `ioffe_layer`: the layer whose tracked unit Ioffe &
    Szegedy's Fig. 1 follows (default: `hidden_input_layer` of each run).
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    if layers is None or layers == "all":
        every = _layer_union(runs)
        layers = every if layers == "all" or len(every) <= MAX_LAYER_FIGURES else _most_drifted(runs, every)
        if len(layers) < len(every):
            notes.append(
                f"layer figures: drawn for the {len(layers)} most drifted of {len(every)} layers "
                "(name others with --layers, or --layers all for every one)"
            )
    metric = headline_metric(runs)
    second = second_metric(runs)
    plan = [
        Planned(metric_label(metric or "accuracy").lower(), lambda: figure_metric(runs, metric)),
        Planned("loss", lambda: figure_loss(runs))
        if second is None
        else Planned(metric_label(second).lower(), lambda: figure_metric(runs, second)),
        Planned("ioffe_fig1", lambda: figure_ioffe(runs, ioffe_layer)),
        Planned("ioffe_fig1_steps", lambda: figure_ioffe_steps(runs, ioffe_layer)),
        Planned("drift_matrix", lambda: figure_drift_matrix(runs)),
        Planned("drift_comparison", lambda: figure_drift_comparison(runs)),
        Planned("gradients", lambda: figure_gradients(runs)),
        Planned("gradient_shift", lambda: figure_gradient_shift(runs)),
    ] + [Planned(f"layer_{_safe(name)}", lambda name=name: figure_layer(runs, name)) for name in layers]
    for label, run in runs.items():
        found = analysis.divergence(run)
        if found is not None:
            notes.append(f"{label}: {found.describe()} (marked in the figures)")
    with plt.rc_context(STYLE), missing_glyphs_noted(notes):
        for i, item in enumerate(plan):
            if progress:
                _progress(i, len(plan), item.name)
            try:
                fig = item.make()
            except MissingDataError as exc:
                notes.append(f"{item.name}: skipped, {exc}")
                continue
            notes.extend(f"{item.name}: left out {why}" for why in left_out(fig))
            for fmt in formats:
                path = out / f"{item.name}.{fmt}"
                fig.savefig(path)
                written.append(path)
            plt.close(fig)
        if progress:
            _progress(len(plan), len(plan), "done")
    return written, notes


_MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")


@contextlib.contextmanager
def missing_glyphs_noted(notes: list[str]) -> Iterator[None]:
    """Matplotlib's warning for each character no installed font draws (a layer named in
    Chinese with no CJK font here), one per figure and file, as one note in `notes` naming the
    characters and the fix; other warnings pass on as they came."""
    font_log = logging.getLogger("matplotlib.font_manager")

    # A fallback font without a regular weight (WenQuanYi Zen Hei's is 500) is used all the same.
    def quiet(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("findfont: Failed to find font weight")

    font_log.addFilter(quiet)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        font_log.removeFilter(quiet)
    missing: dict[str, None] = {}
    for warning in caught:
        found = _MISSING_GLYPH.search(str(warning.message))
        if found:
            missing[chr(int(found.group(1)))] = None
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if missing:
        notes.append(
            f"no installed font draws {''.join(missing)} (in a layer or run name): drawn as boxes; "
            "install a font that has them (Debian/Ubuntu: apt-get install fonts-noto-cjk, then remove "
            "~/.cache/matplotlib so that Matplotlib finds it)"
        )


def _ordinal(k: int) -> str:
    """2nd, 3rd, 11th, 13th, 21st."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _layer_union(runs: Runs) -> list[str]:
    """Every run's layers: those all runs share in the first run's order, then the others."""
    first = next(iter(runs.values()))
    shared = [n for n in first.layer_names if all(n in r.layer_names for r in runs.values())]
    extra = [n for r in runs.values() for n in r.layer_names if n not in shared]
    return shared + list(dict.fromkeys(extra))


def _most_drifted(runs: Runs, layers: Sequence[str]) -> list[str]:
    """The `MOST_DRIFTED` of `layers` with the largest drift score in any run, in their order
    (a layer without a score, constant from the start, comes last)."""
    score = dict.fromkeys(layers, -np.inf)
    for run in runs.values():
        try:
            drifts = analysis.run_drift(run)
        except ICSVizError:  # a damaged layer: this run does not rank them
            continue
        for drift in drifts:
            if np.isfinite(drift.score) and drift.layer in score:
                score[drift.layer] = max(score[drift.layer], drift.score)
    chosen = set(sorted(layers, key=lambda name: -score[name])[:MOST_DRIFTED])
    return [name for name in layers if name in chosen]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
