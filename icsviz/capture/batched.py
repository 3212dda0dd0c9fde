"""The statistics of every captured tensor at once: a capture's cost, independent of depth.

`layer_stats` (stats.py) reduces one tensor in some eighty small operations. A
deep model's capture ran them for each of its 150 tensors: on a CPU the cost of
launching that many small kernels outweighed the arithmetic, and tracing and
optimizing that graph took most of the first capture. Here each tensor costs
only what must read all of its values (its sum, and its range when the value
budget leaves values out) and the gather of its budgeted rows. Tensors whose
budgeted values have the same shape form a group (MobileNetV2's 151 tensors
make 18 groups, probe 64) and are reduced as one stacked array: moments, range, zeros,
histograms, samples. One sort then orders every layer's quantile sample, one
every tracked unit's rows.

The results are the same quantities as `layer_stats` computes, for finite
values: a capture with NaN or Inf anywhere is computed again by the masked,
per-tensor program (see `CaptureProgram.run`). The arrays come out group by
group; `split` cuts them into one `LayerCapture`'s worth per tensor, in the
plans' order, on the host.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from ..store.schema import QUANTILES
from . import backend
from .stats import (
    CaptureOptions,
    TracedLayer,
    budgeted,
    dyadic_grid,
    interpolated_quantiles_np,
    measured_rows,
)

__all__ = ["all_layer_stats", "split", "groups", "host_quantiles"]

ops = keras.ops
_INF = float("inf")


def groups(plans: Sequence[TracedLayer]) -> list[list[int]]:
    """Indices of `plans` grouped by the shape of their budgeted values (rows, units) and
    whether the budget cut values, in order of first appearance: each group is reduced as one
    stacked array."""
    by_key: dict[tuple[int, int, bool], list[int]] = {}
    for index, plan in enumerate(plans):
        key = (plan.rows, plan.n_units, plan.budget_cut)
        by_key.setdefault(key, []).append(index)
    return list(by_key.values())


def _padded(rows: Any, width: int) -> Any:
    """`rows` (k, n) padded with +inf to (k, width): sorted, the padding stays at the end."""
    missing = width - int(rows.shape[-1])
    return rows if missing == 0 else ops.pad(rows, [[0, 0], [0, missing]], constant_values=_INF)


def _member_gather(values: Any, indices: Sequence[np.ndarray], stride: int) -> Any:
    """values.reshape(-1)[m * stride + indices[m]] for each member m, as one (k, n) gather."""
    offsets = [index.astype("int64") + m * stride for m, index in enumerate(indices)]
    flat_index = np.stack(offsets)
    dtype = "int32" if flat_index.max(initial=0) < 2**31 else "int64"
    return backend.gather(ops.reshape(values, (-1,)), flat_index.astype(dtype))


_EXACT_IN_FLOAT32 = ("float16", "bfloat16", "float32")


def _derived_ranges(plans: Sequence[TracedLayer], dtypes: Sequence[str]) -> dict[int, int]:
    """{index: source index}, in order, of the budget-cut tensors whose exact range is a
    monotone map of an earlier budget-cut tensor's (monotone.py): no pass over their values
    for it. Only where float32 holds the source's values exactly (the map is applied to them
    in the source's own dtype)."""
    position = {plan.name: i for i, plan in enumerate(plans)}
    derived: dict[int, int] = {}
    for index, plan in enumerate(plans):
        source = position.get(plan.range_from) if plan.range_from is not None else None
        if (
            source is not None
            and source < index
            and plan.range_map is not None
            and plan.row_index is not None
            and plans[source].row_index is not None
            and dtypes[source] in _EXACT_IN_FLOAT32
            and _same_rows(plan.valid_rows, plans[source].valid_rows)
        ):
            derived[index] = source
    return derived


