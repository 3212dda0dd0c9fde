"""Taking the probe batch and checking that it fits the model (capture/probe.py)."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from icsviz import CaptureWarning, ICSCallback
from icsviz.capture.probe import mismatch, nonfinite, split_probe


def dense(input_shape: tuple[int | None, ...]) -> keras.Model:
    # a Dense on every step of a sequence of any length, or on the flattened sample
    flat = [] if None in input_shape else [keras.layers.Flatten()]
    return keras.Sequential([keras.Input(input_shape), *flat, keras.layers.Dense(3)], name="net")


class Subclassed(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(x)


def test_a_probe_that_fits_is_accepted_as_keras_accepts_it() -> None:
    rng = np.random.default_rng(0)
    cases = [
        ((12,), (5, 12)),
        ((None, 8), (5, 7, 8)),  # any sequence length
        ((28, 28), (5, 28, 28, 1)),  # Keras drops a trailing axis of 1 itself
        ((28, 28, 1), (5, 28, 28)),  # and adds one
    ]
    for input_shape, probe_shape in cases:
        model = dense(input_shape)
        x = rng.normal(size=probe_shape).astype("float32")
        assert mismatch(model, x) is None, (input_shape, probe_shape)
        out = model(x)  # Keras takes it: the check never refuses what works
        assert out.shape[0] == 5 and out.shape[-1] == 3


def test_a_probe_of_the_wrong_shape_is_named_with_both_shapes() -> None:
    model = dense((12,))
    x = np.zeros((5, 10), "float32")
    assert mismatch(model, x) == "model 'net' takes shape (None, 12), the probe's x has shape (5, 10)"
    with pytest.raises(ValueError):
        model(x)  # what the check spares the user: Keras's long error from inside the layer
    assert mismatch(dense((4, 4)), np.zeros((5, 4, 4, 3))) is not None


def test_one_sample_from_an_unbatched_dataset_is_named_with_the_fix() -> None:
    import tensorflow as tf

    x = np.zeros((20, 12), "float32")
    probe_x, _, _ = split_probe(tf.data.Dataset.from_tensor_slices((x, np.zeros(20))))
    problem = mismatch(dense((12,)), np.asarray(probe_x))
    assert problem == (
        "model 'net' takes shape (None, 12), the probe's x has shape (12,) (one sample, not a "
        "batch: from an unbatched dataset? pass probe=dataset.batch(512))"
    )
    assert "one sample" not in mismatch(dense((12,)), np.zeros((5, 10)))


def test_models_whose_inputs_are_not_one_declared_shape_are_left_to_keras() -> None:
    assert mismatch(Subclassed(), np.zeros((5, 10))) is None
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    two = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    assert mismatch(two, {"a": np.zeros((5, 3)), "b": np.zeros((5, 2))}) is None


def test_split_probe() -> None:
    x, y = np.zeros((4, 2)), np.ones(4)
    assert split_probe((x, y))[1] is y and split_probe(x)[1] is None and split_probe([x])[0] is x
    with pytest.raises(ValueError, match="probe=None"):
        split_probe(None)
    labels = split_probe((x, [0, 2, 1, 1]))[1]  # labels as a plain list, as fit takes them
    assert isinstance(labels, np.ndarray) and labels.tolist() == [0, 2, 1, 1]
    two_inputs = split_probe(([x, x], y))[0]  # a list of arrays stays a list: several inputs
    assert isinstance(two_inputs, list) and len(two_inputs) == 2
    weights = np.full(4, 0.5)
    assert split_probe((x, y, weights))[2] is weights and split_probe((x, y))[2] is None


def test_a_probe_with_sample_weights_records_the_weighted_gradients(tmp_path) -> None:
    from icsviz import open_run

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 12)).astype("float32"), rng.integers(0, 3, 64)
    weights = np.where(y == 0, 4.0, 0.25).astype("float32")
    norms = {}
    for name, probe in {"plain": (x[:16], y[:16]), "weighted": (x[:16], y[:16], weights[:16])}.items():
        keras.utils.set_random_seed(0)
        model = dense((12,))
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=1, verbose=0, callbacks=[ICSCallback(tmp_path / f"{name}.h5", probe=probe)])
        with open_run(tmp_path / f"{name}.h5") as run:
            assert run.config["probe_has_sample_weights"] == (name == "weighted")
            norms[name] = run.gradients(run.variable_names[0]).grad_norm
    # The same model and probe: only the loss's weights differ, and so do its gradients.
    assert np.all(np.abs(norms["weighted"] - norms["plain"]) > 1e-4)


def test_sample_weights_without_labels_are_refused_with_the_fix(tmp_path) -> None:
    x = np.zeros((4, 12), "float32")
    with pytest.raises(ValueError, match=r"no labels.*probe=\(x, y, sample_weight\)"):
        ICSCallback(tmp_path / "r.h5", probe=(x, None, np.ones(4)))


def test_labels_given_as_a_list_give_the_gradient_statistics(tmp_path) -> None:
    from icsviz import open_run

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 12)).astype("float32"), rng.integers(0, 3, 64)
    model = dense((12,))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)  # it used to fail: y read as 16 scalars
        model.fit(
            x,
            y,
            epochs=1,
            verbose=0,
            callbacks=[ICSCallback(tmp_path / "r.h5", probe=(x[:16], list(y[:16])))],
        )
    with open_run(tmp_path / "r.h5") as run:
        grads = run.gradients(run.variable_names[0])
        assert np.isfinite(grads.grad_norm).all() and (grads.grad_norm > 0).all()


def test_a_probe_that_does_not_fit_is_one_plain_warning_and_training_goes_on(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 12)).astype("float32"), rng.integers(0, 3, 64)
    model = dense((12,))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = ICSCallback(tmp_path / "r.h5", probe=(x[:16, :10], y[:16]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(history.history["loss"]) == 2
    assert len(ours) == 1, ours
    assert "takes shape (None, 12), the probe's x has shape (16, 10)" in ours[0]
    assert "\x1b" not in ours[0]


def test_labels_or_weights_for_other_samples_than_the_inputs_are_refused_with_the_fix(tmp_path) -> None:
    # Keras's own error came later, as a warning from inside the first capture's loss.
    x, y = np.zeros((64, 12), "float32"), np.zeros(64, "int64")
    with pytest.raises(ValueError, match=r"probe's labels \(y\) hold 32 samples and its inputs \(x\) 64"):
        ICSCallback(tmp_path / "r.h5", probe=(x, y[:32]))
    with pytest.raises(ValueError, match=r"probe's sample weights hold 63 samples and its inputs \(x\) 64"):
        ICSCallback(tmp_path / "r.h5", probe=(x, y, np.ones(63)))
    with pytest.raises(ValueError, match=r"probe's labels \(y\) hold 3 samples"):
        ICSCallback(tmp_path / "r.h5", probe=({"a": x, "b": x}, {"out": y[:3]}))


def test_non_finite_values_in_the_probe_are_named_by_sample() -> None:
    x = np.zeros((64, 4, 3), "float32")
    assert nonfinite(x, "inputs (x)") is None
    x[3, 0, 1], x[3, 2, 2], x[40, 1, 0] = np.nan, np.inf, -np.inf
    assert nonfinite(x, "inputs (x)") == (
        "the probe's inputs (x) hold 3 non-finite values, in 2 of its 64 samples (samples 3, 40)"
    )
    y = np.zeros(64, "float32")
    y[7] = np.nan
    # Both inputs of a two-input model count; token ids and strings have no NaN to hold.
    assert nonfinite({"a": np.zeros((64, 2)), "b": x}, "inputs (x)").startswith(
        "the probe's inputs (x) hold 3"
    )
    assert nonfinite(y, "labels (y)").endswith("hold 1 non-finite values, in 1 of its 64 samples (sample 7)")
    assert nonfinite(np.arange(64), "inputs (x)") is None
    assert nonfinite(np.array(["a b"] * 64), "inputs (x)") is None
    many = np.full((64, 2), np.nan)
    assert nonfinite(many, "labels (y)").endswith("in 64 of its 64 samples (samples 0, 1, 2, 3, 4, ...)")


def test_a_probe_with_nan_is_one_warning_at_once_and_its_run_records_them(tmp_path) -> None:
    from icsviz import open_run

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 12)).astype("float32"), rng.integers(0, 3, 64)
    probe = x[:16].copy()
    probe[5, 2] = np.nan
    model = dense((12,))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.warns(CaptureWarning, match=r"inputs \(x\) hold 1 non-finite values, in 1 of its 16 samples"):
        callback = ICSCallback(tmp_path / "r.h5", probe=(probe, y[:16]))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    with open_run(tmp_path / "r.h5") as run:
        # One sample's three outputs are NaN at every capture; the gradients are all NaN.
        np.testing.assert_array_equal(run.activations(run.layer_names[0]).nonfinite, [3, 3])
        assert np.isnan(run.gradients(run.variable_names[0]).grad_norm).all()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's graph execution errors")
def test_a_tensorflow_error_in_the_probes_loss_is_quoted_without_its_stack(tmp_path) -> None:
    # Labels out of the loss's range: TensorFlow's error carries 30 lines of "File ..." frames
    # before its last line, which says what went wrong.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 12)).astype("float32"), rng.integers(0, 3, 64)
    model = dense((12,))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = ICSCallback(tmp_path / "r.h5", probe=(x[:16], y[:16] + 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    ours = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(ours) == 1, ours
    assert "computing the loss and gradients on the probe" in ours[0]
    assert "(InvalidArgumentError: Received a label value of " in ours[0]
    assert "which is outside the valid range of [0, 3)" in ours[0]
    assert 'File "' not in ours[0] and "[[" not in ours[0] and "\n" not in ours[0]
