"""icsviz: see internal covariate shift while a Keras model trains.

The public API is what `__all__` lists; every other module is private and may
change. The reader side (`open_run`, `Run`, ...) never imports Keras, so
`import icsviz` stays light: `ICSCallback` is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CaptureWarning,
    DamagedRunError,
    DataNotFoundError,
    ICSVizError,
    IncompatibleRunError,
    MissingDataError,
    RunExistsError,
    RunFileError,
    RunInUseError,
    SchemaVersionError,
)
from .extras import missing_extra
from .store.check import RunCheck, check_run
from .store.reader import ActivationStats, GradientStats, ICSStats, LayerInfo, Run, open_run
from .store.schema import SCHEMA_VERSION
from .store.writer import repair_run

if TYPE_CHECKING:
    from .capture.callback import ICSCallback

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "SCHEMA_VERSION",
    "ICSCallback",
    "open_run",
    "repair_run",
    "check_run",
    "RunCheck",
    "Run",
    "LayerInfo",
    "ActivationStats",
    "GradientStats",
    "ICSStats",
    "ICSVizError",
    "RunFileError",
    "SchemaVersionError",
    "DamagedRunError",
    "RunInUseError",
    "RunExistsError",
    "IncompatibleRunError",
    "MissingDataError",
    "DataNotFoundError",
    "CaptureWarning",
]


def __getattr__(name: str) -> Any:
    # Importing Keras takes seconds; the app and the plots never need it.
    if name == "ICSCallback":
        try:
            from .capture.callback import ICSCallback
        except ModuleNotFoundError as exc:
            clear = missing_extra(exc)
            if clear is None:
                raise
            raise clear from None

        return ICSCallback
    raise AttributeError(f"module 'icsviz' has no attribute {name!r}")
