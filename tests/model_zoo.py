"""A zoo of small Keras models of every layer family, shared by the TF tests and
the JAX subprocess test (which imports this file with KERAS_BACKEND=jax).

Each entry builds (model, x, y). `check_recorded` trains one epoch with the
callback and asserts that the step-0 capture of each layer equals numpy's
statistics of that layer's output computed from the same weights.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers as L

T, F, CLASSES = 6, 5, 3


def _seq_data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, T, F)).astype("float32"), rng.integers(0, CLASSES, n)


def _head() -> L.Layer:
    return L.Dense(CLASSES, activation="softmax", name="head")


def simple_rnn() -> tuple[keras.Model, Any, Any]:
    inputs = keras.Input((T, F))
    h = L.SimpleRNN(8, return_sequences=True, name="rnn_seq")(inputs)
    h = L.SimpleRNN(4, name="rnn_last")(h)
    return keras.Model(inputs, _head()(h)), *_seq_data()


def lstm() -> tuple[keras.Model, Any, Any]:
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            L.LSTM(8, return_sequences=True, name="lstm_seq"),
            L.LSTM(4, name="lstm_last"),
            _head(),
        ]
    )
    return model, *_seq_data()


def gru_with_states() -> tuple[keras.Model, Any, Any]:
    inputs = keras.Input((T, F))
    seq, state = L.GRU(8, return_sequences=True, return_state=True, name="gru")(inputs)
    out, h, c = L.LSTM(4, return_state=True, name="lstm_state")(seq, initial_state=None)
    return keras.Model(inputs, _head()(L.Concatenate()([out, h, c, state]))), *_seq_data()


def bidirectional_time_distributed() -> tuple[keras.Model, Any, Any]:
    model = keras.Sequential(
        [
            keras.Input((T, F)),
            L.Bidirectional(L.LSTM(8, return_sequences=True), name="bilstm"),
            L.TimeDistributed(L.Dense(4, activation="relu"), name="per_step"),
            L.GlobalAveragePooling1D(),
            _head(),
        ]
    )
    return model, *_seq_data()


def time_distributed_cnn() -> tuple[keras.Model, Any, Any]:
    """A CNN applied to every frame of a clip (TimeDistributed of a model), then an LSTM."""
    rng = np.random.default_rng(4)
    frame = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            L.Conv2D(4, 3, activation="relu", name="frame_conv"),
            L.GlobalAveragePooling2D(),
            L.Dense(5, activation="tanh", name="frame_fc"),
        ],
        name="frame_encoder",
    )
    model = keras.Sequential(
        [keras.Input((3, 8, 8, 2)), L.TimeDistributed(frame, name="frames"), L.LSTM(4, name="clip"), _head()]
    )
    return model, rng.normal(size=(32, 3, 8, 8, 2)).astype("float32"), rng.integers(0, CLASSES, 32)


def conv_lstm() -> tuple[keras.Model, Any, Any]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 3, 8, 8, 2)).astype("float32")
    model = keras.Sequential(
        [keras.Input((3, 8, 8, 2)), L.ConvLSTM2D(4, 3, name="convlstm"), L.Flatten(), _head()]
    )
    return model, x, rng.integers(0, CLASSES, 32)


def attention() -> tuple[keras.Model, Any, Any]:
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 50, (64, T)).astype("int32")
    inputs = keras.Input((T,), dtype="int32")
    e = L.Embedding(50, 8, name="embed")(inputs)
    a = L.MultiHeadAttention(2, 4, name="mha")(e, e)
    a = L.LayerNormalization(name="layer_norm")(L.Add(name="residual")([a, e]))
    return keras.Model(inputs, _head()(L.GlobalAveragePooling1D()(a))), ids, rng.integers(0, CLASSES, 64)


def separable_convs() -> tuple[keras.Model, Any, Any]:
    rng = np.random.default_rng(3)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            L.DepthwiseConv2D(3, activation="relu", name="depthwise"),
            L.SeparableConv2D(8, 3, activation="relu", name="separable"),
            L.GroupNormalization(2, name="group_norm"),
            L.GlobalAveragePooling2D(),
            _head(),
        ]
    )
    return model, rng.normal(size=(64, 8, 8, 4)).astype("float32"), rng.integers(0, CLASSES, 64)


def conv1d_prelu() -> tuple[keras.Model, Any, Any]:
    """A 1-D convolution with a fused ELU, a learned-slope PReLU and resampling in between."""
    rng = np.random.default_rng(5)
    model = keras.Sequential(
        [
            keras.Input((12, F)),
            L.Conv1D(6, 3, activation="elu", name="conv1d"),
            L.PReLU(name="prelu"),
            L.UpSampling1D(2),
            L.GlobalMaxPooling1D(),
            _head(),
        ]
    )
    return model, rng.normal(size=(64, 12, F)).astype("float32"), rng.integers(0, CLASSES, 64)


def inline_ops() -> tuple[keras.Model, Any, Any]:
    """A functional model written with `keras.ops` on its tensors: Keras's summary lists each
    operation as a row, and those standing for a layer are captured as one."""
    rng = np.random.default_rng(4)
    inputs = keras.Input((F,))
    h = keras.ops.relu(L.Dense(8, name="dense_a")(inputs))  # captured: an activation
    shortcut = L.Dense(8, name="dense_b")(inputs)
    h = keras.activations.gelu(h + shortcut)  # a merge of two tensors, an activation
    h = keras.ops.rms_normalization(h * 2.0)  # a constant's product: not; a normalization
    return (
        keras.Model(inputs, _head()(h)),
        rng.normal(size=(64, F)).astype("float32"),
        rng.integers(0, CLASSES, 64),
    )


class TransformerBlock(L.Layer):
    """keras.io's transformer block for text classification (without its dropout), written as
    a Layer of layers: they are recorded as `block/att`, ...; the block's own output is norm2's."""

    def __init__(self, dim: int, heads: int, hidden: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.att = L.MultiHeadAttention(heads, dim // heads, name="att")
        self.ffn = keras.Sequential(
            [L.Dense(hidden, activation="relu", name="ffn_in"), L.Dense(dim, name="ffn_out")], name="ffn"
        )
        self.norm1 = L.LayerNormalization(name="norm1")
        self.norm2 = L.LayerNormalization(name="norm2")

    def call(self, x: Any) -> Any:
        out1 = self.norm1(x + self.att(x, x))
        return self.norm2(out1 + self.ffn(out1))

    def expected_parts(self, x: Any) -> dict[str, Any]:
        """Each inner layer's output on `x`, computed one layer at a time."""
        att = self.att(x, x)
        norm1 = self.norm1(x + att)
        ffn_in = self.ffn.layers[0](norm1)
        ffn_out = self.ffn.layers[1](ffn_in)
        norm2 = self.norm2(norm1 + ffn_out)
        return {"att": att, "norm1": norm1, "ffn/ffn_in": ffn_in, "ffn/ffn_out": ffn_out, "norm2": norm2}


