"""Shared fixtures: tiny synthetic runs and tiny Keras models."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Folder catalogues of this test session go to a folder of their own, not the user's ~/.cache.
# Processes the tests start (the app's server, scripts) use the same folder, and only the
# process that made it removes it at exit.
os.environ["ICSVIZ_TEST_CACHE"] = os.environ.get("ICSVIZ_TEST_CACHE") or tempfile.mkdtemp(
    prefix="icsviz-test-cache-"
)
os.environ["ICSVIZ_TEST_CACHE_OWNER"] = os.environ.get("ICSVIZ_TEST_CACHE_OWNER") or str(os.getpid())
os.environ["ICSVIZ_CACHE_DIR"] = os.environ["ICSVIZ_TEST_CACHE"]
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

from icsviz import open_run
from icsviz.store.schema import LayerSpec, RunLayout, VariableSpec
from icsviz.store.writer import Capture, LayerCapture, RunWriter


def _remove_cache_folder(folder: str = os.environ["ICSVIZ_TEST_CACHE"]) -> None:
    if str(os.getpid()) == os.environ.get("ICSVIZ_TEST_CACHE_OWNER"):  # not a forked child
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(_remove_cache_folder)
ROOT = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = ROOT.parent / "shared" / "data" / "cifar-10-batches-py-subset"


def run_script(
    script: str, backend: str, marker: str | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`script` in a fresh Python with Keras on `backend` (which must be chosen before Keras is
    imported), the project and the tests' helpers (model_zoo) importable. With `marker`: asserts
    it ran through and printed it."""
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    if marker is not None:
        assert proc.returncode == 0 and marker in proc.stdout, proc.stderr[-3000:]
    return proc


def free_port() -> int:
    """A TCP port on localhost that nothing listens on, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_layout(units: int = 4, bins: int = 8) -> RunLayout:
    return RunLayout(
        layers=(
            LayerSpec("dense", "Dense", "linear", (units,), units, (0, units - 1), 64, 16, 64),
            LayerSpec("block/relu", "Activation", "activation", (units,), units, (1,), 64, 16, 64),
        ),
        variables=(
            VariableSpec("dense/kernel", "dense", (3, units)),
            VariableSpec("dense/bias", "dense", (units,)),
        ),
        ics_layers=("dense",),
        hist_bins=bins,
    )


def deep_layout(depth: int, units: int = 4, bins: int = 8) -> RunLayout:
    """`depth` Dense layers `d0`, `d1`, ..., each with a kernel and a bias: a deep model's run,
    its numbers from `tiny_capture`."""
    return RunLayout(
        layers=tuple(
            LayerSpec(f"d{k}", "Dense", "linear", (units,), units, (0, units - 1), 64, 16, 64)
            for k in range(depth)
        ),
        variables=tuple(
            VariableSpec(f"d{k}/{part}", f"d{k}", (3, units) if part == "kernel" else (units,))
            for k in range(depth)
            for part in ("kernel", "bias")
        ),
        ics_layers=(),
        hist_bins=bins,
    )


def tiny_capture(layout: RunLayout, step: int, value: float = 1.0, kind: str = "step") -> Capture:
    """A capture whose every number is derived from `step` and `value`."""
    layers = []
    q = len(layout.quantiles)
    for spec in layout.layers:
        b = layout.hist_bins
        layers.append(
            LayerCapture(
                hist_counts=np.arange(b) + step,
                hist_edges=np.linspace(-1, 1, b + 1) * (step + 1),
                quantiles=np.linspace(-1, 1, q) + step,
                moments=np.array([value * step, 1.0 + step, -step - 1.0, step + 1.0]),
                zero_frac=0.25,
                nonfinite=step % 2,
                unit_mean=np.full(spec.n_units, value * step),
                unit_std=np.full(spec.n_units, 1.0),
                unit_quantiles=np.zeros((len(spec.tracked_units), q)) + step,
            )
        )
    v = len(layout.variables)
    return Capture(
        step=step,
        epoch=step / 10,
        time=float(step),
        kind=kind,
        layers=layers,
        grad_norm=np.full(v, 0.5 * step),
        weight_norm=np.full(v, 2.0),
        update_ratio=np.full(v, np.nan if step == 0 else 0.01),
        ics_grad_diff=np.full(len(layout.ics_layers), 0.1 * step),
        ics_grad_cos=np.full(len(layout.ics_layers), 0.9),
    )


@pytest.fixture
def layout() -> RunLayout:
    return tiny_layout()


@pytest.fixture
def tiny_runs(tmp_path, layout):
    """Two open runs, "a" and "b", of four captures and three epochs each."""
    paths = {}
    for label, value in (("a", 1.0), ("b", 3.0)):
        path = tmp_path / f"{label}.h5"
        with RunWriter.create(path, layout, {"run_name": label}) as w:
            for step in range(0, 40, 10):
                w.write_capture(
                    tiny_capture(layout, step, value=value, kind="start" if step == 0 else "epoch")
                )
            for epoch in range(3):
                w.write_epoch(
                    epoch,
                    {
                        "accuracy": 0.5 + epoch / 10,
                        "val_accuracy": 0.4 + epoch / 10,
                        "loss": 1.0 - epoch / 10,
                        "val_loss": 1.1,
                    },
                )
        paths[label] = path
    opened = {label: open_run(p) for label, p in paths.items()}
    yield opened
    for run in opened.values():
        run.close()


def damage_chunk(path: Path, dataset: str, chunk: int = 0) -> None:
    """Flip one byte in the middle of one stored chunk of `dataset`, as a bad disk would."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        info = f[dataset].id.get_chunk_info(chunk)
    offset = info.byte_offset + info.size // 2
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)[0]
        stream.seek(offset)
        stream.write(bytes([byte ^ 0x10]))


