"""Shared helpers for the benchmarks: CIFAR-shaped random data and timers."""

from __future__ import annotations

import os
import time
from collections import defaultdict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from icsviz.models import build_model
from icsviz.train import RECIPES, Recipe, _optimizer


def reference_model(name: str) -> tuple[keras.Model, Recipe]:
    """The reference CNN `name` ("baseline" or "bn") compiled with its recipe, seeded."""
    keras.utils.set_random_seed(0)
    model = build_model(name, (32, 32, 3), 10)
    recipe = RECIPES[name]
    model.compile(_optimizer(recipe), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model, recipe


def keras_label() -> str:
    """ "keras 3.15.1 (jax)": the version and backend each benchmark's header names."""
    return f"keras {keras.__version__} ({keras.backend.backend()})"


def cifar_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, n)


def wait_for_device(model: keras.Model) -> None:
    """Block until the model's last update is computed (JAX and torch dispatch steps ahead)."""
    keras.ops.convert_to_numpy(model.trainable_variables[-1].value)


class EpochTimer:
    """Two callbacks around the others, so an epoch's time includes their work. Both wait for
    the device, so that no step dispatched in one epoch is computed in the next's time."""

    def __init__(self) -> None:
        self.times: list[float] = []
        timer = self

        class Begin(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                wait_for_device(self.model)
                timer._start = time.perf_counter()

        class End(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                wait_for_device(self.model)
                timer.times.append(time.perf_counter() - timer._start)

        self.begin, self.end = Begin(), End()


HOOKS = (
    "on_train_begin",
    "on_epoch_begin",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_epoch_end",
    "on_train_end",
)


class TimedCallback(keras.callbacks.Callback):
    """Forwards every training hook `inner` has to it and times it: `seconds[epoch]` adds up
    an epoch's hooks, `hook_seconds[(hook, epoch)]` each hook's share. Hooks `inner` leaves
    as Keras's defaults stay defaults here (Keras's JAX and torch loops run steps ahead of
    their logs only while no callback has batch hooks)."""

    def __init__(self, inner: keras.callbacks.Callback) -> None:
        super().__init__()
        self.inner = inner
        self.seconds: dict[int, float] = defaultdict(float)
        self.hook_seconds: dict[tuple[str, int], float] = defaultdict(float)
        self.epoch = 0
        for hook in HOOKS:
            if not getattr(getattr(inner, hook), "_is_default", False):
                setattr(self, hook, self._timed(hook))

    def _timed(self, hook: str):
        method = getattr(self.inner, hook)

        def call(*args, **kwargs):
            if hook == "on_epoch_begin":
                self.epoch = args[0]
            start = time.perf_counter()
            method(*args, **kwargs)
            spent = time.perf_counter() - start
            self.seconds[self.epoch] += spent
            self.hook_seconds[(hook, self.epoch)] += spent

        return call

    def set_model(self, model) -> None:
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params) -> None:
        super().set_params(params)
        self.inner.set_params(params)


class StepTimer:
    """Two callbacks around the others: the seconds of each training step, all hooks included."""

    def __init__(self) -> None:
        self.times: list[float] = []
        timer = self

        class Begin(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                timer._start = time.perf_counter()

        class End(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                timer.times.append(time.perf_counter() - timer._start)

        self.begin, self.end = Begin(), End()
