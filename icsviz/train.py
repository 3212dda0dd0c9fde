"""The reference training recipe (DESIGN.md), with ICSCallback attached.

Baseline CNN: RMSprop, learning rate 1e-4 with the old per-step decay 1e-6
(InverseTimeDecay(1e-4, 1, 1e-6)), batch 32, pixels / 255, random shifts of up
to 10% (nearest fill) and horizontal flips, test set as validation data. The
BN twin uses a learning rate of 1e-3. The MLPs follow Ioffe & Szegedy: batch
60, plain SGD, no augmentation. Every choice can be overridden.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .capture.callback import ICSCallback
from .data import Dataset
from .models import build_model

__all__ = ["Recipe", "RECIPES", "ShiftFlipBatches", "train"]


@dataclass(frozen=True)
class Recipe:
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-4
    lr_decay: float = 1e-6  # InverseTimeDecay rate per step (the old Keras `decay`)
    batch_size: int = 32
    augment: bool = True
    epochs: int = 50


RECIPES: dict[str, Recipe] = {
    "baseline": Recipe(),
    "bn": Recipe(learning_rate=1e-3),
    "mlp": Recipe(optimizer="sgd", learning_rate=0.5, lr_decay=0.0, batch_size=60, augment=False),
    "mlp-bn": Recipe(optimizer="sgd", learning_rate=0.5, lr_decay=0.0, batch_size=60, augment=False),
}


class ShiftFlipBatches(keras.utils.PyDataset):
    """Batches with random shifts (nearest fill) and horizontal flips, like the
    Keras example's ImageDataGenerator(width/height_shift_range=0.1, horizontal_flip=True).

    Shifts are whole pixels, up to round(0.1 * size).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, shift: float = 0.1) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        self.max_shift = (round(shift * x.shape[1]), round(shift * x.shape[2]))
        self.order = self.rng.permutation(len(x))

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        batch = self.x[ids]
        n, h, w = batch.shape[:3]
        dy = self.rng.integers(-self.max_shift[0], self.max_shift[0] + 1, size=n)
        dx = self.rng.integers(-self.max_shift[1], self.max_shift[1] + 1, size=n)
        rows = np.clip(np.arange(h)[None, :] - dy[:, None], 0, h - 1)  # nearest fill
        cols = np.clip(np.arange(w)[None, :] - dx[:, None], 0, w - 1)
        flip = self.rng.random(n) < 0.5
        cols = np.where(flip[:, None], cols[:, ::-1], cols)
        batch = batch[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return batch, self.y[ids]


def _optimizer(recipe: Recipe) -> keras.optimizers.Optimizer:
    rate: Any = recipe.learning_rate
    if recipe.lr_decay:
        rate = keras.optimizers.schedules.InverseTimeDecay(recipe.learning_rate, 1, recipe.lr_decay)
    if recipe.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate)
    if recipe.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=rate)
    if recipe.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    raise ValueError(f"optimizer must be rmsprop, sgd or adam. Received: optimizer={recipe.optimizer!r}")


def train(
    model_name: str,
    data: Dataset,
    out: str | os.PathLike[str],
    *,
    recipe: Recipe | None = None,
    probe_size: int = 512,
    every_n_steps: int | None = None,
    batch_stats: bool | int = False,
    gradient_shift: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    verbose: int | str = "auto",
    run_name: str | None = None,
) -> keras.callbacks.History:
    """Train a reference model on `data` with the reference recipe, recording to `out`."""
    recipe = recipe or RECIPES.get(model_name, Recipe())
    keras.utils.set_random_seed(seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    model.compile(
        optimizer=_optimizer(recipe),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x_train = data.x_train.astype("float32") / 255.0
    x_test = data.x_test.astype("float32") / 255.0
    probe = (x_test[:probe_size], data.y_test[:probe_size])
    callback = ICSCallback(
        out,
        probe=probe,
        every_n_steps=every_n_steps,
        batch_stats=batch_stats,
        gradient_shift=gradient_shift,
        overwrite=overwrite,
        run_name=run_name or Path(out).stem,
        seed=seed,
        metadata={
            "dataset": data.name,
            "seed": seed,
            "data_source": data.source,
            "train_samples": len(x_train),
            "test_samples": len(x_test),
            "reference_model": model_name,
            "config": {"recipe": asdict(recipe)},
        },
    )
    if recipe.augment:
        fit_data: Any = ShiftFlipBatches(x_train, data.y_train, recipe.batch_size, seed)
        fit_kwargs: dict[str, Any] = {}
    else:
        fit_data, fit_kwargs = x_train, {"y": data.y_train, "batch_size": recipe.batch_size}
    return model.fit(
        fit_data,
        epochs=recipe.epochs,
        validation_data=(x_test, data.y_test),
        callbacks=[callback],
        verbose=verbose,
        **fit_kwargs,
    )


def recipe_for(model_name: str, **overrides: Any) -> Recipe:
    """The reference recipe of a model with some fields replaced (None = keep)."""
    base = RECIPES.get(model_name, Recipe())
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
