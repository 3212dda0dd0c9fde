"""Worker for the corruption test: read a run file completely, the way a user would.

Reads hex-encoded paths from stdin and answers each with one base64 pickle:
("ok", digest) when everything read, ("ours", class name, message) for an
icsviz error, ("raw", class name, message) for anything else. Run in its own
process so that a hang or a crash of HDF5 is seen by the parent, not suffered.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np

import icsviz
from icsviz.store.check import _Worker, check_run

HERE = Path(__file__).resolve().parent


def start_worker() -> _Worker:
    """This module's `main` in a process of its own (a hang or a crash there is only an answer)."""
    return _Worker(f"import sys; sys.path.insert(0, {str(HERE)!r}); import corruption_worker as w; w.main()")


def corrupt(data: bytes, rng: np.random.Generator, kind: str) -> bytes:
    out = bytearray(data)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(out)))
            out[at] ^= 1 << int(rng.integers(0, 8))
    elif kind == "zero":
        size = int(rng.choice([64, 512, 4096]))
        at = int(rng.integers(0, max(1, len(out) - size)))
        out[at : at + size] = bytes(len(out[at : at + size]))
    else:
        out = out[: int(rng.integers(0, len(out)))]
    return bytes(out)


def digest(path: Path) -> str:
    """A hash of everything the public reader returns for a run."""
    h = hashlib.sha256()
    with icsviz.open_run(path) as run:
        h.update(repr(sorted((k, str(v)) for k, v in run.attrs.items())).encode())
        h.update(run.status.encode())
        h.update(np.ascontiguousarray(run.steps).tobytes() + np.ascontiguousarray(run.epochs).tobytes())
        for name in run.layer_names:
            for value in vars(run.activations(name)).values():
                if isinstance(value, np.ndarray):
                    h.update(np.ascontiguousarray(value).tobytes())
        for name in run.variable_names:
            g = run.gradients(name)
            h.update(g.grad_norm.tobytes() + g.weight_norm.tobytes() + g.update_ratio.tobytes())
        for name in run.ics_layer_names:
            ics = run.ics(name)
            h.update(ics.grad_diff.tobytes() + ics.grad_cos.tobytes())
        for key, value in run.history.items():
            h.update(key.encode() + value.tobytes())
    return h.hexdigest()


def main() -> None:
    for line in sys.stdin.buffer:
        path = Path(os.fsdecode(bytes.fromhex(line.decode().split()[-1])))  # "<task> <hex path>"
        try:
            answer: tuple = ("ok", digest(path))
        except icsviz.RunFileError as exc:
            answer = ("ours", type(exc).__name__, str(exc))
        except Exception as exc:  # noqa: BLE001 - what the test is looking for
            answer = ("raw", type(exc).__name__, str(exc))
        report = check_run(path)
        answer = (*answer, report.ok, report.openable)
        sys.stdout.buffer.write(base64.b64encode(pickle.dumps(answer)) + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
