"""Wall time of `icsviz plot` on the two shipped 50-epoch runs (every figure, PNG and PDF).

Usage: python benchmarks/plot_speed.py [--runs runs/cifar10-baseline.h5 runs/cifar10-bn.h5]

Runs the real command in a fresh process, so the time includes Python's and
matplotlib's start-up, as a user sees it. Target: under 30 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=[str(p) for p in sorted((ROOT / "runs").glob("*.h5"))])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "icsviz.cli", "plot", *args.runs, "--out", out, "--quiet"], check=True
        )
        elapsed = time.perf_counter() - start
        files = list(Path(out).iterdir())
    print(f"icsviz plot on {len(args.runs)} runs: {len(files)} files in {elapsed:.1f} s (target < 30 s)")


if __name__ == "__main__":
    main()
