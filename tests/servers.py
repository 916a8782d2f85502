"""Real servers for the test suite, started on free loopback ports and stopped at the end.

Nothing is installed here: the test extra of pyproject.toml brings the packages.

- MongoDB: nx-27017 (MIT), a MongoDB wire-protocol server on SQLite, in memory. It has
  no authentication at all (given credentials, pymongo's SCRAM handshake dies on the client
  side with KeyError 'payload'). `MongoAuthProxy` puts a real SCRAM-SHA-256 front door in
  front of it, so right and wrong passwords can be tested.
- S3: moto's server. Authentication is off by default; `S3Server.auth_enforced()` turns
  IAM checks on for a block, so bad keys and missing permissions can be tested.
- GCS: gcp-storage-emulator, in memory, anonymous.

Fixtures (imported by tests/conftest.py):

- `mongo_server` (session): MongoServer(url, host, port, log_path), no authentication
- `mongo_auth_server` (session): MongoAuthProxy(host, port, user; url(user=, password=))
  with user MONGO_TEST_USER and password MONGO_TEST_PASSWORD (full of URL-special characters)
- `s3_server` (session): S3Server(endpoint, bucket, port, log_path), bucket already created
- `gcs_server` (session): GCSServer(endpoint, bucket, port, log_path), bucket already created
- `s3_env` / `gcs_env` (per test): this process's environment points at the server
  (test keys + AWS_ENDPOINT_URL; STORAGE_EMULATOR_HOST); yield the server
- `mongo_env` / `mongo_auth_env` (per test): SACRED_URL, or SACRED_HOST/USER/PASSWORD, plus
  a SACRED_DATABASE of the test's own; yield (server, database)
- `server_env` (per test): a factory `server_env(s3=True, gcs=True, mongo=False | True |
  "auth", database=None, mongo_password=None, **extra)` -> a full environment dict for
  subprocesses; only the servers asked for are started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
# Generous: a loaded 2-core CI machine can take several seconds just to import moto.
START_TIMEOUT_S = float(os.environ.get("SCALING_FL_TEST_SERVER_TIMEOUT", "90"))
STOP_TIMEOUT_S = 10.0
TEST_BUCKET = "scaling-fl-test"
S3_TEST_KEY_ID = "testing"
S3_TEST_SECRET = "testing"

# Variables that would let the developer's own cloud configuration leak into a test.
_AWS_ISOLATION = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
_SACRED_VARS = (
    "SACRED_URL",
    "SACRED_USER",
    "SACRED_PASSWORD",
    "SACRED_HOST",
    "SACRED_DATABASE",
    "SACRED_AUTH_SOURCE",
    "SACRED_TLS",
)


class ServerStartError(RuntimeError):
    """A test server did not come up; the message carries the tail of its log."""


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def executable(name: str) -> str:
    """The console script next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    raise ServerStartError(f"{name} is not installed; install the test extra: pip install -e '.[test]'")


@dataclass
class ServerProcess:
    name: str
    port: int
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)


