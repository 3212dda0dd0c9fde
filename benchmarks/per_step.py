"""Per-step mode (batch_stats=True): training time with it / without, on CIFAR-shaped data.

Usage: python benchmarks/per_step.py [--images 4096] [--rounds 3] [--models baseline bn]

The statistics run inside the compiled training step, so they cannot be timed
from the callback's hooks: the same model is trained without and with
`ICSCallback(..., batch_stats=True)` (probe captures at the epoch ends only),
one epoch each, alternating for `--rounds` rounds in one process so that a
drifting machine load hits both alike. Time is summed over the training steps
(train function plus every callback's per-batch hooks, the per-step writes
included), leaving out each fit's first 5 steps (tracing). Prints

    ratio = step time with / step time without

Target (issue 8): at most 1.10 on the reference CNN (both models), 1.25 on MobileNetV2
(`--models mobilenetv2`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import keras

from _common import StepTimer, cifar_like
from icsviz import ICSCallback
from icsviz.models import build_model
from icsviz.train import RECIPES, _optimizer

WARMUP = 5


def total(timer: StepTimer) -> float:
    """The seconds of a fit's steps after the first WARMUP (tracing)."""
    return sum(timer.times[WARMUP:])


def measure(name: str, x, y, rounds: int, folder: Path) -> None:
    keras.utils.set_random_seed(0)
    if name == "mobilenetv2":  # 151 captured tensors; SGD, batch 32
        model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
        recipe = RECIPES["bn"]
        model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    else:
        model = build_model(name, (32, 32, 3), 10)
        recipe = RECIPES[name]
        model.compile(_optimizer(recipe), "sparse_categorical_crossentropy", metrics=["accuracy"])
    callback = ICSCallback(folder / f"{name}.h5", probe=(x[:256], y[:256]), batch_stats=True, overwrite=True)
    ratios, plain_steps, with_steps = [], [], []
    for r in range(rounds):
        plain, stats = StepTimer(), StepTimer()
        model.fit(x, y, batch_size=recipe.batch_size, epochs=1, verbose=0, callbacks=[plain.begin, plain.end])
        model.fit(
            x,
            y,
            batch_size=recipe.batch_size,
            initial_epoch=r,
            epochs=r + 1,
            verbose=0,
            callbacks=[stats.begin, callback, stats.end],
        )
        ratios.append(total(stats) / total(plain))
        n = len(plain.times) - WARMUP
        plain_steps.append(total(plain) / n)
        with_steps.append(total(stats) / n)
    print(
        f"{name:8s} batch {recipe.batch_size}: step {statistics.median(plain_steps) * 1e3:.1f} ms plain, "
        f"{statistics.median(with_steps) * 1e3:.1f} ms with batch_stats -> ratio "
        f"{statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["baseline", "bn"])
    args = parser.parse_args()
    x, y = cifar_like(args.images)
    print(
        f"icsviz per-step mode: {args.images} images, keras {keras.__version__} ({keras.backend.backend()})"
    )
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            measure(name, x, y, args.rounds, Path(folder))


if __name__ == "__main__":
    main()
