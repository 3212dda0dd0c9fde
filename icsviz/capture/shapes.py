"""Concrete shapes of captured tensors whose traced shape is partly unknown.

The capture plans each tensor from its shape while the function is traced: how many
units and rows it has, which rows to sample. TensorFlow's tracing can lose a
dimension on the way: a string input tokenized by `TextVectorization` goes through
ragged tensors and comes out with an unknown batch size, and so does every layer
after it. The probe is the same at every capture, so such a tensor's shape is too:
one eager pass of the model on the probe, run only when a traced shape has an
unknown dimension, reads it, and the compiled capture checks it when it runs
(`backend.with_static_shape`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from . import backend
from .intercept import Recorder, intercept
from .layers import SelectedLayer

__all__ = ["has_unknown_dimension", "probe_shapes"]


def has_unknown_dimension(shape: Sequence[Any]) -> bool:
    return any(d is None for d in shape)


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
