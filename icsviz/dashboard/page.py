"""What the app draws: one function per view, fed by cached frames.

Frames are cached by the files' (path, mtime, size), so a growing run is
re-read on the next refresh while an unchanged one costs nothing. Names from
files are shown as text (tables, chart labels), never rendered as HTML.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from .. import analysis
from ..errors import ICSVizError
from ..store.catalog import RunEntry, entry_for
from ..store.reader import Run, open_run
from . import charts, data

Key = tuple[str, int, int]


# What changes rendering inside a sentence: Markdown, HTML, LaTeX ($), and Streamlit's
# ":red[...]" colours and ":emoji:" codes. Escaped, each shows as itself.
_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]<>#~$|:"})


def plain(text: object) -> str:
    """A run, layer or file name as literal text inside a Streamlit message (which renders Markdown)."""
    return str(text).translate(_MARKDOWN)


# ---------------------------------------------------------------- cached reads
def _open(key: Key) -> Run:
    """A run as the catalog found it: without the parts its check found damaged."""
    entry = entry_for(key)
    return entry.open() if entry is not None else open_run(key[0])


def _with_runs(
    keys: Sequence[Key], labels: Sequence[str], fn: Callable[[dict], Any], *, roles: bool = False
) -> Any:
    """`fn({label: run})` with the runs open; `roles`: layers also answer to their role name."""
    with contextlib.ExitStack() as stack:
        runs = {label: stack.enter_context(_open(key)) for key, label in zip(keys, labels)}
        if roles:
            runs = {label: data.RoleNamed(run) for label, run in runs.items()}
        return fn(runs)


def _by_role(layer: str) -> bool:
    return layer.startswith("input of ")


def guarded(view: Callable[..., None]) -> Callable[..., None]:
    """A view that shows what went wrong in its own place, instead of breaking the page."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            view(*args, **kwargs)
        except ICSVizError as exc:
            st.error(f"This panel cannot be shown: {plain(exc)}", icon="⚠️")

    return wrapper


def _with_readable_history(runs: dict[str, Run]) -> dict[str, Run]:
    """The runs whose epoch history reads (a damaged one leaves the curves of the others)."""
    readable = {}
    for label, run in runs.items():
        try:
            run.history  # noqa: B018 - reading is the check
            readable[label] = run
        except ICSVizError:
            continue
    return readable


def _divergence(run: Run) -> str:
    """The run's divergence in words, or "" (a damaged layer must not hide it for the rest)."""
    try:
        found = analysis.divergence(run)
    except ICSVizError:
        return ""
    return found.describe() if found is not None else ""


