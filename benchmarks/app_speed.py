"""The app's speed on the shipped runs: first render and switching layers.

Usage: python benchmarks/app_speed.py [--runs runs] [--switches 6]

Measured with Streamlit's AppTest, which runs the real script server-side (all
data reading and chart building; not the browser's drawing). First render is a
fresh session and fresh caches; switching a layer is a rerun with a new layer,
median over --switches layers. Targets: under 2 s and under 0.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "runs"))
    parser.add_argument("--switches", type=int, default=6)
    args = parser.parse_args()
    import icsviz.dashboard.entry  # noqa: F401  (imports are not the app's rendering time)

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["folder"] = args.runs
    start = time.perf_counter()
    at.run()
    first = time.perf_counter() - start
    assert not at.exception, at.exception
    runs = at.sidebar.multiselect(key="runs").value
    layers = at.sidebar.selectbox(key="layer").options
    picks = [layers[i] for i in range(1, len(layers), max(1, len(layers) // args.switches))][: args.switches]
    times = []
    for layer in picks:
        start = time.perf_counter()
        at.sidebar.selectbox(key="layer").set_value(layer).run()
        times.append(time.perf_counter() - start)
    print(f"icsviz app on {', '.join(runs)} ({len(layers)} layers)")
    print(f"first render: {first:.2f} s (target < 2 s)")
    print(
        f"switch layer: median {statistics.median(times):.2f} s, max {max(times):.2f} s over {len(times)} "
        f"layers (target < 0.5 s)"
    )


if __name__ == "__main__":
    main()
