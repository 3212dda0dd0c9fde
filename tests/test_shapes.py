"""Shapes tracing loses: read from one eager pass of the probe, which changes nothing."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from model_zoo import text_vectorization

from icsviz.capture.layers import select_layers
from icsviz.capture.shapes import has_unknown_dimension, probe_shapes, with_probe_batch

L = keras.layers


def test_unknown_dimensions_are_spotted() -> None:
    assert has_unknown_dimension((None, 6, 8))
    assert not has_unknown_dimension((16, 6, 8))
    assert not has_unknown_dimension(())


def test_only_a_lost_batch_axis_of_the_probes_size_is_filled_in() -> None:
    assert with_probe_batch((None, 6, 8), (16, 6, 8), 16) == (16, 6, 8)
    # tf.boolean_mask: the count of kept values depends on the values, not on the probe.
    assert with_probe_batch((None,), (37,), 16) == (None,)
    assert with_probe_batch((None, None), (16, 5), 16) == (None, None)  # another axis unknown
    assert with_probe_batch((None, 6), (16, 7), 16) == (None, 6)  # not the traced tensor's shape
    assert with_probe_batch((None, 6), None, 16) == (None, 6)  # not seen by the eager pass
    assert with_probe_batch((16, None), (16, 6), 16) == (16, None)


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