class ResidualMLP(L.Layer):
    """x + Dense(x): its own output is no inner layer's, so it is recorded too."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inner = L.Dense(dim, activation="gelu", name="inner")

    def call(self, x: Any) -> Any:
        return x + self.inner(x)

    def expected_parts(self, x: Any) -> dict[str, Any]:
        return {"inner": self.inner(x)}


def composite_layers() -> tuple[keras.Model, Any, Any]:
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 50, (64, T)).astype("int32")
    inputs = keras.Input((T,), dtype="int32")
    h = TransformerBlock(8, 2, 16, name="block")(L.Embedding(50, 8, name="embed")(inputs))
    h = ResidualMLP(8, name="residual_mlp")(L.GlobalAveragePooling1D()(h))
    return keras.Model(inputs, _head()(h)), ids, rng.integers(0, CLASSES, 64)


class Looped(L.Layer):
    """A layer of layers that calls its inner Dense in a `keras.ops.fori_loop`: compiled, the
    Dense's tensors belong to the loop's body and cannot be taken out of it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cell = L.Dense(F, activation="tanh", name="cell")

    def build(self, shape: Any) -> None:
        self.cell.build(shape)

    def call(self, x: Any) -> Any:
        return keras.ops.fori_loop(0, 3, lambda _, h: self.cell(h), x)


