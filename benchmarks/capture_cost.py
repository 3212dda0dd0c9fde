"""Cost of one capture / cost of one training step on a batch of the probe's size.

Usage: python benchmarks/capture_cost.py [--probe 512] [--repeats 5] [--models baseline bn]

A capture needs at least a forward and a backward pass on the probe, so the
floor is about 1 (a training step also updates the weights). Target: at most
1.5. Prints the median over --repeats of each, measured in one process; the
first (tracing) capture is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras

from _common import cifar_like, keras_label
from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions
from icsviz.models import build_model
from icsviz.train import RECIPES, _optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["baseline", "bn"])
    args = parser.parse_args()
    x, y = cifar_like(args.probe)
    print(f"icsviz capture cost: probe {args.probe}, {keras_label()}")
    for name in args.models:
        measure(name, x, y, args.repeats)


def measure(name: str, x, y, repeats: int) -> None:
    keras.utils.set_random_seed(0)
    model = build_model(name, (32, 32, 3), 10)
    model.compile(_optimizer(RECIPES[name]), "sparse_categorical_crossentropy")
    program = CaptureProgram(model, select_layers(model), CaptureOptions(), with_gradients=True)
    xt, yt = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)

    def capture() -> float:
        start = time.perf_counter()
        program.run(xt, yt, 1e-4, step=0, epoch=0.0, time=0.0, kind="step")
        return time.perf_counter() - start

    def step() -> float:
        start = time.perf_counter()
        model.train_on_batch(x, y)
        return time.perf_counter() - start

    first = capture()
    step()  # trace the train function
    captures, steps = [], []
    for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
        captures.append(capture())
        steps.append(step())
    c, s = statistics.median(captures), statistics.median(steps)
    print(
        f"{name:8s} {len(program.traced)} captured tensors: capture {c:.3f} s, train step {s:.3f} s "
        f"-> ratio {c / s:.2f}  (first capture, with tracing: {first:.1f} s)"
    )


if __name__ == "__main__":
    main()
