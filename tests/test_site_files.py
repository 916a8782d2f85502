"""split=none: a natural partition, site k trains on the k-th train_path file (a cross-silo rehearsal)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from scaling_fl.config import ConfigError, resolve
from scaling_fl.data.dataset import DataError
from scaling_fl.data.prepared import prepare_data
from scaling_fl.data.splits import split_by_file

TOPICS = {
    "sports": "the team won the match and the coach praised the players",
    "science": "the lab measured the particle and published the physics result",
    "business": "the company reported profits and the market shares rose",
    "politics": "the senate passed the bill after a long vote",
}


def _write(path: Path, labels: list[str]) -> str:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "topic"])
        for index, label in enumerate(labels):
            writer.writerow([f"{TOPICS[label]} number {index}", label])
    return str(path)


def _silos(tmp_path: Path) -> tuple[list[str], str]:
    """Three silos with different label mixes (one lacks 'business'), and a shared test file."""
    files = [
        _write(tmp_path / "a.csv", ["sports"] * 12 + ["science"] * 4),
        _write(tmp_path / "b.csv", ["science"] * 10),
        _write(tmp_path / "c.csv", ["business"] * 6 + ["sports"] * 2 + ["science"] * 2),
    ]
    return files, _write(tmp_path / "test.csv", ["sports", "science", "business"] * 4)


def _config(files, test, **more):
    return resolve(
        {
            "task_name": "csv",
            "train_path": files,
            "test_path": test,
            "text_columns": ["text"],
            "label_column": "topic",
            "split": "none",
            "site_ids": [0, 0, 0],
            **more,
        }
    )


def test_each_site_gets_exactly_its_own_file_and_the_labels_are_the_union(tmp_path):
    files, test = _silos(tmp_path)
    prepared = prepare_data(_config(files, test, validation_fraction=0.0), num_sites=3)
    assert prepared.label_names == ("business", "science", "sports")  # sorted union; b.csv alone has one
    assert [len(part) for part in prepared.parts] == [16, 10, 10]
    texts = prepared.train.texts
    for site, part in enumerate(prepared.parts):
        with open(files[site], encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        assert [texts[i] for i in part] == [row["text"] for row in rows]  # every row, in the file's order
        assert [prepared.label_names[prepared.train.labels[i]] for i in part] == [row["topic"] for row in rows]
    assert prepared.histograms().tolist() == [[0, 4, 12], [0, 10, 0], [6, 2, 2]]
    assert len(prepared.test) == 12 and set(prepared.test.labels.tolist()) == {0, 1, 2}


def test_validation_and_sampling_are_drawn_within_each_site():
    labels = np.array([0] * 20 + [1] * 10 + [0] * 5 + [1] * 5)
    parts, validation = split_by_file(labels, [30, 10], seed=7, validation_fraction=0.2)
    assert [len(part) for part in parts] == [24, 8] and len(validation) == 8
    assert set(parts[0]) | set(validation[validation < 30]) == set(range(30))  # site 0's rows stay its own
    assert set(parts[1]) | set(validation[validation >= 30]) == set(range(30, 40))
    assert np.bincount(labels[validation[validation < 30]]).tolist() == [4, 2]  # stratified within the site
    again, _ = split_by_file(labels, [30, 10], seed=7, validation_fraction=0.2)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))
    sampled, _ = split_by_file(labels, [30, 10], seed=7, sample_percentage=0.5)
    assert [len(part) for part in sampled] == [15, 5] and set(sampled[1]) <= set(range(30, 40))


def test_a_list_without_split_none_and_a_file_count_that_does_not_match_are_refused(tmp_path):
    files, test = _silos(tmp_path)
    with pytest.raises(
        ConfigError, match=r"train_path=\[.*\] is not allowed: one path, or a list of files with split=none"
    ):
        _config(files, test, split="iid")
    with pytest.raises(DataError, match="split=none gives site k the k-th train_path file: 3 file.s. for 4 sites"):
        prepare_data(_config(files, test, site_ids=[0, 0, 0, 0]), num_sites=4)
    with pytest.raises(ConfigError, match="train_path"):
        _config([files[0], ""], test)
    _write(tmp_path / "test-unknown.csv", ["sports", "politics"])
    with pytest.raises(DataError, match="label 'politics' does not occur in the train file"):
        prepare_data(_config(files, str(tmp_path / "test-unknown.csv")), num_sites=3)


def test_a_task_with_fixed_labels_keeps_their_order_in_training_and_test_files(tmp_path):
    """AG News files read apart: class 1 is World in every file and in the test set (a sorted union
    would make index 0 Business in training while the test set still meant World)."""

    def agnews(path: Path, classes: list[int]) -> str:
        with path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([[str(c), f"title {i}", f"description {i}"] for i, c in enumerate(classes)])
        return str(path)

    files = [agnews(tmp_path / "a.csv", [1, 2, 2]), agnews(tmp_path / "b.csv", [3, 4])]
    test = agnews(tmp_path / "test.csv", [4, 1])
    prepared = prepare_data(
        resolve({"task_name": "agnews", "train_path": files, "test_path": test, "split": "none", "site_ids": [0, 0]}),
        num_sites=2,
    )
    assert prepared.label_names == ("World", "Sports", "Business", "Sci/Tech")
    assert prepared.train.labels.tolist() == [0, 1, 1, 2, 3]
    assert prepared.test.labels.tolist() == [3, 0] and prepared.test.label_names == prepared.label_names
