"""End to end: `streamlit run app.py` in a real headless Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port

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


@contextlib.contextmanager
def _app_page(port: int, height: int) -> Iterator[Any]:
    """The app on localhost:`port`, loaded in headless Chromium, 1400 pixels wide."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": height})
        page.goto(f"http://127.0.0.1:{port}/", timeout=60000)
        yield page
        browser.close()


def _wait_for_health(server: subprocess.Popen, port: int) -> None:
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.time() < deadline and server.poll() is None, "streamlit did not start"
        time.sleep(0.3)


def _page_text(port: int, screenshot: Path) -> str:
    """Load the app in Chromium, wait until charts are drawn, screenshot it, return its text."""
    with _app_page(port, 2200) as page:
        page.wait_for_selector("[data-testid='stVegaLiteChart']", timeout=90000)
        page.wait_for_function(
            "document.querySelectorAll(\"[data-testid='stVegaLiteChart'] canvas, "
            "[data-testid='stVegaLiteChart'] svg\").length >= 4",
            timeout=90000,
        )
        time.sleep(1.0)
        page.screenshot(path=str(screenshot), full_page=True)
        assert page.locator("[data-testid='stException']").count() == 0
        text = page.inner_text("body")
    assert screenshot.stat().st_size > 20000
    return text


def _icsviz_app(folder: Path, port: int, cwd: Path) -> subprocess.Popen:
    """`icsviz app FOLDER` as users start it, headless on localhost."""
    return subprocess.Popen(
        [sys.executable, "-m", "icsviz.cli", "app", str(folder), "--port", str(port), "--headless"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a listening TCP socket on `port`, from /proc/net (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


def test_app_renders_charts_in_a_real_browser(tmp_path) -> None:
    _browser_or_skip()
    port = free_port()
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
        _wait_for_health(server, port)
        shot = tmp_path / "app.png"
        text = _page_text(port, shot)
        assert "internal covariate shift" in text and "Training curves" in text
        # The first screen tells the story: the computed sentence, on the most telling role.
        from icsviz import analysis, open_run

        with (
            open_run(ROOT / "runs" / "cifar10-baseline.h5") as base,
            open_run(ROOT / "runs" / "cifar10-bn.h5") as bn,
        ):
            comparison = analysis.compare_runs(base, bn)
        telling = max(comparison, key=lambda role: comparison[role][2])
        assert f"The {telling} drifted {comparison[telling][2]:.1f}x further" in text
        assert shot.stat().st_size > 20_000  # a drawn page, not a blank one
    finally:
        server.terminate()
        server.wait(30)


def test_icsviz_app_on_localhost_marks_a_damaged_run_and_draws_the_rest(tmp_path) -> None:
    """The console command as users start it, outside the repository, on a folder with damage."""
    _browser_or_skip()
    from conftest import damage_chunk

    folder = tmp_path / "runs"
    folder.mkdir()
    for path in sorted((ROOT / "runs").glob("*.h5")):
        shutil.copy(path, folder / path.name)
    damage_chunk(folder / "cifar10-bn.h5", "layers/000_conv1/hist_counts")
    (folder / "<img src=x>notes.h5").write_text("not a run")
    port = free_port()
    server = _icsviz_app(folder, port, cwd=tmp_path)
    try:
        _wait_for_health(server, port)
        listening = _listening_addresses(port)
        if listening:  # Linux: the default binds the loopback interface only
            loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
            assert listening <= loopback, listening
        text = _page_text(
            port,
            ROOT / "docs" / "figures" / "app_damaged.png"
            if os.environ.get("ICSVIZ_SCREENSHOTS")
            else tmp_path / "app.png",
        )
        assert "cifar10-bn.h5 is damaged" in text and "conv1" in text
        assert "<img src=x>notes.h5 is unreadable" in text  # a file name shown as text, not HTML
        assert "Training curves" in text
    finally:
        server.terminate()
        server.wait(30)
    # `icsviz app` is the server itself: stopping it stops Streamlit, nothing is left listening.
    deadline = time.monotonic() + 10
    while _listening_addresses(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _listening_addresses(port)


# The runs chosen in the sidebar: the tags of the multiselect (each names its value).
CHIPS = (
    "() => Array.from(document.querySelectorAll(\"[data-testid='stMultiSelect'] [data-tag]\"))"
    ".map(e => e.getAttribute('aria-label'))"
)


def test_rows_chosen_in_the_sweep_table_are_compared_in_a_real_browser(tmp_path) -> None:
    """A folder of a sweep: the catalogue written by another process is used, and clicking rows
    of the table replaces the compared runs."""
    _browser_or_skip()

    from icsviz.store.catalog import scan_runs

    folder = tmp_path / "sweep"
    folder.mkdir()
    for i in range(3):
        for path in sorted((ROOT / "runs").glob("*.h5")):
            shutil.copy(path, folder / f"sweep{i}-{path.name}")
    scan_runs(folder)  # this process writes the catalogue; the server only reads it
    port = free_port()
    server = _icsviz_app(folder, port, cwd=tmp_path)

    def wait_for_chips(page, expected: list[str]) -> None:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            page.wait_for_function(
                f"expected => JSON.stringify(({CHIPS})()) === JSON.stringify(expected)",
                arg=expected,
                timeout=60000,
            )
        except PlaywrightTimeout:
            page.screenshot(path=str(tmp_path / "chips.png"))
            raise AssertionError(f"the sidebar compares {page.evaluate(CHIPS)}, not {expected}") from None

    try:
        _wait_for_health(server, port)
        with _app_page(port, 1600) as page:
            page.wait_for_selector("[data-testid='stVegaLiteChart']", timeout=90000)
            # The sidebar's chips are drawn by their own React tree: on a loaded machine they can
            # come a moment after the first chart (seen once in CI), so wait for them too.
            wait_for_chips(page, ["sweep0-cifar10-baseline.h5", "sweep0-cifar10-bn.h5"])
            assert "not read yet" not in page.inner_text("body")  # the catalogue came from disk
            table = page.locator("[data-testid='stDataFrame']").first
            table.wait_for(timeout=30000)
            box = table.bounding_box()
            assert box is not None
            row_height = 35  # the grid's default; the header row is as tall
            for row, expected in (
                (3, ["sweep1-cifar10-bn.h5"]),
                (4, ["sweep1-cifar10-bn.h5", "sweep2-cifar10-baseline.h5"]),
            ):
                page.mouse.click(box["x"] + 18, box["y"] + row_height * (row + 1) + row_height / 2)
                wait_for_chips(page, expected)
            page.wait_for_selector("[data-testid='stVegaLiteChart']", timeout=90000)
            time.sleep(2.0)
            page.screenshot(path=str(tmp_path / "sweep.png"), full_page=False)
            assert page.locator("[data-testid='stException']").count() == 0
    finally:
        server.terminate()
        server.wait(30)


def test_a_folder_of_deep_runs_never_read_says_it_is_reading_them(tmp_path) -> None:
    """Reading a deep model's run for the first time takes seconds (its check reads every byte):
    the page says so while it waits, then draws the runs."""
    _browser_or_skip()

    from conftest import deep_layout, tiny_capture
    from icsviz.dashboard.entry import READING_NOTE
    from icsviz.store.writer import RunWriter

    folder = tmp_path / "deep"
    folder.mkdir()
    layout = deep_layout(400)  # some 6,000 datasets: a second or more to check on these machines
    with RunWriter.create(folder / "deep-a.h5", layout, {"run_name": "deep-a"}) as writer:
        for step in range(3):
            writer.write_capture(tiny_capture(layout, step))
        writer.write_epoch(0, {"loss": 1.0, "val_accuracy": 0.5})
    shutil.copy(folder / "deep-a.h5", folder / "deep-b.h5")
    port = free_port()
    server = _icsviz_app(folder, port, cwd=tmp_path)
    try:
        _wait_for_health(server, port)
        with _app_page(port, 900) as page:
            spinner = page.wait_for_selector("[data-testid='stSpinner']", timeout=60000)
            assert READING_NOTE.split(":")[0] in spinner.inner_text()
            page.wait_for_selector("[data-testid='stVegaLiteChart']", timeout=90000)
            assert page.locator("[data-testid='stSpinner']").count() == 0  # gone once read
            text = page.inner_text("body")
            assert "deep-a.h5" in text and "deep-b.h5" in text
            assert page.locator("[data-testid='stException']").count() == 0
    finally:
        server.terminate()
        server.wait(30)
