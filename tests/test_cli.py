from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import free_port, tiny_capture
from icsviz import open_run
from icsviz.cli import main
from icsviz.store.writer import RunWriter


def test_info_summarizes_a_run(tmp_path, layout, capsys) -> None:
    path = tmp_path / "r.h5"
    with RunWriter.create(path, layout, {"run_name": "demo", "model_name": "net", "dataset": "cifar10"}) as w:
        w.write_capture(tiny_capture(layout, 0))
        for epoch, acc in enumerate([0.5, 0.7, 0.6]):
            w.write_epoch(epoch, {"val_accuracy": acc, "epoch_time": 2.0})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "demo (complete)" in out and "net" in out and "cifar10" in out
    assert "best 0.7000 at epoch 2, final 0.6000" in out
    assert "6 s, 2.0 s per epoch" in out


def test_info_final_accuracy_is_the_last_validated_epochs(tmp_path, layout, capsys) -> None:
    # fit(validation_freq=2): no validation in the last epoch, which printed "final -".
    path = tmp_path / "r.h5"
    with RunWriter.create(path, layout, {"run_name": "sparse"}) as w:
        w.write_capture(tiny_capture(layout, 0))
        w.write_epoch(0, {"accuracy": 0.5})
        w.write_epoch(1, {"accuracy": 0.6, "val_accuracy": 0.7})
        w.write_epoch(2, {"accuracy": 0.7})
        w.write_epoch(3, {"accuracy": 0.8, "val_accuracy": 0.65})
        w.write_epoch(4, {"accuracy": 0.9})
    assert main(["info", str(path)]) == 0
    assert "best 0.7000 at epoch 2, final 0.6500" in capsys.readouterr().out


