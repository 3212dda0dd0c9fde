from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import gan_losses_run, tiny_capture, tiny_layout
from icsviz import open_run
from icsviz.analysis import compare_runs
from icsviz.report import accuracy_table, build_report, drift_reading
from icsviz.store.writer import RunWriter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    runs = {
        "baseline": open_run(ROOT / "runs" / "cifar10-baseline.h5"),
        "bn": open_run(ROOT / "runs" / "cifar10-bn.h5"),
    }
    yield runs
    for run in runs.values():
        run.close()


def test_accuracy_table_values(shipped) -> None:
    rows = {r["run"]: r for r in accuracy_table(shipped)}
    val = shipped["bn"].history["val_accuracy"]
    assert rows["bn"]["best"] == pytest.approx(np.nanmax(val))
    assert rows["bn"]["best_epoch"] == int(np.nanargmax(val)) + 1
    assert rows["bn"]["final"] == pytest.approx(val[-1])
    base_best = rows["baseline"]["best"]
    assert rows["bn"]["epochs_to_first_best"] == int(np.flatnonzero(val >= base_best)[0]) + 1
    assert rows["baseline"]["epochs_to_first_best"] == rows["baseline"]["best_epoch"]
    assert not math.isnan(rows["bn"]["epoch_time"])


def test_a_run_without_validation_data_reports_its_training_accuracy_marked(shipped, tmp_path) -> None:
    import h5py

    # The shipped BN run as if fitted without validation data: its val_ metrics taken out.
    path = tmp_path / "noval.h5"
    shutil.copy(shipped["bn"].path, path)
    with h5py.File(path, "a") as f:
        names = [n.decode() for n in f["history/names"][:]]
        keep = [i for i, n in enumerate(names) if not n.startswith("val_")]
        values, kept = f["history/values"][:, keep], np.array([names[i].encode() for i in keep], "S128")
        for name in ("history/values", "history/names"):
            del f[name]
        f["history/values"], f["history/names"] = values, kept
    with open_run(path) as noval:
        rows = accuracy_table({"bn": shipped["bn"], "noval": noval})
        train = noval.history["accuracy"]
        assert rows[0]["split"] == "validation" and rows[1]["split"] == "training"
        assert rows[1]["best"] == pytest.approx(np.nanmax(train)) and rows[1]["final"] == pytest.approx(
            train[-1]
        )
        assert rows[1]["epochs_to_first_best"] is None  # training against validation: not compared
        page = build_report({"bn": shipped["bn"], "noval": noval})
        assert (
            f"{np.nanmax(train):.4f}*" in page and "* Training accuracy: the run was fitted without" in page
        )
        assert rows[0]["best"] == pytest.approx(np.nanmax(shipped["bn"].history["val_accuracy"]))


def test_drift_reading_names_layers_and_ratios(shipped) -> None:
    sentences = drift_reading(shipped)
    assert any("further from its start" in s for s in sentences)
    assert any("median ratio" in s for s in sentences)
    # Paired by role, naming what was measured in both runs (the fc1 / fc1_bn reading).
    fc1 = [s for s in sentences if "input of fc1_relu" in s]
    base_score, bn_score, ratio = compare_runs(shipped["baseline"], shipped["bn"])["input of fc1_relu"]
    assert fc1 and "<b>fc1</b>" in fc1[0] and "<b>fc1_bn</b>" in fc1[0] and f"{ratio:.1f}x" in fc1[0]
    assert f"{base_score:.2f}" in fc1[0] and f"{bn_score:.2f}" in fc1[0]


def test_drift_reading_of_one_run_names_its_three_most_drifted_layers_in_one_sentence(shipped) -> None:
    from icsviz.analysis import run_drift

    (sentence,) = drift_reading({"bn": shipped["bn"]})
    top = sorted((d for d in run_drift(shipped["bn"]) if np.isfinite(d.score)), key=lambda d: -d.score)[:3]
    listed = f"<b>{top[0].layer}</b> ({top[0].score:.2f}), <b>{top[1].layer}</b> ({top[1].score:.2f}) and "
    assert sentence.startswith("The layers that drifted most: " + listed)
    assert (
        f"<b>{top[2].layer}</b> ({top[2].score:.2f}), in <a href='#drift-score'>drift score</a>" in sentence
    )


def _plain_fit_run(path: Path, rates: list[float]):
    """A run as a plain `fit` records it: no recipe, the learning rate logged each epoch."""
    layout = tiny_layout()
    with RunWriter.create(path, layout, {"run_name": path.stem}) as w:
        w.write_capture(tiny_capture(layout, 0, kind="start"))
        for epoch, rate in enumerate(rates):
            w.write_epoch(epoch, {"loss": 1.0, "learning_rate": rate})
    return open_run(path)


def test_report_tables_give_whole_numbers_separators_and_the_logged_learning_rate(shipped, tmp_path) -> None:
    parameters = shipped["bn"].config["parameters"]
    assert f"<td>{parameters:,}</td>" in build_report({"bn": shipped["bn"]}) and parameters >= 1000
    scheduled = _plain_fit_run(tmp_path / "scheduled.h5", [0.01, 0.005, 0.001])
    constant = _plain_fit_run(tmp_path / "constant.h5", [0.002, 0.002])
    html_text = build_report({"scheduled": scheduled, "constant": constant})
    assert "<td>0.01 → 0.001</td>" in html_text and "<td>0.002</td>" in html_text
    assert "<td></td>" not in html_text  # no dataset recorded: "–", as every other unknown
    scheduled.close()
    constant.close()


