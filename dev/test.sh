#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite. The tests start the servers
# they need themselves (MongoDB wire server, S3 and GCS emulators, dockerd).
set -euo pipefail
cd "$(dirname "$0")/.."
./dev/setup.sh
exec .venv/bin/python -m pytest "$@"
