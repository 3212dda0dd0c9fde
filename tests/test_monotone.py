"""Which maps let a capture take a tensor's range from its input's (capture/monotone.py)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from icsviz.capture.monotone import activation_map, layer_map


@pytest.mark.parametrize("name", ["relu", "relu6", "leaky_relu", "linear"])
def test_keras_exact_monotone_activations_map_the_range(name) -> None:
    fn = keras.activations.get(name)
    assert activation_map(fn) is fn
    x = np.linspace(-9, 9, 37, dtype="float32")
    y = keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(x)))
    ends = keras.ops.convert_to_numpy(fn(keras.ops.convert_to_tensor(np.asarray([x.min(), x.max()]))))
    np.testing.assert_array_equal(ends, [y.min(), y.max()])  # bit for bit, one value or many


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "elu", "gelu", "softmax", "swish"])
def test_approximated_or_non_monotone_activations_do_not(name) -> None:
    assert activation_map(keras.activations.get(name)) is None


def test_a_users_own_function_named_relu_does_not() -> None:
    def relu(x):
        return -x

    assert activation_map(relu) is None
    assert activation_map(lambda x: x) is None


def test_activation_layers_map_with_their_own_call() -> None:
    relu6 = keras.layers.ReLU(6.0)
    assert layer_map(relu6, relu6.call) == relu6.call
    leaky = keras.layers.LeakyReLU(0.1)
    assert layer_map(leaky, leaky.call) == leaky.call
    act = keras.layers.Activation("relu")
    assert layer_map(act, act.call) is keras.activations.relu
    assert layer_map(keras.layers.Activation("tanh"), act.call) is None
    assert layer_map(keras.layers.Dense(3, activation="relu"), act.call) is None  # its call is more


def test_a_relu_made_non_monotone_after_construction_or_subclassed_does_not() -> None:
    shifted = keras.layers.ReLU()
    shifted.threshold = -1.0  # below the threshold it maps to ~0, above it: jumps down at -1
    assert layer_map(shifted, shifted.call) is None

    class Mine(keras.layers.ReLU):
        def call(self, inputs):
            return -super().call(inputs)

    mine = Mine()
    assert layer_map(mine, mine.call) is None


def test_an_activation_whose_name_cannot_be_read_is_still_recorded() -> None:
    from icsviz.capture.intercept import Recorder, intercept
    from icsviz.capture.layers import select_layers

    class Odd:
        def __call__(self, x):
            return x

        def __getattr__(self, name):
            raise RuntimeError(f"no {name} here")

    inputs = keras.Input((4,))
    model = keras.Model(
        inputs, keras.layers.Activation(Odd(), name="odd")(keras.layers.Dense(4, name="d")(inputs))
    )
    recorder = Recorder()
    with intercept(select_layers(model), recorder):  # no shortcut for it, and no error
        model(np.ones((2, 4), "float32"))
    assert [r.name for r in recorder.records] == ["d", "odd"]
    assert recorder.records[1].range_map is None
