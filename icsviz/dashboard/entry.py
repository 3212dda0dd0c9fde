"""The Streamlit app: page setup, sidebar, and which views to show.

Run with `streamlit run app.py` (the repository's thin entry point) or
`icsviz app DIR`. The runs folder comes from `-- --runs DIR` on the
command line, the ICSVIZ_RUNS variable, or the sidebar; default `runs/`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import streamlit as st

from ..store.catalog import FolderCatalog, RunEntry, catalog, folders_with_runs
from . import charts, data, page

ICON = Path(__file__).with_name("icon.png")
SHIPPED_PAIR = ("cifar10_cnn", "cifar10_cnn_bn")
LIVE_REFRESH_S = 3.0
PLAY_STEP_S = 0.8
CATALOG_REFRESH_S = 2.0
FIRST_READ = 4  # files read at once when a new folder has no readable run known yet
READING_NOTE = (
    "Reading runs new to this folder's catalogue, or changed since: each file is checked whole "
    "(a few seconds for a deep model's run), and the catalogue keeps what it found."
)
TABS = ["Distributions", "Per-unit drift", "Drift summary", "Gradients"]
DRIFT_FIELDS = {
    "from_start": "W1 from step 0",
    "from_previous": "W1 from the previous capture",
    "mean_shift": "mean shift from step 0",
}


def default_folder(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs")
    known, _ = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return known.runs or os.environ.get("ICSVIZ_RUNS") or "runs"


def default_selection(entries: Sequence[RunEntry]) -> list[str]:
    """The shipped baseline / BN pair when present, else the first two readable runs."""
    readable = [e for e in entries if e.readable]
    firsts = {model: next((e.file for e in readable if e.model == model), None) for model in SHIPPED_PAIR}
    pair = [name for name in firsts.values() if name is not None]  # one baseline, one BN twin
    return pair if len(pair) == 2 else [e.file for e in readable[:2]]


def _first_entries(runs: FolderCatalog, chosen: Sequence[str]) -> list[RunEntry]:
    """The folder's runs. The runs chosen are read now if they were never read; a folder seen
    for the first time opens on its first runs, read now, two at once until there is a pair
    to show; the others are read in the background once the page is drawn (`run_app`)."""
    entries = runs.entries(background=False)
    pending = [e.file for e in entries if e.pending]
    chosen_pending = [name for name in chosen if name in pending]
    if not chosen_pending and (not pending or len(default_selection(entries)) >= 2):
        return entries  # nothing to read now (the background reader reads the rest)
    # A file is read whole once, its check reading every byte: a second or more for a deep
    # model's run. Streamlit shows the spinner only if that takes over half a second.
    with st.spinner(READING_NOTE, show_time=True):
        if chosen_pending:
            runs.read_now(chosen_pending)
            entries = runs.entries(background=False)
            pending = [e.file for e in entries if e.pending]
        pending = pending[:FIRST_READ]
        while pending and len(default_selection(entries)) < 2:
            runs.read_now(pending[:2])
            pending = pending[2:]
            entries = runs.entries(background=False)
    return entries


def matches(entry: RunEntry, query: str) -> bool:
    """Whether every word of `query` occurs in the run's names, model, dataset or date."""
    return all(word in entry.search_text for word in query.lower().split())


def _empty_folder(folder: str) -> None:
    inner = folders_with_runs(folder)
    if inner:  # runs/exp1/*.h5: only the files directly in a folder are listed
        names = ", ".join(f"{page.plain(name)}/" for name in inner)
        st.info(
            f"No run files (\\*.h5) in {page.plain(folder)} itself; its subfolders {names} hold some. "
            f"Type one into **Runs folder** in the sidebar, e.g. {page.plain(os.path.join(folder, inner[0]))}."
        )
        return
    st.info(f"No run files (\\*.h5) in {page.plain(folder)}.")
    st.markdown(
        "Record one by adding the callback to `model.fit`:\n\n"
        "```python\nfrom icsviz import ICSCallback\n"
        "model.fit(x, y, epochs=10, callbacks=[ICSCallback('runs/my-run.h5', probe=(x_val[:512], y_val[:512]))])\n```\n"
        "or train the reference pair: `icsviz experiment --dataset cifar10 --out-dir runs`."
    )


