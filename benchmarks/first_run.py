"""The first capture as a user's first run pays it: fresh processes, compiled beside or after.

Usage: KERAS_BACKEND=jax python benchmarks/first_run.py [--models bn mobilenetv2] [--probe 64]
           [--rounds 1] [--orders beside after]

`depth.py` counts the first capture inside one process that has compiled the model's training
step before, so XLA's per-process autotuning results are already there when it measures. A
user's first run starts cold. Here each measurement is a process of its own: a one-step `fit`
of a fresh model (batch = probe) without ICSCallback, then with it, its first capture compiled
beside Keras's own first step ("beside", icsviz's order on a CPU) or once that step has run
("after", its order on a GPU: `backend.compiles_after_first_step`). Each process times its `fit`
alone (imports, the device's start and building the model are outside it). The extra seconds
with the callback are everything the run pays for it but its later captures: tracing and
compiling the capture, creating and closing the file, the step-0 capture; they also hold one
steady capture (the epoch end's, milliseconds on a GPU). Rounds alternate the processes.
Issue 8's goals: <= 2 s on the reference CNN, <= 10 s on MobileNetV2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ORDERS = ("beside", "after")


def child(name: str, order: str, probe: int, folder: str) -> None:
    """One process: a one-step fit, timed, printed as a JSON line."""
    from depth import make

    from _common import wait_for_device
    from icsviz import ICSCallback
    from icsviz.capture import backend

    model, x, y = make(name)
    callbacks = []
    if order != "none":
        backend._COMPILE_AFTER_FIRST_STEP = order == "after"
        callbacks = [
            ICSCallback(Path(folder) / f"{name}-{order}.h5", probe=(x[:probe], y[:probe]), overwrite=True)
        ]
    start = time.perf_counter()
    model.fit(x[:probe], y[:probe], batch_size=probe, epochs=1, verbose=0, callbacks=callbacks)
    wait_for_device(model)
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def run_child(name: str, order: str, probe: int, folder: str) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, order, str(probe), folder],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{name} ({order}) failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(lines[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bn", "mobilenetv2"])
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, order, probe, folder = args.child
        child(name, order, int(probe), folder)
        return
    from _common import keras_label

    print(f"first run from outside, fresh processes: probe {args.probe}, {keras_label()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            times: dict[str, list[float]] = {order: [] for order in ("none", *args.orders)}
            for _ in range(args.rounds):
                for order in times:
                    times[order].append(run_child(name, order, args.probe, folder))
            plain = statistics.median(times["none"])
            cells = [f"without {plain:5.1f} s"]
            for order in args.orders:
                seconds = statistics.median(times[order])
                each = ", ".join(f"{t - p:.1f}" for t, p in zip(times[order], times["none"]))
                cells.append(f"{order} {seconds:5.1f} s -> first capture {seconds - plain:5.1f} s ({each})")
            print(f"{name:11s} one-step fit: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
