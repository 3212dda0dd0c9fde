"""Drift metrics and run summaries (pure numpy; nothing here imports Keras or scipy).

Definitions (docs/analysis.md has the formulas):
- `wasserstein`: 1-D Wasserstein distance W1 between two histograms, from bin
  centres weighted by counts (as scipy.stats.wasserstein_distance).
- `jensen_shannon`: Jensen-Shannon divergence in bits, on a common grid, in [0, 1].
- `psi`: population stability index on a common grid, empty bins floored at `eps`.
- `moment_shift`: shift of mean and std in units of the reference std.
A layer's drift curve is W1 between each capture and step 0 (or the previous
capture) divided by the step-0 std, so layers of different scales compare.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MissingDataError
from ..histograms import rebin
from ..store.reader import ActivationStats, Run

__all__ = [
    "common_grid",
    "wasserstein",
    "wasserstein_rows",
    "jensen_shannon",
    "psi",
    "moment_shift",
    "drift_curve",
    "drift_matrix",
    "DriftColours",
    "drift_colours",
    "drift_score",
    "LayerDrift",
    "run_drift",
    "run_drift_score",
    "input_drift",
    "compare_runs",
    "compare_scores",
    "gradient_shift_summary",
    "Divergence",
    "divergence",
    "METRICS",
]

METRICS = ("w1", "js", "psi", "mean_shift", "std_shift")


def _is_dyadic(edges: np.ndarray) -> bool:
    widths = np.diff(edges)
    if not len(widths) or not np.allclose(widths, widths[0], rtol=1e-9, atol=0) or widths[0] <= 0:
        return False
    exponent = np.log2(widths[0])
    return bool(
        exponent == np.round(exponent) and np.isclose(edges[0] / widths[0], np.round(edges[0] / widths[0]))
    )


def common_grid(
    edges_a: np.ndarray, edges_b: np.ndarray, bins: int = 256, max_bins: int = 4096
) -> np.ndarray:
    """A grid on which both histograms can be compared.

    For two dyadic grids (what icsviz records) it is the *finer* width, aligned,
    spanning both ranges: the finer histogram keeps its bins exactly and the
    coarser one is spread uniformly inside each of its bins (whose edges are
    grid edges). Splitting both histograms' bins then splits every common bin
    equally, so the results do not depend on the resolution. The width doubles
    while the grid would exceed `max_bins`. Otherwise: `bins` equal bins.
    """
    edges_a, edges_b = np.asarray(edges_a, float), np.asarray(edges_b, float)
    low, high = min(edges_a[0], edges_b[0]), max(edges_a[-1], edges_b[-1])
    if _is_dyadic(edges_a) and _is_dyadic(edges_b):
        width = min(edges_a[1] - edges_a[0], edges_b[1] - edges_b[0])
        while True:
            first = np.floor(low / width) * width
            count = int(np.ceil((high - first) / width - 1e-9))
            if count <= max_bins:
                return first + width * np.arange(count + 1)
            width *= 2
    return np.linspace(low, high, bins + 1)


def _probabilities(counts: np.ndarray, edges: np.ndarray, grid: np.ndarray) -> np.ndarray:
    mass = rebin(counts, edges, grid)
    total = mass.sum()
    return mass / total if total > 0 else mass


def wasserstein(
    counts_a: np.ndarray, edges_a: np.ndarray, counts_b: np.ndarray, edges_b: np.ndarray
) -> float:
    """W1 between two histograms, each bin's mass placed at its centre. NaN if one is empty.

    W1 = ∫ |F_a(x) - F_b(x)| dx over the merged support: the formula of
    `scipy.stats.wasserstein_distance` (the tests check they agree), without its
    per-call validation, which dominates when a drift matrix needs thousands.
    """
    return float(
        wasserstein_rows(
            np.asarray(counts_a, float)[None],
            np.asarray(edges_a, float)[None],
            np.asarray(counts_b, float)[None],
            np.asarray(edges_b, float)[None],
        )[0]
    )


def wasserstein_rows(
    counts_a: np.ndarray, edges_a: np.ndarray, counts_b: np.ndarray, edges_b: np.ndarray
) -> np.ndarray:
    """`wasserstein` of each row pair of (T, B) counts and (T, B + 1) edges, at once: (T,)."""
    counts_a, counts_b = np.asarray(counts_a, float), np.asarray(counts_b, float)
    total_a, total_b = counts_a.sum(axis=1, keepdims=True), counts_b.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.concatenate([counts_a / total_a, -counts_b / total_b], axis=1)
    x = np.concatenate([_row_centers(edges_a), _row_centers(edges_b)], axis=1)
    order = np.argsort(x, axis=1, kind="stable")
    x, w = np.take_along_axis(x, order, axis=1), np.take_along_axis(w, order, axis=1)
    out = np.sum(np.abs(np.cumsum(w, axis=1)[:, :-1]) * np.diff(x, axis=1), axis=1)
    empty = (total_a[:, 0] <= 0) | (total_b[:, 0] <= 0) | ~np.isfinite(out)
    return np.where(empty, np.nan, out)


def _row_centers(edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges, float)
    return (edges[:, 1:] + edges[:, :-1]) / 2


def _kl_terms(p: np.ndarray, m: np.ndarray) -> float:
    """Σ p ln(p / m) over the bins where p > 0 (there m >= p / 2 > 0).

    scipy.special.rel_entr computes the same; importing scipy.special costs about
    0.4 s, paid by every worker process that summarizes a run for the app.
    """
    live = p > 0
    return float(np.sum(p[live] * np.log(p[live] / m[live])))


def jensen_shannon(
    counts_a: np.ndarray, edges_a: np.ndarray, counts_b: np.ndarray, edges_b: np.ndarray
) -> float:
    """Jensen-Shannon divergence in bits on a common grid: 0 for equal, 1 for disjoint.

    JS = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2 and base-2 logarithms;
    empty bins contribute nothing (0 log 0 = 0), so no smoothing is needed.
    """
    grid = common_grid(edges_a, edges_b)
    p, q = _probabilities(counts_a, edges_a, grid), _probabilities(counts_b, edges_b, grid)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    m = (p + q) / 2
    value = (_kl_terms(p, m) + _kl_terms(q, m)) / 2 / np.log(2)
    return float(min(max(value, 0.0), 1.0))


def psi(
    counts_a: np.ndarray, edges_a: np.ndarray, counts_b: np.ndarray, edges_b: np.ndarray, eps: float = 1e-3
) -> float:
    """Population stability index Σ (q - p) ln(q / p) on a common grid (a = reference).

    A bin empty in one histogram but not the other gets the probability floor
    eps · (bin width / grid span) (then both are renormalized): the index stays
    finite, and the floor scales with the bins, so the result does not depend
    on the grid's resolution. Bins empty in both contribute nothing.
    """
    grid = common_grid(edges_a, edges_b)
    p, q = _probabilities(counts_a, edges_a, grid), _probabilities(counts_b, edges_b, grid)
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    floor = eps * np.diff(grid) / (grid[-1] - grid[0])
    occupied = (p > 0) | (q > 0)
    p, q = np.maximum(p, floor)[occupied], np.maximum(q, floor)[occupied]
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def moment_shift(mean: np.ndarray, std: np.ndarray, reference: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(|mean_t - mean_ref|, |std_t - std_ref|), both in units of std_ref."""
    scale = std[reference] if np.isfinite(std[reference]) and std[reference] > 0 else np.nan
    return np.abs(mean - mean[reference]) / scale, np.abs(std - std[reference]) / scale


