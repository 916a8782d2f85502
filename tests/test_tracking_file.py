"""Tracking in the embedded file store: failures, continued runs, artifacts, live-job refusal."""

from __future__ import annotations

import datetime as dt
import json

import torch
from safetensors.torch import load_file

from tests.cli import TINY_JOB, read_record, run_cli, run_records

SMALL = [*TINY_JOB, "synthetic_train_size=160", "synthetic_test_size=40", "site_ids=[0,0,0]"]


def test_a_crashing_site_fails_the_run_with_its_traceback_then_the_same_job_continues_the_record(tmp_path):
    runs = tmp_path / "runs"
    crashed = run_cli(tmp_path, "with", *SMALL, "num_rounds=3", "job_name=crashy", "max_restarts=0",
                      f"runs_dir={runs}", env={"SCALING_FL_FAIL_AT": "site=2,round=2"})
    assert crashed.returncode != 0
    assert "site 2" in crashed.stderr
    (run_dir,) = run_records(runs)
    record = read_record(run_dir)
    assert record["run"]["status"] == "FAILED"
    trace = "".join(record["run"]["fail_trace"])
    assert "site 2" in trace and "InjectedFault" in trace and "maybe_fail" in trace  # the site's own traceback
    assert record["metrics"]["validation.accuracy"]["steps"] == [1]
    assert "injected failure in site 2" in record["cout"]  # the last words are captured too

    resumed = run_cli(tmp_path, "with", *SMALL, "num_rounds=3", "job_name=crashy", f"runs_dir={runs}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run_records(runs) == [run_dir]  # the same record, not a new one
    record = read_record(run_dir)
    assert record["run"]["status"] == "COMPLETED"
    assert len(record["run"]["resumed_at"]) == 1 and record["run"]["previous_statuses"] == ["FAILED"]
    assert "fail_trace" not in record["run"]
    for name, series in record["metrics"].items():
        assert series["steps"] == sorted(set(series["steps"])), f"{name} logged a round twice"
    assert record["metrics"]["validation.accuracy"]["steps"] == [1, 2, 3]
    assert record["cout"].count("round 1/3") >= 2  # the first attempt's output is kept, the new one appended
    assert record["info"]["sites"]["count"] == 3


def test_restarts_exhausted_exit_nonzero_naming_the_failing_site(tmp_path):
    result = run_cli(tmp_path, "with", *SMALL, "num_rounds=2", "max_restarts=1", f"runs_dir={tmp_path / 'runs'}",
                     env={"SCALING_FL_FAIL_AT": "site=1,round=1"})
    assert result.returncode != 0
    assert "site 1" in result.stderr and "injected failure in site 1" in result.stderr


def test_a_live_run_with_the_same_job_name_is_refused(tmp_path):
    run_dir = tmp_path / "runs" / "7"
    run_dir.mkdir(parents=True)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    (run_dir / "run.json").write_text(json.dumps({"status": "RUNNING", "heartbeat": now.isoformat()}))
    (run_dir / "config.json").write_text(json.dumps({"job_name": "busy"}))
    result = run_cli(tmp_path, "with", *SMALL, "num_rounds=1", "job_name=busy", f"runs_dir={tmp_path / 'runs'}")
    assert result.returncode == 2
    assert "already running as run 7" in result.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["7"]


def test_artifacts_per_site_metrics_and_tensorboard(tmp_path):
    result = run_cli(tmp_path, "with", *SMALL, "num_rounds=2", "save_final_model=True", "per_site_metrics=True",
                     f"tensorboard_dir={tmp_path / 'tb'}", "job_name=arts", f"runs_dir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_records(tmp_path / "runs")
    record = read_record(run_dir)
    assert sorted(record["run"]["artifacts"]) == ["config.resolved.json", "final_model.config.json",
                                                  "final_model.model.safetensors"]
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    assert resolved["split"] == "iid" and resolved["site_ids"] == [0, 0, 0]
    state = load_file(run_dir / "final_model.model.safetensors")  # safetensors: no pickle involved
    assert "classifier.weight" in state and state["classifier.weight"].dtype == torch.float32
    for site in range(3):
        for name in ("train.loss", "validation.accuracy", "memory.peak_rss_mb"):
            assert record["metrics"][f"site.{site}.{name}"]["steps"] == [1, 2]
    assert record["metrics"]["memory.peak_rss_mb"]["values"][0] > 50
    assert list((tmp_path / "tb" / "arts").glob("events.out.tfevents.*"))
