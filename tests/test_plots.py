from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from conftest import deep_layout, tiny_capture
from icsviz import MissingDataError, analysis, open_run
from icsviz.plots import (
    figure_accuracy,
    figure_drift_matrix,
    figure_gradient_shift,
    figure_gradients,
    figure_ioffe,
    figure_layer,
    figure_loss,
    figure_metric,
    hidden_input_layer,
    left_out,
    plot_runs,
)
from icsviz.store.writer import RunWriter

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_BN = ROOT / "runs" / "cifar10-bn.h5"
SHIPPED_BASELINE = ROOT / "runs" / "cifar10-baseline.h5"


@pytest.fixture(scope="module")
def shipped():
    runs = {p.stem.split("-")[-1]: open_run(p) for p in sorted((ROOT / "runs").glob("*.h5"))}
    assert set(runs) == {"baseline", "bn"}, "runs/ must hold the two shipped reference runs"
    yield runs
    for run in runs.values():
        run.close()


def test_hidden_input_layer_is_the_input_of_the_last_hidden_activation(shipped) -> None:
    assert hidden_input_layer(shipped["baseline"]) == "fc1"
    assert hidden_input_layer(shipped["bn"]) == "fc1_bn"


def test_ioffe_figure_draws_the_tracked_unit_percentiles(shipped) -> None:
    fig = figure_ioffe(shipped)
    left, right = fig.axes[:2]
    assert left.get_shared_y_axes().joined(left, right)
    line = left.get_lines()[1]  # the median
    acts = shipped["baseline"].activations("fc1")
    unit = int(acts.tracked_units[len(acts.tracked_units) // 2])
    assert list(line.get_ydata()) == pytest.approx(list(acts.unit_quantile(unit, 0.5)))
    assert "unit" in left.get_title()
    assert left.get_ylabel().startswith("input to the activation\n")
    assert [t for t in left.get_xticks() if 0 <= t <= 50] == [0, 10, 20, 30, 40, 50]  # whole epochs
    chosen = figure_ioffe(shipped, layer="conv2").axes[0]
    assert chosen.get_title().startswith("baseline: conv2, unit") and chosen.get_ylabel().startswith(
        "the unit's value"
    )


def test_ioffe_figure_of_many_runs_and_of_a_single_capture(tiny_runs, tmp_path, layout) -> None:
    one = _run_with_history(tmp_path / "one.h5", layout, {"loss": 1.0})  # a run stopped early
    fig = figure_ioffe({**tiny_runs, "one": one}, layer="dense")
    first, _, single = fig.axes
    assert first.get_title().startswith("a\ndense, unit ")  # three panels: the title on two lines
    assert list(single.get_xticks()) == [0.0]  # its one capture, not -0.04 ... 0.04
    assert all(
        line.get_marker() == "o" for line in single.get_lines()
    )  # a line through one point draws nothing
    assert all(line.get_marker() in ("None", None, "") for line in first.get_lines())
    assert figure_ioffe(tiny_runs, layer="dense").axes[0].get_title().startswith("a: dense, unit ")
    matrix = figure_drift_matrix({**tiny_runs, "c": tiny_runs["a"], "one": one})
    # Three or more runs: each panel is titled by its run, what they show once above them
    # (two-line titles ran into each other over five narrow panels).
    assert [ax.get_title() for ax in matrix.axes[:3]] == ["a", "b", "c"]
    assert left_out(matrix) == ["one: one capture, nothing to drift from yet"]
    assert matrix.get_suptitle() == "Drift from step 0"
    assert len([t for t in matrix.axes[0].get_xticks() if 0 <= t <= 4]) <= 3
    plt.close("all")
    one.close()


def test_plot_follows_the_chosen_layer_in_the_ioffe_figures(shipped, tmp_path) -> None:
    written, notes = plot_runs(
        shipped, tmp_path, layers=[], formats=("png",), progress=False, ioffe_layer="nope"
    )
    assert "ioffe_fig1.png" not in {p.name for p in written}
    assert any(n.startswith("ioffe_fig1: skipped,") and "no captured layer 'nope'" in n for n in notes), notes


def _run_with_history(path: Path, layout, metrics: dict[str, float], epochs: int = 3, labels: bool = True):
    with RunWriter.create(path, layout, {"run_name": path.stem}) as w:
        capture = tiny_capture(layout, 0, kind="start")
        if not labels:  # a probe without labels: the capture records NaN gradients
            capture.grad_norm[:] = np.nan
        w.write_capture(capture)
        for epoch in range(epochs):
            w.write_epoch(epoch, {name: value + epoch / 10 for name, value in metrics.items()})
    return open_run(path)


def test_accuracy_figure_shows_training_accuracy_dashed_for_a_run_without_validation(
    tmp_path, layout, shipped
) -> None:
    trained = _run_with_history(tmp_path / "plain.h5", layout, {"accuracy": 0.5, "loss": 1.0})
    fig = figure_accuracy({"bn": shipped["bn"], "plain": trained})
    ax = fig.axes[0]
    validated, plain = ax.get_lines()[:2]
    assert validated.get_linestyle() == "-" and plain.get_linestyle() == "--"
    assert list(validated.get_ydata()) == pytest.approx(list(shipped["bn"].history["val_accuracy"]))
    assert list(plain.get_ydata()) == pytest.approx([0.5, 0.6, 0.7])
    assert (ax.get_ylabel(), plain.get_label()) == ("accuracy", "plain (training)")
    alone = figure_accuracy({"plain": trained}).axes[0]
    assert [t for t in alone.get_xticks() if 1 <= t <= 3] == [1, 2, 3]  # whole epochs, not 1.25
    assert figure_accuracy({"bn": shipped["bn"]}).axes[0].get_ylabel() == "validation accuracy"
    assert figure_loss({"plain": trained}).axes[0].get_title() == "Training loss"
    assert (
        figure_loss({"bn": shipped["bn"], "plain": trained}).axes[0].get_title()
        == "Training and validation loss"
    )
    regression = _run_with_history(tmp_path / "mae.h5", layout, {"mae": 0.5, "loss": 1.0})
    with pytest.raises(
        MissingDataError, match=r"no accuracy in its history \(compile the model with metrics"
    ):
        figure_accuracy({"mae": regression})
    # A regression: its first metric instead, titled as the app titles it, in a file of its name.
    fig = figure_metric({"mae": regression})
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_ydata()) == pytest.approx([0.5, 0.6, 0.7]) and fig.axes[0].get_title() == "MAE"
    written, notes = plot_runs({"mae": regression}, tmp_path / "regression", formats=("png",), progress=False)
    assert "mae.png" in {p.name for p in written} and not any(n.startswith("mae") for n in notes)
    # A GAN's train_step logs a loss per model and no "loss": a figure for each, as the app's panels.
    gan = _run_with_history(tmp_path / "gan.h5", layout, {"d_loss": 0.7, "g_loss": 0.9})
    written, notes = plot_runs({"gan": gan}, tmp_path / "gan", layers=[], formats=("png",), progress=False)
    assert {"d_loss.png", "g_loss.png"} <= {p.name for p in written}
    assert not any("loss" in note for note in notes)
    assert list(figure_metric({"gan": gan}, "g_loss").axes[0].get_lines()[0].get_ydata()) == pytest.approx(
        [0.9, 1.0, 1.1]
    )
    gan.close()
    # A metric object's name (metrics=[keras.metrics.SparseCategoricalAccuracy()]) is the accuracy.
    named = _run_with_history(
        tmp_path / "named.h5",
        layout,
        {"sparse_categorical_accuracy": 0.5, "val_sparse_categorical_accuracy": 0.4},
    )
    written, _ = plot_runs({"named": named}, tmp_path / "named", layers=[], formats=("png",), progress=False)
    assert "accuracy.png" in {p.name for p in written}
    assert figure_metric({"named": named}).axes[0].get_title() == "Validation accuracy"
    # Beside a run that logs "accuracy", each run's own accuracy is drawn: a multi-output model's
    # "cls_accuracy" was left out with "no accuracy in its history".
    heads = _run_with_history(tmp_path / "heads.h5", layout, {"cls_accuracy": 0.3, "val_cls_accuracy": 0.2})
    fig = figure_accuracy({"bn": shipped["bn"], "named": named, "heads": heads})
    assert [line.get_label() for line in fig.axes[0].get_lines()[:3]] == ["bn", "named", "heads"]
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == pytest.approx([0.4, 0.5, 0.6])
    assert list(fig.axes[0].get_lines()[2].get_ydata()) == pytest.approx([0.2, 0.3, 0.4])
    assert left_out(fig) == []
    # A multi-output model compiled without metrics: its first metric is one output's loss,
    # which no `metrics=[...]` gives another run.
    outputs = _run_with_history(
        tmp_path / "outputs.h5", layout, {"loss": 1.0, "cls_loss": 0.8, "reg_loss": 0.2}
    )
    fig = figure_metric({"outputs": outputs, "mae": regression})
    assert left_out(fig) == ["mae: no cls_loss in its history (its model has no output of that name)"]
    # Beside a run with an accuracy, the fix is Keras's own name for it, whatever the other calls it.
    fig = figure_metric({"outputs": outputs, "heads": heads})
    assert left_out(fig) == [
        "outputs: no accuracy in its history (compile the model with metrics=['accuracy'])"
    ]
    outputs.close()
    heads.close()
    # fit(validation_freq=2): NaN in the epochs between; the curve goes through the measured
    # epochs, marked (a line through NaNs drew nothing).
    with RunWriter.create(tmp_path / "sparse.h5", layout, {"run_name": "sparse"}) as w:
        w.write_capture(tiny_capture(layout, 0, kind="start"))
        for epoch, metrics in enumerate([{}, {"val_accuracy": 0.4}, {}]):
            w.write_epoch(epoch, {"accuracy": 0.5, **metrics})
    with open_run(tmp_path / "sparse.h5") as sparse:
        (line,) = figure_accuracy({"sparse": sparse}).axes[0].get_lines()
    assert list(line.get_xdata()) == [2] and list(line.get_ydata()) == pytest.approx([0.4])
    assert line.get_marker() == "o"
    named.close()
    plt.close("all")
    trained.close()
    regression.close()


def test_plot_of_a_run_with_one_capture_draws_what_it_can_and_says_what_it_skipped(tmp_path, layout) -> None:
    # A fit stopped right after its first capture: nothing has drifted yet.
    one = _run_with_history(tmp_path / "one.h5", layout, {"accuracy": 0.5, "loss": 1.0})
    written, notes = plot_runs({"one": one}, tmp_path / "figures", formats=("png",), progress=False)
    assert {"accuracy.png", "loss.png", "layer_dense.png"} <= {p.name for p in written}
    assert any(
        n.startswith("drift_comparison: skipped, no layer has moved from its first capture") for n in notes
    )
    # A matrix of one column said "no drift" over an axis from -0.4 to 0.4: not drawn.
    assert (
        "drift_matrix: skipped, no run has a capture after step 0 yet (the drift is measured from it)"
        in notes
    )
    # The heatmap's one row is that capture, at its epoch (it spanned epochs 0 to 1).
    heat = figure_layer({"one": one}, "dense").axes[1]
    assert list(heat.get_yticks()) == [0.0] and sorted(heat.get_ylim()) == [-0.5, 0.5]
    plt.close("all")
    one.close()


def test_figures_of_several_runs_leave_out_one_without_the_data_and_say_why(
    shipped, tmp_path, layout
) -> None:
    stopped = _run_with_history(tmp_path / "stopped.h5", layout, {}, epochs=0)  # before its first epoch
    runs = {"bn": shipped["bn"], "stopped": stopped}
    fig = figure_accuracy(runs)
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_ydata()) == pytest.approx(list(shipped["bn"].history["val_accuracy"]))
    assert left_out(fig) == ["stopped: no epoch has finished yet, so there are no per-epoch metrics"]
    ioffe = figure_ioffe(runs)  # the tiny run has no hidden nonlinearity to follow
    assert [ax.get_title().split(":")[0] for ax in ioffe.axes] == ["bn"]
    assert left_out(ioffe)[0].startswith("stopped.h5: no hidden nonlinearity found to follow")
    assert left_out(figure_ioffe(shipped)) == []
    written, notes = plot_runs(runs, tmp_path / "figures", layers=[], formats=("png",), progress=False)
    assert "accuracy.png" in {p.name for p in written}
    assert "accuracy: left out stopped: no epoch has finished yet, so there are no per-epoch metrics" in notes
    plt.close("all")
    stopped.close()


