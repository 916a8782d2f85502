#!/usr/bin/env bash
# Federated fine-tuning on a SLURM allocation: one task per node, each starting its node's sites.
#
#   sbatch deploy/slurm/launch.sh with site_ids=[0,1,2,3] num_rounds=100 task_name=agnews \
#       train_path=/shared/agnews/train.csv test_path=/shared/agnews/test.csv \
#       job_name=agnews-2x4 checkpoints_dir=/shared/checkpoints/agnews-2x4
#
# Node 0 of the allocation is the master (MASTER_ADDR, first host of the node list); every task
# runs the same command and finds its node rank in SLURM_NODEID and the node count in
# SLURM_NNODES. Total sites = nodes x len(site_ids); only node 0 records the Sacred run.
# Run from the repository (sbatch starts in the submission folder). Environment:
#   PYTHON       the python that has scaling-fl installed (default: .venv/bin/python, else python3)
#   SIF          an Apptainer image instead (apptainer build scaling-fl.sif docker-daemon://scaling-fl:latest);
#                RUNS_DIR / CHECKPOINTS_DIR / DATA_DIR are bound to /workspace/runs, checkpoints, data
#   MASTER_PORT  default: derived from the job id
# srun gets one task per node and the job's --cpus-per-task (SLURM_CPUS_PER_TASK) for it.
# sbatch hands your environment to the tasks: export SACRED_* (MongoDB) and cloud credentials
# before submitting, never write them into this file.
#SBATCH --job-name=scaling-fl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ -z "${SLURM_JOB_NODELIST:-}" ] || [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "launch.sh: not inside a SLURM allocation: submit it with sbatch (or run it within salloc)" >&2
  exit 1
fi
cd "${SLURM_SUBMIT_DIR:-$PWD}"

# (All of the list first: `| head -n 1` could kill scontrol with SIGPIPE, failing under pipefail.)
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${hosts%%$'\n'*}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
# One task per node: the node rank is SLURM_NODEID, so nothing else may claim it.
unset WORLD_SIZE RANK LOCAL_RANK

absolute_dir() {
  mkdir -p "$1" && (cd "$1" && pwd)
}
if [ -n "${SIF:-}" ]; then
  binds="$(absolute_dir "${RUNS_DIR:-runs}"):/workspace/runs"
  binds+=",$(absolute_dir "${CHECKPOINTS_DIR:-checkpoints}"):/workspace/checkpoints"
  binds+=",$(absolute_dir "${DATA_DIR:-data}"):/workspace/data"
  command=(apptainer exec --nv --pwd /workspace --bind "$binds" "$SIF" /opt/venv/bin/python)
else
  python=${PYTHON:-}
  if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
  fi
  command=("$python")
fi

# Some Slurm versions (22.05 on) do not hand sbatch's --cpus-per-task on to srun: pass it
# explicitly, or the task, and with it all sites of its node, could get a single CPU.
srun_options=(--ntasks-per-node=1 --kill-on-bad-exit=1)
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  srun_options+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi

echo "launch.sh: ${SLURM_NNODES:-?} nodes, master ${MASTER_ADDR}:${MASTER_PORT}" >&2
exec srun "${srun_options[@]}" "${command[@]}" scripts/train_federated.py "$@"