def drift_curve(acts: ActivationStats, metric: str = "w1", against: str = "start") -> np.ndarray:
    """(T,) drift of a layer at every capture, from step 0 (`against="start"`) or the previous capture.

    W1 is divided by the step-0 std; JS and PSI are unitless.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}. Received: metric={metric!r}")
    n = len(acts.steps)
    if metric in ("mean_shift", "std_shift"):
        if against == "start":
            mean_shift, std_shift = moment_shift(acts.mean, acts.std)
        else:
            scale = acts.std[0] if acts.std[0] > 0 else np.nan
            mean_shift = np.abs(np.diff(acts.mean, prepend=acts.mean[:1])) / scale
            std_shift = np.abs(np.diff(acts.std, prepend=acts.std[:1])) / scale
        return mean_shift if metric == "mean_shift" else std_shift
    refs = np.zeros(n, int) if against == "start" else np.maximum(np.arange(n) - 1, 0)
    if metric == "w1":  # all captures at once: a drift matrix needs thousands of these
        out = wasserstein_rows(acts.counts[refs], acts.edges[refs], acts.counts, acts.edges)
        scale = acts.std[0] if np.isfinite(acts.std[0]) and acts.std[0] > 0 else np.nan
        return out / scale
    fn = jensen_shannon if metric == "js" else psi
    out = np.full(n, np.nan)
    for t in range(n):
        out[t] = fn(acts.counts[refs[t]], acts.edges[refs[t]], acts.counts[t], acts.edges[t])
    return out


def drift_score(curve: np.ndarray, epochs: np.ndarray) -> float:
    """Area under a drift curve per epoch of training (its time average): trapezoid rule."""
    ok = np.isfinite(curve) & np.isfinite(epochs)
    if ok.sum() < 2 or epochs[ok][-1] <= epochs[ok][0]:
        return float("nan")
    x, y = epochs[ok], curve[ok]
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def drift_matrix(
    run: Run, metric: str = "w1", against: str = "start", layers: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """(layer names, (L, T) matrix) of drift curves in model order."""
    names = list(layers) if layers is not None else run.layer_names
    return names, np.vstack(
        [drift_curve(run.activations(n), metric, against) for n in names]
    ) if names else np.zeros((0, run.num_captures))


@dataclass(frozen=True)
class DriftColours:
    """How drift values map to colours in a heatmap, saturating at `top`: linearly from 0, or,
    where `decades_from` is set, linearly up to it and by decades above it."""

    top: float
    decades_from: float | None


def drift_colours(values: np.ndarray) -> DriftColours:
    """The colour scale of drift heatmaps (the app's and `icsviz plot`'s drift matrix).

    The top is the 98th percentile, so that one outlier does not wash the rest out. Where that
    top is more than a hundred times the median drift, colours go by decades above the 5th
    percentile: a deep model's layers that start near 0 (ConvNeXt's LayerScale, initialised at
    1e-6) drift by a thousand times their step-0 spread, and on a linear scale made for them
    every other layer was one colour. The reference CNNs (top about 20 times the median) keep
    the linear scale, on which BatchNormalization's calm layers read as calm.
    """
    finite = np.asarray(values, "float64")
    finite = finite[np.isfinite(finite)]
    top = float(np.quantile(finite, 0.98)) if finite.size else 1.0
    positive = finite[finite > 0]
    decades_from = None
    if positive.size and top > 100 * float(np.median(positive)):
        decades_from = float(np.quantile(positive, 0.05))
    return DriftColours(top=max(top, 1e-9), decades_from=decades_from)


@dataclass(frozen=True)
class LayerDrift:
    """One layer's drift summary."""

    layer: str
    score: float  # drift_score of the layer's drift curve (W1: step-0 std units)
    final: float  # the curve's last value


