"""A capture's HDF5 write as a run grows: per-capture time, file size, closing (compaction).

Usage: python benchmarks/write_speed.py [--models bn mobilenetv2] [--captures 100]

For each model, one real capture (probe 64) is written `--captures` times into a fresh run file
with `RunWriter.write_capture`, as ICSCallback's writer thread does; printed: the median write
of the first and the last 20 captures, the file's size while written (uncompressed chunks,
rewritten in place), the time `close` takes (it compacts the file) and the compacted size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import keras
from depth import make

from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions
from icsviz.store.writer import RunWriter


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bn", "mobilenetv2"])
    parser.add_argument("--captures", type=int, default=100)
    args = parser.parse_args()
    print(f"icsviz capture writes: keras {keras.__version__} ({keras.backend.backend()})")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            measure(name, args.captures, Path(folder))


if __name__ == "__main__":
    main()
