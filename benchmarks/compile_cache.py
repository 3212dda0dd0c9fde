"""The first capture on JAX with its persistent compilation cache: a later run of the same model.

Usage: KERAS_BACKEND=jax python benchmarks/compile_cache.py [--models bn] [--runs 3]

On JAX a run's first capture is mostly XLA compiling the capture function. JAX can keep
compiled programs on disk (JAX_COMPILATION_CACHE_DIR), for Keras's training step and for the
capture alike, so a later run of the same model and probe shape loads them. For each model this
runs, each in a fresh process: `--runs` times without the cache, then `--runs` times with a new
cache folder (the first fills it), and prints what `depth.py` counts as the first capture from
outside before its steady capture is taken off: a one-step `fit` with ICSCallback less the same
fit without it. (In the run that fills the cache, the fit without the callback runs first and
stores Keras's step, which the fit with it then loads: that row shows the capture's compile
without Keras's compile beside it.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_ONE = """
import sys, tempfile
from pathlib import Path
sys.path.insert(0, {here!r})
from depth import first_fit
plain, with_callback = first_fit({model!r}, 64, Path(tempfile.mkdtemp()))
print(f"{{plain:.2f}} {{with_callback:.2f}}")
"""


def one(model: str, cache: Path | None) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    if cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    script = _ONE.format(here=str(Path(__file__).resolve().parent), model=model)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    plain, with_callback = (float(v) for v in done.stdout.split()[-2:])
    return plain, with_callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bn"])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.environ.get("KERAS_BACKEND") != "jax":
        raise SystemExit("compile_cache.py measures JAX's compilation cache: run it with KERAS_BACKEND=jax")
    for model in args.models:
        with tempfile.TemporaryDirectory() as cache:
            for label, folder in (("no cache", None), ("cache", Path(cache))):
                for index in range(args.runs):
                    plain, with_callback = one(model, folder)
                    note = " (fills it)" if folder is not None and index == 0 else ""
                    print(
                        f"{model:11s} {label + note:17s} run {index + 1}: one-step fit {plain:5.2f} s, with "
                        f"ICSCallback {with_callback:5.2f} s: the callback's first capture {with_callback - plain:5.2f} s",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
