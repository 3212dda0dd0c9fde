"""The `icsviz` command: train, experiment, info, repair."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence, Set
from pathlib import Path

from .errors import ICSVizError, RunFileError
from .extras import missing_extra, require


class RunFolderError(ICSVizError, NotADirectoryError):
    """The runs folder given to `icsviz app` does not exist."""


class UsageError(ICSVizError, ValueError):
    """Command-line options that do not fit together (labels, formats)."""


class OutputError(ICSVizError, OSError):
    """The figures or the report cannot be written where --out says."""


__all__ = ["main"]


# The data sets `icsviz train` knows (icsviz.data.DATASETS; kept here so --help needs no import).
_DATASETS = ("cifar10", "fashion_mnist", "mnist", "synthetic")


def _dataset(value: str) -> str:
    key = value.replace("-", "_").lower()
    if key not in _DATASETS:
        raise argparse.ArgumentTypeError(
            f"unknown data set {value!r}: icsviz train knows {', '.join(_DATASETS)}. For another data set, "
            "train your own model with ICSCallback in model.fit (see the README's quick start)."
        )
    return key


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (received {value})")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be a number above 0 (received {value})")
    return number


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="cifar10",
        type=_dataset,
        help="cifar10, fashion_mnist, mnist or synthetic (default: cifar10)",
    )
    p.add_argument("--data-dir", help="local copy: a cifar-10-batches-py folder or tarball, or an idx folder")
    p.add_argument("--epochs", type=_positive_int, help="epochs (default: the recipe's, 50)")
    p.add_argument("--batch-size", type=_positive_int, help="batch size (default: the recipe's)")
    p.add_argument(
        "--lr",
        type=_positive_float,
        dest="learning_rate",
        help="initial learning rate (default: the recipe's)",
    )
    p.add_argument("--no-augment", action="store_true", help="train without shifts and flips")
    p.add_argument(
        "--probe-size",
        type=_positive_int,
        default=512,
        help="samples of the test set measured at each capture",
    )
    p.add_argument("--every-n-steps", type=_positive_int, help="also capture every N training steps")
    p.add_argument("--gradient-shift", action="store_true", help="record the Santurkar et al. gradient shift")
    p.add_argument(
        "--batch-stats",
        nargs="?",
        type=_positive_int,
        const=1,
        default=0,
        metavar="N",
        help="per-step mode: also measure every training batch inside the training step (about 1.1x); "
        "with N, keep every N-th step's row",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing run files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icsviz", description="See internal covariate shift in Keras models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a reference model with ICSCallback")
    p.add_argument("--model", required=True, choices=["baseline", "bn", "mlp", "mlp-bn"])
    p.add_argument("-o", "--out", help="run file (default: runs/<dataset>-<model>.h5)")
    _add_training_args(p)

    p = sub.add_parser("experiment", help="train a model and its BN twin into one folder")
    p.add_argument(
        "--pair", default="cnn", choices=["cnn", "mlp"], help="cnn: baseline + bn; mlp: mlp + mlp-bn"
    )
    p.add_argument("-o", "--out-dir", default="runs", help="folder for the two run files (default: runs)")
    _add_training_args(p)

    p = sub.add_parser("app", help="open the explorer (Streamlit) on a runs folder")
    p.add_argument(
        "folder", nargs="?", help="folder of run files (default: runs); a run file opens its folder"
    )
    p.add_argument("--runs", help="the same folder, as `streamlit run app.py -- --runs DIR` takes it")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default: 8501)")
    p.add_argument("--address", default="localhost", help="interface to bind (default: localhost only)")
    p.add_argument("--headless", action="store_true", help="do not open a browser (on a server)")

    p = sub.add_parser("plot", help="write publication figures (PNG and PDF) for one or more runs")
    p.add_argument("runs", nargs="+", help=RUNS_HELP)
    p.add_argument("-o", "--out", default="figures", help="output folder (default: figures)")
    p.add_argument("--labels", nargs="+", help="one label per run (default: file names)")
    p.add_argument(
        "--layers",
        nargs="+",
        help="layers to draw per-layer figures for (default: every layer, or the 12 most drifted "
        "of runs with more than 24; 'all': every layer)",
    )
    p.add_argument(
        "--ioffe-layer",
        help="the layer whose tracked unit the Ioffe & Szegedy figures follow "
        "(default: the input of the last hidden nonlinearity)",
    )
    p.add_argument("--formats", nargs="+", default=["png", "pdf"], help="file formats (default: png pdf)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("report", help="write a self-contained HTML report for one or more runs")
    p.add_argument("runs", nargs="+", help=RUNS_HELP)
    p.add_argument("-o", "--out", default="report.html", help="output file (default: report.html)")
    p.add_argument("--labels", nargs="+", help="one label per run (default: file names)")
    p.add_argument("--title", default="icsviz report")

    p = sub.add_parser("info", help="summarize run files")
    p.add_argument("runs", nargs="+", help=RUNS_HELP)

    p = sub.add_parser("check", help="read every byte of run files and report what is damaged")
    p.add_argument("runs", nargs="+", help=RUNS_HELP)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per file before it counts as hung")

    p = sub.add_parser(
        "repair",
        help="save the readable captures of a damaged run (or make a killed run plain-h5py readable)",
    )
    p.add_argument("runs", nargs="+", help=RUNS_HELP)
    p.add_argument(
        "-o", "--out", help="where to write (one run only; default: NAME.repaired.h5 for a damaged run)"
    )
    return parser


def _train_one(args: argparse.Namespace, model: str, out: Path) -> None:
    from .data import load_dataset
    from .train import recipe_for, train

    data = load_dataset(args.dataset, args.data_dir)
    recipe = recipe_for(
        model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        augment=False if args.no_augment else None,
    )
    print(
        f"icsviz: training {model} on {data.name} ({len(data.x_train)} train / "
        f"{len(data.x_test)} test images from {data.source}) for {recipe.epochs} epochs -> {out}",
        flush=True,
    )
    train(
        model,
        data,
        out,
        recipe=recipe,
        probe_size=args.probe_size,
        every_n_steps=args.every_n_steps,
        batch_stats=args.batch_stats,
        gradient_shift=args.gradient_shift,
        overwrite=args.overwrite,
        seed=args.seed,
        verbose=0 if args.quiet else (1 if sys.stdout.isatty() else 2),
    )
    print(f"icsviz: wrote {out}", flush=True)


def _fmt(value: float, pattern: str = "{:.4f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def info(path: str) -> str:
    """A human summary of one run file."""
    import numpy as np

    from .store.reader import last_finite, open_run, validation_accuracy

    with open_run(path) as run:
        a = run.attrs
        history = run.history
        config = a.get("config", {})
        inside = f", inside {config['trained_model']}" if config.get("trained_model") else ""  # submodel=
        lines = [
            f"{run.path}",
            f"  run        {run.name} ({run.status})",
            f"  model      {a.get('model_name', '?')}  ({config.get('parameters', '?')} parameters{inside})",
            f"  dataset    {a.get('dataset', '?') or '?'}  {a.get('data_source', '')}".rstrip(),
            f"  backend    {a.get('backend', '?')}, keras {a.get('keras_version', '?')}, created {a.get('created', '?')}",
            f"  epochs     {len(run.history_epochs)} recorded, {run.num_captures} "
            f"capture{'' if run.num_captures == 1 else 's'} "
            f"(steps 0..{int(run.steps[-1]) if run.num_captures else 0})",
            f"  layers     {len(run.layer_names)}: {', '.join(run.layer_names)}",
        ]
        val = validation_accuracy(history)
        if val is not None and np.isfinite(val).any():
            best = int(np.nanargmax(val))
            lines.append(
                f"  val acc    best {_fmt(float(val[best]))} at epoch {int(run.history_epochs[best]) + 1}, "
                f"final {_fmt(last_finite(val))}"
            )
        times = history.get("epoch_time")
        if times is not None and len(times):
            lines.append(
                f"  time       {_fmt(float(np.nansum(times)), '{:.0f}')} s, "
                f"{_fmt(float(np.nanmedian(times)), '{:.1f}')} s per epoch (median)"
            )
        if run.has_ics:
            lines.append(f"  ics        gradient shift recorded for {len(run.ics_layer_names)} layers")
    return "\n".join(lines)


def _info(paths: Sequence[str]) -> int:
    """`icsviz info`: each file is checked in a worker first, so a damaged one cannot hang or crash us."""
    from .store.check import guarded_check

    blocks, failed, unreadable = [], 0, False
    for path in paths:
        report = guarded_check(path)
        if not report.openable:
            print(f"icsviz: error: {report.error}", file=sys.stderr)
            unreadable = True
            continue
        text = info(path)
        if report.damage:
            text += "\n  damaged    " + "\n             ".join(d.describe() for d in report.damage)
            text += f"\n             `icsviz repair {path}` saves the readable captures"
            failed += 1
        blocks.append(text)
    if blocks:
        print("\n\n".join(blocks))
    return 2 if unreadable else (1 if failed else 0)


def _check(paths: Sequence[str], timeout: float) -> int:
    """`icsviz check`: exit 0 when every file is intact, 1 when any is damaged or unreadable."""
    from .store.check import guarded_check

    reports = [guarded_check(path, timeout=timeout) for path in paths]
    for report in reports:
        print(report.summary())
    return 0 if all(r.ok for r in reports) else 1


def _repair(paths: Sequence[str], out: str | None) -> int:
    from .store.check import guarded_check
    from .store.writer import closed_status, repair_run

    if out is not None and len(paths) != 1:
        raise UsageError(f"--out takes one run, got {len(paths)}")
    for path in paths:
        report = guarded_check(path)  # a file that would hang HDF5 is not opened here
        if not report.openable:
            print(f"icsviz: cannot repair {path}: {report.error}", file=sys.stderr)
            return 2
        status = closed_status(path) if report.ok and out is None else None
        if status is not None:
            print(f"icsviz: {path} needs no repair ({status}, closed by its writer, every checksum matches)")
            continue
        written = repair_run(path, out)
        kept = report.captures - len(report.drop_captures)
        note = "" if report.ok else f" ({kept} of {report.captures} captures; see `icsviz check {path}`)"
        print(f"icsviz: repaired {path} -> {written}{note}")
    return 0


RUNS_HELP = "run files (.h5); a folder stands for the .h5 files in it (those `icsviz app` lists)"


def run_paths(arguments: Sequence[str]) -> list[str]:
    """The run files named on the command line, with each folder replaced by its run files: the
    `.h5` files directly in it, by name, as the app's catalogue lists them (no links)."""
    from .store.catalog import is_run_file

    paths: list[str] = []
    for argument in arguments:
        folder = Path(argument).expanduser()
        if not folder.is_dir():
            paths.append(argument)
            continue
        with os.scandir(folder) as items:
            found = sorted(item.path for item in items if is_run_file(item))
        if not found:
            raise UsageError(f"{argument} is a folder with no run files (.h5) in it{_subfolder_hint(folder)}")
        paths.extend(found)
    return paths


