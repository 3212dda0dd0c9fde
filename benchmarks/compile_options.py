"""XLA options for compiling the capture (JAX): compile seconds, the capture's speed, its values.

Usage: KERAS_BACKEND=jax python benchmarks/compile_options.py [--models bn mobilenetv2]
           [--sets default autotune0 ...] [--probe 64] [--runs 10]

On JAX the first capture's cost is mostly XLA compiling the capture function (forward and
backward pass plus the statistics). For each model and each named set of XLA options this
runs a fresh process (so no set reuses another's autotuning results) that lowers the capture
function and compiles it with those options, and prints the compile seconds, the compiled
capture's median run time (depth.py gives the training step's), and how far its results are
from the first set's (the largest difference of any result relative to its largest magnitude).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Named sets of XLA debug options (jax.jit's compiler_options). `icsviz_cpu` is what icsviz uses
# on a CPU (LLVM level 1, XLA's older emitters for fused kernels); the GPU ones trade autotuning
# (convolution algorithms timed at compile time, Triton GEMM variants) for a shorter compile.
OPTION_SETS: dict[str, dict[str, object]] = {
    "default": {},
    "level1": {"xla_backend_optimization_level": 1},
    "no_fusion_emitters": {"xla_cpu_use_fusion_emitters": False},
    "icsviz_cpu": {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False},
    "autotune0": {"xla_gpu_autotune_level": 0},
    "autotune0_notriton": {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False},
    "notriton": {"xla_gpu_enable_triton_gemm": False},
    "fast": {
        "xla_gpu_autotune_level": 0,
        "xla_gpu_enable_triton_gemm": False,
        "xla_backend_optimization_level": 1,
    },
}


def one(name: str, options: dict[str, object], probe: int, runs: int, values_path: Path) -> dict[str, float]:
    import jax
    import keras
    import numpy as np
    from depth import make

    from icsviz.capture import backend
    from icsviz.capture.layers import select_layers
    from icsviz.capture.program import CaptureProgram
    from icsviz.capture.stats import CaptureOptions

    model, x, y = make(name)
    program = CaptureProgram(model, select_layers(model, None), CaptureOptions(), with_gradients=True)
    xt, yt = keras.ops.convert_to_tensor(x[:probe]), keras.ops.convert_to_tensor(y[:probe])
    args, _ = program._arguments(xt, yt, None, 0.01)
    start = time.perf_counter()
    with backend.isolated_rng(program.options.seed):  # a plain jit: no options of icsviz's own
        lowered = jax.jit(program._program).lower(*args)
    lowering = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    compiling = time.perf_counter() - start
    values = backend.to_numpy(compiled(*args))
    runs_t = []
    for _ in range(runs):
        start = time.perf_counter()
        backend.to_numpy(compiled(*args))
        runs_t.append(time.perf_counter() - start)
    leaves = [np.asarray(v, dtype="float64") for v in keras.tree.flatten(values)]
    np.savez(values_path, *leaves)
    return {"lowering": lowering, "compiling": compiling, "capture_ms": statistics.median(runs_t) * 1e3}


def difference(a: Path, b: Path) -> float:
    import numpy as np

    with np.load(a) as first, np.load(b) as second:
        worst = 0.0
        for key in first.files:
            x, y = first[key], second[key]
            finite = np.isfinite(x) & np.isfinite(y)
            scale = float(np.max(np.abs(x[finite]), initial=0.0)) or 1.0
            worst = max(worst, float(np.max(np.abs(x[finite] - y[finite]), initial=0.0)) / scale)
        return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bn", "mobilenetv2"])
    parser.add_argument("--sets", nargs="+", default=None, choices=sorted(OPTION_SETS))
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "SET", "VALUES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model, name, values = args.one
        print(json.dumps(one(model, OPTION_SETS[name], args.probe, args.runs, Path(values))), flush=True)
        return
    if os.environ.get("KERAS_BACKEND") != "jax":
        raise SystemExit(
            "compile_options.py measures XLA's compile of the capture: run it with KERAS_BACKEND=jax"
        )
    import jax

    gpu = jax.default_backend() != "cpu"
    sets = args.sets or (
        ["default", "autotune0", "level1", "fast"] if gpu else ["default", "level1", "icsviz_cpu"]
    )
    print(
        f"capture compile options, JAX {jax.__version__} on {jax.devices()[0].device_kind}, probe {args.probe}"
    )
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            reference: tuple[str, Path] | None = None  # the first set that compiled
            for name in sets:
                values = Path(folder) / f"{model}-{name}.npz"
                command = [sys.executable, __file__, "--probe", str(args.probe), "--runs", str(args.runs)]
                done = subprocess.run(
                    [*command, "--one", model, name, str(values)], capture_output=True, text=True, check=False
                )
                if done.returncode:
                    print(
                        f"{model:11s} {name:18s} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True
                    )
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                reference = reference or (name, values)
                print(
                    f"{model:11s} {name:18s} compile {row['compiling']:5.1f} s (tracing and lowering "
                    f"{row['lowering']:4.1f} s) | compiled capture {row['capture_ms']:6.1f} ms (median of {args.runs}) | "
                    f"largest relative difference from {reference[0]}: {difference(reference[1], values):.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
