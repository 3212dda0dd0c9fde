from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import tiny_capture
from icsviz import MissingDataError, open_run
from icsviz.analysis import (
    common_grid,
    compare_runs,
    drift_colours,
    drift_curve,
    drift_matrix,
    drift_score,
    jensen_shannon,
    moment_shift,
    psi,
    run_drift,
    wasserstein,
)
from icsviz.capture.stats import dyadic_bin_width
from icsviz.store.writer import RunWriter


@st.composite
def histograms(draw, bins=16):
    """A recorded-style histogram: counts on a dyadic grid."""
    low = draw(st.floats(-50, 50, allow_nan=False))
    span = draw(st.floats(0.01, 50, allow_nan=False))
    first, width = dyadic_bin_width(low, low + span, bins)
    counts = np.array(draw(st.lists(st.integers(0, 100), min_size=bins, max_size=bins)), dtype=float)
    assume(counts.sum() > 0)
    return counts, first + width * np.arange(bins + 1)


def split_finer(counts, edges):
    """Every bin cut in two, its count shared equally: the same distribution, finer."""
    fine_edges = np.empty(2 * len(edges) - 1)
    fine_edges[0::2], fine_edges[1::2] = edges, (edges[:-1] + edges[1:]) / 2
    return np.repeat(counts / 2, 2), fine_edges


@given(histograms())
@settings(max_examples=60, deadline=None)
def test_identical_histograms_have_zero_drift(h) -> None:
    counts, edges = h
    assert wasserstein(counts, edges, counts, edges) == pytest.approx(0, abs=1e-12)
    assert jensen_shannon(counts, edges, counts, edges) == pytest.approx(0, abs=1e-12)
    assert psi(counts, edges, counts, edges) == pytest.approx(0, abs=1e-12)


@given(histograms(), histograms())
@settings(max_examples=60, deadline=None)
def test_symmetry_and_bounds(a, b) -> None:
    w_ab, w_ba = wasserstein(*a, *b), wasserstein(*b, *a)
    assert w_ab == pytest.approx(w_ba, rel=1e-9, abs=1e-12) and w_ab >= 0
    js_ab, js_ba = jensen_shannon(*a, *b), jensen_shannon(*b, *a)
    assert js_ab == pytest.approx(js_ba, abs=1e-12)
    assert 0 <= js_ab <= 1
    assert psi(*a, *b) == pytest.approx(psi(*b, *a), rel=1e-9, abs=1e-12)  # PSI is symmetric too
    assert psi(*a, *b) >= 0


@given(histograms(), histograms())
@settings(max_examples=60, deadline=None)
def test_w1_agrees_with_scipy(a, b) -> None:
    from scipy.stats import wasserstein_distance

    from icsviz.histograms import centers

    expected = wasserstein_distance(centers(a[1]), centers(b[1]), a[0], b[0])
    assert wasserstein(*a, *b) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@given(histograms(), st.floats(-100, 100, allow_nan=False))
@settings(max_examples=60, deadline=None)
def test_w1_of_a_shifted_histogram_is_the_shift(h, d) -> None:
    counts, edges = h
    assert wasserstein(counts, edges, counts, edges + d) == pytest.approx(abs(d), rel=1e-9, abs=1e-9)


@given(histograms(), histograms())
@settings(max_examples=60, deadline=None)
def test_js_agrees_with_scipy(a, b) -> None:
    from scipy.spatial.distance import jensenshannon

    from icsviz.analysis.drift import _probabilities, common_grid

    grid = common_grid(a[1], b[1])
    p, q = _probabilities(*a, grid), _probabilities(*b, grid)
    if p.sum() > 0 and q.sum() > 0:  # scipy's distance is the square root of the divergence
        assert jensen_shannon(*a, *b) == pytest.approx(jensenshannon(p, q, base=2) ** 2, abs=1e-9)


def test_disjoint_histograms_have_js_one() -> None:
    edges = np.arange(5.0)
    assert jensen_shannon(np.array([1, 1, 0, 0.0]), edges, np.array([0, 0, 3, 1.0]), edges) == pytest.approx(
        1.0
    )