def diverging_run(path: Path, *, bad_from: int = 3, captures: int = 6, epochs: int = 3) -> Path:
    """A run whose layer "dense" has NaN/Inf from capture `bad_from` and whose loss is NaN from epoch 2."""
    from icsviz.store.writer import RunWriter

    layout = tiny_layout()
    with RunWriter.create(path, layout, {"run_name": path.stem}) as w:
        for step in range(captures):
            capture = tiny_capture(layout, step)
            for index, layer in enumerate(capture.layers):
                layer.nonfinite = 5 if index == 0 and step >= bad_from else 0
            w.write_capture(capture)
        for epoch in range(epochs):
            w.write_epoch(epoch, {"loss": float("nan") if epoch >= 1 else 1.0, "val_accuracy": 0.5})
    return path


@pytest.fixture(scope="module")
def different_depths(tmp_path_factory):
    """Two trained runs of different depths, {"deep": run, "shallow": run}: MLPs with two ReLU
    layers and with one (fused activations, so each also records its pre-activations)."""
    import keras

    from icsviz import ICSCallback

    folder = tmp_path_factory.mktemp("depths")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(128, 6)).astype("float32"), rng.integers(0, 3, 128)
    for name, widths in (("deep", (16, 16)), ("shallow", (16,))):
        keras.utils.set_random_seed(0)
        layers = [keras.layers.Dense(w, activation="relu", name=f"hidden{i}") for i, w in enumerate(widths)]
        model = keras.Sequential(
            [keras.Input((6,)), *layers, keras.layers.Dense(3, activation="softmax", name="out")]
        )
        model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy", metrics=["accuracy"])
        callback = ICSCallback(folder / f"{name}.h5", probe=(x[:64], y[:64]))
        model.fit(x, y, validation_split=0.25, epochs=3, verbose=0, callbacks=[callback])
    runs = {name: open_run(folder / f"{name}.h5") for name in ("deep", "shallow")}
    yield runs
    for run in runs.values():
        run.close()


def gan_losses_run(path: Path) -> Path:
    """A tiny run whose history is a GAN's: a loss per model ("d_loss", "g_loss"), no "loss", no
    validation data; three epochs."""
    layout = tiny_layout()
    with RunWriter.create(path, layout, {"run_name": path.stem}) as w:
        w.write_capture(tiny_capture(layout, 0, kind="start"))
        for epoch in range(3):
            w.write_capture(tiny_capture(layout, 10 * (epoch + 1), kind="epoch"))
            w.write_epoch(epoch, {"d_loss": 0.7 - epoch / 10, "g_loss": 0.9 + epoch / 10})
    return path
