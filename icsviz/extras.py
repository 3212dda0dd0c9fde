"""Which optional dependency (pip extra) each part of icsviz needs, and the message that says so.

The core (reading run files, `icsviz info`, `check`, `repair`) needs only numpy and h5py;
training needs Keras with a backend, the app Streamlit, the figures matplotlib. A part used
without its dependency raises `ModuleNotFoundError` naming the extra to install, not a
traceback from deep inside an import.
"""

from __future__ import annotations

__all__ = ["EXTRAS", "missing_extra", "require"]

# top-level module -> (the extra that installs it, what needs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "keras": ("train", "recording a run (ICSCallback, icsviz train / experiment)"),
    "tensorflow": ("train", "recording a run with the TensorFlow backend"),
    "streamlit": ("app", "the explorer (icsviz app)"),
    "matplotlib": ("plots", "drawing the figures (icsviz plot / report)"),
}


def missing_extra(exc: ModuleNotFoundError) -> ModuleNotFoundError | None:
    """The clear error for `exc` when it is a missing optional dependency of icsviz, else None."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra, what = EXTRAS[top]
    return ModuleNotFoundError(
        f"{what} needs {top}, which is not installed here: pip install 'icsviz[{extra}]'", name=top
    )


def require(module: str) -> None:
    """Raise the clear error if `module` (one of EXTRAS) cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        error = missing_extra(ModuleNotFoundError(name=module))
        assert error is not None
        raise error