@given(histograms(), histograms())
@settings(max_examples=60, deadline=None)
def test_results_are_stable_under_finer_rebinning(a, b) -> None:
    fa, fb = split_finer(*a), split_finer(*b)
    assert jensen_shannon(*fa, *fb) == pytest.approx(jensen_shannon(*a, *b), abs=1e-9)
    assert psi(*fa, *fb) == pytest.approx(psi(*a, *b), rel=1e-6, abs=1e-9)
    # W1 places mass at bin centres: splitting moves it by at most a quarter of the widest bin.
    tolerance = max(np.diff(a[1])[0], np.diff(b[1])[0]) / 2
    assert abs(wasserstein(*fa, *fb) - wasserstein(*a, *b)) <= tolerance + 1e-9


def test_common_grid_is_exact_for_dyadic_grids() -> None:
    a = 0.5 * np.arange(9)  # width 0.5 from 0
    b = -2 + 2.0 * np.arange(5)  # width 2 from -2
    grid = common_grid(a, b)
    assert np.diff(grid)[0] == 0.5 and grid[0] == -2 and grid[-1] == 6  # the finer width, both ranges
    assert set(a) <= set(grid) and set(b) <= set(grid)  # every edge of both grids is a grid edge
    assert len(common_grid(np.array([0, 2.0**-20]), np.array([0, 1024.0]), max_bins=100)) <= 101


def test_moment_shift_and_drift_score() -> None:
    mean_shift, std_shift = moment_shift(np.array([1.0, 3.0, 0.0]), np.array([2.0, 2.0, 4.0]))
    np.testing.assert_allclose(mean_shift, [0, 1, 0.5])
    np.testing.assert_allclose(std_shift, [0, 0, 1])
    assert drift_score(np.array([0.0, 1.0, 1.0]), np.array([0.0, 1.0, 2.0])) == pytest.approx(0.75)
    assert np.isnan(drift_score(np.array([1.0]), np.array([0.0])))


@pytest.fixture
def two_runs(tmp_path, layout):
    paths = []
    for name, value in (("base", 2.0), ("bn", 0.5)):
        path = tmp_path / f"{name}.h5"
        with RunWriter.create(path, layout, {"run_name": name}) as w:
            for step in range(4):
                capture = tiny_capture(layout, step, value=value)
                for lc in capture.layers:  # the histogram moves by value * step
                    lc.hist_counts = np.array([0, 4, 8, 4, 0, 0, 0, 0])
                    lc.hist_edges = np.arange(9.0) + value * step
                    lc.moments[1] = 1.0
                capture.layers[0].moments[1] = 1.0
                w.write_capture(capture)
        paths.append(path)
    runs = [open_run(p) for p in paths]
    yield runs
    for run in runs:
        run.close()


def test_run_level_drift_and_comparison(two_runs) -> None:
    base, bn = two_runs
    acts = base.activations("dense")
    w1 = drift_curve(acts, "w1")
    np.testing.assert_allclose(w1, [0, 2, 4, 6])  # shift / step-0 std (1)
    np.testing.assert_allclose(drift_curve(acts, "w1", against="previous"), [0, 2, 2, 2])
    names, matrix = drift_matrix(base)
    assert names == ["dense", "block/relu"] and matrix.shape == (2, 4)
    summary = {d.layer: d for d in run_drift(base)}
    assert summary["dense"].final == pytest.approx(6)
    comparison = compare_runs(base, bn, by="name")
    assert comparison["dense"][2] == pytest.approx(4.0)  # the baseline drifts 4x further
    with pytest.raises(ValueError, match="Received: metric='kl'"):
        drift_curve(acts, "kl")
    from icsviz.analysis import gradient_shift_summary

    diff, cos = gradient_shift_summary(base)["dense"]
    assert diff == pytest.approx(0.2) and cos == pytest.approx(0.9)  # means over captures 1..3


def test_gradient_shift_summary_needs_the_data(tmp_path) -> None:
    from conftest import tiny_layout
    from icsviz.analysis import gradient_shift_summary
    from icsviz.store.schema import RunLayout

    base = tiny_layout()
    layout = RunLayout(layers=base.layers, variables=base.variables, hist_bins=base.hist_bins)
    path = tmp_path / "plain.h5"
    with RunWriter.create(path, layout, {}) as w:
        w.write_capture(tiny_capture(layout, 0))
    with open_run(path) as run, pytest.raises(MissingDataError, match="gradient_shift=True"):
        gradient_shift_summary(run)


