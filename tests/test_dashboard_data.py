from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_capture
from icsviz import open_run
from icsviz.dashboard import data
from icsviz.store.writer import RunWriter


def test_curves_frame(tiny_runs) -> None:
    df = data.curves_frame(tiny_runs)
    assert set(df["split"]) == {"training", "validation"} and set(df["metric"]) == {"accuracy", "loss"}
    acc = df[(df.run == "a") & (df.metric == "accuracy") & (df.split == "training")]
    np.testing.assert_allclose(acc["value"], [0.5, 0.6, 0.7])
    np.testing.assert_array_equal(acc["epoch"], [1, 2, 3])


def test_curves_frame_puts_every_runs_accuracy_in_one_panel(tiny_runs, tmp_path, layout) -> None:
    # A multi-output model logs "cls_accuracy": its curve goes beside the others' "accuracy"
    # (it had a metric of its own, which the app's first panel never showed).
    path = tmp_path / "heads.h5"
    with RunWriter.create(path, layout, {"run_name": "heads"}) as w:
        w.write_capture(tiny_capture(layout, 0, kind="start"))
        for epoch in range(2):
            w.write_epoch(epoch, {"cls_accuracy": 0.3 + epoch / 10, "val_cls_accuracy": 0.2, "loss": 1.0})
    with open_run(path) as heads:
        df = data.curves_frame({"a": tiny_runs["a"], "heads": heads})
    assert set(df["metric"]) == {"accuracy", "loss"}
    own = df[(df.run == "heads") & (df.metric == "accuracy") & (df.split == "training")]
    np.testing.assert_allclose(own["value"], [0.3, 0.4])


def test_nearest_capture_and_histogram_frame(tiny_runs) -> None:
    run = tiny_runs["a"]
    np.testing.assert_allclose(run.epochs, [0, 1, 2, 3])
    assert data.nearest_capture(run, 2.5) == 2 and data.nearest_capture(run, -1) == 0
    assert data.nearest_capture(run, 1.99996) == 2  # a slider value rounded to 4 decimals
    edges = data.shared_edges(tiny_runs, "dense")
    # spans the recorded min..max of every capture of both runs, not the wider dyadic edges
    assert edges[0] == -31 and edges[-1] == 31  # tiny_capture: min = -(step + 1), max = step + 1
    df = data.histogram_frame(tiny_runs, "dense", 2.0, edges)
    assert set(df["epoch"]) == {2.0}
    for _, part in df.groupby("run"):
        assert (part["density"] * np.diff(edges)).sum() == pytest.approx(1.0)


def test_percentiles_drift_and_gradients(tiny_runs) -> None:
    pct = data.percentile_frame(tiny_runs, "dense")
    a = pct[pct.run == "a"]
    np.testing.assert_allclose(a["median"], tiny_runs["a"].activations("dense").quantile(0.5))
    assert {"q15", "q85"} <= set(pct.columns)
    drift = data.drift_frame(tiny_runs)
    b = drift[(drift.run == "b") & (drift.layer == "dense")]
    # mean = 3 * step, std_0 = 1: mean shift from start = 3 * step
    np.testing.assert_allclose(b["mean_shift"], [0, 30, 60, 90])
    from icsviz.analysis import drift_curve

    acts = tiny_runs["b"].activations("dense")
    np.testing.assert_allclose(b["from_start"], drift_curve(acts, "w1", "start"))
    np.testing.assert_allclose(b["from_previous"], drift_curve(acts, "w1", "previous"))
    assert b["from_start"].iloc[0] == 0 and (b["from_start"].iloc[1:] > 0).all()
    grads = data.gradient_frame(tiny_runs)
    g = grads[(grads.run == "a") & (grads.layer == "dense")]
    np.testing.assert_allclose(g["grad_norm"], np.sqrt(2) * 0.5 * np.array([0, 10, 20, 30]))
    assert np.isnan(g["update_ratio"].iloc[0]) and g["update_ratio"].iloc[1] == pytest.approx(0.01)
    ics = data.ics_frame(tiny_runs)
    np.testing.assert_allclose(ics[ics.run == "a"]["grad_diff"], [0, 1, 2, 3], rtol=1e-6)


def test_heatmap_ridgeline_and_units(tiny_runs) -> None:
    run = tiny_runs["a"]
    edges = data.shared_edges({"a": run}, "dense")
    heat = data.heatmap_frame(run, "dense", edges)
    assert set(np.round(heat["t0"], 6)) == {0, 1, 2, 3} and (heat["t1"] > heat["t0"]).all()
    assert data.ridgeline_captures(run, rows=2) == [0, 3]
    units = data.unit_frame(run, "dense", "mean")
    assert len(units) == 4 * 4 and set(units["unit"]) == {0, 1, 2, 3}
    assert data.layer_union(tiny_runs) == ["dense", "block/relu"]


