"""Storage on local disks, S3 (moto server) and GCS (emulator): data, atomic writes, clear errors."""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from scaling_fl import storage
from scaling_fl.data import load_task
from scaling_fl.errors import UserError
from scaling_fl.storage import StorageError, StorageNotFoundError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AGNEWS = SHARED_DATA / "agnews"
CHECK_LIMIT_S = 10.0  # what a user may wait for a pre-flight answer


@pytest.fixture
def agnews_files():
    assert (AGNEWS / "train.csv").exists(), f"the shared AG News sample is missing at {AGNEWS}"
    return AGNEWS / "train.csv", AGNEWS / "test.csv"


@pytest.fixture(params=["local", "s3", "gs"])
def base(request, tmp_path) -> str:
    """A fresh, empty location on each backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue(f"{'gcs' if request.param == 'gs' else 's3'}_env")
    return f"{request.param}://{server.bucket}/{uuid.uuid4().hex[:10]}"


def one_line_error(call) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        call()
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message
    return message, elapsed


# ---------------------------------------------------------------- data through the task readers


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_agnews_read_from_object_store_equals_local(scheme, request, agnews_files):
    server = request.getfixturevalue("gcs_env" if scheme == "gs" else "s3_env")
    prefix = f"{scheme}://{server.bucket}/agnews-{uuid.uuid4().hex[:8]}"
    for local in agnews_files:
        storage.atomic_write_bytes(f"{prefix}/{local.name}", local.read_bytes())

    local_train, local_test = load_task("agnews", str(agnews_files[0]), str(agnews_files[1]))
    remote_train, remote_test = load_task("agnews", f"{prefix}/train.csv", f"{prefix}/test.csv")

    for local, remote in ((local_train, remote_train), (local_test, remote_test)):
        assert remote.texts == local.texts
        assert remote.labels.tolist() == local.labels.tolist()
        assert remote.label_names == local.label_names
    assert len(remote_train.texts) == 581 and len(remote_test.texts) == 7600
    assert remote_train.source == f"{prefix}/train.csv"
    with storage.open_file(f"{prefix}/train.csv", "rb") as handle:
        assert handle.read() == agnews_files[0].read_bytes()


# ---------------------------------------------------------------- everyday operations


def test_atomic_write_list_exists_remove(base):
    first = storage.join(base, "ckpt-1", "model.safetensors")
    second = storage.join(base, "ckpt-2", "state.json")
    assert not storage.exists(first)
    assert storage.list_dir(base) == []

    storage.atomic_write_bytes(first, b"old")
    storage.atomic_write_bytes(first, b"new content")  # overwrite
    storage.atomic_write_bytes(second, json.dumps({"round": 2}).encode())

    assert storage.exists(first)
    assert storage.read_bytes(first) == b"new content"
    with storage.open_file(second, "rb") as handle:
        assert json.load(handle) == {"round": 2}
    assert storage.list_dir(base) == [storage.join(base, "ckpt-1"), storage.join(base, "ckpt-2")]
    assert storage.list_dir(storage.join(base, "ckpt-1")) == [first]
    storage.check_readable(first)
    storage.check_readable(storage.join(base, "ckpt-1"))  # a directory / prefix is readable too
    storage.check_writable(base)
    assert storage.list_dir(base) == [storage.join(base, "ckpt-1"), storage.join(base, "ckpt-2")]  # probe gone

    storage.remove_tree(storage.join(base, "ckpt-1"))
    assert not storage.exists(first)
    assert storage.list_dir(base) == [storage.join(base, "ckpt-2")]
    storage.remove_tree(storage.join(base, "never-existed"))  # a missing path is fine


def test_local_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "a" / "checkpoint.json"
    storage.atomic_write_bytes(target, b"complete old")

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    message, _ = one_line_error(lambda: storage.atomic_write_bytes(target, b"new"))
    assert str(target) in message and "no space left" in message
    monkeypatch.undo()
    assert target.read_bytes() == b"complete old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint.json"]  # no temp file left


def test_local_errors(tmp_path):
    missing = tmp_path / "nope" / "train.csv"
    message, _ = one_line_error(lambda: storage.check_readable(missing))
    assert message.startswith(str(missing)) and "no such file" in message
    a_file = tmp_path / "file"
    a_file.write_text("x")
    message, _ = one_line_error(lambda: storage.check_writable(a_file))
    assert "not a directory" in message
    storage.check_writable(tmp_path / "new" / "dir")  # created on demand
    assert (tmp_path / "new" / "dir").is_dir()


# ---------------------------------------------------------------- clear errors from object stores


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_missing_object_and_missing_bucket(scheme, request):
    server = request.getfixturevalue("gcs_env" if scheme == "gs" else "s3_env")
    variable = "STORAGE_EMULATOR_HOST" if scheme == "gs" else "AWS_ENDPOINT_URL"

    path = f"{scheme}://{server.bucket}/no/such/train.csv"
    with pytest.raises(FileNotFoundError):  # StorageNotFoundError is both
        storage.read_bytes(path)
    message, elapsed = one_line_error(lambda: storage.check_readable(path))
    assert message.startswith(path) and f"no such object in bucket '{server.bucket}'" in message
    assert elapsed < CHECK_LIMIT_S

    path = f"{scheme}://no-such-bucket-{uuid.uuid4().hex[:6]}/train.csv"
    message, _ = one_line_error(lambda: storage.check_readable(path))
    assert "bucket" in message and "does not exist" in message and variable in message
    message, _ = one_line_error(lambda: storage.check_writable(path.rsplit("/", 1)[0] + "/ckpts"))
    assert "create the bucket" in message
    message, _ = one_line_error(lambda: storage.atomic_write_bytes(path, b"x"))
    assert "does not exist" in message


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_refused_endpoint_fails_at_once(scheme, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if scheme == "s3":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    else:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{port}")
    path = f"{scheme}://bucket/train.csv"
    message, elapsed = one_line_error(lambda: storage.check_readable(path))
    assert f"127.0.0.1:{port}" in message and "connection refused" in message
    assert elapsed < 3


def closed_port() -> int:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_everyday_gs_operations_report_an_unreachable_endpoint_within_10_s(monkeypatch):
    """gcsfs alone retries a refused connection for ~35 s; S3 (botocore) gives up after ~5."""
    port = closed_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"127.0.0.1:{port}")
    path = "gs://bucket/dir/train.csv"
    for call in (
        lambda: storage.read_bytes(path),
        lambda: storage.atomic_write_bytes(path, b"x"),
        lambda: storage.list_dir("gs://bucket/dir"),
    ):
        message, elapsed = one_line_error(call)
        assert f"the storage service at http://127.0.0.1:{port} is unreachable (connection refused)" in message
        assert "check STORAGE_EMULATOR_HOST" in message
        assert elapsed < CHECK_LIMIT_S


def test_gcsfs_private_retry_hook_is_still_there(gcs_env, monkeypatch):
    """storage.py's one private use of a dependency: gcsfs's GCSFileSystem._request, with its
    retry decorator's __wrapped__, through which every request of gcsfs goes. If this fails
    after a gcsfs upgrade, gs:// errors still work but an unreachable endpoint takes ~35 s
    again: find gcsfs's new way to bound its retries and update _gcsfs_request_without_retries."""
    import gcsfs.core

    raw = storage._gcsfs_request_without_retries()
    assert raw is not None and raw is gcsfs.core.GCSFileSystem._request.__wrapped__
    assert list(inspect.signature(raw).parameters)[:3] == ["self", "method", "path"]

    fs, fs_path = storage.filesystem(f"gs://{gcs_env.bucket}/hook-check.txt")
    assert isinstance(fs, gcsfs.core.GCSFileSystem) and "_request" in vars(type(fs))
    requests = []
    original = fs._request

    async def counting(*args, **kwargs):
        requests.append(args[:2])
        return await original(*args, **kwargs)

    monkeypatch.setattr(fs, "_request", counting)
    fs.pipe_file(fs_path, b"ok")
    assert fs.cat_file(fs_path) == b"ok"
    assert len(requests) >= 2  # the public API still goes through _request

    quick, _ = storage.filesystem(f"gs://{gcs_env.bucket}/hook-check.txt", quick=True)
    copy = pickle.loads(pickle.dumps(quick))  # readers' files travel to DataLoader workers
    assert type(copy) is type(quick) and copy.single_attempt is True and not fs.single_attempt