def test_divergence_names_the_first_bad_capture_its_layers_and_the_loss(tmp_path) -> None:
    from conftest import diverging_run
    from icsviz import analysis

    with open_run(diverging_run(tmp_path / "nan.h5", bad_from=3)) as run:
        found = analysis.divergence(run)
        assert found.step == 3 and found.epoch == pytest.approx(0.3)  # tiny_capture: epoch = step / 10
        assert found.layers == ("dense",) and found.loss_epoch == 2
        assert found.describe() == (
            "diverged: NaN/Inf activations from step 3 (epoch 0.3), first in dense; "
            "the training loss is NaN/Inf from epoch 2"
        )


def test_a_finite_run_has_no_divergence(tmp_path) -> None:
    from conftest import tiny_layout
    from icsviz import analysis

    layout = tiny_layout()
    with RunWriter.create(tmp_path / "ok.h5", layout, {}) as w:
        for step in range(4):
            capture = tiny_capture(layout, step)
            for layer in capture.layers:
                layer.nonfinite = 0
            w.write_capture(capture)
        w.write_epoch(0, {"loss": 1.0})
    with open_run(tmp_path / "ok.h5") as run:
        assert analysis.divergence(run) is None


ROOT = Path(__file__).resolve().parents[1]


def test_layers_pair_by_role_not_by_name_on_the_shipped_runs() -> None:
    from icsviz import open_run
    from icsviz.analysis import nonlinearity_inputs, pair_layers

    with (
        open_run(ROOT / "runs" / "cifar10-baseline.h5") as base,
        open_run(ROOT / "runs" / "cifar10-bn.h5") as bn,
    ):
        pairs = dict(pair_layers({"baseline": base, "bn": bn}))
        assert pairs["input of fc1_relu"] == {"baseline": "fc1", "bn": "fc1_bn"}
        assert [r.nonlinearity for r in nonlinearity_inputs(bn)] == [
            "conv1_relu",
            "conv2_relu",
            "conv3_relu",
            "conv4_relu",
            "fc1_relu",
            "logits_softmax",
        ]
        by_role, by_name = compare_runs(base, bn), compare_runs(base, bn, by="name")
        # By role BN's fc1 input drifts far less (14.6x in the runs); by name the
        # comparison is of BN's Dense output before the normalization and says the opposite.
        scores = {d.layer: d.score for d in run_drift(base)}, {d.layer: d.score for d in run_drift(bn)}
        base_score, bn_score, ratio = by_role["input of fc1_relu"]
        assert (base_score, bn_score) == (scores[0]["fc1"], scores[1]["fc1_bn"])
        assert ratio == pytest.approx(base_score / bn_score) and ratio > 5
        assert by_name["fc1"][2] < 1


def test_roles_follow_the_recorded_graph_not_the_layer_order(tmp_path) -> None:
    import keras

    from icsviz import ICSCallback, open_run
    from icsviz.analysis import nonlinearity_inputs

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    first = keras.layers.Dense(6, name="first")(inputs)
    side = keras.layers.Dense(6, name="side")(inputs)  # captured between `first` and the activation
    act = keras.layers.Activation("relu", name="act")(keras.layers.Dropout(0.1)(first))
    out = keras.layers.Dense(2, activation="softmax", name="out")(keras.layers.Concatenate()([act, side]))
    model = keras.Model(inputs, out)
    model.compile("sgd", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 2, 32)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ICSCallback(tmp_path / "g.h5", probe=(x, y))])
    with open_run(tmp_path / "g.h5") as run:
        assert run.layer("act").inputs == ("first",)  # through the Dropout, not the previous tensor
        assert run.layer("out").inputs == ("out:preact",)
        roles = [(r.index, r.nonlinearity, r.layer) for r in nonlinearity_inputs(run)]
        # `out` fuses its softmax: recorded as out:preact and out, one role all the same.
        assert roles == [(1, "act", "first"), (2, "out", "out:preact")]


def _recorded(model, x, y, path: Path):
    import keras

    from icsviz import ICSCallback

    model.compile("sgd", "sparse_categorical_crossentropy")
    probe = (keras.tree.map_structure(lambda a: a[:16], x), y[:16])  # x: an array or a list of them
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[ICSCallback(path, probe=probe)])
    keras.backend.clear_session()
    return open_run(path)


