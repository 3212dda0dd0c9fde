"""The real Streamlit app, driven by AppTest (and one real browser, test_app_browser.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from conftest import damage_chunk
from icsviz import analysis, open_run
from icsviz.dashboard.entry import TABS
from icsviz.store.catalog import catalog, scan_runs
from icsviz.store.schema import decode_text

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
SHIPPED = sorted((ROOT / "runs").glob("*.h5"))


def open_tab(at: AppTest, name: str) -> AppTest:
    """Open one of the app's tabs (only the open tab is drawn), as a click on it does."""
    at.session_state["view"] = name
    return at.run()


def app_for(folder: Path) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["folder"] = str(folder)
    return at


def chart_data(at: AppTest) -> list[list]:
    """For each chart on the page, its datasets as pandas frames."""
    return [
        [pa.ipc.open_stream(d.data.data).read_pandas() for d in el.proto.datasets]
        for el in at.get("vega_lite_chart")
    ]


def shown(markdown: str) -> str:
    """What a reader sees of a message: the app escapes names with backslashes."""
    return re.sub(r"\\(.)", r"\1", markdown)


def frames_with(at: AppTest, *columns: str) -> list:
    return [df for chart in chart_data(at) for df in chart if set(columns) <= set(df.columns)]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    if len(SHIPPED) < 2:
        pytest.fail("runs/ must hold the two shipped reference runs")
    folder = tmp_path_factory.mktemp("shipped")
    for path in SHIPPED:
        shutil.copy(path, folder / path.name)
    return folder


def test_default_view_shows_the_shipped_pair(shipped) -> None:
    at = app_for(shipped).run()
    assert not at.exception, [e.value for e in at.exception]
    assert sorted(at.sidebar.multiselect(key="runs").value) == ["cifar10-baseline.h5", "cifar10-bn.h5"]
    curves = frames_with(at, "run", "metric", "split", "value")[0]
    assert set(curves["run"]) == {"cifar10-baseline", "cifar10-bn"}
    assert curves["epoch"].max() == 50
    from icsviz import open_run

    with open_run(shipped / "cifar10-bn.h5") as run:
        expected = run.history["val_accuracy"]
    bn_val = curves[
        (curves["run"] == "cifar10-bn") & (curves["split"] == "validation") & (curves["metric"] == "accuracy")
    ]
    np.testing.assert_allclose(bn_val.sort_values("epoch")["value"], expected)
    assert len(at.get("vega_lite_chart")) >= 8
    # The first screen opens on the most telling comparison, paired by role, with a sentence
    # computed from the data.
    from icsviz import analysis

    with open_run(shipped / "cifar10-baseline.h5") as base, open_run(shipped / "cifar10-bn.h5") as bn:
        comparison = analysis.compare_runs(base, bn)
    telling = max(comparison, key=lambda role: comparison[role][2])
    assert at.sidebar.selectbox(key="layer").value == telling
    a, b, ratio = comparison[telling]
    headline = " ".join(shown(m.value) for m in at.markdown)
    assert f"The {telling} drifted {ratio:.1f}x further" in headline
    assert f"{a:.3g} for cifar10-baseline's" in headline and f"{b:.3g} for cifar10-bn's" in headline
    assert "best validation accuracy" in headline
    # Beside it, the drift score of every nonlinearity's input, runs side by side in model order.
    bars = frames_with(at, "run", "role", "layer", "order", "score")[0]
    with open_run(shipped / "cifar10-baseline.h5") as base, open_run(shipped / "cifar10-bn.h5") as bn:
        scores = {d.layer: d.score for d in analysis.run_drift(bn)}
    fc1 = bars[(bars["run"] == "cifar10-bn") & (bars["role"] == "fc1_relu")]
    assert fc1["layer"].iloc[0] == "fc1_bn" and fc1["score"].iloc[0] == pytest.approx(scores["fc1_bn"])
    assert list(bars[bars["run"] == "cifar10-bn"].sort_values("order")["role"]) == [
        "conv1_relu",
        "conv2_relu",
        "conv3_relu",
        "conv4_relu",
        "fc1_relu",
        "logits_softmax",
    ]


