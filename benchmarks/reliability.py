"""Damaged run files: how many read right, how many get our error, how many hang.

Damages copies of a run file (default: the shipped BN run) with seeded bit flips, zeroed
blocks and truncations, reads each one completely in a worker process (2 s limit per
case, as a user's `open_run` + every layer, gradient and the history would), and prints a
table. Also prints what the checksums cost when writing.

    python benchmarks/reliability.py [RUN.h5] [--cases N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import tiny_capture  # noqa: E402
from corruption_worker import corrupt, digest, start_worker  # noqa: E402
from icsviz.store import writer as writer_module  # noqa: E402
from icsviz.store.writer import RunWriter, layout_from_file  # noqa: E402

LIMIT_S = 2.0  # per case; a slower answer is waited for and listed, a missing one is a hang


def reliability(source: Path, cases: int, seed: int) -> None:
    data = source.read_bytes()
    reference = digest(source)
    worker = start_worker()
    worker.ask(source, 30.0)
    table: dict[str, dict[str, int]] = {}
    slow: list[str] = []
    odd: list[str] = []
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        for case in range(cases):
            kind = ("flip", "flip", "zero", "truncate")[case % 4]
            bad = Path(tmp) / f"case{case}.h5"
            bad.write_bytes(corrupt(data, rng, kind))
            started = time.perf_counter()
            answer = worker.ask(bad, LIMIT_S)
            if answer is None and worker.process.poll() is None:
                answer = worker.wait(60.0)  # over the limit: slow, or really hung?
                if answer is not None:
                    slow.append(f"case {case} ({kind}): {time.perf_counter() - started:.1f} s")
            if answer is None:
                crashed = worker.process.poll() is not None
                verdict = "crash" if crashed else "hang"
                odd.append(
                    f"case {case} ({kind}): {verdict}"
                    + (f" (exit {worker.process.returncode})" if crashed else "")
                )
                worker.kill()
                worker = start_worker()
                worker.ask(source, 30.0)  # its start-up must not count against the next case
            elif answer[0] == "ok":
                verdict = "read right" if answer[1] == reference else "WRONG NUMBERS"
            else:
                verdict = {"ours": "our error", "raw": "RAW EXCEPTION"}[answer[0]]
            row = table.setdefault(kind, {})
            row[verdict] = row.get(verdict, 0) + 1
    worker.kill()
    columns = ["read right", "our error", "RAW EXCEPTION", "WRONG NUMBERS", "hang", "crash"]
    print(f"{source.name}, {cases} cases (seed {seed}):")
    print("| damage | cases | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 2) + "|")
    for kind, row in table.items():
        print(f"| {kind} | {sum(row.values())} | " + " | ".join(str(row.get(c, 0)) for c in columns) + " |")
    for line in odd:
        print("  " + line)
    if slow:
        print(f"  over {LIMIT_S:.0f} s but answered: " + "; ".join(slow))


def checksum_cost(source: Path, captures: int = 100) -> None:
    """Seconds to write `captures` captures of the source run's layout, with and without checksums."""
    import h5py

    with h5py.File(source, "r") as f:
        layout = layout_from_file(f)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for checksum in (False, True, False, True):
            writer_module._CHECKSUM.clear()
            writer_module._CHECKSUM.update({"fletcher32": checksum})
            path = Path(tmp) / f"w{checksum}.h5"
            started = time.perf_counter()
            with RunWriter.create(path, layout, {}, overwrite=True) as w:
                for step in range(captures):
                    w.write_capture(tiny_capture(layout, step))
            times.setdefault(checksum, []).append(time.perf_counter() - started)
    writer_module._CHECKSUM.update({"fletcher32": True})
    without, with_ = min(times[False]), min(times[True])
    print(
        f"writing {captures} captures of {source.name}'s layout ({len(layout.layers)} layers), close and "
        f"compaction included: {without:.2f} s without checksums, {with_:.2f} s with: x{with_ / without:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", nargs="?", default=str(ROOT / "runs" / "cifar10-bn.h5"))
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rewrite", action="store_true", help="damage a checksummed copy (as icsviz writes now) of the run"
    )
    args = parser.parse_args()
    source = Path(args.run)
    if args.rewrite:
        from icsviz.store.writer import _rewrite

        copy = Path(tempfile.mkdtemp()) / source.name
        source = _rewrite(source, status="complete", out=copy)
    reliability(source, args.cases, args.seed)
    checksum_cost(Path(args.run))


if __name__ == "__main__":
    main()