def test_a_recurrent_layers_input_is_its_role_and_pairs_a_layernorm_twin(tmp_path) -> None:
    import keras

    from icsviz.analysis import nonlinearity_inputs, pair_layers, same_depth
    from icsviz.plots import hidden_input_layer

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 5, 3)).astype("float32"), rng.integers(0, 2, 32)

    def twin(norm: bool):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5, 3))
        h = keras.layers.LSTM(6, return_sequences=True, name="lstm1")(inputs)
        if norm:
            h = keras.layers.LayerNormalization(name="ln")(h)
        h = keras.layers.LSTM(4, name="lstm2")(h)
        return keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(h))

    runs = {"plain": _recorded(twin(False), x, y, tmp_path / "plain.h5")}
    runs["ln"] = _recorded(twin(True), x, y, tmp_path / "ln.h5")
    try:
        # lstm1 is fed by the model's input, which is not recorded: no role. lstm2's gates are
        # computed from its input, the tensor LayerNormalization normalizes in the twin.
        assert [(r.nonlinearity, r.layer) for r in nonlinearity_inputs(runs["plain"])] == [
            ("lstm2", "lstm1"),
            ("out", "out:preact"),
        ]
        assert same_depth(runs)
        assert pair_layers(runs, by="role")[0] == ("input of lstm2", {"plain": "lstm1", "ln": "ln"})
        # Ioffe & Szegedy's Fig. 1 follows the input of the last hidden nonlinearity: lstm2's.
        assert [hidden_input_layer(run) for run in runs.values()] == ["lstm1", "ln"]
    finally:
        for run in runs.values():
            run.close()


def test_the_recorded_graph_goes_through_an_rnns_states_and_nested_models(tmp_path) -> None:
    import keras
    import model_zoo

    from icsviz.analysis import nonlinearity_inputs

    keras.utils.set_random_seed(0)
    # A GRU returning its state, an LSTM returning two: each output is a tensor of its own.
    with _recorded(*model_zoo.gru_with_states(), tmp_path / "states.h5") as run:
        assert run.layer("lstm_state[0]").inputs == ("gru[0]",)  # the sequence, not the state
        assert run.layer("lstm_state[2]").inputs == ("gru[0]",)
        # Through the Concatenate, in its order.
        assert run.layer("head:preact").inputs == (
            "lstm_state[0]",
            "lstm_state[1]",
            "lstm_state[2]",
            "gru[1]",
        )
        assert ("lstm_state", "gru[0]") in [(r.nonlinearity, r.layer) for r in nonlinearity_inputs(run)]
    # A CNN run on every frame (TimeDistributed of a model), then an LSTM: the LSTM is fed by the
    # nested model's last layer.
    with _recorded(*model_zoo.time_distributed_cnn(), tmp_path / "clips.h5") as run:
        assert run.layer("clip").inputs == ("frames/frame_fc",)
    # A nested model called twice: its layers run once per call, each fed by what feeds it.
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((4,))
    block = keras.Model(inner_in, keras.layers.Dense(4, activation="tanh", name="d")(inner_in), name="block")
    inputs = keras.Input((3,))
    h = block(block(keras.layers.Dense(4, name="stem")(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(h))
    rng = np.random.default_rng(0)
    with _recorded(
        model, rng.normal(size=(32, 3)).astype("float32"), rng.integers(0, 2, 32), tmp_path / "n.h5"
    ) as run:
        assert run.layer("block/d:preact").inputs == ("stem",)
        # Its second call is fed by its first, and feeds the head.
        assert run.layer("block/d:preact#2").inputs == ("block/d",)
        assert run.layer("out:preact").inputs == ("block/d#2",)


def test_a_layer_of_layers_is_recorded_inside_the_graph_and_a_subclassed_model_keeps_model_order(
    tmp_path,
) -> None:
    import keras
    import model_zoo

    from icsviz.analysis import nonlinearity_inputs

    keras.utils.set_random_seed(0)
    with _recorded(*model_zoo.composite_layers(), tmp_path / "composite.h5") as run:
        # The block's output is norm2's: what it feeds is fed by norm2, through the pooling.
        assert "block" not in run.layer_names
        assert run.layer("residual_mlp").inputs == ("block/norm2",)
        assert run.layer("head:preact").inputs == ("residual_mlp",)
        # Inside the block there is no graph; a fused layer is still fed by its pre-activation.
        assert run.layer("block/ffn/ffn_in").inputs == ("block/ffn/ffn_in:preact",)
        assert [(r.nonlinearity, r.layer) for r in nonlinearity_inputs(run)] == [
            ("block/ffn/ffn_in", "block/ffn/ffn_in:preact"),
            ("residual_mlp/inner", "residual_mlp/inner:preact"),
            ("head", "head:preact"),
        ]

    class Stacked(keras.Model):  # no graph at all: a recurrent layer's input is the one before it
        def __init__(self) -> None:
            super().__init__()
            self.lstm1 = keras.layers.LSTM(6, return_sequences=True, name="lstm1")
            self.lstm2 = keras.layers.LSTM(4, name="lstm2")
            self.out = keras.layers.Dense(2, activation="softmax", name="out")

        def call(self, x):
            return self.out(self.lstm2(self.lstm1(x)))

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 5, 3)).astype("float32"), rng.integers(0, 2, 32)
    with _recorded(Stacked(), x, y, tmp_path / "stacked.h5") as run:
        assert run.layer("out").inputs == ("out:preact",)
        assert [(r.nonlinearity, r.layer) for r in nonlinearity_inputs(run)] == [
            ("lstm2", "lstm1"),
            ("out", "out:preact"),
        ]