def test_layer_union_keeps_model_order_with_layers_only_one_run_has() -> None:
    from icsviz import open_run

    root = Path(__file__).resolve().parents[1] / "runs"
    with open_run(root / "cifar10-baseline.h5") as base, open_run(root / "cifar10-bn.h5") as bn:
        merged = data.layer_union({"baseline": base, "bn": bn})
        assert set(merged) == set(base.layer_names) | set(bn.layer_names)
        for run in (base, bn):  # each run's own order is kept
            positions = [merged.index(n) for n in run.layer_names]
            assert positions == sorted(positions)
        assert merged.index("conv1_bn") == merged.index("conv1") + 1  # BN right after its conv


def test_histogram_leaves_exact_zeros_out_and_reports_them() -> None:
    from icsviz import open_run

    root = Path(__file__).resolve().parents[1] / "runs"
    with open_run(root / "cifar10-baseline.h5") as run:
        runs = {"baseline": run}
        edges = data.shared_edges(runs, "conv2_relu")
        frame = data.histogram_frame(runs, "conv2_relu", 50.0, edges)
        dead = float(run.activations("conv2_relu").zero_frac[-1])
    width = np.diff(edges)
    mass = frame["density"].to_numpy() * width
    assert frame["dead"].iloc[0] == pytest.approx(dead) and dead > 0.5
    assert mass.sum() == pytest.approx(1.0)
    # With the zeros in, the bin at 0 alone would hold more than half of everything.
    assert mass[0] < 0.5 < dead


def test_runs_of_different_depths_are_not_paired_by_role(different_depths) -> None:
    from icsviz import analysis

    runs = different_depths
    assert [len(analysis.nonlinearity_inputs(run)) for run in runs.values()] == [3, 2]
    # The k-th nonlinearity of one is no counterpart of the other's: no role pairs, and the
    # headline compares each run's median drift score (the sweep table's) instead of layers.
    assert data.role_pairs(runs) == []
    scores = data.drift_scores(runs)
    sentence, telling = data.headline(runs, scores)
    medians = {label: analysis.run_drift_score(run) for label, run in runs.items()}
    # It opens on the first run's input that drifted most among those the other run records
    # (by name): hidden1:preact, deep's alone, only where no shared one has a score.
    shared = {k: v for k, v in scores["deep"].items() if k in ("hidden0:preact", "out:preact")}
    assert telling == max(shared, key=shared.__getitem__)
    rigged = {
        "deep": {"hidden0:preact": 0.1, "hidden1:preact": 0.9, "out:preact": 0.3},
        "shallow": scores["shallow"],
    }
    assert data.headline(runs, rigged)[1] == "out:preact"
    rigged["deep"] = {"hidden0:preact": float("nan"), "hidden1:preact": 0.9, "out:preact": float("nan")}
    assert data.headline(runs, rigged)[1] == "hidden1:preact"
    assert sentence.startswith("deep and shallow have 3 and 2 nonlinearities, so no layer of one is paired")
    assert f"{medians['deep']:.3g} for deep and {medians['shallow']:.3g} for shallow" in sentence
    best = {label: np.nanmax(run.history["val_accuracy"]) for label, run in runs.items()}
    assert f"best validation accuracy: deep {best['deep']:.1%}, shallow {best['shallow']:.1%}." in sentence
    # The chart puts each run's own k-th nonlinearity input at k, named in the tooltip.
    frame = data.role_drift_frame(runs, [], scores)
    shallow = frame[frame["run"] == "shallow"].sort_values("order")
    assert list(shallow["role"]) == ["1", "2"] and list(shallow["layer"]) == ["hidden0:preact", "out:preact"]
    assert shallow["score"].iloc[0] == pytest.approx(scores["shallow"]["hidden0:preact"])
    assert list(frame[frame["run"] == "deep"]["role"]) == ["1", "2", "3"]
    assert data.off_log_scale(frame) == ""  # every score drawn
    # A dead layer's input never moves (0) and a constant one has no spread to measure by (NaN):
    # the log-scale chart leaves both out, and the caption says how many.
    scores["deep"]["hidden0:preact"], scores["deep"]["hidden1:preact"] = 0.0, float("nan")
    frame = data.role_drift_frame(runs, [], scores)
    assert len(frame[frame["run"] == "deep"]) == 3
    assert data.off_log_scale(frame) == (
        "Not on the log scale: 1 of deep's 3 inputs never moved (score 0); 1 of them has no score "
        "(no spread at the first capture to measure by, or a single capture)."
    )
    scores["deep"]["hidden0:preact"] = 0.5  # only the unscored one left: the run is named
    assert data.off_log_scale(data.role_drift_frame(runs, [], scores)) == (
        "Not on the log scale: 1 of deep's 3 inputs has no score (no spread at the first capture "
        "to measure by, or a single capture)."
    )


def test_runs_of_the_same_depth_pair_by_role(different_depths, tmp_path) -> None:
    runs = different_depths
    twin = {"deep": runs["deep"], "again": runs["deep"]}
    pairs = data.role_pairs(twin)
    assert [role for role, _ in pairs] == ["input of hidden0", "input of hidden1", "input of out"]
    sentence, telling = data.headline(twin, data.drift_scores(twin))
    assert telling in dict(pairs) and sentence.startswith(f"The {telling} drifted 1.0x further")
