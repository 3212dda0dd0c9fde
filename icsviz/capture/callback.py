"""ICSCallback: record how hidden-unit distributions move while a model trains."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ..errors import IncompatibleRunError, RunExistsError, RunInUseError, warn_capture
from ..store.schema import BatchLayerSpec, RunLayout
from ..store.writer import BatchRows, Capture, RunWriter
from . import backend
from .batch_stats import (
    SAMPLE,
    UNIT_SAMPLE,
    BatchPlan,
    StepStatistics,
    live_hooks,
    unpack,
    unsupported_reason,
)
from .layers import LayerFilter, layer_filters, recurrent_states, select_layers
from .probe import mismatch, nonfinite, num_samples, split_probe, take
from .program import CaptureProgram
from .stats import CaptureOptions
from .write_queue import WriteQueue

__all__ = ["ICSCallback"]

_MAX_PROBE = 4096
_FLUSH_SECONDS = 2.0  # per-step rows (flush_every=None) and step captures: written this often...
_FLUSH_MAX_STEPS = 1000  # ...or after this many steps (their vectors wait on the device)...
_FLUSH_MAX_BYTES = 32 * 2**20  # ...or once their rows hold this much (on a CPU: the samples)
_CAPTURES_PER_WRITE = 16  # step captures within _FLUSH_SECONDS of the last write: written together

# The run files this process's callbacks hold open (resolved path -> the callback and the thread
# of its fit). A fit that ends in an exception leaves its file open, and in a notebook the
# callback holding it is often out of reach (the cell that made it ran again): the next
# callback on that path closes it (`ICSCallback._close_abandoned_run`).
_OPEN_RUNS: dict[Path, tuple[weakref.ref[ICSCallback], threading.Thread]] = {}


def _write_of(waiting: list[Callable[[], Any]], writer: RunWriter) -> Callable[[], None]:
    """One write of the captures waiting (their host parts, finished on the writer's thread);
    `waiting` is emptied."""
    finishes = list(waiting)
    waiting.clear()
    return lambda: writer.write_captures([finish() for finish in finishes])


def _close_when_written(
    queue: WriteQueue,
    writer: RunWriter,
    waiting: list[Callable[[], Any]],
    release_first_compile: Callable[[], None],
) -> None:
    """Write what is queued and the step captures still waiting, then close the file as
    interrupted (the finalizer's job)."""
    try:
        release_first_compile()  # a first capture still waiting for Keras's first step is needed now
        if waiting:
            with contextlib.suppress(RuntimeError):  # the writer's thread has stopped already
                queue.submit("the last step captures", _write_of(waiting, writer))
        queue.close()
        writer.close("interrupted")
    except Exception as exc:  # noqa: BLE001 - also run at the interpreter's exit: a warning, not a traceback
        detail = _error_detail(exc)
        warn_capture(f"closing the run file {writer.path} failed ({type(exc).__name__}: {detail}).")


def _fit_on_this_stack(callback: ICSCallback) -> bool:
    """Whether a `fit` with `callback` is among this thread's calls (Keras's CallbackList
    holding it is a local there)."""
    frame = sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, keras.callbacks.CallbackList) and any(
                c is callback for c in value.callbacks
            ):
                return True
        frame = frame.f_back
    return False


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_DETAIL = 600


def _error_detail(exc: BaseException) -> str:
    """An exception's message as a warning quotes it: without Keras's terminal bold codes, and
    without the stack that TensorFlow's errors from a compiled function carry ("Graph execution
    error: Detected at node ... defined at (most recent call last): File ..." and its
    `[[{{node ...}}]]` lines), whose last lines say what went wrong."""
    text = _ANSI.sub("", str(exc)).strip()
    lines = text.splitlines()
    if lines and lines[0].startswith("Graph execution error"):
        files = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
        tail = lines[files[-1] + 1 :] if files else lines[1:]
        kept = [line.strip() for line in tail if line.strip() and not line.strip().startswith("[[")]
        text = " ".join(kept) or text
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 3].rstrip() + "..."
    return text


def _as_float(value: Any) -> float | None:
    """A log entry as a float, or None when it is not a scalar metric."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _scalar(value: Any) -> float:
    """A Python float from a Keras variable or backend scalar.

    Not through keras.ops.convert_to_numpy or Variable.numpy(): with NumPy 2
    those raise a DeprecationWarning for variables (TensorFlow and JAX).
    """
    tensor = getattr(value, "value", value)  # a Keras Variable: its backend tensor
    return float(tensor)


def _steps_counter(optimizer: Any) -> Any:
    """The optimizer's count of training steps. Under gradient accumulation Keras's `iterations`
    counts its updates, one per `gradient_accumulation_steps` steps, and its `_iterations` the
    steps (every batch is measured, the update or not); mixed precision's LossScaleOptimizer
    hands on its inner optimizer's `iterations`."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(inner, "gradient_accumulation_steps", None):
        return getattr(inner, "_iterations", optimizer.iterations)
    return optimizer.iterations


