"""Concrete shapes of captured tensors whose traced shape is partly unknown.

The capture plans each tensor from its shape while the function is traced: how many
units and rows it has, which rows to sample. TensorFlow's tracing can lose a
dimension on the way: a string input tokenized by `TextVectorization` goes through
ragged tensors and comes out with an unknown batch size, and so does every layer
after it. The probe is the same at every capture, so such a tensor's batch size is
too: one eager pass of the model on the probe, run only when a traced shape has an
unknown dimension, reads it, and the compiled capture checks it when it runs
(`backend.with_static_shape`).

Only the batch axis is taken from the probe, and only where it is the probe's size:
another unknown dimension can depend on the values (`tf.boolean_mask`, a layer
that keeps the positive values), and pinned to the probe's first pass it would
fail a later capture. Such a layer is skipped with a warning, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from . import backend
from .intercept import Recorder, intercept
from .layers import SelectedLayer

__all__ = ["has_unknown_dimension", "probe_shapes", "with_probe_batch"]


def has_unknown_dimension(shape: Sequence[Any]) -> bool:
    return any(d is None for d in shape)


def with_probe_batch(
    traced: tuple[int | None, ...], on_probe: tuple[int, ...] | None, batch: int
) -> tuple[int | None, ...]:
    """`traced` with its unknown batch axis set to `batch`, where that is all it lacks and the
    eager pass saw that shape (`on_probe`); else `traced` unchanged."""
    if on_probe is None or len(on_probe) != len(traced) or not traced or traced[0] is not None:
        return traced
    if has_unknown_dimension(traced[1:]) or tuple(on_probe[1:]) != tuple(traced[1:]) or on_probe[0] != batch:
        return traced
    return (batch, *traced[1:])


def probe_shapes(
    model: keras.Model, selection: Sequence[SelectedLayer], x: Any, training: bool
) -> dict[str, tuple[int, ...]]:
    """{captured tensor name: its shape on the probe `x`}, from one eager pass outside any trace.

    The pass runs in a stateless scope, so it changes nothing in the model (BatchNormalization's
    moving statistics, a seed generator, a stateful RNN's states).
    """
    recorder = Recorder()
    with backend.outside_trace(), intercept(selection, recorder), keras.StatelessScope():
        model(x, training=training)
    shapes: dict[str, tuple[int, ...]] = {}
    for record in recorder.records:
        shape = tuple(record.tensor.shape)
        if record.name not in shapes and not has_unknown_dimension(shape):
            shapes[record.name] = tuple(int(d) for d in shape)
    return shapes
