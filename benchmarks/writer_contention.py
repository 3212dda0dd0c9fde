"""What a thread appending HDF5 rows takes from the work beside it: Python, and TensorFlow kernels.

Usage: python benchmarks/writer_contention.py [--seconds 1.0]

ICSCallback writes captures on a thread of its own. This prints how fast pure-Python work and
a loop of TensorFlow matmuls run beside such a writer (150 datasets, one row each and a flush
per round, as a capture of a 150-layer model), each against the same work alone, and how many
rounds the writer managed meanwhile: Python work that keeps its speed while the writer stalls
means they share Python's lock and the writer yields; matmuls that slow while the writer runs
mean they compete for the CPU's cores.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np


def _writer(path: Path, stop: threading.Event, rounds: list[int]) -> None:
    with h5py.File(path, "w", libver="latest") as file:
        datasets = [
            file.create_dataset(f"d{i}", shape=(0, 64), maxshape=(None, 64), chunks=(64, 64), dtype="f4")
            for i in range(150)
        ]
        file.swmr_mode = True
        row = np.random.default_rng(0).random((1, 64), dtype="float32")
        while not stop.is_set():
            for dataset in datasets:
                dataset.resize(dataset.shape[0] + 1, axis=0)
                dataset[-1:] = row
            file.flush()
            rounds[0] += 1


def _beside_writer(work: Callable[[], float], folder: Path) -> tuple[float, int]:
    stop, rounds = threading.Event(), [0]
    thread = threading.Thread(target=_writer, args=(folder / "w.h5", stop, rounds))
    thread.start()
    try:
        return work(), rounds[0]
    finally:
        stop.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()

    def spin() -> float:  # Python iterations per second
        count, end = 0, time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            count += 1
        return count / args.seconds

    import tensorflow as tf

    x = tf.random.normal((1500, 1500))
    matmul = tf.function(lambda a: tf.reduce_sum(tf.matmul(a, a)))
    matmul(x)

    def kernels() -> float:  # seconds for a fixed amount of TensorFlow work
        start = time.perf_counter()
        for _ in range(20):
            matmul(x).numpy()
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        python_alone = spin()
        python_beside, rounds_py = _beside_writer(spin, Path(folder))
        kernels_alone = kernels()
        kernels_beside, rounds_tf = _beside_writer(kernels, Path(folder))
    print(
        f"beside a thread appending HDF5 rows: Python runs at {python_beside / python_alone:.2f} of its speed "
        f"alone (writer rounds: {rounds_py}); TensorFlow matmuls take {kernels_beside / kernels_alone:.2f}x "
        f"their time alone (writer rounds: {rounds_tf})"
    )


if __name__ == "__main__":
    main()