def test_errors_name_the_file_and_exit_2(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "icsviz: error:" in err and "bad.h5" in err and "Traceback" not in err
    assert main(["train", "--model", "bn", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err


def test_train_writes_a_run_with_the_recipe(tmp_path, capsys) -> None:
    out = tmp_path / "mlp.h5"
    code = main(
        [
            "train",
            "--model",
            "mlp-bn",
            "--dataset",
            "synthetic",
            "--epochs",
            "2",
            "--probe-size",
            "64",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    with open_run(out) as run:
        assert run.layer_names[:3] == ["fc1", "fc1_bn", "fc1_sigmoid"]
        assert len(run.history_epochs) == 2 and run.num_captures == 3
        assert run.attrs["dataset"] == "synthetic" and run.config["recipe"]["batch_size"] == 60
        assert run.activations("fc1").counts.sum(1)[0] == 64 * 100
        np.testing.assert_allclose(run.history["learning_rate"], 0.5)
    assert main(["info", str(out)]) == 0
    assert "ioffe_mlp_bn" in capsys.readouterr().out


def test_an_unknown_data_set_names_the_known_ones_without_a_traceback(tmp_path) -> None:
    import subprocess
    import sys

    from icsviz.data import DATASETS

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "icsviz.cli",
            "train",
            "--model",
            "bn",
            "--dataset",
            "cifar100",
            "--out",
            str(tmp_path / "x.h5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown data set 'cifar100'" in proc.stderr
    assert all(name in proc.stderr for name in DATASETS)
    from icsviz.cli import _DATASETS

    assert _DATASETS == DATASETS  # the command line and the loader know the same data sets


def test_batch_stats_takes_an_optional_step_interval() -> None:
    from icsviz.cli import _parser

    parse = _parser().parse_args
    assert parse(["train", "--model", "bn", "--batch-stats"]).batch_stats == 1
    assert parse(["train", "--model", "bn", "--batch-stats", "10"]).batch_stats == 10
    assert parse(["train", "--model", "bn"]).batch_stats == 0
    assert parse(["experiment", "--batch-stats", "5"]).batch_stats == 5


def test_every_output_option_takes_the_usual_short_form() -> None:
    from icsviz.cli import _parser

    parse = _parser().parse_args
    assert parse(["plot", "a.h5", "-o", "figs"]).out == "figs"  # was "unrecognized arguments: -o figs"
    assert parse(["report", "a.h5", "-o", "r.html"]).out == "r.html"
    assert parse(["repair", "a.h5", "-o", "b.h5"]).out == "b.h5"
    assert parse(["train", "--model", "bn", "-o", "runs/x.h5"]).out == "runs/x.h5"
    assert parse(["experiment", "-o", "elsewhere"]).out_dir == "elsewhere"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--epochs", "0", "must be 1 or more (received 0)"),
        ("--batch-size", "0", "must be 1 or more (received 0)"),  # was a ZeroDivisionError traceback
        ("--probe-size", "0", "must be 1 or more (received 0)"),
        ("--every-n-steps", "-3", "must be 1 or more (received -3)"),
        ("--batch-stats", "0", "must be 1 or more (received 0)"),
        ("--lr", "-1", "must be a number above 0 (received -1)"),
        ("--lr", "nan", "must be a number above 0 (received nan)"),
        ("--epochs", "two", "'two' is not a whole number"),
    ],
)
def test_training_numbers_out_of_range_are_usage_errors(option, value, message, capsys) -> None:
    for command in (["train", "--model", "bn"], ["experiment"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--dataset", "synthetic", option, value])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}: {message}" in err and "Traceback" not in err


def test_figures_to_an_impossible_place_are_one_line_errors(tmp_path, layout, capsys) -> None:
    run = tmp_path / "r.h5"
    with RunWriter.create(run, layout, {}) as w:
        for step in range(2):
            w.write_capture(tiny_capture(layout, step))
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    cases = [
        (
            ["plot", str(run), "--out", str(a_file)],
            f"--out takes a folder for the figures, and {a_file} is a file",
        ),
        (
            ["report", str(run), "--out", str(tmp_path)],
            f"--out takes the report's file name, and {tmp_path} is a folder",
        ),
        (["report", str(run), "--out", str(a_file / "r.html")], f"cannot write to {a_file / 'r.html'}: "),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"icsviz: error: {message}" in err and "Traceback" not in err, err
    assert a_file.read_text() == "x"


def test_a_folder_stands_for_its_run_files(tmp_path, layout, capsys) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    for name in ("b", "a"):
        with RunWriter.create(folder / f"{name}.h5", layout, {"run_name": f"run-{name}"}) as w:
            for step in range(2):
                w.write_capture(tiny_capture(layout, step))
            w.write_epoch(0, {"loss": 1.0})
    (folder / "notes.txt").write_text("not a run")
    (folder / "sub").mkdir()
    (folder / "link.h5").symlink_to(folder / "a.h5")  # listed once, as the app lists it
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.index("run-a (complete)") < out.index("run-b (complete)") and out.count("(complete)") == 2
    assert main(["check", str(folder)]) == 0
    assert capsys.readouterr().out.count(": ok (") == 2
    figures = tmp_path / "figures"
    assert main(["plot", str(folder), "--out", str(figures), "--formats", "png", "--quiet"]) == 0
    assert (figures / "loss.png").exists()
    capsys.readouterr()
    assert (
        main(["report", str(folder), str(tmp_path / "runs" / "a.h5"), "--out", str(tmp_path / "r.html")]) == 2
    )
    assert "run labels must be unique" in capsys.readouterr().err  # a.h5 twice: one label each
    # A damaged file found in the folder is left out, with the reason; one named is an error.
    (folder / "cut.h5").write_bytes((folder / "a.h5").read_bytes()[:3000])
    figures = tmp_path / "figures2"
    assert main(["plot", str(folder), "--out", str(figures), "--formats", "png", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"icsviz: left out, {folder / 'cut.h5'}: " in err and "Traceback" not in err, err
    assert (figures / "loss.png").exists()
    assert main(["plot", str(folder / "cut.h5"), "--out", str(figures), "--quiet"]) == 2
    assert "icsviz: error: " in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2
    assert f"icsviz: error: {empty} is a folder with no run files (.h5) in it\n" in capsys.readouterr().err
    # Runs one folder down (runs/exp1/*.h5): the error points at them.
    for sub in ("exp2", "exp1", "notes"):
        (empty / sub).mkdir()
    for sub in ("exp2", "exp1"):
        (empty / sub / "a.h5").write_bytes((folder / "a.h5").read_bytes())
    assert main(["info", str(empty)]) == 2
    assert (
        f"{empty} is a folder with no run files (.h5) in it; its subfolders exp1/, exp2/ hold some: "
        f"name one, e.g. {empty / 'exp1'}"
    ) in capsys.readouterr().err


_WITHOUT = """
import sys

class Missing:  # as if the extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Missing())
"""


def _without(blocked: set[str], code: str) -> subprocess.CompletedProcess[str]:
    script = _WITHOUT.format(blocked=blocked) + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_a_missing_extra_names_what_to_install(tmp_path, layout) -> None:
    path = tmp_path / "run.h5"
    with RunWriter.create(path, layout, {}) as writer:
        writer.write_capture(tiny_capture(layout, 0))
    for blocked, command, extra in (
        ("streamlit", ["app", "--runs", str(tmp_path), "--headless"], "app"),
        ("matplotlib", ["plot", str(path), "--out", str(tmp_path / "figures")], "plots"),
    ):
        proc = _without({blocked}, f"from icsviz.cli import main\nsys.exit(main({command!r}))")
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert f"needs {blocked}, which is not installed here: pip install 'icsviz[{extra}]'" in proc.stderr
    # The library: reading works without Keras; the callback says which extra records a run.
    proc = _without(
        {"keras", "tensorflow"},
        "import icsviz\n"
        f"assert icsviz.open_run({str(path)!r}).num_captures == 1\n"
        "try:\n    icsviz.ICSCallback\n"
        "except ModuleNotFoundError as exc:\n    print(exc.name, exc)\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("keras ") and "pip install 'icsviz[train]'" in proc.stdout


def test_the_explorer_opens_the_folder_given_as_users_type_it(tmp_path, layout, monkeypatch, capsys) -> None:
    from icsviz.cli import _app_command, _app_folder, _parser

    def opened(*argv: str):
        args = _parser().parse_args(["app", *argv])
        folder = _app_folder(args)
        command = _app_command(args, folder)
        return folder, command[command.index("--runs") + 1], command[command.index("--server.port") + 1]

    path = tmp_path / "sweep" / "lr1.h5"
    path.parent.mkdir()
    with RunWriter.create(path, layout, {}) as writer:
        writer.write_capture(tiny_capture(layout, 0))
    sweep = str(path.parent.resolve())
    # `icsviz app DIR` as `icsviz plot` takes its runs, or --runs as `streamlit run app.py` does.
    assert opened(str(path.parent), "--port", "8600") == (path.parent, sweep, "8600")
    assert opened("--runs", str(path.parent))[1] == sweep
    assert opened(str(path.parent), "--runs", str(path.parent))[1] == sweep  # the same one twice
    # A run file: its folder, said on stderr.
    assert opened(str(path))[1] == sweep
    assert f"{path} is a run file: opening its folder" in capsys.readouterr().err
    # Errors name the problem and the fix, without a traceback.
    monkeypatch.chdir(tmp_path)  # no runs/ here
    for argv, message in (
        ([str(path.parent), "--runs", str(tmp_path)], "two folders given"),
        ([str(tmp_path / "nowhere")], "nowhere is not a folder; give the folder of your run files"),
        ([], "runs is not a folder; give the folder of your run files: icsviz app DIR (the shipped runs"),
    ):
        assert main(["app", *argv]) == 2
        assert message in capsys.readouterr().err


def test_icsviz_app_on_a_fresh_machine_opens_without_asking_for_an_email(tmp_path, layout) -> None:
    """Streamlit's first run with a browser to open asks for an email address on the terminal;
    `icsviz app` goes straight to the explorer."""
    import os
    import signal
    import threading
    import time

    pytest.importorskip("streamlit")
    folder = tmp_path / "runs"
    folder.mkdir()
    with RunWriter.create(folder / "a.h5", layout, {}) as writer:
        writer.write_capture(tiny_capture(layout, 0))
    port = free_port()
    home = tmp_path / "home"  # no ~/.streamlit/credentials.toml: a machine never used for Streamlit
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "BROWSER": "true"}  # `true URL`: no browser opens
    env.pop("STREAMLIT_SERVER_SHOW_EMAIL_PROMPT", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "icsviz.cli", "app", str(folder), "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,  # a prompt reads end-of-file and goes on instead of waiting
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any("URL:" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.2)
        output = "".join(lines)
        assert "URL:" in output, output
        assert "Email" not in output and "Welcome to Streamlit" not in output, output
    finally:
        server.send_signal(signal.SIGTERM)  # the server is `icsviz app`'s own process
        server.wait(timeout=30)
