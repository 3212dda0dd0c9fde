"""Data sets for the reference experiments: CIFAR-10, Fashion-MNIST, MNIST, synthetic.

Each loader returns uint8 images (N, H, W, C) and integer labels. It tries a
local copy first (an explicit path, then the usual places) and Keras's
downloader last; when nothing works, the error lists every place it looked.
"""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import DataNotFoundError

__all__ = ["Dataset", "DATASETS", "load_dataset", "load_cifar10", "load_fashion_mnist", "synthetic"]


@dataclass
class Dataset:
    """Train and test splits of an image classification data set."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where the data came from, for the run's metadata

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


# ---------------------------------------------------------------- CIFAR-10
def _cifar_batch(stream: IO[bytes]) -> tuple[np.ndarray, np.ndarray]:
    batch = pickle.load(stream, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    return images, labels


def _cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as stream:
        return _cifar_batch(stream)


def _cifar_from_dir(folder: Path) -> tuple[np.ndarray, ...]:
    train = [_cifar_file(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _cifar_file(folder / "test_batch")
    x_train = np.concatenate([b[0] for b in train])
    y_train = np.concatenate([b[1] for b in train])
    return x_train, y_train, x_test, y_test


def _cifar_from_tar(archive: Path) -> tuple[np.ndarray, ...]:
    with tarfile.open(archive) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> tuple[np.ndarray, np.ndarray]:
            stream = tar.extractfile(members[name])
            assert stream is not None
            return _cifar_batch(stream)

        train = [read(f"data_batch_{i}") for i in range(1, 6)]
        x_test, y_test = read("test_batch")
    return np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]), x_test, y_test


def _cifar_candidates() -> list[Path]:
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return [
        home / "datasets" / "cifar-10-batches-py",
        home / "datasets" / "cifar-10-python.tar.gz",
        Path("cifar-10-batches-py"),
        Path("cifar-10-python.tar.gz"),
    ]


def load_cifar10(path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Dataset:
    """CIFAR-10 from `path` (a `cifar-10-batches-py` folder, with any number of
    images per batch, or the `cifar-10-python.tar.gz` tarball), else from the
    usual places, else from Keras's downloader."""
    candidates = [Path(path)] if path is not None else _cifar_candidates()
    looked: list[str] = []
    for candidate in candidates:
        looked.append(str(candidate))
        try:
            if candidate.is_dir() and (candidate / "data_batch_1").exists():
                return Dataset("cifar10", *_cifar_from_dir(candidate), source=str(candidate))
            if candidate.is_file() and tarfile.is_tarfile(candidate):
                return Dataset("cifar10", *_cifar_from_tar(candidate), source=str(candidate))
        except (OSError, KeyError, pickle.UnpicklingError, ValueError) as exc:
            raise DataNotFoundError(f"{candidate} is not a readable CIFAR-10 copy: {exc}") from exc
    if path is None and download:
        looked.append("keras.datasets.cifar10.load_data() (download)")
        try:
            import keras

            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
            return Dataset(
                "cifar10", x_train, y_train.ravel(), x_test, y_test.ravel(), source="keras download"
            )
        except Exception as exc:  # noqa: BLE001 - no network, proxy, broken cache ...
            looked[-1] += f" failed: {type(exc).__name__}: {exc}"
    raise DataNotFoundError(
        "CIFAR-10 not found. Looked in: " + "; ".join(looked) + ". Provide it with "
        "--data-dir PATH (a cifar-10-batches-py folder or cifar-10-python.tar.gz), or let "
        "Keras download it on a machine with network access."
    )


# ---------------------------------------------------------------- (Fashion-)MNIST
_IDX = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        return np.frombuffer(stream.read(), dtype=np.uint8, offset=offset)


def _idx_from_dir(folder: Path) -> tuple[np.ndarray, ...]:
    y_train = _read_idx(folder / _IDX["y_train"], 8).astype(np.int64)
    y_test = _read_idx(folder / _IDX["y_test"], 8).astype(np.int64)
    x_train = _read_idx(folder / _IDX["x_train"], 16).reshape(len(y_train), 28, 28, 1)
    x_test = _read_idx(folder / _IDX["x_test"], 16).reshape(len(y_test), 28, 28, 1)
    return x_train, y_train, x_test, y_test


def _load_idx(name: str, keras_name: str, folders: list[Path], path: Any, download: bool) -> Dataset:
    candidates = [Path(path)] if path is not None else folders
    looked = []
    for folder in candidates:
        looked.append(str(folder))
        if (folder / _IDX["x_train"]).exists():
            return Dataset(name, *_idx_from_dir(folder), source=str(folder))
        if folder.is_file() and folder.suffix == ".npz":
            with np.load(folder) as f:
                return Dataset(
                    name,
                    f["x_train"][..., None],
                    f["y_train"].astype(np.int64),
                    f["x_test"][..., None],
                    f["y_test"].astype(np.int64),
                    source=str(folder),
                )
    if path is None and download:
        looked.append(f"keras.datasets.{keras_name}.load_data() (download)")
        try:
            import keras

            (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, keras_name).load_data()
            return Dataset(
                name,
                x_train[..., None],
                y_train.astype(np.int64),
                x_test[..., None],
                y_test.astype(np.int64),
                source="keras download",
            )
        except Exception as exc:  # noqa: BLE001
            looked[-1] += f" failed: {type(exc).__name__}: {exc}"
    raise DataNotFoundError(
        f"{name} not found. Looked in: " + "; ".join(looked) + ". Provide it with --data-dir "
        f"PATH (a folder holding {_IDX['x_train']} and its three siblings)"
        + (", or install Debian's dataset-fashion-mnist" if name == "fashion_mnist" else "")
        + "."
    )


def load_fashion_mnist(path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Dataset:
    """Fashion-MNIST from `path`, Debian's dataset-fashion-mnist, Keras's cache or download."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    folders = [Path("/usr/share/datasets/fashion-mnist"), home / "datasets" / "fashion-mnist"]
    return _load_idx("fashion_mnist", "fashion_mnist", folders, path, download)


def load_mnist(path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Dataset:
    """MNIST from `path` (an idx folder or mnist.npz), Keras's cache or download."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    folders = [home / "datasets" / "mnist.npz", Path("/usr/share/datasets/mnist")]
    return _load_idx("mnist", "mnist", folders, path, download)


# ---------------------------------------------------------------- synthetic
def synthetic(
    n_train: int = 512,
    n_test: int = 128,
    shape: tuple[int, ...] = (32, 32, 3),
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """A small learnable image set: each class is a fixed random pattern plus noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, size=(num_classes, *shape))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, size=n)
        noise = rng.normal(0, 60, size=(n, *shape))
        images = np.clip(patterns[labels] * 0.6 + 50 + noise, 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, source=f"synthetic(seed={seed})")


DATASETS = ("cifar10", "fashion_mnist", "mnist", "synthetic")


def load_dataset(name: str, path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Dataset:
    """Load a data set by name (one of `DATASETS`)."""
    key = name.replace("-", "_").lower()
    if key == "cifar10":
        return load_cifar10(path, download=download)
    if key == "fashion_mnist":
        return load_fashion_mnist(path, download=download)
    if key == "mnist":
        return load_mnist(path, download=download)
    if key == "synthetic":
        return synthetic()
    raise ValueError(f"dataset must be one of {list(DATASETS)}. Received: dataset={name!r}")
