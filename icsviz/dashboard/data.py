"""Data preparation for the app's views: runs in, tidy pandas frames out.

Pure numpy / pandas over the public reader API, so every view's numbers can be
tested without a browser and reused by the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .. import analysis
from ..errors import ICSVizError
from ..histograms import (
    centers,
    densities,
    rebin,
    rebin_captures,
    ridgeline_captures,
    shared_edges,
    time_edges,
)
from ..store.reader import ActivationStats, Run, accuracy_of, metric_names, validation_accuracy

__all__ = [
    "RoleNamed",
    "role_pairs",
    "headline",
    "role_drift_frame",
    "off_log_scale",
    "drift_scores",
    "layer_union",
    "curves_frame",
    "capture_epochs",
    "nearest_capture",
    "shared_edges",
    "histogram_frame",
    "heatmap_frame",
    "percentile_frame",
    "unit_frame",
    "drift_frame",
    "gradient_frame",
    "ics_frame",
    "ridgeline_captures",
    "BANDS",
]

Runs = Mapping[str, Run]

# (low, high) quantile pairs drawn as bands: Ioffe & Szegedy's 15-85, TensorBoard's normal bands.
BANDS = {"ioffe": [(0.15, 0.85)], "tensorboard": [(0.07, 0.93), (0.16, 0.84), (0.31, 0.69)]}


class RoleNamed:
    """A run whose layers also answer to their role: "input of fc1_relu" is this run's own
    input of that nonlinearity (fc1 in the baseline, fc1_bn in the BN twin), so that views
    written for one layer name compare like with like across runs."""

    def __init__(self, run: Run) -> None:
        self._run = run
        try:
            self._alias = {role.label: role.layer for role in analysis.nonlinearity_inputs(run)}
        except ICSVizError:
            self._alias = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self._run, name)

    def _name(self, name: str) -> str:
        return self._alias.get(name, name)

    @property
    def layer_names(self) -> list[str]:
        return [*self._run.layer_names, *self._alias]

    @property
    def batch_layer_names(self) -> list[str]:
        own = self._run.batch_layer_names
        return [*own, *(alias for alias, name in self._alias.items() if name in own)]

    def activations(self, name: str) -> ActivationStats:
        return self._run.activations(self._name(name))

    def batch_activations(self, name: str) -> ActivationStats:
        return self._run.batch_activations(self._name(name))

    def tracked_units(self, name: str) -> np.ndarray:
        return self._run.tracked_units(self._name(name))


def role_pairs(runs: Runs) -> list[tuple[str, dict[str, str]]]:
    """The inputs of the nonlinearities of the runs, paired by role: only for runs with as many
    nonlinearities each, as a model and its BatchNormalization twin have. The third
    nonlinearity of an LSTM model is no counterpart of a CNN's third, so runs of different
    depths are not paired (none either for one run)."""
    if len(runs) < 2 or not _same_depth(runs):
        return []
    try:
        return analysis.pair_layers(runs, by="role")
    except ICSVizError:
        return []


def _nonlinearity_inputs(run: Run) -> list[analysis.Role]:
    try:
        return analysis.nonlinearity_inputs(run)
    except ICSVizError:
        return []


def _same_depth(runs: Runs) -> bool:
    try:
        return analysis.same_depth(runs)
    except ICSVizError:
        return False


def drift_scores(runs: Runs) -> dict[str, dict[str, float]]:
    """Each run's drift score of the input of each nonlinearity (`analysis.input_drift`),
    computed once for the headline and its chart."""
    out = {}
    for label, run in runs.items():
        try:
            out[label] = analysis.input_drift(run)
        except ICSVizError:
            continue
    return out


def role_drift_frame(
    runs: Runs, pairs: list[tuple[str, dict[str, str]]], scores_of: dict[str, dict[str, float]] | None = None
) -> pd.DataFrame:
    """The drift score of each run's input of each nonlinearity (the headline's dots): by role
    where `pairs` pairs them, else each run's own in model order, "1" for its first."""
    scores_of = drift_scores(runs) if scores_of is None else scores_of
    if not pairs:  # the runs with scores read their roles already (`input_drift`)
        try:
            pairs = analysis.inputs_by_position({k: run for k, run in runs.items() if k in scores_of})
        except ICSVizError:
            pairs = []
    rows = []
    for label in runs:
        scores = scores_of.get(label)
        if scores is None:
            continue
        for order, (role, names) in enumerate(pairs):
            layer = names.get(label)
            if layer is not None and layer in scores:  # NaN too: `off_log_scale` counts those
                rows.append(
                    {
                        "run": label,
                        "role": role.replace("input of ", ""),
                        "layer": layer,
                        "order": order,
                        "score": scores[layer],
                    }
                )
    return pd.DataFrame(rows, columns=["run", "role", "layer", "order", "score"])


