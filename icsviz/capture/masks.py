"""Keras masks on the probe: which positions of a captured tensor are padding.

`Embedding(mask_zero=True)` and `Masking` attach a mask to their output, and the
layers after them pass it on (an LSTM's output over every time step, a Dense
applied per time step). The padded positions hold no data: an Embedding repeats
the padding index's vector there, an LSTM returning sequences repeats its last
output (zeros with `zero_output_for_mask=True`). Counted, they weigh the
distributions by the padding (a spike, or the last step's values counted again),
not by training.
The probe is the same at every capture, so its masks are too: they are read once,
in one pass of the model outside the compiled capture, and each tensor's plan
keeps only its data rows (`stats.plan_tensor`). The per-step mode reads each
training batch's mask inside the step (`batch_stats.tensor_sample`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from . import backend
from .intercept import PREACT, Recorder, intercept
from .layers import SelectedLayer, iter_layers

__all__ = ["makes_masks", "probe_masks", "keras_mask", "output_name"]


def output_name(name: str) -> str:
    """The captured output a tensor shares its positions with: itself, or for a fused layer's
    pre-activation ("dense:preact#2") the layer's output ("dense#2")."""
    return name.replace(PREACT, "", 1)


def _mask_of(tensor: Any) -> Any:
    from keras.src.backend.common.masking import get_keras_mask  # noqa: PLC0415 - not public API

    return get_keras_mask(tensor)


def keras_mask(record: Any) -> Any:
    """The Keras mask a recorded tensor (an intercept.Record, or None) carries, or None."""
    return None if record is None else _mask_of(record.tensor)


def makes_masks(model: keras.Model) -> bool:
    """Whether a layer of `model` can start a mask: an Embedding with `mask_zero`, a Masking
    layer, or a layer of the user's own with a `compute_mask` (Keras's own layers only pass
    masks on)."""
    for _, layer in iter_layers(model):
        if getattr(layer, "mask_zero", False) or isinstance(layer, keras.layers.Masking):
            return True
        compute_mask = getattr(type(layer), "compute_mask", None)
        if compute_mask is not None and not type(layer).__module__.startswith("keras."):
            if compute_mask is not keras.layers.Layer.compute_mask:
                return True
    return False


def probe_masks(model: keras.Model, selection: Sequence[SelectedLayer], x: Any) -> dict[str, np.ndarray]:
    """{captured tensor name: its Keras mask on the probe `x`} for the tensors that carry one
    (a fused layer's pre-activation takes its output's); empty when no layer makes masks.

    The pass runs in inference mode (masks do not depend on it) and in a stateless scope, so it
    changes nothing in the model (a stateful RNN's states, a layer's counters).
    """
    if not makes_masks(model):
        return {}
    recorder = Recorder()
    # In a stateless scope, as the capture runs: a stateful RNN's states stay as they were.
    with intercept(selection, recorder), keras.StatelessScope():
        model(x, training=False)
    masks: dict[str, np.ndarray] = {}
    for record in recorder.records:
        mask = keras_mask(record)
        if mask is not None and record.name not in masks:
            masks[record.name] = np.asarray(backend.to_numpy(mask)).astype(bool)
    for record in recorder.records:
        output = output_name(record.name)
        if output != record.name and output in masks and record.name not in masks:
            masks[record.name] = masks[output]
    return masks