def test_gradients_figure_says_what_a_blank_panel_lacks_and_keeps_each_runs_epochs(
    shipped, tmp_path, layout
) -> None:
    one = _run_with_history(tmp_path / "one.h5", layout, {"loss": 1.0}, labels=False)  # one capture
    fig = figure_gradients({"bn": shipped["bn"], "one": one})
    (bn_grad, one_grad), (bn_update, one_update) = np.array(fig.axes[:4]).reshape(2, 2)
    assert [t.get_text() for t in one_update.texts] == ["no update ratio:\nit needs two\ncaptures"]
    assert [t.get_text() for t in one_grad.texts] == ["no gradients:\nthe probe had\nno labels"]
    assert bn_update.texts and not any("no update" in t.get_text() for t in bn_update.texts)  # line names
    assert list(one_update.get_xticks()) == [0.0]  # its one capture's epoch, its own x axis
    assert bn_update.get_xlim()[1] > 45
    plt.close("all")
    one.close()


def test_plot_writes_the_whole_set(shipped, tmp_path) -> None:
    written, notes = plot_runs(shipped, tmp_path, layers=["conv1", "fc1_relu", "nope"], progress=False)
    names = {p.name for p in written}
    for stem in (
        "accuracy",
        "loss",
        "ioffe_fig1",
        "drift_matrix",
        "drift_comparison",
        "gradients",
        "gradient_shift",  # the shipped runs record it
        "ioffe_fig1_steps",  # and the training batches
        "layer_conv1",
        "layer_fc1_relu",
    ):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names, stem
    assert any("'nope'" in n for n in notes)
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    assert (tmp_path / "drift_matrix.pdf").read_bytes()[:4] == b"%PDF"


