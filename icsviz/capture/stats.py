"""The statistics kernels: what a capture computes from one captured tensor.

Everything here is written with `keras.ops` and runs inside the compiled
capture function, so only the small results (bin counts, quantiles, moments)
cross to the host. docs/statistics.md defines each quantity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ..store.schema import QUANTILES, LayerSpec
from . import backend

__all__ = [
    "CaptureOptions",
    "MaskMismatch",
    "TracedLayer",
    "plan_tensor",
    "all_rows",
    "budgeted",
    "measured_rows",
    "unit_axis",
    "dyadic_bin_width",
    "dyadic_grid",
    "interpolated_quantiles",
    "interpolated_quantiles_np",
    "layer_stats",
]

ops = keras.ops


class MaskMismatch(ValueError):
    """A tensor's Keras mask does not say which of its rows are padding."""


@dataclass(frozen=True)
class CaptureOptions:
    """What a capture computes. See docs/statistics.md for the definitions."""

    hist_bins: int = 64
    quantile_sample: int = 4096  # layer quantiles from at most this many values (docs/statistics.md)
    tracked_units: int = 3  # units per layer whose own quantiles are kept
    unit_quantile_sample: int = 1024
    # Histogram, moments and quantiles from at most this many values per tensor: a fixed random
    # sample of (sample, position) rows, all units of each (docs/statistics.md, "Value budget").
    max_values: int | None = 2**16
    training: bool = True  # run layers in training mode (BN batch statistics)
    gradient_shift: bool = False
    seed: int = 0


@dataclass
class TracedLayer:
    """A captured tensor as seen while tracing: shape and sampling plan."""

    name: str
    class_name: str
    kind: str
    shape: tuple[int, ...]  # with the batch axis
    unit_axis: int
    n_units: int
    n_values: int  # values counted in histogram and moments
    samples: int  # probe samples those values come from (all of them)
    tracked_units: tuple[int, ...]
    row_index: np.ndarray | None = None  # the (sample, position) rows kept by the value budget
    quantile_index: np.ndarray | None = None  # flat positions of the quantile sample
    unit_rows: np.ndarray | None = None  # rows sampled for tracked-unit quantiles
    # An exact monotone map of the tensor `range_from` names (monotone.py): its range over every
    # value is that map of the source's, with no pass over this tensor's values.
    range_from: str | None = None
    range_map: Callable[[Any], Any] | None = None
    # The rows the probe's Keras mask keeps (padding left out; see `plan_tensor`), or None for
    # every row. `row_index` and `unit_rows` then count among these rows.
    valid_rows: np.ndarray | None = None

    @property
    def rows(self) -> int:
        """Budgeted rows (one probe sample at one position, all units)."""
        return self.n_values // self.n_units

    @property
    def quantile_sample_size(self) -> int:
        """Values the layer's quantiles come from."""
        return self.n_values if self.quantile_index is None else len(self.quantile_index)

    @property
    def unit_sample_rows(self) -> int:
        """Rows each tracked unit's quantiles come from."""
        return self.rows if self.unit_rows is None else len(self.unit_rows)

    @property
    def measured_values(self) -> int:
        """Values the statistics describe: every value, or those the Keras mask keeps."""
        if self.valid_rows is None:
            return int(np.prod(self.shape))
        return len(self.valid_rows) * self.n_units

    @property
    def budget_cut(self) -> bool:
        """Whether the value budget left values out (the range is then taken over all of them)."""
        return self.n_values < self.measured_values

    def spec(self) -> LayerSpec:
        return LayerSpec(
            name=self.name,
            class_name=self.class_name,
            kind=self.kind,
            output_shape=tuple(int(d) for d in self.shape[1:]),
            n_units=self.n_units,
            tracked_units=self.tracked_units,
            n_values=self.n_values,
            samples=self.samples,
            quantile_sample=self.quantile_sample_size,
            value_sample=_value_sample(self.valid_rows is not None, self.row_index is not None),
        )


def _value_sample(masked: bool, sampled: bool) -> str:
    if masked:
        return "mask, rows" if sampled else "mask"
    return "rows" if sampled else "all"


