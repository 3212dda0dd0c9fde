"""Where a steady capture's time goes, part by part, against a training step of the same batch.

Usage: python benchmarks/capture_parts.py [--models baseline bn] [--repeats 25] [--probe 64]

The models are depth.py's (its names: baseline, bn, lstm, mobilenetv2, resnet50, ...), trained
by SGD as there.

Three compiled functions of the same probe, each a part more than the one before, are
alternated with Keras's own training step (`train_on_batch` on a batch of the probe's size),
so that the machine's load, which swings by 10-20 % within minutes here, hits all alike:

- pass: the capture's forward and backward pass alone: the loss and every gradient (one value
  of each is returned, so that TensorFlow does not prune the gradients no result needs);
- + norms: and the weights copied for the next capture's update ratios, the weight, update and
  gradient norms (a capture program that records no layer);
- + statistics: the capture as icsviz compiles it, with the statistics of every captured tensor;
- measure: the same through `CaptureProgram.measure`, as the callback calls it: its Python
  around the call, and the results brought to numpy.

Each function's results are brought to numpy. Prints the medians in milliseconds and in training
steps. What the file write then adds to the next step is `depth.py`'s to measure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import keras
from depth import make

from _common import keras_label
from icsviz.capture import backend
from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions

ops = keras.ops


class _PassOnly(CaptureProgram):
    """The capture's forward and backward pass, without norms or statistics."""

    def _program(self, trainable, non_trainable, previous, x, y, sample_weight, learning_rate, masked=False):  # type: ignore[no-untyped-def, override]
        loss, _, grads = backend.value_and_grad(
            lambda params: self._forward(params, non_trainable, x, y, sample_weight, None), trainable
        )
        return {"loss": loss, "kept": ops.stack([ops.reshape(g, (-1,))[0] for g in grads])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["baseline", "bn"])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--probe", type=int, default=64)
    args = parser.parse_args()
    print(f"icsviz capture parts: probe {args.probe}, median of {args.repeats}, {keras_label()}")
    for name in args.models:
        measure(name, args.probe, args.repeats)


def measure(name: str, probe: int, repeats: int) -> None:
    model, x, y = make(name)
    x, y = x[:probe], y[:probe]
    xt, yt = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    options = CaptureOptions()
    programs = {
        "pass": _PassOnly(model, [], options, with_gradients=True),
        "+ norms": CaptureProgram(model, [], options, with_gradients=True),
        "+ statistics": CaptureProgram(model, select_layers(model), options, with_gradients=True),
    }
    full = programs["+ statistics"]
    full.run(xt, yt, 0.01, step=0, epoch=0.0, time=0.0, kind="epoch")  # traces it, plans the tensors
    arguments = {key: program._arguments(xt, yt, None, 0.01)[0] for key, program in programs.items()}

    def called(key: str) -> Callable[[], Any]:
        program, call_args = programs[key], arguments[key]
        return lambda: backend.to_numpy(program._function(*call_args))

    parts: dict[str, Callable[[], Any]] = {key: called(key) for key in programs}
    parts["measure"] = lambda: full.measure(xt, yt, 0.01, step=1, epoch=1.0, time=0.0, kind="epoch")
    parts["training step"] = lambda: model.train_on_batch(x, y)
    for part in parts.values():  # trace and warm each
        part()
        part()
    seconds: dict[str, list[float]] = {key: [] for key in parts}
    for _ in range(repeats):
        for key, part in parts.items():
            start = time.perf_counter()
            part()
            seconds[key].append(time.perf_counter() - start)
    step = statistics.median(seconds["training step"])
    medians = {key: statistics.median(values) for key, values in seconds.items()}
    row = " | ".join(f"{key} {ms * 1e3:6.1f} ms ({ms / step:4.2f})" for key, ms in medians.items())
    print(f"{name:11s} {len(full.traced or ())} tensors | {row}", flush=True)


if __name__ == "__main__":
    main()
