"""The statistics of every captured tensor at once: a capture's cost, independent of depth.

`layer_stats` (stats.py) reduces one tensor in some eighty small operations. A
deep model's capture ran them for each of its 150 tensors, and on a CPU the
cost of launching that many small kernels outweighed the arithmetic (the
statistics of MobileNetV2's capture took six training steps). Here each
tensor costs a dozen operations that read its values (sums, range, histogram,
sample gathers); everything else runs once for all tensors together: the
histogram grids, the layer moments, one sort for every layer's quantile
sample and one for every tracked unit's.

The results are the same quantities as `layer_stats` computes, for finite
values: a capture with NaN or Inf anywhere is computed again by the masked,
per-tensor program (see `CaptureProgram.run`). `split` cuts the batched
arrays into one `LayerCapture`'s worth per tensor, on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from ..store.schema import QUANTILES
from . import backend
from .stats import CaptureOptions, TracedLayer, budgeted, dyadic_grid, interpolated_quantiles

__all__ = ["all_layer_stats", "split"]

ops = keras.ops
_INF = float("inf")


def _padded(rows: Any, width: int) -> Any:
    """`rows` (k, n) padded with +inf to (k, width): sorted, the padding stays at the end."""
    missing = width - int(rows.shape[-1])
    return rows if missing == 0 else ops.pad(rows, [[0, 0], [0, missing]], constant_values=_INF)


def all_layer_stats(
    tensors: Sequence[Any], plans: Sequence[TracedLayer], options: CaptureOptions
) -> dict[str, Any]:
    """The statistics of `tensors` (one per plan), batched across layers. See `split`."""
    bins = options.hist_bins
    q = np.asarray(QUANTILES, "float32")
    wide = backend.wide_float()
    flats, low, high, exact_low, exact_high, sums, zeros = [], [], [], [], [], [], []
    unit_mean, unit_var, samples, tracked = [], [], [], []
    for tensor, plan in zip(tensors, plans):
        tensor = ops.stop_gradient(tensor)  # statistics, never differentiated
        full = ops.reshape(ops.cast(tensor, "float32"), (-1,))
        units = budgeted(tensor, plan)
        flat = ops.reshape(units, (-1,))
        mean_u = ops.mean(units, axis=0)
        unit_mean.append(mean_u)
        unit_var.append(ops.mean(ops.square(units - mean_u), axis=0))
        low.append(ops.min(flat))
        high.append(ops.max(flat))
        # The range stays exact over every value when the budget cut some; NaN/Inf anywhere
        # poisons the sum, and the masked program takes the capture over.
        exact_low.append(ops.min(full) if plan.budget_cut else low[-1])
        exact_high.append(ops.max(full) if plan.budget_cut else high[-1])
        sums.append(ops.sum(full))
        zeros.append(ops.sum(ops.cast(ops.equal(flat, 0.0), "int32")))
        flats.append(flat)
        sample = flat if plan.quantile_index is None else backend.gather(flat, plan.quantile_index)
        samples.append(ops.expand_dims(sample, 0))
        picked = ops.transpose(backend.gather(units, np.asarray(plan.tracked_units, "int32"), axis=1))
        tracked.append(picked if plan.unit_rows is None else backend.gather(picked, plan.unit_rows, axis=1))

    all_finite = ops.isfinite(ops.stack(sums))
    # Histogram grids for all layers at once (a non-finite range gets a placeholder: that
    # capture is computed again, masked).
    low, high = ops.stack(low), ops.stack(high)
    sane = ops.logical_and(ops.isfinite(low), ops.isfinite(high))
    first, width = dyadic_grid(ops.where(sane, low, 0.0), ops.where(sane, high, 1.0), bins)
    firsts = ops.unstack(ops.cast(first, "float32"))
    widths = ops.unstack(ops.cast(width, "float32"))

    def count() -> Any:
        return ops.stack([backend.histogram(v, f, w, bins) for v, f, w in zip(flats, firsts, widths)])

    # Skipped when NaN/Inf are present (TensorFlow's histogram refuses NaN; the result is
    # discarded anyway).
    counts = ops.cond(ops.all(all_finite), count, lambda: ops.zeros((len(plans), bins), "int32"))

    # Layer moments from the per-unit ones: every unit of a layer counts the same rows.
    unit_layer = np.repeat(np.arange(len(plans), dtype="int32"), [p.n_units for p in plans])
    n_units = np.asarray([p.n_units for p in plans], "float32")
    means, variances = ops.concatenate(unit_mean), ops.concatenate(unit_var)
    mean = ops.segment_sum(means, unit_layer, num_segments=len(plans)) / n_units
    spread = variances + ops.square(means - backend.gather(mean, unit_layer))
    std = ops.sqrt(ops.segment_sum(spread, unit_layer, num_segments=len(plans)) / n_units)
    moments = ops.stack(
        [ops.cast(v, wide) for v in (mean, std, ops.stack(exact_low), ops.stack(exact_high))], axis=1
    )

    # One sort for every layer's quantile sample, one for every tracked unit's rows.
    width_q = max(int(s.shape[-1]) for s in samples)
    ordered = ops.sort(ops.concatenate([_padded(s, width_q) for s in samples], axis=0), axis=-1)
    n_sample = np.asarray([int(s.shape[-1]) for s in samples], "int32")
    width_u = max(int(t.shape[-1]) for t in tracked)
    ordered_u = ops.sort(ops.concatenate([_padded(t, width_u) for t in tracked], axis=0), axis=-1)
    n_rows = np.concatenate([np.full(int(t.shape[0]), int(t.shape[-1]), "int32") for t in tracked])

    n_values = np.asarray([p.n_values for p in plans], "float32")
    return {
        "hist_counts": counts,
        "hist_first": first,
        "hist_width": width,
        "quantiles": interpolated_quantiles(ordered, n_sample, q),
        "moments": moments,
        "zero_frac": ops.cast(ops.stack(zeros), "float32") / n_values,
        "unit_mean": means,
        "unit_std": ops.sqrt(variances),
        "unit_quantiles": interpolated_quantiles(ordered_u, n_rows, q),
        "all_finite": all_finite,
    }


def split(batched: dict[str, np.ndarray], plans: Sequence[TracedLayer], bins: int) -> list[dict[str, Any]]:
    """`all_layer_stats`'s host arrays as one dict per layer (`LayerCapture`'s fields and
    `all_finite`), in the order of `plans`."""
    units = np.cumsum([0, *(p.n_units for p in plans)])
    tracked = np.cumsum([0, *(len(p.tracked_units) for p in plans)])
    steps = np.arange(bins + 1, dtype="float64")
    out = []
    for i in range(len(plans)):
        first, width = batched["hist_first"][i], batched["hist_width"][i]
        out.append(
            {
                "hist_counts": batched["hist_counts"][i],
                "hist_edges": (first + width * steps.astype(first.dtype)),
                "quantiles": batched["quantiles"][i],
                "moments": batched["moments"][i],
                "zero_frac": batched["zero_frac"][i],
                "nonfinite": np.int32(0),
                "unit_mean": batched["unit_mean"][units[i] : units[i + 1]],
                "unit_std": batched["unit_std"][units[i] : units[i + 1]],
                "unit_quantiles": batched["unit_quantiles"][tracked[i] : tracked[i + 1]],
                "all_finite": batched["all_finite"][i],
            }
        )
    return out
