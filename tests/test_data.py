from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CIFAR_SUBSET
from icsviz import DataNotFoundError
from icsviz.data import load_cifar10, load_dataset, load_fashion_mnist, synthetic

needs_subset = pytest.mark.skipif(
    not CIFAR_SUBSET.exists(),
    reason=f"the CIFAR-10 subset is not at {CIFAR_SUBSET} (it ships only in ../shared)",
)
FASHION = Path("/usr/share/datasets/fashion-mnist")


@needs_subset
def test_cifar10_subset_directory() -> None:
    data = load_cifar10(CIFAR_SUBSET)
    assert data.x_train.shape == (5085, 32, 32, 3) and data.x_test.shape == (1017, 32, 32, 3)
    assert data.x_train.dtype == np.uint8
    assert data.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert data.y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert data.num_classes == 10 and data.input_shape == (32, 32, 3)
    # Channel layout: the first row of red values of image 0 as stored in the batch file.
    with open(CIFAR_SUBSET / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    np.testing.assert_array_equal(data.x_train[0, 0, :, 0], raw[:32])
    np.testing.assert_array_equal(data.x_train[0, 0, :, 2], raw[2048 : 2048 + 32])


@needs_subset
def test_cifar10_tarball_gives_the_same_arrays(tmp_path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(CIFAR_SUBSET.iterdir()):
            tar.add(f, arcname=f"cifar-10-batches-py/{f.name}")
    a, b = load_cifar10(CIFAR_SUBSET), load_cifar10(archive)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)


@pytest.mark.skipif(not FASHION.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package() -> None:
    data = load_fashion_mnist()
    assert data.x_train.shape == (60000, 28, 28, 1) and data.x_test.shape == (10000, 28, 28, 1)
    assert data.source == str(FASHION) and data.num_classes == 10
    assert np.bincount(data.y_train).tolist() == [6000] * 10


def test_missing_data_says_where_it_looked(tmp_path) -> None:
    with pytest.raises(DataNotFoundError, match=r"Looked in: .*nowhere.*--data-dir"):
        load_cifar10(tmp_path / "nowhere", download=False)
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nothing", download=False)
    with pytest.raises(ValueError, match="Received: dataset='imagenet'"):
        load_dataset("imagenet")


def test_broken_cifar_copy_is_named(tmp_path) -> None:
    (tmp_path / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DataNotFoundError, match="not a readable CIFAR-10 copy"):
        load_cifar10(tmp_path)


def test_synthetic_is_deterministic_and_learnable_shape() -> None:
    a, b = synthetic(seed=3), synthetic(seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (512, 32, 32, 3) and a.num_classes == 10