def _capture_control(epochs: list[float]) -> float:
    """A capture slider with a play button that moves it through time."""
    if "capture" not in st.session_state or st.session_state.capture not in epochs:
        st.session_state.capture = epochs[-1]
    left, right = st.columns([6, 1])
    with right:
        playing = st.toggle("▶ Play", key="playing", help="Move through the captures automatically")
    if playing and not st.session_state.get("_was_playing"):
        st.session_state.capture = epochs[0]  # play starts from the beginning
        st.session_state._tick = time.monotonic()
    st.session_state._was_playing = playing
    if playing:

        @st.fragment(run_every=PLAY_STEP_S)
        def advance() -> None:
            # One step per tick: the full rerun a step causes does not step again, however long
            # the page takes to draw (a slow page used to chain steps and skip captures).
            if st.session_state.pop("_stepped", False):
                return
            now = time.monotonic()
            if now - st.session_state.get("_tick", 0.0) < PLAY_STEP_S * 0.75:
                return
            index = epochs.index(st.session_state.capture) if st.session_state.capture in epochs else -1
            if index + 1 < len(epochs):
                st.session_state._tick = now
                st.session_state._stepped = True
                st.session_state.capture = epochs[index + 1]
                st.rerun()

        advance()
    with left:
        return st.select_slider(
            "Capture (epoch)",
            options=epochs,
            key="capture",
            format_func=lambda e: f"{e:.2f}" if e % 1 else f"{e:.0f}",
        )


def main_area(
    folder: str,
    selected: list[str],
    layer: str,
    bands: str,
    unit_choice: str,
    listed: list[RunEntry] | None = None,
) -> None:
    """The page below the sidebar. `listed`: the folder's entries this run already has (None in
    the live fragment, whose reruns must see the files grow)."""
    if listed is None:
        runs = catalog(folder)
        runs.read_now(selected)  # a growing run is read again in its new version before it is drawn
        listed = runs.entries()
    entries = {e.file: e for e in listed}
    chosen = [entries[name] for name in selected if name in entries and entries[name].readable]
    if not chosen:
        st.info("Choose one or more readable runs in the sidebar.")
        return
    keys = tuple(e.key for e in chosen)
    labels = tuple(e.path.stem for e in chosen)
    overview = page._overview(keys, labels)
    if not overview["epochs"]:
        st.info("The selected runs have no captures yet.")
        return
    live = [e.file for e in chosen if e.live]
    if live:
        st.caption(
            f"Live: {page.plain(', '.join(live))} still training; refreshing every {LIVE_REFRESH_S:.0f} s."
        )
    for label, words in overview["diverged"].items():
        if words:
            st.warning(f"{page.plain(label)} {page.plain(words)}; its charts end there.", icon="⚠️")
    sentence, _ = overview["headline"]
    if sentence:
        st.markdown(f"**{page.plain(sentence)}**")
        if not overview["role_drift"].empty:
            page.draw(charts.role_drift_chart, overview["role_drift"], labels, bool(overview["roles"]))
            left_out = data.off_log_scale(overview["role_drift"])
            if left_out:
                st.caption(page.plain(left_out))
    epoch = _capture_control(overview["epochs"])
    page.training_curves(keys, labels, epoch)
    # Only the open tab runs (a new layer redraws one tab, not four); opening another reruns.
    tabs = st.tabs(TABS, key="view", on_change="rerun")
    with tabs[0]:
        if tabs[0].open:
            page.distributions(keys, labels, layer, epoch, bands, unit_choice)
    with tabs[1]:
        if tabs[1].open:
            stat = st.radio("Per-unit statistic", ["mean", "std"], horizontal=True, key="unit_stat")
            page.unit_drift(keys, labels, layer, stat)
    with tabs[2]:
        if tabs[2].open:
            field = st.radio(
                "Drift", list(DRIFT_FIELDS), horizontal=True, key="drift_field", format_func=DRIFT_FIELDS.get
            )
            page.drift_summary(keys, labels, layer, field)
    with tabs[3]:
        if tabs[3].open:
            page.gradients(keys, labels)


def sweep_table(folder: str, query: str, listed: list[RunEntry]) -> None:
    """The runs of the folder in a sortable table, refreshed while the catalogue reads new files."""
    reading = any(e.pending for e in listed)
    expanded = len(listed) > len(SHIPPED_PAIR) or any(not e.readable and not e.pending for e in listed)

    def table() -> None:
        # While files are read the table is a fragment that refreshes on its own and lists the
        # folder again; otherwise it is a plain part of the page and this run's listing holds.
        entries = catalog(folder).entries(background=False) if reading else listed
        shown = [e for e in entries if matches(e, query)]
        pending = sum(e.pending for e in entries)
        count = f"{len(shown)} of {len(entries)}" if len(shown) != len(entries) else f"{len(entries)}"
        with st.expander(f"Runs in {page.plain(folder)} ({count})", expanded=expanded):
            if pending:
                st.caption(
                    f"Reading {pending} of {len(entries)} run files in the background; the table fills "
                    "in as they are read (once: the catalogue is kept for next time)."
                )
            st.caption("Click a column to sort; select rows to compare those runs.")
            page.runs_table(shown)
        chose = st.session_state.pop(page.SWEEP_CHOSE, False)
        if reading and (chose or not pending):
            # A fragment's own rerun: the whole page follows (new runs chosen, or all read).
            st.rerun()

    if reading:
        st.fragment(run_every=CATALOG_REFRESH_S)(table)()
    else:
        table()  # rows chosen here rerun the page once, and the run list below follows them


