"""The one backend-specific module: compiling, differentiating, histograms.

Everything else in the capture path is written with `keras.ops` and runs on any
Keras 3 backend; the few things keras.ops cannot express (a gradient with
auxiliary outputs, compiling a function, a fast one-pass histogram) live here,
one small implementation per backend.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import keras
import numpy as np

__all__ = [
    "name",
    "wide_float",
    "compile_function",
    "value_and_grad",
    "snapshot",
    "histogram",
    "histograms",
    "squares_summed_in_one_pass",
    "sum_of_squares",
    "isolated_rng",
    "kept",
    "torch_modules",
    "inlined_calls",
    "to_numpy",
    "floor",
    "ceil",
    "gather",
    "detached",
    "interrupts_held",
    "deleted_variables",
    "reachable",
]

LossFn = Callable[[list[Any]], tuple[Any, Any]]


def name() -> str:
    return keras.backend.backend()


def wide_float() -> str:
    """float64 for the histogram grid, unless JAX runs without x64 (it would truncate and warn)."""
    if name() == "jax":
        import jax

        return "float64" if jax.config.jax_enable_x64 else "float32"
    return "float64"


def floor(x: Any) -> Any:
    """`keras.ops.floor` in `x`'s own float dtype: Keras 3.15's torch backend computes floor and
    ceil of a float64 tensor in float32 (its dtype promotion does not know torch's dtypes), which
    collapsed the histogram grid of a constant layer to one edge (`stats.dyadic_grid`)."""
    if name() == "torch":
        import torch

        return torch.floor(x)
    return keras.ops.floor(x)


def ceil(x: Any) -> Any:
    """`keras.ops.ceil` in `x`'s own float dtype (see `floor`)."""
    if name() == "torch":
        import torch

        return torch.ceil(x)
    return keras.ops.ceil(x)


def gather(values: Any, indices: Any, axis: int = 0) -> Any:
    """`values` at `indices` along `axis`, for indices known to be in range (never negative).

    keras.ops.take also maps negative indices: seven more TensorFlow ops per call, and on a
    constant index array (the capture's samples) a constant-folding pass over it when the
    function first runs.
    """
    if name() == "tensorflow":
        import tensorflow as tf

        return tf.gather(values, indices, axis=axis)
    if name() == "jax":
        return _jax_gather(values, indices, axis)
    return keras.ops.take(values, indices, axis=axis)


def _jax_gather(values: Any, indices: Any, axis: int) -> Any:
    """`gather` as one XLA gather that trusts its indices. `jnp.take` maps negative indices and
    fills out-of-range ones, a `where` before the gather and a mask after it: MobileNetV2's
    statistics traced in 0.45-0.60 s instead of 0.74-0.82 s and compiled in 2.5 s instead of
    2.7-3.1 s (JAX on a CPU), with the same values bit for bit."""
    import jax

    values = jax.numpy.asarray(values)
    # The index vectors' last axis, in numpy for the plans' constant indices (no op traced)
    indices = indices[..., None] if isinstance(indices, np.ndarray) else jax.numpy.expand_dims(indices, -1)
    axis %= values.ndim
    sizes = list(values.shape)
    sizes[axis] = 1
    numbers = jax.lax.GatherDimensionNumbers(
        offset_dims=tuple(range(axis))
        + tuple(range(axis + indices.ndim - 1, values.ndim + indices.ndim - 2)),
        collapsed_slice_dims=(axis,),
        start_index_map=(axis,),
    )
    promise = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
    return jax.lax.gather(values, indices, numbers, tuple(sizes), mode=promise)


def host_statistics_in_step(model: keras.Model) -> bool:
    """Whether the per-step mode's training step hands out its samples, whose statistics numpy
    computes on the callback's writer thread, instead of computing them as kernels of the step.

    TensorFlow runs a graph op by op: on a CPU the statistics of a few thousand sampled values
    per layer are some hundred small kernels whose launch costs more than their work, and its
    CPU sort is a top-k over every value (7 ms per step for the BN CNN's samples against 0.7 ms
    in numpy). Numpy called from inside the step (`tf.numpy_function`, as until the thirteenth
    session) took 1.3 ms of CPU a step for the reference CNN's samples, against 0.4 ms on the
    writer's thread, a few steps at a time. So on a CPU the step hands out its samples, unless
    XLA compiles TensorFlow's step: there, as on a GPU or TPU, the device computes the
    statistics. Torch on a CPU too (its eager kernels: an MLP's per-step epoch 16 -> 13 ms a
    step, the same counts and quantiles). And JAX on a CPU: XLA fuses the statistics, but its
    CPU sort is slow (6 ms of a three-layer model's 8 ms step), and with the sort alone in numpy
    (a host callback inside the step, until the fifteenth session) the BN CNN's step cost 1.10
    Keras's own against 1.02-1.03 with the samples handed out, the LSTM's 1.15-1.21 against
    1.10 (`per_step.py --paired 60`, the two alternated in one process).
    """
    if name() == "torch":
        import torch

        return not torch.cuda.is_available()
    if name() == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if name() != "tensorflow" or getattr(model, "jit_compile", False):
        return False
    import tensorflow as tf

    return not tf.config.list_logical_devices("GPU") and not tf.config.list_logical_devices("TPU")


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold a Ctrl-C while a compiled step with icsviz's host callbacks runs; raise it after.

    Python runs its SIGINT handler at the first Python code after the signal. Inside JAX's
    step that is a host callback (the per-step mode's sort on a CPU), and XLA turned the
    KeyboardInterrupt raised there into its own "INTERNAL: CpuCallback error", a ValueError
    naming icsviz, so the user's `except KeyboardInterrupt` missed it. Here the first Ctrl-C is
    kept until the step has returned, then raised as a KeyboardInterrupt; a second one goes
    through at once. Only on the main thread (the only one Python interrupts) and with
    Python's own handler in place: a handler of the user's is left to do its job.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pressed: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if pressed:
            signal.default_int_handler(signum, frame)
        pressed.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def deleted_variables(model: keras.Model) -> list[str]:
    """Paths of the model's variables whose values JAX has deleted: Keras's JAX trainer donates
    them to each training step and writes the results back only at the fit's end, so a fit
    interrupted in the middle (Ctrl-C) leaves them deleted. Empty on other backends."""
    if name() != "jax":
        return []
    deleted = []
    for variable in model.variables:
        is_deleted = getattr(getattr(variable, "value", None), "is_deleted", None)
        if is_deleted is not None and is_deleted():
            deleted.append(variable.path)
    return deleted


def compile_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Compile `fn` into one graph, so statistics are computed on the device."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        # autograph=False: the capture has no Python control flow on tensors, and converting
        # a deep model's statistics code took most of the tracing time.
        compiled = tf.function(fn, reduce_retracing=True, autograph=False)
        # Each capture program traces its function once (one probe shape). TensorFlow counts
        # traces per Python function across all programs, so a sweep of several models in one
        # process logged a warning about "excessive retracing" of icsviz's code, for nothing.
        with contextlib.suppress(AttributeError):
            compiled._omit_frequent_tracing_warning = True
        return _lightly_optimized(compiled)
    if backend == "jax":
        import jax

        return _jax_jit(jax, fn)
    return fn  # torch and numpy run eagerly


# XLA's CPU backend at LLVM optimization level 1 instead of its default: compiling the reference
# CNN's capture took 1.0 s less (2.7 -> 1.7 s; BN CNN 2.5 -> 2.2 s, MobileNetV2 9.8 -> 9.3 s) and
# the compiled capture ran as fast (`python benchmarks/first_capture.py` on JAX). Activation
# statistics are bit for bit the same; gradient norms can differ in the last bits (2.4e-7 on the
# BN CNN), as between any two compilations of a backward pass.
#
# And with XLA's older emitters for fused kernels (`xla_cpu_use_fusion_emitters` off), which
# generate code for the same fusions faster than its newer MLIR ones. Compiling the capture, one
# process each (`compile_options.py`, level 1 alone -> both): reference CNN 1.7 -> 0.9 s, BN CNN
# 2.0 -> 1.2 s, MobileNetV2 7.4 -> 5.8 s (its CPU time 13.6 -> 10 s on two cores); the compiled
# captures ran as fast, alternated in one process (ratios 0.98-1.02), with the same histogram
# counts and other results within float32 rounding (1.6e-7 of their magnitude). A JAX that no
# longer knows an option compiles without it (`_known_options`).
_CPU_COMPILER_OPTIONS: dict[str, Any] = {
    "xla_backend_optimization_level": 1,
    "xla_cpu_use_fusion_emitters": False,
}
# GPUs keep XLA's default. On an H100 (`benchmarks/compile_options.py`) level 1 compiled no faster
# (BN CNN 5.9 s against 5.6 s); autotuning off halved the compile (MobileNetV2 31.7 -> 13.8 s) but
# made every capture 2.4-10x slower (8.3 -> 20.1 ms; BN 2.3 -> 24.5 ms), and a run pays the first
# capture once, the steady one every epoch. `benchmarks/depth.py --gpu-options` sets this.
_GPU_COMPILER_OPTIONS: dict[str, Any] = {}


# None: compile the first capture after Keras's first step on an accelerator, beside it on a CPU
# (`compiles_after_first_step`); True or False forces one way (`benchmarks/first_run.py`).
_COMPILE_AFTER_FIRST_STEP: bool | None = None


def compiles_after_first_step() -> bool:
    """Whether JAX compiles the first capture once Keras's own training step has compiled,
    instead of beside it (`CaptureProgram.measure_in_background`).

    On a GPU XLA autotunes each convolution when it compiles, timing candidate kernels on the
    device, and keeps the results for the process: compiled after Keras's step, the capture
    finds its convolutions timed already. On a CPU nothing is autotuned and the two compiles
    share the cores better side by side.
    """
    if _COMPILE_AFTER_FIRST_STEP is not None:
        return _COMPILE_AFTER_FIRST_STEP
    if name() != "jax":
        return False
    import jax

    return jax.default_backend() != "cpu"


def _jax_jit(jax: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    cpu = jax.default_backend() == "cpu"
    # Empty where this JAX has no per-function compiler options: `_known_options` tried them.
    options = _known_options(jax, _CPU_COMPILER_OPTIONS if cpu else _GPU_COMPILER_OPTIONS)
    return jax.jit(fn, compiler_options=options) if options else jax.jit(fn)


_KNOWN_OPTIONS: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}


def _known_options(jax: Any, options: dict[str, Any]) -> dict[str, Any]:
    """`options` less those this JAX's XLA does not know (it rejects an unknown option when it
    compiles; these are XLA debug options, which come and go between releases). Tried once per
    process on a function of one scalar (milliseconds): all together, then one by one."""
    if not options:  # nothing to try (XLA's defaults: a GPU)
        return {}
    key = tuple(sorted(options.items()))
    known = _KNOWN_OPTIONS.get(key)
    if known is None:
        if _compiles_with(jax, options):
            known = dict(options)
        else:
            known = {
                option: value for option, value in options.items() if _compiles_with(jax, {option: value})
            }
        _KNOWN_OPTIONS[key] = known
    return known


def _compiles_with(jax: Any, options: dict[str, Any]) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - an unknown option (or a JAX without per-function options)
        return False
    return True


def _lightly_optimized(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled` (a tf.function) called with a lighter graph optimization than TensorFlow's default.

    Grappler rewrites a function's graph when it first runs. For the capture of a deep model
    (MobileNetV2: ~14,000 ops) that took 8 s of the first capture (two passes over the graph,
    the memory optimizer alone 1.9 s), and it did not make later captures faster: measured on
    CPU, the steady capture took the same time with no rewriting at all. So on a CPU-only
    TensorFlow the capture runs without it; with a GPU (where the layout rewrite matters for
    convolutions) it keeps one pass and drops the memory optimizer. The options travel with
    each call of this function only (TensorFlow's per-thread call options): the user's own
    training function is optimized as before.
    """
    try:
        import tensorflow as tf
        from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
        from tensorflow.python.eager import context
    except ImportError:  # a TensorFlow without these internals: its default optimization
        return compiled
    rewriter = rewriter_config_pb2.RewriterConfig
    on_cpu_only = not tf.config.list_logical_devices("GPU")

    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        eager = context.context()
        saved = copy.copy(eager.function_call_options)
        try:
            options = eager.function_call_options
            config = config_pb2.ConfigProto()
            config.ParseFromString(options.config_proto_serialized)
            rewrite = config.graph_options.rewrite_options
            if on_cpu_only:
                rewrite.disable_meta_optimizer = True
            else:
                rewrite.meta_optimizer_iterations = rewriter.ONE
                rewrite.memory_optimization = rewriter.NO_MEM_OPT
            options.config_proto_serialized = config
        except Exception:  # noqa: BLE001 - internals of another TensorFlow: its default optimization
            eager.function_call_options = saved
        try:
            return compiled(*args, **kwargs)
        finally:
            eager.function_call_options = saved

    return call


def value_and_grad(loss_fn: LossFn, params: Sequence[Any]) -> tuple[Any, Any, list[Any]]:
    """(loss, aux, d loss / d params) for `loss, aux = loss_fn(params)`.

    A parameter that the loss does not depend on gets a zero gradient.
    """
    backend = name()
    params = list(params)
    if backend == "tensorflow":
        import tensorflow as tf

        params = [tf.convert_to_tensor(p) for p in params]
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss, aux = loss_fn(params)
        grads = tape.gradient(loss, params)
        grads = [tf.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return loss, aux, grads
    if backend == "jax":
        import jax

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, aux, list(grads)
    if backend == "torch":
        import torch

        if not params:  # a frozen model: autograd refuses an empty list of inputs
            loss, aux = loss_fn(params)
            return loss.detach(), aux, []
        # A Keras variable's value is a torch Parameter, which a torch module inside the model
        # (`TorchModuleWrapper`) reads itself, past Keras's StatelessScope: the gradients are
        # taken with respect to it, not a copy the module never sees (they came out 0).
        # `autograd.grad` leaves its `.grad` alone.
        params = [
            p if isinstance(p, torch.nn.Parameter) and p.requires_grad else p.detach().requires_grad_(True)
            for p in params
        ]
        with torch.enable_grad():
            loss, aux = loss_fn(params)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return loss.detach(), aux, grads
    raise NotImplementedError(f"icsviz computes gradients on tensorflow, jax or torch, not {backend}")


def detached(tensor: Any) -> Any:
    """`tensor` cut from the autograd graph where that costs nothing to trace: on torch (eager,
    where statistics of a tensor that requires grad would build graph); on TensorFlow and JAX the
    capture's statistics are computed outside the gradient already, and one StopGradient per
    tensor was one more op to trace."""
    return tensor.detach() if name() == "torch" else tensor


def reachable() -> Callable[[Any], bool]:
    """Whether a tensor recorded during a traced call can be used here, where the call returned:
    a predicate, the current trace or graph read once.

    A layer called inside a loop or a branch of its caller (`keras.ops.fori_loop`, `scan`,
    `cond` in a layer of the user's own) makes tensors of the loop body's own trace: JAX calls
    them leaked tracers and TensorFlow tensors of another graph, and using one fails the whole
    function. Unknown internals (another JAX or TF version) count as reachable, as before.
    """
    backend = name()
    try:
        if backend == "jax":
            from jax._src import core  # noqa: PLC0415 - the current trace is not public API

            traces, current = set(), core.trace_ctx.trace
            while current is not None:  # the trace under way and the ones it runs inside
                traces.add(id(current))
                current = getattr(current, "parent_trace", None)
            return lambda tensor: getattr(tensor, "_trace", None) is None or id(tensor._trace) in traces
        if backend == "tensorflow":
            import tensorflow as tf  # noqa: PLC0415

            if tf.executing_eagerly():
                return lambda tensor: True
            graph = tf.compat.v1.get_default_graph()
            return lambda tensor: getattr(tensor, "graph", graph) is graph
    except Exception:  # noqa: BLE001 - unknown internals: as before this check
        pass
    return lambda tensor: True  # torch runs eagerly


def outside_trace() -> contextlib.AbstractContextManager[Any]:
    """Run eagerly from inside a function being traced: TensorFlow's init scope (JAX traces
    with concrete shapes and torch runs eagerly, so nothing there needs it)."""
    if name() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        return tf.init_scope()
    return contextlib.nullcontext()


def with_static_shape(tensor: Any, shape: tuple[int, ...]) -> Any:
    """`tensor` with the static `shape` it has on the probe, checked when it runs, where
    TensorFlow's tracing lost a dimension (a string input through TextVectorization's ragged
    tokens has an unknown batch size); as it is elsewhere."""
    if name() == "tensorflow" and any(d is None for d in tensor.shape):
        import tensorflow as tf  # noqa: PLC0415

        return tf.ensure_shape(tensor, shape)
    return tensor


def read_values(variables: Sequence[Any]) -> list[Any]:
    """The current values of Keras variables, without copying where possible."""
    return [v.value for v in variables]


def snapshot(variables: Sequence[Any]) -> list[Any]:
    """Device copies of the variables' current values (for update ratios)."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        return [tf.identity(v.value) for v in variables]
    if backend == "torch":
        return [v.value.detach().clone() for v in variables]
    if backend == "jax":
        # Keras's JAX trainer donates variable buffers to each train step: keep real copies.
        return _jax_copies([v.value for v in variables])
    return [np.array(v.value, copy=True) for v in variables]


def copies(values: Sequence[Any]) -> list[Any]:
    """Copies of tensors, inside the compiled capture function: the weights it measured, for
    the next capture's update ratios, made on the device in the same call (no dispatch of
    its own, and on TensorFlow not one eager op per variable)."""
    if name() == "torch":
        return [value.detach().clone() for value in values]
    # jnp.copy is a real copy in a jit (not the input forwarded): the train step donates them.
    return [keras.ops.copy(value) for value in values]


def _jax_copies(values: list[Any]) -> list[Any]:
    """Copies of JAX arrays in one call, on their devices and shardings. A transfer with
    aliasing refused compiles nothing; a jitted copy, compiled for each model's list of
    variables, cost the BN CNN's first capture 0.1-0.3 s of the training thread."""
    import jax

    try:
        return jax.device_put(values, may_alias=False)
    except TypeError:  # a JAX without `may_alias`
        return _jax_jitted_copies()(values)


@functools.cache
def _jax_jitted_copies() -> Callable[[list[Any]], list[Any]]:
    import jax

    return jax.jit(lambda values: [value.copy() for value in values])


def inlined_calls() -> contextlib.AbstractContextManager[Any]:
    """Where the capture's statistics are traced: on JAX, the jnp functions that are compiled
    functions of their own (`take`, `clip`, ...) are traced into the capture instead of as
    functions nested in it, each traced and lowered on its own.

    Tracing and lowering MobileNetV2's statistics took 0.60-0.63 s this way against 0.88-0.98 s
    (JAX on a CPU), the same values bit for bit and the same compile. This is on the training
    thread, in the first capture. The tensors are the capture's tracers, so nothing is run
    eagerly: `jax.disable_jit` only stops nesting.
    """
    if name() == "jax":
        import jax

        return jax.disable_jit()
    return contextlib.nullcontext()


def torch_modules(layers: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The torch modules that named Keras layers wrap (`TorchModuleWrapper`), by layer name; none
    off torch."""
    if name() != "torch":
        return []
    return [
        (layer_name, layer.module)
        for layer_name, layer in layers
        if hasattr(getattr(layer, "module", None), "buffers")
    ]


@contextlib.contextmanager
def kept(tensors: Sequence[Any]) -> Iterator[None]:
    """Run a capture leaving `tensors` (torch buffers it would update in place) as they were."""
    if not tensors:
        yield
        return
    import torch

    with torch.no_grad():
        saved = [t.clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a capture on its own random stream, leaving the user's untouched.

    On torch an unseeded Dropout draws from torch's global generator: a probe
    pass would consume it and change the masks (and losses) of the training
    that follows. Here the global state is saved, seeded for the capture (the
    same masks every capture) and restored. TF and JAX draw from Keras seed
    state, which the capture program pins itself.
    """
    if name() != "torch":
        yield
        return
    import torch

    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def squares_summed_in_one_pass() -> bool:
    """Whether `sum_of_squares` reads a tensor once, without writing its squares out first:
    the norms of large tensors are then best taken one by one (flat.py)."""
    return name() == "tensorflow"


def sum_of_squares(x: Any) -> Any:
    """The sum of the squares of every value of `x`, a scalar in its dtype.

    On TensorFlow one kernel (`tf.nn.l2_loss`, halved squares summed in one pass, doubled here:
    exact in binary floating point), where `sum(square(x))` writes the squares out and reads them
    back (flat.py: the reference CNN's norms, of about 1.25 M values each, a millisecond or so
    less). JAX fuses the two itself; torch runs them as they come.
    """
    if name() == "tensorflow":
        import tensorflow as tf

        return tf.nn.l2_loss(x) * 2.0
    return keras.ops.sum(keras.ops.square(x))


def histogram(values: Any, low: Any, width: Any, bins: int) -> Any:
    """Counts of `values` (1-D, finite) in `bins` bins of `width` from `low` (see `histograms`)."""
    first, step = keras.ops.reshape(low, (1,)), keras.ops.reshape(width, (1,))
    return histograms(keras.ops.expand_dims(values, 0), first, step, bins)[0]


def histograms(values: Any, low: Any, width: Any, bins: int) -> Any:
    """(k, bins) int32 counts: row i of `values` (k, n; finite) in `bins` bins of `width[i]`
    from `low[i]`.

    Bin i holds low + i * width <= value < low + (i + 1) * width. Values outside the range
    fall into the first or last bin; callers choose the range so that none do.
    """
    ops = keras.ops
    k = int(values.shape[0])
    if name() == "tensorflow":
        import tensorflow as tf

        # One kernel per row, six times faster on a CPU than the index arithmetic below. The rows
        # come from one unstack each (indexing row by row made four ops per row: a deep model's
        # histograms were most of its capture graph, and slow to trace).
        low32, width32 = tf.cast(low, "float32"), tf.cast(width, "float32")
        ranges = tf.unstack(tf.stack([low32, low32 + width32 * bins], axis=1), num=k)
        rows = tf.unstack(values, num=k)
        counts = [tf.histogram_fixed_width(row, edges, nbins=bins) for row, edges in zip(rows, ranges)]
        return tf.cast(tf.stack(counts), "int32")
    position = (ops.cast(values, low.dtype) - ops.expand_dims(low, 1)) / ops.expand_dims(width, 1)
    index = ops.cast(ops.clip(ops.floor(position), 0, bins - 1), "int32")
    index = index + ops.expand_dims(ops.arange(k, dtype="int32") * bins, 1)
    ones = ops.ones_like(index)
    counts = ops.segment_sum(ops.reshape(ones, (-1,)), ops.reshape(index, (-1,)), num_segments=k * bins)
    return ops.reshape(counts, (k, bins))


def to_numpy(tree: Any) -> Any:
    """Bring a nested structure of device tensors to host numpy arrays."""
    if name() == "jax":
        import jax

        # All copies started at once: one wait for the device instead of one per array.
        return keras.tree.map_structure(np.asarray, jax.device_get(tree))
    if name() == "torch":
        return keras.tree.map_structure(_torch_to_numpy, tree)
    if name() == "tensorflow":
        # `Tensor.numpy()`: Keras's `convert_to_numpy` goes through `np.array(tensor)`, 30 us a
        # tensor against 4 (a capture's 14 results: 0.49 ms against 0.06 ms, on the training thread).
        return keras.tree.map_structure(_tf_to_numpy, tree)
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), tree)


def _tf_to_numpy(tensor: Any) -> np.ndarray:
    if hasattr(tensor, "numpy") and not hasattr(tensor, "value"):  # an eager tensor, not a Variable
        return np.asarray(tensor.numpy())
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor's values on the host, through `Tensor.numpy()`: Keras's
    `convert_to_numpy` calls `np.array(tensor)`, which NumPy 2 answers with a
    DeprecationWarning per array (torch's `__array__` takes no `copy`), hundreds a capture,
    and an error under `-W error`."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        return np.asarray(tensor)
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: the statistics are float32 anyway
        tensor = tensor.float()
    return tensor.numpy()