def looped_layer() -> tuple[keras.Model, Any, Any]:
    rng = np.random.default_rng(7)
    inputs = keras.Input((F,))
    h = Looped(name="looped")(L.Dense(F, name="stem")(inputs))
    return (
        keras.Model(inputs, _head()(h)),
        rng.normal(size=(64, F)).astype("float32"),
        rng.integers(0, CLASSES, 64),
    )


def text_vectorization() -> tuple[keras.Model, Any, Any]:
    """Raw strings in, tokenized inside the model (TensorFlow only: string tensors). The tokens
    pass through ragged tensors, and TensorFlow's tracing loses the batch size of every layer
    after them (icsviz reads it from the probe: capture/shapes.py)."""
    import tensorflow as tf  # noqa: PLC0415 - TensorFlow only

    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 9))) for _ in range(64)]
    tokens = L.TextVectorization(max_tokens=16, output_sequence_length=T, name="tokens")
    tokens.adapt(texts)
    inputs = keras.Input((1,), dtype="string")
    h = L.Embedding(16, 8, name="embed")(tokens(inputs))
    h = L.LSTM(4, name="lstm")(h)
    x = tf.constant(np.array(texts)[:, None])
    return keras.Model(inputs, _head()(h)), x, rng.integers(0, CLASSES, 64)


ZOO: dict[str, Callable[[], tuple[keras.Model, Any, Any]]] = {
    "simple_rnn": simple_rnn,
    "lstm": lstm,
    "gru_with_states": gru_with_states,
    "bidirectional_time_distributed": bidirectional_time_distributed,
    "conv_lstm": conv_lstm,
    "time_distributed_cnn": time_distributed_cnn,
    "attention": attention,
    "separable_convs": separable_convs,
    "conv1d_prelu": conv1d_prelu,
    "inline_ops": inline_ops,
    "composite_layers": composite_layers,
}

# Models only TensorFlow runs, checked as the zoo's are.
TF_ZOO: dict[str, Callable[[], tuple[keras.Model, Any, Any]]] = {"text_vectorization": text_vectorization}

# What each model must record (beyond the head): its layers' outputs in model order.
EXPECTED: dict[str, list[str]] = {
    "simple_rnn": ["rnn_seq", "rnn_last"],
    "lstm": ["lstm_seq", "lstm_last"],
    "gru_with_states": ["gru[0]", "gru[1]", "lstm_state[0]", "lstm_state[1]", "lstm_state[2]"],
    "bidirectional_time_distributed": ["bilstm", "per_step:preact", "per_step"],
    "conv_lstm": ["convlstm"],
    # The wrapped model's layers, every frame of every clip (not the wrapper: its output is
    # frame_fc's, as a nested model's is its last layer's).
    "time_distributed_cnn": [
        "frames/frame_conv:preact",
        "frames/frame_conv",
        "frames/frame_fc:preact",
        "frames/frame_fc",
        "clip",
    ],
    "attention": ["embed", "mha", "residual", "layer_norm"],
    "separable_convs": ["depthwise:preact", "depthwise", "separable:preact", "separable", "group_norm"],
    "conv1d_prelu": ["conv1d", "prelu"],
    # Keras numbers an operation's name after the ones made before it in the process: "relu_2".
    "inline_ops": ["dense_a", "relu*", "dense_b", "add*", "gelu*", "rms_norm*"],
    # The layers inside layers of the user's own; "block" itself is not recorded apart: its
    # output is norm2's.
    "composite_layers": [
        "embed",
        "block/att",
        "block/norm1",
        "block/ffn/ffn_in",
        "block/ffn/ffn_out",
        "block/norm2",
        "residual_mlp/inner",
        "residual_mlp",
    ],
    # Not the TextVectorization: its integer tokens are the data, not hidden units.
    "text_vectorization": ["embed", "lstm"],
}


