"""Per-step mode: statistics of the training batch, measured inside the training step.

A probe capture is a second forward and backward pass; at every step that
would cost several training steps. Here the selected layers are intercepted
while Keras traces the model's own training step, and a few statistics of each
captured tensor are computed right there, on the device, from the tensors the
step computes anyway (no second pass). They leave the compiled step as one
small float32 vector per step, which the callback keeps on the device and
writes every 2 seconds (or every `flush_every` steps). On a CPU (TensorFlow,
JAX and torch) the step hands out the samples themselves instead, and numpy computes
the same statistics from them on the callback's writer thread
(`backend.host_statistics_in_step`, `host_vectors`).

Per tensor and step, from a fixed stratified random sample of `SAMPLE` value
positions: the quantiles, mean, std, min and max (the sample's), a histogram on
the dyadic grid of the sample's range, the zero fraction and the NaN/Inf count;
and for each tracked unit, quantiles from `UNIT_SAMPLE` of the unit's values.
docs/statistics.md gives the sampling error.

The model's weights, optimizer and losses are untouched: the step is the
user's own (`model.train_step`, custom ones included) with read-only
interception around it, and every statistic sits behind `stop_gradient`.
The hooks are installed for one `fit` and removed at its end.

Backends: TensorFlow and torch return the vector with the step's logs (and it
is removed from them before Keras or any callback sees them). JAX computes
the loss inside `jax.value_and_grad`, whose intermediate values can leave it
only as its auxiliary output: in Keras's own JAX training step the vector
rides out of `compute_loss_and_updates` as one extra entry of the returned
non-trainable state, and the wrapped step moves it from the state to the logs
before the state leaves the compiled function (so the state Keras threads from
step to step is exactly its own). A custom JAX `train_step`, or
`steps_per_execution > 1` (Keras then returns only the last step's logs),
sends the vector to the host with `jax.debug.callback` instead: it works with
any step, but a host callback inside the step costs a device round trip per
step (on an H100, 2.2 ms steps took 5 ms).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ..store.schema import BatchLayerSpec
from . import backend
from .intercept import Recorder, intercept, warn_once
from .layers import SelectedLayer
from .masks import keras_mask, output_name
from .stats import dyadic_grid, dyadic_grid_np, interpolated_quantiles, interpolated_quantiles_np, unit_axis

__all__ = [
    "SAMPLE",
    "UNIT_SAMPLE",
    "BatchPlan",
    "StepStatistics",
    "batch_vector",
    "live_hooks",
    "host_batch_vector",
    "host_vectors",
    "raw_size",
    "tensor_sample",
    "to_host",
    "unpack",
]

ops = keras.ops

SAMPLE = 4096  # values per tensor and step for quantiles, histogram, zero fraction
UNIT_SAMPLE = 1024  # values per tracked unit and step
_LOG_KEY = "_icsviz_batch_stats"  # never shown: removed from the logs before Keras sees them


@dataclass(frozen=True)
class BatchPlan:
    """How one tensor is reduced at every step; the vector layout follows from it."""

    spec: BatchLayerSpec
    bins: int
    n_quantiles: int
    strata: np.ndarray  # (SAMPLE,) in [0, 1): position i of the sample is floor(strata[i] * n)
    unit_strata: np.ndarray  # (UNIT_SAMPLE,) the same along a tracked unit's values

    @property
    def sample_parts(self) -> tuple[int, ...]:
        """Sizes of the parts of this layer's sample, in order: the layer's, each tracked unit's."""
        return (self.spec.sample, *[self.spec.unit_sample] * len(self.spec.tracked_units))

    @property
    def size(self) -> int:
        """This layer's share of the step vector."""
        u = len(self.spec.tracked_units)
        return self.bins + 2 + self.n_quantiles + 4 + 2 + u * self.n_quantiles

    @classmethod
    def create(cls, spec: BatchLayerSpec, bins: int, n_quantiles: int, seed: int) -> BatchPlan:
        rng = np.random.default_rng([seed, spec.index, 7])
        # One position per stratum, jittered: spread over the whole tensor and, unlike a
        # fixed stride, never locked to one channel when the stride divides the channel count.
        strata = (np.arange(spec.sample) + rng.random(spec.sample)) / spec.sample
        unit_strata = (np.arange(spec.unit_sample) + rng.random(spec.unit_sample)) / spec.unit_sample
        return cls(spec, bins, n_quantiles, strata.astype("float32"), unit_strata.astype("float32"))


