import keras

from icsviz.models import build_model


def classes(model):
    return [type(layer).__name__ for layer in model.layers]


def test_baseline_is_the_keras_cifar10_cnn() -> None:
    model = build_model("baseline", (32, 32, 3), 10)
    assert model.count_params() == 1_250_858  # the Keras example's count
    assert classes(model) == [
        "InputLayer",
        "Conv2D",
        "Activation",
        "Conv2D",
        "Activation",
        "MaxPooling2D",
        "Dropout",
        "Conv2D",
        "Activation",
        "Conv2D",
        "Activation",
        "MaxPooling2D",
        "Dropout",
        "Flatten",
        "Dense",
        "Activation",
        "Dropout",
        "Dense",
        "Activation",
    ]
    assert [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)] == [
        0.25,
        0.25,
        0.5,
    ]
    assert model.get_layer("conv1").padding == "same" and model.get_layer("conv2").padding == "valid"


def test_bn_twin_normalizes_before_every_activation_and_drops_dropout() -> None:
    model = build_model("bn", (32, 32, 3), 10)
    names = classes(model)
    assert "Dropout" not in names and names.count("BatchNormalization") == 6
    for i, layer in enumerate(model.layers):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            assert isinstance(model.layers[i + 1], keras.layers.BatchNormalization)
            assert isinstance(model.layers[i + 2], keras.layers.Activation)


def test_shapes_follow_the_data() -> None:
    model = build_model("baseline", (28, 28, 1), 7)
    assert model.output_shape == (None, 7) and model.input_shape == (None, 28, 28, 1)


def test_ioffe_mlp() -> None:
    model = build_model("mlp", (28, 28, 1), 10)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [100, 100, 100, 10]
    acts = [layer.activation.__name__ for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    assert acts == ["sigmoid", "sigmoid", "sigmoid", "softmax"]
    assert classes(build_model("mlp-bn", (28, 28, 1), 10)).count("BatchNormalization") == 3