def unit_axis(layer: Any, rank: int) -> int:
    if rank <= 1:
        return 0
    if getattr(layer, "data_format", None) == "channels_first":
        return 1
    axis = getattr(layer, "axis", None)
    if isinstance(axis, int) and "Normalization" in type(layer).__name__:
        return axis % rank
    if rank >= 4 and keras.config.image_data_format() == "channels_first":
        return 1
    return rank - 1


def plan_tensor(
    name: str,
    layer: Any,
    kind: str,
    shape: tuple[int, ...],
    index: int,
    options: CaptureOptions,
    mask: np.ndarray | None = None,
) -> TracedLayer:
    """How one captured tensor is reduced: its unit axis, value budget and samples.

    `mask`: the Keras mask the tensor carries on the probe (`Embedding(mask_zero=True)`,
    `Masking` and the layers after them), True where a (sample, position) row is data; the
    padding rows are left out of every statistic. Raises ValueError for a tensor that cannot
    be measured (a dimension unknown while tracing); the caller skips that layer with a warning.
    """
    if any(d is None for d in shape):
        raise ValueError(f"its output shape {shape} has a dimension that is unknown while tracing")
    shape = tuple(int(d) for d in shape)
    if any(d == 0 for d in shape):
        raise ValueError(f"its output shape {shape} holds no values")
    rank = len(shape)
    axis = unit_axis(layer, rank)
    n_units = shape[axis] if rank > 1 else 1
    per_sample = int(np.prod(shape[1:])) if rank > 1 else 1
    samples = shape[0] if rank else 1
    rows = samples * per_sample // n_units  # a row: one sample at one position, all units
    valid_rows = _valid_rows(mask, shape, axis, rows)
    if valid_rows is not None:
        rows = len(valid_rows)
    rng = np.random.default_rng([options.seed, index])
    row_index = None
    if options.max_values is not None and rows * n_units > options.max_values:
        # A fixed random sample of rows across every probe sample and position: unbiased
        # (a regular grid of positions over-weighted the borders, where padding shows).
        keep = max(1, options.max_values // n_units)
        row_index = np.sort(rng.choice(rows, size=keep, replace=False)).astype("int32")
        rows = keep
    n_values = rows * n_units
    qs = options.quantile_sample
    quantile_index = None
    if n_values > qs:
        quantile_index = np.sort(rng.choice(n_values, size=qs, replace=False)).astype("int32")
    tracked_count = min(options.tracked_units, n_units)
    tracked = tuple(int(u) for u in np.linspace(0, n_units - 1, tracked_count).round())
    unit_rows = None
    if rows > options.unit_quantile_sample:
        unit_rows = np.sort(rng.choice(rows, size=options.unit_quantile_sample, replace=False)).astype(
            "int32"
        )
    return TracedLayer(
        name=name,
        class_name=type(layer).__name__,
        kind=kind,
        shape=shape,
        unit_axis=axis,
        n_units=n_units,
        n_values=n_values,
        samples=samples,
        tracked_units=tracked,
        row_index=row_index,
        quantile_index=quantile_index,
        unit_rows=unit_rows,
        valid_rows=valid_rows,
    )


def _valid_rows(mask: np.ndarray | None, shape: tuple[int, ...], axis: int, rows: int) -> np.ndarray | None:
    """The rows a Keras mask keeps, as indices into every row; None where it keeps them all.

    A mask covers the positions of a tensor whose units are on the last axis (batch, time,
    units: mask (batch, time)). Raises MaskMismatch for one that does not, or that keeps nothing.
    """
    if mask is None:
        return None
    mask = np.asarray(mask)
    if axis != len(shape) - 1 or tuple(mask.shape) != shape[:-1]:
        raise MaskMismatch(
            f"its Keras mask has shape {tuple(mask.shape)}, which does not cover the positions of "
            f"its output {shape}"
        )
    kept = np.flatnonzero(mask.reshape(-1).astype(bool))
    if kept.size == 0:
        raise MaskMismatch("its Keras mask leaves out every position of the probe (all padding)")
    if kept.size == rows:
        return None
    return kept.astype("int32" if rows < 2**31 else "int64")


def all_rows(tensor: Any, plan: TracedLayer) -> Any:
    """Every value of the tensor as (rows, units) float32, units last (a row: one probe sample
    at one position)."""
    x = ops.cast(tensor, "float32")
    if plan.unit_axis != len(plan.shape) - 1:
        x = ops.moveaxis(x, plan.unit_axis, -1)
    return ops.reshape(x, (-1, plan.n_units))


def measured_rows(tensor: Any, plan: TracedLayer) -> Any:
    """The rows the statistics describe, as (rows, units) float32: every row, or those the
    probe's Keras mask keeps."""
    units = all_rows(tensor, plan)
    return units if plan.valid_rows is None else backend.gather(units, plan.valid_rows)


def budgeted(measured: Any, plan: TracedLayer) -> Any:
    """The budgeted values of a tensor's `measured_rows`, (rows, units): all of them, or the
    plan's fixed sample of them."""
    return measured if plan.row_index is None else backend.gather(measured, plan.row_index)


def dyadic_bin_width(low: float, high: float, bins: int) -> tuple[float, float]:
    """(first edge, width) of the aligned power-of-two grid covering [low, high].

    The width is the smallest power of two w such that `bins` bins of width w,
    starting at a multiple of w, hold [low, high]. Edges of a coarser grid are
    a subset of a finer one's, so histograms of two captures can be merged onto
    the coarser grid exactly. One range of `dyadic_grid_np`, the host-side twin
    of `dyadic_grid`.
    """
    first, width = dyadic_grid_np(np.array([low]), np.array([high]), bins)
    return float(first[0]), float(width[0])


def dyadic_grid(low: Any, high: Any, bins: int) -> tuple[Any, Any]:
    low64, high64 = ops.cast(low, backend.wide_float()), ops.cast(high, backend.wide_float())
    # maxima as `where` and floor/ceil from `backend`: on torch Keras's own computed them in float32
    magnitude = _larger(
        _larger(ops.abs(low64), ops.abs(high64)) * 2.0**-24, ops.zeros_like(low64) + 2.0**-100
    )
    span = _larger(high64 - low64, magnitude)
    width = ops.power(2.0, backend.ceil(ops.log2(span / bins)))
    for _ in range(2):  # a range straddling grid lines can need two doublings when bins == 2
        too_many = (backend.floor(high64 / width) - _grid_floor_op(low64, width) / width) >= bins
        width = ops.where(too_many, width * 2.0, width)
    return _grid_floor_op(low64, width), width


def _larger(a: Any, b: Any) -> Any:
    return ops.where(a >= b, a, b)


def dyadic_grid_np(low: np.ndarray, high: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """`dyadic_grid` in numpy (float64), for rows of ranges: (first edges, widths); see
    `dyadic_bin_width` for the grid."""
    low64, high64 = np.asarray(low, np.float64), np.asarray(high, np.float64)
    span = np.maximum(
        high64 - low64, np.maximum(np.maximum(np.abs(low64), np.abs(high64)) * 2.0**-24, 2.0**-100)
    )
    width = np.power(2.0, np.ceil(np.log2(span / bins)))
    for _ in range(2):
        too_many = (np.floor(high64 / width) - _grid_floor_np(low64, width) / width) >= bins
        width = np.where(too_many, width * 2.0, width)
    return _grid_floor_np(low64, width), width


def _grid_floor_np(value: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The grid line at or below `value` (low / width can underflow to -0.0 for a tiny negative low)."""
    first = np.floor(value / width) * width
    return np.where(first > value, first - width, first)


def _grid_floor_op(value: Any, width: Any) -> Any:
    first = backend.floor(value / width) * width
    return ops.where(first > value, first - width, first)


def _take_last(values: Any, index: Any) -> Any:
    """values[..., index[...]] along the last axis for 1-D or 2-D values, as one flat gather
    (keras.ops.take_along_axis builds ~40 ops per call on TensorFlow: slow to trace)."""
    if len(values.shape) == 1:
        return backend.gather(values, index)
    rows, width = values.shape[0], values.shape[1]
    offsets = ops.expand_dims(ops.arange(rows, dtype="int32") * width, -1)
    return backend.gather(ops.reshape(values, (-1,)), index + offsets)


def interpolated_quantiles(sorted_values: Any, n_finite: Any, q: np.ndarray) -> Any:
    """Linear-interpolation quantiles of the first `n_finite` sorted values (last axis)."""
    n = ops.cast(n_finite, "float32")
    pos = ops.expand_dims(ops.maximum(n - 1.0, 0.0), -1) * ops.convert_to_tensor(q, "float32")
    lower = ops.floor(pos)
    frac = pos - lower
    upper = ops.minimum(lower + 1.0, ops.expand_dims(ops.maximum(n - 1.0, 0.0), -1))
    lo_vals = _take_last(sorted_values, ops.cast(lower, "int32"))
    hi_vals = _take_last(sorted_values, ops.cast(upper, "int32"))
    out = lo_vals + (hi_vals - lo_vals) * frac
    return ops.where(ops.expand_dims(n, -1) > 0, out, float("nan"))


def interpolated_quantiles_np(sorted_values: np.ndarray, n_finite: np.ndarray, q: np.ndarray) -> np.ndarray:
    """`interpolated_quantiles` on the host, in the same float32 steps (the same numbers): rows of
    `sorted_values` (k, n) with `n_finite` (k,) values each."""
    f32 = np.float32
    top = np.maximum(np.asarray(n_finite, f32) - f32(1), f32(0))[:, None]
    pos = top * q.astype(f32)
    lower = np.floor(pos)
    frac = pos - lower
    upper = np.minimum(lower + f32(1), top)
    rows = np.arange(len(sorted_values))[:, None]
    lo_vals = sorted_values[rows, lower.astype(np.int64)]
    hi_vals = sorted_values[rows, upper.astype(np.int64)]
    with np.errstate(invalid="ignore"):  # a row with no values reads +inf padding: NaN below
        out = lo_vals + (hi_vals - lo_vals) * frac
    return np.where(np.asarray(n_finite)[:, None] > 0, out, np.float32(np.nan)).astype(f32)


def layer_stats(tensor: Any, plan: TracedLayer, options: CaptureOptions, *, masked: bool) -> dict[str, Any]:
    measured = measured_rows(tensor, plan)
    # Every value, or the ones the mask keeps (gathered once, for the range and the budget both).
    full = ops.reshape(ops.cast(tensor, "float32") if plan.valid_rows is None else measured, (-1,))
    units = budgeted(measured, plan)
    all_finite = ops.isfinite(ops.sum(full))  # NaN/Inf anywhere poisons the sum
    stats = reduce_values(
        units, ops.reshape(units, (-1,)), plan, options, masked=masked, all_finite=all_finite
    )
    low, high, n_finite = stats.pop("low"), stats.pop("high"), stats.pop("n_finite")
    if plan.budget_cut:
        # The budget cut the values: range and non-finite count stay exact over every value.
        if masked:
            finite = ops.isfinite(full)
            n_finite = ops.sum(ops.cast(finite, "int32"))
            low = ops.min(ops.where(finite, full, float("inf")))
            high = ops.max(ops.where(finite, full, float("-inf")))
        else:
            low, high, n_finite = ops.min(full), ops.max(full), int(full.shape[0])
    wide = backend.wide_float()
    moments = ops.stack(
        [
            ops.cast(stats.pop("mean"), wide),
            ops.cast(stats.pop("std"), wide),
            ops.cast(ops.where(n_finite > 0, low, float("nan")), wide),
            ops.cast(ops.where(n_finite > 0, high, float("nan")), wide),
        ]
    )
    if masked:
        stats["moments"] = ops.where(ops.isfinite(moments), moments, float("nan"))
        stats["nonfinite"] = ops.cast(int(full.shape[0]) - n_finite, "int32")
    else:
        stats["moments"] = moments
        stats["nonfinite"] = ops.convert_to_tensor(0, "int32")
        stats["all_finite"] = all_finite
    return stats


def reduce_values(
    units: Any,
    flat: Any,
    plan: TracedLayer,
    options: CaptureOptions,
    *,
    masked: bool,
    all_finite: Any,
) -> dict[str, Any]:
    """Statistics of the budgeted values (`units`: rows x units, `flat`: the same, 1-D).

    Returns everything but the moments and the non-finite count, which the
    caller assembles with the exact range.
    """
    bins = options.hist_bins
    rows = plan.rows
    if masked:
        finite_units = ops.isfinite(units)
        finite = ops.reshape(finite_units, (-1,))
        weight = ops.cast(finite_units, "float32")
        units0 = ops.where(finite_units, units, 0.0)
        count_c = ops.sum(weight, axis=0)
        safe_c = ops.maximum(count_c, 1.0)
        mean_c = ops.sum(units0, axis=0) / safe_c
        var_c = ops.sum(ops.square((units0 - mean_c) * weight), axis=0) / safe_c
        n_finite = ops.sum(ops.cast(finite, "int32"))
        low = ops.min(ops.where(finite, flat, float("inf")))
        high = ops.max(ops.where(finite, flat, float("-inf")))
        any_finite = n_finite > 0
        low = ops.where(any_finite, low, 0.0)
        high = ops.where(any_finite, high, 0.0)
        hist_values = ops.where(finite, flat, low)  # parked in bin 0, removed below
        mean_c = ops.where(count_c > 0, mean_c, float("nan"))
        var_c = ops.where(count_c > 0, var_c, float("nan"))
    else:
        count_c = ops.full((plan.n_units,), float(rows))
        mean_c = ops.mean(units, axis=0)
        var_c = ops.mean(ops.square(units - mean_c), axis=0)
        n_finite = ops.convert_to_tensor(plan.n_values, "int32")
        low, high = ops.min(flat), ops.max(flat)
        # With NaN/Inf present this result is discarded (the masked program
        # reruns), but it must still run: keep the histogram range valid.
        sane = ops.logical_and(ops.isfinite(low), ops.isfinite(high))
        low, high = ops.where(sane, low, 0.0), ops.where(sane, high, 1.0)
        hist_values = flat
    n_bad = plan.n_values - n_finite

    # Layer moments from the per-unit ones (parallel variance formula): no extra pass.
    total = ops.maximum(ops.sum(count_c), 1.0)
    valid = count_c > 0
    mean = ops.sum(ops.where(valid, count_c * mean_c, 0.0)) / total
    spread = ops.where(valid, count_c * (var_c + ops.square(mean_c - mean)), 0.0)
    std = ops.sqrt(ops.sum(spread) / total)
    counted = ops.sum(count_c) > 0  # all values NaN/Inf: no moments, not zeros
    mean, std = ops.where(counted, mean, float("nan")), ops.where(counted, std, float("nan"))
    zeros = ops.sum(ops.cast(ops.equal(flat, 0.0), "int32"))
    zero_frac = ops.cast(zeros, "float32") / ops.maximum(ops.cast(n_finite, "float32"), 1.0)

    first, width = dyadic_grid(low, high, bins)

    def count() -> Any:
        return backend.histogram(hist_values, first, width, bins)

    if masked:
        counts = count()
    else:  # skipped when NaN/Inf are present: that result is discarded anyway
        counts = ops.cond(all_finite, count, lambda: ops.zeros((bins,), "int32"))
    counts = counts - ops.cast(ops.one_hot(0, bins), "int32") * ops.cast(n_bad, "int32")
    edges = first + width * ops.arange(bins + 1, dtype=backend.wide_float())

    # Quantiles from a fixed sample of positions (all values when the layer is small).
    q = np.asarray(QUANTILES, dtype="float32")
    sample = flat if plan.quantile_index is None else backend.gather(flat, plan.quantile_index)
    if masked:
        sample_finite = ops.isfinite(sample)
        sample = ops.where(sample_finite, sample, float("inf"))
        n_sample = ops.sum(ops.cast(sample_finite, "int32"))
    else:
        n_sample = ops.convert_to_tensor(int(sample.shape[0]), "int32")
    quantiles = interpolated_quantiles(ops.sort(sample), n_sample, q)

    tracked = ops.transpose(backend.gather(units, np.asarray(plan.tracked_units, "int32"), axis=1))
    if plan.unit_rows is not None:
        tracked = backend.gather(tracked, plan.unit_rows, axis=1)
    tracked_finite = ops.isfinite(tracked)
    tracked = ops.where(tracked_finite, tracked, float("inf"))
    n_tracked = ops.sum(ops.cast(tracked_finite, "int32"), axis=1)
    unit_quantiles = interpolated_quantiles(ops.sort(tracked, axis=-1), n_tracked, q)

    return {
        "hist_counts": counts,
        "hist_edges": edges,
        "quantiles": quantiles,
        "mean": mean,
        "std": std,
        "zero_frac": zero_frac,
        "unit_mean": mean_c,
        "unit_std": ops.sqrt(var_c),
        "unit_quantiles": unit_quantiles,
        # The budgeted values' range and finite count: the caller's, unless the budget cut values.
        "low": low,
        "high": high,
        "n_finite": n_finite,
    }
