"""The capture program: one compiled function per capture.

It runs the model on the fixed probe batch, intercepts the outputs of the
selected layers, and reduces each one on the device to a few small arrays
(histogram, quantiles, per-unit moments, ...) before anything crosses to the
host. Optionally it also computes gradient statistics and the gradient-shift
measure of Santurkar et al. (2018).

Outputs are intercepted by wrapping each selected layer's `call` (and, for a
layer with a fused activation, its `activation`) while the function is traced.
That works for Sequential, functional, nested and subclassed models alike. The
model runs inside a `keras.StatelessScope`, so a capture never changes the
model: BatchNormalization's moving statistics and the dropout seed are left
as they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from . import backend
from .layers import SelectedLayer, iter_layers
from .store.schema import QUANTILES, LayerSpec, RunLayout, VariableSpec
from .store.writer import Capture, LayerCapture

__all__ = ["CaptureOptions", "CaptureProgram", "TracedLayer", "dyadic_bin_width"]

ops = keras.ops


@dataclass(frozen=True)
class CaptureOptions:
    """What a capture computes. See docs/statistics.md for the definitions."""

    hist_bins: int = 64
    quantile_sample: int = 65536  # layer quantiles from at most this many values
    tracked_units: int = 3  # units per layer whose own quantiles are kept
    unit_quantile_sample: int = 16384
    max_values: int | None = 2**21  # histogram/moments from the first probe samples up to this
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
    n_values: int  # values counted in histogram and moments (the first `rows` samples)
    samples: int  # probe samples those values come from
    tracked_units: tuple[int, ...]
    quantile_index: np.ndarray | None = None  # flat positions of the quantile sample
    unit_rows: np.ndarray | None = None  # rows sampled for tracked-unit quantiles

    def spec(self) -> LayerSpec:
        sample = self.n_values if self.quantile_index is None else len(self.quantile_index)
        return LayerSpec(
            name=self.name,
            class_name=self.class_name,
            kind=self.kind,
            output_shape=tuple(int(d) for d in self.shape[1:]),
            n_units=self.n_units,
            tracked_units=self.tracked_units,
            n_values=self.n_values,
            samples=self.samples,
            quantile_sample=sample,
        )


@dataclass
class _Record:
    layer: SelectedLayer
    tensor: Any
    suffix: str
    kind: str


@dataclass
class _Recorder:
    """Collects the tensors produced by the selected layers during one call."""

    records: list[_Record] = field(default_factory=list)
    calls: dict[int, int] = field(default_factory=dict)

    def add(self, selected: SelectedLayer, outputs: Any, kind: str, tag: str = "") -> None:
        # A shared layer called n times yields "name", "name#2", ...; the
        # pre-activation of call n is recorded before its output, with the same suffix.
        count = self.calls.get(id(selected.layer), 0)
        if not tag:
            self.calls[id(selected.layer)] = count + 1
        call_suffix = f"#{count + 1}" if count else ""
        flat = keras.tree.flatten(outputs)
        for i, tensor in enumerate(flat):
            if not _is_float_tensor(tensor):
                continue
            index = f"[{i}]" if len(flat) > 1 else ""
            self.records.append(_Record(selected, tensor, f"{tag}{index}{call_suffix}", kind))


def _is_float_tensor(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and "float" in keras.backend.standardize_dtype(dtype)


@contextlib.contextmanager
def _intercept(selection: Sequence[SelectedLayer], recorder: _Recorder) -> Iterator[None]:
    """Wrap the selected layers' `call` (and fused activations) while tracing."""
    restore: list[tuple[Any, str, bool, Any]] = []

    def patch(obj: Any, attr: str, new: Any) -> None:
        had = attr in obj.__dict__
        restore.append((obj, attr, had, obj.__dict__.get(attr)))
        object.__setattr__(obj, attr, new)

    for selected in selection:
        layer = selected.layer
        original_call = layer.call

        def call(*args: Any, _orig: Any = original_call, _sel: Any = selected, **kwargs: Any) -> Any:
            out = _orig(*args, **kwargs)
            recorder.add(_sel, out, _sel.kind if not _sel.capture_preactivation else "activation")
            return out

        patch(layer, "call", call)
        if selected.capture_preactivation:
            original_activation = layer.activation

            def activation(x: Any, _orig: Any = original_activation, _sel: Any = selected) -> Any:
                recorder.add(_sel, x, "preactivation", tag=":preact")
                return _orig(x)

            patch(layer, "activation", activation)
    try:
        yield
    finally:
        for obj, attr, had, value in reversed(restore):
            if had:
                object.__setattr__(obj, attr, value)
            else:
                object.__delattr__(obj, attr)


