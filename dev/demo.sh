#!/usr/bin/env bash
# Sets everything up, then runs the demo job end to end with embedded defaults:
# the pretrained MiniLM (offline) on the synthetic task, 4 sites, 3 rounds, tracked
# in the Sacred file store under runs/. About 3 minutes on 2 CPU cores, plus set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
./dev/setup.sh
exec .venv/bin/python scripts/train_federated.py with \
  model=minilm task_name=synthetic 'site_ids=[0,0,0,0]' num_rounds=3 \
  max_seq_len=64 learning_rate=1e-4 job_name=demo "$@"
