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

import concurrent.futures
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from ..store.schema import RunLayout, VariableSpec
from ..store.writer import Capture, LayerCapture
from . import backend
from .batched import all_layer_stats, split
from .flat import FlatLayout, l2, l2_norms
from .intercept import Record, Recorder, intercept, warn_once
from .layers import SelectedLayer, captured_inputs, iter_layers, recurrent_states
from .masks import probe_masks
from .probe import num_samples
from .shapes import has_unknown_dimension, probe_shapes, with_probe_batch
from .stats import CaptureOptions, MaskMismatch, TracedLayer, layer_stats, plan_tensor

__all__ = ["CaptureProgram"]

ops = keras.ops

# The longest the first capture's compile waits for Keras's own step to compile, where it does:
# a bound in case a path that needs the capture forgets to say so, long enough for deep models'
# compiles (MobileNetV2's took 26-32 s on an H100; compiling beside it is what the wait avoids).
_FIRST_STEP_WAIT_S = 300.0


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
        # A stateful RNN carries its states from batch to batch: every capture starts from
        # zero states instead (the probe as the start of a sequence), so that its drift, too,
        # comes from the weights alone; the training's states are left as they are.
        self._states = recurrent_states(model)
        self._owner = self._variable_owners()
        torch_modules = backend.torch_modules(iter_layers(model))
        self._names = self._variable_names(torch_modules)
        # A torch module inside the model (`TorchModuleWrapper`) keeps its buffers (BatchNorm's
        # running statistics, its batch count) outside Keras's variables, where a capture's pass
        # would update them.
        self._torch_buffers = list(
            {id(b): b for _, module in torch_modules for b in module.buffers()}.values()
        )
        self.ics_layers, self._ics_groups = self._ics_plan()
        self.traced: list[TracedLayer] | None = None
        self._aliases: dict[str, str] = {}  # a composite layer's output recorded under a layer's name
        self.skipped: dict[str, str] = {}  # layer name -> why it is not recorded
        self._masks: dict[str, np.ndarray] | None = None  # the probe's Keras masks (masks.py)
        self._probe_x: Any = None  # the probe's inputs, for an eager pass while tracing (shapes.py)
        self._shapes: dict[str, tuple[int, ...]] | None = None  # read by that pass, when needed
        # The weights at the last capture, as one flat float32 vector: the capture function's
        # arguments and results are one array each instead of one per variable (MobileNetV2:
        # 158), and each array costs JAX about 13 us to hand over on a CPU. Each variable is
        # padded to whole blocks, so that the weights' and updates' norms are a few kernels
        # (flat.py).
        self._previous: Any = None
        self._flat = FlatLayout.of([v.shape for v in self.trainable])
        self._previous_norm: np.ndarray | None = None  # and their norms
        self._function = backend.compile_function(self._program)
        self._masked_function: Any = None  # compiled when a capture first sees NaN/Inf
        self._compiled: Any = None  # JAX: the function compiled by `measure_in_background`
        self._first: concurrent.futures.Future[Any] | None = None  # that capture, until waited for
        self._start_compile: _Once | None = None  # starts its thread
        # Set once Keras's own training step has compiled: the first capture's compile waits
        # for it where `backend.compiles_after_first_step` (see `measure_in_background`).
        self._first_step_done = threading.Event()
        self._batched = True  # all layers' statistics in one batch (see batched.py)

    # ---------------------------------------------------------------- planning
    def _variable_owners(self) -> list[str]:
        owner: dict[int, str] = {}
        for name, layer in iter_layers(self.model):
            for v in getattr(layer, "trainable_variables", ()):  # an inline operation has none
                owner.setdefault(id(v), name)
        return [owner.get(id(v), self.model.name) for v in self.trainable]

    def _variable_names(self, torch_modules: list[tuple[str, Any]]) -> list[str]:
        """The variables' names in the file: their Keras paths, except those of a torch module
        inside the model (`TorchModuleWrapper`), which Keras names "variable", "variable_1",
        ...: the module's own parameter names under its layer's ("t1/0.weight")."""
        named: dict[int, str] = {}
        for layer_name, module in torch_modules:
            for parameter_name, parameter in module.named_parameters():
                named.setdefault(id(parameter), f"{layer_name}/{parameter_name}")
        names = [named.get(id(v.value), v.path) for v in self.trainable]
        return names if len(set(names)) == len(names) else [v.path for v in self.trainable]

    def _ics_plan(self) -> tuple[tuple[str, ...], list[list[int]]]:
        if not (self.options.gradient_shift and self.with_gradients):
            return (), []
        order: dict[str, list[int]] = {}
        for index, name in enumerate(self._owner):
            order.setdefault(name, []).append(index)
        return tuple(order), list(order.values())

    def _plan(self, recorder: Recorder) -> list[TracedLayer]:
        """Plan every recorded tensor; one that cannot be measured is skipped with a warning."""
        plans: list[TracedLayer] = []
        seen: set[str] = set()
        planned: dict[str, int] = {}  # name -> the index of the record planned under it
        for index, record in enumerate(recorder.records):
            if record.name in seen:
                continue  # the same name twice (a layer called again in one pass): keep the first
            seen.add(record.name)
            try:
                plan = self._plan_one(record, index)
            except Exception as exc:  # noqa: BLE001 - one layer never costs the run
                self._skip(record.name, type(record.layer.layer).__name__, exc)
                continue
            source = record.range_source
            if source is not None and record.range_map is not None:
                origin = recorder.records[source]
                if planned.get(origin.name) == source and self._shape_of(origin) == plan.shape:
                    plan.range_from, plan.range_map = origin.name, record.range_map
            planned[record.name] = index
            plans.append(plan)
        return plans

    def _plan_one(self, record: Record, index: int) -> TracedLayer:
        """Plan one recorded tensor, over its data rows where the probe's Keras mask says which."""
        args = (record.name, record.layer.layer, record.kind, self._shape_of(record), index, self.options)
        mask = (self._masks or {}).get(record.name)
        try:
            return plan_tensor(*args, mask=mask)
        except MaskMismatch as exc:
            warn_once(
                f"mask:{record.name}",
                f"layer {record.name!r} is recorded over every position, padding included: {exc}.",
            )
            return plan_tensor(*args)

    def _shape_of(self, record: Record) -> tuple[Any, ...]:
        """The recorded tensor's shape, its batch size from the probe where tracing lost it."""
        shape = tuple(record.tensor.shape)
        if not has_unknown_dimension(shape):
            return shape
        if self._shapes is None:
            try:
                self._shapes = probe_shapes(self.model, self.selection, self._probe_x, self.options.training)
            except Exception as exc:  # noqa: BLE001 - those layers are skipped, each with a warning
                self._shapes = {}
                warn_once(
                    f"shapes:{self.model.name}",
                    f"reading the shapes of the probe's tensors failed ({type(exc).__name__}: {exc}).",
                )
        return with_probe_batch(shape, self._shapes.get(record.name), num_samples(self._probe_x))

    def _skip(self, name: str, class_name: str, exc: BaseException) -> None:
        self.skipped[name] = f"{type(exc).__name__}: {exc}"
        warn_once(
            f"measure:{name}",
            f"layer {name!r} ({class_name}) is not recorded ({exc}). Every other layer is.",
        )

    @property
    def layout(self) -> RunLayout:
        if self.traced is None:
            raise RuntimeError("the capture program has not run yet")
        variables = tuple(
            VariableSpec(name=name, layer=owner, shape=tuple(int(d) for d in v.shape))
            for v, name, owner in zip(self.trainable, self._names, self._owner)
        )
        names = [t.name for t in self.traced]
        inputs = captured_inputs(self.model, self.selection, names, self._aliases)
        return RunLayout(
            layers=tuple(dataclasses.replace(t.spec(), inputs=inputs.get(t.name, ())) for t in self.traced),
            variables=variables,
            ics_layers=self.ics_layers,
            hist_bins=self.options.hist_bins,
        )

    # ---------------------------------------------------------------- program
    def _forward(
        self,
        trainable: list[Any],
        non_trainable: list[Any],
        x: Any,
        y: Any,
        sample_weight: Any,
        recorder: Recorder | None,
    ) -> tuple[Any, list[Any]]:
        mapping = list(zip(self.trainable, trainable)) + list(zip(self.non_trainable, non_trainable))
        mapping += [(v, ops.zeros(v.shape, v.dtype)) for v in self._states]
        training = self.options.training
        with contextlib.ExitStack() as stack:
            if recorder is not None:
                stack.enter_context(intercept(self.selection, recorder))
            stack.enter_context(keras.StatelessScope(state_mapping=mapping))
            y_pred = self.model(x, training=training)
            if y is None or not self.with_gradients:  # no loss wanted: none computed (it may not exist)
                loss = ops.zeros(())
            else:
                loss = self.model.compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
                )
        tensors = [r.tensor for r in recorder.records] if recorder is not None else []
        return loss, tensors

    def _masked_program(self, *args: Any) -> dict[str, Any]:
        return self._program(*args, masked=True)

    def _program(
        self,
        trainable: list[Any],
        non_trainable: list[Any],
        previous: Any,
        x: Any,
        y: Any,
        sample_weight: Any,
        learning_rate: Any,
        masked: bool = False,
    ) -> dict[str, Any]:
        recorder = Recorder()

        def loss_fn(params: list[Any]) -> tuple[Any, list[Any]]:
            return self._forward(params, non_trainable, x, y, sample_weight, recorder)

        grads: list[Any] = []
        if self.with_gradients:
            loss, activations, grads = backend.value_and_grad(loss_fn, trainable)
        else:
            loss, activations = loss_fn(trainable)
        names = [r.name for r in recorder.records]
        if self.traced is None:
            self.traced = self._plan(recorder)
            self._aliases = dict(recorder.aliases)
        by_name = dict(zip(names, activations))
        for plan in self.traced:  # a dimension tracing lost, known from the probe (shapes.py)
            if plan.name in by_name:
                by_name[plan.name] = backend.with_static_shape(by_name[plan.name], plan.shape)
        with backend.inlined_calls():
            statistics = self._layer_stats(by_name, masked)
        # A new vector (a copy: the training step donates the variables' buffers).
        weights = self._flat.pack(trainable)
        out: dict[str, Any] = {
            "loss": loss,
            **statistics,
            "grad_norm": l2_norms(grads),
            "weight_norm": self._flat.norms(weights),
            # The previous weights' norm is the last capture's weight norm (kept on the host).
            "update_norm": self._flat.norms(weights - previous),
            # The weights measured here, copied in the same call: the next capture's `previous`.
            "snapshot": weights,
        }
        if self._ics_groups:
            out["ics_diff"], out["ics_cos"] = self._gradient_shift(
                trainable, non_trainable, x, y, sample_weight, grads, learning_rate
            )
        return out

    def _layer_stats(self, by_name: dict[str, Any], masked: bool) -> dict[str, Any]:
        """{"batched": ...} for all layers at once, or {"layers": [...]} one by one: masked
        (NaN/Inf present), or when the batched statistics cannot be built for this model."""
        assert self.traced is not None
        if not self.traced:  # a filter that matched no layer: the variables' statistics only
            return {"layers": []}
        if not masked and self._batched:
            try:
                tensors = [by_name[plan.name] for plan in self.traced]
                return {"batched": all_layer_stats(tensors, self.traced, self.options)}
            except Exception as exc:  # noqa: BLE001 - the per-layer statistics still work
                self._batched = False
                warn_once(
                    "batched-stats",
                    f"the statistics of all layers could not be computed together ({type(exc).__name__}: "
                    f"{exc}); computing them layer by layer (slower on deep models).",
                )
        stats: list[dict[str, Any]] = []
        for plan in list(self.traced):
            try:
                stats.append(layer_stats(by_name[plan.name], plan, self.options, masked=masked))
            except Exception as exc:  # noqa: BLE001 - one layer never costs the run
                self._skip(plan.name, plan.class_name, exc)
                self.traced.remove(plan)
        return {"layers": stats}

    def _gradient_shift(
        self,
        trainable: list[Any],
        non_trainable: list[Any],
        x: Any,
        y: Any,
        sample_weight: Any,
        grads: list[Any],
        learning_rate: Any,
    ) -> tuple[Any, Any]:
        """Santurkar et al.: G_i vs G'_i after the layers before i took an SGD step."""
        diffs, coss = [], []
        stepped: set[int] = set()
        for group in self._ics_groups:
            # The step in the weights' own dtype (float64 under set_floatx("float64")); the
            # comparison in float32, as every statistic.
            params = [
                w - ops.cast(learning_rate * ops.cast(g, "float32"), w.dtype) if k in stepped else w
                for k, (w, g) in enumerate(zip(trainable, grads))
            ]
            _, _, shifted = backend.value_and_grad(
                lambda p: self._forward(p, non_trainable, x, y, sample_weight, None), params
            )
            g = ops.concatenate([ops.reshape(ops.cast(grads[k], "float32"), (-1,)) for k in group])
            g2 = ops.concatenate([ops.reshape(ops.cast(shifted[k], "float32"), (-1,)) for k in group])
            diffs.append(l2(g - g2))
            coss.append(ops.sum(g * g2) / ops.maximum(l2(g) * l2(g2), 1e-30))
            stepped.update(group)
        return ops.stack(diffs), ops.stack(coss)

    # ---------------------------------------------------------------- running
    @staticmethod
    def _all_finite(result: dict[str, Any]) -> bool:
        if "batched" in result:
            return bool(np.all(result["batched"]["all_finite"]))
        return all(bool(stats["all_finite"]) for stats in result["layers"])

    def run(
        self,
        x: Any,
        y: Any,
        learning_rate: float,
        *,
        step: int,
        epoch: float,
        time: float,
        kind: str,
        sample_weight: Any = None,
    ) -> Capture:
        """Take one capture: `measure` and its host part at once."""
        return self.measure(
            x, y, learning_rate, step=step, epoch=epoch, time=time, kind=kind, sample_weight=sample_weight
        )()

    def measure(
        self,
        x: Any,
        y: Any,
        learning_rate: float,
        *,
        step: int,
        epoch: float,
        time: float,
        kind: str,
        sample_weight: Any = None,
    ) -> Callable[[], Capture]:
        """Run the capture function and bring its results to the host; return what finishes the
        capture there (sorting the quantile samples, `batched.split`). The callback calls that
        on its writer's thread, so the training thread pays only the compiled function.
        `sample_weight`: the probe's, weighting its loss as the model's training does."""
        self._wait_for_first()
        args, first = self._arguments(x, y, sample_weight, learning_rate)
        result, self._previous = self._execute(args)
        return self._complete(result, first, step=step, epoch=epoch, time=time, kind=kind)

    def measure_in_background(
        self,
        x: Any,
        y: Any,
        learning_rate: float,
        *,
        step: int,
        epoch: float,
        time: float,
        kind: str,
        sample_weight: Any = None,
    ) -> Callable[[], Capture]:
        """The first capture with its compilation off the training thread (JAX).

        XLA compiling the capture took 7 s of the reference CNN's first capture on a CPU (21 s
        for MobileNetV2 on an H100's host), about as long as compiling Keras's own training
        step. Here the function is traced and lowered now, with copies of the weights as they
        are now (the training step donates the live buffers), and compiled and run on a thread
        of its own while training starts, beside Keras compiling its step. On a GPU the
        compile starts once Keras's step has compiled (`first_step_done`; see
        `backend.compiles_after_first_step`). The returned callable waits for it; so does the
        next `measure`. Other backends measure at once.
        """
        if backend.name() != "jax" or self._compiled is not None:
            return self.measure(
                x, y, learning_rate, step=step, epoch=epoch, time=time, kind=kind, sample_weight=sample_weight
            )
        args, first = self._arguments(x, y, sample_weight, learning_rate, copies=True)
        with backend.isolated_rng(self.options.seed):
            lowered = self._function.lower(*args)  # traces: the layout is known from here on
        if not backend.compiles_after_first_step():
            self._first_step_done.set()

        def compile_and_run() -> Callable[[], Capture]:
            # A bound on the wait, so that no path left unreleased can hang a run.
            self._first_step_done.wait(_FIRST_STEP_WAIT_S)
            self._compiled = lowered.compile()
            result, self._previous = self._execute(args)
            return self._complete(result, first, step=step, epoch=epoch, time=time, kind=kind)

        future: concurrent.futures.Future[Callable[[], Capture]] = concurrent.futures.Future()

        def work() -> None:
            try:
                future.set_result(compile_and_run())
            except BaseException as exc:  # noqa: BLE001 - raised where the capture is waited for
                future.set_exception(exc)

        # Started by `start_first` once the run's file exists, or when the capture is needed: a
        # run refused before (the file exists) leaves no XLA compile running at the
        # interpreter's exit, which aborts the process ("terminate called ...").
        self._start_compile = _Once(threading.Thread(target=work, name="icsviz-compile", daemon=True).start)
        self._first = future

        def finish() -> Capture:
            self.start_first()
            return future.result()()

        return finish

    def start_first(self) -> None:
        """Start compiling the first capture taken by `measure_in_background` (a no-op when
        there is none, or once started)."""
        start = self._start_compile
        if start is not None:
            start()

    def discard_first(self) -> None:
        """Forget a first capture whose run was refused; one already started is left to end."""
        self._first = self._start_compile = None

    @property
    def waits_for_first_step(self) -> bool:
        """Whether the first capture's compile waits for `first_step_done`."""
        return self._first is not None and not self._first_step_done.is_set()

    def first_step_done(self) -> None:
        """Keras's own training step has run once (so it is compiled), or the capture is
        needed now: the first capture's compile may start."""
        self._first_step_done.set()

    def _wait_for_first(self) -> None:
        """Wait for a first capture still compiling or running on its own thread (its failure
        is raised here too)."""
        self._first_step_done.set()  # needed now: compile without waiting any longer
        self.start_first()
        first, self._first = self._first, None
        if first is not None:
            first.result()

    def _arguments(
        self, x: Any, y: Any, sample_weight: Any, learning_rate: float, copies: bool = False
    ) -> tuple[tuple[Any, ...], bool]:
        """The capture function's arguments and whether this is the first capture; `copies`:
        the variables' values copied, for a capture that runs later."""
        if self._probe_x is None:
            self._probe_x = x
        if self._masks is None:  # before the first trace, which plans the tensors with them
            try:
                self._masks = probe_masks(self.model, self.selection, x)
            except Exception as exc:  # noqa: BLE001 - one pass never costs the run
                self._masks = {}
                warn_once(
                    f"masks:{self.model.name}",
                    f"reading the probe's Keras masks failed ({type(exc).__name__}: {exc}); every "
                    "position is recorded, padding included.",
                )
        read = backend.snapshot if copies else backend.read_values
        trainable = read(self.trainable)
        live = read(self.non_trainable)
        non_trainable = [
            pinned if is_seed else v for v, pinned, is_seed in zip(live, self._pinned, self._is_seed)
        ]
        first = self._previous is None
        # The first capture has no previous weights (its update ratios are NaN): zeros of the
        # same shape keep one input signature, so the function is traced once.
        # (From numpy: JAX moves it to the device without compiling a fill.)
        previous = ops.convert_to_tensor(np.zeros(self._flat.size, "float32")) if first else self._previous
        lr = ops.convert_to_tensor(learning_rate, "float32")
        return (trainable, non_trainable, previous, x, y, sample_weight, lr), first

    def _execute(self, args: tuple[Any, ...]) -> tuple[dict[str, Any], Any]:
        """The capture function's results on the host (computed again masked after NaN/Inf),
        and its copy of the weights it measured, left on the device."""
        with backend.isolated_rng(self.options.seed), backend.kept(self._torch_buffers):
            result = self._call(args)
        snapshot = result.pop("snapshot")
        result = backend.to_numpy(result)
        if not self._all_finite(result):
            # A diverging run: recompute with NaN/Inf masked out (a second, lazily
            # compiled function, so the common case pays nothing for it).
            if self._masked_function is None:
                self._masked_function = backend.compile_function(self._masked_program)
            with backend.isolated_rng(self.options.seed), backend.kept(self._torch_buffers):
                result = self._masked_function(*args)
            result.pop("snapshot")
            result = backend.to_numpy(result)
        return result, snapshot

    def _call(self, args: tuple[Any, ...]) -> Any:
        if self._compiled is not None:
            try:
                return self._compiled(*args)
            except (TypeError, ValueError):  # arguments it was not compiled for: JAX's own jit
                self._compiled = None
        return self._function(*args)

    def _complete(
        self, result: dict[str, Any], first: bool, *, step: int, epoch: float, time: float, kind: str
    ) -> Callable[[], Capture]:
        previous_norm = result["weight_norm"] if self._previous_norm is None else self._previous_norm
        self._previous_norm = result["weight_norm"]
        with np.errstate(divide="ignore", invalid="ignore"):
            # undefined (NaN), not infinite, for a variable that was all zeros (a fresh bias)
            update = np.where(previous_norm > 0, result["update_norm"] / previous_norm, np.nan)
        nan = np.full(len(self.trainable), np.nan)
        grad_norm = result["grad_norm"] if self.with_gradients else nan
        capture = Capture(
            step=step,
            epoch=epoch,
            time=time,
            kind=kind,
            layers=[],
            grad_norm=np.asarray(grad_norm, dtype=float),
            weight_norm=np.asarray(result["weight_norm"], dtype=float),
            update_ratio=np.asarray(nan if first else update, dtype=float),
            ics_grad_diff=np.asarray(result.get("ics_diff", np.zeros(0)), dtype=float),
            ics_grad_cos=np.asarray(result.get("ics_cos", np.zeros(0)), dtype=float),
        )
        assert self.traced is not None
        plans, bins = list(self.traced), self.options.hist_bins
        batched, layers = result.get("batched"), result.get("layers")

        def finish() -> Capture:
            stats = split(batched, plans, bins) if batched is not None else layers
            capture.layers = [
                LayerCapture(**{k: v for k, v in one.items() if k != "all_finite"}) for one in stats
            ]
            return capture

        return finish


class _Once:
    """Call `fn` the first time this is called, from whichever thread (the training thread
    or the writer's)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()
