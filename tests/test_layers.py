from __future__ import annotations

import keras
import pytest

from icsviz import CaptureWarning
from icsviz.capture.layers import classify, iter_layers, layer_filters, select_layers
from icsviz.models import build_model


def names(selection):
    return [(s.name, s.kind) for s in selection]


def test_default_selection_of_the_reference_cnn() -> None:
    model = build_model("baseline", (32, 32, 3), 10)
    selected = names(select_layers(model))
    assert [n for n, _ in selected] == [
        "conv1",
        "conv1_relu",
        "conv2",
        "conv2_relu",
        "conv3",
        "conv3_relu",
        "conv4",
        "conv4_relu",
        "fc1",
        "fc1_relu",
        "logits",
        "logits_softmax",
    ]
    assert dict(selected)["conv1"] == "linear" and dict(selected)["conv1_relu"] == "activation"
    bn = dict(names(select_layers(build_model("bn", (32, 32, 3), 10))))
    assert bn["conv1_bn"] == "normalization" and "dropout1" not in bn


def test_plumbing_is_never_selected_by_default() -> None:
    for layer in (
        keras.layers.Dropout(0.5),
        keras.layers.Flatten(),
        keras.layers.Reshape((4,)),
        keras.layers.MaxPooling2D(),
        keras.layers.Concatenate(),
        keras.layers.GaussianNoise(0.1),
    ):
        assert classify(layer) is None, layer
    assert classify(keras.layers.Add()) == "merge"
    assert classify(keras.layers.LayerNormalization()) == "normalization"


def nested_model() -> keras.Model:
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(4, name="d")(inner_in), name="block")
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, name="d0")(inputs)
    return keras.Model(inputs, inner(x), name="outer")


def test_nested_models_are_flattened_with_paths() -> None:
    model = nested_model()
    assert [n for n, _ in iter_layers(model)] == ["d0", "block/d"]
    assert [s.name for s in select_layers(model)] == ["d0", "block/d"]


def test_layers_of_the_users_own_layers_are_walked_and_keras_own_are_not() -> None:
    import model_zoo

    model, _, _ = model_zoo.composite_layers()
    walked = [n for n, _ in iter_layers(model) if not n.startswith("global_average_pooling1d")]
    # The block's layers in the order its author assigned them, a nested model's with paths,
    # then the block itself (recorded where its output is not one of theirs).
    assert walked == [
        "embed",
        "block/att",
        "block/ffn/ffn_in",
        "block/ffn/ffn_out",
        "block/norm1",
        "block/norm2",
        "block",
        "residual_mlp/inner",
        "residual_mlp",
        "head",
    ]
    selected = dict(names(select_layers(model)))
    assert selected["block/att"] == "attention" and selected["block/ffn/ffn_in"] == "linear"
    assert selected["block"] == "other" and selected["residual_mlp"] == "other"
    # A filter reaches into them as into a nested model.
    assert [s.name for s in select_layers(model, ["block/norm*"])] == ["block/norm1", "block/norm2"]

    class WithGate(keras.layers.Dense):  # a Dense of the user's own that holds a layer: a Dense
        def __init__(self, units: int, **kwargs) -> None:
            super().__init__(units, **kwargs)
            self.gate = keras.layers.Dense(units, activation="sigmoid")

        def call(self, x):
            return super().call(x) * self.gate(x)

    inputs = keras.Input((6,))
    h = keras.layers.MultiHeadAttention(2, 3, name="mha")(inputs[:, None], inputs[:, None])
    h = keras.layers.Bidirectional(keras.layers.LSTM(3), name="bi")(h)
    model = keras.Model(inputs, WithGate(4, name="gated")(h))
    assert [n for n, _ in iter_layers(model) if "/" in n] == []
    assert {"mha", "bi", "gated"} <= {n for n, _ in iter_layers(model)}


def test_filters_by_name_glob_class_and_predicate() -> None:
    model = build_model("bn", (32, 32, 3), 10)
    assert [s.name for s in select_layers(model, ["conv1", "fc1"])] == ["conv1", "fc1"]
    assert [s.name for s in select_layers(model, ["conv*_bn"])] == [f"conv{i}_bn" for i in range(1, 5)]
    assert len(select_layers(model, [keras.layers.BatchNormalization])) == 6
    assert [s.name for s in select_layers(model, [lambda layer: layer.name == "flatten"])] == ["flatten"]
    nested = nested_model()
    assert [s.name for s in select_layers(nested, ["block/*"])] == ["block/d"]


def test_one_filter_on_its_own_is_a_list_of_one() -> None:
    model = build_model("bn", (32, 32, 3), 10)
    for single in ("conv*_bn", keras.layers.BatchNormalization, lambda layer: layer.name.endswith("_bn")):
        assert [s.name for s in select_layers(model, single)] == [
            s.name for s in select_layers(model, [single])
        ]
    assert len(select_layers(model, keras.layers.BatchNormalization)) == 6
    assert layer_filters("fc1") == ["fc1"] and layer_filters(None) is None
    with pytest.raises(ValueError, match="Received: 3"):
        layer_filters(["fc1", 3])