def _positions(plan: BatchPlan, size: Any, rows: Any) -> Any:
    """Flat positions of the layer sample and of the tracked units' samples (units last)."""
    n = ops.cast(size, "float32")
    main = ops.cast(ops.floor(ops.convert_to_tensor(plan.strata) * n), "int32")
    parts = [ops.minimum(main, ops.cast(size, "int32") - 1)]
    if plan.spec.tracked_units:
        r = ops.cast(ops.floor(ops.convert_to_tensor(plan.unit_strata) * ops.cast(rows, "float32")), "int32")
        r = ops.minimum(r, ops.cast(rows, "int32") - 1)
        for unit in plan.spec.tracked_units:
            parts.append(r * plan.spec.n_units + unit)
    return ops.concatenate(parts)


def tensor_sample(tensor: Any, plan: BatchPlan, layer: Any, mask: Any = None) -> Any:
    """The values of one captured tensor at its planned positions: (SAMPLE + U * UNIT_SAMPLE,).

    One gather: everything else is computed from these few values, for all layers at once.
    `mask`: the tensor's Keras mask on this batch (padding False), (batch, time) for a
    (batch, time, units) tensor; a sample that falls on padding is replaced by one of the
    sample's own data values (`_data_only`).
    """
    x = ops.cast(ops.stop_gradient(tensor), "float32")
    rank = len(x.shape)
    axis = unit_axis(layer, rank)
    if rank > 1 and axis != rank - 1:
        x = ops.moveaxis(x, axis, -1)  # units last, so that flat position = row * units + unit
    flat = ops.reshape(x, (-1,))
    size = ops.shape(flat)[0]
    positions = _positions(plan, size, size // plan.spec.n_units)
    values = backend.gather(flat, positions)
    if mask is None:
        return values
    flags = ops.reshape(ops.cast(mask, "bool"), (-1,))
    # Clipped: a mask whose unknown dimensions turn out not to match must not stop training.
    rows = ops.minimum(positions // plan.spec.n_units, ops.shape(flags)[0] - 1)
    data = backend.gather(flags, rows)
    return _data_only(values, data, plan.sample_parts)


def fits_positions(mask: Any, tensor: Any, layer: Any) -> bool:
    """Whether a Keras mask marks the rows of `tensor` (its units on the last axis, the mask
    its other axes), as `tensor_sample` needs."""
    rank = len(tensor.shape)
    if rank < 2 or unit_axis(layer, rank) != rank - 1 or len(mask.shape) != rank - 1:
        return False
    known = zip(tuple(mask.shape)[1:], tuple(tensor.shape)[1:-1])  # the batch axis may be unknown
    return all(a is None or b is None or int(a) == int(b) for a, b in known)


def _data_only(values: Any, data: Any, sizes: Sequence[int]) -> Any:
    """`values` with each one that fell on padding replaced by one that fell on data, within
    each of the consecutive parts of `sizes` (the layer's sample, each tracked unit's).

    The replacements are spread over the part's data values (the k-th value of a part takes
    its data value number 7919 k modulo their count), so each part stays a sample of the data
    positions, with some values counted twice; a part whose samples all fell on padding is NaN.
    One set of operations for all parts: a cumulative count and a scatter, no sort.
    """
    n = int(values.shape[0])
    starts = ops.convert_to_tensor(np.repeat(np.cumsum([0, *sizes[:-1]]), sizes).astype("int32"))
    ends = ops.convert_to_tensor(np.repeat(np.cumsum(sizes), sizes).astype("int32"))  # each value's part
    counted = ops.concatenate([ops.zeros((1,), "int32"), ops.cumsum(ops.cast(data, "int32"))])
    before = ops.take(counted, starts)  # data values in the parts before this one
    n_data = ops.take(counted, ends) - before  # and in this part
    index = ops.arange(n, dtype="int32")
    # Data value j of a part goes to the part's slot j (a scatter, not a sort); padding to n.
    slot = ops.where(data, starts + counted[1:] - before - 1, n)
    order = ops.scatter(ops.expand_dims(slot, -1), ops.where(data, index, 0), (n + 1,))
    spread = starts + ops.mod((index - starts) * 7919, ops.maximum(n_data, 1))
    replaced = ops.where(data, values, ops.take(values, ops.take(order, spread)))
    return ops.where(n_data > 0, replaced, float("nan"))


def _row_stats(values: Any, q: np.ndarray) -> tuple[Any, Any, Any]:
    """Sorted rows (non-finite moved to the end as +inf), finite counts, quantiles per row."""
    finite = ops.isfinite(values)
    n_finite = ops.sum(ops.cast(finite, "int32"), axis=-1)
    ordered = ops.sort(ops.where(finite, values, float("inf")), axis=-1)
    return ordered, n_finite, interpolated_quantiles(ordered, n_finite, q)


def _stacked(samples: Sequence[Any], plans: Sequence[BatchPlan]) -> tuple[Any, Any | None]:
    """The layer samples as one (L, SAMPLE) matrix, and the tracked units' as (sum(U), UNIT_SAMPLE)."""
    main = ops.stack([s[: plan.spec.sample] for s, plan in zip(samples, plans)])
    units = [
        ops.reshape(s[plan.spec.sample :], (len(plan.spec.tracked_units), plan.spec.unit_sample))
        for s, plan in zip(samples, plans)
        if plan.spec.tracked_units
    ]
    return main, ops.concatenate(units, axis=0) if units else None


def batch_vector(
    samples: Sequence[Any],
    plans: Sequence[BatchPlan],
    q: np.ndarray,
    on_host: bool = False,
) -> Any:
    """The step's row: the statistics of all layers' samples as one float32 vector, computed
    batched on the device. Where `on_host` (on a CPU: see `backend.host_statistics_in_step`)
    the row is the samples themselves (`raw_size` values), and `host_vectors` computes the
    same statistics from them with numpy, later, off the training thread.

    Layout (`unpack` reads it): counts (L*B), histogram first edge and width
    (L*2), quantiles (L*Q), mean/std/min/max (L*4), zero fraction (L),
    NaN/Inf count (L), tracked-unit quantiles (sum(U)*Q).
    """
    bins = plans[0].bins
    main, units = _stacked(samples, plans)
    if on_host:  # layer samples first, then the tracked units' (`host_vectors` splits them)
        flat = [ops.reshape(main, (-1,))] + ([] if units is None else [ops.reshape(units, (-1,))])
        return ops.concatenate(flat) if len(flat) > 1 else flat[0]
    ordered, n_finite, quantiles = _row_stats(main, q)
    count = ops.maximum(ops.cast(n_finite, "float32"), 1.0)
    finite = ordered < float("inf")
    zeroed = ops.where(finite, ordered, 0.0)
    mean = ops.sum(zeroed, axis=-1) / count
    std = ops.sqrt(
        ops.sum(ops.where(finite, ops.square(ordered - ops.expand_dims(mean, -1)), 0.0), axis=-1) / count
    )
    low = ordered[:, 0]
    high = ops.take_along_axis(ordered, ops.expand_dims(ops.maximum(n_finite - 1, 0), -1), axis=-1)[:, 0]
    some = n_finite > 0
    nan = float("nan")
    moments = ops.stack(
        [
            ops.where(some, mean, nan),
            ops.where(some, std, nan),
            ops.where(some, low, nan),
            ops.where(some, high, nan),
        ],
        axis=1,
    )
    zero_frac = ops.sum(ops.cast(ops.equal(ordered, 0.0), "float32"), axis=-1) / count
    nonfinite = ops.cast(plans[0].spec.sample - n_finite, "float32")
    # Histogram on each row's dyadic grid: bin index per value, one segment sum for all rows.
    first, width = dyadic_grid(ops.where(some, low, 0.0), ops.where(some, high, 1.0), bins)
    first32, width32 = ops.cast(first, "float32"), ops.cast(width, "float32")
    index = ops.floor((zeroed - ops.expand_dims(first32, -1)) / ops.expand_dims(width32, -1))
    index = ops.cast(ops.clip(index, 0, bins - 1), "int32") + ops.expand_dims(
        ops.arange(len(plans), dtype="int32") * bins, -1
    )
    counts = ops.segment_sum(
        ops.reshape(ops.cast(finite, "float32"), (-1,)),
        ops.reshape(index, (-1,)),
        num_segments=len(plans) * bins,
    )
    parts = [
        counts,
        ops.reshape(ops.stack([first32, width32], axis=1), (-1,)),
        ops.reshape(quantiles, (-1,)),
        ops.reshape(moments, (-1,)),
        zero_frac,
        nonfinite,
    ]
    if units is not None:
        _, _, unit_quantiles = _row_stats(units, q)
        parts.append(ops.reshape(unit_quantiles, (-1,)))
    return ops.concatenate(parts)


def raw_size(plans: Sequence[BatchPlan]) -> int:
    """Values in a step's row of samples (`batch_vector` with `on_host`)."""
    return sum(sum(plan.sample_parts) for plan in plans)


# Layer samples that go through numpy together, a few steps' worth: more per call and they
# outgrow the CPU's cache (the reference CNN's 12 layers: 0.44 ms a step in tens of steps,
# 0.70 ms in 90; MobileNetV2's 151 layers one step at a time).
_HOST_ROWS = 256


def host_vectors(raw: Sequence[np.ndarray], plans: Sequence[BatchPlan], q: np.ndarray) -> np.ndarray:
    """(S, total) step vectors in `batch_vector`'s layout from S rows of `raw_size` samples.

    The statistics are `host_batch_vector`'s, row for row the same numbers as one call per
    step; a few steps go in each call, their rows laid end to end.
    """
    steps, n_layers = len(raw), len(plans)
    sample, unit_sample = plans[0].spec.sample, plans[0].spec.unit_sample
    n_units = sum(len(plan.spec.tracked_units) for plan in plans)
    bins, nq = plans[0].bins, len(q)
    cut = n_layers * sample  # the layers' samples, then the tracked units'
    # One step's share of each part of `host_batch_vector`'s output, in its order.
    widths = [n_layers * w for w in (bins, 2, nq, 4, 1, 1)] + [n_units * nq]
    out = np.empty((steps, sum(widths)), "float32")
    per_call = max(1, _HOST_ROWS // n_layers)
    for start in range(0, steps, per_call):
        n = min(per_call, steps - start)
        chunk = slice(start, start + n)
        rows = raw[chunk]
        flat = host_batch_vector(  # each part copied once, into the rows numpy reduces
            np.stack([row[:cut] for row in rows]).reshape(n * n_layers, sample),
            np.stack([row[cut:] for row in rows]).reshape(n * n_units, unit_sample) if n_units else None,
            bins=bins,
            q=q,
        )
        # Each part holds the chunk's rows step by step: the steps' shares side by side.
        bounds = np.cumsum([0, *(n * w for w in widths)])
        out[chunk] = np.concatenate(
            [flat[a:b].reshape(n, w) for a, b, w in zip(bounds[:-1], bounds[1:], widths)], axis=1
        )
    return out


def host_batch_vector(
    main: np.ndarray, units: np.ndarray | None = None, *, bins: int, q: np.ndarray
) -> np.ndarray:
    """`batch_vector` in numpy, in the same float32 steps: (L, SAMPLE) layer samples and the
    tracked units' (sum(U), UNIT_SAMPLE) rows in, the step's vector out (any number of rows:
    `host_vectors` passes several steps' at once).

    On a CPU the device path is some hundred small kernels whose launch costs more than their
    work. Each pass here over the samples is one numpy call, done in place where it can be."""
    f32 = np.float32
    q = np.asarray(q, f32)
    rows = np.arange(len(main))
    with np.errstate(over="ignore"):  # NaN/Inf anywhere poisons the sum (an overflow too: masked path)
        all_finite = bool(np.isfinite(main.sum(dtype=f32)))
    if all_finite:  # the common case: no masks
        ordered = np.sort(main, axis=-1)
        n_finite = np.full(len(main), main.shape[1])
        finite = None
    else:
        ordered, n_finite = _sorted_rows_np(main)
        finite = ordered < np.inf
    quantiles = interpolated_quantiles_np(ordered, n_finite, q)
    count = np.maximum(n_finite.astype(f32), f32(1))
    zeroed = ordered if finite is None else np.where(finite, ordered, f32(0))
    # A diverging run's finite values overflow float32 when summed or squared: inf, as on the
    # device, without numpy's warning. (inf - mean: the masked-out padding.)
    with np.errstate(invalid="ignore", over="ignore"):
        mean = zeroed.sum(axis=-1, dtype=f32) / count
        work = np.subtract(ordered, mean[:, None])
        np.square(work, out=work)
        if finite is not None:
            work[~finite] = 0
        std = np.sqrt(work.sum(axis=-1, dtype=f32) / count)
    low = ordered[:, 0]
    high = ordered[rows, np.maximum(n_finite - 1, 0)]
    some = n_finite > 0
    moments = np.where(some[:, None], np.stack([mean, std, low, high], axis=1), f32(np.nan))
    zero_frac = np.count_nonzero(ordered == 0, axis=-1).astype(f32) / count
    nonfinite = (main.shape[1] - n_finite).astype(f32)
    first, width = dyadic_grid_np(np.where(some, low, 0.0), np.where(some, high, 1.0), bins)
    # The bin of each value as the device computes it: floor((v - first) / width), clipped.
    # (A grid near float32's largest value overflows it: inf, as on the device.)
    with np.errstate(invalid="ignore", over="ignore"):
        first32, width32 = first.astype(f32), width.astype(f32)
        np.subtract(zeroed, first32[:, None], out=work)
        np.divide(work, width32[:, None], out=work)
        np.floor(work, out=work)
    np.clip(work, 0, bins - 1, out=work)
    index = work.astype(np.int32)
    index += (rows * bins).astype(np.int32)[:, None]
    if finite is None:
        # Sorted rows give non-decreasing bins, and each row's bins lie above the last row's:
        # the whole index is sorted, so each bin's count is the distance between its bounds.
        counts = np.diff(np.searchsorted(index.ravel(), np.arange(len(main) * bins + 1, dtype=np.int32)))
    else:
        counts = np.bincount(index[finite], minlength=len(main) * bins)
    parts = [
        counts.astype(f32),
        np.stack([first32, width32], axis=1).reshape(-1),
        quantiles.reshape(-1),
        moments.astype(f32).reshape(-1),
        zero_frac,
        nonfinite,
    ]
    if units is not None:
        with np.errstate(over="ignore"):
            units_finite = bool(np.isfinite(units.sum(dtype=f32)))
        if units_finite:  # no masks, as for the layers' samples
            ordered_units, n_units = np.sort(units, axis=-1), np.full(len(units), units.shape[1])
        else:
            ordered_units, n_units = _sorted_rows_np(units)
        parts.append(interpolated_quantiles_np(ordered_units, n_units, q).reshape(-1))
    return np.concatenate(parts).astype(f32)


def _sorted_rows_np(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_row_stats`' first two in numpy: rows sorted with non-finite values last as +inf, and
    each row's count of finite values."""
    finite = np.isfinite(values)
    return np.sort(np.where(finite, values, np.float32(np.inf)), axis=-1), finite.sum(axis=-1)


def unpack(vectors: np.ndarray, plans: Sequence[BatchPlan]) -> list[dict[str, np.ndarray]]:
    """Split (S, total) step vectors (`batch_vector`'s layout) into the datasets of `BatchRows`."""
    steps, n_layers = len(vectors), len(plans)
    bins, nq = plans[0].bins, plans[0].n_quantiles
    at = np.cumsum([0, n_layers * bins, n_layers * 2, n_layers * nq, n_layers * 4, n_layers, n_layers])
    block = [vectors[:, at[i] : at[i + 1]] for i in range(6)]
    counts = np.rint(block[0]).reshape(steps, n_layers, bins).astype("int32")  # <= SAMPLE: exact in float32
    ranges = block[1].reshape(steps, n_layers, 2).astype("float64")
    quantiles = block[2].reshape(steps, n_layers, nq)
    moments = block[3].reshape(steps, n_layers, 4)
    unit_offset = at[6]
    out = []
    for i, plan in enumerate(plans):
        u = len(plan.spec.tracked_units)
        unit_quantiles = vectors[:, unit_offset : unit_offset + u * nq].reshape(steps, u, nq)
        unit_offset += u * nq
        out.append(
            {
                "hist_counts": counts[:, i],
                "hist_range": ranges[:, i],
                "quantiles": quantiles[:, i],
                "moments": moments[:, i],
                "zero_frac": block[4][:, i],
                "nonfinite": np.rint(block[5][:, i]).astype("int32"),
                "unit_quantiles": unit_quantiles,
            }
        )
    return out


def unsupported_reason(model: keras.Model) -> str | None:
    """Why the per-step mode cannot run on this model's training, or None."""
    name = backend.name()
    if name not in ("tensorflow", "jax", "torch"):
        return f"the {name} backend has no training step to instrument"
    if name == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        replicas = getattr(strategy, "num_replicas_in_sync", 1)
        if replicas > 1:
            return f"training runs on {replicas} replicas (tf.distribute); each replica sees only its share of the batch"
    if name == "jax":
        from keras import distribution

        if distribution.distribution() is not None:
            return "training runs under a keras.distribution layout"
    if name == "torch" and getattr(model, "jit_compile", False) is True:
        # The statistics' Python (tensor ids, per-layer lists) made torch.compile recompile
        # the instrumented step at every call: a small CNN's epochs took 25 s instead of 0.5 s.
        return "torch.compile (jit_compile=True) recompiles the instrumented step at every call; compile the model with jit_compile=False to use it"
    return None


class StepStatistics:
    """Instruments a model's training step for one `fit`; collects one vector per step.

    `install()` after Keras made its train function (on_train_begin or later,
    before the first step), `take()` to take the vectors received so far (still on
    the device; `to_host` makes them a (steps, total) matrix), `uninstall()` at the
    end of training.
    """

    def __init__(
        self,
        model: keras.Model,
        selection: Sequence[SelectedLayer],
        plans: Sequence[BatchPlan],
        q: Any,
        *,
        fit: object = None,
        run: str = "",
    ) -> None:
        self.model = model
        # Which fit these hooks serve (the params dict Keras hands every callback of one fit)
        # and the run they record, to tell another callback's live hooks from stale ones.
        self.fit = fit
        self.run = run
        self.plans = list(plans)
        self._q = np.asarray(q, "float32")
        names = {plan.spec.name for plan in self.plans}
        self._selection = [s for s in selection if any(_of_layer(n, s.name) for n in names)]
        self._pending: list[Any] = []  # device vectors not yet written, in step order
        self._installed = False
        self._saved: dict[str, Any] = {}
        self._vector_in_outputs = False  # JAX: the vector leaves the step as an output (not a callback)
        self.expected = False  # set by the callback before each step of its own fit
        self.calls = 0  # Keras's train function called (none in a training loop of the user's own)
        self.failed = False  # set where turning rows into statistics failed: no later row is written
        self._on_host = backend.host_statistics_in_step(model)

    # ------------------------------------------------------------- tracing
    def _vector(self, recorder: Recorder) -> Any:
        produced = {record.name: record for record in recorder.records}
        samples = []
        padded: list[str] = []  # layers whose Keras mask does not fit their positions
        for plan in self.plans:
            record = produced.get(plan.spec.name)
            if record is None:
                warn_once(
                    f"batch-missing:{plan.spec.name}",
                    f"the training step does not compute layer {plan.spec.name!r} as the probe pass does; "
                    "its per-step rows are NaN (probe captures still record it).",
                )
                samples.append(_missing(plan))
                continue
            try:
                # A fused layer's pre-activation has the positions, and the padding, of its output.
                mask = keras_mask(produced.get(output_name(plan.spec.name)))
                if mask is not None and not fits_positions(mask, record.tensor, record.layer.layer):
                    padded.append(plan.spec.name)
                    mask = None
                samples.append(tensor_sample(record.tensor, plan, record.layer.layer, mask))
            except Exception as exc:  # noqa: BLE001 - one layer never costs the run
                warn_once(
                    f"batch-fail:{plan.spec.name}",
                    f"per-step statistics of layer {plan.spec.name!r} failed ({type(exc).__name__}: {exc}); "
                    "its per-step rows are NaN.",
                )
                samples.append(_missing(plan))
        if padded:
            warn_once(
                "batch-mask:" + ",".join(padded),
                f"the per-step rows of {', '.join(map(repr, padded))} count their padded positions "
                "too (their Keras masks do not cover their positions); the probe captures say "
                "whether they could leave the padding out.",
            )
        return batch_vector(samples, self.plans, self._q, self._on_host)

    @contextlib.contextmanager
    def _recording(self) -> Iterator[Recorder]:
        recorder = Recorder()
        with intercept(self._selection, recorder):
            yield recorder

    def _tf_train_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def train_step(*args: Any, **kwargs: Any) -> Any:
            with self._recording() as recorder:
                logs = original(*args, **kwargs)
            if not isinstance(logs, dict):
                return logs  # a custom step returning something else: nothing to attach to
            return {**logs, _LOG_KEY: self._vector(recorder)}

        return train_step

    def _jax_loss(self, original: Callable[..., Any]) -> Callable[..., Any]:
        import jax

        def compute_loss_and_updates(*args: Any, **kwargs: Any) -> Any:
            with self._recording() as recorder:
                result = original(*args, **kwargs)
            jax.debug.callback(self._receive, self._vector(recorder), ordered=True)
            return result

        return compute_loss_and_updates

    def _jax_loss_returning_vector(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def compute_loss_and_updates(*args: Any, **kwargs: Any) -> Any:
            with self._recording() as recorder:
                loss, (unscaled_loss, y_pred, non_trainable, metrics) = original(*args, **kwargs)
            carried = [*non_trainable, self._vector(recorder)]
            return loss, (unscaled_loss, y_pred, carried, metrics)

        return compute_loss_and_updates

    def _jax_train_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def train_step(state: Any, data: Any) -> Any:
            # Only while Keras traces the training step: the test step (validation) also
            # calls compute_loss_and_updates and must stay as it is.
            loss_fn = self.model.compute_loss_and_updates
            if not self._vector_in_outputs:
                with _patched(self.model, "compute_loss_and_updates", self._jax_loss(loss_fn)):
                    return original(state, data)
            count = len(state[1])
            with _patched(self.model, "compute_loss_and_updates", self._jax_loss_returning_vector(loss_fn)):
                logs, new_state = original(state, data)
            carried = list(new_state[1])
            if not isinstance(logs, dict) or len(carried) != count + 1:
                raise _ChannelError("the training step did not pass its non-trainable state through")
            new_state = (new_state[0], carried[:-1], *new_state[2:])
            return {**logs, _LOG_KEY: carried[-1]}, new_state

        return train_step

    def _receive(self, vector: Any) -> None:
        self._pending.append(np.asarray(vector))

    # ------------------------------------------------------------- fit hooks
    def install(self) -> None:
        model = self.model
        if live_hooks(model, self.fit) is not None:
            raise RuntimeError("another ICSCallback of this fit measures every training step already")
        stale = getattr(model.train_function, "icsviz_hooks", None)
        if stale is not None:  # left by a fit that ended in an exception
            stale.uninstall()
        self._saved = {
            "train_function": model.train_function,
            "train_step": model.__dict__.get("train_step"),
        }
        original = model.train_step
        if backend.name() == "jax":
            self._vector_in_outputs = (
                _keras_own_jax_step(model) and getattr(model, "steps_per_execution", 1) == 1
            )
            object.__setattr__(model, "train_step", self._jax_train_step(original))
        else:
            object.__setattr__(model, "train_step", self._tf_train_step(original))
        model.make_train_function(force=True)
        compiled = model.train_function  # replaced once if the outputs channel fails to trace
        traced = False  # the step traced once with the outputs channel

        def train_function(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled, traced
            if not self.expected:
                # No ICSCallback announced this step: the fit that installed the hooks
                # ended without on_train_end (an exception). Give the model its own step back.
                self.uninstall()
                self._pending.clear()
                return model.train_function(*args, **kwargs)
            self.expected = False
            self.calls += 1
            held = backend.interrupts_held() if self._callbacks_in_step else contextlib.nullcontext()
            with held:
                if not self._vector_in_outputs or traced:
                    result = compiled(*args, **kwargs)
                else:
                    # JAX's train function takes (state, iterator) and draws the batch before the
                    # step is traced: remember what it drew, to give it again if the trace fails.
                    state, batches, *rest = args
                    drawn = _Remembering(batches)
                    try:
                        result = compiled(state, drawn, *rest, **kwargs)
                        traced = True  # the outputs channel works: later steps need no replay
                    except _ChannelError:
                        # Raised while tracing, before the step ran: nothing was donated or changed.
                        # This Keras's step is not the one the outputs channel expects: use the callback.
                        self._vector_in_outputs = False
                        model.make_train_function(force=True)
                        compiled = model.train_function
                        model.train_function = train_function
                        result = compiled(state, itertools.chain(drawn.drawn, batches), *rest, **kwargs)
            logs = result[0] if backend.name() == "jax" else result
            if isinstance(logs, dict) and _LOG_KEY in logs:
                logs = dict(logs)
                self._pending.append(logs.pop(_LOG_KEY))
                result = (logs, result[1]) if backend.name() == "jax" else logs
            return result

        train_function.icsviz_hooks = self  # type: ignore[attr-defined]
        model.train_function = train_function
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        model = self.model
        if self._saved.get("train_step") is None:
            model.__dict__.pop("train_step", None)
        else:
            object.__setattr__(model, "train_step", self._saved["train_step"])
        model.train_function = self._saved["train_function"]
        self._installed = False

    @property
    def _callbacks_in_step(self) -> bool:
        """Whether JAX's step calls back into Python (the vector's callback, where the step
        cannot return it)."""
        return backend.name() == "jax" and not self._vector_in_outputs

    @functools.cached_property
    def row_bytes(self) -> int:
        """Bytes of one step's row (float32) while it waits to be written (the plans are fixed:
        the callback asks at every step)."""
        return 4 * (raw_size(self.plans) if self._on_host else self._vector_size)

    @functools.cached_property
    def _vector_size(self) -> int:
        return sum(plan.size for plan in self.plans)

    def rows(self, taken: Sequence[Any]) -> np.ndarray:
        """(S, total) step vectors on the host from rows `take` gave: brought over and, where
        the step hands out its samples (`backend.host_statistics_in_step`), reduced by numpy
        here. The callback calls this on its writer's thread."""
        if not self._on_host:
            return to_host(taken, self._vector_size)
        # CPU tensors (TensorFlow's, torch's) as numpy arrays without a copy (Keras's
        # convert_to_numpy copies: MobileNetV2's samples are 4 MB a step).
        return host_vectors([np.asarray(row) for row in taken], self.plans, self._q)

    def take(self, limit: int | None = None) -> list[Any]:
        """The first `limit` (default: all) vectors received, in step order, still on the device."""
        count = len(self._pending) if limit is None else min(limit, len(self._pending))
        taken, self._pending = self._pending[:count], self._pending[count:]
        return taken

    @property
    def pending(self) -> int:
        return len(self._pending)


def live_hooks(model: keras.Model, fit: object) -> StepStatistics | None:
    """The per-step hooks another callback of the same `fit` installed on `model`, or None (none,
    or stale ones left by a fit that ended in an exception, which `install` replaces)."""
    hooks = getattr(getattr(model, "train_function", None), "icsviz_hooks", None)
    if isinstance(hooks, StepStatistics) and hooks._installed and fit is not None and hooks.fit is fit:
        return hooks
    return None


def to_host(vectors: Sequence[Any], width: int) -> np.ndarray:
    """(S, width) float32 on the host from S step rows on the device (one copy for all; it
    waits for the last step that made one, so the callback runs it on the writer's thread)."""
    if not vectors:
        return np.zeros((0, width), "float32")
    return np.stack([np.asarray(v, "float32") for v in backend.to_numpy(list(vectors))])


class _Remembering:
    """An iterator that keeps what it gave (one step's batches)."""

    def __init__(self, source: Iterator[Any]) -> None:
        self.source, self.drawn = source, []

    def __iter__(self) -> _Remembering:
        return self

    def __next__(self) -> Any:
        item = next(self.source)
        self.drawn.append(item)
        return item


class _ChannelError(RuntimeError):
    """The training step's state did not carry the statistics vector out (see `_jax_train_step`)."""


def _keras_own_jax_step(model: keras.Model) -> bool:
    """Whether `model` trains with Keras's own JAX `train_step` (not a custom one)."""
    from keras.src.backend.jax.trainer import JAXTrainer

    return "train_step" not in model.__dict__ and type(model).train_step is JAXTrainer.train_step


def _missing(plan: BatchPlan) -> Any:
    """A sample of NaN for a layer the step did not produce: its statistics come out NaN."""
    return ops.full((plan.spec.sample + len(plan.spec.tracked_units) * plan.spec.unit_sample,), float("nan"))


def _of_layer(name: str, layer: str) -> bool:
    """Whether a captured tensor's name is one of layer `layer`'s ("fc1", "fc1:preact#2",
    "bi[0]"). Matched as a prefix, not cut at the first mark: a layer's own name may hold one
    ("out#x", "层.2:a")."""
    return name == layer or (name.startswith(layer) and name[len(layer)] in ":[#")


@contextlib.contextmanager
def _patched(obj: Any, attr: str, value: Any) -> Iterator[None]:
    had = attr in obj.__dict__
    old = obj.__dict__.get(attr)
    object.__setattr__(obj, attr, value)
    try:
        yield
    finally:
        if had:
            object.__setattr__(obj, attr, old)
        else:
            obj.__dict__.pop(attr, None)