def _unit_axis(layer: Any, rank: int) -> int:
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


def dyadic_bin_width(low: float, high: float, bins: int) -> tuple[float, float]:
    """(first edge, width) of the aligned power-of-two grid covering [low, high].

    The width is the smallest power of two w such that `bins` bins of width w,
    starting at a multiple of w, hold [low, high]. Edges of a coarser grid are
    a subset of a finer one's, so histograms of two captures can be merged onto
    the coarser grid exactly. This is the host-side twin of `_dyadic_grid`.
    """
    span = max(high - low, max(abs(low), abs(high)) * 2.0**-24, 2.0**-100)
    width = 2.0 ** math.ceil(math.log2(span / bins))
    if math.floor(high / width) - math.floor(low / width) >= bins:
        width *= 2
    return math.floor(low / width) * width, width


def _dyadic_grid(low: Any, high: Any, bins: int) -> tuple[Any, Any]:
    low64, high64 = ops.cast(low, backend.wide_float()), ops.cast(high, backend.wide_float())
    span = ops.maximum(
        high64 - low64,
        ops.maximum(ops.maximum(ops.abs(low64), ops.abs(high64)) * 2.0**-24, 2.0**-100),
    )
    width = ops.power(2.0, ops.ceil(ops.log2(span / bins)))
    too_many = (ops.floor(high64 / width) - ops.floor(low64 / width)) >= bins
    width = ops.where(too_many, width * 2.0, width)
    first = ops.floor(low64 / width) * width
    return first, width


def _interpolated_quantiles(sorted_values: Any, n_finite: Any, q: np.ndarray) -> Any:
    """Linear-interpolation quantiles of the first `n_finite` sorted values (last axis)."""
    n = ops.cast(n_finite, "float32")
    pos = ops.expand_dims(ops.maximum(n - 1.0, 0.0), -1) * ops.convert_to_tensor(q, "float32")
    lower = ops.floor(pos)
    frac = pos - lower
    upper = ops.minimum(lower + 1.0, ops.expand_dims(ops.maximum(n - 1.0, 0.0), -1))
    lo_vals = ops.take_along_axis(sorted_values, ops.cast(lower, "int32"), axis=-1)
    hi_vals = ops.take_along_axis(sorted_values, ops.cast(upper, "int32"), axis=-1)
    out = lo_vals + (hi_vals - lo_vals) * frac
    return ops.where(ops.expand_dims(n, -1) > 0, out, float("nan"))


def _layer_stats(tensor: Any, plan: TracedLayer, options: CaptureOptions, *, masked: bool) -> dict[str, Any]:
    x = ops.cast(tensor, "float32")
    full = ops.reshape(x, (-1,))
    if plan.samples < plan.shape[0]:
        x = x[: plan.samples]  # the value budget: a contiguous slice costs no copy
    if plan.unit_axis != len(plan.shape) - 1:
        x = ops.moveaxis(x, plan.unit_axis, -1)
    units = ops.reshape(x, (-1, plan.n_units))
    all_finite = ops.isfinite(ops.sum(full))  # NaN/Inf anywhere poisons the sum
    stats = _reduce(units, ops.reshape(units, (-1,)), plan, options, masked=masked, all_finite=all_finite)
    low, high, n_finite = stats.pop("low"), stats.pop("high"), stats.pop("n_finite")
    if plan.samples < plan.shape[0]:
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