def test_unmatched_filter_entries_warn_with_the_layer_list() -> None:
    model = build_model("mlp", (28, 28, 1), 10)
    with pytest.warns(CaptureWarning, match=r"'conv9'.*fc1"):
        selected = select_layers(model, ["fc1", "conv9"])
    assert [s.name for s in selected] == ["fc1"]
    with pytest.raises(ValueError, match="Received: 3"):
        select_layers(model, [3])


def test_fused_activation_gets_a_preactivation_capture() -> None:
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="relu", name="d")(inputs))
    (sel,) = select_layers(model)
    assert sel.capture_preactivation
    plain = keras.Model(inputs, keras.layers.Dense(2, name="e")(inputs))
    assert not select_layers(plain)[0].capture_preactivation
    act = keras.Model(inputs, keras.layers.Activation("relu", name="a")(inputs))
    assert not select_layers(act)[0].capture_preactivation


def test_interception_records_its_own_thread_only_and_one_at_a_time() -> None:
    import threading

    import numpy as np

    from icsviz.capture.intercept import Recorder, intercept

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="relu", name="d")(inputs))
    selection = select_layers(model, None)
    x = np.ones((2, 4), "float32")
    mine, other = Recorder(), Recorder()
    entered, events = threading.Event(), []

    def elsewhere() -> None:
        model(x)  # a call from another thread while ours intercepts: passes through, unrecorded
        entered.set()
        with intercept(selection, other):  # waits until ours is done
            events.append("other intercepts")
            model(x)

    with intercept(selection, mine):
        thread = threading.Thread(target=elsewhere)
        thread.start()
        assert entered.wait(30)
        model(x)
        events.append("mine done")
    thread.join(30)
    assert [r.name for r in mine.records] == ["d:preact", "d"]
    assert events == ["mine done", "other intercepts"]
    assert [r.name for r in other.records] == ["d:preact", "d"]
    assert "call" not in model.get_layer("d").__dict__  # restored after both


def _clip_model(steps: int | None = 3):
    frame = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="relu", name="fc")], name="frame_model"
    )
    clips = keras.Input((steps, 4))
    wrapped = keras.layers.TimeDistributed(frame, name="frames")
    per_step = keras.layers.TimeDistributed(keras.layers.Dense(2, activation="tanh"), name="per_step")
    return keras.Model(clips, per_step(wrapped(clips))), wrapped


def test_a_model_in_time_distributed_is_a_nested_model_run_on_every_step() -> None:
    import numpy as np

    from icsviz.capture.intercept import Recorder, intercept

    model, wrapped = _clip_model()
    assert [n for n, _ in iter_layers(model)] == ["frames/fc", "frames", "per_step"]
    selection = select_layers(model, None)
    # The wrapper of a model is not recorded (its output is its last layer's); the wrapped
    # Dense's activation is fused, so TimeDistributed(Dense(tanh)) has a pre-activation.
    assert [(s.name, s.capture_preactivation) for s in selection] == [("frames/fc", True), ("per_step", True)]
    assert selection[0].time_distributed is wrapped and selection[1].time_distributed is None
    x = np.arange(2 * 3 * 4, dtype="float32").reshape(2, 3, 4) / 10
    recorder = Recorder()
    with intercept(selection, recorder):
        model(x)
    # Every step of every sample in one tensor each, not one per step ("frames/fc#2", ...).
    assert [r.name for r in recorder.records] == [
        "frames/fc:preact",
        "frames/fc",
        "per_step:preact",
        "per_step",
    ]
    fc = model.get_layer("frames").layer.get_layer("fc")
    expected = np.asarray(fc(x.reshape(6, 4)))
    got = np.asarray(recorder.records[1].tensor)
    assert got.shape == (6, 3)
    np.testing.assert_allclose(np.sort(got, axis=None), np.sort(expected, axis=None), rtol=1e-6)
    assert "call" not in wrapped.__dict__  # restored


def test_steps_mapped_over_an_unknown_time_axis_are_left_out_and_named() -> None:
    from icsviz.capture.intercept import Recorder

    model, _ = _clip_model()
    fc = select_layers(model, None)[0]
    recorder = Recorder()
    # Keras vectorizes the wrapped layer over a time axis of unknown length: what it makes
    # inside cannot be used outside.
    recorder.enter_frames(static=False)
    recorder.add(fc, keras.ops.ones((2, 3)), "activation", tag=":preact")
    recorder.add(fc, keras.ops.ones((2, 3)), "linear")
    assert recorder.leave_frames() == ["frames/fc:preact", "frames/fc"]
    assert recorder.records == []
    # A known number of steps: joined; a second call of the wrapper is "#2", as a shared layer's.
    for _ in range(2):
        recorder.enter_frames(static=True)
        for _ in range(3):
            recorder.add(fc, keras.ops.ones((2, 3)), "linear")
        assert recorder.leave_frames() == []
    assert [(r.name, tuple(r.tensor.shape)) for r in recorder.records] == [
        ("frames/fc", (6, 3)),
        ("frames/fc#2", (6, 3)),
    ]


