"""Per-step mode (batch_stats=True): training time with it / without, on CIFAR-shaped data.

Usage: python benchmarks/per_step.py [--images 4096] [--rounds 2] [--epochs 2] [--models baseline bn]

The statistics run inside the compiled training step, so they cannot be timed from the
callback's hooks: the same model is trained without and with
`ICSCallback(..., batch_stats=True)` (probe captures at the epoch ends only), one fit of
`--epochs` + 1 epochs each, alternating for `--rounds` rounds in one process so that a
drifting machine load hits both alike; each fit's first epoch (tracing, compiling) is not
timed. The plain fit has no callback with batch hooks, as a user's `fit` has none: on JAX
and torch Keras then runs steps without waiting for each step's logs, which the per-step
mode's hooks give up. An epoch's time is all of it (every step, every callback's per-batch
work, the per-step writes), less the time inside ICSCallback's epoch-level hooks (the probe
capture at the epoch's end, which the default schedule pays too). Prints, over the timed
epochs,

    ratio = epoch time with / epoch time without

Target (issue 8): at most 1.10 on the reference CNN (both models), 1.25 on MobileNetV2
(`--models mobilenetv2`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import keras

from _common import EpochTimer, TimedCallback, cifar_like, reference_model
from icsviz import ICSCallback
from icsviz.train import RECIPES

EPOCH_HOOKS = ("on_epoch_begin", "on_epoch_end")  # inside the epoch timer (training begin/end are not)


def measure(name: str, x, y, rounds: int, epochs: int, folder: Path) -> None:
    keras.utils.set_random_seed(0)
    if name == "mobilenetv2":  # 151 captured tensors; SGD, batch 32
        model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
        recipe = RECIPES["bn"]
        model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy", metrics=["accuracy"])
    else:
        model, recipe = reference_model(name)
    ratios, plain_steps, with_steps = [], [], []
    steps = -(-len(x) // recipe.batch_size)
    for _ in range(rounds):
        # One fit per mode, as a user trains: its first epoch traces (and the per-step mode
        # re-traces Keras's train step with the statistics in it), the later ones are timed.
        timed = TimedCallback(
            ICSCallback(folder / f"{name}.h5", probe=(x[:256], y[:256]), batch_stats=True, overwrite=True)
        )
        plain, stats = EpochTimer(), EpochTimer()
        fit = {"batch_size": recipe.batch_size, "epochs": epochs + 1, "verbose": 0}
        model.fit(x, y, callbacks=[plain.begin, plain.end], **fit)
        model.fit(x, y, callbacks=[stats.begin, timed, stats.end], **fit)
        for epoch in range(1, epochs + 1):
            epoch_hooks = sum(timed.hook_seconds[(hook, epoch)] for hook in EPOCH_HOOKS)
            with_time = stats.times[epoch] - epoch_hooks
            ratios.append(with_time / plain.times[epoch])
            plain_steps.append(plain.times[epoch] / steps)
            with_steps.append(with_time / steps)
    print(
        f"{name:11s} batch {recipe.batch_size}: step {statistics.median(plain_steps) * 1e3:.1f} ms plain, "
        f"{statistics.median(with_steps) * 1e3:.1f} ms with batch_stats -> ratio "
        f"{statistics.median(ratios):.3f} (epochs: {', '.join(f'{r:.3f}' for r in ratios)})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per fit (after one untimed)")
    parser.add_argument("--models", nargs="+", default=["baseline", "bn"])
    args = parser.parse_args()
    x, y = cifar_like(args.images)
    print(
        f"icsviz per-step mode: {args.images} images, keras {keras.__version__} ({keras.backend.backend()})"
    )
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            measure(name, x, y, args.rounds, args.epochs, Path(folder))


if __name__ == "__main__":
    main()
