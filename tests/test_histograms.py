import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from icsviz.capture.stats import dyadic_bin_width
from icsviz.histograms import common_edges, densities, rebin


@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=300), st.integers(0, 5))
@settings(max_examples=100, deadline=None)
def test_rebin_onto_a_coarser_dyadic_grid_is_exact(values, doublings) -> None:
    values = np.asarray(values)
    first, width = dyadic_bin_width(values.min(), values.max(), 16)
    fine = first + width * np.arange(17)
    counts, _ = np.histogram(values, fine)
    coarse_width = width * 2**doublings
    start = np.floor(first / coarse_width) * coarse_width
    coarse = start + coarse_width * np.arange(int(np.ceil((fine[-1] - start) / coarse_width)) + 1)
    expected, _ = np.histogram(values, coarse)
    np.testing.assert_allclose(rebin(counts, fine, coarse), expected, atol=1e-9)


def test_rebin_spreads_counts_uniformly_inside_a_bin() -> None:
    np.testing.assert_allclose(rebin([4.0], np.array([0.0, 1.0]), np.array([0.0, 0.25, 0.5, 1.0])), [1, 1, 2])
    # mass outside the new edges is dropped, never invented
    np.testing.assert_allclose(rebin([2.0, 2.0], np.array([0.0, 1.0, 2.0]), np.array([0.5, 1.5])), [2.0])


def test_common_edges_and_densities() -> None:
    edges = common_edges([np.array([-1.0, 0.0, 1.0]), np.array([0.0, 4.0])], bins=5)
    np.testing.assert_allclose(edges, np.linspace(-1, 4, 6))
    d = densities(np.array([1.0, 3.0]), np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(d, [0.5, 1.5])
    assert (d * 0.5).sum() == 1.0
    np.testing.assert_array_equal(densities(np.zeros(2), np.array([0.0, 1.0, 2.0])), [0, 0])
