"""The Streamlit explorer: data preparation, charts, views and the page."""

from __future__ import annotations

from pathlib import Path

__all__ = ["streamlit_app_path"]


def streamlit_app_path() -> str:
    """The script to hand to `streamlit run` (importing it would start the app)."""
    return str(Path(__file__).with_name("streamlit_app.py"))