def test_storage_errors_are_user_errors():
    assert issubclass(StorageError, UserError) and issubclass(StorageError, RuntimeError)
    assert issubclass(StorageNotFoundError, UserError) and issubclass(StorageNotFoundError, FileNotFoundError)


def _client_errors():
    import aiohttp
    import botocore.exceptions
    import google.auth.exceptions
    from gcsfs.retry import HttpError

    def s3(code):
        return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "x"}}, "GetObject")

    def chained(outer, inner):
        outer.__cause__ = inner
        return outer

    dns = chained(aiohttp.ClientConnectorDNSError(None, OSError("x")), socket.gaierror(-2, "Name or service not known"))
    return [
        ("s3", botocore.exceptions.NoCredentialsError(), "no credentials found", True),
        ("s3", botocore.exceptions.PartialCredentialsError(provider="env", cred_var="x"), "no credentials", True),
        ("gs", google.auth.exceptions.DefaultCredentialsError("x"), "no credentials found", True),
        ("gs", google.auth.exceptions.RefreshError("x"), "could not get an access token", True),
        ("gs", google.auth.exceptions.TransportError("x"), "could not get an access token", False),
        ("s3", chained(PermissionError("denied"), s3("InvalidAccessKeyId")), "rejected (InvalidAccessKeyId)", True),
        ("s3", chained(PermissionError("denied"), s3("AccessDenied")), "access denied (AccessDenied)", True),
        ("gs", HttpError({"code": 401, "message": "x"}), "rejected (HTTP 401)", True),
        ("gs", HttpError({"code": 403, "message": "x"}), "access denied (403)", True),
        ("gs", dns, "unreachable (host name not found)", False),
        ("gs", aiohttp.ServerDisconnectedError(), "unreachable", False),
        ("s3", botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), "unreachable", False),
        ("s3", botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), "no answer", False),
        ("gs", TimeoutError(), "no answer", False),
        ("s3", chained(FileNotFoundError("x"), s3("NoSuchBucket")), "the bucket does not exist", False),
        ("gs", HttpError({"code": 503, "message": "x"}), "cannot read", False),
        ("file", OSError(errno.ENOSPC, "full"), "no space left", True),
        ("file", OSError(errno.EROFS, "ro"), "read-only file system", True),
        ("file", OSError(errno.ECONNRESET, "reset"), "cannot read (connection reset)", False),
    ]