def _subfolder_hint(folder: Path) -> str:
    """Where the run files are when they sit one folder down (runs/exp1/*.h5)."""
    from .store.catalog import folders_with_runs

    inner = folders_with_runs(folder)
    if not inner:
        return ""
    names = ", ".join(f"{name}/" for name in inner)
    return f"; its subfolders {names} hold some: name one, e.g. {folder / inner[0]}"


def _open_labelled(
    paths: Sequence[str], labels: Sequence[str] | None, skippable: Set[str] = frozenset()
) -> dict:
    """The runs by label, open. A file in `skippable` (found in a folder, not named) that cannot
    be read is left out with one line saying why; a named one is an error."""
    from .store.reader import open_run

    if labels is not None and len(labels) != len(paths):
        raise UsageError(f"--labels needs one label per run: {len(paths)} runs, {len(labels)} labels")
    names = list(labels) if labels else [Path(p).stem for p in paths]
    if len(set(names)) != len(names):
        raise UsageError(f"run labels must be unique, got {names}; pass --labels")
    runs = {}
    try:
        for name, path in zip(names, paths):
            try:
                runs[name] = open_run(path)
            except RunFileError as exc:
                if path not in skippable:
                    raise
                print(f"icsviz: left out, {exc}", file=sys.stderr)
    except BaseException:
        for run in runs.values():
            run.close()
        raise
    if not runs:
        raise UsageError("no run file could be read (each is left out above)")
    return runs


