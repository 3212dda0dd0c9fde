"""Training time with ICSCallback (default schedule) / without, on CIFAR-shaped data.

Usage: python benchmarks/overhead.py [--images 50000] [--epochs 2] [--models baseline bn]
                                    [--side-by-side ROUNDS] [--every-n-steps N]

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
With `--side-by-side ROUNDS` it also times separate fits without and with the callback
(alternating), which sees what the attribution cannot: the writer's thread slowing the
steps beside it, and on JAX and torch whether Keras still runs ahead of the steps' logs.
`--every-n-steps N` adds step captures (`ICSCallback(every_n_steps=N)`) to both: on JAX and torch
they are taken as the next step begins, so Keras's loop still runs ahead (with a batch-end hook
it would wait for every step's logs: on a GPU, whose steps are dispatched ahead, that is where
the side-by-side ratio differs).
It ends with what the checksums on every dataset cost when writing captures
(the same measurement as benchmarks/reliability.py).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import EpochTimer, TimedCallback, cifar_like, keras_label, reference_model
from icsviz import ICSCallback


def measure(name: str, x, y, epochs: int, probe: int, folder: Path, every_n_steps: int | None) -> None:
    model, recipe = reference_model(name)
    callback = ICSCallback(
        folder / f"{name}.h5", probe=(x[:probe], y[:probe]), overwrite=True, every_n_steps=every_n_steps
    )
    timed = TimedCallback(callback)
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


def side_by_side(
    name: str, x, y, rounds: int, epochs: int, probe: int, folder: Path, every_n_steps: int | None
) -> None:
    """Epoch time with ICSCallback / without, as a user sees it: separate fits, alternating.

    Nothing here has batch hooks, so Keras's JAX and torch loops run ahead of the steps'
    logs in both (a timer with batch hooks would make both wait for every step). Each fit's
    first epoch (tracing, the first capture) is not counted; the later ones are.
    """
    model, recipe = reference_model(name)
    fit = {"batch_size": recipe.batch_size, "epochs": epochs + 1, "verbose": 0}
    plain_t, with_t = [], []
    for _ in range(rounds):
        plain, timed = EpochTimer(), EpochTimer()
        model.fit(x, y, callbacks=[plain.begin, plain.end], **fit)
        callback = ICSCallback(
            folder / f"{name}-side.h5",
            probe=(x[:probe], y[:probe]),
            overwrite=True,
            every_n_steps=every_n_steps,
        )
        model.fit(x, y, callbacks=[timed.begin, callback, timed.end], **fit)
        plain_t += plain.times[1:]
        with_t += timed.times[1:]
    ratios = [w / p for w, p in zip(with_t, plain_t)]
    print(
        f"{name:8s} side by side: epoch {statistics.median(plain_t):6.2f} s without, "
        f"{statistics.median(with_t):6.2f} s with ICSCallback -> ratio {statistics.median(ratios):.3f} "
        f"(epochs: {', '.join(f'{r:.3f}' for r in ratios)})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["baseline", "bn"])
    parser.add_argument(
        "--side-by-side",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time separate fits without and with the callback, alternating ROUNDS times",
    )
    parser.add_argument(
        "--every-n-steps", type=int, default=None, metavar="N", help="also capture every N steps"
    )
    args = parser.parse_args()
    x, y = cifar_like(args.images)
    print(
        f"icsviz overhead: {args.images} CIFAR-shaped images per epoch, probe {args.probe}, "
        f"every_n_steps={args.every_n_steps}, {keras_label()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            measure(name, x, y, args.epochs, args.probe, Path(tmp), args.every_n_steps)
        for name in args.models if args.side_by_side else []:
            side_by_side(
                name, x, y, args.side_by_side, args.epochs, args.probe, Path(tmp), args.every_n_steps
            )
    # The checksums every dataset carries: their share of writing a capture.
    try:
        from reliability import ROOT, checksum_cost  # borrows the tests' tiny capture (needs pytest)
    except ImportError as exc:
        print(f"checksum cost not measured: {exc}")
        return
    checksum_cost(ROOT / "runs" / "cifar10-bn.h5")


if __name__ == "__main__":
    main()