def run_app() -> None:
    # A file, not an emoji: Streamlit checks a text icon against its emoji pattern, whose
    # compilation costs about 0.6 s of each new process's first page.
    st.set_page_config(page_title="icsviz: internal covariate shift", page_icon=ICON, layout="wide")
    st.title("icsviz: internal covariate shift, made visible")
    folder = st.sidebar.text_input("Runs folder", value=default_folder(), key="folder")
    query = st.sidebar.text_input(
        "Filter runs",
        key="run_filter",
        placeholder="name, model, dataset or date",
        help="Every word must match the run's file name, run name, model, dataset or date (YYYY-MM-DD).",
    )
    runs = catalog(folder)
    entries = _first_entries(runs, st.session_state.get("runs") or [])
    if not entries:
        _empty_folder(folder)
        return
    try:
        _page(folder, query, entries)
    finally:
        if any(e.pending for e in entries):
            # The files not read yet are read on a thread once the page is drawn (the thread
            # would compete with it for the CPU); the sweep table refreshes as they come in.
            runs.entries()


def _page(folder: str, query: str, entries: list[RunEntry]) -> None:
    """The page of a folder with runs: the sweep table, the sidebar's choices, the views."""
    sweep_table(folder, query, entries)

    kept = set(st.session_state.get("runs") or [])  # a chosen run never disappears from the list
    names = [e.file for e in entries if e.readable and (e.file in kept or matches(e, query))]
    damaged = {e.file for e in entries if e.readable and e.damaged}
    selected = st.sidebar.multiselect(
        "Runs",
        names,
        # Once chosen (here or in the sweep table) the selection lives in the session state;
        # a default beside it would make Streamlit warn in the server's log on every choice.
        default=None if "runs" in st.session_state else default_selection(entries),
        key="runs",
        format_func=lambda name: f"{name} (damaged)" if name in damaged else name,
        help="Runs to show side by side, on shared axes",
    )
    chosen = [e for e in entries if e.file in selected]
    if not chosen:
        st.info("Choose one or more runs in the sidebar.")
        return
    overview = page._overview(tuple(e.key for e in chosen), tuple(e.path.stem for e in chosen))
    layers = overview["layers"]
    if not layers:
        st.info("The selected runs captured no layers.")
        return
    roles = dict(overview["roles"])
    options = [*roles, *layers]
    sentence, telling = overview["headline"]
    default = telling if telling in options else options[0]
    # New runs open on their own most telling layer, unless a layer was chosen by hand (one that
    # is not the default the page last opened on) and the new runs have it too.
    shown_before = st.session_state.get("layer")
    if shown_before not in options or shown_before == st.session_state.get("_layer_default"):
        st.session_state.layer = default
    st.session_state._layer_default = default
    layer = st.sidebar.selectbox(
        "Layer",
        options,
        key="layer",
        format_func=lambda name: (
            f"{name}: " + ", ".join(f"{run} {tensor}" for run, tensor in roles[name].items())
            if name in roles
            else name
        ),
        help="Paired by role: the input of each nonlinearity, whatever its name in each run (the "
        "baseline's fc1, the BN twin's fc1_bn). Then every layer by name, in model order.",
    )
    lost = [f"{name} ({e.path.stem})" for e in chosen for name in e.damaged_layers]
    if lost:
        st.sidebar.caption("Damaged, left out: " + page.plain(", ".join(lost)))
    bands = st.sidebar.radio(
        "Percentile bands",
        ["ioffe", "tensorboard"],
        key="bands",
        format_func=lambda b: "15/50/85 (Ioffe)" if b == "ioffe" else "7-93 normal bands (TensorBoard)",
    )
    tracked = sorted({u for tracked in overview["tracked"].values() for u in tracked.get(layer, [])})
    unit_choice = st.sidebar.selectbox(
        "Bands of", ["whole layer"] + [f"unit {u}" for u in tracked], key="unit"
    )

    if any(e.live for e in chosen):
        st.fragment(run_every=LIVE_REFRESH_S)(main_area)(folder, selected, layer, bands, unit_choice)
    else:
        main_area(folder, selected, layer, bands, unit_choice, entries)


if __name__ == "__main__":
    run_app()