def test_errors_are_explained_by_their_types_and_status_codes():
    for scheme, error, expected, permanent in _client_errors():
        path = "/tmp/x/model.bin" if scheme == "file" else f"{scheme}://bucket/model.bin"
        stored = storage._storage_error(path, error)
        assert str(stored).startswith(path + ": ") and expected in str(stored), (error, str(stored))
        assert stored.permanent is permanent, (error, str(stored))
        assert isinstance(stored, StorageNotFoundError) is ("does not exist" in expected)


@pytest.mark.parametrize("scheme, timeout_s", [("s3", None), ("gs", 3.0)])
def test_silent_endpoint_fails_within_the_deadline(scheme, timeout_s, monkeypatch):
    """A server that accepts connections but never answers (the hard case) is given up on in time."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        if scheme == "s3":
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        else:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        kwargs = {"timeout_s": timeout_s} if timeout_s else {}
        message, elapsed = one_line_error(lambda: storage.check_readable(f"{scheme}://bucket/x.csv", **kwargs))
    assert "no answer" in message and endpoint in message
    assert elapsed < (timeout_s + 1 if timeout_s else CHECK_LIMIT_S)


def test_s3_bad_missing_and_insufficient_credentials(s3_env, monkeypatch, caplog):
    s3 = s3_env
    storage.atomic_write_bytes(f"s3://{s3.bucket}/creds/train.csv", b"1,a,b\n")
    path = f"s3://{s3.bucket}/creds/train.csv"
    reader_id, reader_secret = s3.create_access_key(policy=None)  # valid, but allowed nothing
    admin_id, admin_secret = s3.create_access_key(
        policy={"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    )
    caplog.set_level(logging.INFO)
    secrets = []
    with s3.auth_enforced():
        cases = [
            ((admin_id, "wrong-" + admin_secret[:20]), "credentials were rejected (SignatureDoesNotMatch)"),
            (("AKIA" + "X" * 16, "no-such-key-secret-0123456789"), "credentials were rejected (InvalidAccessKeyId)"),
            ((reader_id, reader_secret), "access denied (AccessDenied)"),
        ]
        for (key_id, secret), expected in cases:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            secrets.append(secret)
            message, elapsed = one_line_error(lambda: storage.check_readable(path))
            assert message.startswith(path) and expected in message and "AWS_SECRET_ACCESS_KEY" in message
            assert elapsed < CHECK_LIMIT_S
            assert secret not in message and key_id not in message
        message, _ = one_line_error(lambda: storage.check_writable(f"s3://{s3.bucket}/ckpts"))
        assert "access denied" in message and "write" in message

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", admin_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", admin_secret)
        secrets.append(admin_secret)
        storage.check_readable(path)  # the right keys work with enforcement on
        storage.check_writable(f"s3://{s3.bucket}/ckpts")
        fs, _ = storage.filesystem(path)
        assert admin_secret not in repr(fs) and admin_secret not in repr(fs.storage_options)

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message, _ = one_line_error(lambda: storage.check_readable(path))
    assert "no credentials found" in message and "AWS_ACCESS_KEY_ID" in message
    for secret in secrets:
        assert secret not in caplog.text


def test_gcs_credentials_file_problems(tmp_path, monkeypatch, gcs_server):
    """Without the emulator, GOOGLE_APPLICATION_CREDENTIALS is what counts."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    path = "gs://some-bucket/train.csv"

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    message, _ = one_line_error(lambda: storage.check_readable(path))
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message and "missing.json" in message and "not a file" in message

    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(broken))
    message, _ = one_line_error(lambda: storage.check_readable(path))
    assert "no usable credentials" in message

    # A well-formed service account whose token server rejects it (the emulator answers 4xx).
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    account = tmp_path / "service-account.json"
    account.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test",
                "private_key_id": "k1",
                "private_key": private_key,
                "client_email": "sa@test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"{gcs_server.endpoint}/token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(account))
    message, elapsed = one_line_error(lambda: storage.check_readable(path))
    assert "could not get an access token" in message and elapsed < CHECK_LIMIT_S
    assert "PRIVATE KEY" not in message and private_key[40:80] not in message