def off_log_scale(frame: pd.DataFrame) -> str:
    """What `role_drift_frame`'s log-scale chart leaves out, per run: inputs that never moved
    (score 0: a dead layer, all its values one number all along) and those with no score (no
    spread at the first capture to measure drift by, or fewer than two captures); "" if none."""
    parts = []
    for label, scores in frame.groupby("run", sort=False)["score"]:
        still, unscored = int((scores <= 0).sum()), int(scores.isna().sum())
        said = []
        if still:
            said.append(f"{still} of {label}'s {len(scores)} inputs never moved (score 0)")
        if unscored:
            whose = "of them" if still else f"of {label}'s {len(scores)} inputs"
            said.append(
                f"{unscored} {whose} {'has' if unscored == 1 else 'have'} no score "
                "(no spread at the first capture to measure by, or a single capture)"
            )
        parts.extend(said)
    return "Not on the log scale: " + "; ".join(parts) + "." if parts else ""


def headline(runs: Runs, scores_of: dict[str, dict[str, float]] | None = None) -> tuple[str, str | None]:
    """One sentence computed from the data (never written by hand) and the role it is about.

    For two or more runs: the largest drift ratio between the first two runs over the inputs
    of the nonlinearities, with both runs' tensors and scores, and their best validation
    accuracy; for runs of different depths, each one's median drift score, and as the layer the
    first run's most drifted input that the second run records too (else its most drifted). Returns ("", None) when there is nothing to compare.
    """
    labels = list(runs)
    if len(labels) < 2:
        return "", None
    first, other = labels[0], labels[1]
    two = {first: runs[first], other: runs[other]}
    scores_of = drift_scores(two) if scores_of is None else scores_of
    if first not in scores_of or other not in scores_of:
        return "", None
    if not _same_depth(two):
        # Opens on the first run's input that drifted most among those the other run records too
        # (a layer of the same name: both runs drawn), else among all of its own.
        finite = {layer: v for layer, v in scores_of[first].items() if np.isfinite(v)}
        shared = {layer: v for layer, v in finite.items() if layer in runs[other].layer_names}
        pick = shared or finite
        return _unpaired_headline(two, scores_of), max(pick, key=pick.__getitem__, default=None)
    try:
        pairs = dict(analysis.pair_layers(two))
    except ICSVizError:
        return "", None
    comparison = analysis.compare_scores(
        scores_of[first],
        scores_of[other],
        [(role, (names[first], names[other])) for role, names in pairs.items()],
    )
    finite = {k: v for k, v in comparison.items() if np.isfinite(v[2]) and v[2] > 0}
    if not finite:
        return "", None
    role, (a, b, ratio) = max(finite.items(), key=lambda kv: max(kv[1][2], 1 / kv[1][2]))
    names = pairs[role]
    more, less, factor = (first, other, ratio) if ratio >= 1 else (other, first, 1 / ratio)
    sentence = (
        f"The {role} drifted {factor:.1f}x further from where it started in {more} than in {less} "
        f"(drift score {a:.3g} for {first}'s {names[first]}, {b:.3g} for {other}'s {names[other]})"
    )
    return sentence + _accuracy_clause(two) + ".", role