def _expected_outputs(model: keras.Model, x: Any) -> dict[str, np.ndarray]:
    """Every layer's output(s) on `x` in training mode, from the current weights."""
    outputs: dict[str, np.ndarray] = {}
    # A functional model's inline operations (keras.ops on its tensors) too.
    for layer in getattr(model, "operations", model.layers):
        if isinstance(layer, L.InputLayer):
            continue
        if isinstance(layer, L.TimeDistributed) and isinstance(layer.layer, keras.Model):
            # Each inner layer on every frame: the frames of all clips as one batch.
            clips = keras.Model(model.inputs[0], layer.input)(x, training=True)
            frames = keras.ops.reshape(clips, (-1, *clips.shape[2:]))
            for inner in layer.layer.layers:
                probe = keras.Model(layer.layer.inputs, inner.output)
                value = probe(frames, training=True)
                outputs[f"{layer.name}/{inner.name}"] = np.asarray(keras.ops.convert_to_numpy(value))
            continue
        tensors = keras.tree.flatten(layer.output)
        probe = keras.Model(model.inputs[0] if len(model.inputs) == 1 else model.inputs, tensors)
        values = probe(x, training=True)
        values = keras.tree.flatten(values)
        if hasattr(layer, "expected_parts"):  # a layer of layers: each of its own, too
            feed = keras.Model(model.inputs[0], layer.input)(x, training=True)
            for part, value in layer.expected_parts(feed).items():
                outputs[f"{layer.name}/{part}"] = np.asarray(keras.ops.convert_to_numpy(value))
        for i, value in enumerate(values):
            suffix = f"[{i}]" if len(tensors) > 1 else ""
            outputs[layer.name + suffix] = np.asarray(keras.ops.convert_to_numpy(value))
    return outputs


def _named(name: str, expected: str) -> bool:
    """`name` is `expected`, or matches it where it ends in "*" ("gru[0]" is a name, not a glob)."""
    return name == expected or (expected.endswith("*") and fnmatch.fnmatchcase(name, expected))


def check_recorded(name: str, path: Path) -> list[str]:
    """Train `name` one epoch with the callback; assert the recorded step-0 values.

    Returns the captured layer names.
    """
    from icsviz import ICSCallback, open_run

    keras.utils.set_random_seed(0)
    model, x, y = {**ZOO, **TF_ZOO}[name]()
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    probe_x, probe_y = x[:32], y[:32]
    expected = _expected_outputs(model, probe_x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x, y, epochs=1, batch_size=16, verbose=0, callbacks=[ICSCallback(path, probe=(probe_x, probe_y))]
        )
    ours = [str(w.message) for w in caught if "icsviz" in str(w.message)]
    assert not ours, ours
    with open_run(path) as run:
        names = run.layer_names
        for layer in EXPECTED[name]:
            assert any(_named(n, layer) for n in names), (layer, names)
        # Nothing else (a Flatten, an operation that is plumbing), but fused pre-activations.
        extra = [
            n for n in names[:-2] if not any(_named(n.removesuffix(":preact"), p) for p in EXPECTED[name])
        ]
        assert not extra, (extra, names)
        for layer in names:
            if layer not in expected:
                continue  # pre-activations: checked by the program tests
            values = expected[layer].astype("float64")
            units = values.reshape(-1, values.shape[-1])
            acts = run.activations(layer)
            assert acts.counts[0].sum() == values.size, layer
            np.testing.assert_allclose(
                [acts.mean[0], acts.std[0], acts.min[0], acts.max[0]],
                [values.mean(), values.std(), values.min(), values.max()],
                rtol=2e-4,
                atol=2e-5,
                err_msg=layer,
            )
            np.testing.assert_allclose(acts.unit_mean[0], units.mean(0), rtol=2e-4, atol=2e-5, err_msg=layer)
        # Every variable's gradient is measured, recurrent kernels included.
        for variable in run.variable_names:
            assert np.isfinite(run.gradients(variable).grad_norm).all(), variable
    return names


