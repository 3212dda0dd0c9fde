"""The benchmark scripts that reach into the capture program's internals still run.

They are not part of the package, and nothing else runs them: `first_capture.py` passed the
last capture's weights as a list for a day after the program took them as one flat vector.
Each runs here once on the smallest model, in a process of its own, and its printed figures
are read back.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, backend: str = "tensorflow") -> str:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run(
        [sys.executable, script, *args], cwd=BENCHMARKS, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize(("backend", "size"), [("tensorflow", r"(\d+) ops"), ("jax", r"(\d+) kernels")])
def test_first_capture_prints_the_capture_s_size_and_times(backend: str, size: str) -> None:
    out = _run("first_capture.py", "--models", "baseline", backend=backend)
    line = next(line for line in out.splitlines() if line.startswith("baseline"))
    assert int(re.search(size, line).group(1)) > 100, line  # a forward, backward and statistics
    later = float(re.search(r"later runs\s+([\d.]+) ms", line).group(1))
    assert later > 0, line


def test_capture_parts_prints_each_part_against_the_training_step() -> None:
    out = _run("capture_parts.py", "--models", "baseline", "--repeats", "2")
    line = next(line for line in out.splitlines() if line.startswith("baseline"))
    assert "12 tensors" in line, line
    parts = {key.strip(): ms for key, ms in re.findall(r"([a-z+ ]+?) +([\d.]+) ms", line.split("|", 1)[1])}
    assert list(parts) == ["pass", "+ norms", "+ statistics", "measure", "training step"], line
    assert all(float(ms) > 0 for ms in parts.values()), line


def test_norms_one_pass_compares_the_two_ways_and_finds_the_same_norms() -> None:
    out = _run("norms_one_pass.py", "--models", "baseline", "--pairs", "2")
    line = next(line for line in out.splitlines() if line.startswith("baseline"))
    weights, gradients = re.search(r"weight norms ([\d.e+-]+), gradient norms ([\d.e+-]+)", line).groups()
    assert float(weights) < 1e-6 and float(gradients) < 1e-6, line
    assert re.search(r"paired difference +[+-][\d.]+ ms", line), line


def test_live_chunks_writes_the_same_captures_in_each_chunk_size() -> None:
    out = _run("live_chunks.py", "--models", "baseline", "--values", "4096", "1024", "--captures", "4")
    lines = [line for line in out.splitlines() if line.startswith("baseline")]
    assert [re.search(r"chunks of +(\d+) values", line).group(1) for line in lines] == ["4096", "1024"], out
    for line in lines:
        assert float(re.search(r"write CPU +([\d.]+) ms", line).group(1)) > 0, line
        assert float(re.search(r"file +([\d.]+) MB", line).group(1)) > 0, line
    assert "paired against 4096:  +0.00 ms" in lines[0], lines[0]


def test_compile_options_compiles_the_capture_and_compares_its_values() -> None:
    out = _run(
        "compile_options.py",
        "--models",
        "baseline",
        "--runs",
        "1",
        "--sets",
        "icsviz_cpu",
        "default",
        backend="jax",
    )
    lines = [line for line in out.splitlines() if line.startswith("baseline")]
    assert len(lines) == 2, out
    differences = [float(re.search(r"from icsviz_cpu: ([\d.e+-]+)", line).group(1)) for line in lines]
    assert differences[0] == 0.0 and differences[1] < 1e-5, lines


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_per_step_pairs_alternate_the_two_train_functions_and_leave_a_model_that_trains_on(
    backend: str,
) -> None:
    # JAX's pairs carry the training state through both functions and hand it back to the model
    # (which `per_step.py` evaluates after the fit): a state lost there fails the run.
    out = _run("per_step.py", "--models", "lstm", "--paired", "3", "--images", "256", backend=backend)
    line = next(line for line in out.splitlines() if line.startswith("lstm"))
    plain, stats = (float(v) for v in re.search(r"step ([\d.]+) ms plain, ([\d.]+) ms with", line).groups())
    ratio = float(re.search(r"-> ratio ([\d.]+)", line).group(1))
    assert plain > 0 and stats > 0 and 0.2 < ratio < 5, line


def test_trace_walk_finds_the_transformer_blocks_inner_layers() -> None:
    out = _run("trace_walk.py", "--models", "transformer", "--repeats", "1")
    line = next(line for line in out.splitlines() if line.startswith("transformer"))
    # Four blocks of attention, two LayerNormalizations and a feed-forward pair (its first Dense
    # fused with a ReLU: two tensors), the embedding and the head's two.
    assert "26 selected, 27 tensors recorded" in line, line
    share = float(re.search(r"the three ([\d.]+) of it", line).group(1))
    assert 0 < share < 0.2, line
