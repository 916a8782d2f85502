"""Data from and checkpoints to real S3 and GCS emulators over HTTP, with a resume across runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scaling_fl import storage
from tests.cli import TINY_JOB, read_record, run_cli, run_records

pytestmark = pytest.mark.slow  # every test here starts the command line

AGNEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"
BUCKETS = {"s3": "s3://scaling-fl-test", "gs": "gs://scaling-fl-test"}


# One direction through the command line; the other store of each kind is covered in-process: data read
# from gs:// (tests/test_storage.py), checkpoints committed to s3:// (tests/test_checkpoint_io.py) and
# written there by the command line (tests/test_tracking_file.py), claims on both (tests/test_claim.py).
@pytest.mark.parametrize("data_store, checkpoint_store", [("s3", "gs")])
def test_cloud_data_and_checkpoints_with_resume(tmp_path, s3_env, gcs_env, data_store, checkpoint_store):
    prefix = f"{BUCKETS[data_store]}/{tmp_path.name}"
    storage.atomic_write_bytes(f"{prefix}/train.csv", (AGNEWS / "train.csv").read_bytes())
    storage.atomic_write_bytes(
        f"{prefix}/test.csv", b"".join((AGNEWS / "test.csv").read_bytes().splitlines(keepends=True)[:200])
    )
    checkpoints = f"{BUCKETS[checkpoint_store]}/{tmp_path.name}/ck"
    job = [
        *TINY_JOB,
        "task_name=agnews",
        f"train_path={prefix}/train.csv",
        f"test_path={prefix}/test.csv",
        "site_ids=[0,0]",
        "job_name=cloud",
        f"checkpoints_dir={checkpoints}",
        f"runs_dir={tmp_path / 'runs'}",
    ]
    env = dict(os.environ)  # the fixtures pointed this process's environment at the servers
    first = run_cli(tmp_path, "with", *job, "num_rounds=1", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(tmp_path, "with", *job, "num_rounds=2", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing at round 2" in second.stderr
    record = read_record(run_records(tmp_path / "runs")[0])
    assert record["info"]["sites"]["sizes"] == [262, 261]  # the 581 AG News rows, read over HTTP, less
    assert record["info"]["sites"]["validation_rows"] == 58  # the validation set
    assert record["info"]["sites"]["test_rows"] == 200
    assert record["metrics"]["validation.accuracy"]["steps"] == [1, 2]
    names = [path.rsplit("/", 1)[-1] for path in storage.list_dir(checkpoints)]
    assert names == [".claims", "round-000001", "round-000002"]
    # Each start claimed the job in checkpoints_dir (an exclusive create on the object store) and released it.
    claims = [path.rsplit("/", 1)[-1] for path in storage.list_dir(f"{checkpoints}/.claims")]
    assert claims == ["claim-000002.json"]  # the older generation is deleted by the newer one
    assert json.loads(storage.read_bytes(f"{checkpoints}/.claims/claim-000002.json"))["released"] is True
    assert storage.exists(f"{checkpoints}/round-000002/COMMITTED")
