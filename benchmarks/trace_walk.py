"""What finding the layers costs, once per run: the walk, the recorded graph, the reachability check.

Usage: python benchmarks/trace_walk.py [--models nasnetmobile transformer mobilenetv2] [--repeats 5]

For each model, in one process (medians of --repeats):
- the walk: `select_layers`, every layer of the model and of its nested models and layers of
  layers, classified;
- the recorded graph: `captured_inputs` over every selected tensor (every call of each layer);
- the reachability check: `Recorder.drop_unreachable` at the end of an intercepted forward pass,
  traced as the capture traces it (a `tf.function` without autograph, `jax.jit`);
- that traced forward pass itself, for scale, and the three's share of it.
All three run once per run (when the capture is traced and its layout written), never per capture.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import keras
import numpy as np
from depth import make

from _common import keras_label
from icsviz.capture.intercept import Recorder, intercept
from icsviz.capture.layers import captured_inputs, select_layers


def _model(name: str) -> tuple[keras.Model, Any]:
    if name == "nasnetmobile":  # 661 selected layers, the deepest graph of keras.applications here
        model = keras.applications.NASNetMobile(weights=None, input_shape=(32, 32, 3), classes=10)
        return model, np.zeros((8, 32, 32, 3), "float32")
    model, x, _ = make(name)
    return model, x[:8]


def _traced(forward: Any) -> Any:
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return lambda x: tf.function(forward, autograph=False)(x)  # a new trace each call
    if keras.backend.backend() == "jax":
        import jax

        return lambda x: jax.jit(forward)(x)
    return forward  # torch: eager


def _intercepted_forward(
    model: keras.Model, selection: list, recorders: list[Recorder], checked: list[float]
) -> Any:
    """The model's forward pass with the selection intercepted, as the capture runs it; each
    call's recorder and the time its reachability check took are appended to the lists."""

    def forward(batch: Any) -> Any:
        recorder = Recorder()
        with intercept(selection, recorder):
            out = model(batch, training=False)
            begin = time.perf_counter()
            recorder.drop_unreachable()  # what intercept() runs as it ends, timed apart
            checked.append(time.perf_counter() - begin)
        recorders.append(recorder)
        return out

    return forward


def measure(name: str, repeats: int) -> None:
    model, x = _model(name)
    walk, graph, check, trace = [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        selection = select_layers(model)
        walk.append(time.perf_counter() - start)
        recorders: list[Recorder] = []
        checked: list[float] = []
        forward = _intercepted_forward(model, selection, recorders, checked)
        start = time.perf_counter()
        _traced(forward)(x)
        trace.append(time.perf_counter() - start)
        check.append(checked[0])
        names = [record.name for record in recorders[0].records]
        start = time.perf_counter()
        captured_inputs(model, selection, names, recorders[0].aliases)
        graph.append(time.perf_counter() - start)
    walked = statistics.median(walk) + statistics.median(graph) + statistics.median(check)
    print(
        f"{name}: {len(selection)} selected, {len(names)} tensors recorded; "
        f"walk {1e3 * statistics.median(walk):.1f} ms, recorded graph {1e3 * statistics.median(graph):.1f} ms, "
        f"reachability check {1e3 * statistics.median(check):.2f} ms; traced forward pass "
        f"{statistics.median(trace):.2f} s; the three {walked / statistics.median(trace):.3f} of it",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["nasnetmobile", "transformer", "mobilenetv2"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(keras_label())
    for name in args.models:
        measure(name, args.repeats)


if __name__ == "__main__":
    main()
