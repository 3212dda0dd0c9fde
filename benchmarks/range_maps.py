"""What taking a ReLU's range from its input's saves: the capture with and without it.

Usage: python benchmarks/range_maps.py [--models baseline bn mobilenetv2] [--rounds 25]

For each model, in one process: a training step (`train_on_batch`, probe-sized batch), then two
capture programs measured alternately, one taking the range (min, max) of every budget-cut
tensor over its own values, one taking it from the input's for exact monotone maps
(capture/monotone.py; the default). Prints the medians and their ratio to the step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
from depth import make

from _common import keras_label
from icsviz.capture import batched
from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions


def measure(name: str, probe: int, rounds: int) -> None:
    model, x, y = make(name)
    batch_x, batch_y = x[:probe], y[:probe]
    model.train_on_batch(batch_x, batch_y)
    xt, yt = keras.ops.convert_to_tensor(batch_x), keras.ops.convert_to_tensor(batch_y)
    derive = batched._derived_ranges
    programs = {}
    for variant in ("own values", "mapped"):
        # The choice is made while the capture function is traced: patch around the first calls.
        batched._derived_ranges = derive if variant == "mapped" else (lambda plans, dtypes: {})
        program = CaptureProgram(model, select_layers(model, None), CaptureOptions(), with_gradients=True)
        for _ in range(2):
            program.measure(xt, yt, 0.01, step=1, epoch=1.0, time=0.0, kind="epoch")
        programs[variant] = program
    batched._derived_ranges = derive
    mapped = sum(plan.range_from is not None and plan.budget_cut for plan in programs["mapped"].traced)
    times: dict[str, list[float]] = {"step": [], **{variant: [] for variant in programs}}
    for _ in range(rounds):  # interleaved: machine load hits all alike
        start = time.perf_counter()
        model.train_on_batch(batch_x, batch_y)
        times["step"].append(time.perf_counter() - start)
        for variant, program in programs.items():
            start = time.perf_counter()
            program.measure(xt, yt, 0.01, step=1, epoch=1.0, time=0.0, kind="epoch")
            times[variant].append(time.perf_counter() - start)
    step = statistics.median(times["step"])
    parts = " | ".join(
        f"{variant} {statistics.median(t) * 1e3:6.1f} ms (x{statistics.median(t) / step:5.3f})"
        for variant, t in times.items()
    )
    print(f"{name:11s} {mapped:3d} ranges mapped | {parts}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["baseline", "bn", "mobilenetv2"])
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    print(f"icsviz range maps: probe {args.probe}, {keras_label()}")
    for name in args.models:
        measure(name, args.probe, args.rounds)


if __name__ == "__main__":
    main()
