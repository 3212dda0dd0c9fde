"""Training time with ICSCallback (default schedule) / without, on CIFAR-shaped data.

Usage: python benchmarks/overhead.py [--images 50000] [--epochs 2] [--models baseline bn]

ICSCallback's hooks run in the training loop, so its cost is the time spent
inside them (the file writes run on a thread beside training since 2026-11-26:
on a busy CPU they can still slow the steps they overlap, which this
attribution does not see; benchmarks/depth.py measures that for one capture). This script trains each reference model (recipe batch
size, no augmentation) for `--epochs` epochs with the callback wrapped in a
timer and prints, per epoch,

    ratio = epoch time / (epoch time - time inside ICSCallback)

i.e. time with / time without, both read off the same epoch. (Comparing two
separate trainings instead was useless here: on this shared machine the same
epoch took 48 s and 84 s within minutes.) Epoch 1 includes the one-off cost
(tracing the capture function, the step-0 capture); later epochs are the
steady state (one capture at the epoch's end). Target: at most 1.03.
It ends with what the checksums on every dataset cost when writing captures
(the same measurement as benchmarks/reliability.py).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import keras

from _common import EpochTimer, TimedCallback, cifar_like
from icsviz import ICSCallback
from icsviz.models import build_model
from icsviz.train import RECIPES, _optimizer


def measure(name: str, x, y, epochs: int, probe: int, folder: Path) -> None:
    keras.utils.set_random_seed(0)
    model = build_model(name, (32, 32, 3), 10)
    recipe = RECIPES[name]
    model.compile(_optimizer(recipe), "sparse_categorical_crossentropy", metrics=["accuracy"])
    timed = TimedCallback(ICSCallback(folder / f"{name}.h5", probe=(x[:probe], y[:probe]), overwrite=True))
    timer = EpochTimer()
    model.fit(
        x,
        y,
        batch_size=recipe.batch_size,
        epochs=epochs,
        verbose=0,
        callbacks=[timer.begin, timed, timer.end],
    )
    for epoch, total in enumerate(timer.times):
        inside = timed.seconds[epoch]
        kind = "incl. one-off tracing + step-0 capture" if epoch == 0 else "steady state"
        print(
            f"{name:8s} epoch {epoch + 1}: {total:6.1f} s, {inside:5.2f} s inside ICSCallback -> ratio "
            f"{total / (total - inside):.3f} ({kind})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--epochs", type=int, default=2)
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
            measure(name, x, y, args.epochs, args.probe, Path(tmp))
    # The checksums every dataset carries: their share of writing a capture.
    try:
        from reliability import ROOT, checksum_cost  # borrows the tests' tiny capture (needs pytest)
    except ImportError as exc:
        print(f"checksum cost not measured: {exc}")
        return
    checksum_cost(ROOT / "runs" / "cifar10-bn.h5")


if __name__ == "__main__":
    main()
