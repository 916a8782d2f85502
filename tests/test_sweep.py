"""Sweeps (scaling_fl/sweep.py): the plan, resuming a half-done sweep, the mean +- std report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scaling_fl import sweep
from scaling_fl.config import resolve
from scaling_fl.tracking.report import RunRecord, Series
from tests.cli import TINY_JOB, read_record, run_records


def test_the_grid_is_every_combination_times_every_seed_with_names_that_say_which():
    grid = sweep.parse_grid(["strategy=fedavg,fedadam", "site_ids=[0,0],[0,0,0]", "proximal_mu=0,0.01"])
    assert grid == {"strategy": ["fedavg", "fedadam"], "site_ids": ["[0,0]", "[0,0,0]"], "proximal_mu": ["0", "0.01"]}
    points = sweep.plan("algos", grid, [0, 1, 2], None)
    assert len(points) == 2 * 2 * 2 * 3
    assert len({point.job_name for point in points}) == len(points)
    first = points[0]
    assert first.job_name == "algos-strategy-fedavg-site_ids-_0_0_-proximal_mu-0-seed-0"
    assert first.arguments() == [
        "strategy=fedavg",
        "site_ids=[0,0]",
        "proximal_mu=0",
        "seed=0",
        f"job_name={first.job_name}",
    ]
    for point in points:  # every name is a job name the config accepts
        assert resolve({"model": "tiny-bert", "job_name": point.job_name}).job_name == point.job_name


def test_random_search_draws_a_seeded_subset_and_long_names_stay_valid():
    grid = {"learning_rate": [str(v) for v in (1e-5, 3e-5, 1e-4, 3e-4)], "batch_size": ["8", "16", "32"]}
    drawn = sweep.plan("rs", grid, [0], random_points=5, search_seed=7)
    assert len(drawn) == 5 and drawn == sweep.plan("rs", grid, [0], random_points=5, search_seed=7)
    assert {p.values for p in drawn} < {p.values for p in sweep.plan("rs", grid, [0], None)}
    long = sweep.job_name("x" * 60, [("text_columns", "['" + "a" * 80 + "']")], 3)
    assert len(long) <= 128 and resolve({"model": "tiny-bert", "job_name": long}).job_name == long


@pytest.mark.parametrize(
    "items, needle",
    [
        (["strategy"], "write key=value1,value2"),
        (["no_such_key=1,2"], "'no_such_key' is not a config key"),
        (["seed=1,2"], "use --seeds"),
        (["strategy=fedavg", "strategy=fedadam"], "given twice"),
    ],
)
def test_bad_grids_are_one_line_naming_the_fix(items, needle):
    with pytest.raises(sweep.SweepError, match=needle):
        sweep.parse_grid(items)


def _record(run_id, job_name, status, seed=0, **config):
    return RunRecord(run_id=run_id, job_name=job_name, status=status, config={"seed": seed, **config})


def test_only_points_whose_latest_run_completed_count_as_done():
    runs = [
        _record(1, "s-a-seed-0", "COMPLETED"),
        _record(2, "s-b-seed-0", "FAILED"),
        _record(3, "s-c-seed-0", "COMPLETED"),
        _record(4, "s-c-seed-0", "RUNNING"),  # started again later (resume=force, a changed sweep): not done
        _record(5, "s-b-seed-0", "COMPLETED"),  # failed once, completed when the sweep was started again
    ]
    assert sweep.finished_job_names(runs) == {"s-a-seed-0", "s-b-seed-0"}


def _series(values):
    return Series(tuple(range(1, len(values) + 1)), tuple(values))


def test_the_report_groups_by_the_grid_values_with_mean_and_std_over_seeds(tmp_path):
    accuracy = {("fedavg", 0): [0.5, 0.6], ("fedavg", 1): [0.4, 0.7], ("fedavg", 2): [0.45, 0.8]}
    accuracy |= {("fedadam", 0): [0.6, 0.9], ("fedadam", 1): [0.5, 0.85]}
    runs = []
    for index, ((strategy, seed), values) in enumerate(accuracy.items(), start=1):
        run = _record(index, f"s-{strategy}-seed-{seed}", "COMPLETED", seed=seed, strategy=strategy, num_rounds=2)
        run.metrics = {"validation.accuracy": _series(values), "validation.loss": _series([1.0 - v for v in values])}
        runs.append(run)
    runs.append(_record(9, "other-fedavg-seed-0", "COMPLETED", strategy="x"))  # another sweep: left out
    table, per_round = sweep.summarize(runs, "s")
    rows = {row["strategy"]: row for row in table.to_dict("records")}
    assert rows["fedavg"]["validation.accuracy mean"] == pytest.approx(np.mean([0.6, 0.7, 0.8]))
    assert rows["fedavg"]["validation.accuracy std"] == pytest.approx(np.std([0.6, 0.7, 0.8], ddof=1))
    assert rows["fedadam"]["validation.loss mean"] == pytest.approx(np.mean([0.1, 0.15]))
    assert rows["fedavg"]["seeds"] == 3 and rows["fedadam"]["seeds"] == 2
    first = per_round[(per_round["strategy"] == "fedavg") & (per_round["round"] == 1)]
    first = first[first["metric"] == "validation.accuracy"].iloc[0]
    assert first["mean"] == pytest.approx(0.45) and first["count"] == 3
    written = sweep.write_report(runs, "s", tmp_path / "report")
    assert written["validation.accuracy"].stat().st_size > 0
    assert "| strategy |" in written["md"].read_text() and "fedadam" in written["csv"].read_text()
    with pytest.raises(sweep.SweepError, match="no completed run of sweep 'nothing'"):
        sweep.summarize(runs, "nothing")


def test_dry_run_lists_done_and_todo_against_the_store(tmp_path, capsys):
    store = tmp_path / "runs" / "1"
    store.mkdir(parents=True)
    done = sweep.job_name("s", [("strategy", "fedavg")], 0)
    (store / "run.json").write_text(json.dumps({"status": "COMPLETED"}))
    (store / "config.json").write_text(json.dumps({"job_name": done, "seed": 0}))
    code = sweep.main(["--name", "s", "--grid", "strategy=fedavg,fedadam", "--seeds", "0", "--dry-run", "--",
                       f"runs_dir={tmp_path / 'runs'}"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "2 runs, 1 already completed, 1 to run" in out
    assert f"done  {done}" in out and "todo  s-strategy-fedadam-seed-0" in out


@pytest.mark.slow
def test_a_half_done_sweep_resumes_without_running_finished_points_again(tmp_path, capsys):
    runs = tmp_path / "runs"
    base = [*TINY_JOB, "synthetic_train_size=64", "synthetic_test_size=32", "site_ids=[0]", "num_rounds=1"]
    args = ["--name", "s", "--grid", "learning_rate=0.003,0.001", "--seeds", "1", "--", *base, f"runs_dir={runs}"]
    first = sweep.job_name("s", [("learning_rate", "0.003")], 1)
    # As if the first start had been stopped after one point: that point ran alone.
    assert sweep.main(["--name", "s", "--grid", "learning_rate=0.003", "--seeds", "1", "--", *base,
                       f"runs_dir={runs}"]) == 0  # fmt: skip
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    assert "2 runs, 1 already completed, 1 to run" in out and f"starting {first}" not in out.split("2 runs")[1]
    records = [read_record(folder) for folder in run_records(runs)]
    assert sorted(record["config"]["job_name"] for record in records) == sorted(
        [first, sweep.job_name("s", [("learning_rate", "0.001")], 1)]
    )
    assert all(record["run"]["status"] == "COMPLETED" and record["config"]["seed"] == 1 for record in records)
    assert sweep.main([*args[:2], "--report", str(tmp_path / "report"), "--runs-dir", str(runs)]) == 0
    assert (tmp_path / "report" / "validation_accuracy_vs_round.png").exists()