def _same_rows(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two plans measure the same rows (a range maps onto the rows it was taken over)."""
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


class _Group:
    """One group's stacked budgeted values and what is computed from them on the way."""

    def __init__(self, members: list[int], plans: Sequence[TracedLayer], units: list[Any]) -> None:
        self.members = members
        self.plans = [plans[i] for i in members]
        first = self.plans[0]
        self.rows, self.n_units = first.rows, first.n_units
        stacked = [units[i] for i in members]
        self.values = ops.stack(stacked) if len(stacked) > 1 else ops.expand_dims(stacked[0], 0)
        self.flat = ops.reshape(self.values, (len(members), self.rows * self.n_units))

    def quantile_sample(self) -> Any:
        """(k, n): each member's quantile sample (all its values when the layer is small)."""
        if self.plans[0].quantile_index is None:
            return self.flat
        index = [p.quantile_index for p in self.plans]
        return _member_gather(self.flat, index, self.rows * self.n_units)

    def tracked_rows(self) -> Any:
        """(k * tracked units, n): each tracked unit's sampled rows, member by member."""
        tracked = np.asarray(self.plans[0].tracked_units, "int32")
        picked = ops.transpose(backend.gather(self.values, tracked, axis=2), (0, 2, 1))  # k, t, rows
        if self.plans[0].unit_rows is None:
            return ops.reshape(picked, (-1, self.rows))
        # member m's tracked unit u, sampled row r: at (m, u, unit_rows[r]) of `picked`
        steps = np.arange(len(tracked))[:, None] * self.rows
        index = [p.unit_rows[None, :] + steps for p in self.plans]  # a group's members all sample rows
        gathered = _member_gather(picked, index, len(tracked) * self.rows)
        return ops.reshape(gathered, (-1, index[0].shape[1]))


def all_layer_stats(
    tensors: Sequence[Any], plans: Sequence[TracedLayer], options: CaptureOptions
) -> dict[str, Any]:
    """The statistics of `tensors` (one per plan), group by group (see `groups`, `split`)."""
    bins = options.hist_bins
    wide = backend.wide_float()
    # NaN/Inf anywhere poisons a tensor's sum, and the masked program takes the capture over.
    # A tensor the budget cut is summed, and its range taken (exact over every value), on its
    # own; the others are whole in their group's stacked values.
    units, sums, exact_low, exact_high = [], {}, {}, {}
    derived = _derived_ranges(plans, [keras.backend.standardize_dtype(t.dtype) for t in tensors])
    for index, (tensor, plan) in enumerate(zip(tensors, plans)):
        every = measured_rows(backend.detached(tensor), plan)  # statistics, never differentiated
        if plan.row_index is not None and index not in derived:
            sums[index], exact_low[index] = ops.sum(every), ops.min(every)
            exact_high[index] = ops.max(every)
        units.append(budgeted(every, plan))
    for index, source in derived.items():  # sources come first: a map's input is made before it
        ends = ops.cast(ops.stack([exact_low[source], exact_high[source]]), tensors[source].dtype)
        mapped = ops.cast(plans[index].range_map(ends), "float32")  # type: ignore[misc]
        exact_low[index], exact_high[index] = mapped[0], mapped[1]
        # Finite where the source is (these maps take finite values to finite values); a source
        # with NaN/Inf sends the whole capture to the masked program anyway.
        sums[index] = sums[source]

    keys = ("low", "high", "zeros", "mean", "std", "unit_mean", "unit_var", "exact_low", "exact_high", "sums")
    parts: dict[str, list[Any]] = {key: [] for key in (*keys, "samples", "tracked")}
    stacked = [_Group(members, plans, units) for members in groups(plans)]
    for group in stacked:
        mean_u = ops.mean(group.values, axis=1)  # (k, units)
        var_u = ops.mean(ops.square(group.values - ops.expand_dims(mean_u, 1)), axis=1)
        low, high = ops.min(group.flat, axis=1), ops.max(group.flat, axis=1)
        # Layer moments from the per-unit ones: every unit of a layer counts the same rows.
        mean = ops.mean(mean_u, axis=1)
        parts["mean"].append(mean)
        parts["std"].append(ops.sqrt(ops.mean(var_u + ops.square(mean_u - ops.expand_dims(mean, 1)), axis=1)))
        parts["low"].append(low)
        parts["high"].append(high)
        parts["zeros"].append(ops.sum(ops.cast(ops.equal(group.flat, 0.0), "int32"), axis=1))
        parts["unit_mean"].append(ops.reshape(mean_u, (-1,)))
        parts["unit_var"].append(ops.reshape(var_u, (-1,)))
        if group.members[0] in sums:  # the budget cut these tensors' values
            parts["sums"].append(ops.stack([sums[i] for i in group.members]))
            parts["exact_low"].append(ops.stack([exact_low[i] for i in group.members]))
            parts["exact_high"].append(ops.stack([exact_high[i] for i in group.members]))
        else:
            parts["sums"].append(ops.sum(group.flat, axis=1))
            parts["exact_low"].append(low)
            parts["exact_high"].append(high)
        parts["samples"].append(group.quantile_sample())
        parts["tracked"].append(group.tracked_rows())

    order = [i for group in stacked for i in group.members]
    all_finite = ops.isfinite(ops.concatenate(parts["sums"]))
    # Histogram grids for all layers at once (a non-finite range gets a placeholder: that
    # capture is computed again, masked).
    low, high = ops.concatenate(parts["low"]), ops.concatenate(parts["high"])
    sane = ops.logical_and(ops.isfinite(low), ops.isfinite(high))
    first, width = dyadic_grid(ops.where(sane, low, 0.0), ops.where(sane, high, 1.0), bins)
    bounds = np.cumsum([0, *(len(g.members) for g in stacked)])

    def count() -> Any:
        return ops.concatenate(
            [
                backend.histograms(g.flat, first[a:b], width[a:b], bins)
                for g, a, b in zip(stacked, bounds[:-1], bounds[1:])
            ]
        )

    # Skipped when NaN/Inf are present (the bin of a NaN is undefined; the result is discarded).
    counts = ops.cond(ops.all(all_finite), count, lambda: ops.zeros((len(plans), bins), "int32"))

    # The quantile samples leave the device unsorted: the host sorts them (see `split`).
    width_q = max(int(s.shape[-1]) for s in parts["samples"])
    samples = ops.concatenate([_padded(s, width_q) for s in parts["samples"]], axis=0)
    width_u = max(int(t.shape[-1]) for t in parts["tracked"])
    unit_samples = ops.concatenate([_padded(t, width_u) for t in parts["tracked"]], axis=0)

    # a tensor, not a numpy array: torch tensors divided by numpy arrays go through numpy
    n_values = ops.convert_to_tensor(np.asarray([plans[i].n_values for i in order], "float32"))
    moments = [ops.concatenate(parts[key]) for key in ("mean", "std", "exact_low", "exact_high")]
    return {
        "hist_counts": counts,
        "hist_first": first,
        "hist_width": width,
        "samples": samples,
        "moments": ops.stack([ops.cast(v, wide) for v in moments], axis=1),
        "zero_frac": ops.cast(ops.concatenate(parts["zeros"]), "float32") / n_values,
        "unit_mean": ops.concatenate(parts["unit_mean"]),
        "unit_std": ops.sqrt(ops.concatenate(parts["unit_var"])),
        "unit_samples": unit_samples,
        "all_finite": all_finite,
    }


def host_quantiles(samples: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(k, Q) quantiles of each row's first `sizes[i]` values (the rest is +inf padding).

    The samples are sorted here, on the host: numpy sorted MobileNetV2's 151 quantile samples
    and 453 tracked-unit samples in 6 ms, TensorFlow's sort (a top-k over every value) in
    35 ms of the capture on a CPU. The capture's writer thread calls this, off the training
    thread.
    """
    ordered = np.sort(samples, axis=-1)
    return interpolated_quantiles_np(ordered, sizes, np.asarray(QUANTILES, "float32"))


@dataclasses.dataclass(frozen=True)
class _SplitLayout:
    """Where each layer's rows lie in `all_layer_stats`' arrays: fixed for a set of plans."""

    order: list[int]  # plan indices in the arrays' row order
    units: np.ndarray  # cumulative units: row r's unit_mean is units[r]:units[r + 1]
    tracked: np.ndarray  # the same for the tracked units' rows
    sample_sizes: np.ndarray  # values each row's quantiles come from
    unit_sizes: np.ndarray  # rows each tracked unit's quantiles come from


_LAYOUTS: dict[tuple[int, ...], tuple[Sequence[TracedLayer], _SplitLayout]] = {}
_MAX_LAYOUTS = 16
_LAYOUTS_LOCK = threading.Lock()  # writers' threads of several callbacks may split at once


def _split_layout(plans: Sequence[TracedLayer]) -> _SplitLayout:
    """The layout of `plans`, computed once: `split` runs for every capture, on the writer's
    thread, whose Python work the training thread waits for (the GIL)."""
    key = tuple(map(id, plans))
    cached = _LAYOUTS.get(key)
    if cached is not None:
        return cached[1]
    order = [i for members in groups(plans) for i in members]
    layout = _SplitLayout(
        order=order,
        units=np.cumsum([0, *(plans[i].n_units for i in order)]),
        tracked=np.cumsum([0, *(len(plans[i].tracked_units) for i in order)]),
        sample_sizes=np.asarray([plans[i].quantile_sample_size for i in order]),
        unit_sizes=np.repeat(
            [plans[i].unit_sample_rows for i in order], [len(plans[i].tracked_units) for i in order]
        ),
    )
    with _LAYOUTS_LOCK:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = (list(plans), layout)  # the plans are kept: their ids stay theirs
    return layout


def split(batched: dict[str, np.ndarray], plans: Sequence[TracedLayer], bins: int) -> list[dict[str, Any]]:
    """`all_layer_stats`'s host arrays as one dict per layer (`LayerCapture`'s fields and
    `all_finite`), in the order of `plans`; the quantiles computed here (`host_quantiles`)."""
    layout = _split_layout(plans)
    order, units, tracked = layout.order, layout.units, layout.tracked
    quantiles = host_quantiles(batched["samples"], layout.sample_sizes)
    unit_quantiles = host_quantiles(batched["unit_samples"], layout.unit_sizes)
    steps = np.arange(bins + 1, dtype="float64")
    out: list[dict[str, Any]] = [{} for _ in plans]
    for row, i in enumerate(order):
        first, width = batched["hist_first"][row], batched["hist_width"][row]
        out[i] = {
            "hist_counts": batched["hist_counts"][row],
            "hist_edges": (first + width * steps.astype(first.dtype)),
            "quantiles": quantiles[row],
            "moments": batched["moments"][row],
            "zero_frac": batched["zero_frac"][row],
            "nonfinite": np.int32(0),
            "unit_mean": batched["unit_mean"][units[row] : units[row + 1]],
            "unit_std": batched["unit_std"][units[row] : units[row + 1]],
            "unit_quantiles": unit_quantiles[tracked[row] : tracked[row + 1]],
            "all_finite": batched["all_finite"][row],
        }
    return out