def test_a_layer_called_twice_is_fed_and_feeds_call_by_call(tmp_path) -> None:
    import keras

    from icsviz.analysis import nonlinearity_inputs

    class Stack(keras.layers.Layer):  # a layer of layers, held in a list
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.blocks = [keras.layers.Dense(5, activation="tanh", name=f"d{i}") for i in range(2)]

        def build(self, shape) -> None:
            for block in self.blocks:
                block.build(shape)

        def call(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    a, b = keras.layers.Dense(5, name="a")(inputs), keras.layers.Dense(5, name="b")(inputs)
    enc = keras.layers.Dense(5, activation="tanh", name="enc")
    stack = Stack(name="stack")
    h = keras.layers.Concatenate()([enc(a), enc(b), stack(stack(a))])
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(h))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 5)).astype("float32"), rng.integers(0, 2, 32)
    with _recorded(model, x, y, tmp_path / "twice.h5") as run:
        assert run.layer("enc:preact").inputs == ("a",)
        assert run.layer("enc:preact#2").inputs == ("b",)
        assert run.layer("enc#2").inputs == ("enc:preact#2",)
        assert run.layer("stack/d1#2").inputs == ("stack/d1:preact#2",)
        assert "stack" not in run.layer_names and "stack#2" not in run.layer_names
        # The second call of each, not the first, feeds the head.
        assert run.layer("out:preact").inputs == ("enc", "enc#2", "stack/d1#2")
        # One role per call, in the order Keras runs the graph (deepest first).
        assert [r.nonlinearity for r in nonlinearity_inputs(run)] == [
            "stack/d0",
            "stack/d1",
            "enc",
            "enc#2",
            "stack/d0#2",
            "stack/d1#2",
            "out",
        ]


def test_a_layer_a_block_holds_to_tie_its_weights_is_recorded_once_where_the_graph_calls_it(
    tmp_path,
) -> None:
    import keras

    from icsviz.capture.layers import iter_layers

    class TiedOutput(keras.layers.Layer):  # the embedding's matrix, transposed, as the output layer
        def __init__(self, embedding, **kwargs) -> None:
            super().__init__(**kwargs)
            self.embedding = embedding

        def call(self, x):
            logits = keras.ops.matmul(x, keras.ops.transpose(self.embedding.embeddings))
            return keras.ops.softmax(logits)

    keras.utils.set_random_seed(0)
    tokens = keras.Input((6,), dtype="int32")
    embedding = keras.layers.Embedding(20, 8, name="emb")
    hidden = keras.layers.Dense(8, activation="tanh", name="d")(embedding(tokens))
    model = keras.Model(tokens, TiedOutput(embedding, name="tied")(hidden))
    assert [name for name, _ in iter_layers(model)] == ["emb", "d", "tied"]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 20, (32, 6)), rng.integers(0, 20, (32, 6))
    with _recorded(model, x, y, tmp_path / "tied.h5") as run:
        # Before, also "tied/emb#2": the same call recorded twice, and `d` fed by nothing.
        assert run.layer_names == ["emb", "d:preact", "d", "tied"]
        assert run.layer("d:preact").inputs == ("emb",)


