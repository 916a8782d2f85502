"""The real command line, end to end: 4 sites as gloo ranks, Sacred file store, per-round metrics."""

from __future__ import annotations

import pytest

from tests.cli import TINY_JOB, read_record, run_cli, run_records

pytestmark = pytest.mark.slow  # every test here starts the command line

ROUND_METRICS = [
    "validation.loss",
    "validation.accuracy",
    "validation.f1_macro",
    "train.loss",
    "train.accuracy",
    "time.round_s",
    "time.train_s",
    "time.aggregate_s",
    "time.eval_s",
    "comm.bytes_per_site",
]


def test_four_tiny_bert_sites_learn_synthetic_well_above_chance_in_three_rounds(tmp_path):
    result = run_cli(
        tmp_path,
        "with",
        *TINY_JOB,
        "site_ids=[0,0,0,0]",
        "num_rounds=3",
        "num_local_epochs=2",
        "job_name=e2e",
        f"runs_dir={tmp_path / 'runs'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_records(tmp_path / "runs")
    record = read_record(run_dir)
    assert record["run"]["status"] == "COMPLETED"
    for name in ROUND_METRICS:
        assert record["metrics"][name]["steps"] == [1, 2, 3], name
    accuracy = record["metrics"]["validation.accuracy"]["values"]
    assert accuracy[-1] > 0.5, accuracy  # chance is 0.25 on the 4 balanced classes
    assert record["info"]["sites"]["count"] == 4
    assert sum(record["info"]["sites"]["sizes"]) == 1800  # validation_fraction 0.1 held out
    assert record["info"]["sites"]["validation_rows"] == 200
    assert record["metrics"]["test.accuracy"]["steps"] == [3]  # the test set after the last round
    assert len(record["info"]["final_weights_sha256"]) == 64  # every site ended with this exact model
    assert record["config"]["split"] == "iid" and record["config"]["job_name"] == "e2e"
    assert "round 3/3" in result.stderr + result.stdout


def test_one_site_is_the_centralized_baseline_on_the_same_code_path(tmp_path):
    result = run_cli(
        tmp_path,
        "with",
        *TINY_JOB,
        "site_ids=[0]",
        "num_rounds=2",
        "synthetic_train_size=400",
        "synthetic_test_size=100",
        f"runs_dir={tmp_path / 'runs'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_records(tmp_path / "runs")
    record = read_record(run_dir)
    assert record["info"]["sites"] == {**record["info"]["sites"], "count": 1, "sizes": [360], "validation_rows": 40}
    assert record["metrics"]["validation.accuracy"]["steps"] == [1, 2]
    assert record["metrics"]["comm.bytes_per_site"]["values"][0] > 0  # same exchange path, world of one


# One non-iid split through the command line; every split's skew is checked in-process (test_data_splits).
@pytest.mark.parametrize("split", ["dirichlet"])
def test_non_iid_splits_run_and_record_their_label_histograms(tmp_path, split):
    result = run_cli(
        tmp_path,
        "with",
        *TINY_JOB,
        "site_ids=[0,0]",
        "num_rounds=1",
        f"split={split}",
        "dirichlet_beta=0.1",
        "synthetic_train_size=200",
        "synthetic_test_size=40",
        f"runs_dir={tmp_path / 'runs'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sites = read_record(run_records(tmp_path / "runs")[0])["info"]["sites"]
    histograms = sites["label_histograms"]
    assert [sum(h) for h in histograms] == sites["sizes"]
    shares = [[count / sum(h) for count in h] for h in histograms]
    distance = sum(abs(a - b) for a, b in zip(*shares, strict=True)) / 2
    assert distance > 0.3, histograms  # the two sites' label mixes differ (iid: ~0.05)