def run_drift(run: Run, metric: str = "w1", layers: Sequence[str] | None = None) -> list[LayerDrift]:
    """The drift summary of each layer (`layers`, default all), in model order."""
    out = []
    for name in run.layer_names if layers is None else layers:
        acts = run.activations(name)
        curve = drift_curve(acts, metric)
        final = float(curve[-1]) if len(curve) else np.nan
        out.append(LayerDrift(name, drift_score(curve, acts.epochs), final))
    return out


def input_drift(run: Run, metric: str = "w1") -> dict[str, float]:
    """The drift score of the input of each of the run's nonlinearities, by layer name (every
    layer's for a run without a recognised nonlinearity)."""
    from .roles import nonlinearity_inputs

    layers = [role.layer for role in nonlinearity_inputs(run)] or run.layer_names
    return {d.layer: d.score for d in run_drift(run, metric, layers)}


def run_drift_score(run: Run, metric: str = "w1", scores: Mapping[str, float] | None = None) -> float:
    """One number for a whole run: the median drift score of the inputs of its nonlinearities.

    The inputs of the nonlinearities are what BatchNormalization is meant to hold
    steady (Ioffe & Szegedy); a run without a recognised nonlinearity uses all
    its layers. The median keeps one runaway layer (often the logits) from
    speaking for the run. NaN when no layer has two captures. `scores`: the
    `input_drift` of the run, when already computed.
    """
    scores = input_drift(run, metric) if scores is None else scores
    finite = [score for score in scores.values() if np.isfinite(score)]
    return float(np.median(finite)) if finite else float("nan")


