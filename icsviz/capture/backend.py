"""The one backend-specific module: compiling, differentiating, histograms.

Everything else in the capture path is written with `keras.ops` and runs on any
Keras 3 backend; the few things keras.ops cannot express (a gradient with
auxiliary outputs, compiling a function, a fast one-pass histogram) live here,
one small implementation per backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
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
    "isolated_rng",
    "to_numpy",
    "gather",
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


def gather(values: Any, indices: Any, axis: int = 0) -> Any:
    """`values` at `indices` along `axis`, for indices known to be in range (never negative).

    keras.ops.take also maps negative indices: seven more TensorFlow ops per call, and on a
    constant index array (the capture's samples) a constant-folding pass over it when the
    function first runs.
    """
    if name() == "tensorflow":
        import tensorflow as tf

        return tf.gather(values, indices, axis=axis)
    return keras.ops.take(values, indices, axis=axis)


def compile_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Compile `fn` into one graph, so statistics are computed on the device."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        # autograph=False: the capture has no Python control flow on tensors, and converting
        # a deep model's statistics code took most of the tracing time.
        return tf.function(fn, reduce_retracing=True, autograph=False)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn  # torch and numpy run eagerly


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

        params = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            loss, aux = loss_fn(params)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        return loss.detach(), aux, grads
    raise NotImplementedError(f"icsviz computes gradients on tensorflow, jax or torch, not {backend}")


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
        import jax.numpy as jnp

        # Keras's JAX trainer donates variable buffers to each train step: keep real copies.
        return [jnp.array(v.value, copy=True) for v in variables]
    return [np.array(v.value, copy=True) for v in variables]


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


def histogram(values: Any, low: Any, width: Any, bins: int) -> Any:
    """Counts of `values` (1-D, finite) in `bins` bins of `width` from `low`.

    Values outside the range fall into the first or last bin; callers choose
    the range so that none do.
    """
    if name() == "tensorflow":
        import tensorflow as tf

        high = low + width * bins
        counts = tf.histogram_fixed_width(values, tf.stack([low, high]), nbins=bins)
        return tf.cast(counts, "int32")
    ops = keras.ops
    index = ops.floor((values - low) / width)
    index = ops.cast(ops.clip(index, 0, bins - 1), "int32")
    ones = ops.ones_like(index)
    return ops.segment_sum(ones, index, num_segments=bins)


def to_numpy(tree: Any) -> Any:
    """Bring a nested structure of device tensors to host numpy arrays."""
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), tree)