def _is_chief() -> bool:
    """Only one process writes under multi-worker training (TF_CONFIG's chief)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return True
    try:
        config = json.loads(raw)
    except ValueError:
        return True
    task = config.get("task", {})
    kind, index = task.get("type", "chief"), int(task.get("index", 0))
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in config.get("cluster", {}))


class ICSCallback(keras.callbacks.Callback):
    """Records activation distributions and gradient statistics while training.

    At step 0 (before the first update), at the end of every epoch and,
    optionally, every `every_n_steps` steps, the callback runs the model on a
    fixed probe batch, reduces every selected layer's output on the device to a
    histogram, quantiles, moments and per-unit means and stds, measures
    per-variable gradient norms, weight norms and update ratios, and appends
    all of it to an HDF5 run file. The epoch metrics from `logs` are stored too.
    Open the file with `icsviz.open_run(path)` or `streamlit run app.py`.

    A capture never changes the model (BatchNormalization moving statistics
    and dropout seeds are left alone), and a failure inside icsviz is reported
    as a `CaptureWarning` while training goes on. The file is readable at any
    moment, also while training runs and after the process is killed.

    Args:
        path: The run file to write, e.g. "runs/bn.h5". Parent folders are created.
            A relative path is taken from the current directory when the callback
            is made (`callback.path` is absolute), whatever directory later fits run in.
        probe: A fixed batch measured at every capture: an array (or dict of
            arrays for multi-input models), an `(x, y)` or `(x, y, sample_weight)`
            tuple, or a dataset from which the first batch is taken once. Labels
            are needed for gradient statistics; without them only activations are
            recorded. Sample weights weight the probe's loss as in training. 256
            to 512 samples is a good size.
        submodel: A model inside the one `fit` trains, measured instead of it:
            the probe runs through `submodel` (a GAN's generator, given latent
            vectors, or its discriminator, given images), whose layers and weights
            are recorded. For a model whose `call` is not what its training runs
            (a GAN's model has no `call`), or to follow one part of a larger model.
            Gradient statistics need `submodel` compiled with its loss.
        layers: Which layers to capture: None for the default (outputs of Dense
            and Conv layers, their pre-activations when the activation is fused,
            normalization, activation and merge layers, and a functional model's
            `keras.ops` standing for one), or a list of names,
            glob patterns ("block1/*"), layer classes or predicates (one of
            them on its own is a list of one).
        every_n_steps: Also capture every N training steps (None: epochs only);
            under `steps_per_execution=k`, at the first step after each multiple of N.
            Step captures less than 2 s after the last write are written
            together (up to 16, or at the epoch's capture or `flush()`): one
            write for all of them. On JAX and torch the capture is taken as
            the next step begins (on the same weights: those the step left),
            as the callback has no batch-end hook there: Keras's loop keeps
            dispatching steps without waiting for their logs.
        batch_stats: Per-step mode: also measure every training batch inside the
            training step itself (no second pass; about 1.1x the plain step on
            the reference CNN, on a CPU and on an H100 with JAX; README's Speed
            section has the measurements): quantiles, histogram, mean/std/min/
            max and zero fraction from a fixed sample of 4096 values per layer,
            one row per step under /batches. Probe captures go on as configured.
            An integer N keeps the row of every N-th step only (True is 1): each
            row is still one batch's statistics, and the file grows N times
            slower on long runs (the in-step cost is the same).
        flush_every: In per-step mode, write the steps' rows every this many
            steps. None (the default): every 2 seconds of training (at most
            1000 steps apart), so that the writes take the same small share of
            the time whether a step lasts 2 ms or 2 s. Either way sooner once
            the rows waiting hold 32 MiB (with TensorFlow or torch on a CPU a row
            is the step's samples, 0.3 MiB for the reference CNN, reduced by numpy on
            the writer's thread). The rows wait on the device until written; a
            kill loses at most these.
        gradient_shift: Also record the gradient-shift measure of Santurkar et
            al. (2018), which costs one extra backward pass per layer.
        histogram_bins: Bins of each activation histogram.
        tracked_units: How many units per layer get their own quantiles.
        quantile_sample: The layer quantiles of a probe capture come from a fixed
            sample of this many values per layer (a tracked unit's from a quarter
            as many rows); a layer with fewer values is used whole. Larger is more
            exact and slower: the rank error at the median is 0.78 % for 4096,
            0.39 % for 16384, and sorting the samples is much of a deep model's
            capture (docs/statistics.md).
        max_values: The histogram, moments and per-unit statistics of a probe
            capture come from at most this many values per tensor: a larger
            tensor (a conv output: samples x positions x channels) keeps a fixed
            random sample of its rows (one sample at one position, every unit),
            the same at every capture. None uses every value: exact, and slower
            on large conv layers. The range and the count of non-finite values
            are always over every value. The default's error on the reference
            BN CNN: means within 0.009 and stds within 0.025 of the layer's std
            (docs/statistics.md, "Value budget").
        training_mode: Run the probe in training mode (True: BatchNormalization
            uses batch statistics, dropout uses fixed masks, as the network sees
            its inputs while it trains) or inference mode (False).
        run_name: A name for the run (default: the file name).
        metadata: Extra JSON-serializable facts stored with the run, e.g.
            {"dataset": "cifar10"}.
        overwrite: Replace an existing file (or an incompatible one when
            resuming) instead of raising `RunExistsError`: a file found at
            the first fit. Later fits with the same callback continue its own
            run (from epoch 0 they append after it; `initial_epoch=k` resumes
            at epoch k of it). One callback records one model.
        seed: Seed of the fixed sampling used for quantiles.

    Example:

    ```python
    from icsviz import ICSCallback

    model.fit(
        x_train, y_train, epochs=10, validation_data=(x_val, y_val),
        callbacks=[ICSCallback("runs/bn.h5", probe=(x_val[:512], y_val[:512]))],
    )
    ```
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        probe: Any,
        *,
        submodel: keras.Model | None = None,
        layers: LayerFilter | Sequence[LayerFilter] | None = None,
        every_n_steps: int | None = None,
        batch_stats: bool | int = False,
        flush_every: int | None = None,
        gradient_shift: bool = False,
        histogram_bins: int = 64,
        tracked_units: int = 3,
        quantile_sample: int = 4096,
        max_values: int | None = 2**16,
        training_mode: bool = True,
        run_name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"path must be a file path such as 'runs/bn.h5'. Received: path={path!r}")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(
                f"every_n_steps must be a positive integer or None. Received: every_n_steps={every_n_steps!r}"
            )
        if submodel is not None and not isinstance(submodel, keras.Model):
            raise ValueError(
                "submodel must be a keras.Model inside the model fit trains (a GAN's generator, say). "
                f"Received: submodel of type {type(submodel).__name__}"
            )
        if not isinstance(batch_stats, int) or batch_stats < 0:
            raise ValueError(
                "batch_stats must be True, False or a positive integer N (keep every N-th step). "
                f"Received: batch_stats={batch_stats!r}"
            )
        if flush_every is not None and (not isinstance(flush_every, int) or flush_every < 1):
            raise ValueError(
                f"flush_every must be a positive integer or None. Received: flush_every={flush_every!r}"
            )
        if not isinstance(histogram_bins, int) or not 2 <= histogram_bins <= 4096:
            raise ValueError(
                f"histogram_bins must be an integer from 2 to 4096. Received: histogram_bins={histogram_bins!r}"
            )
        if not isinstance(tracked_units, int) or tracked_units < 0:
            raise ValueError(
                f"tracked_units must be a non-negative integer. Received: tracked_units={tracked_units!r}"
            )
        if isinstance(quantile_sample, bool) or not isinstance(quantile_sample, int) or quantile_sample < 16:
            raise ValueError(
                "quantile_sample must be an integer of at least 16 (values per layer the quantiles come "
                f"from; 4096 by default). Received: quantile_sample={quantile_sample!r}"
            )
        if max_values is not None and (
            isinstance(max_values, bool) or not isinstance(max_values, int) or max_values < 1
        ):
            raise ValueError(
                "max_values must be a positive integer (values per tensor the statistics come from; "
                f"65536 by default) or None for every value. Received: max_values={max_values!r}"
            )
        if metadata is not None:
            try:
                json.dumps(dict(metadata))
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"metadata must be JSON-serializable. Received: metadata={metadata!r}"
                ) from exc
        x, y, sample_weight = split_probe(probe)
        if sample_weight is not None and y is None:
            raise ValueError(
                "probe has sample weights but no labels (y is None); pass probe=(x, y, sample_weight)"
            )
        n = num_samples(x)
        if n == 0:
            raise ValueError("probe is empty; pass a batch such as x_val[:512]. Received: 0 samples")
        for part, name in ((y, "labels (y)"), (sample_weight, "sample weights")):
            if part is not None and num_samples(part) != n:
                raise ValueError(
                    f"the probe's {name} hold {num_samples(part)} samples and its inputs (x) {n}; pass "
                    "the same samples of each, e.g. probe=(x_val[:512], y_val[:512])"
                )
        problem = nonfinite(x, "inputs (x)") or nonfinite(y, "labels (y)")
        if problem:
            warn_capture(
                f"{problem}: every capture measures them, and the probe's loss and gradients come out "
                "NaN. Pass samples without NaN or inf (fill or drop them, as for training)."
            )
        if n > _MAX_PROBE:
            warn_capture(
                f"the probe has {n} samples; using the first {_MAX_PROBE} (every "
                "capture runs the model on the whole probe: 256 to 512 is plenty)."
            )
            x, y, sample_weight = (
                None if part is None else take(part, _MAX_PROBE) for part in (x, y, sample_weight)
            )
        # Absolute: the file is reopened (resumed, closed after Ctrl-C, compacted) from wherever
        # the process stands then, and a notebook may have changed directory since.
        self.path = Path(path).expanduser().absolute()
        if self.path.is_dir():
            raise ValueError(
                f"path must be a file, and {self.path} is a folder: pass a file inside it, e.g. "
                f"path={str(self.path / 'run.h5')!r}"
            )
        if self.path.suffix != ".h5":
            warn_capture(
                f"{self.path.name!r} does not end in .h5; the explorer (icsviz app) lists the "
                f".h5 files of a folder, so name it {self.path.name + '.h5'!r} to see it there."
            )
        self.layers = layer_filters(layers)
        self.every_n_steps = every_n_steps
        self.batch_stats = bool(batch_stats)
        self.batch_stats_every = int(batch_stats) if batch_stats else 0
        self.flush_every = flush_every
        self.overwrite = overwrite
        self.run_name = run_name or self.path.stem
        self.metadata = dict(metadata or {})
        self.options = CaptureOptions(
            hist_bins=histogram_bins,
            tracked_units=tracked_units,
            quantile_sample=quantile_sample,
            unit_quantile_sample=max(16, quantile_sample // 4),
            max_values=max_values,
            training=training_mode,
            gradient_shift=gradient_shift,
            seed=seed,
        )
        self._probe_x, self._probe_y, self._probe_weights = x, y, sample_weight
        self.submodel = submodel
        self._probe_size = min(n, _MAX_PROBE)
        self._writer: RunWriter | None = None
        self._queue: WriteQueue | None = None  # the writer's thread: writes leave the training loop
        self._program: CaptureProgram | None = None
        self._started = False
        self._capture_ok = True
        self._owns_file = False  # this instance wrote the file in an earlier fit
        self._epoch_offset = 0
        self._finalizer: Any = None
        self._steps: StepStatistics | None = None
        self._waiting_captures: list[Callable[[], Any]] = []  # step captures not yet handed to the writer
        self._last_capture_write = 0.0
        self._last_step_flush = 0.0
        self._steps_failure: BaseException | None = None  # found on the writer's thread
        self._step_tags: list[tuple[int, float, float]] = []  # (step, epoch, time) awaiting their vectors
        # A dataset of unknown cardinality: the length of its last epoch, once one has ended.
        self._epoch_length: int | None = None
        self._last_step_capture = -1  # the step of the last step capture taken
        self._tagged_through = 0
        # Keras's JAX and torch loops dispatch the next step without waiting for this one's
        # logs unless a callback has a batch-end hook (with one, every step waits for the
        # device). There Keras sees the default hook: what follows a step (its per-step rows'
        # tags, a step capture, both on the weights the step left) is done when the next step
        # begins, or at the epoch's end, where the steps are counted. TensorFlow's loop waits
        # for each step's logs anyway and keeps the batch-end hook.
        self._counts_batches = backend.name() not in ("jax", "torch")
        if not self._counts_batches:
            self.on_train_batch_end = super().on_train_batch_end  # type: ignore[method-assign]
        self._batches_begun_in_epoch = 0  # to tell a loop of the user's own that never calls it
        self._optimizer_idle = False  # set where the model's optimizer does not count the steps
        self._epoch_start_iterations: int | None = None
        self._last_step = 0  # the last step counted, where a next fit of this callback goes on from
        # Added to the optimizer's count: a run resumed from weights alone goes on from its steps.
        self._step_offset = 0
        self._warned_no_batch_begin = False
        # The first capture's compile may wait for Keras's first step (JAX on a GPU, see
        # `CaptureProgram.waits_for_first_step`): the next batch's beginning says it has run.
        self._batches_begun = 0

    # ---------------------------------------------------------------- helpers
    def _warn(self, what: str, exc: BaseException) -> None:
        detail = _error_detail(exc)
        warn_capture(f"{what} failed ({type(exc).__name__}: {detail}); training goes on.")

    def _warn_no_batch_begin(self) -> None:
        """Once per callback: a loop of the user's own that only ends its batches (JAX, torch)."""
        if self._warned_no_batch_begin:
            return
        self._warned_no_batch_begin = True
        warn_capture(
            f"no step capture was taken this epoch: on {backend.name()} ICSCallback takes them when the "
            "next step begins, and the training loop never called on_train_batch_begin. Call "
            "callbacks.on_train_batch_begin(step) before each step, as model.fit does."
        )

    def _safely(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (RunExistsError, IncompatibleRunError, RunInUseError):
            raise  # the user's configuration, found before the first training step: nothing is lost
        except Exception as exc:  # noqa: BLE001 - never stop the user's training
            self._capture_ok = False
            self._warn(f"{what} (captures are off for the rest of this run)", exc)

    @property
    def _measured(self) -> keras.Model:
        """The model the probe runs through: `submodel`, or the model being fit."""
        trained = self.model  # on JAX, reading it brings the trained weights back into the model
        return trained if self.submodel is None else self.submodel

    def _fit_probe_to_states(self, model: keras.Model) -> None:
        """A stateful RNN's states hold one batch of the model's fixed batch size, so the probe
        must be that size: a larger one is cut to it, with one warning."""
        states = recurrent_states(model)
        if not states:
            return
        batch, n = int(states[0].shape[0]), num_samples(self._probe_x)
        fix = f"pass a probe of exactly {batch} samples, e.g. probe=(x_val[:{batch}], y_val[:{batch}])"
        if n < batch:
            raise ValueError(
                f"model {model.name!r} has a stateful recurrent layer, whose states hold batches of "
                f"{batch} samples, and the probe has {n}: {fix}"
            )
        if n > batch:
            warn_capture(
                f"model {model.name!r} has a stateful recurrent layer, whose states hold batches of "
                f"{batch} samples: the first {batch} of the probe's {n} are measured ({fix} to "
                "choose them)."
            )
            self._probe_x, self._probe_y, self._probe_weights = (
                None if part is None else take(part, batch)
                for part in (self._probe_x, self._probe_y, self._probe_weights)
            )
            self._probe_size = batch

    def _measured_optimizer(self) -> Any:
        """The optimizer that trains the measured model, or None where it is not known.

        A submodel's own where it was compiled (a GAN's discriminator, say). Else the fit's, but
        not under a `train_step` of the user's own around a submodel: a GAN's steps optimizers of
        its own, and the one `super().compile()` gave the model (RMSprop) trains nothing.
        """
        # Read first, also for a submodel: on JAX, reading `self.model` brings the trained weights
        # back into the model (and a submodel's with them), and this runs before every capture.
        trained = self.model
        if self.submodel is None:
            return getattr(trained, "optimizer", None)
        own = getattr(self.submodel, "optimizer", None)
        if own is not None:
            return own
        custom_step = type(trained).train_step is not keras.Model.train_step
        return None if custom_step else getattr(trained, "optimizer", None)

    def _learning_rate(self) -> float:
        # For the gradient shift's step and the run's history (`_measured_optimizer` reads
        # `self.model`: on JAX that syncs the weights the capture after this call measures).
        optimizer = self._measured_optimizer()
        if optimizer is None:
            return float("nan")
        try:
            return _scalar(optimizer.learning_rate)
        except Exception:  # noqa: BLE001 - a custom optimizer without a readable rate
            return float("nan")

    def _optimizer_steps(self) -> int | None:
        """The model's optimizer's iteration count; None without one, or where it cannot be read."""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        try:
            return int(_scalar(_steps_counter(optimizer))) + self._step_offset
        except Exception:  # noqa: BLE001
            return None

    def _iterations(self) -> int:
        """Training steps so far: the optimizer's count, or this callback's own where the optimizer
        does not count them (none, unreadable, or one the training step never steps)."""
        count = None if self._optimizer_idle else self._optimizer_steps()
        return max(self._global_step, self._last_step) if count is None else count

    def _check_optimizer_steps(self) -> None:
        """At an epoch's end: an optimizer whose count did not move while steps ran is not the one
        training steps (a GAN's `train_step` steps optimizers of its own, and `super().compile()`
        gave the model an idle one). Its count would number every step 0 (torch, JAX); from here
        on this callback counts the steps itself."""
        if self._optimizer_idle or self._epoch_start_iterations is None:
            return
        ran = bool(
            self._steps_per_epoch
            or self._batches_begun_in_epoch
            or self._global_step > self._epoch_start_step
        )
        if ran and self._optimizer_steps() == self._epoch_start_iterations:
            self._optimizer_idle = True

    def _steps_so_far(self) -> int:
        """Training steps taken, read at an epoch's end (when the batch hooks are not counting).

        The optimizer's iteration count, except under dynamic loss scaling, which does not count
        the steps it skips (non-finite gradients): there the epoch's planned steps; and for a
        model with no optimizer (a loop of the user's own), the batches it began.
        """
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:  # a loop of the user's own around a model never compiled
            return self._steps_begun()
        planned = self._epoch_start_step + int(self._steps_per_epoch) if self._steps_per_epoch else None
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and planned is not None:
            return planned
        self._check_optimizer_steps()
        if self._optimizer_idle:  # the epoch's planned steps, or those it began
            return self._steps_begun() if planned is None else planned
        return self._iterations()

    def _steps_begun(self) -> int:
        """The steps this epoch's batches began: those counted as its last batch began
        (`_after_steps`), and that batch."""
        return self._global_step + 1 if self._batches_begun_in_epoch else self._global_step

    # ---------------------------------------------------------------- lifecycle
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self.close()  # a fit that ended in an exception left the file open
        self._close_abandoned_run()
        self._train_start = time.perf_counter()
        self._started = False
        self._capture_ok = True
        self._write_failed = False
        self._global_step = 0
        self._steps_per_epoch = self.params.get("steps") if self.params else None
        self._epoch_length = None
        self._last_step_capture = -1
        self._epoch_start_step = 0
        self._epoch_start_time = self._train_start
        self._active = _is_chief()

    def close(self) -> None:
        """Close the run file of a fit that ended in an exception (Ctrl-C in a notebook).

        Keras skips `on_train_end` then, so the file stays open (and locked) until the next
        `fit` with this callback, which closes it and continues the run, or until the process
        ends. Call this in between to finish the file now: every capture taken is written (the
        step captures still waiting included) and the run is marked interrupted. Nothing
        happens when no file is open.
        """
        if self._writer is None:
            return
        if self._steps is not None:
            self._safely_steps("writing per-step statistics", self._flush_steps)
            self._stop_steps()
        if self._finalizer is not None and self._finalizer.alive:
            # Writes what waits and closes the file; a failure is its warning (_close_when_written).
            self._finalizer()
        self._writer = None
        self._queue = None
        self._forget_open_run()

    def _close_abandoned_run(self) -> None:
        """Close this path's file if another callback left it open in a fit that has ended.

        That fit is over if it ran on a thread that has ended, or on this thread and is not
        among the calls this fit was started from. A fit still running keeps its file, and
        opening the file refuses this run (RunInUseError).
        """
        key = self.path.resolve()
        entry = _OPEN_RUNS.get(key)
        if entry is None:
            return
        earlier, thread = entry[0](), entry[1]
        if earlier is None:  # collected: its finalizer closed the file
            del _OPEN_RUNS[key]
            return
        if earlier is self:
            return
        if thread is not threading.current_thread() and thread.is_alive():
            return
        if thread is threading.current_thread() and _fit_on_this_stack(earlier):
            return  # a fit started from inside the earlier one's hooks: that one still runs
        earlier.close()
        warn_capture(
            f"{self.path} was still open for writing by an earlier ICSCallback whose fit ended "
            "in an exception (Ctrl-C); it is closed now, with every capture it took written and the "
            "run marked interrupted."
        )

    def _forget_open_run(self) -> None:
        key = self.path.resolve()
        entry = _OPEN_RUNS.get(key)
        if entry is not None and entry[0]() in (self, None):
            del _OPEN_RUNS[key]

    def _start(self, epoch: int) -> None:
        """Trace the capture program, open the file and take the first capture."""
        self._started = True
        model = self._measured
        if self.submodel is not None:
            self._check_submodel()
        deleted = backend.deleted_variables(model)
        if deleted:
            raise RuntimeError(
                f"the model's weights are deleted ({len(deleted)} variables, e.g. {deleted[0]!r}): Keras's "
                "JAX trainer hands them to each training step and writes them back at the end of fit, "
                "so a fit interrupted in the middle (Ctrl-C) leaves them deleted, and Keras cannot "
                "train this model either. Build the model again, or load saved weights, and fit again"
            )
        with_gradients = self._probe_y is not None and getattr(model, "optimizer", None) is not None
        if self._probe_y is None:
            warn_capture(
                "the probe has no labels, so gradient statistics are skipped; pass "
                "probe=(x, y) to record them."
            )
        elif not with_gradients and self.submodel is not None:
            warn_capture(
                f"submodel {model.name!r} is not compiled, so it has no loss of its own to take "
                "gradients of: gradient statistics are skipped, its activations and weights are "
                "recorded (compile it with a loss and an optimizer to have them)."
            )
        elif not with_gradients:  # a training loop of the user's own, around a model never compiled
            warn_capture(
                f"model {model.name!r} is not compiled (no optimizer, no loss), so gradient statistics "
                "are skipped; compile it with its optimizer and loss to record them."
            )
        if not getattr(model, "built", True):
            # A subclassed model Keras has not built yet: build it on one probe sample in
            # inference mode (what its first training step would do), so that the capture
            # sees its variables and its trace never runs inside Keras's build.
            model(take(self._probe_x, 1), training=False)
        problem = mismatch(model, self._probe_x)
        if problem is not None:
            raise ValueError(
                f"the probe does not fit the model: {problem}. Pass a batch of the data the model "
                "trains on, e.g. probe=(x_val[:512], y_val[:512])"
            )
        self._fit_probe_to_states(model)
        program = self._program
        reusable = (
            program is not None
            and program.model is model
            and program.with_gradients == with_gradients
            and [id(v) for v in program.trainable] == [id(v) for v in model.trainable_variables]
        )
        if not reusable:  # a second fit of the same model keeps the traced function
            selection = select_layers(model, self.layers)
            self._program = CaptureProgram(model, selection, self.options, with_gradients)
        self._x = keras.tree.map_structure(keras.ops.convert_to_tensor, self._probe_x)
        self._y, self._sample_weight = (
            None if part is None else keras.tree.map_structure(keras.ops.convert_to_tensor, part)
            for part in (self._probe_y, self._probe_weights)
        )
        self._global_step = self._iterations()
        self._epoch_start_step = self._global_step
        resume = epoch > 0 or self._owns_file
        kind = "epoch" if resume else "start"
        # `overwrite` replaces a file found before this callback's first fit, never its own run.
        appending = resume and self.path.exists() and (self._owns_file or not self.overwrite)
        if appending and self._owns_file:
            # fit() again from epoch 0 continues the run; an initial_epoch counts from its start.
            self._epoch_offset = self._recorded_epochs() if epoch == 0 else 0
        if appending:
            # The optimizer's count can be behind the run's steps: a new optimizer (a run resumed
            # from its weights alone), or one that does not count the steps it skipped (mixed
            # precision's non-finite steps on JAX, before this fit with the same callback).
            self._continue_step_count(from_epoch=epoch + (self._epoch_offset if self._owns_file else 0))
        capture_epoch = float(epoch + (self._epoch_offset if appending else 0))

        # On JAX the capture compiles on a thread of its own while training starts; its
        # tracing (here) gives the layout the file is made with.
        def first_capture() -> Callable[[], Capture]:
            assert self._program is not None
            return self._program.measure_in_background(
                self._x,
                self._y,
                self._learning_rate(),
                step=self._global_step,
                epoch=capture_epoch,
                time=0.0,
                kind=kind,
                sample_weight=self._sample_weight,
            )

        try:
            finish = first_capture()
        except Exception as exc:
            if not self._program.with_gradients:
                raise
            # The gradients on the probe cannot be computed (most often no loss: compiled without
            # one, the loss made in a train_step of the user's own): the activations still can.
            self._program = CaptureProgram(model, self._program.selection, self.options, False)
            finish = first_capture()
            self._warn(
                "computing the loss and gradients on the probe (gradient statistics are skipped; "
                "the activations are recorded)",
                exc,
            )
        layout = self._with_batch_layers(self._program.layout)
        try:
            if appending:
                self._writer = self._resume(layout, from_epoch=epoch + self._epoch_offset)
                new_capture = self._writer.last_capture_epoch != capture_epoch
            else:
                self._writer = RunWriter.create(
                    self.path,
                    layout,
                    self._metadata(layout_size=len(layout.layers)),
                    overwrite=self.overwrite,
                )
                new_capture = True
        except BaseException:
            self._program.discard_first()  # its compile never starts
            raise
        self._program.start_first()
        # The writer's thread starts with the writer: a file refused above leaves no thread behind.
        self._queue = WriteQueue(self.path.name)
        self._waiting_captures = []  # this fit's (the finalizer below holds the list)
        if new_capture:
            writer = self._writer
            self._write("the first capture", lambda: writer.write_capture(finish()))
        self._batches_begun = 0
        self._last_capture_write = time.perf_counter()
        self._owns_file = True
        _OPEN_RUNS[self.path.resolve()] = (weakref.ref(self), threading.current_thread())
        if layout.batch_layers:
            self._safely_steps("starting the per-step statistics", lambda: self._install_steps(layout))
        # Close the file cleanly if the interpreter exits without on_train_end (a crash in the
        # user's training): the captures queued before it are written first.
        self._finalizer = weakref.finalize(
            self,
            _close_when_written,
            self._queue,
            self._writer,
            self._waiting_captures,
            self._program.first_step_done,
        )

    def _check_submodel(self) -> None:
        """One warning where `submodel` is not trained by this fit: its captures could not move."""
        assert self.submodel is not None
        trained = {id(v) for v in self.model.trainable_variables}
        own = self.submodel.trainable_variables
        if own and not any(id(v) in trained for v in own):
            warn_capture(
                f"submodel {self.submodel.name!r} shares no trainable weights with model "
                f"{self.model.name!r}, which fit trains, so its captures will not move. Pass the model "
                f"inside {self.model.name!r} (one of its attributes, e.g. gan.generator)."
            )

    def _resume(self, layout: RunLayout, from_epoch: int) -> RunWriter:
        try:
            writer = RunWriter.resume(self.path, layout, from_epoch=from_epoch)
        except IncompatibleRunError as exc:
            if not self._owns_file:
                raise
            raise IncompatibleRunError(
                f"this ICSCallback recorded another model or layer set into {self.path} in an earlier "
                f"fit ({exc.difference}), and one callback records one run. Give model "
                f"{self._measured.name!r} an ICSCallback of its own, with another path.",
                exc.difference,
            ) from exc
        missing = writer.epochs_without_metrics(from_epoch)
        if missing:
            # BackupAndRestore, say, saved the epoch before this file got its row, then the
            # process was killed: the resumed fit starts after it.
            numbers = ", ".join(str(e + 1) for e in missing)
            warn_capture(
                f"{self.path} has no metrics for epoch {numbers} (as Keras counts them, from 1): the "
                "earlier process ended before writing them, or initial_epoch skips them. The run "
                f"goes on from epoch {from_epoch + 1}; its curves skip them."
            )
        return writer

    # ------------------------------------------------------------ per-step mode
    def _with_batch_layers(self, layout: RunLayout) -> RunLayout:
        if not self.batch_stats:
            return layout
        reason = unsupported_reason(self.model)
        other = live_hooks(self.model, self.params)
        if reason is None and other is not None:
            # Both would record the same training batches; and one step can carry one set of hooks.
            reason = (
                f"another ICSCallback in this fit measures every training step of model "
                f"{self.model.name!r} already (its run: {other.run}); give batch_stats=True to one of them"
            )
        if reason is not None:
            warn_capture(f"batch_stats=True is off for this run: {reason}. Probe captures go on.")
            return layout
        specs = tuple(
            BatchLayerSpec(
                name=spec.name,
                index=i,
                n_units=spec.n_units,
                tracked_units=spec.tracked_units,
                sample=SAMPLE,
                unit_sample=UNIT_SAMPLE,
            )
            for i, spec in enumerate(layout.layers)
        )
        return dataclasses.replace(layout, batch_layers=specs)

    def _install_steps(self, layout: RunLayout) -> None:
        assert self._program is not None
        plans = [
            BatchPlan.create(spec, layout.hist_bins, len(layout.quantiles), self.options.seed)
            for spec in layout.batch_layers
        ]
        self._steps = StepStatistics(
            self.model, self._program.selection, plans, layout.quantiles, fit=self.params, run=str(self.path)
        )
        self._steps.install()
        self._step_tags = []
        self._tagged_through = self._global_step
        self._last_step_flush = time.perf_counter()

    def _safely_steps(self, what: str, fn: Callable[[], None]) -> None:
        """A failure in the per-step mode turns it off; probe captures go on."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - never stop the user's training
            self._steps_failed(what, exc)

    def _steps_failed(self, what: str, exc: BaseException) -> None:
        self._warn(
            f"{what} (per-step statistics are off for the rest of this run; probe captures go on)", exc
        )
        self._stop_steps()

    def _stop_steps(self) -> None:
        steps, self._steps = self._steps, None
        if steps is not None:
            try:
                steps.uninstall()
            except Exception as exc:  # noqa: BLE001
                self._warn("restoring the model's training step", exc)

    def _tag_steps(self) -> None:
        """Name the steps whose vectors the last train_function call produced."""
        new = self._global_step
        if new <= self._tagged_through:
            return
        # JAX emits one vector per step (also with steps_per_execution > 1); TF and
        # torch return one per train_function call: the last step's.
        first = self._tagged_through if backend.name() == "jax" else new - 1
        now = time.perf_counter() - self._train_start
        for step in range(first, new):
            self._step_tags.append((step, self._epoch_position(step), now))
        self._tagged_through = new

    def _flush_steps(self) -> None:
        steps, writer = self._steps, self._writer
        if steps is None or writer is None:
            return
        n = min(len(self._step_tags), steps.pending)
        if n == 0:
            return
        self._last_step_flush = time.perf_counter()
        vectors = steps.take(n)
        tags, self._step_tags = self._step_tags[:n], self._step_tags[n:]
        # batch_stats=N: every step computes its row (one step program), every N-th is kept.
        keep = [i for i, tag in enumerate(tags) if tag[0] % self.batch_stats_every == 0]
        if not keep:
            return
        vectors, tags = [vectors[i] for i in keep], [tags[i] for i in keep]
        plans = steps.plans

        def write() -> None:
            # On the writer's thread: the copy to the host waits for the last of these steps,
            # which the training thread has only just dispatched (JAX, torch).
            if steps.failed:  # rows queued before the training thread heard of the failure
                return
            try:
                rows = BatchRows(
                    step=np.asarray([t[0] for t in tags], "i8"),
                    epoch=np.asarray([t[1] for t in tags], "f8"),
                    time=np.asarray([t[2] for t in tags], "f8"),
                    layers=unpack(steps.rows(vectors), plans),
                )
            except Exception as exc:  # noqa: BLE001 - the per-step mode's own failure, not the file's
                steps.failed = True  # no row after a gap: the rows stop at the last good one
                self._steps_failure = exc  # reported on the training thread, which turns the mode off
                return
            writer.write_batches(rows)

        self._write("training-batch statistics", write)

    def _report_steps_failure(self) -> None:
        failure, self._steps_failure = self._steps_failure, None
        if failure is not None:
            self._steps_failed("per-step statistics", failure)

    def _continue_step_count(self, from_epoch: int) -> None:
        """A run resumed in a new process (`initial_epoch`) from its weights alone: the optimizer
        counts from 0 again, and the run's steps would start over below those recorded (the
        per-step figures, drawn by step, one over the other). The count goes on from the step of
        the last capture the run keeps, that of epoch `from_epoch`; an optimizer restored with
        its count (a `.keras` file, BackupAndRestore) is there already."""
        from ..store.reader import open_run  # the reader needs no Keras; imported lazily

        try:
            with open_run(self.path) as run:
                kept = run.steps[run.epochs <= from_epoch]
        except Exception:  # noqa: BLE001 - RunWriter.resume says what is wrong with the file
            return
        behind = (int(kept[-1]) if len(kept) else 0) - self._global_step
        if behind > 0:
            self._step_offset += behind
            self._global_step += behind
            self._epoch_start_step = self._global_step

    def _recorded_epochs(self) -> int:
        from ..store.reader import open_run  # the reader needs no Keras; imported lazily

        with open_run(self.path) as run:
            epochs = run.history_epochs
            return int(epochs[-1]) + 1 if len(epochs) else 0

    def _metadata(self, layout_size: int) -> dict[str, Any]:
        model = self._measured
        optimizer = self._measured_optimizer()
        config = {
            "histogram_bins": self.options.hist_bins,
            "tracked_units": self.options.tracked_units,
            "quantile_sample": self.options.quantile_sample,
            "max_values": self.options.max_values,
            "training_mode": self.options.training,
            "gradient_shift": self.options.gradient_shift,
            "every_n_steps": self.every_n_steps,
            "batch_stats": self.batch_stats,
            "batch_stats_every": self.batch_stats_every or None,
            "flush_every": self.flush_every if self.batch_stats else None,
            "flush_seconds": _FLUSH_SECONDS if self.batch_stats and self.flush_every is None else None,
            "probe_size": self._probe_size,
            "probe_has_labels": self._probe_y is not None,
            "probe_has_sample_weights": self._probe_weights is not None,
            "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "layers_filter": None if self.layers is None else [str(f) for f in self.layers],
            "epochs_planned": self.params.get("epochs") if self.params else None,
            "steps_per_epoch": self._steps_per_epoch,
            "parameters": int(model.count_params()),
            # The model fit trained, where the run measures a model inside it.
            "trained_model": None if self.submodel is None else self.model.name,
        }
        config.update(
            self.metadata.get("config", {}) if isinstance(self.metadata.get("config"), dict) else {}
        )
        meta = {k: v for k, v in self.metadata.items() if k != "config"}
        return {
            "run_name": self.run_name,
            "model_name": model.name,
            "dataset": str(meta.pop("dataset", "")),
            "seed": int(meta.pop("seed", self.options.seed)),
            "keras_version": keras.__version__,
            "backend": backend.name(),
            "config": config,
            **meta,
        }

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if not self._active:
            return
        if not self._started:
            self._safely("starting the capture", lambda: self._start(epoch))
        self._epoch_index = epoch
        self._epoch_start_time = time.perf_counter()
        self._epoch_start_step = self._global_step
        self._epoch_start_iterations = self._optimizer_steps()
        self._batches_begun_in_epoch = 0

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        program = self._program
        if program is not None and program.waits_for_first_step:
            if self._batches_begun:  # Keras's train function has run once: it is compiled
                program.first_step_done()
            self._batches_begun += 1
        self._batches_begun_in_epoch += 1
        if self._active and not self._counts_batches:
            self._after_steps(batch)  # the steps before this one
        if self._steps is not None:
            self._steps.expected = True  # this step belongs to our fit (see StepStatistics)

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._active:
            self._after_steps(batch + 1)

    def _after_steps(self, done: int) -> None:
        """The epoch's first `done` steps have run: count them, tag their per-step rows and
        take a step capture where a multiple of `every_n_steps` has passed."""
        counted = self._steps_in_epoch(done)
        before, self._global_step = (self._global_step, self._epoch_start_step + counted)
        self._tag_and_flush_steps()
        planned = self._steps_per_epoch
        last_of_epoch = done >= planned if planned else counted == self._epoch_length
        # A multiple of N passed since the last batch hook: with steps_per_execution=k, Keras
        # calls the hooks every k steps, and the capture is taken at the first one after it.
        n = self.every_n_steps
        if (
            n
            and not last_of_epoch  # the epoch capture follows at the same step
            and self._capture_ok
            and self._writer is not None
            and self._global_step // n > before // n
        ):
            epoch = self._epoch_position(self._global_step)
            self._safely("a step capture", lambda: self._capture(epoch, "step"))

    def _epoch_steps(self) -> int | None:
        """An epoch's steps: as `fit` planned them, or, for a dataset of unknown cardinality,
        as many as the last epoch had (None during the first), which place the step captures
        and per-step rows in their epoch until its end places them for good."""
        return int(self._steps_per_epoch) if self._steps_per_epoch else self._epoch_length

    def _epoch_position(self, step: int) -> float:
        """Where `step` lies in the current epoch: the epoch and the share of its steps before it
        (its start while the epoch's length is not known)."""
        steps = self._epoch_steps()
        return self._current_epoch + ((step - self._epoch_start_step) / steps if steps else 0.0)

    def _place_epoch_of_unknown_length(self) -> bool:
        """The epoch of a dataset of unknown cardinality has ended, and its length is known: its
        step captures and per-step rows, written with no place in it (the first epoch) or the
        last epoch's length, get theirs (`RunWriter.place_in_epoch`), and the next epoch is
        expected as long. True when a step capture taken at this last step now stands as the
        epoch's capture: the weights have not changed since."""
        first, length = self._epoch_start_step, self._global_step - self._epoch_start_step
        if length <= 0 or self._writer is None:
            return False
        self._epoch_length = length
        self._step_tags = [
            (step, self._epoch_position(step) if first <= step < first + length else placed, at)
            for step, placed, at in self._step_tags
        ]
        self._write_waiting_captures()
        self._write(
            "the places of the epoch's rows",
            functools.partial(self._writer.place_in_epoch, self._current_epoch, first, length),
        )
        return self._last_step_capture == self._global_step

    def _steps_in_epoch(self, steps: int) -> int:
        """`steps` (a batch hook's count) within the epoch's length: with steps_per_execution=k
        Keras numbers an epoch's last call as if it ran k steps (batch 11 of an epoch of 10).
        Of a dataset of unknown length, only the optimizer's count knows where that call ended."""
        if self._steps_per_epoch:
            return min(steps, int(self._steps_per_epoch))
        if getattr(self.model, "steps_per_execution", 1) > 1 and not self._optimizer_idle:
            count = self._optimizer_steps()
            if count is not None and count >= self._epoch_start_step:
                return min(steps, count - self._epoch_start_step)
        return steps

    def _tag_and_flush_steps(self) -> None:
        self._report_steps_failure()
        if self._steps is not None:
            self._safely_steps("per-step statistics", self._tag_steps)
            if self._steps is not None and self._flush_due():
                self._safely_steps("writing per-step statistics", self._flush_steps)

    def _flush_due(self) -> bool:
        waiting = len(self._step_tags)
        assert self._steps is not None
        # Rows wait in memory until written: a bound on their bytes whatever the schedule.
        by_bytes = max(1, _FLUSH_MAX_BYTES // self._steps.row_bytes)
        if self.flush_every is not None:
            return waiting >= min(self.flush_every, by_bytes)
        return _due_by_clock(waiting, min(_FLUSH_MAX_STEPS, by_bytes), self._last_step_flush)

    @property
    def _current_epoch(self) -> float:
        return float(self._epoch_index + self._epoch_offset)

    def _capture(self, epoch: float, kind: str) -> None:
        assert self._program is not None and self._writer is not None
        finish = self._program.measure(
            self._x,
            self._y,
            self._learning_rate(),
            step=self._global_step,
            epoch=epoch,
            time=time.perf_counter() - self._train_start,
            kind=kind,
            sample_weight=self._sample_weight,
        )
        self._waiting_captures.append(finish)
        if kind == "step":
            self._last_step_capture = self._global_step
        if kind == "step" and not _due_by_clock(
            len(self._waiting_captures), _CAPTURES_PER_WRITE, self._last_capture_write
        ):
            return  # frequent step captures: written together, one write per dataset for all
        self._write_waiting_captures()

    def _write_waiting_captures(self) -> None:
        """Hand the captures taken since the last write to the writer's thread, as one write."""
        if not self._waiting_captures or self._writer is None:
            return
        self._last_capture_write = time.perf_counter()
        # The captures' last host work (their quantiles) runs on the writer's thread, with the write.
        count = len(self._waiting_captures)
        what = "a capture" if count == 1 else f"{count} captures"
        self._write(what, _write_of(self._waiting_captures, self._writer))

    def _write(self, what: str, fn: Callable[[], None]) -> None:
        """Write to the run file, on the writer's thread; on the first failure (a full disk, a lost
        mount) warn once, here on the training thread, and stop writing.

        Every capture committed before the failure stays readable (the commit
        marker is written last), so the run file is kept as it is.
        """
        self._report_write_failure()
        if self._write_failed:
            return
        assert self._queue is not None  # made with the writer in _start, dropped with it at the end
        self._queue.submit(what, fn)

    def _report_write_failure(self) -> None:
        """Warn, once, about a write the writer's thread found failed; nothing more is written."""
        failure = self._queue.failure if self._queue is not None else None
        if failure is None or self._write_failed:
            return
        what, exc = failure
        self._write_failed = True
        self._capture_ok = False
        self._warn(
            f"writing {what} to {self.path} (nothing more is written to it; it keeps every capture "
            "committed before this)",
            exc,
        )

    def flush(self) -> None:
        """Wait until everything captured so far is written to the run file and committed.

        Captures are written on a thread of their own while training goes on; the
        callback flushes by itself at the end of training. Call this to read the
        file from the same process mid-training and find every capture taken so far.
        """
        if self._program is not None:
            self._program.first_step_done()  # a first capture still waiting is needed now
        self._write_waiting_captures()
        if self._queue is not None:
            self._queue.drain()
        self._report_write_failure()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if not self._active or self._writer is None:
            return
        if self._counts_batches:  # the optimizer's count still decides where a next fit starts
            self._check_optimizer_steps()
        else:
            self._global_step = self._steps_so_far()
            if self._steps is not None:
                self._safely_steps("per-step statistics", self._tag_steps)
            n = self.every_n_steps
            if n and not self._batches_begun_in_epoch and self._global_step - self._epoch_start_step >= n:
                self._warn_no_batch_begin()
        self._last_step = self._global_step
        taken = False
        if not self._steps_per_epoch:
            taken = self._place_epoch_of_unknown_length()
        logs = dict(logs or {})
        if self._capture_ok and not taken:
            self._safely(
                "the epoch capture",
                lambda: self._capture(float(epoch + 1 + self._epoch_offset), "epoch"),
            )
        if self._steps is not None:
            self._safely_steps("writing per-step statistics", self._flush_steps)
        steps = self._steps
        if steps is not None and steps.calls == 0 and self._global_step > self._epoch_start_step:
            self._steps_failed(
                "per-step statistics",
                RuntimeError(
                    "an epoch went by without Keras's own training step, where the per-step mode "
                    "measures: a training loop of your own does not run model.train_function"
                ),
            )
        metrics = {k: f for k, f in ((k, _as_float(v)) for k, v in logs.items()) if f is not None}
        metrics.setdefault("learning_rate", self._learning_rate())
        metrics["epoch_time"] = time.perf_counter() - self._epoch_start_time
        writer = self._writer
        self._write(
            "the epoch metrics", functools.partial(writer.write_epoch, epoch + self._epoch_offset, metrics)
        )

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._steps is not None:
            self._safely_steps("writing per-step statistics", self._flush_steps)
            self._stop_steps()
        self.flush()
        if self._steps_failure is not None:  # found by the last writes: warn (the mode is off already)
            failure, self._steps_failure = self._steps_failure, None
            self._warn("per-step statistics (the last steps' rows are not written)", failure)
        if self._writer is not None:
            try:
                if self._write_failed:  # already reported: leave the committed captures as they are
                    self._writer.close("interrupted", compact=False)
                else:
                    self._writer.close("complete")
            except Exception as exc:  # noqa: BLE001
                if not self._write_failed:
                    self._warn("closing the run file", exc)
            if self._finalizer is not None:
                self._finalizer.detach()
        if self._queue is not None:
            self._queue.close()
        self._writer = None
        self._queue = None
        self._forget_open_run()

    _epoch_index = 0
    _global_step = 0


def _due_by_clock(waiting: int, most: int, last_write: float) -> bool:
    """Whether `waiting` rows or captures go to the file now: `most` of them wait, or
    _FLUSH_SECONDS passed since the last write. A write costs about the same for one as for
    a thousand (a few ms per layer on the writer's thread, which shares the GIL with the
    training loop), so they are written by the clock."""
    return waiting >= most or (waiting > 0 and time.perf_counter() - last_write >= _FLUSH_SECONDS)
