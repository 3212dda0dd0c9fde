"""TensorFlow: the capture with the large variables' norms in one pass each, against all by blocks.

Usage: python benchmarks/norms_one_pass.py [--models baseline bn] [--pairs 60]

`capture/flat.py` takes the norms of the variables of 65,536 values or more (weights, updates,
and every kernel's gradient) with `backend.sum_of_squares`, one pass each (`tf.nn.l2_loss` on
TensorFlow), and the others by blocks. This builds the same capture both ways in one process (the
other way: every norm by blocks and `sum(square(x))`, as before the twenty-ninth session), checks
that their norms agree, and alternates their steady captures: prints the medians, and the median
of the paired differences (blocks less one pass: positive is time saved), as the machine's load
swings by 10-20 % within minutes. Depth.py's models (SGD, probe 64).
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np
from depth import make

from _common import keras_label
from icsviz.capture import backend
from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions


def _built(model: keras.Model, x, y, one_pass: bool) -> tuple[CaptureProgram, float, object]:
    """A capture program traced with the norms one way, its first capture's seconds and result."""
    one_pass_norms, sum_of_squares = backend.squares_summed_in_one_pass, backend.sum_of_squares
    if not one_pass:  # read while the capture is traced, so only the tracing needs them patched
        backend.squares_summed_in_one_pass = lambda: False
        backend.sum_of_squares = lambda t: keras.ops.sum(keras.ops.square(t))
    try:
        program = CaptureProgram(model, select_layers(model), CaptureOptions(), with_gradients=True)
        start = time.perf_counter()
        capture = program.run(x, y, 0.01, step=0, epoch=0.0, time=0.0, kind="epoch")
        return program, time.perf_counter() - start, capture
    finally:
        backend.squares_summed_in_one_pass, backend.sum_of_squares = one_pass_norms, sum_of_squares


def measure(name: str, pairs: int) -> None:
    model, x, y = make(name)
    model.train_on_batch(x[:64], y[:64])
    xt, yt = keras.ops.convert_to_tensor(x[:64]), keras.ops.convert_to_tensor(y[:64])
    blocks, first_blocks, by_blocks = _built(model, xt, yt, one_pass=False)
    one_pass, first_one_pass, in_one_pass = _built(model, xt, yt, one_pass=True)
    differences = {
        key: float(
            np.max(np.abs(getattr(by_blocks, key) - getattr(in_one_pass, key)) / getattr(by_blocks, key))
        )
        for key in ("weight_norm", "grad_norm")
    }

    def timed(program: CaptureProgram) -> float:
        start = time.perf_counter()
        program.measure(xt, yt, 0.01, step=1, epoch=1.0, time=0.0, kind="epoch")
        return time.perf_counter() - start

    for program in (blocks, one_pass, blocks, one_pass):
        timed(program)
    seconds: dict[str, list[float]] = {"blocks": [], "one pass": []}
    for _ in range(pairs):
        seconds["blocks"].append(timed(blocks))
        seconds["one pass"].append(timed(one_pass))
    saved = statistics.median(a - b for a, b in zip(seconds["blocks"], seconds["one pass"]))
    print(
        f"{name:11s} capture by blocks {statistics.median(seconds['blocks']) * 1e3:7.2f} ms, one pass "
        f"{statistics.median(seconds['one pass']) * 1e3:7.2f} ms, paired difference {saved * 1e3:+6.2f} ms | "
        f"first capture {first_blocks:5.2f} s / {first_one_pass:5.2f} s | largest relative difference: "
        f"weight norms {differences['weight_norm']:.1e}, gradient norms {differences['grad_norm']:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["baseline", "bn"])
    parser.add_argument("--pairs", type=int, default=60)
    args = parser.parse_args()
    if not backend.squares_summed_in_one_pass():
        raise SystemExit(f"{keras.backend.backend()} takes every norm by blocks: nothing to compare")
    print(f"icsviz norms, one pass against blocks: {keras_label()}")
    for name in args.models:
        measure(name, args.pairs)


if __name__ == "__main__":
    main()
