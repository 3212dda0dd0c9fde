"""A capture's HDF5 write as a run grows: per-capture time, file size, closing (compaction).

Usage: python benchmarks/write_speed.py [--models bn mobilenetv2] [--captures 100]

For each model, one real capture (probe 64) is written `--captures` times into a fresh run file
with `RunWriter.write_capture`, as ICSCallback's writer thread does; printed: the median write
of the first and the last 20 captures, the file's size while written (uncompressed chunks,
rewritten in place), the time `close` takes (it compacts the file) and the compacted size.

Then what the writes cost a training thread whose step is Python work, as on a GPU, where the
step's time is Keras dispatching kernels: a tiny model's `train_on_batch` runs alone, then beside
a thread writing the capture over and over, for each way of writing the rows (HDF5 1.14's
`H5Dwrite_multi`, one call for all datasets with Python's lock released, and h5py's one write per
dataset with the lock held, the way before and on older HDF5). Printed: the step alone and beside
the writes, the captures written meanwhile, and the training thread's time lost per capture
written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import keras
import numpy as np
from depth import make

from _common import keras_label
from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions
from icsviz.store import rows
from icsviz.store.writer import Capture, RunWriter


def measure(name: str, captures: int, folder: Path) -> None:
    model, x, y = make(name)
    program = CaptureProgram(model, select_layers(model, None), CaptureOptions(), with_gradients=True)
    xt, yt = keras.ops.convert_to_tensor(x[:64]), keras.ops.convert_to_tensor(y[:64])
    capture = program.run(xt, yt, 0.01, step=1, epoch=1.0, time=0.0, kind="epoch")
    path = folder / f"{name}.h5"
    writer = RunWriter.create(path, program.layout, {"model_name": name}, overwrite=True)
    seconds = []
    for _ in range(captures):
        start = time.perf_counter()
        writer.write_capture(capture)
        seconds.append(time.perf_counter() - start)
    live = os.path.getsize(path)
    start = time.perf_counter()
    writer.close()
    closing = time.perf_counter() - start
    first, last = (statistics.median(part) * 1e3 for part in (seconds[:20], seconds[-20:]))
    print(
        f"{name:11s} {len(program.traced or []):3d} tensors, {captures} captures | write: first 20 {first:5.1f} ms, "
        f"last 20 {last:5.1f} ms | file while written {live / 1e6:6.2f} MB | close {closing:4.2f} s -> "
        f"{os.path.getsize(path) / 1e6:5.2f} MB",
        flush=True,
    )
    path = folder / f"{name}-beside.h5"
    writer = RunWriter.create(path, program.layout, {"model_name": name}, overwrite=True)
    for way in ("one HDF5 call, lock released", "one h5py write per dataset"):
        saved = dict(rows._functions)
        if way.startswith("one h5py"):
            rows._functions.update({"H5Dwrite_multi": None, "H5Fflush": None})
        try:
            alone, beside, written, seconds = _beside_python_steps(writer, capture)
        finally:
            rows._functions.clear()
            rows._functions.update(saved)
        lost = (beside - alone) * (seconds / beside) / max(written, 1)
        print(
            f"{'':11s} beside a Python-bound step ({way}): step {alone * 1e3:4.2f} ms alone, "
            f"{beside * 1e3:4.2f} ms beside the writes (x{beside / alone:4.2f}); {written} captures written "
            f"in {seconds:.1f} s ({seconds / max(written, 1) * 1e3:5.1f} ms each): the training thread lost "
            f"{lost * 1e3:5.1f} ms per capture",
            flush=True,
        )
    writer.close(compact=False)


def _beside_python_steps(
    writer: RunWriter, capture: Capture, seconds: float = 3.0
) -> tuple[float, float, int, float]:
    """(step alone, step beside a thread writing `capture` again and again, captures it wrote,
    seconds): a tiny model's `train_on_batch`, whose time is Python work like a GPU step's."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 16)).astype("float32"), rng.integers(0, 10, 32)

    def steps(duration: float) -> float:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration:
            model.train_on_batch(x, y)
            count += 1
        return (time.perf_counter() - start) / count

    steps(0.5)  # trace and warm up
    alone = steps(seconds / 2)
    stop, written = threading.Event(), [0]

    def write() -> None:
        while not stop.is_set():
            writer.write_capture(capture)
            written[0] += 1

    thread = threading.Thread(target=write)
    thread.start()
    start = time.perf_counter()
    beside = steps(seconds)
    elapsed = time.perf_counter() - start
    stop.set()
    thread.join()
    return alone, beside, written[0], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bn", "mobilenetv2"])
    parser.add_argument("--captures", type=int, default=100)
    args = parser.parse_args()
    print(f"icsviz capture writes: {keras_label()}")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            measure(name, args.captures, Path(folder))


if __name__ == "__main__":
    main()