def start_process(
    name: str,
    argv_for_port: Callable[[int], list[str]],
    log_dir: Path,
    ready: Callable[[int], bool],
    timeout: float = START_TIMEOUT_S,
    env: dict | None = None,
    attempts: int = 3,
) -> ServerProcess:
    """Start a server on a free port and wait (bounded) until `ready(port)` is true.

    Another process may grab the chosen port between the probe and the bind: such a
    start is retried on a new port. Any other failure raises ServerStartError with the
    server's log tail.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        port = free_port()
        log_path = log_dir / f"{name}-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv_for_port(port),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=log_dir,
                env=env,
            )
        server = ServerProcess(name, port, process, log_path)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if process.poll() is not None:
                tail = server.log_tail()
                if attempt < attempts and re.search(r"address already in use|errno 98", tail, re.IGNORECASE):
                    break  # lost the port race: try another port
                raise ServerStartError(
                    f"{name} exited with code {process.returncode} before answering on "
                    f"port {port}; log {log_path}:\n{tail}"
                )
            if port_open(port) and _safe_ready(ready, port):
                return server
            if time.monotonic() > deadline:
                server.stop()
                raise ServerStartError(
                    f"{name} did not answer on port {port} within {timeout:g} s; log {log_path}:\n{server.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
    raise ServerStartError(f"{name}: no free port after {attempts} attempts")


def _safe_ready(ready: Callable[[int], bool], port: int) -> bool:
    try:
        return bool(ready(port))
    except Exception:  # noqa: BLE001 - not ready yet
        return False


def _http(
    method: str, url: str, body: bytes | None = None, content_type: str | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    # Loopback only: never send test traffic through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# ---------------------------------------------------------------- MongoDB (nx-27017)


@dataclass
class MongoServer:
    server: ServerProcess
    host: str  # host:port

    @property
    def url(self) -> str:
        return f"mongodb://{self.host}/"

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def client(self, **kwargs):
        import pymongo

        kwargs.setdefault("serverSelectionTimeoutMS", 5000)
        return pymongo.MongoClient(self.url, **kwargs)

    def stop(self) -> None:
        self.server.stop()


def _mongo_ready(port: int) -> bool:
    import pymongo

    client = pymongo.MongoClient(f"mongodb://{LOOPBACK}:{port}/", serverSelectionTimeoutMS=1000, connectTimeoutMS=1000)
    try:
        return client.admin.command("ping").get("ok") == 1
    finally:
        client.close()


def start_mongo(log_dir: Path) -> MongoServer:
    binary = executable("nx-27017")
    server = start_process(
        "nx-27017",
        lambda port: [
            binary,
            "--db",
            "memory",
            "--host",
            LOOPBACK,
            "-p",
            str(port),
            "--log-file",
            str(log_dir / f"nx-27017-{port}.server.log"),
            "--pid-file",
            str(log_dir / f"nx-27017-{port}.pid"),
        ],
        log_dir,
        _mongo_ready,
    )
    return MongoServer(server, f"{LOOPBACK}:{server.port}")


# ---------------------------------------------------------------- MongoDB with a password


MONGO_TEST_USER = "sacred-writer"
MONGO_TEST_PASSWORD = "s3cret p@ss:/?#[]%"  # every character that needs URL escaping


class MongoAuthProxy:
    """A MongoDB front door with real SCRAM-SHA-256 authentication, in front of nx-27017
    (which has none). Everything but the handshake and authentication is relayed byte for
    byte; a connection that has not authenticated may only say hello/ping.

    pymongo talks to it like to a mongod with `--auth`: the right password works, a wrong
    one fails with OperationFailure code 18 (AuthenticationFailed), and no credentials at
    all gives code 13 (Unauthorized) on the first real command.
    """

    OPEN_COMMANDS = {"hello", "ismaster", "ping", "buildinfo", "endsessions", "getnonce"}
    ITERATIONS = 4096

    def __init__(self, upstream: tuple[str, int], user: str, password: str):
        import hashlib
        import hmac
        import socketserver
        import threading

        from pymongo.saslprep import saslprep

        self.upstream, self.user = upstream, user
        salt = os.urandom(16)
        salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode(), salt, self.ITERATIONS)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        self._salt = salt
        self._stored_key = hashlib.sha256(client_key).digest()
        self._server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.failures = 0  # authentication attempts refused, for tests
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((LOOPBACK, 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="mongo-auth-proxy", daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def url(self, user: str | None = None, password: str | None = None) -> str:
        from urllib.parse import quote_plus

        user = self.user if user is None else user
        password = MONGO_TEST_PASSWORD if password is None else password
        return f"mongodb://{quote_plus(user)}:{quote_plus(password)}@{self.host}/?authSource=admin"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- wire protocol ------------------------------------------------------------------

    @staticmethod
    def _read(sock) -> bytes | None:
        header = _recv_exact(sock, 16)
        if header is None:
            return None
        length = int.from_bytes(header[:4], "little")
        body = _recv_exact(sock, length - 16)
        return None if body is None else header + body

    @staticmethod
    def _command(message: bytes) -> tuple[int, dict | None, int]:
        """(opcode, the command document or None, OP_MSG flag bits)."""
        import bson

        opcode = int.from_bytes(message[12:16], "little")
        if opcode == 2013:  # OP_MSG: flagBits, then sections; kind 0 holds the command
            flags = int.from_bytes(message[16:20], "little")
            position = 20
            while position < len(message) - (4 if flags & 1 else 0):
                kind = message[position]
                size = int.from_bytes(message[position + 1 : position + 5], "little")
                if kind == 0:
                    return opcode, bson.decode(message[position + 1 : position + 1 + size]), flags
                position += 1 + size
            return opcode, None, flags
        if opcode == 2004:  # OP_QUERY (the first handshake): flags, cstring name, skip, limit, query
            end = message.index(b"\x00", 20)
            position = end + 1 + 8
            size = int.from_bytes(message[position : position + 4], "little")
            return opcode, bson.decode(message[position : position + size]), 0
        return opcode, None, 0

    @staticmethod
    def _reply(request: bytes, opcode: int, document: dict) -> bytes:
        import bson

        request_id = int.from_bytes(request[4:8], "little")
        payload = bson.encode(document)
        if opcode == 2004:
            body = (
                (0).to_bytes(4, "little")
                + (0).to_bytes(8, "little")
                + (0).to_bytes(4, "little")
                + (1).to_bytes(4, "little")
                + payload
            )
            reply_opcode = 1
        else:
            body = (0).to_bytes(4, "little") + b"\x00" + payload
            reply_opcode = 2013
        header = (
            (16 + len(body)).to_bytes(4, "little")
            + os.urandom(4)[:3]
            + b"\x00"
            + request_id.to_bytes(4, "little", signed=True)
            + reply_opcode.to_bytes(4, "little")
        )
        return header + body

    @staticmethod
    def _reply_document(reply: bytes) -> dict:
        import bson

        opcode = int.from_bytes(reply[12:16], "little")
        if opcode == 1:  # OP_REPLY: flags, cursorId, startingFrom, numberReturned, documents
            return bson.decode(reply[36 : 36 + int.from_bytes(reply[36:40], "little")])
        return MongoAuthProxy._command(reply)[1] or {}

    def _serve(self, client) -> None:
        upstream = socket.create_connection(self.upstream, timeout=30)
        state: dict = {"authenticated": False}
        try:
            while True:
                message = self._read(client)
                if message is None:
                    return
                opcode, command, flags = self._command(message)
                name = next(iter(command), "").lower() if command else ""
                if name in ("hello", "ismaster"):
                    upstream.sendall(message)
                    reply = self._read(upstream)
                    if reply is None:  # the real server closed the connection (it is shutting down)
                        return
                    answer = self._reply_document(reply)
                    if "saslSupportedMechs" in command:
                        answer["saslSupportedMechs"] = ["SCRAM-SHA-256"]
                    client.sendall(self._reply(message, opcode, answer))
                elif name in ("saslstart", "saslcontinue"):
                    client.sendall(self._reply(message, opcode, self._sasl(name, command, state)))
                elif name and not state["authenticated"] and name not in self.OPEN_COMMANDS:
                    client.sendall(
                        self._reply(
                            message,
                            opcode,
                            {
                                "ok": 0.0,
                                "code": 13,
                                "codeName": "Unauthorized",
                                "errmsg": f"command {next(iter(command))} requires authentication",
                            },
                        )
                    )
                else:
                    upstream.sendall(message)
                    if not flags & 2:  # moreToCome: the client expects no answer
                        reply = self._read(upstream)
                        if reply is None:
                            return
                        client.sendall(reply)
        except OSError:
            return
        finally:
            upstream.close()

    def _sasl(self, name: str, command: dict, state: dict) -> dict:
        import base64
        import hashlib
        import hmac

        refused = {"ok": 0.0, "code": 18, "codeName": "AuthenticationFailed", "errmsg": "Authentication failed."}
        payload = bytes(command.get("payload", b""))
        if name == "saslstart":
            if command.get("mechanism") != "SCRAM-SHA-256" or not payload.startswith(b"n,,"):
                self.failures += 1
                return refused
            first_bare = payload[3:]
            fields = dict(item.split(b"=", 1) for item in first_bare.split(b","))
            nonce = fields[b"r"] + base64.b64encode(os.urandom(18))
            server_first = (
                b"r=" + nonce + b",s=" + base64.b64encode(self._salt) + b",i=" + str(self.ITERATIONS).encode()
            )
            state.update(user=fields[b"n"].decode(), first_bare=first_bare, server_first=server_first, nonce=nonce)
            return {"ok": 1.0, "conversationId": 1, "done": False, "payload": server_first}
        if "first_bare" not in state:
            return refused
        if state.get("done"):
            return {"ok": 1.0, "conversationId": 1, "done": True, "payload": b""}
        without_proof, _, proof = payload.rpartition(b",p=")
        auth_message = b",".join((state["first_bare"], state["server_first"], without_proof))
        signature = hmac.new(self._stored_key, auth_message, hashlib.sha256).digest()
        try:
            client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature))
        except ValueError:
            client_key = b""
        if (
            state["user"] != self.user
            or not without_proof.endswith(b"r=" + state["nonce"])
            or not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._stored_key)
        ):
            self.failures += 1
            return refused
        state.update(authenticated=True, done=True)
        verifier = base64.b64encode(hmac.new(self._server_key, auth_message, hashlib.sha256).digest())
        return {"ok": 1.0, "conversationId": 1, "done": True, "payload": b"v=" + verifier}


def _recv_exact(sock, size: int) -> bytes | None:
    chunks, missing = [], size
    while missing:
        chunk = sock.recv(missing)
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- S3 (moto server)


@dataclass
class S3Server:
    server: ServerProcess
    endpoint: str
    bucket: str = TEST_BUCKET
    key_id: str = S3_TEST_KEY_ID
    secret: str = S3_TEST_SECRET

    def __str__(self) -> str:
        return self.endpoint

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def env(self) -> dict[str, str]:
        """Variables that point boto3 / s3fs at this server with its test keys."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
        }

    def create_bucket(self, name: str) -> None:
        status, body = _http("PUT", f"{self.endpoint}/{name}")
        if status not in (200, 409):
            raise RuntimeError(f"moto: creating bucket {name} gave HTTP {status}: {body[:200]!r}")

    def client(self, service: str = "s3", key_id: str | None = None, secret: str | None = None):
        """A boto3 client for this server with explicit keys (the environment is not read)."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key_id or self.key_id,
            aws_secret_access_key=secret or self.secret,
        )

    def create_access_key(self, policy: dict | None = None) -> tuple[str, str]:
        """A new IAM user's (key id, secret); with `policy`, attached inline. Call it
        before auth_enforced(): moto checks IAM calls too once enforcement is on."""
        iam = self.client("iam")
        user = f"user-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        if policy is not None:
            iam.put_user_policy(UserName=user, PolicyName="test", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextlib.contextmanager
    def auth_enforced(self) -> Iterator[None]:
        """Within the block moto checks signatures and IAM policies of every request."""
        self._set_auth("0")
        try:
            yield
        finally:
            self._set_auth("inf")

    def _set_auth(self, count: str) -> None:
        status, body = _http("POST", f"{self.endpoint}/moto-api/reset-auth", count.encode(), "text/plain")
        if status != 200:
            raise RuntimeError(f"moto: reset-auth gave HTTP {status}: {body[:200]!r}")

    def stop(self) -> None:
        self.server.stop()


ALLOW_ALL_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def _moto_ready(port: int) -> bool:
    status, _ = _http("GET", f"http://{LOOPBACK}:{port}/moto-api/data.json", timeout=2)
    return status == 200


def start_s3(log_dir: Path, bucket: str = TEST_BUCKET) -> S3Server:
    binary = executable("moto_server")
    server = start_process("moto_server", lambda port: [binary, "-H", LOOPBACK, "-p", str(port)], log_dir, _moto_ready)
    s3 = S3Server(server, f"http://{LOOPBACK}:{server.port}", bucket)
    try:
        s3.create_bucket(bucket)
    except Exception:
        s3.stop()
        raise
    return s3


# ---------------------------------------------------------------- GCS (gcp-storage-emulator)


@dataclass
class GCSServer:
    server: ServerProcess
    endpoint: str
    bucket: str = TEST_BUCKET

    def __str__(self) -> str:
        return self.endpoint

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def create_bucket(self, name: str) -> None:
        status, body = _http(
            "POST",
            f"{self.endpoint}/storage/v1/b?project=test",
            json.dumps({"name": name}).encode(),
            "application/json",
        )
        if status not in (200, 409):
            raise RuntimeError(f"gcp-storage-emulator: creating bucket {name} gave HTTP {status}: {body[:200]!r}")

    def stop(self) -> None:
        self.server.stop()


def _gcs_ready(port: int) -> bool:
    status, _ = _http("GET", f"http://{LOOPBACK}:{port}/storage/v1/b?project=test", timeout=2)
    return status == 200


def start_gcs(log_dir: Path, bucket: str = TEST_BUCKET) -> GCSServer:
    binary = executable("gcp-storage-emulator")
    server = start_process(
        "gcp-storage-emulator",
        lambda port: [binary, "start", "--host", LOOPBACK, "--port", str(port), "--in-memory"],
        log_dir,
        _gcs_ready,
    )
    gcs = GCSServer(server, f"http://{LOOPBACK}:{server.port}", bucket)
    try:
        gcs.create_bucket(bucket)
    except Exception:
        gcs.stop()
        raise
    return gcs


# ---------------------------------------------------------------- environments


def unique_database(request) -> str:
    """A MongoDB database name of its own for one test."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    return f"t_{name}_{uuid.uuid4().hex[:6]}"


