"""Training time with ICSCallback (default schedule) / without, on CIFAR-shaped data.

Usage: python benchmarks/overhead.py [--images 50000] [--rounds 2] [--models baseline bn]

One model per architecture (reference recipe, batch 32, no augmentation)
trains one-epoch `fit` calls alternately with and without the callback, in
ABBA order so that drifting machine load hits both alike. Printed:
- start: the one-off cost of the first fit with the callback (tracing the
  capture function and the step-0 capture), timed directly around the callback;
- steady state: the median ratio over the later pairs. Each of those fits with
  the callback takes two captures (one where the fit starts, one at the epoch's
  end) where a long run takes one per epoch, so it overstates the overhead of a
  real run slightly. Target: at most 1.03.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import keras

from _common import EpochTimer, cifar_like
from icsviz import ICSCallback
from icsviz.models import build_model
from icsviz.train import RECIPES, _optimizer


class StartCost:
    """Times the callbacks placed between `before` and `after` at the first epoch's start."""

    def __init__(self) -> None:
        self.seconds = 0.0
        owner = self

        class Before(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                owner._t = time.perf_counter()

        class After(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                owner.seconds = time.perf_counter() - owner._t

        self.before, self.after = Before(), After()


def measure(name: str, x, y, rounds: int, probe: int, folder: Path) -> None:
    keras.utils.set_random_seed(0)
    model = build_model(name, (32, 32, 3), 10)
    recipe = RECIPES[name]
    model.compile(_optimizer(recipe), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:640], y[:640], batch_size=recipe.batch_size, epochs=1, verbose=0)  # trace the train step
    callback = ICSCallback(folder / f"{name}.h5", probe=(x[:probe], y[:probe]), overwrite=True)

    def epoch(with_callback: bool) -> float:
        timer = EpochTimer()
        callbacks = [timer.begin] + ([callback] if with_callback else []) + [timer.end]
        start = time.perf_counter()
        model.fit(x, y, batch_size=recipe.batch_size, epochs=1, verbose=0, callbacks=callbacks)
        return time.perf_counter() - start

    epoch(False)  # warm-up: the first fit pays for data conversion and allocations, whoever runs it
    hooks = StartCost()
    start = time.perf_counter()
    timer = EpochTimer()
    model.fit(
        x,
        y,
        batch_size=recipe.batch_size,
        epochs=1,
        verbose=0,
        callbacks=[timer.begin, hooks.before, callback, hooks.after, timer.end],
    )
    first = time.perf_counter() - start
    print(
        f"{name:8s} start: the first epoch with the callback took {first:.1f} s, of which "
        f"{hooks.seconds:.1f} s one-off (tracing the capture function + the step-0 capture)",
        flush=True,
    )
    ratios = []
    for r in range(rounds):
        order = (False, True) if r % 2 else (True, False)
        times = {flag: epoch(flag) for flag in order}
        ratios.append(times[True] / times[False])
        print(
            f"{name:8s} pair {r + 1}: {times[False]:6.1f} s without, {times[True]:6.1f} s with -> "
            f"ratio {ratios[-1]:.3f}",
            flush=True,
        )
    print(
        f"{name:8s} steady state: median ratio {statistics.median(ratios):.3f} over {rounds} pairs",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["baseline", "bn"])
    args = parser.parse_args()
    x, y = cifar_like(args.images)
    print(
        f"icsviz overhead: {args.images} CIFAR-shaped images per epoch, probe {args.probe}, "
        f"keras {keras.__version__} ({keras.backend.backend()})",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            measure(name, x, y, args.rounds, args.probe, Path(tmp))


if __name__ == "__main__":
    main()
