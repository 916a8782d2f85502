"""Sacred on a real MongoDB wire server (nx-27017 behind a SCRAM-SHA-256 proxy), read back with pymongo."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from urllib.parse import quote_plus

import gridfs
import pymongo
import pytest
from safetensors.torch import load as load_safetensors

from scaling_fl import claim
from tests.cli import TINY_JOB, run_cli, run_records
from tests.servers import _SACRED_VARS, MONGO_TEST_PASSWORD, free_port

pytestmark = pytest.mark.slow  # every test here starts the command line

SMALL = [*TINY_JOB, "synthetic_train_size=160", "synthetic_test_size=40", "site_ids=[0,0,0]"]
TWO_SITES = [*TINY_JOB, "synthetic_train_size=96", "synthetic_test_size=32", "site_ids=[0,0]"]
AWS_SECRET = "aws-secret-never-logged-Zq81"
DOTENV_AWS_SECRET = "dotenv-aws-secret-never-logged-Xk42"


def _database(mongo_server, name):
    return pymongo.MongoClient(mongo_server.url, serverSelectionTimeoutMS=5000, socketTimeoutMS=30_000)[name]


def _dump(database) -> str:
    """Every stored byte of the database, as text: run documents, metrics, GridFS files and their content.

    GridFS is read through its own API: nx-27017 keeps it in collections of its own and cannot
    send their raw documents back.
    """
    parts = []
    for collection in database.list_collection_names():
        if collection.startswith(("fs.", "fs_")):
            continue
        for document in database[collection].find():
            parts.append(repr(document))
    files = gridfs.GridFS(database)
    for stored in files.find():
        parts.append(repr({"filename": stored.filename, "metadata": stored.metadata}))
        parts.append(stored.read().decode("utf-8", errors="replace"))
    return "\n".join(parts)


def test_a_multi_site_run_logs_to_mongo_with_artifacts_and_no_secret_anywhere(tmp_path, server_env, mongo_server):
    env = server_env(s3=False, gcs=False, mongo="auth", database="full_run", AWS_SECRET_ACCESS_KEY=AWS_SECRET)
    result = run_cli(
        tmp_path,
        "with",
        *SMALL,
        "num_rounds=2",
        "save_final_model=True",
        "job_name=mongo-full",
        f"runs_dir={tmp_path / 'runs'}",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not run_records(tmp_path / "runs")  # Mongo was configured: no file store record
    database = _database(mongo_server, "full_run")
    (run,) = list(database.runs.find())
    assert run["status"] == "COMPLETED" and run["config"]["job_name"] == "mongo-full"
    names = {ref["name"] for ref in run["info"]["metrics"]}
    assert {"validation.accuracy", "validation.loss", "train.loss", "comm.bytes_per_site"} <= names
    for series in database.metrics.find({"run_id": run["_id"]}):
        assert series["steps"] == ([2] if series["name"].startswith("test.") else [1, 2]), series["name"]
    artifacts = {artifact["name"]: artifact["file_id"] for artifact in run["artifacts"]}
    model = load_safetensors(gridfs.GridFS(database).get(artifacts["final_model.model.safetensors"]).read())
    assert "classifier.weight" in model
    assert "config.resolved.json" in artifacts

    stored = _dump(database)
    for secret in (MONGO_TEST_PASSWORD, quote_plus(MONGO_TEST_PASSWORD), AWS_SECRET):
        assert secret not in stored
        assert secret not in result.stdout + result.stderr


def test_a_crashed_job_fails_its_record_then_continues_it_without_duplicates(tmp_path, server_env, mongo_server):
    env = server_env(s3=False, gcs=False, mongo=True, database="resumed")
    args = ["with", *SMALL, "num_rounds=3", "job_name=mongo-resume", "max_restarts=0", f"runs_dir={tmp_path / 'r'}"]
    crashed = run_cli(tmp_path, *args, env={**env, "SCALING_FL_FAIL_AT": "site=1,round=2"})
    assert crashed.returncode != 0
    database = _database(mongo_server, "resumed")
    (run,) = list(database.runs.find())
    assert run["status"] == "FAILED"
    assert "site 1" in run["fail_trace"][-1] or "site 1" in "".join(run["fail_trace"])
    assert "maybe_fail" in "".join(run["fail_trace"])  # the failing site's own traceback
    references = {ref["name"]: ref["id"] for ref in run["info"]["metrics"]}

    resumed = run_cli(tmp_path, *args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (again,) = list(database.runs.find())  # the same document, same _id
    assert again["_id"] == run["_id"] and again["status"] == "COMPLETED"
    assert again["previous_statuses"] == ["FAILED"] and "fail_trace" not in again
    kept = {ref["name"]: ref["id"] for ref in again["info"]["metrics"]}
    assert {name: kept[name] for name in references} == references  # references kept
    assert set(kept) - set(references) == {"test.accuracy", "test.loss", "test.f1_macro"}  # the last round's
    for series in database.metrics.find({"run_id": run["_id"]}):
        assert series["steps"] == ([3] if series["name"].startswith("test.") else [1, 2, 3]), series["name"]
    assert again["captured_out"].startswith(run["captured_out"][:200])  # first attempt's output kept
    assert again["captured_out"].count("round 1/3") >= 2


def test_a_live_mongo_run_with_the_same_job_name_is_refused(tmp_path, server_env, mongo_server):
    env = server_env(s3=False, gcs=False, mongo=True, database="live")
    database = _database(mongo_server, "live")
    database.runs.insert_one({"_id": 41, "status": "RUNNING", "config": {"job_name": "busy"}, "heartbeat": None})
    held = claim.claim_in_mongo(database, "busy").acquire()
    try:
        result = run_cli(tmp_path, "with", *SMALL, "num_rounds=1", "job_name=busy", env=env)
    finally:
        held.release()
    assert result.returncode == 2
    assert f"job_name='busy' is already running: launcher pid {os.getpid()} on host" in result.stderr
    assert "claim at MongoDB database live" in result.stderr
    assert database.runs.count_documents({}) == 1


def test_dash_m_host_port_db_records_there_instead_of_the_environment_choice(tmp_path, server_env, mongo_server):
    env = server_env(s3=False, gcs=False, mongo=True, database="from_env_unused")
    result = run_cli(
        tmp_path,
        "-m",
        f"{mongo_server.host}:flag_db",
        "with",
        *TWO_SITES,
        "num_rounds=1",
        "job_name=flag-m",
        f"runs_dir={tmp_path / 'runs'}",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list(_database(mongo_server, "flag_db").runs.find())
    assert run["status"] == "COMPLETED" and run["config"]["job_name"] == "flag-m"
    assert not list(_database(mongo_server, "from_env_unused").runs.find())
    assert not (tmp_path / "runs").exists()


def _without_sacred_variables(env: dict) -> dict:
    return {name: value for name, value in env.items() if name not in _SACRED_VARS}


def test_a_dotenv_in_the_working_directory_points_the_run_at_mongo_and_its_secrets_stay_out(
    tmp_path, server_env, mongo_server, mongo_auth_server
):
    """./.env holds a credentialed SACRED_URL (and an AWS key); a variable of the real environment wins."""
    url = mongo_auth_server.url()  # mongodb://sacred-writer:<escaped password>@127.0.0.1:P/?authSource=admin
    (tmp_path / ".env").write_text(
        f"# written by the test\nSACRED_URL='{url}'\nSACRED_DATABASE=from_dotenv\n"
        f"AWS_SECRET_ACCESS_KEY={DOTENV_AWS_SECRET}\n"
    )
    env = _without_sacred_variables(server_env(s3=False, gcs=False))
    env["SACRED_DATABASE"] = "from_environment"  # set in the real environment: wins over .env
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    result = run_cli(tmp_path, "with", *TWO_SITES, "num_rounds=1", "job_name=dotenv", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not run_records(tmp_path / "runs")  # .env configured Mongo: no file-store record
    assert not list(_database(mongo_server, "from_dotenv").runs.find())
    database = _database(mongo_server, "from_environment")
    (run,) = list(database.runs.find())
    assert run["status"] == "COMPLETED" and run["config"]["job_name"] == "dotenv"
    assert database.metrics.find_one({"run_id": run["_id"], "name": "validation.accuracy"})["steps"] == [1]

    stored = _dump(database)
    for secret in (MONGO_TEST_PASSWORD, quote_plus(MONGO_TEST_PASSWORD), url, DOTENV_AWS_SECRET):
        assert secret not in stored
        assert secret not in result.stdout + result.stderr


def test_sacred_url_in_the_real_environment_wins_over_dotenv(tmp_path, server_env, mongo_server):
    refused = free_port()
    (tmp_path / ".env").write_text(f"SACRED_URL={mongo_server.url}\nSACRED_DATABASE=dotenv_loses\n")
    env = {
        **_without_sacred_variables(server_env(s3=False, gcs=False)),
        "SACRED_URL": f"mongodb://127.0.0.1:{refused}/",
    }
    result = run_cli(tmp_path, "with", *TWO_SITES, "num_rounds=1", env=env)
    assert result.returncode == 2
    assert f"MongoDB at 127.0.0.1:{refused} is not reachable" in result.stderr
    assert not list(_database(mongo_server, "dotenv_loses").runs.find())


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never says a word: (port, connections accepted)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, name="silent-port", daemon=True)
    thread.start()
    yield listener.getsockname()[1], accepted
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def _problem_env(problem: str, server_env, request) -> tuple[dict, str, list[str], list | None]:
    """The environment of one tracking problem, the error expected, extra keys, the silent port's connections."""
    if problem == "refused":
        env = server_env(s3=False, gcs=False, SACRED_URL=f"mongodb://127.0.0.1:{free_port()}/")
        return env, "is not reachable", [], None
    if problem == "silent":
        port, accepted = request.getfixturevalue("silent_port")
        env = server_env(s3=False, gcs=False, SACRED_URL=f"mongodb://127.0.0.1:{port}/")
        return env, f"MongoDB at 127.0.0.1:{port} is not reachable within 5 s (no answer", [], accepted
    if problem == "wrong_password":
        env = server_env(s3=False, gcs=False, mongo="auth", mongo_password="not-the-password")
        return env, "authentication failed", [], None
    return server_env(s3=False, gcs=False), "tracking=mongo needs SACRED_URL", ["tracking=mongo"], None


