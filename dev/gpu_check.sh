#!/usr/bin/env bash
# Ready for the first GPU (issue 13, point 6): short real runs of the command line on CUDA (NCCL,
# several sites on one GPU, bf16/fp16 autocast, a bf16/fp16 LoRA base, virtual sites), each checked
# against the same run on the CPU, with a results table (markdown) on stdout and in the output folder.
#   dev/gpu_check.sh [--out DIR]   on a CUDA machine; estimated 4-5 minutes on one H200 (--budget-s: 450)
#   dev/gpu_check.sh --dry         on the CPU, smallest sizes: what runs without CUDA (under a minute)
# The output folder is --out DIR, else $OUT, else runs/gpu_check. Exit code 1 if a check failed.
# The interpreter is .venv/bin/python (made by ./dev/setup.sh when .venv is missing), or
# $GPU_CHECK_PYTHON: one with a CUDA build of torch and the project's requirements.
# The logic and the list of checks: dev/gpu_check.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${GPU_CHECK_PYTHON:-.venv/bin/python}
if [ -z "${GPU_CHECK_PYTHON:-}" ] && [ ! -d .venv ]; then
  ./dev/setup.sh
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  cuda=$("$python" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null || echo "no torch")
  if [ "$cuda" != "True" ]; then
    torch_version=$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo "missing")
    {
      echo "gpu_check: WARNING: nvidia-smi is here but torch ($torch_version) of $python says CUDA is not"
      echo "gpu_check: available ($cuda): a CPU build of torch, or an unusable driver. Nothing will run on a GPU."
      echo "gpu_check: GPUs nvidia-smi lists:"
      nvidia-smi -L 2>&1 | sed 's/^/gpu_check:   /' || true
    } >&2
  fi
fi
exec "$python" dev/gpu_check.py "$@"
