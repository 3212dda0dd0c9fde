"""Elementwise maps whose output range follows exactly from their input's.

A capture takes every budget-cut tensor's range over all of its values (two
passes over the tensor, more than half of the reference CNN's statistics on a
CPU). For an output that is an elementwise, non-decreasing map f of a tensor
that is captured too (ReLU after a convolution or a BatchNormalization), that
is not needed: min f(x) = f(min x) and max f(x) = f(max x), and f finite on a
finite input. The maps listed here are exactly that in floating point as well:
they compare, clip and scale by a constant (correctly rounded, so still
non-decreasing), and the same operation on one value gives the same result as
on a whole tensor. Activations computed by approximation (tanh, sigmoid, ELU)
are left out: a scalar and a vector can take different code paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

__all__ = ["activation_map", "layer_map"]

RangeMap = Callable[[Any], Any]

_EXACT_ACTIVATIONS = ("relu", "relu6", "leaky_relu", "linear")


def activation_map(activation: Any) -> RangeMap | None:
    """`activation` itself when it is one of Keras's exact monotone activations, else None."""
    name = getattr(activation, "__name__", None)
    if name not in _EXACT_ACTIVATIONS:
        return None
    try:
        known = keras.activations.get(name)
    except ValueError:
        return None
    return activation if activation is known else None  # the user's own `relu` may be anything


def layer_map(layer: Any, call: RangeMap) -> RangeMap | None:
    """The map a Keras activation layer applies (its own `call`), when it is exact and
    non-decreasing; None for any other layer, including subclasses (their `call` may differ)."""
    kind = type(layer)
    if kind is keras.layers.Activation:
        return activation_map(layer.activation)
    if kind is keras.layers.ReLU:
        slope, threshold = float(layer.negative_slope), float(layer.threshold)
        # A negative threshold makes the map jump down at the threshold: not monotone.
        return call if slope >= 0 and threshold >= 0 else None
    if kind is keras.layers.LeakyReLU:
        return call if float(layer.negative_slope) >= 0 else None
    return None