def test_gradient_shift_figure_needs_the_data_and_shares_its_scales(shipped, tmp_path, layout) -> None:
    fig = figure_gradient_shift(shipped)
    top_left, top_right = fig.axes[0], fig.axes[1]
    assert top_left.get_ylim() == top_right.get_ylim()  # one y scale per row
    assert [top_left.get_title(), top_right.get_title()] == ["baseline", "bn"]
    base = shipped["baseline"]
    moved = {name for name in base.ics_layer_names if (base.ics(name).grad_diff > 0).any()}
    assert moved == set(base.ics_layer_names) - {"conv1"}  # nothing before the first layer steps
    assert moved == {t.get_text() for t in top_left.texts}  # on the log axis: every layer but it
    assert set(base.ics_layer_names) == {t.get_text() for t in fig.axes[2].texts}  # all in cos
    conv2 = shipped["baseline"].ics("conv2").grad_diff
    assert any(list(line.get_ydata()) == pytest.approx(list(conv2), nan_ok=True) for line in top_left.lines)
    from conftest import tiny_capture
    from icsviz.store.writer import RunWriter

    plain_layout = dataclasses.replace(layout, ics_layers=())  # recorded without gradient_shift
    with RunWriter.create(tmp_path / "plain.h5", plain_layout, {}) as writer:
        writer.write_capture(tiny_capture(plain_layout, 0))
    with (
        open_run(tmp_path / "plain.h5") as plain,
        pytest.raises(MissingDataError, match="gradient_shift=True"),
    ):
        figure_gradient_shift({"plain": plain})


