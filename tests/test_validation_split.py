"""The validation set (validation_fraction): carved out of the training rows, seeded and stratified,
disjoint from every site's rows and from the test set, the same on every restart; validation.* are
scored on it every round, test.* on the test set when due."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaling_fl.config import resolve
from scaling_fl.data.prepared import load_worker_data, prepare_data, save_prepared
from scaling_fl.data.splits import carve_validation
from scaling_fl.train.federated import _test_due
from scaling_fl.train.metrics import round_metrics


def test_the_carve_is_stratified_seeded_and_disjoint():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    training, validation = carve_validation(labels, 0.1, seed=3)
    assert np.intersect1d(training, validation).size == 0
    assert np.union1d(training, validation).tolist() == list(range(1000))
    assert np.bincount(labels[validation]).tolist() == [50, 30, 20]  # the training set's label mix
    again = carve_validation(labels, 0.1, seed=3)
    assert np.array_equal(again[1], validation) and np.array_equal(again[0], training)
    assert not np.array_equal(carve_validation(labels, 0.1, seed=4)[1], validation)
    assert carve_validation(labels, 0.0, seed=3)[1].size == 0


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_prepared_validation_is_apart_from_sites_and_test_and_identical_across_restarts(tmp_path, split):
    cfg = resolve({"site_ids": [0, 0, 0], "split": split, "synthetic_train_size": 400, "synthetic_test_size": 60})
    first, second = prepare_data(cfg, 3), prepare_data(cfg, 3)  # a restart prepares the data again
    assert np.array_equal(first.validation, second.validation)
    assert all(np.array_equal(a, b) for a, b in zip(first.parts, second.parts, strict=True))
    assert len(first.validation) == 40  # the default validation_fraction, 0.1
    sites = np.concatenate(first.parts)
    assert np.intersect1d(sites, first.validation).size == 0
    assert len(sites) + len(first.validation) == 400  # every other training row goes to a site
    save_prepared(first, str(tmp_path))
    shards = [load_worker_data(str(tmp_path), (rank,), rank, 3) for rank in range(3)]
    validation_texts = sorted(text for shard in shards for text in shard.validation_shard.texts)
    assert validation_texts == sorted(first.train.texts[i] for i in first.validation)  # each row scored once
    test_texts = {text for shard in shards for text in shard.test_shard.texts}
    assert test_texts == set(first.test.texts) and not test_texts & set(validation_texts)
    site_texts = {text for shard in shards for rows in shard.train.values() for text in rows.texts}
    assert not site_texts & set(validation_texts)


def test_without_a_validation_fraction_the_test_set_is_scored_as_validation(tmp_path):
    cfg = resolve({"validation_fraction": 0, "synthetic_train_size": 400, "synthetic_test_size": 60})
    prepared = prepare_data(cfg, 4)
    assert prepared.validation.size == 0 and sum(prepared.site_sizes()) == 400
    save_prepared(prepared, str(tmp_path))
    data = load_worker_data(str(tmp_path), (1,), 1, 4, full_validation=True)
    assert data.validation_shard is data.test_shard
    assert data.validation_full.texts == prepared.test.texts


def test_test_metrics_come_after_the_last_round_and_every_test_every_rounds():
    assert [r for r in range(1, 8) if _test_due(resolve({"num_rounds": 7}), r)] == [7]
    assert [r for r in range(1, 8) if _test_due(resolve({"num_rounds": 7, "test_every": 3}), r)] == [3, 6, 7]
    sums = torch.tensor([3.0, 4, 1, 2, 3], dtype=torch.float64)  # loss sum, 2x2 confusion of 10 rows
    per_site = torch.ones(1, 9, dtype=torch.float64)
    plain = round_metrics(sums, 2, per_site, with_per_site=False, cuda=False)
    tested = round_metrics(sums, 2, per_site, with_per_site=False, cuda=False, test_sums=sums * 2)
    assert "test.accuracy" not in plain
    assert tested["test.accuracy"] == plain["validation.accuracy"] == 0.7
    assert tested["test.loss"] == plain["validation.loss"] == pytest.approx(0.3)


def test_the_validation_set_comes_out_of_the_sample_and_fraction_zero_is_the_old_split():
    from scaling_fl.data.splits import split_indices, split_rows

    labels = np.arange(5000) % 4
    parts, validation = split_rows(labels, 5, "dirichlet", 9, 0.5, sample_percentage=0.1, validation_fraction=0.2)
    assert abs(len(validation) - 100) <= 2  # a fifth of the 500 sampled rows (rounded per label), not of 5,000
    assert sum(map(len, parts)) == 500 - len(validation)
    assert np.intersect1d(np.concatenate(parts), validation).size == 0
    old = split_indices(labels, 5, "dirichlet", 9, 0.5, sample_percentage=0.1)
    new, none = split_rows(labels, 5, "dirichlet", 9, 0.5, sample_percentage=0.1, validation_fraction=0.0)
    assert none.size == 0 and all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
