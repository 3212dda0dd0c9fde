"""End to end: `streamlit run app.py` in a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


def _browser_or_skip() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append("Debian's chromium (/usr/bin/chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if missing:
        message = "no browser for the end-to-end test: install " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_renders_charts_in_a_real_browser(tmp_path) -> None:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline and server.poll() is None, "streamlit did not start"
            time.sleep(0.3)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.goto(f"http://127.0.0.1:{port}/", timeout=60000)
            page.wait_for_selector("[data-testid='stVegaLiteChart']", timeout=90000)
            page.wait_for_function(
                "document.querySelectorAll(\"[data-testid='stVegaLiteChart'] canvas, "
                "[data-testid='stVegaLiteChart'] svg\").length >= 4",
                timeout=90000,
            )
            time.sleep(1.0)
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            assert page.locator("[data-testid='stException']").count() == 0
            text = page.inner_text("body")
            assert "internal covariate shift" in text and "Training curves" in text
            browser.close()
        assert (tmp_path / "app.png").stat().st_size > 20000
    finally:
        server.terminate()
        server.wait(30)
