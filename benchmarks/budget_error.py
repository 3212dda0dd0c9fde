"""What the value budget costs in accuracy: statistics from the sampled rows against all values.

Usage: python benchmarks/budget_error.py [--data-dir DIR] [--epochs 2] [--probe 64]

Trains the reference BN CNN briefly on CIFAR-10 (the subset in ../shared/data by default),
captures the same probe with the default budget (`max_values=2**16`) and with every value
(`max_values=None`), and prints per layer the difference of mean, std and the 15/50/85th
percentiles in units of the layer's standard deviation. docs/statistics.md quotes the worst.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np

from icsviz.capture.layers import select_layers
from icsviz.capture.program import CaptureProgram
from icsviz.capture.stats import CaptureOptions
from icsviz.data import load_cifar10
from icsviz.models import build_model
from icsviz.train import RECIPES, _optimizer

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-batches-py-subset"
LEVELS = {"q15": 3, "q50": 6, "q85": 9}  # positions of these levels in QUANTILES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(SUBSET))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--probe", type=int, default=64)
    args = parser.parse_args()
    data = load_cifar10(args.data_dir, download=False)
    scale = (lambda a: a.astype("float32") / 255.0) if data.x_train.dtype != np.float32 else (lambda a: a)
    keras.utils.set_random_seed(0)
    model = build_model("bn", (32, 32, 3), 10)
    model.compile(_optimizer(RECIPES["bn"]), "sparse_categorical_crossentropy")
    model.fit(scale(data.x_train[:2000]), data.y_train[:2000].reshape(-1), epochs=args.epochs, verbose=0)
    probe = keras.ops.convert_to_tensor(scale(data.x_test[: args.probe]))
    captured = {}
    for budget in (None, CaptureOptions().max_values):
        program = CaptureProgram(model, select_layers(model), CaptureOptions(max_values=budget), False)
        capture = program.run(probe, None, 0.0, step=0, epoch=0.0, time=0.0, kind="start")
        captured[budget] = (program.traced, capture.layers)
    (plans, every), (sampled_plans, sampled) = captured[None], captured[CaptureOptions().max_values]
    worst = dict.fromkeys(["mean", "std", *LEVELS], 0.0)
    print(f"{'layer':16s} {'values':>17s}  difference / layer std")
    for plan, sampled_plan, full, part in zip(plans, sampled_plans, every, sampled):
        std = full.moments[1]
        errors = {
            "mean": abs(full.moments[0] - part.moments[0]) / std,
            "std": abs(std - part.moments[1]) / std,
        }
        errors |= {k: abs(full.quantiles[i] - part.quantiles[i]) / std for k, i in LEVELS.items()}
        worst = {k: max(worst[k], errors[k]) for k in worst}
        values = f"{sampled_plan.n_values}/{plan.n_values}"
        print(f"{plan.name:16s} {values:>17s}  " + "  ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    print("worst: " + "  ".join(f"{k} {v:.4f}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