def test_runs_of_different_depths_are_compared_without_pairing_their_layers(
    different_depths, tmp_path
) -> None:
    for label, run in different_depths.items():
        shutil.copy(run.path, tmp_path / f"{label}.h5")
    at = app_for(tmp_path).run()
    assert not at.exception, [e.value for e in at.exception]
    medians = {label: analysis.run_drift_score(run) for label, run in different_depths.items()}
    headline = " ".join(shown(m.value) for m in at.markdown)
    assert "deep and shallow have 3 and 2 nonlinearities, so no layer of one is paired" in headline
    assert f"{medians['deep']:.3g} for deep and {medians['shallow']:.3g} for shallow" in headline
    # No role in the layer list: the layers by their own names only.
    layer = at.sidebar.selectbox(key="layer")
    assert not any(option.startswith("input of") for option in layer.options)
    # The first run's most drifted input that the other run records too: both are drawn.
    deep = analysis.input_drift(different_depths["deep"])
    shared = {name: v for name, v in deep.items() if name in different_depths["shallow"].layer_names}
    assert set(shared) == {"hidden0:preact", "out:preact"}  # not hidden1:preact
    assert layer.value == max(shared, key=shared.__getitem__)
    assert not any("is not in" in info.value for info in at.info)
    dots = frames_with(at, "run", "role", "layer", "order", "score")[0]
    assert sorted(dots[dots["run"] == "deep"]["role"]) == ["1", "2", "3"]
    specs = [el.proto.spec for el in at.get("vega_lite_chart")]
    assert any("not paired: the runs differ in depth" in spec for spec in specs)


def test_a_role_shows_each_run_its_own_tensor(shipped) -> None:
    at = app_for(shipped).run()
    at.sidebar.selectbox(key="layer").set_value("input of fc1_relu").run()
    assert not at.exception, [e.value for e in at.exception]
    bands = frames_with(at, "run", "epoch", "median", "q15", "q85")[0]
    with open_run(shipped / "cifar10-baseline.h5") as base, open_run(shipped / "cifar10-bn.h5") as bn:
        np.testing.assert_allclose(
            bands[bands["run"] == "cifar10-baseline"]["median"],
            base.activations("fc1").quantile(0.5),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            bands[bands["run"] == "cifar10-bn"]["median"], bn.activations("fc1_bn").quantile(0.5), rtol=1e-6
        )
    assert not any("is not in" in i.value for i in at.info)  # both runs have the role


def test_changing_layer_capture_and_runs_updates_the_charts(shipped) -> None:
    at = app_for(shipped).run()
    before = frames_with(at, "run", "x", "density")[0]
    at.sidebar.selectbox(key="layer").set_value("fc1_relu").run()
    after = frames_with(at, "run", "x", "density")[0]
    assert not np.allclose(before["x"].to_numpy()[:10], after["x"].to_numpy()[:10])
    assert after["x"].min() >= 0 - 1e-6 or after["x"].min() > -1  # ReLU outputs start at zero
    # The capture slider picks the histogram's capture.
    at.select_slider(key="capture").set_value(0.0).run()
    start = frames_with(at, "run", "x", "density")[0]
    assert set(start["epoch"]) == {0.0}
    at.select_slider(key="capture").set_value(10.0).run()
    assert set(frames_with(at, "run", "x", "density")[0]["epoch"]) == {10.0}
    # One run only: every chart is about that run.
    at.sidebar.multiselect(key="runs").set_value(["cifar10-bn.h5"]).run()
    assert set(frames_with(at, "run", "metric", "value")[0]["run"]) == {"cifar10-bn"}
    # A BN-only layer: the baseline has no conv1_bn.
    at.sidebar.multiselect(key="runs").set_value(["cifar10-baseline.h5", "cifar10-bn.h5"]).run()
    at.sidebar.selectbox(key="layer").set_value("conv1_bn").run()
    assert any("not in: cifar10-baseline" in info.value for info in at.info)
    assert not at.exception


def test_play_starts_at_the_beginning_and_steps_through_captures(shipped) -> None:
    from icsviz import open_run
    from icsviz.dashboard.data import capture_epochs

    with open_run(shipped / "cifar10-baseline.h5") as a, open_run(shipped / "cifar10-bn.h5") as b:
        options = capture_epochs({"a": a, "b": b})
    at = app_for(shipped).run()
    at.toggle(key="playing").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.select_slider(key="capture").value == options[0]
    time.sleep(0.7)  # one play step later
    at.run()
    assert at.select_slider(key="capture").value == options[1]
    shown = set(frames_with(at, "run", "x", "density")[0]["epoch"])
    assert len(shown) == 1 and shown.pop() == pytest.approx(options[1], abs=1e-4)


