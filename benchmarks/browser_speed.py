"""The app as a user sees it: a real `icsviz app` server and headless Chromium.

Usage: python benchmarks/browser_speed.py [--runs runs] [--sessions 2]

Needs Chromium at /usr/bin/chromium (`apt-get install -y chromium`) and the
`playwright` package (never `playwright install`: it downloads a browser).

Starts `icsviz app --runs DIR --headless` with an empty catalogue cache, waits
until the server answers, then opens --sessions pages one after the other and
reports when the first chart and all charts are drawn (Vega-Lite charts with a
canvas or SVG inside). The same is measured for a Streamlit app that draws one
small chart, which is what this browser on this machine takes for Streamlit
itself (its JavaScript, the websocket, one Vega embed). The server-side numbers
(AppTest: reading, frames, specs) are `app_speed.py` and `folder_speed.py`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
CHART = "[data-testid='stVegaLiteChart']"
DRAWN = f"{CHART} canvas, {CHART} svg.marks"
ONE_CHART_APP = """
import streamlit as st
st.title("one chart")
st.vega_lite_chart({"data": {"values": [{"a": 1, "b": 2}, {"a": 2, "b": 3}]}, "mark": "point",
    "encoding": {"x": {"field": "a", "type": "quantitative"}, "y": {"field": "b", "type": "quantitative"}}})
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def serve(command: list[str], port: int, env: dict[str, str]) -> subprocess.Popen:
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the server on port {port} did not answer within 60 s: {' '.join(command)}")


def sessions(port: int, count: int) -> list[tuple[float, float, int]]:
    """(first chart drawn, all charts drawn, charts) in seconds from navigation, per session."""
    from playwright.sync_api import sync_playwright

    out = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for _ in range(count):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            start = time.perf_counter()
            page.goto(f"http://localhost:{port}")
            page.wait_for_selector(DRAWN, timeout=120_000)
            first = time.perf_counter() - start
            # All charts: the count of drawn charts equals the count of charts and stays so.
            last, stable_since = -1, time.perf_counter()
            while time.perf_counter() - stable_since < 2.0 and time.perf_counter() - start < 120:
                charts, drawn = page.locator(CHART).count(), page.locator(DRAWN).count()
                if (charts, drawn) != last or drawn < charts:
                    last, stable_since, done = (charts, drawn), time.perf_counter(), time.perf_counter()
                time.sleep(0.05)
            out.append((first, done - start, last[0]))
            page.close()
        browser.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "runs"))
    parser.add_argument("--sessions", type=int, default=2)
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    icsviz = shutil.which("icsviz") or sys.exit("no `icsviz` command: pip install -e .")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ICSVIZ_CACHE_DIR": str(Path(tmp) / "cache")}
        trivial = Path(tmp) / "one_chart.py"
        trivial.write_text(ONE_CHART_APP)
        results = {}
        for label, command in (
            ("Streamlit, one small chart", [sys.executable, "-m", "streamlit", "run", str(trivial)]),
            (f"icsviz app --runs {args.runs}", [icsviz, "app", "--runs", args.runs, "--headless"]),
        ):
            port = free_port()
            flags = ["--server.port", str(port), "--server.headless", "true"]
            full = command + (["--port", str(port)] if command[0] == icsviz else flags)
            start = time.perf_counter()
            server = serve(full, port, env)
            ready = time.perf_counter() - start
            try:
                results[label] = (ready, sessions(port, args.sessions))
            finally:
                server.terminate()
                server.wait(30)
    print(f"headless Chromium, {os.cpu_count()} CPUs; seconds from navigation (server started fresh)")
    for label, (ready, found) in results.items():
        print(f"{label}: server answers after {ready:.1f} s")
        for i, (first, done, charts) in enumerate(found):
            print(f"  session {i + 1}: first chart {first:.1f} s, all {charts} charts {done:.1f} s")


if __name__ == "__main__":
    main()