def _unpaired_headline(runs: Runs, scores_of: Mapping[str, Mapping[str, float]]) -> str:
    """The headline for two runs of different depths: each run's median drift score (the
    sweep table's), since no layer of one is the counterpart of a layer of the other."""
    (first, a), (other, b) = runs.items()
    median = {label: analysis.run_drift_score(run, scores=scores_of[label]) for label, run in runs.items()}
    if not all(np.isfinite(v) for v in median.values()):
        return ""
    counts = [len(_nonlinearity_inputs(run)) for run in (a, b)]
    sentence = (
        f"{first} and {other} have {counts[0]} and {counts[1]} nonlinearities, so no layer of one is "
        f"paired with a layer of the other; the median drift score of the inputs of their "
        f"nonlinearities is {median[first]:.3g} for {first} and {median[other]:.3g} for {other}"
    )
    return sentence + _accuracy_clause(runs) + "."


def _accuracy_clause(runs: Runs) -> str:
    """The headline's "; best validation accuracy: a 57.7%, b 74.5%" (empty unless every run has it)."""
    accuracy = []
    for label, run in runs.items():
        try:
            values = validation_accuracy(run.history)
        except ICSVizError:
            values = None
        if values is not None and np.isfinite(values).any():
            accuracy.append(f"{label} {np.nanmax(values):.1%}")
    return f"; best validation accuracy: {', '.join(accuracy)}" if len(accuracy) == len(runs) else ""