def _reduce(
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
    rows = plan.n_values // plan.n_units
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

    first, width = _dyadic_grid(low, high, bins)

    def count() -> Any:
        return backend.histogram(hist_values, ops.cast(first, "float32"), ops.cast(width, "float32"), bins)

    if masked:
        counts = count()
    else:  # skipped when NaN/Inf are present: that result is discarded anyway
        counts = ops.cond(all_finite, count, lambda: ops.zeros((bins,), "int32"))
    counts = counts - ops.cast(ops.one_hot(0, bins), "int32") * ops.cast(n_bad, "int32")
    edges = first + width * ops.arange(bins + 1, dtype=backend.wide_float())

    # Quantiles from a fixed sample of positions (all values when the layer is small).
    q = np.asarray(QUANTILES, dtype="float32")
    sample = flat if plan.quantile_index is None else ops.take(flat, plan.quantile_index)
    if masked:
        sample_finite = ops.isfinite(sample)
        sample = ops.where(sample_finite, sample, float("inf"))
        n_sample = ops.sum(ops.cast(sample_finite, "int32"))
    else:
        n_sample = ops.convert_to_tensor(int(sample.shape[0]), "int32")
    quantiles = _interpolated_quantiles(ops.sort(sample), n_sample, q)

    tracked = ops.transpose(ops.take(units, np.asarray(plan.tracked_units, "int32"), axis=1))
    if plan.unit_rows is not None:
        tracked = ops.take(tracked, plan.unit_rows, axis=1)
    tracked_finite = ops.isfinite(tracked)
    tracked = ops.where(tracked_finite, tracked, float("inf"))
    n_tracked = ops.sum(ops.cast(tracked_finite, "int32"), axis=1)
    unit_quantiles = _interpolated_quantiles(ops.sort(tracked, axis=-1), n_tracked, q)

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


def _l2(x: Any) -> Any:
    return ops.sqrt(ops.sum(ops.square(ops.cast(x, "float32"))))


class CaptureProgram:
    """Builds and runs the compiled capture function for one model and probe.

    Call `run(x, y, learning_rate)`; the first call traces the function and
    fills `layout`. Nothing here writes files.
    """

    def __init__(
        self,
        model: keras.Model,
        selection: Sequence[SelectedLayer],
        options: CaptureOptions,
        with_gradients: bool,
    ) -> None:
        self.model = model
        self.selection = list(selection)
        self.options = options
        self.with_gradients = with_gradients
        self.trainable = list(model.trainable_variables)
        self.non_trainable = list(model.non_trainable_variables)
        # Dropout masks come from seed-generator state: pin it so every capture
        # draws the same masks and drift comes from the weights alone.
        self._pinned = backend.snapshot(self.non_trainable)
        self._is_seed = [v.path.endswith("seed_generator_state") for v in self.non_trainable]
        self._owner = self._variable_owners()
        self.ics_layers, self._ics_groups = self._ics_plan()
        self.traced: list[TracedLayer] | None = None
        self._previous: list[Any] | None = None
        self._function = backend.compile_function(self._program)
        self._masked_function: Any = None  # compiled when a capture first sees NaN/Inf

    # ---------------------------------------------------------------- planning
    def _variable_owners(self) -> list[str]:
        owner: dict[int, str] = {}
        for name, layer in iter_layers(self.model):
            for v in layer.trainable_variables:
                owner.setdefault(id(v), name)
        return [owner.get(id(v), self.model.name) for v in self.trainable]

    def _ics_plan(self) -> tuple[tuple[str, ...], list[list[int]]]:
        if not (self.options.gradient_shift and self.with_gradients):
            return (), []
        order: dict[str, list[int]] = {}
        for index, name in enumerate(self._owner):
            order.setdefault(name, []).append(index)
        return tuple(order), list(order.values())

    def _plan(self, record: _Record, index: int) -> TracedLayer:
        shape = tuple(int(d) for d in record.tensor.shape)
        rank = len(shape)
        axis = _unit_axis(record.layer.layer, rank)
        n_units = shape[axis] if rank > 1 else 1
        per_sample = int(np.prod(shape[1:])) if rank > 1 else 1
        samples = shape[0] if rank else 1
        if self.options.max_values is not None:
            samples = max(1, min(samples, -(-self.options.max_values // per_sample)))
        n_values = samples * per_sample
        rows = n_values // n_units
        rng = np.random.default_rng([self.options.seed, index])
        qs = self.options.quantile_sample
        quantile_index = None
        if n_values > qs:
            quantile_index = np.sort(rng.choice(n_values, size=qs, replace=False)).astype("int32")
        tracked_count = min(self.options.tracked_units, n_units)
        tracked = tuple(int(u) for u in np.linspace(0, n_units - 1, tracked_count).round())
        unit_rows = None
        if rows > self.options.unit_quantile_sample:
            unit_rows = np.sort(
                rng.choice(rows, size=self.options.unit_quantile_sample, replace=False)
            ).astype("int32")
        return TracedLayer(
            name=record.layer.name + record.suffix,
            class_name=type(record.layer.layer).__name__,
            kind=record.kind,
            shape=shape,
            unit_axis=axis,
            n_units=n_units,
            n_values=n_values,
            samples=samples,
            tracked_units=tracked,
            quantile_index=quantile_index,
            unit_rows=unit_rows,
        )

    @property
    def layout(self) -> RunLayout:
        if self.traced is None:
            raise RuntimeError("the capture program has not run yet")
        variables = tuple(
            VariableSpec(name=v.path, layer=owner, shape=tuple(int(d) for d in v.shape))
            for v, owner in zip(self.trainable, self._owner)
        )
        return RunLayout(
            layers=tuple(t.spec() for t in self.traced),
            variables=variables,
            ics_layers=self.ics_layers,
            hist_bins=self.options.hist_bins,
        )

    # ---------------------------------------------------------------- program
    def _forward(
        self, trainable: list[Any], non_trainable: list[Any], x: Any, y: Any, recorder: _Recorder | None
    ) -> tuple[Any, list[Any]]:
        mapping = list(zip(self.trainable, trainable)) + list(zip(self.non_trainable, non_trainable))
        training = self.options.training
        with contextlib.ExitStack() as stack:
            if recorder is not None:
                stack.enter_context(_intercept(self.selection, recorder))
            stack.enter_context(keras.StatelessScope(state_mapping=mapping))
            y_pred = self.model(x, training=training)
            if y is None:
                loss = ops.zeros(())
            else:
                loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, training=training)
        tensors = [r.tensor for r in recorder.records] if recorder is not None else []
        return loss, tensors

    def _masked_program(self, *args: Any) -> dict[str, Any]:
        return self._program(*args, masked=True)

    def _program(
        self,
        trainable: list[Any],
        non_trainable: list[Any],
        previous: list[Any],
        x: Any,
        y: Any,
        learning_rate: Any,
        masked: bool = False,
    ) -> dict[str, Any]:
        recorder = _Recorder()

        def loss_fn(params: list[Any]) -> tuple[Any, list[Any]]:
            return self._forward(params, non_trainable, x, y, recorder)

        grads: list[Any] = []
        if self.with_gradients:
            loss, activations, grads = backend.value_and_grad(loss_fn, trainable)
        else:
            loss, activations = loss_fn(trainable)
        if self.traced is None or len(self.traced) != len(recorder.records):
            self.traced = [self._plan(r, i) for i, r in enumerate(recorder.records)]
        layer_stats = [
            _layer_stats(t, plan, self.options, masked=masked) for t, plan in zip(activations, self.traced)
        ]
        weights = [ops.cast(w, "float32") for w in trainable]
        out: dict[str, Any] = {
            "loss": loss,
            "layers": layer_stats,
            "grad_norm": ops.stack([_l2(g) for g in grads]) if grads else ops.zeros((0,)),
            "weight_norm": ops.stack([_l2(w) for w in weights]) if weights else ops.zeros((0,)),
            "update_norm": (
                ops.stack([_l2(w - ops.cast(p, "float32")) for w, p in zip(weights, previous)])
                if weights
                else ops.zeros((0,))
            ),
            "previous_norm": (ops.stack([_l2(p) for p in previous]) if weights else ops.zeros((0,))),
        }
        if self._ics_groups:
            out["ics_diff"], out["ics_cos"] = self._gradient_shift(
                trainable, non_trainable, x, y, grads, learning_rate
            )
        return out

    def _gradient_shift(
        self,
        trainable: list[Any],
        non_trainable: list[Any],
        x: Any,
        y: Any,
        grads: list[Any],
        learning_rate: Any,
    ) -> tuple[Any, Any]:
        """Santurkar et al.: G_i vs G'_i after the layers before i took an SGD step."""
        diffs, coss = [], []
        stepped: set[int] = set()
        for group in self._ics_groups:
            params = [
                ops.cast(w, "float32") - learning_rate * g if k in stepped else w
                for k, (w, g) in enumerate(zip(trainable, grads))
            ]
            _, _, shifted = backend.value_and_grad(
                lambda p: self._forward(p, non_trainable, x, y, None), params
            )
            g = ops.concatenate([ops.reshape(grads[k], (-1,)) for k in group])
            g2 = ops.concatenate([ops.reshape(shifted[k], (-1,)) for k in group])
            diffs.append(_l2(g - g2))
            coss.append(ops.sum(g * g2) / ops.maximum(_l2(g) * _l2(g2), 1e-30))
            stepped.update(group)
        return ops.stack(diffs), ops.stack(coss)

    # ---------------------------------------------------------------- running
    def run(
        self, x: Any, y: Any, learning_rate: float, *, step: int, epoch: float, time: float, kind: str
    ) -> Capture:
        trainable = backend.read_values(self.trainable)
        non_trainable = [
            pinned if is_seed else v.value
            for v, pinned, is_seed in zip(self.non_trainable, self._pinned, self._is_seed)
        ]
        first = self._previous is None
        # Snapshots on every call (not the live variables on the first): one input
        # signature, so the function is traced once.
        previous = backend.snapshot(self.trainable) if first else self._previous
        lr = ops.convert_to_tensor(learning_rate, "float32")
        args = (trainable, non_trainable, previous, x, y, lr)
        result = backend.to_numpy(self._function(*args))
        if not all(bool(stats.pop("all_finite")) for stats in result["layers"]):
            # A diverging run: recompute with NaN/Inf masked out (a second, lazily
            # compiled function, so the common case pays nothing for it).
            if self._masked_function is None:
                self._masked_function = backend.compile_function(self._masked_program)
            result = backend.to_numpy(self._masked_function(*args))
        self._previous = backend.snapshot(self.trainable)
        with np.errstate(divide="ignore", invalid="ignore"):
            # undefined (NaN), not infinite, for a variable that was all zeros (a fresh bias)
            update = np.where(
                result["previous_norm"] > 0, result["update_norm"] / result["previous_norm"], np.nan
            )
        nan = np.full(len(self.trainable), np.nan)
        grad_norm = result["grad_norm"] if self.with_gradients else nan
        weight_norm = result["weight_norm"]
        update_ratio = nan if first else update
        layers = [LayerCapture(**stats) for stats in result["layers"]]
        return Capture(
            step=step,
            epoch=epoch,
            time=time,
            kind=kind,
            layers=layers,
            grad_norm=np.asarray(grad_norm, dtype=float),
            weight_norm=np.asarray(weight_norm, dtype=float),
            update_ratio=np.asarray(update_ratio, dtype=float),
            ics_grad_diff=np.asarray(result.get("ics_diff", np.zeros(0)), dtype=float),
            ics_grad_cos=np.asarray(result.get("ics_cos", np.zeros(0)), dtype=float),
        )