def _figures(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if args.command == "plot" and out.exists() and not out.is_dir():
        raise UsageError(f"--out takes a folder for the figures, and {out} is a file")
    if args.command == "report" and out.is_dir():
        raise UsageError(
            f"--out takes the report's file name, and {out} is a folder: e.g. --out {out / 'report.html'}"
        )
    runs = _open_labelled(args.runs, args.labels, skippable=args.found_in_folders)
    try:
        return _write_figures(args, runs)
    except ICSVizError:
        raise  # a damaged run and the like: already one line naming the file
    except OSError as exc:  # a read-only folder, a full disk: one line, not a traceback
        raise OutputError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    finally:
        for run in runs.values():
            run.close()


def _write_figures(args: argparse.Namespace, runs: dict) -> int:
    """Write the figures or the report; `runs` are open."""
    if args.command == "plot":
        from .plots import plot_runs

        formats = [f.lower().lstrip(".") for f in args.formats]
        bad = [f for f in formats if f not in ("png", "pdf", "svg")]
        if bad:
            raise UsageError(f"--formats takes png, pdf or svg, not {bad}")
        written, notes = plot_runs(
            runs,
            args.out,
            layers="all" if args.layers == ["all"] else args.layers,
            formats=formats,
            progress=not args.quiet,
            ioffe_layer=args.ioffe_layer,
        )
        for note in notes:
            print(f"icsviz: {note}", file=sys.stderr)
        print(f"icsviz: wrote {len(written)} files to {args.out}")
    else:
        from .report import write_report

        path = write_report(runs, args.out, title=args.title)
        print(f"icsviz: wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _app_folder(args: argparse.Namespace) -> Path:
    """The folder `icsviz app` opens: FOLDER or --runs (not two different ones), default runs/;
    a run file's own folder."""
    if args.folder and args.runs and Path(args.folder).expanduser() != Path(args.runs).expanduser():
        raise RunFolderError(
            f"two folders given ({args.folder} and --runs {args.runs}); the explorer opens one: "
            f"icsviz app {args.folder}"
        )
    folder = Path(args.folder or args.runs or "runs").expanduser()
    if folder.is_file():
        print(f"icsviz: {folder} is a run file: opening its folder, {folder.parent}", file=sys.stderr)
        return folder.parent
    if not folder.is_dir():
        raise RunFolderError(
            f"{folder} is not a folder; give the folder of your run files: icsviz app DIR"
            + (" (the shipped runs are in runs/ of the icsviz repository)" if folder == Path("runs") else "")
        )
    return folder


def _app(args: argparse.Namespace) -> int:
    import subprocess

    folder = _app_folder(args)
    require("streamlit")  # checked here: the server is another process
    command = _app_command(args, folder)
    # Without --headless, Streamlit's first run on a machine asks for an email address, a
    # prompt on the user's terminal before the explorer opens. (An environment variable, not
    # a flag: Streamlit versions without the option ignore it.)
    os.environ.setdefault("STREAMLIT_SERVER_SHOW_EMAIL_PROMPT", "false")
    if os.name == "posix":
        # Become the server (same pid): a SIGTERM to `icsviz app` then stops Streamlit too,
        # instead of leaving it running as an orphan.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, command)
    return subprocess.call(command)


def _app_command(args: argparse.Namespace, folder: Path) -> list[str]:
    from .dashboard import streamlit_app_path

    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        streamlit_app_path(),
        "--server.address",
        args.address,
        "--server.port",
        str(args.port),
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",  # as .streamlit/config.toml, which is read from the working directory only
        "--server.headless",
        "true" if args.headless else "false",
        "--",
        "--runs",
        str(folder.resolve()),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("plot", "report", "info", "check", "repair"):
            named = set(args.runs)
            args.runs = run_paths(args.runs)
            args.found_in_folders = set(args.runs) - named
        if args.command in ("plot", "report"):
            return _figures(args)
        if args.command == "app":
            return _app(args)
        if args.command == "info":
            return _info(args.runs)
        if args.command == "check":
            return _check(args.runs, args.timeout)
        if args.command == "repair":
            return _repair(args.runs, args.out)
        elif args.command == "train":
            out = Path(args.out or f"runs/{args.dataset}-{args.model}.h5")
            _train_one(args, args.model, out)
        elif args.command == "experiment":
            models = ("baseline", "bn") if args.pair == "cnn" else ("mlp", "mlp-bn")
            for model in models:
                _train_one(args, model, Path(args.out_dir) / f"{args.dataset}-{model}.h5")
    except ICSVizError as exc:
        print(f"icsviz: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        clear = missing_extra(exc)
        if clear is None:
            raise
        print(f"icsviz: error: {clear}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icsviz: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `icsviz info ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