def _input_drift(keys: Sequence[Key], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """The drift scores of the nonlinearities' inputs as the catalogue computed them (reading
    every layer of two runs again would cost most of the first render)."""
    found = {}
    for key, label in zip(keys, labels):
        entry = entry_for(key)
        if entry is not None and entry.input_drift:
            found[label] = dict(entry.input_drift)
    return found


@st.cache_data(max_entries=64, show_spinner=False)
def _overview(keys: tuple[Key, ...], labels: tuple[str, ...]) -> dict[str, Any]:
    def build(runs: dict) -> dict[str, Any]:
        roles = data.role_pairs(runs)
        compared = len(labels) > 1  # the headline and its chart compare runs, paired or not
        scores = _input_drift(keys, labels) if compared else {}
        if compared and len(scores) < len(labels):
            scores = data.drift_scores(runs)
        return {
            "layers": data.layer_union(runs),
            "epochs": data.capture_epochs(runs),
            "curves": data.curves_frame(_with_readable_history(runs)),
            "diverged": {label: _divergence(run) for label, run in runs.items()},
            "damaged_of": {
                label: list(getattr(entry_for(key), "damaged_layers", ())) for key, label in zip(keys, labels)
            },
            "layers_of": {label: run.layer_names for label, run in runs.items()},
            "masked_of": {
                label: [n for n in run.layer_names if run.layer(n).padding_left_out]
                for label, run in runs.items()
            },
            "tracked": {
                label: {n: run.tracked_units(n).tolist() for n in run.layer_names}
                for label, run in runs.items()
            },
            "roles": roles,
            "headline": data.headline(runs, scores),
            "role_drift": data.role_drift_frame(runs, roles, scores),
        }

    def with_roles(runs: dict) -> dict[str, Any]:
        overview = build(runs)
        for role, names in overview["roles"]:  # a role stands for each run's own tensor in it
            for label, name in names.items():
                overview["layers_of"][label] = [*overview["layers_of"][label], role]
                if name in overview["masked_of"][label]:
                    overview["masked_of"][label] = [*overview["masked_of"][label], role]
                overview["tracked"][label][role] = overview["tracked"][label].get(name, [])
        return overview

    return _with_runs(keys, labels, with_roles)


@st.cache_data(max_entries=256, show_spinner=False)
def _layer_frames(keys: tuple[Key, ...], labels: tuple[str, ...], layer: str) -> dict[str, Any]:
    def build(runs: dict) -> dict[str, Any]:
        have = {label: run for label, run in runs.items() if layer in run.layer_names and run.num_captures}
        edges = data.shared_edges(have, layer)
        return {
            "edges": edges,
            "ridge": {label: data.ridgeline_frame(run, layer, edges) for label, run in have.items()},
            "heat": {label: data.heatmap_frame(run, layer, edges) for label, run in have.items()},
            "units_mean": {label: data.unit_frame(run, layer, "mean") for label, run in have.items()},
            "units_std": {label: data.unit_frame(run, layer, "std") for label, run in have.items()},
        }

    return _with_runs(keys, labels, build, roles=_by_role(layer))


@st.cache_data(max_entries=256, show_spinner=False)
def _histogram(
    keys: tuple[Key, ...], labels: tuple[str, ...], layer: str, epoch: float, edges: tuple[float, ...]
) -> pd.DataFrame:
    return _with_runs(
        keys,
        labels,
        lambda runs: data.histogram_frame(runs, layer, epoch, np.asarray(edges)),
        roles=_by_role(layer),
    )


@st.cache_data(max_entries=256, show_spinner=False)
def _percentiles(
    keys: tuple[Key, ...], labels: tuple[str, ...], layer: str, unit: int | None, bands: str
) -> pd.DataFrame:
    return _with_runs(
        keys, labels, lambda runs: data.percentile_frame(runs, layer, unit, bands), roles=_by_role(layer)
    )


@st.cache_data(max_entries=256, show_spinner=False)
def _batch_percentiles(
    keys: tuple[Key, ...], labels: tuple[str, ...], layer: str, unit: int | None, bands: str
) -> pd.DataFrame:
    return _with_runs(
        keys,
        labels,
        lambda runs: data.batch_percentile_frame(runs, layer, unit, bands),
        roles=_by_role(layer),
    )


@st.cache_data(max_entries=64, show_spinner=False)
def _summary_frames(keys: tuple[Key, ...], labels: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    return _with_runs(
        keys,
        labels,
        lambda runs: {
            "drift": data.drift_frame(runs),
            "gradients": data.gradient_frame(runs),
            "ics": data.ics_frame(runs),
        },
    )


# ---------------------------------------------------------------- charts
def draw(build: Callable[..., charts.Spec], *args: Any) -> None:
    """Draw `build(*args)`, a function of `charts` that returns a Vega-Lite spec."""
    st.vega_lite_chart(build(*args), width="stretch")


# ---------------------------------------------------------------- views
SWEEP_COLUMNS = {
    "file": st.column_config.TextColumn("file"),
    "run": st.column_config.TextColumn("run"),
    "model": st.column_config.TextColumn("model"),
    "dataset": st.column_config.TextColumn("dataset"),
    "date": st.column_config.TextColumn("date", help="When the run was created"),
    "epochs": st.column_config.NumberColumn("epochs", format="%d"),
    "final val acc": st.column_config.NumberColumn("final val acc", format="%.3f"),
    "best val acc": st.column_config.NumberColumn("best val acc", format="%.3f"),
    "drift": st.column_config.NumberColumn(
        "drift",
        format="%.3f",
        help="Median drift score of the inputs of the run's nonlinearities: time-averaged W1 distance "
        "from step 0, in step-0 standard deviations (lower: steadier)",
    ),
    "status": st.column_config.TextColumn("status"),
}
SWEEP_CHOSE = "_sweep_chose"  # set when rows chosen in the table replaced the compared runs
_MAX_WARNINGS = 5  # a folder of many damaged runs gets a count, not a wall of warnings


def sweep_frame(entries: Sequence[RunEntry]) -> pd.DataFrame:
    """One row per run file: what the sweep table shows (and sorts on). NaN: not recorded."""
    columns = {
        "file": [e.file for e in entries],
        "run": [e.name for e in entries],
        "model": [e.model for e in entries],
        "dataset": [e.dataset for e in entries],
        "date": [e.date for e in entries],
        "epochs": [e.epochs if e.readable else np.nan for e in entries],
        "final val acc": [e.final_val_accuracy for e in entries],
        "best val acc": [e.best_val_accuracy for e in entries],
        "drift": [e.drift_score for e in entries],
        "status": [e.status + (", damaged" if e.damaged else "") for e in entries],
    }
    frame = pd.DataFrame(columns, columns=list(SWEEP_COLUMNS))
    for name in ("epochs", "final val acc", "best val acc", "drift"):
        frame[name] = frame[name].astype(float)  # also for a folder of only unread files
    return frame


_last_sweep: tuple[tuple[int, ...], Sequence[RunEntry], pd.DataFrame] | None = None


def _sweep_frame_of(entries: Sequence[RunEntry]) -> pd.DataFrame:
    """`sweep_frame`, built again only when the entries change (the catalogue hands out the
    same entry objects while files do not change; the memo holds them, so ids stay unique)."""
    global _last_sweep
    ids = tuple(map(id, entries))
    last = _last_sweep
    if last is not None and last[0] == ids:
        return last[2]
    frame = sweep_frame(entries)
    _last_sweep = (ids, list(entries), frame)
    return frame


def runs_table(entries: Sequence[RunEntry], *, key: str = "sweep") -> None:
    """The sweep table: every run, sortable by any column; selecting rows compares those runs."""
    table = _sweep_frame_of(entries)
    files = table["file"].tolist()
    readable = {e.file for e in entries if e.readable}

    event = st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config=SWEEP_COLUMNS,
        key=key,
        on_select="rerun",
        selection_mode="multi-row",
    )
    # Rows chosen in the table become the compared runs. Only a change of selection over the
    # same rows counts: a filter that changes the rows leaves the selection's row numbers stale.
    rows = tuple(event.selection.rows)
    seen, st.session_state[f"_{key}_seen"] = st.session_state.get(f"_{key}_seen"), (tuple(files), rows)
    if seen is not None and seen[0] == tuple(files) and seen[1] != rows:
        chosen = [files[i] for i in rows if i < len(files) and files[i] in readable]
        if chosen:
            st.session_state.runs = chosen  # the sidebar's run list follows the table
            st.session_state[SWEEP_CHOSE] = True
    problems = [e for e in entries if not e.pending and (not e.readable or e.damaged)]
    for e in problems[:_MAX_WARNINGS]:
        if not e.readable:
            st.warning(f"{plain(e.file)} is unreadable: {plain(e.error)}", icon="⚠️")
        else:
            lost = f" Left out: layers {plain(', '.join(e.damaged_layers))}." if e.damaged_layers else ""
            parts = (
                "1 part fails its checksum"
                if len(e.damage) == 1
                else f"{len(e.damage)} parts fail their checksums"
            )
            st.warning(
                f"{plain(e.file)} is damaged ({parts}); the rest is shown.{lost} `icsviz check` lists "
                "the damage, `icsviz repair` saves the readable captures.",
                icon="⚠️",
            )
    if len(problems) > _MAX_WARNINGS:
        st.warning(
            f"{len(problems) - _MAX_WARNINGS} more run files are unreadable or damaged: see the status "
            "column, and `icsviz check` on them.",
            icon="⚠️",
        )


@guarded
def training_curves(keys: tuple[Key, ...], labels: tuple[str, ...], epoch: float | None) -> None:
    overview = _overview(keys, labels)
    st.subheader("Training curves")
    curves = overview["curves"]
    shown = charts.curve_metrics(curves)
    named = " and ".join(charts.metric_title(m) if m != "loss" else m for m in shown) or "accuracy and loss"
    splits = set(curves["split"]) if not curves.empty else {"training", "validation"}
    # Only the lines drawn: runs fitted without validation data have no solid ones.
    lines = " and ".join(
        f"{split} ({style})"
        for split, style in (("training", "dashed"), ("validation", "solid"))
        if split in splits
    )
    st.caption(
        f"{named[:1].upper() + named[1:]} per epoch for every selected run: {lines}. The dotted rule "
        "marks the capture chosen below."
        + (
            ""
            # each run's accuracy is "accuracy" in curves_frame; a step logging no "loss" (a GAN's)
            # is not one that accuracy fits
            if "accuracy" in shown or "loss" not in shown or curves.empty
            else " No selected run recorded accuracy (compile with `metrics=['accuracy']` to see it)."
        )
    )
    if curves.empty:
        st.info("No epoch has finished yet.")
        return
    draw(charts.curves_chart, curves, labels, epoch)


@guarded
def distributions(
    keys: tuple[Key, ...], labels: tuple[str, ...], layer: str, epoch: float, bands: str, unit_choice: str
) -> None:
    overview = _overview(keys, labels)
    frames = _layer_frames(keys, labels, layer)
    edges = frames["edges"]
    domain = (float(edges[0]), float(edges[-1]))
    missing = [label for label in labels if layer not in overview["layers_of"][label]]
    damaged = [label for label in missing if layer in overview["damaged_of"].get(label, [])]
    if damaged:
        st.warning(
            f"Layer {plain(layer)} is damaged in {plain(', '.join(damaged))} (its checksums fail): shown "
            "for the other runs only.",
            icon="⚠️",
        )
    absent = [label for label in missing if label not in damaged]
    if absent:
        st.info(f"Layer {plain(layer)} is not in: {plain(', '.join(absent))}.")

    st.subheader("Histogram at one capture")
    st.caption(
        "The distribution of this layer's outputs on the fixed probe batch, at the capture chosen "
        "with the slider; runs overlaid on the same axes."
    )
    masked = [label for label in labels if layer in overview["masked_of"].get(label, ())]
    if masked:
        st.caption(
            "Positions that a Keras mask marks as padding (Embedding(mask_zero=True), Masking) are left "
            "out: these are the values at the data positions, in every chart of this layer ("
            + plain(", ".join(masked))
            + ")."
        )
    hist = _histogram(keys, labels, layer, epoch, tuple(edges.tolist()))
    draw(charts.histogram_chart, hist, labels, domain)
    if not hist.empty and hist["dead"].max() > 0.001:
        dead = hist.groupby("run", sort=False)["dead"].first()
        st.caption(
            "Exactly zero (dead units of a ReLU), left out of the histogram so that it shows the live "
            "values: " + ", ".join(f"{plain(run)} {value:.1%}" for run, value in dead.items()) + "."
        )

    st.subheader("Percentile bands over training")
    pairs = data.BANDS[bands]
    unit = None if unit_choice == "whole layer" else int(unit_choice.split()[-1])
    what = "the whole layer" if unit is None else f"unit {unit}"
    st.caption(
        f"Quantiles of {what} over training: the band spans the "
        + ", ".join(f"{round(a * 100)}th-{round(b * 100)}th" for a, b in pairs)
        + " percentiles, the line is the median"
        + (
            " (Ioffe & Szegedy 2015, Fig. 1, show these three)."
            if bands == "ioffe"
            else " (TensorBoard's distribution bands: ±1, 1.5 and 2 standard deviations of a normal)."
        )
        + " A band that wanders is internal covariate shift made visible."
    )
    tracked_ok = [
        label for label in labels if unit is None or unit in overview["tracked"].get(label, {}).get(layer, [])
    ]
    pct = _percentiles(
        tuple(k for k, lb in zip(keys, labels) if lb in tracked_ok), tuple(tracked_ok), layer, unit, bands
    )
    if pct.empty:
        st.info("No run tracks this unit for this layer.")
    else:
        draw(charts.percentile_chart, pct, labels, pairs, f"{layer}: {what}", epoch)

    steps = _batch_percentiles(keys, labels, layer, unit, bands)
    if not steps.empty:
        st.subheader("The same bands on every training batch")
        st.caption(
            "Per-step mode (recorded with batch_stats=True): the quantiles of each training batch, "
            "measured inside the training step from a fixed sample of 4096 values per layer, at step "
            "resolution as in Ioffe & Szegedy's Fig. 1. The batches differ from step to step, so these "
            "bands also move with the data; the probe bands above move with the weights alone."
        )
        draw(charts.percentile_chart, steps, labels, pairs, f"{layer}: {what}, per step", epoch)

    have = [label for label in labels if label in frames["ridge"]]
    if not have:
        return
    st.subheader("Ridgeline and histogram over time")
    st.caption(
        "Left: one density per epoch capture, from the start (top) to the end (bottom). Right: "
        "every capture as a column, colour = log10 density (bins x captures). Same activation "
        "axis for every run."
    )
    logs = [frames["heat"][label]["log_density"] for label in have]
    finite = [float(v) for part in logs for v in (part.min(), part.max()) if np.isfinite(v)]
    shared = (min(finite), max(finite)) if finite else None  # one colour scale for every run
    for label in have:
        left, right = st.columns(2)
        with left:
            draw(charts.ridgeline_chart, frames["ridge"][label], label, domain)
        with right:
            draw(charts.heatmap_chart, frames["heat"][label], label, domain, shared)


@guarded
def unit_drift(keys: tuple[Key, ...], labels: tuple[str, ...], layer: str, stat: str) -> None:
    frames = _layer_frames(keys, labels, layer)
    st.caption(
        f"The {stat} of every hidden unit (rows; at most 64, evenly chosen) at every capture "
        "(columns, time runs right): horizontal stripes that change colour are units whose "
        "distribution drifts."
    )
    source = frames["units_mean" if stat == "mean" else "units_std"]
    values = [df["value"].abs().max() for df in source.values() if not df.empty]
    limit = float(np.nanmax(values)) if values else None  # one colour scale for the runs side by side
    cols = st.columns(max(1, len(source)))
    for col, (label, df) in zip(cols, source.items()):
        with col:
            draw(charts.unit_chart, df, f"{label}: {layer}", stat, limit)


@guarded
def drift_summary(keys: tuple[Key, ...], labels: tuple[str, ...], layer: str, field: str) -> None:
    frames = _summary_frames(keys, labels)
    drift = frames["drift"]
    if drift.empty:
        st.info("No captures yet.")
        return
    # A run of one capture has nothing to have drifted from yet: its zeros would read "steady".
    captures = drift.groupby("run")["epoch"].nunique()
    waiting = [label for label in labels if captures.get(label, 0) < 2]
    shown = [label for label in labels if label not in waiting]
    if not shown:
        st.info(
            "Drift is measured from the first capture (step 0): it shows once a second capture is "
            "taken (at the first epoch's end, or sooner with every_n_steps)."
        )
        return
    if waiting:
        st.caption(f"Left out, one capture so far: {plain(', '.join(waiting))}.")
    drift = drift[~drift["run"].isin(waiting)]
    st.caption(
        "How far each layer's distribution has moved, in units of its standard deviation at step 0: "
        "the Wasserstein distance (W1) to its histogram at step 0 or at the previous capture, or the "
        "shift of its mean. Rows follow the model's order; same colour scale for every run."
    )
    colours = analysis.drift_colours(drift[field].to_numpy(dtype="float64"))
    cols = st.columns(len(shown))
    for col, label in zip(cols, shown):
        with col:
            part = drift[drift["run"] == label]
            if not part.empty:
                draw(charts.drift_heatmap, part, label, field, colours.top, colours.decades_from)
    roles = dict(_overview(keys, labels)["roles"])
    if layer in roles:  # each run's own tensor in that role
        parts = [
            drift[(drift["run"] == run) & (drift["layer"] == name)] for run, name in roles[layer].items()
        ]
        selected = pd.concat(parts).assign(layer=layer) if parts else drift.iloc[:0]
    else:
        selected = drift[drift["layer"] == layer]
    if not selected.empty:
        draw(charts.drift_lines, selected, labels, field, f"{layer}: drift, run against run")


@guarded
def gradients(keys: tuple[Key, ...], labels: tuple[str, ...]) -> None:
    frames = _summary_frames(keys, labels)
    grads, ics = frames["gradients"], frames["ics"]
    st.caption(
        "Per layer (all its variables together): the L2 norm of the loss gradient on the probe, "
        "and the update ratio ||W_t - W_prev|| / ||W_prev|| between captures. Log scales."
    )
    if grads.empty or not np.isfinite(grads["grad_norm"]).any():
        st.info("These runs recorded no gradients (the probe had no labels).")
    cols = st.columns(len(labels))
    for col, label in zip(cols, labels):
        with col:
            part = grads[grads["run"] == label]
            if part.empty:
                continue
            for field, what in (("grad_norm", "gradient norm"), ("update_ratio", "update ratio")):
                if (part[field] > 0).any():  # what a log axis can show
                    draw(charts.gradient_chart, part, field, f"{label}: {what}")
                elif (part[field] == 0).any():  # recorded, and 0: the loss does not reach the weights
                    st.caption(
                        f"{plain(label)}: every {what} recorded is 0, which a log axis cannot show "
                        "(the loss does not reach the weights: a saturated softmax, for one)."
                    )
                else:  # a run that diverged at once, or has one capture (no update yet)
                    st.caption(f"{plain(label)}: no finite, positive {what} recorded, nothing to draw.")
    if not ics.empty:
        st.subheader("Gradient shift (Santurkar et al. 2018)")
        st.caption(
            "||G - G'|| and cos(G, G'): how much a layer's gradient changes when the layers before "
            "it take one step. Large differences and low cosines mean strong shift."
        )
        draw(charts.ics_chart, ics, "grad_diff", "||G - G'||")
        draw(charts.ics_chart, ics, "grad_cos", "cos(G, G')")
