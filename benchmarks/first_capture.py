"""Where the first capture goes: tracing, the first run (graph optimization or XLA compile), steady.

Usage: python benchmarks/first_capture.py [--models bn mobilenetv2] [--probe 64]
       KERAS_BACKEND=jax python benchmarks/first_capture.py

For each model (as in depth.py), in one process: Keras's own first training step (tracing and,
on JAX, compiling the train function), then the capture program's tracing (TensorFlow: the
graph and its op count; JAX: tracing and lowering, and the kernels XLA made of it), its
first run (TensorFlow: the function's instantiation, which is where Grappler would rewrite
it; JAX: XLA's compilation, then the run), and the median of later runs. The file is not
created here (`depth.py` counts it).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import keras
from depth import make

from _common import keras_label
from icsviz.capture import backend
from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions

# Instructions of an optimized HLO module's entry computation that are no kernel of their own.
_NOT_KERNELS = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}


def kernels(hlo: str) -> int:
    """The kernels XLA made: the entry computation's instructions, less those that run nothing.
    XLA's compile time grows with them (docs/benchmarks.md, eleventh session)."""
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    ops = re.findall(r"= \S+ ([\w-]+)\(", entry)
    return sum(op not in _NOT_KERNELS for op in ops)


def measure(name: str, probe: int) -> None:
    model, x, y = make(name)
    start = time.perf_counter()
    model.train_on_batch(x[:probe], y[:probe])
    keras_first = time.perf_counter() - start
    program = CaptureProgram(model, select_layers(model, None), CaptureOptions(), with_gradients=True)
    args, _ = program._arguments(
        keras.ops.convert_to_tensor(x[:probe]), keras.ops.convert_to_tensor(y[:probe]), None, 0.01
    )
    compiled = program._function  # the per-call options wrapper, on TensorFlow
    start = time.perf_counter()
    if backend.name() == "tensorflow":
        graph = compiled.__wrapped__.get_concrete_function(*args).graph
        size = f"{len(graph.get_operations())} ops"
    else:
        compiled.lower(*args)
        size = "(jaxpr)"
    traced = time.perf_counter()
    backend.to_numpy(compiled(*args))  # traces again on JAX (lowering is not cached), then compiles
    first = time.perf_counter()
    later = []
    for _ in range(5):
        start_run = time.perf_counter()
        backend.to_numpy(compiled(*args))
        later.append(time.perf_counter() - start_run)
    if backend.name() == "jax":  # the executable just compiled, from JAX's in-memory cache
        size = f"{kernels(compiled.lower(*args).compile().as_text())} kernels"
    print(
        f"{name:11s} Keras's first step {keras_first:5.1f} s | capture: tracing {traced - start:5.1f} s "
        f"{size}, first run {first - traced:5.1f} s, later runs {statistics.median(later) * 1e3:6.1f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["baseline", "bn", "mobilenetv2"])
    parser.add_argument("--probe", type=int, default=64)
    args = parser.parse_args()
    print(f"icsviz first capture: probe {args.probe}, {keras_label()}")
    for name in args.models:
        measure(name, args.probe)


if __name__ == "__main__":
    main()
