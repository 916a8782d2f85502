#!/usr/bin/env bash
# Sets everything up, then runs the test suite. The tests start the servers they need
# themselves (MongoDB wire server, S3 and GCS emulators, dockerd).
#   ./dev/test.sh            the whole suite
#   ./dev/test.sh --fast     the in-process tier only (no command-line start, server or Docker)
# Other arguments go to pytest (-n 0 runs everything in this process, e.g. for a debugger).
# Test files are shared out to one worker per core (at most 4, pytest-xdist), a file staying
# on one worker: its module fixtures (one dockerd, one image build) are set up once. The longest
# files go first (tests/conftest.py), so the workers finish together.
set -euo pipefail
cd "$(dirname "$0")/.."
./dev/setup.sh
args=()
fast=0
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then fast=1; else args+=("$arg"); fi
done
parallel=(--numprocesses auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder)
if [ "$fast" = 1 ]; then
  exec .venv/bin/python -m pytest "${parallel[@]}" -m "not slow" "${args[@]}"
fi
exec .venv/bin/python -m pytest "${parallel[@]}" "${args[@]}"