def _frame(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """The parts stacked, or an empty frame with the expected columns when there are none."""
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def layer_union(runs: Runs) -> list[str]:
    """Layer names of all runs in model order: a layer only some runs have (conv1_bn) goes
    right after the layer it follows in those runs, not after all the others."""
    names: list[str] = []
    for run in runs.values():
        previous: str | None = None
        for name in run.layer_names:
            if name not in names:
                names.insert(names.index(previous) + 1 if previous is not None else 0, name)
            previous = name
    return names


def curves_frame(runs: Runs) -> pd.DataFrame:
    """Every metric the model recorded per epoch (loss, accuracy, mae, ...), training and
    validation, for every run."""
    rows = []
    for label, run in runs.items():
        history = run.history
        epochs = run.history_epochs + 1
        names = metric_names(history)
        accuracy = accuracy_of(names)
        for metric in names:
            for split, key in (("training", metric), ("validation", f"val_{metric}")):
                if key in history:
                    rows.append(
                        pd.DataFrame(
                            {
                                "run": label,
                                "epoch": epochs,
                                # One panel for every run's accuracy, whatever Keras named it
                                # ("cls_accuracy" of a multi-output model, a metric object's).
                                "metric": "accuracy" if metric == accuracy else metric,
                                "split": split,
                                "value": history[key],
                            }
                        )
                    )
    return _frame(rows, ["run", "epoch", "metric", "split", "value"]).dropna(subset=["value"])


def capture_epochs(runs: Runs) -> list[float]:
    """Sorted union of the (fractional) epochs at which any run captured."""
    values = set()
    for run in runs.values():
        values.update(round(float(e), 4) for e in run.epochs)
    return sorted(values)


def nearest_capture(run: Run, epoch: float) -> int:
    """Index of the run's last capture at or before `epoch` (the first if none)."""
    epochs = run.epochs
    if not len(epochs):
        return 0
    # capture_epochs rounds to 4 decimals: allow for it, or 53/159 = 0.33333 would miss 0.3333
    index = int(np.searchsorted(epochs, epoch + 1e-4, side="right")) - 1
    return max(index, 0)


def histogram_frame(runs: Runs, layer: str, epoch: float, edges: np.ndarray) -> pd.DataFrame:
    """Density of `layer` at the capture nearest `epoch`, per run, on shared `edges`."""
    rows = []
    for label, run in runs.items():
        if layer not in run.layer_names or not run.num_captures:
            continue
        index = nearest_capture(run, epoch)
        acts = run.activations(layer)
        # Exact zeros (dead ReLU units) are reported on their own: in the histogram they are
        # one spike that flattens the live values' shape to nothing. Taken out of the recorded
        # bin that holds 0, before re-binning spreads that bin over the shared grid.
        own = acts.counts[index].astype(float)
        own_edges = acts.edges[index]
        dead = float(acts.zero_frac[index]) if np.isfinite(acts.zero_frac[index]) else 0.0
        at_zero = int(np.searchsorted(own_edges, 0.0, side="right")) - 1
        if dead > 0 and 0 <= at_zero < len(own):
            own[at_zero] = max(own[at_zero] - round(dead * own.sum()), 0.0)
        counts = rebin(own, own_edges, edges)
        rows.append(
            pd.DataFrame(
                {
                    "run": label,
                    "x": centers(edges),
                    "density": densities(counts, edges),
                    "epoch": float(run.epochs[index]),
                    "dead": dead,
                }
            )
        )
    return _frame(rows, ["run", "x", "density", "epoch", "dead"])


def ridgeline_frame(run: Run, layer: str, edges: np.ndarray, rows: int = 10) -> pd.DataFrame:
    indices = ridgeline_captures(run, rows)
    dens = densities(rebin_captures(run.activations(layer), edges, indices), edges)
    frames = [
        pd.DataFrame({"epoch": float(run.epochs[i]), "x": centers(edges), "density": d})
        for i, d in zip(indices, dens)
    ]
    return _frame(frames, ["epoch", "x", "density"])


def heatmap_frame(run: Run, layer: str, edges: np.ndarray) -> pd.DataFrame:
    """Histogram against time: one rectangle per (capture, bin) with data, log10 density."""
    epochs = run.epochs
    if not len(epochs):
        return pd.DataFrame(columns=["t0", "t1", "y0", "y1", "log_density"])
    dens = densities(rebin_captures(run.activations(layer), edges), edges)
    spans = time_edges(epochs)
    t, b = np.nonzero(dens > 0)
    return pd.DataFrame(
        {
            "t0": spans[t],
            "t1": spans[t + 1],
            "y0": edges[b],
            "y1": edges[b + 1],
            "log_density": np.log10(dens[t, b]),
        }
    )


def _band_columns(
    acts: ActivationStats, unit: int | None, pairs: Sequence[tuple[float, float]]
) -> dict[str, np.ndarray]:
    """The median and the band edges ("q15", "q85", ...) of the layer or one tracked unit."""

    def series(level: float) -> np.ndarray:
        return acts.quantile(level) if unit is None else acts.unit_quantile(unit, level)

    columns = {"median": series(0.5)}
    for low, high in pairs:
        columns[f"q{round(low * 100):02d}"] = series(low)
        columns[f"q{round(high * 100):02d}"] = series(high)
    return columns


def percentile_frame(runs: Runs, layer: str, unit: int | None = None, bands: str = "ioffe") -> pd.DataFrame:
    """Quantile bands over training for the layer (or one tracked unit), wide by level."""
    rows = []
    pairs = BANDS[bands]
    for label, run in runs.items():
        if layer not in run.layer_names:
            continue
        acts = run.activations(layer)
        rows.append(pd.DataFrame({"run": label, "epoch": acts.epochs, **_band_columns(acts, unit, pairs)}))
    return _frame(rows, ["run", "epoch", "median"])


def batch_percentile_frame(
    runs: Runs, layer: str, unit: int | None = None, bands: str = "ioffe", max_points: int = 1500
) -> pd.DataFrame:
    """The same bands on every training batch (per-step mode), runs without it left out.

    Long runs are thinned to `max_points` rows per run by averaging consecutive
    steps (the browser draws a few thousand points quickly, not a million).
    """
    rows = []
    pairs = BANDS[bands]
    for label, run in runs.items():
        if layer not in run.batch_layer_names:
            continue
        acts = run.batch_activations(layer)
        if unit is not None and unit not in acts.tracked_units:
            continue

        frame = pd.DataFrame(
            {"epoch": acts.epochs, "step": acts.steps.astype(float), **_band_columns(acts, unit, pairs)}
        )
        if len(frame) > max_points:
            frame = frame.groupby(np.arange(len(frame)) * max_points // len(frame)).mean()
        frame.insert(0, "run", label)
        rows.append(frame)
    return _frame(rows, ["run", "epoch", "step", "median"])


def unit_frame(run: Run, layer: str, stat: str = "mean", max_units: int = 64) -> pd.DataFrame:
    """Per-unit mean (or std) over captures, for at most `max_units` evenly chosen units."""
    acts = run.activations(layer)
    values = acts.unit_mean if stat == "mean" else acts.unit_std
    units = np.arange(values.shape[1])
    if len(units) > max_units:
        units = np.unique(np.linspace(0, len(units) - 1, max_units).round().astype(int))
    t = np.repeat(np.arange(len(acts.epochs)), len(units))
    edges = time_edges(acts.epochs)  # each capture a column from its epoch to the next
    return pd.DataFrame(
        {
            "epoch": acts.epochs[t],
            "capture": t,
            "t0": edges[t],
            "t1": edges[t + 1],
            "unit": np.tile(units, len(acts.epochs)),
            "value": values[:, units].ravel(),
        }
    )


def drift_frame(runs: Runs) -> pd.DataFrame:
    """Per layer and capture: how far the distribution moved, in step-0 standard deviations.

    `from_start`: W1 to the step-0 histogram / std_0; `from_previous`: W1 to the
    previous capture / std_0; `mean_shift`: |mean_t - mean_0| / std_0 (analysis module).
    """
    from ..analysis import drift_curve

    rows = []
    for label, run in runs.items():
        if not run.num_captures:
            continue
        for order, name in enumerate(run.layer_names):
            acts = run.activations(name)
            edges = time_edges(acts.epochs)  # each capture spans until the next (heatmaps)
            rows.append(
                pd.DataFrame(
                    {
                        "run": label,
                        "layer": name,
                        "order": order,
                        "epoch": acts.epochs,
                        "t0": edges[:-1],
                        "t1": edges[1:],
                        "from_start": drift_curve(acts, "w1", "start"),
                        "from_previous": drift_curve(acts, "w1", "previous"),
                        "mean_shift": drift_curve(acts, "mean_shift", "start"),
                    }
                )
            )
    return _frame(
        rows, ["run", "layer", "order", "epoch", "t0", "t1", "from_start", "from_previous", "mean_shift"]
    )


def gradient_frame(runs: Runs) -> pd.DataFrame:
    """Per layer (all its variables together) and capture: gradient norm and update ratio."""
    rows = []
    for label, run in runs.items():
        for order, layer in enumerate(run.trainable_layers):
            g = run.gradients(layer)
            rows.append(
                pd.DataFrame(
                    {
                        "run": label,
                        "layer": layer,
                        "order": order,
                        "epoch": run.epochs,
                        "grad_norm": g.total_grad_norm,
                        "update_ratio": g.total_update_ratio,
                    }
                )
            )
    return _frame(rows, ["run", "layer", "order", "epoch", "grad_norm", "update_ratio"])


def ics_frame(runs: Runs) -> pd.DataFrame:
    """The Santurkar et al. gradient shift per layer and capture, for runs that recorded it."""
    rows = []
    for label, run in runs.items():
        for order, layer in enumerate(run.ics_layer_names):
            ics = run.ics(layer)
            rows.append(
                pd.DataFrame(
                    {
                        "run": label,
                        "layer": layer,
                        "order": order,
                        "epoch": run.epochs,
                        "grad_diff": ics.grad_diff,
                        "grad_cos": ics.grad_cos,
                    }
                )
            )
    return _frame(rows, ["run", "layer", "order", "epoch", "grad_diff", "grad_cos"])
