"""`icsviz report`: one self-contained HTML file (figures embedded) for e-mail.

Configuration and accuracy tables, the figures of `plots`, and a short reading
of the drift numbers generated from `analysis`, linked to the definitions.
Every name from a file is HTML-escaped.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from . import __version__, analysis, plots
from .errors import MissingDataError
from .store.reader import (
    Run,
    accuracy_of,
    better,
    last_finite,
    metric_label,
    metric_names,
    validation_accuracy,
)

__all__ = ["accuracy_table", "drift_reading", "build_report", "write_report"]

Runs = Mapping[str, Run]


def accuracy_table(runs: Runs, metric: str | None = None) -> list[dict[str, object]]:
    """Best and final validation value of `metric`, epoch of best, time per epoch, epochs to the
    first run's best. `metric`: the accuracy, whatever Keras named it (the default); for runs
    compiled without one, the report passes its headline metric (a regression's MAE), best at its
    lowest. A run fitted without validation data gets its training value ("split": "training"),
    and is compared only with a first run measured the same way."""
    direction = better(metric) if metric is not None else 1
    rows: list[dict[str, object]] = []
    target, target_split = math.nan, None
    for i, (label, run) in enumerate(runs.items()):
        history = run.history
        val, split = _validation_series(history, metric), "validation"
        if val is None:
            name = accuracy_of(metric_names(history)) if metric is None else metric
            val, split = (history[name], "training") if name in history else (None, None)
        val = np.array([]) if val is None or direction is None else val
        times = history.get("epoch_time", np.array([]))
        ok = np.isfinite(val)
        best_index = int(np.nanargmax(val * direction)) if ok.any() else None
        best = float(val[best_index]) if best_index is not None else math.nan
        if i == 0:
            target, target_split = best, split
        comparable = np.isfinite(target) and split == target_split
        reach = np.flatnonzero(val * direction >= target * direction) if comparable else np.array([])
        rows.append(
            {
                "run": label,
                "metric": "accuracy" if metric is None else metric,
                "split": split,
                "best": best,
                "best_epoch": int(run.history_epochs[best_index]) + 1 if best_index is not None else None,
                "final": last_finite(val),
                "epochs": len(run.history_epochs),
                "epoch_time": float(np.nanmedian(times)) if len(times) else math.nan,
                "epochs_to_first_best": int(run.history_epochs[reach[0]]) + 1 if len(reach) else None,
            }
        )
    return rows


def _validation_series(history: Mapping[str, np.ndarray], metric: str | None) -> np.ndarray | None:
    if metric is None:
        return validation_accuracy(history)
    return history.get(f"val_{metric}")


def _table_metric(runs: Runs) -> str | None:
    """The metric of the report's first table: None (the accuracy) where a run recorded one,
    else the headline metric where its name says which way is better (a regression's MAE), but
    not a loss (a GAN's "d_loss" is lowest where its discriminator wins, not where it is best)."""
    if any(accuracy_of(run.metric_names) for run in runs.values()):
        return None
    metric = plots.headline_metric(runs)
    if metric is None or "loss" in metric or better(metric) is None:
        return None
    return metric


def drift_reading(runs: Runs) -> list[str]:
    """Plain sentences comparing the first run's drift with each other run's (HTML-safe)."""
    labels = list(runs)
    if len(labels) < 2:
        scores = analysis.run_drift(runs[labels[0]])
        top = sorted((d for d in scores if np.isfinite(d.score)), key=lambda d: -d.score)[:3]
        if not top:
            return []
        named = [f"<b>{html.escape(d.layer)}</b> ({d.score:.2f})" for d in top]
        listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
        which = "The layer that drifted most" if len(top) == 1 else "The layers that drifted most"
        return [f"{which}: {listed}, in <a href='#drift-score'>drift score</a> (step-0 standard deviations)."]
    sentences = []
    first = labels[0]
    for other in labels[1:]:
        if not analysis.same_depth({first: runs[first], other: runs[other]}):
            sentences.append(_unpaired_reading(first, runs[first], other, runs[other]))
            continue
        pairs = dict(analysis.pair_layers({first: runs[first], other: runs[other]}, by="role"))
        comparison = analysis.compare_runs(runs[first], runs[other])
        ranked = [
            (role, pairs[role], a, b, ratio)
            for role, (a, b, ratio) in comparison.items()
            if np.isfinite(ratio) and ratio > 0
        ]
        ranked.sort(key=lambda item: -max(item[4], 1 / item[4]))
        if not ranked:
            sentences.append(
                f"{html.escape(first)} and {html.escape(other)} have no nonlinearity in common to compare."
            )
            continue
        for role, names, a, b, ratio in ranked[:4]:
            which = (
                f"{html.escape(first)} <b>{html.escape(names[first])}</b>, "
                f"{html.escape(other)} <b>{html.escape(names[other])}</b>"
            )
            more, less, factor = (first, other, ratio) if ratio >= 1 else (other, first, 1 / ratio)
            sentences.append(
                f"The {html.escape(role)} ({which}) moved {factor:.1f}x further from its start in "
                f"{html.escape(more)} than in {html.escape(less)} (<a href='#drift-score'>drift score</a> "
                f"{html.escape(first)} {a:.2f}, {html.escape(other)} {b:.2f})."
            )
        ratios = np.array([item[4] for item in ranked])
        sentences.append(
            f"Over the inputs of the {len(ranked)} nonlinearities both runs have (paired by their place in "
            f"the network, not by name), the median ratio is {np.median(ratios):.1f}x; "
            f"{int(np.sum(ratios > 1))} of {len(ratios)} drifted more in {html.escape(first)}."
        )
    return sentences


def _unpaired_reading(first: str, a: Run, other: str, b: Run) -> str:
    """The drift reading of two runs of different depths: no layer of one is the other's
    counterpart, so each run's median drift score."""
    counts = [len(analysis.nonlinearity_inputs(run)) for run in (a, b)]
    medians = [analysis.run_drift_score(run) for run in (a, b)]
    scores = [
        f"{median:.3g} for {html.escape(label)}"
        if np.isfinite(median)
        else f"not known yet for {html.escape(label)} (it has one capture)"
        for label, median in ((first, medians[0]), (other, medians[1]))
    ]
    return (
        f"{html.escape(first)} and {html.escape(other)} have {counts[0]} and {counts[1]} nonlinearities, "
        "so no layer of one is paired with a layer of the other; the median "
        f"<a href='#drift-score'>drift score</a> of the inputs of their nonlinearities is {scores[0]} "
        f"and {scores[1]}."
    )


def _figure_html(fig: plt.Figure, caption: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


_TRAINING_MARK = "*"  # a cell holding training accuracy (no validation data), named below the table


def _fmt(value: object, pattern: str = "{:.4f}") -> str:
    """A table cell: floats by `pattern`, whole numbers with thousands separators, "–" for none."""
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    return pattern.format(value) if isinstance(value, float) else html.escape(str(value))


def _learning_rate(recipe: dict, history: Mapping[str, np.ndarray]) -> str:
    """The recipe's learning rate (`icsviz train`), else the one the callback logged each epoch:
    "0.001", or "0.001 → 1e-05" where a schedule changed it."""
    if recipe.get("learning_rate") is not None:
        return _fmt(recipe["learning_rate"], "{:g}")
    logged = np.asarray(history.get("learning_rate", []), dtype=float)
    logged = logged[np.isfinite(logged)]
    if not len(logged):
        return "–"
    first, last = float(logged[0]), float(logged[-1])
    return f"{first:g}" if np.isclose(first, last, rtol=1e-6) else f"{first:g} → {last:g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left}
th{background:#f5f5f5}figure{margin:1.2em 0}img{max-width:100%}figcaption{color:#555;font-size:.9em}
dt{font-weight:600;margin-top:.6em}.muted{color:#666;font-size:.9em}
"""

_DEFINITIONS = """
<dl>
<dt id='w1'>W1 drift</dt><dd>1-D Wasserstein distance between a layer's histogram at a capture and at step 0
(bin centres weighted by counts), divided by the layer's standard deviation at step 0.</dd>
<dt id='drift-score'>Drift score</dt><dd>The area under a layer's W1 drift curve divided by the length of training
in epochs: its average distance from the starting distribution, in step-0 standard deviations.</dd>
<dt id='js'>Jensen-Shannon divergence</dt><dd>In bits, on a common grid: 0 for identical, 1 for disjoint distributions.</dd>
<dt id='ics'>Gradient shift</dt><dd>Santurkar et al. (2018): ||G - G'|| and cos(G, G'), where G is a layer's
gradient and G' the same gradient after the layers before it took one gradient step.</dd>
</dl>
<p class='muted'>Exact formulas: docs/statistics.md and docs/analysis.md in the icsviz repository.</p>
"""


def build_report(runs: Runs, title: str = "icsviz report") -> str:
    """The report as one HTML string."""
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='muted'>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by icsviz {__version__} "
        f"from {len(runs)} run(s).</p>"
    ]
    config_rows = []
    for label, run in runs.items():
        a, cfg = run.attrs, run.config
        recipe = cfg.get("recipe", {}) if isinstance(cfg.get("recipe"), dict) else {}
        config_rows.append(
            [
                html.escape(label),
                _fmt(a.get("model_name")),
                _fmt(cfg.get("parameters")),
                _fmt(a.get("dataset")),
                _fmt(a.get("train_samples")),
                _fmt(cfg.get("optimizer")),
                _learning_rate(recipe, run.history),
                _fmt(recipe.get("batch_size")),
                _fmt(cfg.get("probe_size")),
                _fmt(a.get("backend")),
                _fmt(run.status),
            ]
        )
    parts.append(
        "<h2>Runs</h2>"
        + _table(
            [
                "run",
                "model",
                "parameters",
                "dataset",
                "train images",
                "optimizer",
                "learning rate",
                "batch",
                "probe",
                "backend",
                "status",
            ],
            config_rows,
        )
    )
    table_metric = _table_metric(runs)
    acc = accuracy_table(runs, table_metric)
    named = "accuracy" if table_metric is None else html.escape(metric_label(table_metric))
    short = "acc" if table_metric is None else named
    first = next(iter(runs))
    parts.append(
        f"<h2>{named[:1].upper()}{named[1:]}</h2>"
        + _table(
            [
                "run",
                f"best val {short}",
                "epoch of best",
                f"final val {short}",
                "epochs",
                "s / epoch",
                f"epochs to reach {first}'s best",
            ],
            [
                [
                    html.escape(str(r["run"])),
                    _fmt(r["best"]) + _TRAINING_MARK * (r["split"] == "training"),
                    _fmt(r["best_epoch"]),
                    _fmt(r["final"]) + _TRAINING_MARK * (r["split"] == "training"),
                    _fmt(r["epochs"]),
                    _fmt(r["epoch_time"], "{:.3g}"),
                    _fmt(r["epochs_to_first_best"]),
                ]
                for r in acc
            ],
        )
        + (
            f"<p class='muted'>{_TRAINING_MARK} Training {named}: the run was fitted without validation data.</p>"
            if any(r["split"] == "training" for r in acc)
            else ""
        )
    )
    diverged = [(label, analysis.divergence(run)) for label, run in runs.items()]
    reading = [
        f"<b>{html.escape(label)}</b> {html.escape(found.describe())}; its figures end there."
        for label, found in diverged
        if found is not None
    ] + drift_reading(runs)
    parts.append("<h2>Reading the drift</h2><ul>" + "".join(f"<li>{s}</li>" for s in reading) + "</ul>")

    metric = metric_label(plots.headline_metric(runs) or "accuracy")
    second = plots.second_metric(runs)  # a GAN's g_loss where no run logged a "loss"
    figures = [
        (
            plots.figure_metric,
            f"Validation {metric} per epoch (training {metric}, dashed, for a run trained without validation data).",
        ),
        (plots.figure_loss, "Training (dashed) and validation (solid) loss.")
        if second is None
        else (
            functools.partial(plots.figure_metric, metric=second),
            f"{metric_label(second)} per epoch (training, dashed; validation, solid, where recorded).",
        ),
        (
            plots.figure_ioffe,
            "15th, 50th and 85th percentiles of the input of one unit of the last hidden layer "
            "over training (Ioffe & Szegedy 2015, Fig. 1).",
        ),
        (
            plots.figure_drift_matrix,
            "W1 drift from step 0 for every layer (rows, model order) over training.",
        ),
        (plots.figure_drift_comparison, "Drift score per layer, run against run."),
        (plots.figure_gradients, "Gradient norm and update ratio per layer."),
        (plots.figure_gradient_shift, "Gradient shift (Santurkar et al. 2018)."),
    ]
    parts.append("<h2>Figures</h2>")
    font_notes: list[str] = []
    with plt.rc_context(plots.STYLE), plots.missing_glyphs_noted(font_notes):
        for make, caption in figures:
            try:
                fig = make(runs)
                left = plots.left_out(fig)
                parts.append(_figure_html(fig, caption + (f" Left out: {'; '.join(left)}." if left else "")))
            except MissingDataError as exc:
                parts.append(
                    f"<p class='muted'>{html.escape(caption)} Not available: {html.escape(str(exc))}</p>"
                )
        key_layers = []
        for run in runs.values():
            try:
                key_layers.append(plots.hidden_input_layer(run))
            except MissingDataError:
                pass
        for layer in dict.fromkeys(key_layers):
            parts.append(
                _figure_html(
                    plots.figure_layer(runs, layer),
                    f"{layer}: histograms over epochs (ridgeline) and against time (heatmap).",
                )
            )
    parts.extend(f"<p class='muted'>Note: {html.escape(note)}.</p>" for note in font_notes)
    parts.append("<h2 id='definitions'>Definitions</h2>" + _DEFINITIONS + "</body></html>")
    return "".join(parts)


def write_report(runs: Runs, out: str | os.PathLike[str], title: str = "icsviz report") -> Path:
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(runs, title), encoding="utf-8")
    return path
