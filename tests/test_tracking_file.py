"""Tracking in the embedded file store: failures, continued runs, artifacts, live-job refusal."""

from __future__ import annotations

import json
import os
import time
import uuid
from urllib.parse import quote_plus

import pytest
import torch
from safetensors.torch import load_file

from scaling_fl import claim
from scaling_fl.train.metrics import SITE_COLUMNS, round_metrics
from tests.cli import TINY_JOB, read_record, run_cli, run_records
from tests.servers import _SACRED_VARS, free_port

pytestmark = pytest.mark.slow  # every test here starts the command line

SMALL = [*TINY_JOB, "synthetic_train_size=160", "synthetic_test_size=40", "site_ids=[0,0,0]"]
TWO_SITES = [*TINY_JOB, "synthetic_train_size=96", "synthetic_test_size=32", "site_ids=[0,0]"]


def test_a_crashing_site_fails_the_run_with_its_traceback_then_the_same_job_continues_the_record(tmp_path):
    runs = tmp_path / "runs"
    crashed = run_cli(
        tmp_path,
        "with",
        *SMALL,
        "num_rounds=3",
        "job_name=crashy",
        "max_restarts=0",
        f"runs_dir={runs}",
        env={"SCALING_FL_FAIL_AT": "site=2,round=2"},
    )
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
    result = run_cli(
        tmp_path,
        "with",
        *SMALL,
        "num_rounds=2",
        "max_restarts=1",
        f"runs_dir={tmp_path / 'runs'}",
        env={"SCALING_FL_FAIL_AT": "site=1,round=1"},
    )
    assert result.returncode != 0
    assert "site 1" in result.stderr and "injected failure in site 1" in result.stderr


def test_a_live_run_with_the_same_job_name_is_refused(tmp_path):
    """Live = its launcher holds the job's claim (here: this test process), whatever its record says."""
    run_dir = tmp_path / "runs" / "7"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"status": "RUNNING", "heartbeat": None}))
    (run_dir / "config.json").write_text(json.dumps({"job_name": "busy"}))
    held = claim.claim_in_directory(str(tmp_path / "runs" / ".claims" / "busy"), "busy").acquire()
    try:
        result = run_cli(tmp_path, "with", *SMALL, "num_rounds=1", "job_name=busy", f"runs_dir={tmp_path / 'runs'}")
    finally:
        held.release()
    assert result.returncode == 2
    assert f"scaling-fl: error: job_name='busy' is already running: launcher pid {os.getpid()} on host" in result.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".claims", "7"]