@pytest.mark.parametrize("problem", ["refused", "silent", "wrong_password", "not_configured"])
def test_each_tracking_problem_is_one_line_from_the_checks_in_seconds(server_env, request, problem):
    """The checks the launcher runs before anything else (job.preflight: choose_tracking, then
    check_mongo), in-process; the command line's handling of their error is tested once below."""
    from scaling_fl.tracking.observers import TrackingError, check_mongo, choose_tracking

    env, expected, args, accepted = _problem_env(problem, server_env, request)
    start = time.monotonic()
    with pytest.raises(TrackingError) as raised:
        _, target = choose_tracking("mongo" if args else "auto", env)
        check_mongo(target)
    assert time.monotonic() - start < 5 + 2  # the server check gives up after 5 s (the probe adds at most 2 s)
    message = str(raised.value)
    assert expected in message and "\n" not in message
    assert "not-the-password" not in message
    if problem != "not_configured":
        assert "127.0.0.1:" in message  # names the host
    if problem == "refused":
        assert "connection refused" in message
    if accepted is not None:
        assert accepted  # the client really got a TCP connection, and waited for an answer in vain


def test_a_silent_tracking_server_fails_the_command_in_seconds_with_one_line_before_any_worker(
    tmp_path, server_env, request
):
    env, expected, _, accepted = _problem_env("silent", server_env, request)
    start = time.monotonic()
    result = run_cli(tmp_path, "with", *SMALL, "num_rounds=1", env=env)
    # Interpreter start and imports included (5-11 s on 2 busy cores); pymongo alone would wait 30 s.
    assert time.monotonic() - start < 25
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert expected in line and "Traceback" not in result.stderr
    assert accepted
    assert "Started run" not in result.stderr
    assert "site 0:" not in result.stderr  # the split is logged just before the sites start
    assert not (tmp_path / "runs").exists()  # no record anywhere


