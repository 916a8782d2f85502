"""The real container: Debian's docker engine, a locally made base image, our Dockerfile built
through ./run-local.sh and docker compose, one round of a tiny federated job in the container,
and the run record it leaves on the mounted folder. Also the debug image: debugpy answers a
debug adapter request on the published port 5678.

Everything is set up by the test itself (see tests/docker_support.py): apt-get installs
docker.io, dockerd is started (and stopped again), the base image is made of the host's own
installed Debian packages and, like the real pytorch/pytorch image, carries torch system-wide
(the host's; kept in Docker's image store), and pip inside the build reaches the host's
package sources through a local package server. If dockerd cannot start, the tests error out
with its log: they never skip.

The whole module must stay well under 15 minutes from a cold cache on 2 cores: the seconds of
each phase are recorded in TIMINGS (and /var/tmp/scaling-fl-docker/timings.json, with the steps
of a fresh base image), and their sum must stay below 900 s (checked at module teardown).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import docker_support as ds
from tests.cli import ROOT, read_record, run_records

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # Docker builds

IMAGE_NAME = "scaling-fl-ci"
HOST_UID = 4321  # not root, and without an entry in the image's /etc/passwd
CHECKOUT = [
    "Dockerfile",
    ".dockerignore",
    "docker-compose.yaml",
    "docker-compose.cpu.yaml",
    "docker-compose.debug.yaml",
    "run-local.sh",
    ".env.template",
    "pyproject.toml",
    "README.md",
    "requirements",
    "scaling_fl",
    "scripts",
    "deploy",
]
JOB = [
    "scripts/train_federated.py",
    "with",
    "model=tiny-bert",
    "task_name=synthetic",
    "max_seq_len=32",
    "site_ids=[0,0,1,1]",
    "num_rounds=1",
    "synthetic_train_size=200",
    "synthetic_test_size=40",
    "job_name=container",
    "author=Ada Lovelace",
]
TIMINGS: dict[str, float] = {}  # the module's phases, one after the other: their sum is its cost
BASE_IMAGE_PHASES: dict[str, float] = {}  # the steps of base_image_s when the base image was made afresh
BUDGET_S = 900


def timed(name: str, started: float) -> None:
    TIMINGS[name] = round(time.monotonic() - started, 1)


@pytest.fixture(scope="module")
def engine():
    module_started = started = time.monotonic()
    daemon = ds.Dockerd(ds.CACHE_DIR / "dockerd.log")
    daemon.start()  # installs docker.io first when no daemon answers and dockerd is missing
    timed("engine_s", started)
    try:
        started = time.monotonic()
        ds.ensure_base_image(BASE_IMAGE_PHASES)
        timed("base_image_s", started)
        yield ds.BASE_IMAGE
    finally:
        # Earlier builds of our image that a rebuild left untagged; nothing else is touched.
        ds.run(
            [ds.docker_cli(), "image", "prune", "-f", "--filter", "label=org.opencontainers.image.title=scaling-fl"],
            check=False,
        )
        daemon.stop()
        ds.CACHE_DIR.mkdir(parents=True, exist_ok=True)
        report = {
            **TIMINGS,
            "sum_s": round(sum(TIMINGS.values()), 1),
            "module_wall_s": round(time.monotonic() - module_started, 1),
            "base_image_phases": BASE_IMAGE_PHASES,
        }
        (ds.CACHE_DIR / "timings.json").write_text(json.dumps(report, indent=1))
        print("\ncontainer test timings:", json.dumps(report))
    # Only after a normal run (an error above is reported as it is).
    assert sum(TIMINGS.values()) < BUDGET_S, f"the container tests took {sum(TIMINGS.values()):.0f} s: {TIMINGS}"


def set_env(path: Path, values: dict[str, str]) -> None:
    text = path.read_text()
    for key, value in values.items():
        text, count = re.subn(rf"^#? ?{key}=.*$", lambda _: f"{key}={value}", text, flags=re.M)
        assert count == 1, key
    path.write_text(text)


@pytest.fixture(scope="module")
def project(engine, tmp_path_factory):
    """A checkout with a .env for this machine: CPU only, the local base image, pip through the package server."""
    import torch

    directory = tmp_path_factory.mktemp("checkout")
    for name in CHECKOUT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, directory / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, directory / name)
    shutil.copy(ROOT / ".env.template", directory / ".env")
    with ds.PackageServer() as server:
        torch_version = torch.__version__.split("+")[0]
        have_cpu_wheel = server.local_wheel(f"torch-{torch_version}+cpu-*.whl")
        set_env(
            directory / ".env",
            {
                "COMPOSE_FILE": "docker-compose.yaml:docker-compose.cpu.yaml",
                "IMAGE_NAME": IMAGE_NAME,
                "BASE_IMAGE": engine,
                "BUILD_NETWORK": "host",
                "BUILD_PIP_INDEX_URL": server.build_args["PIP_INDEX_URL"],
                "BUILD_PIP_EXTRA_INDEX_URL": server.build_args["PIP_EXTRA_INDEX_URL"],
                "BUILD_PIP_FIND_LINKS": server.build_args["PIP_FIND_LINKS"],
                "CPU_TORCH_VERSION": torch_version,
                "CPU_TORCH_INDEX_URL": "" if have_cpu_wheel else server.proxy("https://download.pytorch.org/whl/cpu"),
            },
        )
        for name in ("data", "runs", "checkpoints"):
            (directory / name).mkdir()
            os.chown(directory / name, HOST_UID, HOST_UID)
        env = {key: value for key, value in os.environ.items() if not key.startswith(("COMPOSE_", "SACRED_", "MONGO_"))}
        docker_config = ds.docker_config_with_compose(tmp_path_factory.mktemp("docker-config"))
        if docker_config is not None:
            env["DOCKER_CONFIG"] = str(docker_config)
        env.update(HOST_UID=str(HOST_UID), HOST_GID=str(HOST_UID))
        yield directory, env


def run_local(project, *args: str, extra_env: dict | None = None, timeout: float = 780):
    directory, env = project
    return subprocess.run(
        ["./run-local.sh", *args],
        cwd=directory,
        env={**env, **(extra_env or {})},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )


def leftover_containers() -> list[str]:
    result = ds.run(
        [ds.docker_cli(), "ps", "-a", "--format", "{{.Names}}", "--filter", "label=com.docker.compose.service=main"]
    )
    return [name for name in result.stdout.split() if name.startswith("scaling-fl-")]


@pytest.fixture(scope="module")
def job(project):
    """One round of the tiny job through ./run-local.sh: the image is built first (cached when warm)."""
    started = time.monotonic()
    result = run_local(project, *JOB)
    timed("run_local_build_and_job_s", started)
    return result


def test_run_local_builds_the_image_and_runs_one_round_recorded_on_the_mounted_folder(project, job):
    directory, _ = project
    assert job.returncode == 0, f"{job.stdout[-4000:]}\n{job.stderr[-6000:]}"
    (run_dir,) = run_records(directory / "runs")
    record = read_record(run_dir)
    assert record["run"]["status"] == "COMPLETED"
    assert record["config"]["site_ids"] == [0, 0, 1, 1]  # the arguments arrived verbatim
    assert record["config"]["author"] == "Ada Lovelace"
    assert record["info"]["sites"]["count"] == 4 and sum(record["info"]["sites"]["sizes"]) == 180  # 20 validate
    for name in ("validation.accuracy", "validation.loss", "train.loss", "time.round_s"):
        assert record["metrics"][name]["steps"] == [1], name
    assert record["run"]["host"]["hostname"] != socket.gethostname()  # it ran in the container
    assert all(path.stat().st_uid == HOST_UID for path in run_dir.iterdir())  # written as the host user
    assert leftover_containers() == []  # compose run --rm


def test_image_is_non_root_with_python_entry_point_and_nothing_secret_or_local_inside(project, job):
    assert job.returncode == 0, "the image was not built"
    started = time.monotonic()
    config = json.loads(ds.run([ds.docker_cli(), "image", "inspect", f"{IMAGE_NAME}:latest"]).stdout)[0]["Config"]
    assert config["User"] not in ("", "0", "root")
    assert config["Entrypoint"] == ["python"] and config["WorkingDir"] == "/workspace"
    names = {item.split("=", 1)[0] for item in config["Env"]}
    assert not any(re.search(r"SACRED|MONGO|PASSWORD|SECRET|TOKEN|AWS_|GOOGLE_|PIP_", name) for name in names), names
    probe = (
        "import os, torch, scaling_fl\n"
        "open('/cache/huggingface/probe', 'w').write('ok')\n"  # the HF cache volume takes any uid
        "print(sorted(os.listdir('/workspace')), torch.__version__, os.getuid())\n"
    )
    result = ds.run(
        [
            ds.docker_cli(),
            "run",
            "--rm",
            "--user",
            f"{HOST_UID}:{HOST_UID}",
            "-v",
            "scaling-fl-cache:/cache",
            f"{IMAGE_NAME}:latest",
            "-W",
            "ignore",
            "-c",
            probe,
        ]
    )
    listing, torch_version, uid = result.stdout.strip().rsplit(" ", 2)
    assert listing == "['checkpoints', 'data', 'runs', 'scripts']"  # no .env, tests, .git or .venv
    assert torch_version.endswith("+cpu") and uid == str(HOST_UID)
    timed("image_checks_s", started)


TORCH_PROBE = "import torch; print(torch.__version__, torch.__file__)"


def test_image_keeps_the_torch_of_the_base_image(project, job):
    """Like the real pytorch/pytorch image, the test base image carries torch system-wide; the
    build must use it as it is (the virtual environment sees it), not install another one."""
    assert job.returncode == 0, "the image was not built"
    started = time.monotonic()
    base = ds.run([ds.docker_cli(), "run", "--rm", "--entrypoint", "python3", ds.BASE_IMAGE, "-c", TORCH_PROBE])
    base_version, base_file = base.stdout.split()
    assert base_version == ds.BASE_TORCH and not base_file.startswith("/opt/venv/")
    image = ds.run(
        [
            ds.docker_cli(),
            "run",
            "--rm",
            "--user",
            f"{HOST_UID}:{HOST_UID}",
            f"{IMAGE_NAME}:latest",
            "-W",
            "ignore",
            "-c",
            "import sys; " + TORCH_PROBE + "; print(sys.prefix)",
        ]
    )
    version, file, prefix = image.stdout.split()
    assert prefix == "/opt/venv"  # python is the virtual environment's ...
    assert (version, file) == (base_version, base_file)  # ... and its torch the base image's, untouched
    assert not file.startswith("/opt/venv/")
    listing = ds.run(
        [
            ds.docker_cli(),
            "run",
            "--rm",
            "--entrypoint",
            "sh",
            f"{IMAGE_NAME}:latest",
            "-c",
            "ls /opt/venv/lib/python3*/site-packages",
        ]
    ).stdout.split()
    assert not any(name == "torch" or name.startswith("torch-") for name in listing), listing
    timed("base_torch_checks_s", started)


def dap_request_initialize(port: int, timeout: float) -> dict:
    """Sends a Debug Adapter Protocol 'initialize' request; returns the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        body = json.dumps(
            {
                "seq": 1,
                "type": "request",
                "command": "initialize",
                "arguments": {"clientID": "pytest", "adapterID": "debugpy"},
            }
        ).encode()
        connection.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = connection.recv(65536)
                if not chunk:
                    raise ConnectionResetError("the debug adapter closed the connection")
                buffer += chunk
            header, _, buffer = buffer.partition(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: *(\d+)", header).group(1))
            while len(buffer) < length:
                buffer += connection.recv(65536)
            message, buffer = json.loads(buffer[:length]), buffer[length:]
            if message.get("type") == "response" and message.get("command") == "initialize":
                return message


def dap_initialize(port: int, timeout: float) -> dict:
    """Retries until debugpy answers: docker's port proxy accepts (and drops) connections
    before the process in the container listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return dap_request_initialize(port, timeout=10)
        except OSError as error:  # refused, reset, closed, timed out
            if time.monotonic() > deadline:
                raise AssertionError(f"no debug adapter answers on 127.0.0.1:{port}: {error}") from None
            time.sleep(0.5)


def test_debug_override_waits_for_a_debugger_on_port_5678(project, job):
    directory, env = project
    assert job.returncode == 0, "the image was not built"
    files = "docker-compose.yaml:docker-compose.cpu.yaml:docker-compose.debug.yaml"
    started = time.monotonic()
    process = subprocess.Popen(
        ["./run-local.sh", *JOB],
        cwd=directory,
        env={**env, "COMPOSE_FILE": files},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        response = dap_initialize(5678, timeout=300)
        timed("debug_build_and_attach_s", started)
        assert response["success"] is True, response
        assert len(run_records(directory / "runs")) == 1  # the job waits for the debugger: no new record
    finally:
        process.send_signal(signal.SIGTERM)  # run-local.sh removes the container when interrupted
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output[-3000:]
    assert leftover_containers() == []


def test_cross_silo_compose_trains_a_coordinator_and_three_site_containers(project, job):
    """deploy/cross-silo/docker-compose.yaml: four containers of the image, each mounting only its own
    data, meet at the coordinator's TLS door over the compose network and train one job."""
    directory, env = project
    assert job.returncode == 0, "the image was not built"
    started = time.monotonic()
    data = directory / "data" / "cross-silo"
    topics = {"sports": "the team won the match", "science": "the lab measured the particle"}
    mixes = {"site-a": ["sports"] * 6 + ["science"] * 2, "site-b": ["science"] * 5, "site-c": ["sports", "science"] * 3}
    for folder, labels, name in [(site, mix, "train.csv") for site, mix in mixes.items()] + [
        ("coordinator", ["sports", "science"] * 3, "test.csv")
    ]:
        (data / folder).mkdir(parents=True)
        rows = "".join(f'"{topics[label]} {index}",{label}\n' for index, label in enumerate(labels))
        (data / folder / name).write_text("text,label\n" + rows)
    certs = directory / "deploy" / "cross-silo" / "certs"
    subprocess.run(["bash", "scripts/make_test_certs.sh", str(certs), "coordinator"], cwd=directory, check=True)
    for path in [data, *data.rglob("*"), certs, *certs.iterdir()]:
        os.chown(path, HOST_UID, HOST_UID)
    token = "cross-silo-container-token-0123456789"
    compose = [ds.docker_cli(), "compose", "--project-directory", ".", "-f", "deploy/cross-silo/docker-compose.yaml"]
    run_env = {**env, "FL_JOIN_TOKEN": token}
    try:
        result = subprocess.run(
            [*compose, "up", "--abort-on-container-exit", "--exit-code-from", "coordinator"],
            cwd=directory,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        subprocess.run([*compose, "down", "--remove-orphans"], cwd=directory, env=run_env, capture_output=True)
    timed("cross_silo_compose_s", started)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "FL starting: 3 sites joined (site-a, site-b, site-c)" in output
    records = [read_record(path) for path in run_records(directory / "runs")]
    (record,) = [record for record in records if record["config"].get("role") == "coordinator"]
    assert record["run"]["status"] == "COMPLETED"
    assert {name: site["rows"] for name, site in record["info"]["sites"]["joined"].items()} == {
        "site-a": 8,
        "site-b": 5,
        "site-c": 6,
    }
    assert record["metrics"]["test.accuracy"]["steps"] == [2]
    assert token not in output and token not in json.dumps(record)


def test_a_dockerd_that_cannot_start_is_an_error_with_its_log(tmp_path):
    """The container tests fail loudly, with the daemon's own words, instead of skipping."""
    fake = tmp_path / "dockerd"
    fake.write_text("#!/bin/sh\necho 'failed to start daemon: no cgroups here' >&2\nexit 1\n")
    fake.chmod(0o755)
    daemon = ds.Dockerd(tmp_path / "dockerd.log", host=f"unix://{tmp_path}/docker.sock", binary=str(fake))
    with pytest.raises(ds.DockerSetupError, match="no cgroups here" if os.geteuid() == 0 else "needs root"):
        daemon.start(timeout=10)
