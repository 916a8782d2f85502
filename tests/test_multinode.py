"""A two-node job on loopback: two launchers of the real entry point, each with two sites,
meet through the multi-node environment contract and train one round with 4 sites in all.

- Kubeflow PyTorchJob contract: MASTER_ADDR, MASTER_PORT, WORLD_SIZE = nodes, RANK = node index.
- SLURM: deploy/slurm/launch.sh itself, with stand-ins for scontrol and srun that start one
  task per pretend node on this machine (SLURM_NNODES / SLURM_NODEID, as srun does). The node
  list is 127.0.0.1, 127.0.0.2 (the master must be the first), and srun refuses to run without
  --ntasks-per-node=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import ROOT, TINY_JOB, cli_command, read_record, run_records
from tests.ranks import free_port

pytestmark = pytest.mark.slow  # every test here starts the command line

JOB = [*TINY_JOB, "site_ids=[0,0]", "num_rounds=1", "synthetic_train_size=200", "synthetic_test_size=40"]
CONTRACT = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def clean_env(**extra: str) -> dict:
    """This process's environment without any distributed, SLURM or tracking settings of its own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in CONTRACT and not key.startswith(("SLURM_", "TORCHELASTIC_", "PET_", "SACRED_"))
    }
    return {**env, **extra}


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [process.wait(timeout=max(1.0, deadline - time.monotonic())) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def check_record_of_four_sites(runs_dir: Path) -> None:
    records = run_records(runs_dir)
    assert len(records) == 1, records  # only node 0 records
    record = read_record(records[0])
    assert record["run"]["status"] == "COMPLETED"
    sites = record["info"]["sites"]
    assert sites["count"] == 4  # 2 nodes x site_ids=[0,0]
    assert len(sites["sizes"]) == 4 and sum(sites["sizes"]) == 180 and sites["validation_rows"] == 20
    for name in ("validation.accuracy", "validation.loss", "train.loss"):
        assert record["metrics"][name]["steps"] == [1], name
    assert record["config"]["site_ids"] == [0, 0]


def test_two_launchers_with_the_kubeflow_env_contract_train_four_sites(tmp_path):
    port = free_port()
    processes, logs = [], []
    for rank in (0, 1):
        node_dir = tmp_path / f"node{rank}"
        node_dir.mkdir()
        logs.append(node_dir / "output.txt")
        env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
        with open(logs[-1], "w") as log:
            processes.append(
                subprocess.Popen(
                    cli_command("with", *JOB, "job_name=two-nodes", "runs_dir=runs"),
                    cwd=node_dir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
    codes = wait_all(processes, timeout=300)
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(f"--- node {i} ---\n{out[-3000:]}" for i, out in enumerate(outputs))
    check_record_of_four_sites(tmp_path / "node0" / "runs")
    assert not (tmp_path / "node1" / "runs").exists()  # node 1 wrote no record
    assert "round 1/1" in outputs[0]


FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames NODELIST: one loopback address per node (127.0.0.1, 127.0.0.2, ...),
# so the master address tells which host of the list the script took.
[ "$1 $2" = "show hostnames" ] || exit 2
for ((i = 1; i <= SLURM_NNODES; i++)); do echo "127.0.0.$i"; done
"""

FAKE_SRUN = """#!/usr/bin/env bash
# srun --ntasks-per-node=1 ... CMD: one task per node of the allocation, on this machine. Records
# its options and each task's master address; refuses to start more than one task per node.
options=()
while [[ $1 == --* ]]; do options+=("$1"); shift; done
printf '%s\\n' "${options[@]}" >"$SRUN_LOGS/srun-options.txt"
one_per_node=0
for option in "${options[@]}"; do [ "$option" = --ntasks-per-node=1 ] && one_per_node=1; done
if [ "$one_per_node" != 1 ]; then
  echo "srun (stand-in): without --ntasks-per-node=1 every node would start several launchers" >&2
  exit 1
fi
[ "${FAKE_SRUN_DRY:-0}" = 1 ] && exit 0
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  echo "$MASTER_ADDR:$MASTER_PORT" >"$SRUN_LOGS/node$node.master"
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" >"$SRUN_LOGS/node$node.txt" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def slurm_env(tmp_path: Path, **extra: str) -> dict:
    """Stand-ins for scontrol and srun first on PATH, and the variables of a two-node allocation."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[01-02]",
        SLURM_NNODES="2",
        SLURM_SUBMIT_DIR=str(ROOT),
        PYTHON=sys.executable,
        SRUN_LOGS=str(tmp_path),
        **extra,
    )


def launch(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "deploy/slurm/launch.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def test_slurm_launch_passes_one_task_per_node_and_the_cpus_per_task_to_srun(tmp_path):
    env = slurm_env(tmp_path, FAKE_SRUN_DRY="1", MASTER_PORT="29999")
    result = launch(env, "with", "num_rounds=1")
    assert result.returncode == 0, result.stderr
    options = (tmp_path / "srun-options.txt").read_text().split()
    assert "--ntasks-per-node=1" in options and not any(o.startswith("--cpus-per-task") for o in options), options
    assert "2 nodes, master 127.0.0.1:29999" in result.stderr  # the first host of the node list

    result = launch({**env, "SLURM_CPUS_PER_TASK": "6"}, "with", "num_rounds=1")
    assert result.returncode == 0, result.stderr
    options = (tmp_path / "srun-options.txt").read_text().split()
    assert "--ntasks-per-node=1" in options and "--cpus-per-task=6" in options, options

    # The stand-in itself holds the line: without one task per node it fails.
    refused = subprocess.run(
        [str(tmp_path / "bin" / "srun"), "--kill-on-bad-exit=1", "true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert refused.returncode == 1 and "--ntasks-per-node=1" in refused.stderr


def test_slurm_launch_script_runs_one_task_per_node_and_trains_four_sites(tmp_path):
    port = free_port()
    env = slurm_env(tmp_path, MASTER_PORT=str(port))
    result = launch(env, "with", *JOB, "job_name=slurm-two-nodes", f"runs_dir={tmp_path / 'runs'}", timeout=300)
    outputs = [(tmp_path / f"node{i}.txt").read_text() if (tmp_path / f"node{i}.txt").exists() else "" for i in (0, 1)]
    report = f"exit {result.returncode}\n{result.stderr}\n" + "\n\n".join(out[-3000:] for out in outputs)
    assert result.returncode == 0, report
    assert "--ntasks-per-node=1" in (tmp_path / "srun-options.txt").read_text().split()
    # The master is the FIRST host scontrol lists (127.0.0.1; the second node is 127.0.0.2), for every task.
    assert f"2 nodes, master 127.0.0.1:{port}" in result.stderr
    assert [(tmp_path / f"node{i}.master").read_text().strip() for i in (0, 1)] == [f"127.0.0.1:{port}"] * 2
    check_record_of_four_sites(tmp_path / "runs")  # one shared file system, one record
    assert "round 1/1" in outputs[0]
