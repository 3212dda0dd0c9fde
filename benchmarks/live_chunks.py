"""The run file's chunk size while a run is written: a capture's write beside training, per size.

Usage: python benchmarks/live_chunks.py [--models baseline bn mobilenetv2] [--values 4096 1024]
           [--captures 60] [--together 1]

Each flush while a run is written rewrites every chunk a capture touched, whole and with its
checksum, so the bytes a write moves grow with the chunks (`store/writer.py`: 1,024 values per
chunk since the thirtieth session, 4,096 before). For each model (depth.py's, probe 64) one run
file per `--values` chunk size is created in one process; then, `--captures` times, a fresh
capture is taken and written into every file, each write right after a training step, as the
callback's writer thread writes beside training (caches cold: the same write alone, repeated,
takes a third of the time). The order of the files alternates. Printed per size: the write's CPU
time (median; of the first and the second half and of the last tenth: chunks fill and new ones
are allocated as the run grows), its wall time, the paired difference to the first size (positive: less CPU time),
closing the file (compaction), and the file's size before it. `--together 8` writes each capture
8 times in one write, as the callback writes frequent step captures (per capture written).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
from depth import make

from _common import keras_label
from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions
from icsviz.store import writer as run_writer
from icsviz.store.writer import RunWriter


def _created_with(values: int, path: Path, program: CaptureProgram, name: str) -> RunWriter:
    """A run file whose per-capture datasets have chunks of about `values` values."""
    extendable = run_writer._extendable

    def with_size(*args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("values", values)  # the per-step rows pass their own
        extendable(*args, **kwargs)

    run_writer._extendable = with_size
    try:
        return RunWriter.create(path, program.layout, {"model_name": name}, overwrite=True)
    finally:
        run_writer._extendable = extendable


def measure(name: str, sizes: list[int], captures: int, together: int, folder: Path) -> None:
    model, x, y = make(name)
    batch_x, batch_y = x[:64], y[:64]
    program = CaptureProgram(model, select_layers(model, None), CaptureOptions(), with_gradients=True)
    xt, yt = keras.ops.convert_to_tensor(batch_x), keras.ops.convert_to_tensor(batch_y)
    program.run(xt, yt, 0.01, step=0, epoch=0.0, time=0.0, kind="epoch")  # traces; fills the layout
    writers = {v: _created_with(v, folder / f"{name}-{v}.h5", program, name) for v in sizes}
    model.train_on_batch(batch_x, batch_y)
    cpu: dict[int, list[float]] = {v: [] for v in sizes}
    wall: dict[int, list[float]] = {v: [] for v in sizes}
    for i in range(captures):
        capture = program.run(xt, yt, 0.01, step=i + 1, epoch=1.0, time=0.0, kind="epoch")
        for v in sizes if i % 2 == 0 else sizes[::-1]:
            model.train_on_batch(batch_x, batch_y)
            start, start_cpu = time.perf_counter(), time.thread_time()
            writers[v].write_captures([capture] * together)
            wall[v].append((time.perf_counter() - start) / together)
            cpu[v].append((time.thread_time() - start_cpu) / together)
    half, tenth = captures // 2, max(1, captures // 10)
    first = sizes[0]
    for v in sizes:
        size = os.path.getsize(writers[v].path)
        start = time.perf_counter()
        writers[v].close()
        closing = time.perf_counter() - start
        saved = statistics.median(np.subtract(cpu[first], cpu[v]))
        print(
            f"{name:11s} chunks of {v:5d} values: write CPU {statistics.median(cpu[v]) * 1e3:6.2f} ms "
            f"(first half {statistics.median(cpu[v][:half]) * 1e3:6.2f}, second "
            f"{statistics.median(cpu[v][half:]) * 1e3:6.2f}, last tenth {statistics.median(cpu[v][-tenth:]) * 1e3:6.2f}), "
            f"wall {statistics.median(wall[v]) * 1e3:6.2f} ms | paired against {first}: {saved * 1e3:+6.2f} ms "
            f"({saved / statistics.median(cpu[first]) * 100:+5.1f} %) | file {size / 1e6:6.2f} MB, "
            f"closing {closing:4.2f} s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["baseline", "bn", "mobilenetv2"])
    parser.add_argument("--values", nargs="+", type=int, default=[4096, 1024])
    parser.add_argument("--captures", type=int, default=60)
    parser.add_argument("--together", type=int, default=1)
    args = parser.parse_args()
    print(
        f"icsviz live chunk sizes, each write after a training step ({args.together} captures a write): "
        f"probe 64, {keras_label()}"
    )
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            measure(name, args.values, args.captures, args.together, Path(folder))


if __name__ == "__main__":
    main()
