"""The Streamlit explorer: data preparation, charts, views and the page."""

from __future__ import annotations

from pathlib import Path

__all__ = ["streamlit_app_path", "run_script"]


def streamlit_app_path() -> str:
    """The script to hand to `streamlit run` (importing it would start the app)."""
    return str(Path(__file__).with_name("streamlit_app.py"))


def run_script() -> None:
    """The body of the app's script (app.py, streamlit_app.py), run by Streamlit on every rerun.

    The processes that read run files start first, while the page's modules load (about half
    a second each, in parallel): a folder never seen before is read without waiting for them.
    Both steps cost nothing on a rerun.
    """
    from ..store.check import start_workers

    start_workers()
    from .entry import run_app

    run_app()