def test_percentile_bands_follow_the_recorded_quantiles(shipped) -> None:
    at = app_for(shipped).run()
    at.sidebar.selectbox(key="layer").set_value("fc1").run()
    at.sidebar.selectbox(key="unit").set_value(at.sidebar.selectbox(key="unit").options[1]).run()
    unit = int(at.sidebar.selectbox(key="unit").value.split()[-1])
    bands = frames_with(at, "run", "epoch", "median", "q15", "q85")[0]
    from icsviz import open_run

    with open_run(shipped / "cifar10-bn.h5") as run:
        expected = run.activations("fc1").unit_quantile(unit, 0.85)
    got = bands[bands["run"] == "cifar10-bn"]["q85"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert any("Ioffe & Szegedy 2015" in c.value for c in at.caption)
    at.sidebar.radio(key="bands").set_value("tensorboard").run()
    assert frames_with(at, "q07", "q93", "q31", "q69")
    band_captions = [c.value for c in at.caption if "percentiles, the line is the median" in c.value]
    assert band_captions and "TensorBoard" in band_captions[0] and "Ioffe" not in band_captions[0]


def test_a_folder_with_broken_files_shows_them_and_keeps_working(shipped, tmp_path) -> None:
    shutil.copy(shipped / "cifar10-bn.h5", tmp_path / "good.h5")
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "notes.h5").write_text("not a run")
    data = (shipped / "cifar10-baseline.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    at = app_for(tmp_path).run()
    assert not at.exception
    warnings = " ".join(shown(w.value) for w in at.warning)
    assert "empty.h5 is unreadable" in warnings and "empty (0 bytes)" in warnings
    assert "notes.h5" in warnings and "not an HDF5 file" in warnings
    assert "cut.h5" in warnings and "truncated" in warnings
    assert at.sidebar.multiselect(key="runs").options == ["good.h5"]
    assert frames_with(at, "run", "x", "density")


def test_an_empty_folder_explains_how_to_make_a_run(tmp_path) -> None:
    at = app_for(tmp_path).run()
    assert not at.exception
    assert any("No run files" in info.value for info in at.info)
    assert any("ICSCallback" in md.value for md in at.markdown)


def test_a_folder_whose_runs_are_in_subfolders_points_at_them(tmp_path) -> None:
    (tmp_path / "exp1").mkdir()
    shutil.copy(SHIPPED[0], tmp_path / "exp1" / SHIPPED[0].name)
    at = app_for(tmp_path).run()
    assert not at.exception
    (info,) = at.info
    assert "its subfolders exp1/ hold some" in shown(info.value) and str(tmp_path / "exp1") in shown(
        info.value
    )


def test_a_run_that_grows_while_the_app_is_open_shows_new_captures(tmp_path) -> None:
    path = tmp_path / "growing.h5"
    ready, release = tmp_path / "ready", tmp_path / "release"
    script = textwrap.dedent(f"""
        import sys, time, os
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import tiny_capture, tiny_layout
        from icsviz.store.writer import RunWriter
        layout = tiny_layout()
        w = RunWriter.create({str(path)!r}, layout, {{"run_name": "growing"}})
        for step in range(3):
            w.write_capture(tiny_capture(layout, step * 10))
        w.write_epoch(0, {{"loss": 1.0, "accuracy": 0.5}})
        open({str(ready)!r}, "w").close()
        deadline = time.time() + 120
        while not os.path.exists({str(release)!r}) and time.time() < deadline:
            time.sleep(0.05)
        for step in range(3, 6):
            w.write_capture(tiny_capture(layout, step * 10))
        w.write_epoch(1, {{"loss": 0.5, "accuracy": 0.7}})
        open({str(ready)!r} + "2", "w").close()
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        at = app_for(tmp_path).run()
        assert not at.exception, [e.value for e in at.exception]
        assert len(at.select_slider(key="capture").options) == 3
        assert any("still training" in c.value for c in at.caption)
        at.sidebar.selectbox(key="layer").set_value("block/relu").run()
        release.touch()
        while not Path(str(ready) + "2").exists():
            assert time.time() < deadline + 60 and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.05)
        at.run()  # what the fragment's timer does every few seconds
        assert len(at.select_slider(key="capture").options) == 6
        assert at.sidebar.selectbox(key="layer").value == "block/relu"  # selections survive
        curves = frames_with(at, "run", "metric", "value")[0]
        assert curves["epoch"].max() == 2
    finally:
        proc.kill()
        proc.wait(30)


def test_a_damaged_run_is_marked_and_only_its_damaged_layer_is_left_out(shipped, tmp_path) -> None:
    folder = tmp_path / "damaged"
    folder.mkdir()
    for path in SHIPPED:
        shutil.copy(path, folder / path.name)
    with __import__("h5py").File(folder / "cifar10-bn.h5", "r") as f:
        lid = next(k for k in f["layers"] if decode_text(f["layers"][k].attrs["name"]) == "fc1_relu")
    damage_chunk(folder / "cifar10-bn.h5", f"layers/{lid}/hist_counts")
    (folder / "zeros.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(4096))  # a header and nothing else

    at = app_for(folder).run()
    assert not at.exception, [e.value for e in at.exception]
    assert catalog(folder).wait(60)  # the file after the pair shown first is read in the background
    at.run()
    warnings = " ".join(shown(w.value) for w in at.warning)
    assert "cifar10-bn.h5 is damaged" in warnings and "fc1_relu" in warnings
    assert "zeros.h5 is unreadable" in warnings
    assert sorted(at.sidebar.multiselect(key="runs").value) == ["cifar10-baseline.h5", "cifar10-bn.h5"]
    assert "fc1_relu (cifar10-bn)" in " ".join(shown(c.value) for c in at.sidebar.caption)

    at.sidebar.selectbox(key="layer").set_value("fc1_relu").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("damaged in cifar10-bn" in shown(w.value) for w in at.warning)
    hist = frames_with(at, "run", "density")
    assert hist and all(set(df["run"]) == {"cifar10-baseline"} for df in hist)

    at.sidebar.selectbox(key="layer").set_value("fc1").run()  # an intact layer: both runs
    assert not at.exception
    assert {"cifar10-baseline", "cifar10-bn"} <= set().union(
        *(set(df["run"]) for df in frames_with(at, "run", "density"))
    )


def test_names_from_files_are_shown_as_text_never_as_markdown_or_html(tmp_path) -> None:
    from conftest import tiny_capture, tiny_layout
    from icsviz.dashboard.page import plain
    from icsviz.store.schema import LayerSpec, RunLayout
    from icsviz.store.writer import RunWriter

    base = tiny_layout()
    hostile = "**bold** <script>alert(1)</script> :red[x] $x$"
    layout = RunLayout(
        layers=(LayerSpec(hostile, "Dense", "linear", (4,), 4, (0, 3), 64, 16, 64), base.layers[1]),
        variables=base.variables,
        hist_bins=base.hist_bins,
    )
    with RunWriter.create(tmp_path / "**run**.h5", layout, {"run_name": hostile}) as w:
        for step in range(3):
            w.write_capture(tiny_capture(layout, step))
    with RunWriter.create(tmp_path / "plain.h5", base, {"run_name": "plain"}) as w:
        for step in range(3):
            w.write_capture(tiny_capture(base, step))
    (tmp_path / "_x_ <b>.h5").write_text("not a run")
    at = app_for(tmp_path).run()
    assert not at.exception, [e.value for e in at.exception]
    unreadable = next(w.value for w in at.warning if "unreadable" in w.value)
    assert unreadable.startswith(plain("_x_ <b>.h5")) and "\\<b\\>" in unreadable  # escaped, shows as typed
    assert shown(unreadable).startswith("_x_ <b>.h5 is unreadable")
    assert hostile in at.sidebar.selectbox(key="layer").options  # a widget label: plain text already
    at.sidebar.selectbox(key="layer").set_value(hostile).run()
    assert not at.exception
    absent = next(i.value for i in at.info if "is not in" in i.value)  # the layer's name in a message
    assert shown(absent) == f"Layer {hostile} is not in: plain."
    for element in [*at.markdown, *at.caption, *at.info, *at.warning]:
        assert "<script>" not in element.value and "**bold**" not in element.value, element.value


def test_a_diverged_run_says_where_it_diverged_and_the_page_keeps_working(shipped, tmp_path) -> None:
    from conftest import diverging_run

    shutil.copy(shipped / "cifar10-baseline.h5", tmp_path / "cifar10-baseline.h5")
    diverging_run(tmp_path / "nan.h5", bad_from=3)
    at = app_for(tmp_path).run()
    at.sidebar.multiselect(key="runs").set_value(["cifar10-baseline.h5", "nan.h5"]).run()
    assert not at.exception, [e.value for e in at.exception]
    said = [shown(w.value) for w in at.warning if "diverged" in w.value]
    assert said == [
        "nan diverged: NaN/Inf activations from step 3 (epoch 0.3), first in dense; the training loss "
        "is NaN/Inf from epoch 2; its charts end there."
    ]
    assert frames_with(at, "run", "metric", "split", "value")  # the curves are still drawn
    at = open_tab(at, "Gradients")
    assert not at.exception, [e.value for e in at.exception]
    gradient_titles = [
        t for el in at.get("vega_lite_chart") for t in re.findall(r'"title": "([^"]+)"', el.proto.spec)
    ]
    assert "nan: gradient norm" in gradient_titles and "cifar10-baseline: update ratio" in gradient_titles


def test_a_run_of_one_capture_draws_its_gradient_norms_and_says_it_has_no_update_yet(tmp_path) -> None:
    from conftest import tiny_capture, tiny_layout
    from icsviz.store.writer import RunWriter

    layout = tiny_layout()
    capture = tiny_capture(layout, 4, kind="start")
    capture.update_ratio[:] = np.nan  # no capture before it: no update to measure
    with RunWriter.create(tmp_path / "one.h5", layout, {"run_name": "one"}) as writer:
        writer.write_capture(capture)
        writer.write_epoch(0, {"loss": 1.0})
    at = open_tab(app_for(tmp_path).run(), "Gradients")
    assert not at.exception, [e.value for e in at.exception]
    (norms,) = frames_with(at, "layer", "epoch", "grad_norm")
    # Per layer, its variables together: each variable's norm is 0.5 * step 4.
    per_layer = {v.layer: 0 for v in layout.variables}
    for v in layout.variables:
        per_layer[v.layer] += 1
    expected = {layer: 2.0 * np.sqrt(count) for layer, count in per_layer.items()}
    assert dict(zip(norms["layer"], norms["grad_norm"])) == pytest.approx(expected)
    assert [shown(c.value) for c in at.caption if "nothing to draw" in c.value] == [
        "one: no finite, positive update ratio recorded, nothing to draw."
    ]
    # Nothing has drifted from step 0 yet: said, not drawn as a heatmap of zeros (whose legend
    # read 0.0000000010).
    at = open_tab(app_for(tmp_path).run(), "Drift summary")
    assert not at.exception
    assert any("it shows once a second capture is taken" in info.value for info in at.info)
    assert not frames_with(at, "layer", "t0", "t1")
    # The histogram against time: its one capture centred on its epoch, that epoch the only tick.
    at = app_for(tmp_path).run()
    (heat,) = frames_with(at, "t0", "t1", "log_density")
    assert set(heat["t0"]) == {0.4 - 0.5} and set(heat["t1"]) == {0.4 + 0.5}


def test_gradient_norms_recorded_as_zero_are_said_to_be_zero(tmp_path) -> None:
    """A saturated softmax under Keras's clipped cross-entropy: every gradient norm is 0, which a
    log axis cannot show; the page says so rather than that none was recorded."""
    from conftest import tiny_capture, tiny_layout
    from icsviz.store.writer import RunWriter

    layout = tiny_layout()
    with RunWriter.create(tmp_path / "flat.h5", layout, {"run_name": "flat"}) as writer:
        for step in (0, 10):
            capture = tiny_capture(layout, step, kind="start" if step == 0 else "epoch")
            capture.grad_norm[:] = 0.0
            writer.write_capture(capture)
        writer.write_epoch(0, {"loss": 1.0})
    at = open_tab(app_for(tmp_path).run(), "Gradients")
    assert not at.exception, [e.value for e in at.exception]
    assert [shown(c.value) for c in at.caption if "log axis" in c.value] == [
        "flat: every gradient norm recorded is 0, which a log axis cannot show (the loss does not "
        "reach the weights: a saturated softmax, for one)."
    ]
    assert not any("no labels" in info.value for info in at.info)
    (ratios,) = frames_with(at, "layer", "epoch", "update_ratio")
    assert (ratios["update_ratio"] > 0).all()  # the update ratio is drawn


def test_the_drift_summary_leaves_out_a_run_of_one_capture_and_says_so(tmp_path) -> None:
    from conftest import tiny_capture, tiny_layout
    from icsviz.store.writer import RunWriter

    for name, captures in (("a", 4), ("one", 1)):
        with RunWriter.create(tmp_path / f"{name}.h5", tiny_layout(), {"run_name": name}) as writer:
            for step in range(captures):
                writer.write_capture(
                    tiny_capture(tiny_layout(), step, kind="start" if step == 0 else "epoch")
                )
    at = app_for(tmp_path)
    at.session_state["runs"] = ["a.h5", "one.h5"]
    at = open_tab(at.run(), "Drift summary")
    assert not at.exception, [e.value for e in at.exception]
    assert "Left out, one capture so far: one." in [shown(c.value) for c in at.caption]
    drawn = frames_with(at, "run", "layer", "t0", "t1")
    assert drawn and all(set(df["run"]) == {"a"} for df in drawn)
    titles = [json.loads(chart.proto.spec).get("title") for chart in at.get("vega_lite_chart")]
    assert any(str(t).endswith("drift, run against run") for t in titles), titles  # the run that has one


def test_per_step_runs_show_the_bands_of_every_training_batch(tmp_path) -> None:
    from test_batch_stats import _fit, _probe

    from icsviz import ICSCallback, open_run

    _fit([ICSCallback(tmp_path / "steps.h5", probe=_probe(), batch_stats=True)])
    at = app_for(tmp_path).run()
    assert not at.exception, [e.value for e in at.exception]
    at.sidebar.selectbox(key="layer").set_value("bn").run()
    assert any("every training batch" in s.value for s in at.subheader)
    per_step = frames_with(at, "run", "epoch", "step", "median", "q15", "q85")
    assert len(per_step) == 1
    with open_run(tmp_path / "steps.h5") as run:
        acts = run.batch_activations("bn")
        np.testing.assert_allclose(per_step[0]["q85"].to_numpy(), acts.quantile(0.85), rtol=1e-6)
        np.testing.assert_array_equal(per_step[0]["step"].to_numpy(), acts.steps)


def _specs(at: AppTest) -> list[dict]:
    import json

    return [json.loads(el.proto.spec) for el in at.get("vega_lite_chart")]


def _find(spec: object, key: str) -> list:
    """Every value of `key` anywhere in a Vega-Lite spec."""
    found = []
    if isinstance(spec, dict):
        for k, v in spec.items():
            if k == key:
                found.append(v)
            found += _find(v, key)
    elif isinstance(spec, list):
        for v in spec:
            found += _find(v, key)
    return found


def test_side_by_side_panels_share_their_scales_and_show_time(shipped) -> None:
    at = app_for(shipped).run()
    at.sidebar.selectbox(key="layer").set_value("conv1").run()
    specs = _specs(at)
    # Histogram-against-time heatmaps: one log-density range for both runs.
    heat = [s for s in specs if "log10 density" in str(_find(s, "title"))]
    assert len(heat) == 2
    assert _find(heat[0], "domain") == _find(heat[1], "domain")  # activation axis and log density
    assert len(_find(heat[0], "domain")) == 2
    # The curves' legend sits below the panels, where a narrow page cannot cut it off.
    curves = [s for s in specs if _find(s, "strokeDash")][0]
    assert _find(curves, "legend")[0]["orient"] == "bottom"
    # The bands mark the capture on display.
    bands = [s for s in specs if "median" in str(s) and "q85" in str(s)][0]
    assert any(isinstance(m, dict) and m.get("type") == "rule" or m == "rule" for m in _find(bands, "mark"))
    # Per-unit means: epochs on the x axis, one symmetric colour range for both runs.
    open_tab(at, "Per-unit drift")
    units = [s for s in _specs(at) if "unit mean" in str(_find(s, "title"))]
    assert len(units) == 2
    ranges = [d for s in units for d in _find(s, "domain") if isinstance(d, list) and len(d) == 2]
    assert ranges[0] == ranges[1] and ranges[0][0] == -ranges[0][1]
    assert "epoch (time →)" in str(_find(units[0], "title"))
    # The drift heatmap on a symlog scale: the logits no longer flatten every other layer.
    open_tab(at, "Drift summary")
    drift = [s for s in _specs(at) if "shift (step-0 std)" in str(_find(s, "title")) and "rect" in str(s)]
    assert drift and all("symlog" in _find(s, "type") for s in drift)
    # 51 captures: each its own column, from it to the next one (no gaps, no bins).
    assert all(_find(s, "x2") == [{"field": "t1"}] and not _find(s, "bin") for s in drift)


def test_every_chart_the_app_draws_is_valid_vega_lite(shipped) -> None:
    from altair.utils.schemapi import validate_jsonschema
    from altair.vegalite.v6.schema.core import load_schema

    schema = load_schema()  # the Vega-Lite schema Streamlit's charts are drawn with
    at = app_for(shipped).run()
    assert not at.exception, [e.value for e in at.exception]
    drawn = 0
    for layer in ("conv2_relu", "input of fc1_relu"):
        at.sidebar.selectbox(key="layer").set_value(layer).run()
        for tab in TABS:
            open_tab(at, tab)
            assert not at.exception, [e.value for e in at.exception]
            for spec in _specs(at):
                validate_jsonschema(spec, schema)  # raises on the first spec Vega-Lite would reject
                drawn += 1
    assert drawn >= 2 * 20  # curves, bands, ridgelines, heatmaps, units, drift, gradients


def test_only_the_open_tab_is_drawn(shipped) -> None:
    at = app_for(shipped).run()
    titles = str([_find(s, "title") for s in _specs(at)])
    assert "log10 density" in titles and "gradient norm" not in titles
    open_tab(at, "Gradients")
    titles = str([_find(s, "title") for s in _specs(at)])
    assert "gradient norm" in titles and "log10 density" not in titles
    assert at.session_state["view"] == "Gradients"  # and it stays open across reruns
    at.sidebar.selectbox(key="layer").set_value("conv2").run()
    assert "gradient norm" in str([_find(s, "title") for s in _specs(at)])


def test_relu_histograms_show_live_values_and_the_dead_fraction_apart(shipped) -> None:
    at = app_for(shipped).run()
    at.sidebar.selectbox(key="layer").set_value("conv2_relu").run()
    hist = frames_with(at, "run", "x", "density", "dead")[0]
    with open_run(shipped / "cifar10-baseline.h5") as run:
        acts = run.activations("conv2_relu")
        last = len(run.epochs) - 1  # the slider starts at the last capture
        dead = float(acts.zero_frac[last])
    base = hist[hist["run"] == "cifar10-baseline"]
    assert base["dead"].iloc[0] == pytest.approx(dead)
    assert dead > 0.2  # a ReLU layer: a large share of exact zeros
    # Without the zeros, the bin at 0 is no longer a spike towering over the live values.
    width = float(np.diff(np.sort(base["x"].to_numpy()))[0])
    assert float((base["density"] * width).sum()) == pytest.approx(1.0)  # normalized over live values
    assert any(f"cifar10-baseline {dead:.1%}" in shown(c.value) for c in at.caption)


def sweep_folder(tmp_path: Path, copies: int = 6) -> Path:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(copies):  # a sweep: copies of the shipped pair
        for path in SHIPPED:
            shutil.copy(path, folder / f"sweep{i}-{path.name}")
    return folder


def test_a_new_folder_opens_at_once_and_its_table_fills_in(shipped, tmp_path) -> None:
    folder = sweep_folder(tmp_path)
    at = app_for(folder).run()
    assert not at.exception
    # The first screen does not wait for all 12 files: it opens on the first runs read...
    assert len(at.sidebar.multiselect(key="runs").value) == 2
    table = at.dataframe(key="sweep").value
    assert len(table) == 12 and "not read yet" in set(table["status"])
    assert any("in the background" in c.value for c in at.caption)
    # ...while the catalogue reads the rest in the background, once: it is kept on disk.
    assert catalog(folder).wait(180)
    at.run()
    table = at.dataframe(key="sweep").value
    assert len(at.sidebar.multiselect(key="runs").options) == 12
    assert set(table["status"]) == {"complete"}
    row = table[table["file"] == "sweep2-cifar10-bn.h5"].iloc[0]
    with open_run(folder / "sweep2-cifar10-bn.h5") as run:
        assert row["drift"] == pytest.approx(analysis.run_drift_score(run))
        val = run.history["val_accuracy"]
        assert row["final val acc"] == pytest.approx(val[-1]) and row["best val acc"] == pytest.approx(
            val.max()
        )
        assert row["date"] == str(run.attrs["created"])[:10] and row["epochs"] == len(val)
    assert list(table.columns[:4]) == ["file", "run", "model", "dataset"]


def test_the_background_reading_starts_once_the_page_is_drawn(shipped, tmp_path, monkeypatch) -> None:
    from icsviz.dashboard import entry
    from icsviz.store.catalog import FolderCatalog

    order: list[str] = []
    draw, start = entry.main_area, FolderCatalog._start
    monkeypatch.setattr(entry, "main_area", lambda *a, **k: (order.append("page"), draw(*a, **k))[1])
    monkeypatch.setattr(
        FolderCatalog, "_start", lambda self, todo: (order.append("reader"), start(self, todo))[1]
    )
    folder = sweep_folder(tmp_path, copies=2)
    at = app_for(folder).run()
    assert not at.exception, [e.value for e in at.exception]
    assert order == ["page", "reader"]  # the reader does not compete with the first page for the CPU
    assert catalog(folder).wait(120) and not any(e.pending for e in catalog(folder).entries(background=False))


def test_new_runs_open_on_their_telling_layer_unless_one_was_chosen_by_hand(shipped, tmp_path) -> None:
    folder = sweep_folder(tmp_path, copies=2)
    scan_runs(folder)
    at = app_for(folder).run()
    telling = at.sidebar.selectbox(key="layer").value
    assert telling.startswith("input of ")  # the pair opens on a role
    at.sidebar.multiselect(key="runs").set_value(["sweep0-cifar10-baseline.h5"]).run()
    alone = at.sidebar.selectbox(key="layer").value
    assert not alone.startswith("input of ")  # one run: no roles to pair
    at.sidebar.multiselect(key="runs").set_value(["sweep1-cifar10-baseline.h5", "sweep1-cifar10-bn.h5"]).run()
    assert at.sidebar.selectbox(key="layer").value == telling  # a pair again: back on its telling role
    at.sidebar.selectbox(key="layer").set_value("conv2").run()  # chosen by hand...
    at.sidebar.multiselect(key="runs").set_value(["sweep0-cifar10-baseline.h5", "sweep0-cifar10-bn.h5"]).run()
    assert not at.exception
    assert at.sidebar.selectbox(key="layer").value == "conv2"  # ...it stays where the new runs have it


def test_the_sweep_table_is_built_again_only_when_a_file_changes(shipped, tmp_path) -> None:
    import os

    from icsviz.dashboard import page

    folder = sweep_folder(tmp_path, copies=1)
    (folder / "junk.h5").write_bytes(b"not a run")
    runs = catalog(folder)
    frame = page._sweep_frame_of(runs.entries(wait=True))
    junk = frame[frame["file"] == "junk.h5"].iloc[0]
    assert junk["status"] == "unreadable" and np.isnan(junk["epochs"]) and np.isnan(junk["drift"])
    assert page._sweep_frame_of(runs.entries()) is frame  # the same files: the same table, not rebuilt
    path = folder / "sweep0-cifar10-bn.h5"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = runs.entries(wait=True)
    again = page._sweep_frame_of(changed)
    assert again is not frame
    pd.testing.assert_frame_equal(again, page.sweep_frame(changed))


def test_rows_selected_in_the_sweep_table_are_compared(shipped, tmp_path) -> None:
    folder = sweep_folder(tmp_path, copies=2)
    scan_runs(folder)  # catalogued already
    at = app_for(folder).run()
    files = at.dataframe(key="sweep").value["file"].tolist()
    picks = [files.index("sweep1-cifar10-baseline.h5"), files.index("sweep0-cifar10-bn.h5")]
    at.session_state["sweep"] = {"selection": {"rows": picks, "columns": [], "cells": []}}
    at.run()
    assert not at.exception
    assert at.sidebar.multiselect(key="runs").value == ["sweep1-cifar10-baseline.h5", "sweep0-cifar10-bn.h5"]
    labels = set(frames_with(at, "run", "metric", "split", "value")[0]["run"])
    assert labels == {"sweep1-cifar10-baseline", "sweep0-cifar10-bn"}


def test_the_run_picker_filters_by_name_model_and_date(shipped, tmp_path) -> None:
    folder = sweep_folder(tmp_path)
    scan_runs(folder)
    at = app_for(folder).run()
    assert len(at.sidebar.multiselect(key="runs").options) == 12
    at.sidebar.text_input(key="run_filter").set_value("sweep3 bn").run()
    assert not at.exception
    options = at.sidebar.multiselect(key="runs").options
    chosen = set(at.sidebar.multiselect(key="runs").value)
    assert "sweep3-cifar10-bn.h5" in options and chosen <= set(options)
    assert set(options) - chosen == {"sweep3-cifar10-bn.h5"} - chosen  # others only if already chosen
    assert set(at.dataframe(key="sweep").value["file"]) == {"sweep3-cifar10-bn.h5"}  # the table too
    with open_run(folder / "sweep5-cifar10-bn.h5") as run:
        created = str(run.attrs["created"])[:10]
    at.sidebar.text_input(key="run_filter").set_value(f"{created} cnn_bn").run()
    options = at.sidebar.multiselect(key="runs").options
    assert "sweep5-cifar10-bn.h5" in options and "sweep5-cifar10-baseline.h5" not in (set(options) - chosen)


def test_a_sweep_opens_on_one_baseline_and_one_bn_run(shipped, tmp_path) -> None:
    folder = sweep_folder(tmp_path, copies=3)
    scan_runs(folder)
    at = app_for(folder).run()
    assert at.sidebar.multiselect(key="runs").value == ["sweep0-cifar10-baseline.h5", "sweep0-cifar10-bn.h5"]


def test_a_run_without_accuracy_shows_its_own_metric_and_says_why(tmp_path) -> None:
    import keras

    from icsviz import ICSCallback

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="h"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.SGD(0.05), "mse", metrics=["mae"])  # a regression: no accuracy
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    callback = ICSCallback(tmp_path / "regression.h5", probe=(x[:16], y[:16]))
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_split=0.25, callbacks=[callback])
    at = app_for(tmp_path).run()
    assert not at.exception, [e.value for e in at.exception]
    curves = [spec for spec in _specs(at) if "hconcat" in spec]
    assert len(curves) == 1 and [panel["title"] for panel in curves[0]["hconcat"]] == ["MAE", "Loss"]
    frame = pd.concat(frames_with(at, "run", "metric", "split", "value"))  # one per panel
    assert set(frame["metric"]) == {"mae", "loss"}  # not the learning rate or the epoch time
    val_mae = frame[(frame["metric"] == "mae") & (frame["split"] == "validation")].sort_values("epoch")
    np.testing.assert_allclose(val_mae["value"], history.history["val_mae"], rtol=1e-6)
    assert any("No selected run recorded accuracy" in c.value for c in at.caption)
    assert any(c.value.startswith("MAE and loss per epoch") for c in at.caption)


def test_a_layer_whose_padding_was_left_out_says_so(shipped, tmp_path) -> None:
    from test_masks import padded_tokens, text_model

    from icsviz import ICSCallback

    x, y = padded_tokens(n=64)
    text_model().fit(
        x, y, epochs=1, batch_size=32, verbose=0, callbacks=[ICSCallback(tmp_path / "text.h5", probe=(x, y))]
    )
    at = app_for(tmp_path).run()
    assert not at.exception, [e.value for e in at.exception]
    at.sidebar.selectbox(key="layer").set_value("lstm").run()
    notes = [c.value for c in at.caption if "Keras mask" in c.value]
    assert len(notes) == 1 and "text" in shown(notes[0]), notes
    at.sidebar.selectbox(key="layer").set_value("out").run()  # pooled: no mask, no note
    assert not [c.value for c in at.caption if "Keras mask" in c.value]
    shipped_view = app_for(shipped).run()
    assert not [c.value for c in shipped_view.caption if "Keras mask" in c.value]


def test_a_gans_losses_get_the_two_panels_and_the_caption_names_only_the_lines_drawn(tmp_path) -> None:
    from conftest import gan_losses_run

    gan_losses_run(tmp_path / "gan.h5")
    at = app_for(tmp_path).run()
    assert not at.exception
    captions = [shown(c.value) for c in at.caption]
    # No validation data: no "validation (solid)" line promised; no accuracy asked of a GAN.
    assert (
        "D_loss and G_loss per epoch for every selected run: training (dashed). The dotted rule marks "
        "the capture chosen below."
    ) in captions
    curves = frames_with(at, "run", "epoch", "metric", "value")
    assert sorted({m for df in curves for m in df["metric"]}) == ["d_loss", "g_loss"]
