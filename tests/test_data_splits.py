"""Site splits: a partition every rank computes identically from the seed."""

from __future__ import annotations

import numpy as np
import pytest

from scaling_fl.data import SPLIT_METHODS, DataError, TextDataset, label_histograms, split_indices

NUM_LABELS = 4


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """1000 rows, balanced over 4 labels, in random order like a real file."""
    return np.random.default_rng(0).permutation(np.arange(1000) % NUM_LABELS)


def assert_partition(parts, expected_rows: int, num_rows: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == expected_rows
    assert len(np.unique(joined)) == expected_rows, "parts overlap"
    assert joined.min() >= 0 and joined.max() < num_rows
    for part in parts:
        assert len(part) > 0
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each part is returned sorted"


@pytest.mark.parametrize("method", SPLIT_METHODS)
def test_split_is_a_deterministic_partition(labels, method):
    parts = split_indices(labels, 5, method, seed=1)
    assert len(parts) == 5
    assert_partition(parts, len(labels), len(labels))
    again = split_indices(labels, 5, method, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split_indices(labels, 5, method, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("method", SPLIT_METHODS)
def test_sample_percentage_keeps_that_fraction(labels, method):
    parts = split_indices(labels, 4, method, seed=3, sample_percentage=0.3)
    assert_partition(parts, 300, len(labels))
    other = np.concatenate(split_indices(labels, 4, method, seed=4, sample_percentage=0.3))
    assert set(np.concatenate(parts)) != set(other)


def test_iid_parts_are_near_equal_and_mixed(labels):
    parts = split_indices(labels, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert (label_histograms(labels, parts, NUM_LABELS) > 0).all()


def test_label_sorted_gives_sites_few_labels(labels):
    four = label_histograms(labels, split_indices(labels, 4, "label_sorted", seed=0), NUM_LABELS)
    assert ((four > 0).sum(axis=1) == 1).all()
    eight = split_indices(labels, 8, "label_sorted", seed=0)
    assert ((label_histograms(labels, eight, NUM_LABELS) > 0).sum(axis=1) <= 2).all()
    sizes = [len(p) for p in eight]
    assert max(sizes) - min(sizes) <= 1


def largest_label_share(histograms: np.ndarray) -> float:
    """Mean over sites of the share of a site's rows held by its biggest label."""
    return float((histograms.max(axis=1) / histograms.sum(axis=1)).mean())


def test_dirichlet_beta_controls_skew(labels):
    """Averaged over a few seeds, so the check does not hang on one lucky draw."""

    def share(beta: float) -> float:
        draws = [split_indices(labels, 5, "dirichlet", seed=s, dirichlet_beta=beta) for s in range(5)]
        return float(np.mean([largest_label_share(label_histograms(labels, p, NUM_LABELS)) for p in draws]))

    assert share(0.1) > 0.6
    assert share(100.0) < 0.35


def test_more_sites_than_rows_is_an_error():
    with pytest.raises(DataError, match="cannot give 5 sites a row each from 3 rows"):
        split_indices(np.array([0, 1, 0]), 5, "iid", seed=0)
    with pytest.raises(DataError, match="sample_percentage=0.01"):
        split_indices(np.zeros(100, dtype=int), 4, "iid", seed=0, sample_percentage=0.01)


def test_dirichlet_gives_up_with_a_clear_error():
    """Three rows of one label over three sites at tiny beta: some site stays empty."""
    with pytest.raises(DataError, match="raise dirichlet_beta or use fewer sites"):
        split_indices(np.zeros(3, dtype=int), 3, "dirichlet", seed=0, dirichlet_beta=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "random"}, "unknown split method"),
        ({"num_sites": 0}, "num_sites"),
        ({"sample_percentage": 0.0}, "sample_percentage"),
        ({"sample_percentage": 1.5}, "sample_percentage"),
        ({"method": "dirichlet", "dirichlet_beta": 0.0}, "dirichlet_beta"),
    ],
)
def test_bad_arguments(labels, kwargs, match):
    arguments = {"num_sites": 2, "method": "iid", "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        split_indices(labels, **arguments)


def test_label_histograms_count_each_site(labels):
    parts = split_indices(labels, 3, "iid", seed=0)
    histograms = label_histograms(labels, parts, NUM_LABELS)
    assert histograms.shape == (3, NUM_LABELS)
    assert histograms.sum() == len(labels)
    assert histograms.sum(axis=0).tolist() == [250] * 4


def test_parts_select_site_datasets(labels):
    data = TextDataset(
        texts=[f"row {i}" for i in range(len(labels))], labels=labels, label_names=("a", "b", "c", "d"), source="test"
    )
    parts = split_indices(data.labels, 3, "dirichlet", seed=5)
    sites = [data.subset(part) for part in parts]
    assert sum(len(site) for site in sites) == len(data)
    assert sites[0].texts[0] == f"row {parts[0][0]}"