def _inline_ops_model() -> keras.Model:
    """A residual block written with keras.ops on the tensors, nested in an outer model."""
    inputs = keras.Input((4,))
    h = keras.ops.relu(keras.layers.Dense(4, name="d1")(inputs))
    shortcut = keras.layers.Dense(4, name="d2")(inputs)
    h = keras.activations.gelu(h + shortcut)  # a merge, then an activation
    h = keras.ops.tanh(h * 2.0 + 1.0)  # scaled by constants: plumbing; tanh: an activation
    h = keras.ops.reshape(h, (-1, 2, 2))  # plumbing
    block = keras.Model(inputs, h, name="block")
    outer_in = keras.Input((4,))
    return keras.Model(outer_in, keras.ops.sigmoid(block(outer_in)), name="outer")


def test_inline_operations_are_captured_as_the_layers_they_stand_for() -> None:
    model = _inline_ops_model()
    by_class = {type(s.layer).__name__: (s.name, s.kind) for s in select_layers(model)}
    assert [s.name.split("/")[0] for s in select_layers(model)] == ["block"] * 6 + [by_class["Sigmoid"][0]]
    assert {cls: kind for cls, (_, kind) in by_class.items()} == {
        "Dense": "linear",  # d1 and d2, one key
        "Relu": "activation",
        "Add": "merge",  # h + shortcut: two tensors
        "Gelu": "activation",
        "Tanh": "activation",
        "Sigmoid": "activation",
    }
    assert not any(s.capture_preactivation for s in select_layers(model))
    # The constant's product and sum, and the reshape, are there to be chosen by name.
    walked = {type(layer).__name__ for _, layer in iter_layers(model)}
    assert {"Multiply", "Add", "Reshape"} <= walked
    (scaled,) = select_layers(model, ["block/multiply*"])
    assert scaled.kind == "other" and type(scaled.layer).__name__ == "Multiply"
    # A class filter is a layer class: an operation never is one.
    assert [s.name for s in select_layers(model, keras.layers.Dense)] == ["block/d1", "block/d2"]


def test_inline_operations_are_recorded_with_their_values(tmp_path) -> None:
    import numpy as np

    from icsviz import ICSCallback, open_run

    keras.utils.set_random_seed(0)
    model = _inline_ops_model()
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = np.zeros((16, 2, 2), "float32")
    tanh_op = next(layer for _, layer in iter_layers(model) if type(layer).__name__ == "Tanh")
    block = model.get_layer("block")
    expected = keras.Model(block.inputs[0], tanh_op.output)(x)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ICSCallback(tmp_path / "ops.h5", probe=(x, y))])
    with open_run(tmp_path / "ops.h5") as run:
        acts = run.activations(f"block/{tanh_op.name}")
        assert acts.counts[0].sum() == 16 * 4
        np.testing.assert_allclose(acts.mean[0], float(np.mean(expected)), rtol=1e-5)
        np.testing.assert_allclose(acts.max[0], float(np.max(expected)), rtol=1e-5)
        # Which captured tensors feed which: the add is fed by the relu and d2.
        add = next(info for info in run.layers if info.class_name == "Add")
        relu = next(info for info in run.layers if info.class_name == "Relu")
        assert set(add.inputs) == {relu.name, "block/d2"} and relu.inputs == ("block/d1",)


def test_a_chosen_layer_whose_output_is_not_floating_point_is_named_in_a_warning() -> None:
    import numpy as np

    from icsviz.capture.intercept import Recorder, intercept

    inputs = keras.Input((8,))
    h = keras.layers.Dense(4, name="scores")(inputs)
    chosen = keras.ops.one_hot(keras.ops.argmax(h, axis=-1), 4)  # argmax: int32
    model = keras.Model(inputs, chosen)
    selection = select_layers(model, ["argmax*", "one_hot*"])
    assert [s.kind for s in selection] == ["other", "other"]
    recorder = Recorder()
    with pytest.warns(
        CaptureWarning, match=r"'argmax[_0-9]*' is not recorded: its output is int32"
    ) as caught:
        with intercept(selection, recorder):
            model(np.ones((2, 8), "float32"))
    assert len([w for w in caught if issubclass(w.category, CaptureWarning)]) == 1
    assert [r.name for r in recorder.records] == [selection[1].name]  # the one-hot, float
