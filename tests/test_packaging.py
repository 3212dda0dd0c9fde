"""The package as users get it: the built wheel, installed into a fresh virtual environment
outside the source tree, its console command run from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with the wheel (dependencies from this interpreter's site-packages)."""
    where = tmp_path_factory.mktemp("installed")
    wheels = where / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    env_dir = where / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    (wheel,) = wheels.glob("icsviz-*.whl")
    # pip from this interpreter installs into the venv (its own pip is not needed)
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if install.returncode != 0 and "--python" in install.stderr and "no such option" in install.stderr:
        pytest.skip("this pip cannot install into another environment (pip < 22.3)")
    assert install.returncode == 0, install.stderr[-2000:]
    return env_dir


def test_the_wheel_holds_every_module_of_the_package(installed) -> None:
    site = next((installed / "lib").glob("python3*/site-packages/icsviz"))
    shipped = {p.relative_to(site).as_posix() for p in site.rglob("*.py")}
    source = {p.relative_to(ROOT / "icsviz").as_posix() for p in (ROOT / "icsviz").rglob("*.py")}
    assert source <= shipped, sorted(source - shipped)
    assert (site / "py.typed").exists()
    assert (site / "dashboard" / "icon.png").read_bytes() == (
        ROOT / "icsviz" / "dashboard" / "icon.png"
    ).read_bytes()


def test_the_installed_command_works_outside_the_source_tree(installed, tmp_path) -> None:
    for path in sorted((ROOT / "runs").glob("*.h5")):
        shutil.copy(path, tmp_path / path.name)
    icsviz = installed / "bin" / "icsviz"
    where = subprocess.run(
        [installed / "bin" / "python", "-c", "import icsviz; print(icsviz.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert str(installed) in where.stdout, where  # the installed copy, not the source tree

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([icsviz, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    check = run("check", "cifar10-baseline.h5", "cifar10-bn.h5")
    assert check.returncode == 0 and check.stdout.count("every checksum matches") == 2, check
    plot = run(
        "plot",
        "cifar10-baseline.h5",
        "cifar10-bn.h5",
        "--out",
        "figs",
        "--formats",
        "png",
        "--layers",
        "fc1",
        "--quiet",
    )
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert (tmp_path / "figs" / "loss.png").stat().st_size > 10000
    report = run("report", "cifar10-baseline.h5", "cifar10-bn.h5", "--out", "r.html")
    assert report.returncode == 0 and (tmp_path / "r.html").stat().st_size > 100000, report


def _extra(name: str) -> list[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"][name]


def test_the_dev_extra_installs_what_the_suite_and_ci_use() -> None:
    # A comment once swallowed three entries of this list, and CI quietly skipped the JAX tests.
    names = {requirement.split("[")[0].split(">")[0].split("=")[0] for requirement in _extra("dev")}
    assert {"pytest", "hypothesis", "ruff", "playwright", "jax", "scipy", "altair"} <= names


@pytest.mark.skipif(sys.platform != "linux", reason="CI runs on Linux")
def test_ci_has_every_backend_it_is_meant_to_test() -> None:
    import importlib.util
    import os

    if os.environ.get("CI") != "true":
        pytest.skip("only CI must have every backend (set CI=true to check this machine)")
    missing = [name for name in ("tensorflow", "jax", "playwright") if importlib.util.find_spec(name) is None]
    assert not missing, f"CI lacks {missing}: pip install -e '.[dev]' should have installed them"
