"""flat.py: tensors packed end to end in whole blocks, and each one's norm from the packed vector."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from icsviz.capture.flat import BLOCK, LARGE, FlatLayout, l2_norms

ARRAYS = [
    np.float32(-3.0),  # a scalar variable
    np.random.default_rng(1).normal(size=7).astype("float32"),
    np.random.default_rng(2).normal(size=(3, 3, 4, 5)).astype("float32"),
    np.random.default_rng(3).normal(size=(6, 2)).astype("float16"),  # mixed precision: float32 here
    np.random.default_rng(4).normal(size=(2 * BLOCK,)).astype("float32"),  # exactly two blocks
    np.random.default_rng(5).normal(size=(3, BLOCK + 1)).astype("float32"),  # one value past a block
]


def _numpy(tensor) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def test_each_tensor_starts_a_block_and_the_padding_is_zeros() -> None:
    layout = FlatLayout.of([np.shape(a) for a in ARRAYS])
    flat = _numpy(layout.pack([keras.ops.convert_to_tensor(a) for a in ARRAYS]))
    assert flat.dtype == np.float32 and flat.shape == (layout.size,) and layout.size % BLOCK == 0
    assert [start for start, _ in layout.slices] == [0, BLOCK, 2 * BLOCK, 3 * BLOCK, 4 * BLOCK, 6 * BLOCK]
    used = np.zeros(layout.size, bool)
    for array, (start, end) in zip(ARRAYS, layout.slices):
        np.testing.assert_array_equal(flat[start:end], np.asarray(array, "float32").reshape(-1))
        used[start:end] = True
    assert not flat[~used].any()
    assert len(layout.owners) == layout.size // BLOCK
    np.testing.assert_array_equal(layout.owners, [0, 1, 2, 3, 4, 4, 5, 5, 5, 5])


def test_norms_equal_numpys_in_float64_also_of_a_difference() -> None:
    layout = FlatLayout.of([np.shape(a) for a in ARRAYS])
    tensors = [keras.ops.convert_to_tensor(a) for a in ARRAYS]
    halves = [
        keras.ops.convert_to_tensor(np.asarray(a) * np.asarray(0.5, np.asarray(a).dtype)) for a in ARRAYS
    ]
    got = _numpy(layout.norms(layout.pack(tensors)))
    expected = [np.linalg.norm(np.asarray(a, "float64")) for a in ARRAYS]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    difference = _numpy(layout.norms(layout.pack(tensors) - layout.pack(halves)))
    np.testing.assert_allclose(difference, np.asarray(expected) / 2, rtol=1e-6)


def test_a_million_value_tensors_norm_keeps_the_accuracy_of_its_own_reduction() -> None:
    """Summed in order, a million squares of one sign lose about 1e-4 in float32; block by
    block they do not."""
    values = np.random.default_rng(0).uniform(0.5, 1.5, size=(1000, 1000)).astype("float32")
    layout = FlatLayout.of([values.shape])
    got = _numpy(layout.norms(layout.pack([keras.ops.convert_to_tensor(values)])))
    in_order = np.sqrt(np.cumsum(np.square(values.reshape(-1)), dtype="float32")[-1])
    expected = np.linalg.norm(values.astype("float64"))
    assert abs(in_order - expected) / expected > 1e-5  # what the blocks avoid
    np.testing.assert_allclose(got, [expected], rtol=1e-6)


MIXED = [
    np.random.default_rng(6).normal(size=7).astype("float32"),
    np.random.default_rng(7).normal(size=(300, 300)).astype("float32"),  # large: 88 blocks
    np.float32(2.0),
    np.random.default_rng(8).uniform(0.5, 1.5, size=(LARGE,)).astype("float32"),  # large, just
    np.random.default_rng(9).normal(size=(3, 3, 4, 5)).astype("float32"),
]


def test_large_tensors_lie_after_the_small_ones_each_whole_where_its_slice_says() -> None:
    layout = FlatLayout.of([np.shape(a) for a in MIXED])
    assert layout.order == (0, 2, 4, 1, 3) and layout.small_size == 3 * BLOCK
    assert [start for start, _ in layout.slices] == [0, 3 * BLOCK, BLOCK, 91 * BLOCK, 2 * BLOCK]
    np.testing.assert_array_equal(layout.owners, [0, 2, 4] + [1] * 88 + [3] * 64)
    flat = _numpy(layout.pack([keras.ops.convert_to_tensor(a) for a in MIXED]))
    used = np.zeros(layout.size, bool)
    for array, (start, end) in zip(MIXED, layout.slices):
        np.testing.assert_array_equal(flat[start:end], np.asarray(array).reshape(-1))
        used[start:end] = True
    assert flat.shape == (155 * BLOCK,) and not flat[~used].any()


@pytest.mark.parametrize("pick", [[0, 1, 2, 3, 4], [1, 3], [3, 0], [1]])
def test_norms_of_large_and_small_tensors_in_their_order_also_of_a_difference(pick) -> None:
    """On TensorFlow each large tensor is measured on its own and the small ones by blocks; on
    JAX and torch all by blocks: the same norms either way."""
    arrays = [MIXED[i] for i in pick]
    layout = FlatLayout.of([np.shape(a) for a in arrays])
    tensors = [keras.ops.convert_to_tensor(a) for a in arrays]
    thirds = [keras.ops.convert_to_tensor(np.asarray(a) / np.float32(3)) for a in arrays]
    expected = np.asarray([np.linalg.norm(np.asarray(a, "float64")) for a in arrays])
    got = _numpy(layout.norms(layout.pack(tensors)))
    assert got.dtype == np.float32 and got.shape == (len(arrays),)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    difference = _numpy(layout.norms(layout.pack(tensors) - layout.pack(thirds)))
    np.testing.assert_allclose(difference, expected * 2 / 3, rtol=1e-6)


@pytest.mark.parametrize(
    ("shapes", "expected"), [([], []), ([(0,)], [0.0]), ([(0,), (3,)], [0.0, np.sqrt(3.0)])]
)
def test_no_tensors_and_empty_tensors(shapes, expected) -> None:
    """A model without trainable variables, and an empty variable (it keeps a block of zeros)."""
    layout = FlatLayout.of(shapes)
    flat = layout.pack([keras.ops.ones(shape) for shape in shapes])
    assert layout.size == BLOCK * len(shapes)
    np.testing.assert_allclose(_numpy(layout.norms(flat)), expected, rtol=1e-6)


@pytest.mark.parametrize("pick", [[0, 1, 2, 3, 4, 5], [2, 0, 5, 1], [0, 1, 4], [2, 3, 5], []])
def test_l2_norms_of_unpacked_tensors_in_their_order(pick) -> None:
    """Vectors and scalars packed, kernels reduced one by one, the norms in the tensors' order."""
    arrays = [ARRAYS[i] for i in pick]
    got = _numpy(l2_norms([keras.ops.convert_to_tensor(a) for a in arrays]))
    expected = [np.linalg.norm(np.asarray(a, "float64")) for a in arrays]
    assert got.dtype == np.float32 and got.shape == (len(arrays),)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
