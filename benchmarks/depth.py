"""Capture cost against depth: reference CNN, MobileNetV2, ResNet50, an LSTM, and TensorBoard.

Usage: python benchmarks/depth.py [--models baseline bn mobilenetv2 resnet50 lstm] [--probe 64]
(`--models text`: an LSTM on padded token sequences, Keras masks; `--models mlp200`: 200 Dense
layers of 32 units, depth without width; `--models transformer`: four keras.io transformer blocks
written as layers of layers, recorded layer by layer inside; none in the default list)

For each model, in one process (medians of --repeats, interleaved):
- train step: `train_on_batch` on a batch of the probe's size;
- capture: one steady-state probe capture, split into the compiled statistics, the host's
  quantiles (sorting the samples) and the HDF5 write (also per capture when 8 go together, as
  frequent step captures do), and its ratio to the step; then as the
  callback takes it, the quantiles and the write on the writer's thread beside the next
  training step: what the training thread pays (the statistics, and what the writer's work
  slows that step);
- first capture: a one-step `fit` of a fresh model with the callback, less the same fit
  without it, less one steady capture (the epoch end's): everything a run with the callback
  pays beyond the same run without it, apart from the later captures (tracing and compiling
  the capture function, creating and closing the file, the step-0 capture; on JAX the
  compiling runs beside Keras's own, or after it on a GPU, so the first hook's time is shown
  beside it); and what Keras's own first training step took (tracing, and on JAX compiling, the
  train function). This process has compiled the model's step before, so on a GPU XLA's
  autotuning results are there already: `first_run.py` measures a user's first run, in fresh
  processes;
- peak host memory a capture allocates (tracemalloc: the numpy results and the write);
- TensorBoard(histogram_freq=1): the time its epoch-end hook takes (weight histograms
  written every epoch) beside ICSCallback's epoch-end hook, on the same short epoch;
- per-step mode (`batch_stats=True`, batch 32): the training step with the statistics in it
  against Keras's own, as `per_step.py` measures it (TensorFlow and JAX: the two train
  functions alternated inside one fit, `--paired`; torch: epoch times with / without).
At the end a table with one row per model, in Markdown (README's table is one).
Targets (issue 8): capture <= 1.5 steps on MobileNetV2 / ResNet50, <= 1.2 on the reference
CNN; first capture <= 10 s on MobileNetV2, <= 2 s on the reference CNN; per-step mode <= 1.10
on the reference CNN, <= 1.25 on MobileNetV2.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import keras
import numpy as np
import per_step
from compile_options import OPTION_SETS

from _common import TimedCallback, cifar_like, keras_label, wait_for_device
from icsviz import ICSCallback
from icsviz.capture import backend
from icsviz.capture.write_queue import WriteQueue
from icsviz.models import build_model

# Keras's TensorBoard callback writes through tf.summary, which needs the tensorboard package
# (`pip install 'icsviz[bench]'`); without it that column says why it is empty.
HAS_TENSORBOARD = all(importlib.util.find_spec(name) is not None for name in ("tensorflow", "tensorboard"))
WHY_NO_TENSORBOARD = "not run (needs tensorflow and tensorboard: pip install 'icsviz[bench]')"


class TransformerBlock(keras.layers.Layer):
    """keras.io's transformer block for text classification, as its example writes it."""

    def __init__(self, dim: int, heads: int, hidden: int, rate: float = 0.1) -> None:
        super().__init__()
        self.att = keras.layers.MultiHeadAttention(heads, dim // heads)
        self.ffn = keras.Sequential([keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(dim)])
        self.layernorm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = keras.layers.Dropout(rate)
        self.dropout2 = keras.layers.Dropout(rate)

    def call(self, inputs: Any) -> Any:
        out1 = self.layernorm1(inputs + self.dropout1(self.att(inputs, inputs)))
        return self.layernorm2(out1 + self.dropout2(self.ffn(out1)))


def make(name: str) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    keras.utils.set_random_seed(0)
    if name in ("baseline", "bn"):
        model = build_model(name, (32, 32, 3), 10)
        x, y = cifar_like(256)
    elif name == "mobilenetv2":
        model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
        x, y = cifar_like(256)
    elif name == "resnet50":
        model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
        x, y = cifar_like(256)
    elif name == "lstm":
        model = keras.Sequential(
            [
                keras.Input((32, 16)),
                keras.layers.LSTM(64, return_sequences=True),
                keras.layers.LSTM(64),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(256, 32, 16)).astype("float32"), rng.integers(0, 10, 256)
    elif name == "mlp200":  # depth without width: 200 small Dense layers, 401 captured tensors
        inputs = keras.Input((32,))
        hidden = inputs
        for _ in range(200):
            hidden = keras.layers.Dense(32, activation="relu")(hidden)
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(hidden))
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(256, 32)).astype("float32"), rng.integers(0, 10, 256)
    elif name == "text":  # padded token sequences: the Keras mask leaves the padding out
        model = keras.Sequential(
            [
                keras.Input((32,), dtype="int32"),
                keras.layers.Embedding(1000, 64, mask_zero=True),
                keras.layers.LSTM(64, return_sequences=True),
                keras.layers.LSTM(64),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        rng = np.random.default_rng(0)
        x, y = rng.integers(1, 1000, (256, 32)), rng.integers(0, 10, 256)
        for row, length in enumerate(rng.integers(4, 33, 256)):
            x[row, length:] = 0  # about 45 % padding
    elif name == "transformer":  # keras.io's text classifier, four blocks: 27 captured tensors
        tokens = keras.Input((32,), dtype="int32")
        hidden = keras.layers.Embedding(1000, 64)(tokens)
        for _ in range(4):
            hidden = TransformerBlock(64, 4, 128)(hidden)
        pooled = keras.layers.GlobalAveragePooling1D()(hidden)
        model = keras.Model(tokens, keras.layers.Dense(10, activation="softmax")(pooled))
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 1000, (256, 32)), rng.integers(0, 10, 256)
    else:
        raise SystemExit(f"unknown model {name!r}")
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    return model, x, y


# ICSCallback's arguments for every run here (--max-values sets the value budget).
CALLBACK_ARGS: dict[str, object] = {}


def first_fit(name: str, probe: int, folder: Path) -> tuple[float, float]:
    """Seconds of a one-step `fit` of a fresh model without and with ICSCallback (its first
    capture, the step, the epoch end's capture, closing the file): on JAX the first capture
    compiles beside Keras's own step, so its hook alone does not show what it costs."""
    seconds = []
    for with_callback in (False, True):
        model, x, y = make(name)
        batch = (x[:probe], y[:probe])
        callbacks = (
            [ICSCallback(folder / f"{name}-first.h5", probe=batch, overwrite=True, **CALLBACK_ARGS)]
            if with_callback
            else []
        )
        start = time.perf_counter()
        model.fit(*batch, batch_size=probe, epochs=1, verbose=0, callbacks=callbacks)
        wait_for_device(model)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def measure(name: str, probe: int, repeats: int, folder: Path) -> dict[str, float | int | str]:
    """The figures for one model (printed on one line, returned for the table)."""
    model, x, y = make(name)
    batch_x, batch_y = x[:probe], y[:probe]
    start = time.perf_counter()
    model.train_on_batch(batch_x, batch_y)  # trace (and on JAX compile) the train function
    keras_first = time.perf_counter() - start

    plain_fit, fit_with = first_fit(name, probe, folder)
    ics = TimedCallback(
        ICSCallback(folder / f"{name}.h5", probe=(batch_x, batch_y), overwrite=True, **CALLBACK_ARGS)
    )
    callbacks = [ics]
    if HAS_TENSORBOARD:
        board = TimedCallback(keras.callbacks.TensorBoard(str(folder / f"tb-{name}"), histogram_freq=1))
        callbacks.append(board)
    model.fit(x[:probe], y[:probe], batch_size=probe, epochs=2, verbose=0, callbacks=callbacks)
    first_hook = ics.hook_seconds[("on_epoch_begin", 0)]
    ics_epoch_end = ics.hook_seconds[("on_epoch_end", 1)]
    tensorboard = (
        f"{board.hook_seconds[('on_epoch_end', 1)]:5.2f} s" if HAS_TENSORBOARD else WHY_NO_TENSORBOARD
    )

    callback = ics.inner
    program = callback._program
    layers = len(program.traced)
    xt = keras.tree.map_structure(keras.ops.convert_to_tensor, callback._probe_x)
    yt = keras.tree.map_structure(keras.ops.convert_to_tensor, callback._probe_y)
    from icsviz.store.writer import RunWriter

    writer = RunWriter.create(folder / f"{name}-w.h5", program.layout, {"model_name": name}, overwrite=True)
    # Peak host memory of one capture, on its own: tracemalloc slows every Python allocation
    # (it made the timed host work below 3 to 5 times slower when it ran with it).
    tracemalloc.start()
    writer.write_capture(program.run(xt, yt, 0.01, step=1, epoch=1.0, time=0.0, kind="epoch"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    model.train_on_batch(batch_x, batch_y)  # after fit, train_on_batch traces its function again
    stats_t, host_t, write_t, steps_t = [], [], [], []
    for _ in range(repeats):  # interleaved: machine load hits all alike
        start = time.perf_counter()
        finish = program.measure(xt, yt, 0.01, step=1, epoch=1.0, time=0.0, kind="epoch")
        measured = time.perf_counter()
        capture = finish()
        middle = time.perf_counter()
        writer.write_capture(capture)
        end = time.perf_counter()
        stats_t.append(measured - start)
        host_t.append(middle - measured)
        write_t.append(end - middle)
        start = time.perf_counter()
        model.train_on_batch(batch_x, batch_y)
        steps_t.append(time.perf_counter() - start)
    # Frequent step captures go to the file together (ICSCallback: those within 2 s, up to 16).
    together_t = []
    for _ in range(repeats):
        start = time.perf_counter()
        writer.write_captures([capture] * 8)
        together_t.append((time.perf_counter() - start) / 8)
    # As ICSCallback takes it: the write handed to the writer's thread, overlapping the next
    # training step. The training thread pays the statistics, and whatever the write slows
    # the step that runs beside it.
    queue = WriteQueue("benchmark")
    queued_t, beside_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        finish = program.measure(xt, yt, 0.01, step=1, epoch=1.0, time=0.0, kind="epoch")
        queue.submit("a capture", lambda finish=finish: writer.write_capture(finish()))
        middle = time.perf_counter()
        model.train_on_batch(batch_x, batch_y)
        end = time.perf_counter()
        queue.drain()
        queued_t.append(middle - start)
        beside_t.append(end - middle)
    queue.close()
    # The same without the write: what a capture alone does to the step after it.
    alone_t = []
    for _ in range(repeats):
        program.measure(xt, yt, 0.01, step=1, epoch=1.0, time=0.0, kind="epoch")()
        start = time.perf_counter()
        model.train_on_batch(batch_x, batch_y)
        alone_t.append(time.perf_counter() - start)
    writer.close(compact=False)
    step = statistics.median(steps_t)
    # From outside: what the one-step fit with the callback took beyond the same fit without it,
    # less its one steady capture (the epoch end's) as the training thread pays it.
    first = (
        fit_with - plain_fit - (statistics.median(queued_t) + max(0.0, statistics.median(beside_t) - step))
    )
    stats, host, write = (statistics.median(t) for t in (stats_t, host_t, write_t))
    threaded = statistics.median(queued_t) + max(0.0, statistics.median(beside_t) - step)
    print(
        f"{name:11s} {layers:3d} tensors, {len(program.trainable):3d} variables | step {step * 1e3:6.1f} ms | "
        f"capture {(stats + host + write) * 1e3:6.1f} ms = stats {stats * 1e3:6.1f} + quantiles {host * 1e3:4.1f} "
        f"+ write {write * 1e3:5.1f} (8 together: {statistics.median(together_t) * 1e3:5.1f} each) "
        f"-> x{(stats + host + write) / step:4.2f} steps; on the training thread "
        f"(quantiles and write beside the next step) "
        f"{threaded * 1e3:6.1f} ms -> x{threaded / step:4.2f} (the capture {statistics.median(queued_t) * 1e3:5.1f} ms, "
        f"the next step {statistics.median(beside_t) * 1e3:5.1f} ms beside the write, "
        f"{statistics.median(alone_t) * 1e3:5.1f} ms without one) | first capture {first:5.1f} s (its hook {first_hook:4.1f} s; "
        f"Keras's own first step {keras_first:4.1f} s) | "
        f"peak host memory {peak / 2**20:5.1f} MiB | epoch-end hook: ICSCallback {ics_epoch_end:5.2f} s, "
        f"TensorBoard(histogram_freq=1) {tensorboard}",
        flush=True,
    )
    return {
        "tensors": layers,
        "step": step,
        "capture": threaded / step,
        "stats": stats,
        "write": write,
        "first": first,
        "peak": peak,
        "ics_epoch_end": ics_epoch_end,
        "tensorboard": board.hook_seconds[("on_epoch_end", 1)] if HAS_TENSORBOARD else float("nan"),
    }


def per_step_ratio(name: str, pairs: int, images: int, folder: Path) -> float:
    """The per-step mode's cost for `name`, as per_step.py measures it on this backend."""
    x, y = per_step.data_for(name, images)
    if keras.backend.backend() in ("tensorflow", "jax"):
        return per_step.measure_paired(name, x, y, pairs, folder)
    return per_step.measure(name, x, y, rounds=1, epochs=1, folder=folder)


# Issue 8's goals: capture in training steps, first capture in seconds, per-step mode's ratio.
TARGETS = {
    "baseline": (1.2, 2.0, 1.10),
    "bn": (1.2, 2.0, 1.10),
    "mobilenetv2": (1.5, 10.0, 1.25),
    "resnet50": (1.5, None, None),
}


def table(rows: dict[str, dict[str, float | int | str]]) -> str:
    """One Markdown row per model; a goal issue 8 sets is shown beside the figure."""

    def cell(value: float, unit: str, goal: float | None, digits: int) -> str:
        if value != value:  # NaN: not measured
            return "-"
        text = f"{value:.{digits}f}{unit}"
        return f"{text} (≤ {goal:.{digits}f}{unit})" if goal is not None else text

    lines = [
        "| model | captured tensors | training step (batch 64) | one capture, in training steps "
        "| first capture | per-step mode (batch 32), time with / without | epoch-end hook: ICSCallback "
        "/ TensorBoard(histogram_freq=1) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        capture_goal, first_goal, per_step_goal = TARGETS.get(name, (None, None, None))
        board = "-" if row["tensorboard"] != row["tensorboard"] else f"{row['tensorboard']:.2f} s"
        lines.append(
            f"| {name} | {row['tensors']} | {row['step'] * 1e3:.1f} ms "
            f"| {cell(row['capture'], '', capture_goal, 2)} | {cell(row['first'], ' s', first_goal, 1)} "
            f"| {cell(row['per_step'], '', per_step_goal, 3)} | {row['ics_epoch_end']:.2f} s / {board} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["baseline", "bn", "lstm", "mobilenetv2", "resnet50"])
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--per-step-pairs",
        type=int,
        default=20,
        help="alternated step pairs, TensorFlow and JAX (0: skip the per-step mode)",
    )
    parser.add_argument(
        "--per-step-images", type=int, default=1024, help="JAX and torch: images per timed epoch"
    )
    parser.add_argument(
        "--gpu-options",
        choices=sorted(OPTION_SETS),
        help="JAX on a GPU: compile the capture with this set of XLA options (compile_options.py)",
    )
    parser.add_argument(
        "--max-values",
        default="65536",
        help="ICSCallback's value budget per tensor: a number, or 'all' (max_values=None)",
    )
    args = parser.parse_args()
    CALLBACK_ARGS["max_values"] = None if args.max_values == "all" else int(args.max_values)
    if args.gpu_options:
        backend._GPU_COMPILER_OPTIONS = dict(OPTION_SETS[args.gpu_options])
        print(f"capture compiled on a GPU with {args.gpu_options}: {backend._GPU_COMPILER_OPTIONS}")
    print(
        f"icsviz capture cost vs depth: probe {args.probe}, value budget {args.max_values}, {keras_label()}"
    )
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            rows[name] = measure(name, args.probe, args.repeats, Path(folder))
            rows[name]["per_step"] = (
                per_step_ratio(name, args.per_step_pairs, args.per_step_images, Path(folder))
                if args.per_step_pairs
                else float("nan")
            )
    print(f"\n{keras_label()}, probe {args.probe}:")
    print(table(rows))


if __name__ == "__main__":
    main()
