import subprocess
import sys

import icsviz


def test_exported_names_are_locked() -> None:
    assert sorted(icsviz.__all__) == sorted(
        [
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
    )
    for name in icsviz.__all__:
        assert getattr(icsviz, name) is not None


def test_errors_share_one_base_and_a_builtin() -> None:
    assert issubclass(icsviz.RunFileError, (icsviz.ICSVizError, OSError))
    assert issubclass(icsviz.SchemaVersionError, icsviz.RunFileError)
    assert issubclass(icsviz.MissingDataError, KeyError)
    assert issubclass(icsviz.DataNotFoundError, FileNotFoundError)


def test_reading_runs_never_imports_keras_or_tensorflow() -> None:
    code = (
        "import sys, icsviz, icsviz.store.reader, icsviz.store.writer, icsviz.store.catalog;"
        "bad = [m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