def test_credentials_for_a_server_without_authentication_fail_as_an_authentication_problem(mongo_server):
    """nx-27017 has no authentication: given a user and password, pymongo's SCRAM handshake dies with
    KeyError 'payload'. The server does answer, so the line must say the login failed, not that
    the server is unreachable, and must hold no secret."""
    from scaling_fl.tracking.observers import TrackingError, check_mongo, mongo_target_from_env

    target = mongo_target_from_env(
        {
            "SACRED_HOST": mongo_server.host,
            "SACRED_USER": "sacred-writer",
            "SACRED_PASSWORD": MONGO_TEST_PASSWORD,
            "SACRED_AUTH_SOURCE": "admin",
            "SACRED_DATABASE": "auth_probe",
        }
    )
    start = time.monotonic()
    with pytest.raises(TrackingError) as raised:
        check_mongo(target)
    assert time.monotonic() - start < 10
    message = str(raised.value)
    assert message.startswith(f"MongoDB at {mongo_server.host} (database 'auth_probe'): authentication failed")
    assert "SACRED_USER / SACRED_PASSWORD" in message and "SACRED_AUTH_SOURCE" in message
    assert "KeyError" not in message and "not reachable" not in message
    assert MONGO_TEST_PASSWORD not in message and quote_plus(MONGO_TEST_PASSWORD) not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no traceback that quotes the URL


def test_credentials_for_an_unreachable_server_still_say_not_reachable():
    """The probe without credentials must not turn a server that is not there into a login problem."""
    from scaling_fl.tracking.observers import TrackingError, check_mongo, mongo_target_from_env

    port = free_port()
    target = mongo_target_from_env(
        {"SACRED_HOST": f"127.0.0.1:{port}", "SACRED_USER": "sacred-writer", "SACRED_PASSWORD": MONGO_TEST_PASSWORD}
    )
    with pytest.raises(TrackingError, match=rf"MongoDB at 127\.0\.0\.1:{port} is not reachable .*connection refused"):
        check_mongo(target, timeout_s=1)
