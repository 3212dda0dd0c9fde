"""Histogram helpers: re-binning onto shared grids (pure numpy).

Captured histograms use dyadic grids (docs/statistics.md): onto a coarser
dyadic grid re-binning is exact. Onto any other grid the counts of a bin are
spread uniformly within it (linear interpolation of the cumulative counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "rebin",
    "rebin_captures",
    "common_edges",
    "shared_edges",
    "densities",
    "centers",
    "time_edges",
    "ridgeline_captures",
]


def rebin(counts: np.ndarray, edges: np.ndarray, new_edges: np.ndarray) -> np.ndarray:
    """Counts of a histogram (`counts`, `edges`) on the bins `new_edges`.

    Mass outside `new_edges` is dropped; choose edges that cover the data
    (`common_edges`). Exact whenever every new edge is an old edge or lies
    outside the old range.
    """
    counts = np.asarray(counts, dtype=float)
    edges = np.asarray(edges, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    at_new = np.interp(new_edges, edges, cumulative, left=0.0, right=cumulative[-1])
    return np.diff(at_new)


def common_edges(edge_sets: list[np.ndarray], bins: int = 64) -> np.ndarray:
    """`bins` equal bins spanning every histogram in `edge_sets` (arrays of edges)."""
    lows = [float(e[0]) for e in edge_sets if len(e) and np.isfinite(e[0])]
    highs = [float(e[-1]) for e in edge_sets if len(e) and np.isfinite(e[-1])]
    if not lows:
        return np.linspace(0.0, 1.0, bins + 1)
    low, high = min(lows), max(highs)
    if high <= low:
        high = low + 1.0
    return np.linspace(low, high, bins + 1)


def centers(edges: np.ndarray) -> np.ndarray:
    return (edges[:-1] + edges[1:]) / 2


def densities(counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Probability density per bin (integrates to 1; zeros for an empty histogram)."""
    counts = np.asarray(counts, dtype=float)
    total = counts.sum(axis=-1, keepdims=True)
    width = np.diff(edges, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = counts / (total * width)
    return np.where(np.isfinite(out), out, 0.0)


def shared_edges(runs: Mapping[str, Any], layer: str, bins: int = 80) -> np.ndarray:
    """One grid spanning every value of `layer` in every run (a mapping of `Run`s) that has it.

    From the exact recorded min / max: the dyadic histogram edges reach up to a
    bin span beyond the data, which would waste the axis.
    """
    sets = []
    for run in runs.values():
        if layer not in run.layer_names:
            continue
        acts = run.activations(layer)
        lows, highs = acts.min[np.isfinite(acts.min)], acts.max[np.isfinite(acts.max)]
        if len(lows) and len(highs):
            sets.append(np.array([lows.min(), highs.max()]))
        elif len(acts.edges):
            sets.append(np.array([np.nanmin(acts.edges[:, 0]), np.nanmax(acts.edges[:, -1])]))
    return common_edges(sets, bins)


def rebin_captures(acts: Any, edges: np.ndarray, indices: Sequence[int] | None = None) -> np.ndarray:
    """(n, len(edges) - 1) counts of the chosen captures (all by default) of an ActivationStats."""
    picks = range(len(acts.counts)) if indices is None else indices
    rows = [rebin(acts.counts[i], acts.edges[i], edges) for i in picks]
    return np.stack(rows) if rows else np.zeros((0, len(edges) - 1))


def time_edges(epochs: np.ndarray) -> np.ndarray:
    """Capture times plus one closing edge, so each capture spans until the next one (heatmaps).

    A run of one capture (a live run's first minutes) has no time to span: its cell is
    centred on it, half an epoch each way, where it used to claim epochs 0 to 1."""
    if len(epochs) == 1:
        return np.array([epochs[0] - 0.5, epochs[0] + 0.5])
    return np.append(epochs, epochs[-1] + (epochs[-1] - epochs[-2]))


def ridgeline_captures(run: Any, rows: int = 10) -> list[int]:
    """Up to `rows` capture indices, evenly spread over the epoch captures (start included)."""
    kinds = run.capture_kinds
    candidates = [i for i, k in enumerate(kinds) if k in ("start", "epoch")] or list(range(run.num_captures))
    if len(candidates) <= rows:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, rows).round().astype(int)
    return [candidates[i] for i in sorted(set(picks))]