def s3_variables(s3: S3Server) -> tuple[dict[str, str], tuple[str, ...]]:
    return s3.env(), _AWS_ISOLATION


def gcs_variables(gcs: GCSServer) -> tuple[dict[str, str], tuple[str, ...]]:
    return gcs.env(), ("GOOGLE_APPLICATION_CREDENTIALS",)


def mongo_variables(mongo: MongoServer, database: str) -> tuple[dict[str, str], tuple[str, ...]]:
    return {"SACRED_URL": mongo.url, "SACRED_DATABASE": database}, _SACRED_VARS


def mongo_auth_variables(
    proxy: MongoAuthProxy, database: str, password: str | None = None
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Separate variables (not a URL), so the code under test must URL-escape them itself."""
    return {
        "SACRED_HOST": proxy.host,
        "SACRED_USER": proxy.user,
        "SACRED_PASSWORD": MONGO_TEST_PASSWORD if password is None else password,
        "SACRED_DATABASE": database,
        "SACRED_AUTH_SOURCE": "admin",
    }, _SACRED_VARS


# ---------------------------------------------------------------- pytest fixtures


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory) -> Iterator[MongoServer]:
    server = start_mongo(tmp_path_factory.mktemp("mongo-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_auth_server(mongo_server) -> Iterator[MongoAuthProxy]:
    """nx-27017 behind a SCRAM-SHA-256 door: user MONGO_TEST_USER, password MONGO_TEST_PASSWORD."""
    proxy = MongoAuthProxy(("127.0.0.1", mongo_server.port), MONGO_TEST_USER, MONGO_TEST_PASSWORD)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    server = start_s3(tmp_path_factory.mktemp("s3-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[GCSServer]:
    server = start_gcs(tmp_path_factory.mktemp("gcs-server"))
    yield server
    server.stop()


def _apply(monkeypatch, variables: tuple[dict[str, str], tuple[str, ...]]) -> None:
    values, removed = variables
    for name in removed:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> S3Server:
    """This process talks to the moto server (test keys, endpoint); restored after the test."""
    _apply(monkeypatch, s3_variables(s3_server))
    return s3_server


@pytest.fixture
def gcs_env(gcs_server, monkeypatch) -> GCSServer:
    """This process talks to the GCS emulator (anonymous); restored after the test."""
    _apply(monkeypatch, gcs_variables(gcs_server))
    return gcs_server


@pytest.fixture
def mongo_env(mongo_server, monkeypatch, request) -> tuple[MongoServer, str]:
    """SACRED_URL / SACRED_DATABASE point at nx-27017 and a database of this test's own."""
    database = unique_database(request)
    _apply(monkeypatch, mongo_variables(mongo_server, database))
    return mongo_server, database


@pytest.fixture
def mongo_auth_env(mongo_auth_server, monkeypatch, request) -> tuple[MongoAuthProxy, str]:
    """SACRED_HOST / SACRED_USER / SACRED_PASSWORD / SACRED_DATABASE for the password-protected
    MongoDB (a database of this test's own)."""
    database = unique_database(request)
    _apply(monkeypatch, mongo_auth_variables(mongo_auth_server, database))
    return mongo_auth_server, database


@pytest.fixture
def server_env(request) -> Callable[..., dict[str, str]]:
    """server_env(s3=True, gcs=True, mongo=False, database=None) -> a full environment for a
    subprocess (os.environ plus the servers' variables); starts only what is asked for."""

    def make(
        *,
        s3: bool = True,
        gcs: bool = True,
        mongo: bool | str = False,
        database: str | None = None,
        mongo_password: str | None = None,
        **extra: str,
    ) -> dict[str, str]:
        """mongo=True: SACRED_URL of nx-27017 (no auth); mongo="auth": SACRED_HOST/USER/PASSWORD of the
        password-protected front door (mongo_password overrides the right password, to test a wrong one)."""
        env = dict(os.environ)
        chosen = []
        if s3:
            chosen.append(s3_variables(request.getfixturevalue("s3_server")))
        if gcs:
            chosen.append(gcs_variables(request.getfixturevalue("gcs_server")))
        if mongo == "auth":
            chosen.append(
                mongo_auth_variables(
                    request.getfixturevalue("mongo_auth_server"), database or unique_database(request), mongo_password
                )
            )
        elif mongo:
            chosen.append(
                mongo_variables(request.getfixturevalue("mongo_server"), database or unique_database(request))
            )
        for values, removed in chosen:
            for name in removed:
                env.pop(name, None)
            env.update(values)
        env.update({name: str(value) for name, value in extra.items()})
        return env

    return make