def test_artifacts_per_site_metrics_and_tensorboard(tmp_path):
    result = run_cli(
        tmp_path,
        "with",
        *SMALL,
        "num_rounds=2",
        "save_final_model=True",
        "per_site_metrics=True",
        f"tensorboard_dir={tmp_path / 'tb'}",
        "job_name=arts",
        f"runs_dir={tmp_path / 'runs'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_records(tmp_path / "runs")
    record = read_record(run_dir)
    assert sorted(record["run"]["artifacts"]) == [
        "config.resolved.json",
        "final_model.config.json",
        "final_model.model.safetensors",
        "final_model.tokenizer.json",  # the folder is save_pretrained's, tokenizer included
        "final_model.tokenizer_config.json",
    ]
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    assert resolved["split"] == "iid" and resolved["site_ids"] == [0, 0, 0]
    state = load_file(run_dir / "final_model.model.safetensors")  # safetensors: no pickle involved
    assert "classifier.weight" in state and state["classifier.weight"].dtype == torch.float32
    for site in range(3):
        for name in ("train.loss", "validation.accuracy", "memory.peak_rss_mb"):
            assert record["metrics"][f"site.{site}.{name}"]["steps"] == [1, 2]
    assert record["metrics"]["memory.peak_rss_mb"]["values"][0] > 50
    assert not [name for name in record["metrics"] if "peak_cuda_mb" in name]  # CPU run: no CUDA memory series
    assert list((tmp_path / "tb" / "arts").glob("events.out.tfevents.*"))


def test_peak_cuda_memory_is_reported_overall_and_per_site_on_cuda_only():
    per_site = torch.zeros(2, len(SITE_COLUMNS), dtype=torch.float64)
    column = {name: index for index, name in enumerate(SITE_COLUMNS)}
    per_site[:, column["train_count"]] = 10
    per_site[:, column["peak_rss_mb"]] = torch.tensor([300.0, 310.0])
    per_site[:, column["peak_cuda_mb"]] = torch.tensor([1200.0, 1500.0])
    validation = torch.tensor([4.0, 3, 1, 1, 3], dtype=torch.float64)  # loss sum, 2x2 confusion
    on_gpu = round_metrics(validation, 2, per_site, with_per_site=True, cuda=True)
    assert on_gpu["memory.peak_cuda_mb"] == 1500.0
    assert (on_gpu["site.0.memory.peak_cuda_mb"], on_gpu["site.1.memory.peak_cuda_mb"]) == (1200.0, 1500.0)
    assert (on_gpu["site.0.memory.peak_rss_mb"], on_gpu["site.1.memory.peak_rss_mb"]) == (300.0, 310.0)
    on_cpu = round_metrics(validation, 2, per_site, with_per_site=True, cuda=False)
    assert not [name for name in on_cpu if "cuda" in name] and on_cpu["site.1.memory.peak_rss_mb"] == 310.0


# ---------------------------------------------------------------- Sacred's own command line


def test_print_config_shows_the_config_and_starts_nothing(tmp_path):
    env = {
        "SACRED_URL": f"mongodb://127.0.0.1:{free_port()}/",  # never contacted by print_config
        "SCALING_FL_FAIL_AT": "site=0,round=1",
    }  # a site that started would fail
    started = time.monotonic()
    result = run_cli(
        tmp_path, "print_config", "with", *TWO_SITES, "job_name=shown", f"runs_dir={tmp_path / 'runs'}", env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - started < 60
    assert "site_ids = [0, 0]" in result.stdout and "job_name = 'shown'" in result.stdout
    assert "site 0:" not in result.stderr and "round 1/" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()


def test_dash_F_writes_the_record_to_that_folder_and_not_to_runs_dir(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    env = {name: "" for name in _SACRED_VARS}  # whatever the environment says, -F decides
    result = run_cli(
        tmp_path,
        "-F",
        str(elsewhere),
        "with",
        *TWO_SITES,
        "num_rounds=1",
        "job_name=flagged",
        f"runs_dir={tmp_path / 'runs'}",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()
    (run_dir,) = run_records(elsewhere)
    record = read_record(run_dir)
    assert record["run"]["status"] == "COMPLETED" and record["config"]["job_name"] == "flagged"
    assert record["metrics"]["validation.accuracy"]["steps"] == [1]
    assert "config.resolved.json" in record["run"]["artifacts"]


# ---------------------------------------------------------------- secrets beyond MongoDB


def test_s3_checkpoints_and_a_mongo_password_leave_no_secret_in_the_file_store(tmp_path, server_env, s3_server):
    aws_secret = "aws-secret-only-in-the-environment-Qm73"
    sacred_password = "sacred-password-only-in-the-environment-Vb19"
    env = server_env(
        gcs=False,
        AWS_SECRET_ACCESS_KEY=aws_secret,
        SACRED_USER="writer",
        SACRED_PASSWORD=sacred_password,
        SACRED_HOST=f"127.0.0.1:{free_port()}",
    )  # tracking=file: unused
    prefix = f"secrets-{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs"
    result = run_cli(
        tmp_path,
        "with",
        *TWO_SITES,
        "num_rounds=2",
        "tracking=file",
        "job_name=secrets",
        f"checkpoints_dir=s3://{s3_server.bucket}/{prefix}/ck",
        "save_final_model=True",
        f"runs_dir={runs}",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_records(runs)
    assert read_record(run_dir)["run"]["status"] == "COMPLETED"
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/ck/round-000002/")
    assert any(item["Key"].endswith("COMMITTED") for item in listed.get("Contents", []))  # the keys were used

    files = [path for path in runs.rglob("*") if path.is_file()]
    assert len(files) >= 6  # run, config, metrics, info, cout and the artifacts
    secrets = [aws_secret, sacred_password, quote_plus(sacred_password)]
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret} in {path}"
    for secret in secrets:
        assert secret not in result.stdout + result.stderr
