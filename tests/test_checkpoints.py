"""Checkpoints: exact resume, SIGKILL recovery, broken checkpoints skipped, retention, safety."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaling_fl import checkpoint
from tests.cli import SCRIPT, TINY_JOB, read_record, run_cli, run_records

SMALL = [*TINY_JOB, "synthetic_train_size=240", "synthetic_test_size=60", "site_ids=[0,0,0]"]
COMPARABLE = ("validation.loss", "validation.accuracy", "validation.f1_macro", "train.loss", "train.accuracy",
              "comm.bytes_per_site")


def _final(runs: Path) -> dict:
    return read_record(run_records(runs)[-1])


def test_stopped_and_resumed_run_equals_an_uninterrupted_one_bitwise(tmp_path):
    common = [*SMALL, "num_rounds=3", "learning_rate=0.003"]
    straight = run_cli(tmp_path, "with", *common, "job_name=straight", f"runs_dir={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = run_cli(tmp_path, "with", *common, "job_name=stopped", f"runs_dir={tmp_path / 'b'}",
                      f"checkpoints_dir={tmp_path / 'ck'}", "max_restarts=0",
                      env={"SCALING_FL_FAIL_AT": "site=0,round=3"})  # dies after round 2 is checkpointed
    assert stopped.returncode != 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["round-000001", "round-000002"]
    resumed = run_cli(tmp_path, "with", *common, "job_name=stopped", f"runs_dir={tmp_path / 'b'}",
                      f"checkpoints_dir={tmp_path / 'ck'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing at round 3" in resumed.stderr
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert a["info"]["final_weights_sha256"] == b["info"]["final_weights_sha256"]
    for name in COMPARABLE:
        assert a["metrics"][name]["values"] == b["metrics"][name]["values"], name
        assert b["metrics"][name]["steps"] == [1, 2, 3]


def _site_pids(launcher_pid: int) -> list[int]:
    """The launcher's spawned site processes (not multiprocessing's resource tracker)."""
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, children):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def test_a_site_killed_mid_round_is_restarted_and_the_run_finishes_logging_each_round_once(tmp_path):
    runs, ck = tmp_path / "runs", tmp_path / "ck"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "with", *TINY_JOB, "site_ids=[0,0,0]", "synthetic_train_size=1500",
         "synthetic_test_size=60", "num_rounds=4", "max_restarts=3", "job_name=killed", f"runs_dir={runs}",
         f"checkpoints_dir={ck}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not (ck / "round-000001" / checkpoint.MARKER).exists():
            assert process.poll() is None and time.time() < deadline, "round 1 never got checkpointed"
            time.sleep(0.2)
        victims = _site_pids(process.pid)
        assert len(victims) == 3
        os.kill(victims[1], signal.SIGKILL)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    record = read_record(run_records(runs)[0])
    assert record["run"]["status"] == "COMPLETED"
    assert record["info"]["restarts"] == 1
    for name in COMPARABLE:
        assert record["metrics"][name]["steps"] == [1, 2, 3, 4], name
    assert "sites restarted (restart 1" in output


def test_a_truncated_checkpoint_is_skipped_and_retention_keeps_the_last_n(tmp_path):
    ck = tmp_path / "ck"
    first = run_cli(tmp_path, "with", *SMALL, "num_rounds=4", "keep_last_checkpoints=2", "job_name=trunc",
                    f"checkpoints_dir={ck}", f"runs_dir={tmp_path / 'runs'}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(p.name for p in ck.iterdir()) == ["round-000003", "round-000004"]
    newest = ck / "round-000004" / "global.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    again = run_cli(tmp_path, "with", *SMALL, "num_rounds=5", "keep_last_checkpoints=2", "job_name=trunc",
                    f"checkpoints_dir={ck}", f"runs_dir={tmp_path / 'runs'}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skipping checkpoint" in again.stderr and "round-000004" in again.stderr
    assert "continuing at round 4" in again.stderr
    record = read_record(run_records(tmp_path / "runs")[0])
    assert record["metrics"]["validation.accuracy"]["steps"] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in ck.iterdir()) == ["round-000004", "round-000005"]


def test_a_changed_experiment_is_refused_unless_forced(tmp_path):
    ck = tmp_path / "ck"
    base = [*SMALL, "num_rounds=1", "job_name=changed", f"checkpoints_dir={ck}", f"runs_dir={tmp_path / 'runs'}"]
    assert run_cli(tmp_path, "with", *base).returncode == 0
    refused = run_cli(tmp_path, "with", *base, "num_rounds=2", "split=label_sorted")
    assert refused.returncode == 2
    assert "different experiment (split: 'iid' -> 'label_sorted')" in refused.stderr
    assert "resume=force" in refused.stderr
    forced = run_cli(tmp_path, "with", *base, "num_rounds=2", "split=label_sorted", "resume=force")
    assert forced.returncode == 0, forced.stderr[-2000:]


class _Bomb:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BOMB_SENTINEL']}",))


def test_a_malicious_checkpoint_cannot_execute_code(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("BOMB_SENTINEL", str(sentinel))
    good = tmp_path / "ck" / "round-000001"
    good.mkdir(parents=True)
    import torch

    checkpoint.write_tensors(str(good), "global.safetensors", {"global": torch.ones(3)})
    checkpoint.write_state(str(good), {"round": 1})
    checkpoint.commit(str(good))
    evil = tmp_path / "ck" / "round-000002"
    evil.mkdir()
    (evil / "global.safetensors").write_bytes(pickle.dumps(_Bomb()))  # a pickle posing as a checkpoint
    checkpoint.write_state(str(evil), {"round": 2})
    checkpoint.commit(str(evil))  # even a marker that matches the evil bytes does not help
    found = checkpoint.latest(str(tmp_path / "ck"))
    assert found.round == 1
    assert found.tensors("global.safetensors")["global"].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(checkpoint.CheckpointError, match="not a safetensors file"):
        checkpoint.verify(str(evil))
    assert not sentinel.exists()
