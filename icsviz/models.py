"""The reference models: Keras's cifar10_cnn, its BatchNormalization twin, Ioffe's MLP.

Input shape and class count follow the data. The BN twins put
BatchNormalization after every Conv2D / Dense and before its activation, and
drop every Dropout, as the seed article did.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

__all__ = ["MODELS", "build_model", "cifar10_cnn", "ioffe_mlp"]


def cifar10_cnn(
    input_shape: tuple[int, ...] = (32, 32, 3), num_classes: int = 10, *, batch_norm: bool = False
) -> keras.Model:
    """The Keras `cifar10_cnn` example network, optionally with BatchNormalization.

    Baseline: Conv32(same)-ReLU, Conv32(valid)-ReLU, MaxPool2, Dropout .25,
    Conv64(same)-ReLU, Conv64(valid)-ReLU, MaxPool2, Dropout .25, Flatten,
    Dense512-ReLU, Dropout .5, Dense-softmax. With `batch_norm`, a
    BatchNormalization follows each Conv2D and Dense (before the activation)
    and all Dropout layers are removed.
    """

    def block(x: keras.KerasTensor, layer: layers.Layer, act: str) -> keras.KerasTensor:
        # Explicit names (conv1, conv1_bn, conv1_relu, ...) pair the twins' layers by name.
        x = layer(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{layer.name}_bn")(x)
        return layers.Activation(act, name=f"{layer.name}_{act}")(x)

    inputs = keras.Input(shape=input_shape, name="image")
    x = block(inputs, layers.Conv2D(32, 3, padding="same", name="conv1"), "relu")
    x = block(x, layers.Conv2D(32, 3, name="conv2"), "relu")
    x = layers.MaxPooling2D(2, name="pool1")(x)
    if not batch_norm:
        x = layers.Dropout(0.25, name="dropout1")(x)
    x = block(x, layers.Conv2D(64, 3, padding="same", name="conv3"), "relu")
    x = block(x, layers.Conv2D(64, 3, name="conv4"), "relu")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    if not batch_norm:
        x = layers.Dropout(0.25, name="dropout2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = block(x, layers.Dense(512, name="fc1"), "relu")
    if not batch_norm:
        x = layers.Dropout(0.5, name="dropout3")(x)
    outputs = block(x, layers.Dense(num_classes, name="logits"), "softmax")
    return keras.Model(inputs, outputs, name="cifar10_cnn_bn" if batch_norm else "cifar10_cnn")


def ioffe_mlp(
    input_shape: tuple[int, ...] = (28, 28, 1), num_classes: int = 10, *, batch_norm: bool = False
) -> keras.Model:
    """Ioffe & Szegedy (2015) Fig. 1: three fully connected sigmoid layers of 100 units.

    With `batch_norm`, BatchNormalization sits between each Dense and its sigmoid.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Flatten(name="flatten")(inputs)
    for i in range(1, 4):
        x = layers.Dense(100, name=f"fc{i}")(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"fc{i}_bn")(x)
        x = layers.Activation("sigmoid", name=f"fc{i}_sigmoid")(x)
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", name="logits_softmax")(x)
    return keras.Model(inputs, outputs, name="ioffe_mlp_bn" if batch_norm else "ioffe_mlp")


MODELS: dict[str, Callable[..., keras.Model]] = {
    "baseline": lambda shape, classes: cifar10_cnn(shape, classes, batch_norm=False),
    "bn": lambda shape, classes: cifar10_cnn(shape, classes, batch_norm=True),
    "mlp": lambda shape, classes: ioffe_mlp(shape, classes, batch_norm=False),
    "mlp-bn": lambda shape, classes: ioffe_mlp(shape, classes, batch_norm=True),
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Build a reference model by name: one of `MODELS`."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}. Received: model={name!r}")
    return MODELS[name](tuple(input_shape), int(num_classes))
