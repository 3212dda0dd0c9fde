"""Shapes tracing loses: read from one eager pass of the probe, which changes nothing."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from model_zoo import text_vectorization

from icsviz.capture.layers import select_layers
from icsviz.capture.shapes import has_unknown_dimension, probe_shapes

L = keras.layers


def test_unknown_dimensions_are_spotted() -> None:
    assert has_unknown_dimension((None, 6, 8))
    assert not has_unknown_dimension((16, 6, 8))
    assert not has_unknown_dimension(())


def test_the_probe_pass_reads_the_shapes_a_trace_leaves_unknown() -> None:
    keras.utils.set_random_seed(0)
    model, x, _ = text_vectorization()
    probe = x[:16]
    traced_shapes: list[tuple[int | None, ...]] = []
    found: dict[str, tuple[int, ...]] = {}

    @tf.function
    def traced(inputs: tf.Tensor) -> tf.Tensor:
        embedded = model.get_layer("embed")(model.get_layer("tokens")(inputs))
        traced_shapes.append(tuple(embedded.shape))
        # As the capture does while tracing: the pass runs eagerly on the probe.
        found.update(probe_shapes(model, select_layers(model), probe, training=True))
        return embedded

    graph = traced.get_concrete_function(probe).graph
    # Eagerly, outside the function: none of the pass's LSTM is left in its graph to run again.
    assert not [op.name for op in graph.get_operations() if "lstm" in op.name.lower()]
    assert traced_shapes == [(None, 6, 8)]  # the probe's batch of 16 is lost in the ragged tokens
    assert found == {"embed": (16, 6, 8), "lstm": (16, 4), "head:preact": (16, 3), "head": (16, 3)}


def test_the_probe_pass_changes_nothing_in_the_model() -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), L.Dense(7, activation="relu", name="fc"), L.BatchNormalization(name="bn")]
    )
    x = np.random.default_rng(0).normal(size=(12, 5)).astype("float32")
    before = [v.numpy() for v in model.variables]
    shapes = probe_shapes(model, select_layers(model), x, training=True)
    assert shapes == {"fc:preact": (12, 7), "fc": (12, 7), "bn": (12, 7)}
    # In training mode BatchNormalization moves its statistics; in the stateless pass it did not.
    for old, new in zip(before, model.variables):
        np.testing.assert_array_equal(old, new.numpy())
