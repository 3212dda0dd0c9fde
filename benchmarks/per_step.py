"""Per-step mode (batch_stats=True): training time with it / without, on CIFAR-shaped data.

Usage: python benchmarks/per_step.py [--images 4096] [--rounds 2] [--epochs 2] [--models baseline bn]
       [--paired N] [--statistics auto|host|device]

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

On a machine whose speed swings between epochs (this project's shared 2-core one: single
epochs from 0.83 to 1.96), `--paired N` (TensorFlow and JAX) measures instead, inside one fit, the
training step with the statistics against Keras's own step for the same model, alternating
the two compiled train functions step by step for N pairs (the order switched every pair),
and adds the callback's per-batch hooks as timed in that fit's first epoch, and what the
writer's thread does with each step's row before writing it (on a CPU, numpy's statistics of
the step's samples, in ICSCallback's batches of at most 100 steps and 32 MiB, timed after the
fit), as if it held up training:

    ratio = (median step with statistics + hooks + rows per step) / median plain step

`--breakdown` adds a third fit per round in which the statistics kernels are left out (each
layer's sample mean stands in for its statistics, in a vector of the same size): what the
interception, the sampling gather, the step's extra output, the hooks and the writes cost alone.

Target (issue 8): at most 1.10 on the reference CNN (both models), 1.25 on MobileNetV2
(`--models mobilenetv2`).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import keras
import numpy as np

from _common import EpochTimer, TimedCallback, cifar_like, keras_label, reference_model
from icsviz import ICSCallback
from icsviz.capture import batch_stats
from icsviz.capture.callback import _FLUSH_MAX_BYTES
from icsviz.train import RECIPES, Recipe

EPOCH_HOOKS = ("on_epoch_begin", "on_epoch_end")  # inside the epoch timer (training begin/end are not)


def make(name: str) -> tuple[keras.Model, Recipe]:
    """The reference CNN with its recipe, or one of depth.py's models with the BN recipe's
    batch (32) and SGD."""
    if name in ("baseline", "bn"):
        return reference_model(name)
    from depth import make as make_deep

    model, _, _ = make_deep(name)
    return model, RECIPES["bn"]


def data_for(name: str, images: int) -> tuple[np.ndarray, np.ndarray]:
    """`images` inputs of the shape `name` takes (CIFAR-shaped, or depth.py's sequences)."""
    if name not in ("lstm", "text", "transformer"):
        return cifar_like(images)
    from depth import make as make_deep

    _, x, y = make_deep(name)
    repeats = -(-images // len(x))
    return np.concatenate([x] * repeats)[:images], np.concatenate([y] * repeats)[:images]


def gather_only_vector(samples, plans, q, on_host=False):
    """`--breakdown`'s stand-in for `batch_stats.batch_vector`: each layer's sample mean in a
    vector of the real size (so the writes are the same), no sorts, histograms or moments."""
    ops = keras.ops
    means = ops.stack([ops.mean(s) for s in samples])
    return ops.concatenate([means, ops.zeros((sum(p.size for p in plans) - len(plans),))])


def measure(name: str, x, y, rounds: int, epochs: int, folder: Path, breakdown: bool = False) -> float:
    """Epoch time with the per-step mode / without, median over the timed epochs (printed too)."""
    model, recipe = make(name)
    ratios, plain_steps, with_steps = [], [], []
    gather_ratios: list[float] = []
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
        if breakdown:  # the same per-step machinery with the statistics kernels left out
            gathered = TimedCallback(
                ICSCallback(
                    folder / f"{name}-g.h5", probe=(x[:256], y[:256]), batch_stats=True, overwrite=True
                )
            )
            only = EpochTimer()
            with mock.patch.object(batch_stats, "batch_vector", gather_only_vector):
                model.fit(x, y, callbacks=[only.begin, gathered, only.end], **fit)
            for epoch in range(1, epochs + 1):
                hooks = sum(gathered.hook_seconds[(hook, epoch)] for hook in EPOCH_HOOKS)
                gather_ratios.append((only.times[epoch] - hooks) / plain.times[epoch])
    print(
        f"{name:11s} batch {recipe.batch_size}: step {statistics.median(plain_steps) * 1e3:.1f} ms plain, "
        f"{statistics.median(with_steps) * 1e3:.1f} ms with batch_stats -> ratio "
        f"{statistics.median(ratios):.3f} (epochs: {', '.join(f'{r:.3f}' for r in ratios)})",
        flush=True,
    )
    if breakdown:
        print(
            f"{name:11s} the same without the statistics kernels (interception, samples, step output, "
            f"hooks and writes only) -> ratio {statistics.median(gather_ratios):.3f} "
            f"(epochs: {', '.join(f'{r:.3f}' for r in gather_ratios)})",
            flush=True,
        )
    return statistics.median(ratios)


def measure_paired(name: str, x, y, pairs: int, folder: Path) -> float:
    """(median step with the statistics + the callback's batch hooks) / median plain step,
    the two train functions alternated inside one fit (TensorFlow and JAX; printed too)."""
    model, recipe = make(name)
    batch = recipe.batch_size
    ics = ICSCallback(
        folder / f"{name}-paired.h5", probe=(x[:256], y[:256]), batch_stats=True, overwrite=True
    )
    timed = TimedCallback(ics)
    times: dict[str, list[float]] = {"plain": [], "stats": []}

    class Pairs(keras.callbacks.Callback):
        """At the last step of the fit: both train functions, alternately, on fresh batches."""

        def on_train_batch_end(self, step, logs=None):
            if step != steps_in_fit - 1:
                return
            statistics_ = self.statistics = ics._steps
            functions = {"plain": statistics_._saved["train_function"], "stats": self.model.train_function}
            run = _alternate_steps(self.model, functions, x, y, batch)
            for index in range(pairs + 2):  # the first two pairs trace and warm up
                order = ("plain", "stats") if index % 2 == 0 else ("stats", "plain")
                for kind in order:
                    statistics_.expected = True  # as ICSCallback's batch hook says before its steps
                    start = time.perf_counter()
                    run(kind)
                    if index >= 2:
                        times[kind].append(time.perf_counter() - start)
                taken.extend(statistics_.take())  # not written: the steps are timed alone
            run(None)  # the model's state as the last step left it
            statistics_.expected = True  # the fit's own bookkeeping goes on as before

    steps_in_fit = len(x) // batch
    taken: list = []
    alternating = Pairs()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timed, alternating])
    model.evaluate(x[:batch], y[:batch], verbose=0)  # the model trains on from the state the pairs left
    batch_hooks = ("on_train_batch_begin", "on_train_batch_end")
    hooks = sum(timed.hook_seconds[(hook, 0)] for hook in batch_hooks) / steps_in_fit
    # What the writer's thread does with each step's row before writing it: on a CPU, numpy's
    # statistics of the samples the step handed out (`StepStatistics.rows`). Counted as if it
    # held up the training thread, as it may on two cores.
    rows = alternating.statistics
    per_flush = min(100, max(1, _FLUSH_MAX_BYTES // rows.row_bytes))  # as ICSCallback writes them
    start = time.perf_counter()
    for first in range(0, len(taken), per_flush):
        rows.rows(taken[first : first + per_flush])
    host = (time.perf_counter() - start) / max(1, len(taken))
    plain, stats = statistics.median(times["plain"]), statistics.median(times["stats"])
    pair_ratios = [b / a for a, b in zip(times["plain"], times["stats"])]
    print(
        f"{name:11s} batch {batch}, {pairs} pairs: step {plain * 1e3:.1f} ms plain, {stats * 1e3:.1f} ms with the "
        f"statistics (pairs' ratios: median {statistics.median(pair_ratios):.3f}, quartiles "
        f"{np.quantile(pair_ratios, 0.25):.3f} / {np.quantile(pair_ratios, 0.75):.3f}), ICSCallback's batch hooks "
        f"{hooks * 1e3:.2f} ms and the rows on the writer's thread {host * 1e3:.2f} ms per step "
        f"-> ratio {(stats + hooks + host) / plain:.3f}",
        flush=True,
    )
    return (stats + hooks + host) / plain


def _alternate_steps(model: keras.Model, functions: dict, x, y, batch: int):
    """A function that runs one step of `functions[kind]` on the next batch and waits for it;
    `kind=None` ends the run (JAX: the state the steps carried goes back to the model)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        batches = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).repeat())

        def run(kind):
            if kind is not None:
                keras.ops.convert_to_numpy(functions[kind](batches)["loss"])

        return run
    if keras.backend.backend() != "jax":
        raise SystemExit("--paired runs on TensorFlow and JAX")
    # JAX's train function is pure: it takes the state (trainable, non-trainable, optimizer and
    # metrics variables) and gives the next, which the next step takes, whichever function it is.
    names = ("trainable_variables", "non_trainable_variables", "optimizer_variables", "metrics_variables")
    state = [tuple(list(model._jax_state[n]) for n in names)]  # plain lists: Keras tracks its own
    starts = range(0, len(x) - batch + 1, batch)
    batches = itertools.cycle([(x[i : i + batch], y[i : i + batch]) for i in starts])

    def run(kind):
        if kind is None:
            model._jax_state = dict(zip(names, state[0]))
            model._jax_state_synced = False  # the epoch's end assigns it to the variables
            return
        logs, state[0] = functions[kind](state[0], batches)
        np.asarray(logs["loss"])  # waits for the step (JAX dispatches asynchronously)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per fit (after one untimed)")
    parser.add_argument("--models", nargs="+", default=["baseline", "bn"])
    parser.add_argument(
        "--paired", type=int, metavar="N", help="N alternating step pairs in one fit (TensorFlow, JAX)"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="a third fit per round with the statistics kernels left out (what the machinery costs)",
    )
    parser.add_argument(
        "--statistics",
        choices=["auto", "host", "device"],
        default="auto",
        help="where the step's statistics are computed: icsviz's choice for this device, or forced "
        "(host: the step hands out its samples and numpy reduces them on the writer's thread; "
        "device: kernels inside the step). To compare the two where icsviz has not measured them",
    )
    args = parser.parse_args()
    where = "" if args.statistics == "auto" else f", statistics forced on the {args.statistics}"
    print(f"icsviz per-step mode: {args.images} images, {keras_label()}{where}")
    if args.statistics != "auto":
        forced = args.statistics == "host"
        mock.patch.object(batch_stats.backend, "host_statistics_in_step", lambda model: forced).start()
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            x, y = data_for(name, args.images)
            if args.paired:
                measure_paired(name, x, y, args.paired, Path(folder))
            else:
                measure(name, x, y, args.rounds, args.epochs, Path(folder), args.breakdown)


if __name__ == "__main__":
    main()