def compare_runs(
    baseline: Run, other: Run, metric: str = "w1", by: str = "role"
) -> dict[str, tuple[float, float, float]]:
    """Per pair of comparable tensors: (baseline score, other score, baseline / other).

    `by="role"` (default) pairs the input of the k-th nonlinearity of each run
    (baseline `fc1` with BN `fc1_bn`), keyed "input of <nonlinearity>"; `by="name"`
    pairs layers of equal name. See `icsviz.analysis.roles`.
    """
    from .roles import pair_layers  # roles imports nothing from here: no cycle at import time

    a = {d.layer: d.score for d in run_drift(baseline, metric)}
    b = {d.layer: d.score for d in run_drift(other, metric)}
    pairs = [
        (label, (names["a"], names["b"])) for label, names in pair_layers({"a": baseline, "b": other}, by=by)
    ]
    return compare_scores(a, b, pairs)


def compare_scores(
    baseline: Mapping[str, float], other: Mapping[str, float], pairs: Sequence[tuple[str, tuple[str, str]]]
) -> dict[str, tuple[float, float, float]]:
    """`compare_runs` from drift scores already computed ({layer: score} per run) and the
    pairs [(label, (baseline layer, other layer))] to compare."""
    out = {}
    for label, (name_a, name_b) in pairs:
        score_a, score_b = baseline.get(name_a, np.nan), other.get(name_b, np.nan)
        ratio = score_a / score_b if np.isfinite(score_b) and score_b > 0 else np.nan
        out[label] = (score_a, score_b, ratio)
    return out


def gradient_shift_summary(run: Run) -> Mapping[str, tuple[float, float]]:
    """Per layer: (mean ||G - G'||, mean cos(G, G')) over the captures after step 0."""
    if not run.has_ics:
        raise MissingDataError(
            f"{run.path.name} has no gradient-shift data (record with gradient_shift=True)"
        )
    out = {}
    for name in run.ics_layer_names:
        ics = run.ics(name)
        out[name] = (
            float(np.nanmean(ics.grad_diff[1:])) if len(ics.grad_diff) > 1 else np.nan,
            float(np.nanmean(ics.grad_cos[1:])) if len(ics.grad_cos) > 1 else np.nan,
        )
    return out


@dataclass(frozen=True)
class Divergence:
    """Where a run stopped producing numbers."""

    epoch: float  # of the first capture with NaN/Inf activations, else of the first bad loss
    step: int | None  # that capture's training step (None: only the loss shows it)
    layers: tuple[str, ...]  # layers with NaN/Inf at that capture, model order
    loss_epoch: int | None  # first epoch (1 = the first) whose training loss is NaN/Inf

    def describe(self) -> str:
        parts = []
        if self.step is not None:
            shown = ", ".join(self.layers[:3]) + (
                f" and {len(self.layers) - 3} more" if len(self.layers) > 3 else ""
            )
            parts.append(
                f"NaN/Inf activations from step {self.step} (epoch {self.epoch:g}), first in {shown}"
            )
        if self.loss_epoch is not None:
            parts.append(f"the training loss is NaN/Inf from epoch {self.loss_epoch}")
        return "diverged: " + "; ".join(parts)


def divergence(run: Run) -> Divergence | None:
    """The first capture with NaN/Inf activations and the first non-finite loss, or None."""
    first, layers = None, []
    for name in run.layer_names:
        bad = np.flatnonzero(run.nonfinite(name) > 0)
        if not len(bad):
            continue
        t = int(bad[0])
        if first is None or t < first:
            first, layers = t, [name]
        elif t == first:
            layers.append(name)
    loss = run.history.get("loss", np.array([]))
    bad_loss = np.flatnonzero(~np.isfinite(loss))
    loss_epoch = int(run.history_epochs[bad_loss[0]]) + 1 if len(bad_loss) else None
    if first is None and loss_epoch is None:
        return None
    if first is not None:
        return Divergence(float(run.epochs[first]), int(run.steps[first]), tuple(layers), loss_epoch)
    return Divergence(float(loss_epoch - 1), None, (), loss_epoch)  # the loss went bad during that epoch