def test_messages_and_logs_hold_no_secret(s3_env, monkeypatch, caplog):
    secret = "Sup3r-Secret-" + uuid.uuid4().hex
    token = "Sess10n-Token-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:{secret}@127.0.0.1:1/")
    caplog.set_level(logging.DEBUG, logger="scaling_fl")
    caplog.set_level(logging.INFO)
    texts = []
    for call in (
        lambda: storage.check_readable("s3://b/k"),
        lambda: storage.check_writable("s3://b/d"),
        lambda: storage.atomic_write_bytes("s3://b/k", b"x"),
    ):
        with pytest.raises(StorageError) as caught:
            call()
        texts += [str(caught.value), repr(caught.value)]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    storage.atomic_write_bytes(f"s3://{s3_env.bucket}/secret-check", b"ok")  # moto ignores the keys
    fs, _ = storage.filesystem(f"s3://{s3_env.bucket}/secret-check")
    texts += [repr(fs), repr(fs.storage_options), repr(storage.storage_options("s3://b/k")), caplog.text]
    assert "http://127.0.0.1:1" in texts[0] and "user" not in texts[0]  # user info dropped from the endpoint
    for text in texts:
        assert secret not in text and token not in text
    assert (
        storage.redact(f"https://x/?X-Amz-Signature=abc&X-Amz-Credential={secret}")
        == "https://x/?X-Amz-Signature=***&X-Amz-Credential=***"
    )


def test_server_env_points_a_subprocess_at_the_servers(server_env, s3_server, gcs_server):
    """The env dict of server_env() is all a subprocess needs to reach both object stores."""
    code = (
        "from scaling_fl import storage\n"
        f"for base in ('s3://{s3_server.bucket}', 'gs://{gcs_server.bucket}'):\n"
        "    storage.atomic_write_bytes(base + '/subprocess/ok.txt', b'ok')\n"
        "    assert storage.read_bytes(base + '/subprocess/ok.txt') == b'ok'\n"
        "    storage.check_readable(base + '/subprocess/ok.txt')\n"
        "print('done')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=server_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]
