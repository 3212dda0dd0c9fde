from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from icsviz import open_run
from icsviz.analysis import compare_runs
from icsviz.report import accuracy_table, build_report, drift_reading

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


def test_drift_reading_names_layers_and_ratios(shipped) -> None:
    sentences = drift_reading(shipped)
    assert any("further from its start" in s for s in sentences)
    assert any("median ratio" in s for s in sentences)
    # Paired by role, naming what was measured in both runs (the fc1 / fc1_bn reading).
    fc1 = [s for s in sentences if "input of fc1_relu" in s]
    base_score, bn_score, ratio = compare_runs(shipped["baseline"], shipped["bn"])["input of fc1_relu"]
    assert fc1 and "<b>fc1</b>" in fc1[0] and "<b>fc1_bn</b>" in fc1[0] and f"{ratio:.1f}x" in fc1[0]
    assert f"{base_score:.2f}" in fc1[0] and f"{bn_score:.2f}" in fc1[0]


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