def test_a_siamese_networks_encoder_is_fed_and_feeds_call_by_call(tmp_path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((10,))
    hidden = keras.layers.Activation("relu", name="e1_relu")(keras.layers.Dense(8, name="e1")(image))
    encoder = keras.Model(image, keras.layers.Dense(4, activation="tanh", name="e2")(hidden), name="encoder")
    a, b = keras.Input((10,), name="a"), keras.Input((10,), name="b")
    distance = keras.layers.Subtract(name="diff")([encoder(a), encoder(b)])
    model = keras.Model([a, b], keras.layers.Dense(2, activation="softmax", name="out")(distance))
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(32, 10)).astype("float32") for _ in range(2)]
    y = rng.integers(0, 2, 32)
    with _recorded(model, x, y, tmp_path / "siamese.h5") as run:
        assert run.layer("encoder/e1_relu").inputs == ("encoder/e1",)
        # The second call's activation: fed by the second call's Dense (was: nothing).
        assert run.layer("encoder/e1_relu#2").inputs == ("encoder/e1#2",)
        assert run.layer("encoder/e2:preact#2").inputs == ("encoder/e1_relu#2",)
        assert run.layer("diff").inputs == ("encoder/e2", "encoder/e2#2")  # was ("encoder/e2",)


def test_a_layer_another_model_called_first_is_fed_by_this_models_graph(tmp_path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    shared = keras.layers.Dense(8, activation="relu", name="shared")
    other_input = keras.Input((6,))
    keras.Model(other_input, shared(keras.layers.Dense(6, name="other_stem")(other_input)))  # node 0
    inputs = keras.Input((6,))
    hidden = shared(keras.layers.Dense(6, name="stem")(inputs))  # node 1: this model's only call
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(hidden))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.integers(0, 2, 32)
    with _recorded(model, x, y, tmp_path / "cross.h5") as run:
        assert run.layer("shared:preact").inputs == ("stem",)  # was (): node 0, the other model's
        assert run.layer("out:preact").inputs == ("shared",)


def test_a_block_in_a_model_run_on_every_frame_is_recorded_once(tmp_path) -> None:
    import keras
    from model_zoo import TransformerBlock

    keras.utils.set_random_seed(0)
    frame_in = keras.Input((5, 8))
    pooled = keras.layers.GlobalAveragePooling1D()(TransformerBlock(8, 2, 16, name="block")(frame_in))
    frames = keras.layers.TimeDistributed(keras.Model(frame_in, pooled, name="frame"), name="frames")
    clips = keras.Input((3, 5, 8))
    hidden = keras.layers.LSTM(4, name="lstm")(frames(clips))
    model = keras.Model(clips, keras.layers.Dense(2, activation="softmax", name="out")(hidden))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 3, 5, 8)).astype("float32"), rng.integers(0, 2, 32)
    with _recorded(model, x, y, tmp_path / "frames.h5") as run:
        # The block's output is norm2's at every frame: recorded once (was also "frames/block").
        assert "frames/block" not in run.layer_names and "frames/block/norm2" in run.layer_names
        assert run.layer("lstm").inputs == ("frames/block/norm2",)


def test_drift_colours_go_by_decades_only_where_a_few_layers_drift_orders_more() -> None:
    rng = np.random.default_rng(0)
    # The reference CNNs: drift up to about twenty times its median, plus step 0's zeros.
    reference = np.concatenate([np.zeros(12), rng.uniform(0.05, 1.0, 500), rng.uniform(2, 10, 20), [np.nan]])
    colours = drift_colours(reference)
    assert colours.decades_from is None
    assert colours.top == pytest.approx(np.nanquantile(reference, 0.98))
    # ConvNeXt: a tenth of the layers (LayerScale, initialised at 1e-6) a thousand step-0 stds away.
    deep = np.concatenate([rng.uniform(0.01, 1.0, 450), rng.uniform(800, 1500, 50), [np.inf]])
    colours = drift_colours(deep)
    assert colours.top > 800
    assert colours.decades_from == pytest.approx(np.quantile(deep[np.isfinite(deep)], 0.05))
    # Nothing measured yet: a scale that still draws.
    empty = drift_colours(np.array([]))
    assert empty.top == 1.0 and empty.decades_from is None
    assert drift_colours(np.zeros(4)).top > 0


def test_a_model_with_a_linear_output_follows_its_last_nonlinearity_in_ioffes_figure(tmp_path) -> None:
    """A regression (Dense(1) without activation) or logits: the last nonlinearity is hidden,
    where a softmax output's is the output's own (the reference CNN's: fc1 feeds fc1_relu)."""
    import keras

    from icsviz import ICSCallback
    from icsviz.plots import hidden_input_layer

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile("sgd", "mse")
    path = tmp_path / "regression.h5"
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[ICSCallback(path, probe=(x[:16], y[:16]))])
    with open_run(path) as run:
        assert run.layer_names == ["hidden:preact", "hidden", "out"]
        assert hidden_input_layer(run) == "hidden:preact"
