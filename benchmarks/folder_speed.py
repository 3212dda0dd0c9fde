"""The app on folders of many runs: first render and interactions against the folder's size.

Usage: python benchmarks/folder_speed.py [--sizes 2 200 1000] [--switches 4]

For each size N it makes a folder of N run files written by icsviz's writer (the
shipped pair, hard-linked under sweep names: real files at no disk cost), then
measures in fresh Python processes, with Streamlit's AppTest (the real script,
server side: reading, frames and chart specs, not the browser's drawing):

- cold: the first render of a folder never seen (no catalogue on disk), and the
  one-time cost of the catalogue, read in the background (files per second). The
  worker processes that read run files are ended before it, so it includes their
  start (a real server starts them while it loads the page's modules);
- warm: the first render in a new process with the catalogue on disk (what a
  user gets from the second `icsviz app` on the same folder), and interactions:
  switching the layer (median), typing a filter, choosing two runs in the
  sweep table.

Targets (issue 10): first render <= 1.5 s and every interaction <= 0.3 s,
independent of N. Streamlit's server scans the installed packages for
components once, when it starts (about 0.4 s here, reported apart); AppTest
scans again for every new AppTest, so the measured AppTests share the scan of a
warm-up one, as every session of a real server shares the server's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_folder(where: Path, n: int) -> Path:
    folder = where / f"runs-{n}"
    folder.mkdir()
    shipped = sorted((ROOT / "runs").glob("*.h5"))
    for i in range(n):
        source = shipped[i % len(shipped)]
        target = folder / f"sweep{i // len(shipped):04d}-{source.name}"
        try:
            os.link(source, target)
        except OSError:
            target.write_bytes(source.read_bytes())
    return folder


def measure(folder: str, phase: str, switches: int) -> dict:
    """One phase in this (fresh) process; the numbers as a dict."""
    from streamlit.testing.v1 import AppTest

    import icsviz.dashboard.entry  # noqa: F401  (imports are not rendering)
    from icsviz.store.catalog import catalog
    from icsviz.store.check import stop_workers

    server_components = None

    def app() -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
        at.session_state["folder"] = folder
        if server_components is not None:  # see the module's docstring (a private attribute)
            at._bidi_component_manager = server_components
        return at

    # Streamlit's one-time start (its scan of installed packages) on an empty folder.
    empty = tempfile.mkdtemp()
    warmup = app()
    warmup.session_state["folder"] = empty
    start = time.perf_counter()
    warmup.run()
    out: dict = {"streamlit_start_s": time.perf_counter() - start}
    server_components = warmup._bidi_component_manager
    assert server_components is not None, "this Streamlit's AppTest keeps no component scan to share"

    if phase == "cold":
        stop_workers()  # started by the warm-up's script: the cold render starts its own
    at = app()
    start = time.perf_counter()
    at.run()
    out["first_render_s"] = time.perf_counter() - start
    assert not at.exception, [e.value for e in at.exception]
    runs = catalog(folder)
    if phase == "cold":
        start = time.perf_counter()
        runs.wait()
        files = len(runs.entries())
        out["catalogue_s"] = time.perf_counter() - start
        out["files_per_s"] = files / max(out["catalogue_s"], 1e-9)
        return out
    assert runs.pending == 0, "the warm phase expects the catalogue on disk"

    def timed(action) -> float:
        start = time.perf_counter()
        action()
        assert not at.exception, [e.value for e in at.exception]
        return time.perf_counter() - start

    layers = at.sidebar.selectbox(key="layer").options
    picks = [layers[i] for i in range(1, len(layers), max(1, len(layers) // switches))][:switches]
    out["switch_layer_s"] = statistics.median(
        timed(lambda layer=layer: at.sidebar.selectbox(key="layer").set_value(layer).run()) for layer in picks
    )
    out["filter_s"] = timed(lambda: at.sidebar.text_input(key="run_filter").set_value("sweep0001").run())
    out["clear_filter_s"] = timed(lambda: at.sidebar.text_input(key="run_filter").set_value("").run())
    files = at.dataframe(key="sweep").value["file"].tolist()
    rows = [len(files) - 1, len(files) - 2]

    def select() -> None:
        at.session_state["sweep"] = {"selection": {"rows": rows, "columns": [], "cells": []}}
        at.run()

    out["select_rows_s"] = timed(select)
    assert set(at.sidebar.multiselect(key="runs").value) == {files[i] for i in rows}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 200, 1000])
    parser.add_argument("--switches", type=int, default=4)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.switches)))
        return

    def phase(folder: Path, name: str, cache: Path) -> dict:
        env = {**os.environ, "ICSVIZ_CACHE_DIR": str(cache)}
        done = subprocess.run(
            [sys.executable, __file__, "--measure", str(folder), name, "--switches", str(args.switches)],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    print(f"icsviz app on folders of N runs (copies of the shipped pair), AppTest, {os.cpu_count()} CPUs")
    header = (
        f"{'N':>5} | {'cold first':>10} | {'catalogue':>14} | {'warm first':>10} | {'layer':>6} | "
        f"{'filter':>6} | {'select':>6} | streamlit start"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = make_folder(Path(tmp), n)
            cache = Path(tmp) / f"cache-{n}"
            cold = phase(folder, "cold", cache)
            warm = phase(folder, "warm", cache)
            print(
                f"{n:>5} | {cold['first_render_s']:>8.2f} s | {cold['catalogue_s']:>5.1f} s "
                f"({cold['files_per_s']:>4.1f}/s) | {warm['first_render_s']:>8.2f} s | "
                f"{warm['switch_layer_s']:>4.2f} s | {warm['filter_s']:>4.2f} s | {warm['select_rows_s']:>4.2f} s | "
                f"{warm['streamlit_start_s']:.2f} s",
                flush=True,
            )
    print("targets: first render <= 1.5 s, interactions <= 0.3 s, independent of N")


if __name__ == "__main__":
    main()
