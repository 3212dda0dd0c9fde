"""Training time with ICSCallback (default schedule) / without, on CIFAR-shaped data.

Usage: python benchmarks/overhead.py [--images 50000] [--epochs 2] [--models baseline bn]

Prints, per model, the ratio of epoch times with / without the callback:
epoch 1 includes the one-off costs (tracing the capture function, the step-0
capture), later epochs the steady state (one capture at the epoch's end).
Both runs use the reference recipe (batch 32, no augmentation) and the same
seed; only the callback differs. Target: at most 1.03.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import EpochTimer, cifar_like

import keras

from icsviz import ICSCallback
from icsviz.models import build_model
from icsviz.train import RECIPES, _optimizer


def epoch_times(name: str, x, y, epochs: int, callback: keras.callbacks.Callback | None) -> list[float]:
    keras.utils.set_random_seed(0)
    model = build_model(name, (32, 32, 3), 10)
    recipe = RECIPES[name]
    model.compile(_optimizer(recipe), "sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    callbacks = [timer.begin] + ([callback] if callback else []) + [timer.end]
    model.fit(x, y, batch_size=recipe.batch_size, epochs=epochs, verbose=0, callbacks=callbacks)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["baseline", "bn"])
    args = parser.parse_args()
    x, y = cifar_like(args.images)
    print(
        f"icsviz overhead: {args.images} CIFAR-shaped images, {args.epochs} epochs, probe {args.probe}, "
        f"keras {keras.__version__} ({keras.backend.backend()})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            start = time.perf_counter()
            without = epoch_times(name, x, y, args.epochs, None)
            probe = (x[: args.probe], y[: args.probe])
            cb = ICSCallback(Path(tmp) / f"{name}.h5", probe=probe)
            with_cb = epoch_times(name, x, y, args.epochs, cb)
            for i, (a, b) in enumerate(zip(with_cb, without), 1):
                kind = "incl. one-off tracing + step-0 capture" if i == 1 else "steady state"
                print(
                    f"{name:8s} epoch {i}: {b:7.1f} s without, {a:7.1f} s with -> ratio {a / b:.3f} ({kind})"
                )
            total = sum(with_cb) / sum(without)
            print(
                f"{name:8s} all {args.epochs} epochs: ratio {total:.3f}   [{time.perf_counter() - start:.0f} s]"
            )


if __name__ == "__main__":
    main()