def test_drift_reading_of_a_run_with_one_capture_says_so_not_nan(shipped, tmp_path) -> None:
    one = _plain_fit_run(tmp_path / "one.h5", [])  # stopped after its first capture
    (sentence,) = drift_reading({"baseline": shipped["baseline"], "one": one})
    assert sentence.endswith("and not known yet for one (it has one capture).") and "nan" not in sentence
    one.close()


def test_drift_reading_does_not_pair_runs_of_different_depths(different_depths) -> None:
    from icsviz.analysis import run_drift_score

    runs = different_depths
    (sentence,) = drift_reading(runs)
    deep, shallow = (run_drift_score(runs[label]) for label in ("deep", "shallow"))
    assert sentence.startswith("deep and shallow have 3 and 2 nonlinearities, so no layer of one is paired")
    assert f"is {deep:.3g} for deep and {shallow:.3g} for shallow." in sentence
    assert "further from its start" not in sentence


def test_report_is_self_contained_and_escapes_names(shipped, tmp_path) -> None:
    html_text = build_report({"<b>base</b>": shipped["baseline"], "bn": shipped["bn"]}, title="x <script>")
    assert "<script>" not in html_text and "&lt;b&gt;base&lt;/b&gt;" in html_text
    assert html_text.count("data:image/png;base64,") >= 7
    assert "src='http" not in html_text and 'src="http' not in html_text  # nothing fetched from outside
    assert "id='drift-score'" in html_text and "href='#drift-score'" in html_text


def test_report_renders_in_a_real_browser(shipped, tmp_path) -> None:
    from test_app_browser import CHROMIUM, FLAGS, _browser_or_skip

    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    from icsviz.report import write_report

    path = write_report(shipped, tmp_path / "report.html")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page()
        page.goto(path.as_uri())
        loaded = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
        assert len(loaded) >= 7 and all(loaded)
        assert page.locator("table").count() == 2
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert os.path.getsize(tmp_path / "report.png") > 20000


def test_the_report_says_where_a_run_diverged_with_its_name_escaped(tmp_path) -> None:
    from conftest import diverging_run
    from icsviz import open_run

    with open_run(diverging_run(tmp_path / "nan.h5", bad_from=3)) as run:
        html_text = build_report({"<i>nan</i>": run})
    assert (
        "<li><b>&lt;i&gt;nan&lt;/i&gt;</b> diverged: NaN/Inf activations from step 3 (epoch 0.3), first in "
        "dense; the training loss is NaN/Inf from epoch 2; its figures end there.</li>"
    ) in html_text


def test_a_gans_two_losses_get_a_figure_each(tmp_path) -> None:
    """A train_step logging a loss per model and no "loss": its second loss where the loss figure
    was "not available"."""
    with open_run(gan_losses_run(tmp_path / "gan.h5")) as run:
        page = build_report({"gan": run})
    assert "g_loss per epoch (training, dashed; validation, solid, where recorded)." in page
    assert "no loss in its history" not in page
    assert page.count("<img") >= 2


def test_a_regression_reports_its_validation_error_best_at_its_lowest(tmp_path) -> None:
    """Runs compiled without an accuracy (a regression with metrics=["mae"]): the first table is
    the headline metric's, whose best value is its lowest, not a table of dashes."""
    import keras

    from icsviz import ICSCallback

    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 6)).astype("float32")
    y = (x[:, :1] * 2 + np.sin(x[:, 1:2])).astype("float32")
    runs = {}
    for name, lr in (("fast", 0.05), ("slow", 0.002)):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(16, activation="relu", name="fc1"),
                keras.layers.Dense(1, name="out"),
            ]
        )
        model.compile(keras.optimizers.SGD(lr), "mse", metrics=["mae"])
        path = tmp_path / f"{name}.h5"
        callback = ICSCallback(path, probe=(x[:32], y[:32]))
        model.fit(x, y, validation_split=0.25, epochs=4, batch_size=16, verbose=0, callbacks=[callback])
        runs[name] = open_run(path)
    try:
        rows = {r["run"]: r for r in accuracy_table(runs, "mae")}
        target = float(np.min(runs["fast"].history["val_mae"]))
        for name, run in runs.items():
            val = run.history["val_mae"]
            assert rows[name]["metric"] == "mae" and rows[name]["split"] == "validation"
            assert rows[name]["best"] == pytest.approx(val.min())
            assert rows[name]["best_epoch"] == int(np.argmin(val)) + 1
            assert rows[name]["final"] == pytest.approx(val[-1])
            reached = np.flatnonzero(val <= target)
            assert rows[name]["epochs_to_first_best"] == (int(reached[0]) + 1 if len(reached) else None)
        assert rows["slow"]["best"] > rows["fast"]["best"]  # a smaller step: a larger error after 4 epochs
        page = build_report(runs)
        assert "<h2>MAE</h2>" in page and "best val MAE" in page and f"{target:.4f}" in page
        assert "best val acc" not in page
        # A table of the accuracy stays where a run recorded one; a metric whose name does not say
        # which way is better gets no best.
        assert all(math.isnan(r["best"]) for r in accuracy_table(runs, "my_score"))
        with open_run(gan_losses_run(tmp_path / "gan.h5")) as gan:  # its losses are no score
            assert "<h2>Accuracy</h2>" in build_report({"gan": gan})
    finally:
        for run in runs.values():
            run.close()