# ---------------------------------------------------------------- a GAN (submodel=)
LATENT = 4


class GAN(keras.Model):
    """keras.io's DCGAN, shrunk: a model with no `call`, whose `train_step` trains two models with
    optimizers of its own (`super().compile()` gives the model one that never steps). The step
    is written per backend, as keras.io's guides write it: TensorFlow's with tf.GradientTape,
    torch's with `backward()`."""

    def __init__(self, discriminator: keras.Model, generator: keras.Model) -> None:
        super().__init__(name="gan")
        self.discriminator, self.generator = discriminator, generator
        self.seed_generator = keras.random.SeedGenerator(1)

    def compile(self, d_optimizer: Any, g_optimizer: Any, loss_fn: Any) -> None:  # type: ignore[override]
        super().compile()
        self.d_optimizer, self.g_optimizer, self.loss_fn = d_optimizer, g_optimizer, loss_fn

    def _images_and_labels(self, real: Any) -> tuple[Any, Any, Any]:
        n = keras.ops.shape(real)[0]
        fake = self.generator(keras.random.normal((n, LATENT), seed=self.seed_generator))
        images = keras.ops.concatenate([fake, keras.ops.convert_to_tensor(real)])
        labels = keras.ops.concatenate([keras.ops.ones((n, 1)), keras.ops.zeros((n, 1))])
        return n, images, labels

    def train_step(self, real: Any) -> dict[str, Any]:
        if keras.backend.backend() == "torch":
            return self._torch_step(real)
        import tensorflow as tf  # noqa: PLC0415

        n, images, labels = self._images_and_labels(real)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(images))
        weights = self.discriminator.trainable_weights
        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, weights), weights))
        with tf.GradientTape() as tape:
            z = keras.random.normal((n, LATENT), seed=self.seed_generator)
            g_loss = self.loss_fn(keras.ops.zeros((n, 1)), self.discriminator(self.generator(z)))
        weights = self.generator.trainable_weights
        self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, weights), weights))
        return {"d_loss": d_loss, "g_loss": g_loss}

    def _torch_step(self, real: Any) -> dict[str, Any]:
        import torch  # noqa: PLC0415

        n, images, labels = self._images_and_labels(real)
        self.zero_grad()
        d_loss = self.loss_fn(labels, self.discriminator(images))
        d_loss.backward()
        weights = self.discriminator.trainable_weights
        with torch.no_grad():
            self.d_optimizer.apply([v.value.grad for v in weights], weights)
        self.zero_grad()
        z = keras.random.normal((n, LATENT), seed=self.seed_generator)
        g_loss = self.loss_fn(keras.ops.zeros((n, 1)), self.discriminator(self.generator(z)))
        g_loss.backward()
        weights = self.generator.trainable_weights
        with torch.no_grad():
            self.g_optimizer.apply([v.value.grad for v in weights], weights)
        return {"d_loss": d_loss, "g_loss": g_loss}


def gan() -> GAN:
    """The GAN, compiled, on TensorFlow or torch."""
    keras.utils.set_random_seed(0)
    discriminator = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            L.Conv2D(4, 3, padding="same", name="d_conv"),
            L.LeakyReLU(0.2, name="d_act"),
            L.Flatten(),
            L.Dense(1, name="d_out"),
        ],
        name="discriminator",
    )
    generator = keras.Sequential(
        [
            keras.Input((LATENT,)),
            L.Dense(2 * 2 * 4, name="g_fc"),
            L.BatchNormalization(name="g_bn"),
            L.ReLU(name="g_relu"),
            L.Reshape((2, 2, 4)),
            L.Conv2DTranspose(1, 3, strides=2, padding="same", activation="sigmoid", name="g_out"),
        ],
        name="generator",
    )
    model = GAN(discriminator, generator)
    model.built = True  # nothing to build: Keras's torch trainer would call the missing `call`
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.optimizers.Adam(1e-2),
        keras.losses.BinaryCrossentropy(from_logits=True),
    )
    return model