def test_plot_cli_and_its_errors(tmp_path, capsys) -> None:
    from icsviz.cli import main

    run = tmp_path / "bn.h5"
    shutil.copy(ROOT / "runs" / "cifar10-bn.h5", run)
    assert (
        main(
            [
                "plot",
                str(run),
                "--out",
                str(tmp_path / "figs"),
                "--layers",
                "fc1",
                "--formats",
                "png",
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "figs" / "layer_fc1.png").exists() and not (
        tmp_path / "figs" / "layer_fc1.pdf"
    ).exists()
    assert main(["plot", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.h5" in capsys.readouterr().err
    assert main(["plot", str(run), "--labels", "a", "b"]) == 2
    assert "one label per run" in capsys.readouterr().err


def test_a_diverged_run_is_marked_where_it_diverged(tmp_path) -> None:
    from conftest import diverging_run
    from icsviz.plots import figure_loss

    with open_run(diverging_run(tmp_path / "nan.h5", bad_from=3)) as run:
        runs = {"nan": run}
        loss = figure_loss(runs).axes[0]
        rules = [line for line in loss.lines if list(line.get_xdata()) == [0.3, 0.3]]
        assert rules and rules[0].get_linestyle() == ":"  # the dotted rule at epoch 0.3
        assert any(t.get_text() == "diverged" for t in loss.texts)
        heat = figure_layer(runs, "dense").axes[1]
        assert any(t.get_text() == "NaN/Inf from epoch 0.3" for t in heat.texts)
        assert any(list(line.get_ydata()) == [0.3, 0.3] for line in heat.lines)
        _, notes = plot_runs(runs, tmp_path / "figs", formats=["png"], progress=False, layers=["dense"])
        assert any(n.startswith("nan: diverged: NaN/Inf activations from step 3") for n in notes)


def test_ioffe_figure_at_step_resolution_draws_every_batch(tmp_path) -> None:
    from test_batch_stats import _fit, _probe

    from icsviz import ICSCallback, open_run
    from icsviz.plots import figure_ioffe_steps

    _fit([ICSCallback(tmp_path / "steps.h5", probe=_probe(), batch_stats=True)])
    with open_run(tmp_path / "steps.h5") as run:
        fig = figure_ioffe_steps({"steps": run}, layer="bn")
        ax = fig.axes[0]
        acts = run.batch_activations("bn")
        unit = int(acts.tracked_units[len(acts.tracked_units) // 2])
        median = [line for line in ax.get_lines() if line.get_linestyle() == "-"][0]
        np.testing.assert_array_equal(median.get_xdata(), acts.steps)
        np.testing.assert_allclose(median.get_ydata(), acts.unit_quantile(unit, 0.5))
        assert ax.get_xlabel() == "training step"


def test_ioffe_steps_figure_says_when_no_run_has_per_step_rows(tmp_path) -> None:
    from test_batch_stats import _fit, _probe

    from icsviz import ICSCallback, MissingDataError, open_run
    from icsviz.plots import figure_ioffe_steps

    _fit([ICSCallback(tmp_path / "plain.h5", probe=_probe())], epochs=1)
    with open_run(tmp_path / "plain.h5") as run, pytest.raises(MissingDataError, match="batch_stats=True"):
        figure_ioffe_steps({"plain": run})


def test_ridgelines_stand_upright_with_the_start_on_top_in_the_app_colours() -> None:
    from matplotlib import colors

    from icsviz.plots import figure_layer

    with open_run(SHIPPED_BN) as run:
        fig = figure_layer({"bn": run}, "fc1_bn")
        ridge, heat = fig.axes[0], fig.axes[1]
        low, high = ridge.get_ylim()
        assert low < high  # not inverted: densities point up
        ridges = ridge.collections
        bottoms = [float(np.min(c.get_paths()[0].vertices[:, 1])) for c in ridges]
        assert bottoms == sorted(bottoms, reverse=True)  # the start highest, later ones below
        first, last = (colors.to_hex(c.get_facecolor()[0]) for c in (ridges[0], ridges[-1]))
        import matplotlib.pyplot as plt

        assert first == colors.to_hex(plt.get_cmap("viridis")(0.0))  # the start dark, as in the app
        assert last == colors.to_hex(plt.get_cmap("viridis")(1.0))
        assert heat.yaxis_inverted()  # time runs down in both panels


def test_gradient_figure_shares_its_scales_and_names_every_layer() -> None:
    from icsviz.plots import figure_gradients

    with open_run(SHIPPED_BN) as bn, open_run(SHIPPED_BASELINE) as base:
        fig = figure_gradients({"baseline": base, "bn": bn})
        top_left, top_right = fig.axes[0], fig.axes[1]
        assert top_left.get_ylim() == top_right.get_ylim()  # one y scale per row
        named = {t.get_text() for t in top_left.texts}
        assert set(base.trainable_layers) <= named
        assert any(ax.get_ylabel() == "layer depth" for ax in fig.axes)  # one colour bar, not a legend
        assert all(ax.get_legend() is None for ax in fig.axes)


def test_log_axes_within_a_few_decades_read_as_plain_numbers(tiny_runs) -> None:
    from icsviz.plots import figure_gradients

    # tiny_runs' gradient norms are 5 to 15 and the update ratios 0.01: matplotlib's defaults
    # labelled them 6 x 10^0 and 10^-2.
    fig = figure_gradients(tiny_runs)
    fig.canvas.draw()
    labels = {
        text.get_text()
        for ax in fig.axes[:2]
        for text in ax.get_yticklabels(minor=False) + ax.get_yticklabels(minor=True)
        if text.get_text()
    }
    assert "10" in labels and not any("10^" in label for label in labels), labels
    # The update ratios' axis reaches below 0.001: powers of ten on every tick, not a mix.
    ratio = {t.get_text() for t in fig.axes[2].get_yticklabels() if t.get_text()}
    assert fig.axes[2].get_ylim()[0] < 1e-3 and ratio and all("10^" in label for label in ratio), ratio
    plt.close(fig)


def test_drift_comparison_pairs_twins_by_role_and_shows_runs_of_different_depths_side_by_side(
    shipped, different_depths
) -> None:
    from icsviz.analysis import input_drift
    from icsviz.plots import figure_drift_comparison

    def bars(fig) -> dict[str, list[float]]:
        ax = fig.axes[0]
        return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}

    twins = figure_drift_comparison(shipped)
    ax = twins.axes[0]
    assert ax.get_xlabel() == "nonlinearity (its input in each run)"
    assert "fc1_relu\nfc1 / fc1_bn" in [t.get_text() for t in ax.get_xticklabels()]
    depths = figure_drift_comparison(different_depths)
    ax = depths.axes[0]
    assert ax.get_xlabel().startswith("k-th nonlinearity of each run")
    # Each run's own k-th input, named under k (the same name once).
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "1\nhidden0:preact",
        "2\nhidden1:preact / out:preact",
        "3\nout:preact",
    ]
    heights = bars(depths)
    deep, shallow = (input_drift(different_depths[label]) for label in ("deep", "shallow"))
    np.testing.assert_allclose(
        heights["deep"], [deep[n] for n in ("hidden0:preact", "hidden1:preact", "out:preact")]
    )
    np.testing.assert_allclose(heights["shallow"][:2], [shallow["hidden0:preact"], shallow["out:preact"]])
    assert np.isnan(heights["shallow"][2])  # the shallow run has no third nonlinearity


def _drifting_run(path: Path, layout, rate) -> Path:
    """A run of four captures in which layer k's histogram and mean move `rate(k)` times as fast
    as tiny_capture's."""
    with RunWriter.create(path, layout, {"run_name": path.stem}) as w:
        for step in range(0, 40, 10):
            capture = tiny_capture(layout, step, kind="start" if step == 0 else "epoch")
            for k, layer in enumerate(capture.layers):
                layer.hist_edges[:] = np.linspace(-1, 1, len(layer.hist_edges)) + step * rate(k) / 10
                layer.moments[0] = step * rate(k) / 10
            w.write_capture(capture)
    return path


def test_a_deep_run_gets_layer_figures_for_its_most_drifted_layers(tmp_path) -> None:
    from icsviz.plots import MAX_LAYER_FIGURES, MOST_DRIFTED, figure_drift_comparison, figure_drift_matrix

    # 40 layers, layer k drifting k times as fast.
    deep = deep_layout(40)
    path = _drifting_run(tmp_path / "deep.h5", deep, lambda k: k)
    assert len(deep.layers) > MAX_LAYER_FIGURES
    with open_run(path) as run:
        written, notes = plot_runs({"deep": run}, tmp_path / "figs", formats=("png",), progress=False)
        drawn = sorted(p.stem for p in written if p.stem.startswith("layer_"))
        assert drawn == sorted(f"layer_d{k}" for k in range(40 - MOST_DRIFTED, 40))
        assert f"layer figures: drawn for the {MOST_DRIFTED} most drifted of 40 layers" in notes[0]
        written, _ = plot_runs(
            {"deep": run}, tmp_path / "all", layers="all", formats=("png",), progress=False
        )
        assert sum(p.stem.startswith("layer_") for p in written) == 40
        # The drift matrix names every 2nd of 40 layers (all 40 names overlapped).
        fig = figure_drift_matrix({"deep": run})
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()][:3] == ["d0", "d2", "d4"]
        assert ax.get_ylabel() == "layer (every 2nd named)"
        assert fig.get_supxlabel() == ""  # every layer has a score: nothing to explain
        # The drift comparison's 40 bars: every 3rd named, not 40 names run together.
        ax = figure_drift_comparison({"deep": run}, by="name").axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["d0", "d3", "d6"]
        assert len(ax.get_xticklabels()) == 14 and ax.get_xlabel() == "layer (every 3rd named)"
    plt.close("all")


def test_the_drift_matrix_goes_by_decades_where_a_few_layers_drift_orders_more(tmp_path, shipped) -> None:
    from matplotlib.colors import SymLogNorm

    from icsviz.plots import figure_drift_matrix

    # The reference pair keeps its linear scale.
    norm = figure_drift_matrix(shipped).axes[0].collections[0].norm
    assert not isinstance(norm, SymLogNorm) and norm.vmin == 0
    # 40 layers, the last four drifting 2000 times as fast as the others (ConvNeXt's LayerScale).
    path = _drifting_run(tmp_path / "scaled.h5", deep_layout(40), lambda k: 2000.0 if k >= 36 else 1.0)
    with open_run(path) as run:
        _, matrix = analysis.drift_matrix(run)
        norm = figure_drift_matrix({"scaled": run}).axes[0].collections[0].norm
        assert isinstance(norm, SymLogNorm)
        # The calm layers' last drift spans colours, not the lightest one alone.
        calm = norm(matrix[:36, -1])
        assert 0.3 < calm.min() and calm.max() < 0.7
    plt.close("all")


def test_gradients_recorded_as_zero_are_told_apart_from_gradients_never_recorded(tmp_path, layout) -> None:
    from icsviz.plots import ALL_ZERO_NOTE

    path = tmp_path / "saturated.h5"  # every gradient 0, as from a saturated softmax
    with RunWriter.create(path, layout, {"run_name": "saturated"}) as w:
        for step in range(0, 30, 10):
            capture = tiny_capture(layout, step, kind="start" if step == 0 else "epoch")
            capture.grad_norm[:] = 0.0
            w.write_capture(capture)
    with open_run(path) as run:
        (grad, update) = figure_gradients({"saturated": run}).axes[:2]
        assert [t.get_text() for t in grad.texts] == [ALL_ZERO_NOTE]
        assert len(update.lines) == 1  # the update ratio is there, drawn
    plt.close("all")


def test_the_drift_matrix_says_what_a_cell_without_a_score_is(tmp_path, layout) -> None:
    from icsviz.plots import figure_drift_matrix

    path = tmp_path / "dead.h5"
    with RunWriter.create(path, layout, {"run_name": "dead"}) as w:
        for step in range(0, 40, 10):
            capture = tiny_capture(layout, step, kind="start" if step == 0 else "epoch")
            dead = capture.layers[1]  # a layer constant at step 0: no spread to measure drift in
            dead.moments[1] = 0.0 if step == 0 else dead.moments[1]
            w.write_capture(capture)
    with open_run(path) as run:
        _, matrix = analysis.drift_matrix(run)
        assert np.isnan(matrix[1]).all() and np.isfinite(matrix[0]).all()
        fig = figure_drift_matrix({"dead": run})
        assert fig.get_supxlabel().startswith("Hatched: no score (a layer constant at step 0")
        assert fig.axes[0].patch.get_hatch() == "////"
    plt.close("all")


def _legend_boxes(fig) -> list:
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [legend.get_window_extent(renderer) for legend in legends]


def _bars_under(fig, box) -> int:
    renderer = fig.canvas.get_renderer()
    return sum(box.overlaps(bar.get_window_extent(renderer)) for bar in fig.axes[0].patches)


def test_the_drift_comparisons_legend_never_hides_a_bar(tmp_path, shipped) -> None:
    from icsviz.plots import figure_drift_comparison

    # Two deep runs, one drifting more layer by layer, the other less: tall bars in both upper
    # corners, where matplotlib's "best" place put the legend over them.
    layout = deep_layout(40)
    runs = {
        label: open_run(_drifting_run(tmp_path / f"{label}.h5", layout, rate))
        for label, rate in (("rising", lambda k: k + 1), ("falling", lambda k: 40 - k))
    }
    try:
        fig = figure_drift_comparison(runs, by="name")
        (box,) = _legend_boxes(fig)
        assert fig.axes[0].get_legend() is None and len(fig.legends) == 1  # above the axes
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["rising", "falling"]
        assert _bars_under(fig, box) == 0 and box.y0 >= fig.axes[0].get_window_extent().y1
        # Where the axes have room, the legend stays in them, clear of the bars.
        twins = figure_drift_comparison(shipped)
        (box,) = _legend_boxes(twins)
        assert twins.axes[0].get_legend() is not None and not twins.legends
        assert _bars_under(twins, box) == 0
    finally:
        for run in runs.values():
            run.close()
        plt.close("all")


def test_runs_of_a_sweep_get_colours_of_their_own_in_the_figures(tmp_path, layout) -> None:
    from matplotlib.colors import to_hex

    from icsviz.plots import figure_loss

    runs = {}
    for i in range(12):
        with RunWriter.create(tmp_path / f"r{i}.h5", layout, {"run_name": f"r{i}"}) as w:
            w.write_capture(tiny_capture(layout, 0, kind="start"))
            w.write_epoch(0, {"loss": 1.0 + i, "val_loss": 1.5 + i})
            w.write_epoch(1, {"loss": 0.5 + i, "val_loss": 1.0 + i})
        runs[f"r{i}"] = open_run(tmp_path / f"r{i}.h5")
    try:
        ax = figure_loss(runs).axes[0]
        colours = {line.get_label().split(" (")[0]: to_hex(line.get_color()) for line in ax.lines}
        assert len(colours) == 12 and len(set(colours.values())) == 12
        assert (colours["r0"], colours["r1"]) == ("#1f77b4", "#d62728")  # as the app's charts
    finally:
        for run in runs.values():
            run.close()
        plt.close("all")


def test_characters_no_font_draws_are_one_note_not_a_warning_per_figure(shipped, tmp_path) -> None:
    # Keras allows any layer name on JAX and torch; Matplotlib warned once per figure and file
    # for each character no font had (a Chinese name with no CJK font: 26 warnings).
    label = "\U00013000 bn"  # an Egyptian hieroglyph: in no font of a usual system
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written, notes = plot_runs(
            {label: shipped["bn"]}, tmp_path, layers=["fc1"], formats=("png", "pdf"), progress=False
        )
    assert [str(w.message) for w in caught if "Glyph" in str(w.message)] == []
    assert [n for n in notes if "font" in n] == [
        "no installed font draws \U00013000 (in a layer or run name): drawn as boxes; install a font that "
        "has them (Debian/Ubuntu: apt-get install fonts-noto-cjk, then remove ~/.cache/matplotlib so that "
        "Matplotlib finds it)"
    ]
    assert (tmp_path / "layer_fc1.pdf") in written


def test_the_figures_fall_back_on_installed_fonts_for_other_scripts() -> None:
    from matplotlib import font_manager

    from icsviz.plots import STYLE

    installed = {font.name for font in font_manager.fontManager.ttflist}
    family = STYLE["font.family"]
    assert family[0] == "DejaVu Sans" and all(name in installed for name in family)
    if not {"WenQuanYi Zen Hei", "Noto Sans CJK SC"} & installed:
        pytest.skip("no CJK font installed here (apt-get install fonts-wqy-zenhei; .ci/run does)")
    with warnings.catch_warnings(), plt.rc_context(STYLE):
        warnings.simplefilter("error")  # a glyph missing would be a warning
        fig, ax = plt.subplots()
        ax.set_title("层.2")
        fig.canvas.draw()
        plt.close(fig)
