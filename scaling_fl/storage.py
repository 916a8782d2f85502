"""Where files live: local paths, s3:// and gs://, configured by the standard environment.

A thin layer over fsspec's public API (``fs.info``, ``fs.cat_file``, ``fs.pipe_file``,
``fs.rm_file``, ``fs.open``...). The clients read their standard environment variables
themselves; this module only chooses timeouts and retries:

- ``s3://``: botocore reads the credentials (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, an instance role)
  and the endpoint (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``: MinIO, moto, Ceph),
  so a secret never passes through this module's objects. No region is forced.
- ``gs://``: gcsfs reads ``STORAGE_EMULATOR_HOST`` (an emulator, used anonymously);
  otherwise google-auth reads ``GOOGLE_APPLICATION_CREDENTIALS`` (a service-account or user
  JSON file), and without it gcsfs uses Application Default Credentials.
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` defaults to false here (the experimental
  layer stalls about 60 s per bucket against emulators); set it to true to opt in.

Every store fails fast alike: an endpoint that cannot be connected to is reported within
about 10 s (botocore's own retries for S3; for GCS, a short retry of failed connections in
place of gcsfs's ~35 s of backoff, the one private hook of this module, see
``_gcsfs_request_without_retries``).

Every failure becomes a ``StorageError`` (``StorageNotFoundError``, also a
FileNotFoundError, when something does not exist): one line naming the path, the cause
(missing object or bucket, permission, missing or rejected credentials, unreachable
endpoint) and the fix, with no secret in it. ``open_file`` is the exception: like
fsspec.open it raises native OSErrors, which ``describe_error`` explains. ``check_readable`` and ``check_writable``
answer within about ``CHECK_TIMEOUT_S`` seconds even when the endpoint never answers.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import re
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from types import SimpleNamespace
from urllib.parse import urlsplit

# Read by gcsfs when it is first imported: keep the experimental layer off unless asked for.
_GCS_EXPERIMENTAL_VAR = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"
os.environ.setdefault(_GCS_EXPERIMENTAL_VAR, "false")

import fsspec  # noqa: E402

from scaling_fl.errors import UserError  # noqa: E402

CHECK_TIMEOUT_S = 8.0  # a whole check_readable / check_writable, probe included
PROBE_TIMEOUT_S = 2.0  # TCP connect to an explicitly configured endpoint
CONNECT_TIMEOUT_S = 10  # ordinary S3 and GCS connections (botocore's default is 60, aiohttp's 30)
# GCS: pauses between attempts to connect (refused, unknown host, connect timeout) before the
# error is reported, about as long as botocore's own retries of S3 connections.
GCS_CONNECT_RETRY_PAUSES_S = (0.5, 1.0, 2.0)

S3_PROTOCOLS = ("s3", "s3a")
GCS_PROTOCOLS = ("gs", "gcs")
LOCAL_PROTOCOLS = ("file", "local")

# Environment variables whose values must never reach a message.
SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
# Variables the clients read themselves: a change means a fresh (cached) client.
_CLIENT_ENV_VARS = {
    "s3": SECRET_ENV_VARS
    + (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ),
    "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"),
}
_S3_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
}
_S3_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden", "403"}


PERMANENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class StorageError(RuntimeError, UserError):
    """One secret-free line: the path, what is wrong, and how to fix it."""

    permanent = False  # True when trying again cannot help (no space, permission, credentials)


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file, object or bucket does not exist (also caught by `except FileNotFoundError`)."""


# ---------------------------------------------------------------- paths


def protocol(path) -> str:
    """'file' for local paths, else the URL scheme ('s3', 'gs', ...)."""
    path = os.fspath(path)
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", path)
    return match.group(1).lower() if match else "file"


def is_remote(path) -> bool:
    return protocol(path) not in LOCAL_PROTOCOLS


def join(base, *parts: str) -> str:
    """Join path parts with '/' for URLs and os.path.join for local paths."""
    base = os.fspath(base)
    if not is_remote(base):
        return os.path.join(base, *parts)
    pieces = [base.rstrip("/")] + [str(part).strip("/") for part in parts if str(part).strip("/")]
    return "/".join(pieces)


def _url(fs, fs_path: str, proto: str) -> str:
    return fs_path if proto in LOCAL_PROTOCOLS else f"{proto}://{fs_path}"


# ---------------------------------------------------------------- options from the environment


def _env(env) -> dict:
    return os.environ if env is None else env


def s3_endpoint(env=None) -> str | None:
    """The S3 endpoint botocore will use from the environment (None: AWS itself); for messages."""
    env = _env(env)
    return (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "").strip() or None


def gcs_endpoint(env=None) -> str | None:
    """The GCS emulator gcsfs will use from STORAGE_EMULATOR_HOST (None: Google itself)."""
    host = (_env(env).get("STORAGE_EMULATOR_HOST") or "").strip()
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def storage_options(path, env=None, *, quick: bool = False) -> dict:
    """fsspec keyword arguments for `path`: timeouts, retries and the GCS token method; never
    a secret nor an endpoint (the clients read those from the environment themselves).

    `quick` is for pre-flight checks: short timeouts and a single attempt.
    """
    proto = protocol(path)
    env = _env(env)
    if proto in S3_PROTOCOLS:
        config = {"connect_timeout": CONNECT_TIMEOUT_S}
        if quick:
            config = {
                "connect_timeout": PROBE_TIMEOUT_S + 1,
                "read_timeout": CHECK_TIMEOUT_S,
                "retries": {"max_attempts": 1, "mode": "standard"},
            }
        return {"config_kwargs": config}
    if proto in GCS_PROTOCOLS:
        options = {"single_attempt": quick}
        if gcs_endpoint(env):
            options["token"] = "anon"  # emulators take no credentials
        elif (env.get("GOOGLE_APPLICATION_CREDENTIALS") or "").strip():
            options["token"] = "google_default"  # google-auth reads GOOGLE_APPLICATION_CREDENTIALS
        if quick:
            options["requests_timeout"] = CHECK_TIMEOUT_S
        return options
    return {}


def _environment_fingerprint(proto: str, env) -> str:
    """Distinguishes cached filesystems by what the clients read from the environment
    (credentials, endpoints), never stored in clear."""
    digest = hashlib.sha256()
    for name in _CLIENT_ENV_VARS["s3" if proto in S3_PROTOCOLS else "gs"]:
        digest.update(f"{name}={env.get(name, '')}\0".encode())
    return digest.hexdigest()


_cache: dict[tuple, object] = {}
_cache_lock = threading.Lock()


def filesystem(path, *, quick: bool = False):
    """(fs, fs_path) for `path`: a local path, s3://bucket/key or gs://bucket/key.

    Filesystems are cached per process, options and environment, so a changed
    environment (another endpoint, other keys) gets a fresh client.
    """
    path = os.fspath(path)
    proto = protocol(path)
    if proto in LOCAL_PROTOCOLS:
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), fsspec.core.strip_protocol(path)
    options = storage_options(path, quick=quick)
    if proto in GCS_PROTOCOLS:
        _check_google_credentials_file(path)
    if proto not in S3_PROTOCOLS + GCS_PROTOCOLS:
        return fsspec.core.url_to_fs(path)
    key = (os.getpid(), proto, quick, repr(sorted(options.items())), _environment_fingerprint(proto, os.environ))
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            try:
                fs = _new_filesystem(proto, options, quick)
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bad credentials file or endpoint URL
                raise StorageError(_explain_setup(path, exc)) from None
            _cache[key] = fs
    return fs, fsspec.core.strip_protocol(path)


def _new_filesystem(proto: str, options: dict, quick: bool):
    if proto in S3_PROTOCOLS:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        if quick:
            fs.retries = 1  # s3fs's own retry loop, on top of botocore's
        return fs
    if not quick:  # aiohttp's default per request (none at all through gcsfs) is to wait forever
        import aiohttp

        options = {**options, "requests_timeout": aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S)}
    return _gcs_class()(skip_instance_cache=True, **options)


def _check_google_credentials_file(path: str) -> None:
    if gcs_endpoint():
        return
    credentials = (os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or "").strip()
    if credentials and not os.path.isfile(credentials):
        raise StorageError(
            f"{path}: GOOGLE_APPLICATION_CREDENTIALS points to {credentials}, which is not a file; "
            "set it to a service-account JSON key file (or unset it to use default credentials)"
        )
    if credentials and not os.access(credentials, os.R_OK):
        raise StorageError(
            f"{path}: GOOGLE_APPLICATION_CREDENTIALS file {credentials} is not readable; fix its permissions"
        )


# ---------------------------------------------------------------- the one private hook: gcsfs's retries


def _gcsfs_request_without_retries():
    """gcsfs's ``GCSFileSystem._request`` without its retry decorator, or None.

    The only private use of a dependency in this module. gcsfs has no setting for its retries:
    every request is tried 6 times with exponential backoff, so an endpoint that refuses
    connections or a host name that does not resolve is reported after ~35 s (S3: ~5 s).
    ``test_gcsfs_private_retry_hook_is_still_there`` in tests/test_storage.py fails on a gcsfs
    that removes it; without it, gcsfs keeps its own retries and nothing else breaks.
    """
    import gcsfs.core

    raw = getattr(gcsfs.core.GCSFileSystem._request, "__wrapped__", None)
    return raw if asyncio.iscoroutinefunction(raw) else None


@functools.cache
def _gcs_class_for(experimental: bool):
    import gcsfs
    import gcsfs.core
    import gcsfs.retry

    base = gcsfs.GCSFileSystem if experimental else gcsfs.core.GCSFileSystem
    raw = _gcsfs_request_without_retries()
    never_connected = _error_types().never_connected

    class FailFastGCSFileSystem(base):
        """gcsfs whose failed connections are retried briefly (GCS_CONNECT_RETRY_PAUSES_S), and
        with ``single_attempt=True`` (pre-flight checks) not at all; every other error is
        retried by gcsfs as usual."""

        def __init__(self, *args, single_attempt: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.single_attempt = single_attempt

        async def _request(self, *args, **kwargs):
            if raw is None:
                return await super()._request(*args, **kwargs)
            pauses = iter(() if self.single_attempt else GCS_CONNECT_RETRY_PAUSES_S)
            while True:
                try:
                    return await raw(self, *args, **kwargs)
                except never_connected:  # nothing was sent: try again shortly, or report it
                    pause = next(pauses, None)
                    if pause is None:
                        raise
                    await asyncio.sleep(pause)
                except Exception as exc:  # gcsfs decides what it retries
                    if self.single_attempt or _http_status(exc) == 404 or not gcsfs.retry.is_retriable(exc):
                        raise
                    break
            return await super()._request(*args, **kwargs)

    name = "FailFastGCSFileSystem" + ("Experimental" if experimental else "")
    FailFastGCSFileSystem.__name__ = FailFastGCSFileSystem.__qualname__ = name
    FailFastGCSFileSystem.__module__ = __name__
    return FailFastGCSFileSystem


def _gcs_class():
    experimental = os.environ.get(_GCS_EXPERIMENTAL_VAR, "false").strip().lower() in ("true", "1")
    return _gcs_class_for(experimental)


def __getattr__(name: str):
    """The GCS filesystem classes are built on first use (importing gcsfs takes a second), and
    found here by pickle (an fsspec filesystem pickles as its class and options)."""
    if name in ("FailFastGCSFileSystem", "FailFastGCSFileSystemExperimental"):
        return _gcs_class_for(name.endswith("Experimental"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- everyday operations


def open_file(
    path, mode: str = "rb", *, encoding=None, errors=None, newline=None, compression=None, **open_kwargs
) -> fsspec.core.OpenFile:
    """An fsspec OpenFile, as fsspec.open(path, mode, ...) gives: a context manager, or call .open().

    Differences from fsspec.open: the filesystem is configured from the environment (see the
    module doc), local parent folders are created for writing, and gs:// reads use a plain
    read-ahead cache (gcsfs's default adaptive prefetcher is ~100x slower for line-by-line
    CSV reading). `open_kwargs` (block_size, cache_type...) go to fs.open. Errors are the
    native OSErrors (FileNotFoundError, PermissionError...); describe_error() explains one.
    """
    path = os.fspath(path)
    fs, fs_path = filesystem(path)
    writing = any(flag in mode for flag in "wax+")
    if writing and not is_remote(path):
        parent = os.path.dirname(fs_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
    if not writing and protocol(path) in GCS_PROTOCOLS:
        open_kwargs.setdefault("cache_type", "readahead")
    return _OpenFile(
        fs,
        fs_path,
        mode,
        compression=compression,
        encoding=encoding,
        errors=errors,
        newline=newline,
        open_kwargs=open_kwargs,
    )


class _OpenFile(fsspec.core.OpenFile):
    """fsspec's OpenFile, passing keyword arguments (cache_type, block_size) on to fs.open."""

    def __init__(self, fs, path, mode="rb", *, open_kwargs=None, **kwargs):
        super().__init__(fs, path, mode, **kwargs)
        self.open_kwargs = dict(open_kwargs or {})

    def __reduce__(self):
        return (
            _rebuild_open_file,
            (
                self.fs,
                self.path,
                self.mode,
                self.compression,
                self.encoding,
                self.errors,
                self.newline,
                self.open_kwargs,
            ),
        )

    def __enter__(self):
        import io

        from fsspec.compression import compr

        mode = self.mode.replace("t", "").replace("b", "") + "b"
        f = self.fs.open(self.path, mode=mode, **self.open_kwargs)
        self.fobjects = [f]
        if self.compression is not None:
            f = compr[self.compression](f, mode=mode[0])
            self.fobjects.append(f)
        if "b" not in self.mode:
            f = io.TextIOWrapper(f, encoding=self.encoding, errors=self.errors, newline=self.newline)
            self.fobjects.append(f)
        return self.fobjects[-1]


def _rebuild_open_file(fs, path, mode, compression, encoding, errors, newline, open_kwargs):
    return _OpenFile(
        fs,
        path,
        mode,
        compression=compression,
        encoding=encoding,
        errors=errors,
        newline=newline,
        open_kwargs=open_kwargs,
    )


def describe_error(path, exc: BaseException) -> str:
    """The one-line, secret-free explanation StorageError would carry for `exc` on `path`."""
    path = os.fspath(path)
    try:
        fs, fs_path = filesystem(path, quick=True) if is_remote(path) else (None, None)
    except StorageError as error:
        return str(error)
    return _explain(path, exc, fs=fs, fs_path=fs_path)


def exists(path) -> bool:
    fs, fs_path = filesystem(path)
    try:
        fs.invalidate_cache(fs_path)
        return bool(fs.exists(fs_path))
    except Exception as exc:  # noqa: BLE001 - explained in one line
        raise _storage_error(os.fspath(path), exc) from None


def read_bytes(path) -> bytes:
    fs, fs_path = filesystem(path)
    try:
        return fs.cat_file(fs_path)
    except Exception as exc:  # noqa: BLE001
        raise _storage_error(os.fspath(path), exc, fs=fs if is_remote(path) else None, fs_path=fs_path) from None


def list_dir(path) -> list[str]:
    """Sorted full paths (URLs for object stores) of the entries directly under `path`;
    [] when it does not exist. Object-store listings are never served from a cache."""
    path = os.fspath(path)
    fs, fs_path = filesystem(path)
    proto = protocol(path)
    try:
        fs.invalidate_cache(fs_path)
        if not fs.exists(fs_path):
            return []
        if proto in LOCAL_PROTOCOLS and not os.path.isdir(fs_path):
            return []
        entries = fs.ls(fs_path, detail=False)
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise _storage_error(path, exc) from None
    own = fs_path.rstrip("/")
    return sorted(_url(fs, entry.rstrip("/"), proto) for entry in entries if entry.rstrip("/") != own)


def remove_tree(path) -> None:
    """Delete a file or a directory (prefix) and all below it; a missing path is fine."""
    path = os.fspath(path)
    fs, fs_path = filesystem(path)
    try:
        fs.invalidate_cache(fs_path)
        if fs.exists(fs_path):
            fs.rm(fs_path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise _storage_error(path, exc) from None
    finally:
        fs.invalidate_cache(fs_path)


def put_tree(local_directory: str, path) -> str:
    """Copies a local folder's files (sub-folders included) to `path` (local, s3://, gs://); returns path."""
    path = os.fspath(path)
    fs, fs_path = filesystem(path)
    try:
        for folder, _, names in os.walk(local_directory):
            relative = os.path.relpath(folder, local_directory)
            for name in names:
                target = fs_path if relative == "." else f"{fs_path.rstrip('/')}/{relative}"
                fs.makedirs(target, exist_ok=True)
                fs.put_file(os.path.join(folder, name), f"{target.rstrip('/')}/{name}")
    except Exception as exc:  # noqa: BLE001
        raise _storage_error(path, exc) from None
    return path


def atomic_write_bytes(path, data) -> None:
    """Write `data` so that a reader sees either the old content or all of the new one.

    Local disks: a temporary file in the same folder, fsync, os.replace, fsync of the folder.
    Object stores: one PUT (or one multipart upload), which S3 and GCS make visible atomically.
    """
    path = os.fspath(path)
    data = bytes(data)
    if is_remote(path):
        fs, fs_path = filesystem(path)
        try:
            fs.pipe_file(fs_path, data)
        except Exception as exc:  # noqa: BLE001
            raise _storage_error(path, exc, fs=fs, fs_path=fs_path, writing=True) from None
        finally:
            fs.invalidate_cache(fs_path)
        return
    fs, target = filesystem(path)
    parent = os.path.dirname(target) or "."
    try:
        os.makedirs(parent, exist_ok=True)
        temp = os.path.join(parent, f".{os.path.basename(target)}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        fsync_dir(parent)
    except OSError as exc:
        raise _storage_error(path, exc, writing=True) from None


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


# ---------------------------------------------------------------- pre-flight checks


def check_readable(path, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise StorageError (one line) unless `path` (a file or a directory) can be read.

    Returns or raises within about `timeout_s` seconds, whatever the endpoint does.
    """
    path = os.fspath(path)
    if not is_remote(path):
        _check_local_readable(path)
        return
    deadline = _Deadline(timeout_s)
    _check_endpoint(path, deadline)
    fs, fs_path = _quick_filesystem(path, deadline)
    try:
        _within(deadline.left(), fs.info, fs_path)
    except Exception as exc:  # noqa: BLE001
        raise _storage_error(path, exc, fs=fs, fs_path=fs_path, deadline=deadline) from None


def check_writable(directory, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise StorageError unless files can be created (and deleted) under `directory`.

    A local directory is created if missing; on object stores the bucket must exist and a
    small probe object is written and deleted again. Bounded like check_readable.
    """
    directory = os.fspath(directory)
    if not is_remote(directory):
        _check_local_writable(directory)
        return
    deadline = _Deadline(timeout_s)
    _check_endpoint(directory, deadline)
    fs, fs_path = _quick_filesystem(directory, deadline)
    bucket = fs_path.split("/", 1)[0]
    probe = f"{fs_path.rstrip('/')}/.scaling-fl-write-check-{uuid.uuid4().hex[:12]}"
    progress = {"step": "bucket"}
    try:
        _within(deadline.left(), _write_and_delete, fs, bucket, probe, progress)
    except Exception as exc:  # noqa: BLE001
        raise _storage_error(
            directory,
            exc,
            fs=fs,
            fs_path=fs_path,
            deadline=deadline,
            writing=True,
            deleting=progress["step"] == "delete",
        ) from None
    finally:
        fs.invalidate_cache(fs_path)


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds

    def left(self, floor: float = 0.05) -> float:
        return max(floor, self.end - time.monotonic())


class _Overdue(TimeoutError):
    """A bounded call did not return in time."""


def _within(timeout_s: float, func, *args, **kwargs):
    """func(*args, **kwargs), given up on with _Overdue after `timeout_s` seconds.

    The call runs in a daemon thread that is left to finish on its own: the filesystems of
    pre-flight checks have short timeouts and a single attempt, so it does soon."""
    box: dict = {}

    def run():
        try:
            box["value"] = func(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    worker = threading.Thread(target=run, name="scaling-fl-storage-check", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise _Overdue(f"no answer within {timeout_s:.3g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _quick_filesystem(path: str, deadline: _Deadline):
    """filesystem(path, quick=True) within the deadline: finding Google default credentials
    can mean probing the GCE metadata server for 10+ s on a machine outside GCP."""
    try:
        return _within(deadline.left(), filesystem, path, quick=True)
    except _Overdue:
        raise StorageError(
            f"{path}: no credentials found within {deadline.seconds:g} s (looked for "
            f"{_credential_vars(path)}, default credentials and the cloud metadata server); "
            f"set {_credential_vars(path)}"
        ) from None
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(_explain_setup(path, exc)) from None


def _write_and_delete(fs, bucket: str, probe: str, progress: dict) -> None:
    fs.info(bucket)  # FileNotFoundError here means a missing bucket
    progress["step"] = "write"
    fs.pipe_file(probe, b"scaling-fl write check\n")
    progress["step"] = "delete"
    fs.rm_file(probe)
    progress["step"] = "done"


def _local_path(path: str) -> str:
    return fsspec.core.strip_protocol(path)


def _check_local_readable(path: str) -> None:
    local = _local_path(path)
    if not os.path.exists(local):
        parent = os.path.dirname(os.path.abspath(local))
        where = "" if os.path.isdir(parent) else f" (its folder {parent} does not exist either)"
        raise StorageNotFoundError(f"{path}: no such file or directory{where}; check the path")
    if not os.access(local, os.R_OK) or (os.path.isdir(local) and not os.access(local, os.X_OK)):
        raise StorageError(f"{path}: permission denied; make it readable for this user")


def _check_local_writable(directory: str) -> None:
    local = _local_path(directory)
    if os.path.exists(local) and not os.path.isdir(local):
        raise StorageError(f"{directory}: exists and is not a directory; choose a directory path")
    try:
        os.makedirs(local, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".scaling-fl-write-check-", dir=local)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _storage_error(directory, exc, writing=True) from None


def _endpoint_for(path: str) -> str | None:
    proto = protocol(path)
    if proto in S3_PROTOCOLS:
        return s3_endpoint()
    if proto in GCS_PROTOCOLS:
        return gcs_endpoint()
    return None


def _endpoint_var(path: str) -> str:
    proto = protocol(path)
    if proto in S3_PROTOCOLS:
        return "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    return "STORAGE_EMULATOR_HOST"


def _check_endpoint(path: str, deadline: _Deadline) -> None:
    """A fast TCP probe of an explicitly configured endpoint (skipped behind a proxy)."""
    endpoint = _endpoint_for(path)
    if not endpoint:
        return
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        raise StorageError(
            f"{path}: {_endpoint_var(path)}={safe_url(endpoint)} is not a URL; use the form http://host:port"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise StorageError(
            f"{path}: {_endpoint_var(path)}={safe_url(endpoint)} has a bad port; use the form http://host:port"
        ) from None
    if _behind_proxy(parts.scheme, host):
        return
    cause = None
    limit = min(PROBE_TIMEOUT_S, deadline.left())
    try:
        socket.create_connection((host, port), timeout=limit).close()
    except ConnectionRefusedError:
        cause = "connection refused"
    except socket.gaierror:
        cause = f"unknown host {host}"
    except TimeoutError:
        cause = f"no TCP answer within {limit:.3g} s"
    except OSError as exc:
        cause = exc.strerror or type(exc).__name__
    if cause:
        raise StorageError(
            f"{path}: endpoint {safe_url(endpoint)} is unreachable ({cause}); "
            f"check {_endpoint_var(path)} and that the server is up"
        )


def _behind_proxy(scheme: str, host: str) -> bool:
    proxies = urllib.request.getproxies()
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    try:
        return not urllib.request.proxy_bypass(host)
    except Exception:  # noqa: BLE001 - platform specific lookups
        return True


# ---------------------------------------------------------------- explaining failures
def safe_url(url: str) -> str:
    """The URL without user:password@ and without query string."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else redact(url)


_SIGNED_QUERY = re.compile(
    r"((?:X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId|"
    r"access_token|token|key)=)[^&\s\"']+",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """Remove credential values of the environment, URL user info and signed query strings."""
    text = _USERINFO.sub(r"\1***@", str(text))
    text = _SIGNED_QUERY.sub(r"\1***", text)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return redact(lines[0] if lines else type(exc).__name__)[:200]


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _types(module: str, *names: str) -> tuple[type, ...]:
    """Exception classes of `module`, if it has been imported: an error of a client that was
    never imported cannot occur, and a local-only run does not pay for importing them."""
    found = sys.modules.get(module)
    classes = (getattr(found, name, None) for name in names) if found is not None else ()
    return tuple(cls for cls in classes if isinstance(cls, type))


def _error_types() -> SimpleNamespace:
    """The exception types failures are told apart by (botocore, google-auth, aiohttp, gcsfs)."""
    return SimpleNamespace(
        no_credentials=_types("botocore.exceptions", "NoCredentialsError", "PartialCredentialsError")
        + _types("google.auth.exceptions", "DefaultCredentialsError"),
        token_refused=_types("google.auth.exceptions", "RefreshError"),
        token_unreachable=_types("google.auth.exceptions", "TransportError"),
        timeout=(TimeoutError,) + _types("botocore.exceptions", "ConnectTimeoutError", "ReadTimeoutError"),
        unreachable=(ConnectionRefusedError, socket.gaierror)
        + _types("botocore.exceptions", "EndpointConnectionError")
        + _types("aiohttp", "ClientOSError", "ServerDisconnectedError"),
        never_connected=_types("aiohttp", "ClientConnectorError", "ConnectionTimeoutError"),
        unknown_host=(socket.gaierror,) + _types("aiohttp", "ClientConnectorDNSError"),
        http_code=_types("gcsfs.retry", "HttpError") + _types("google.api_core.exceptions", "GoogleAPICallError"),
        http_status=_types("aiohttp", "ClientResponseError"),
    )


def _s3_code(exc: BaseException) -> str | None:
    """The error code of S3's answer (botocore's ClientError.response), e.g. 'NoSuchKey', '403'."""
    for item in _chain(exc):
        response = getattr(item, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
    return None


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of GCS's answer (gcsfs's HttpError, aiohttp's ClientResponseError)."""
    types = _error_types()
    for item in _chain(exc):
        status = (
            item.code
            if isinstance(item, types.http_code)
            else item.status
            if isinstance(item, types.http_status)
            else None
        )
        if isinstance(status, int):
            return status
    return None


_PERMANENT_KINDS = {"no-credentials", "token-refused", "rejected", "denied", "no-space", "read-only", "quota"}


def _kind(exc: BaseException, code: str | None = None, status: int | None = None) -> str:
    """What went wrong: the one place failures are classified, by the exception types in
    `exc`'s chain, the S3 error `code` and the HTTP `status` of the answer, and errno."""
    types = _error_types()
    chain = list(_chain(exc))

    def found(classes) -> bool:
        return bool(classes) and any(isinstance(item, classes) for item in chain)

    if found(types.no_credentials):
        return "no-credentials"
    if found(types.token_refused):
        return "token-refused"
    if found(types.token_unreachable):
        return "token-unreachable"
    if found(types.timeout):
        return "timeout"
    if found(types.unreachable):
        return "unreachable"
    if code in _S3_CREDENTIAL_CODES or status == 401:
        return "rejected"
    if code in _S3_DENIED_CODES or status == 403 or found(PermissionError):
        return "denied"
    if found(FileNotFoundError) or code in ("NoSuchBucket", "NoSuchKey", "404") or status == 404:
        return "missing"
    if found(IsADirectoryError):
        return "is-a-directory"
    if found(NotADirectoryError):
        return "not-a-directory"
    numbers = {getattr(item, "errno", None) for item in chain}
    for number, kind in ((errno.ENOSPC, "no-space"), (errno.EROFS, "read-only"), (errno.EDQUOT, "quota")):
        if number in numbers:
            return kind
    return "other"


def _s3_detail_code(fs, fs_path: str, deadline: _Deadline) -> str | None:
    """A HEAD request's error has no body, so S3 says only "403" (or "400"): read one byte
    instead, whose error body names the cause (InvalidAccessKeyId, AccessDenied...). For a
    bucket, one byte of an object that does not exist answers the same question."""
    bucket, _, key = fs_path.partition("/")
    target = fs_path if key else f"{bucket}/.scaling-fl-access-check-{uuid.uuid4().hex[:12]}"
    try:
        _within(deadline.left(floor=1.0), fs.cat_file, target, start=0, end=1)
    except Exception as exc:  # noqa: BLE001
        code = _s3_code(exc)
        return code if code in _S3_CREDENTIAL_CODES | _S3_DENIED_CODES else None
    return None


def _credential_vars(path: str) -> str:
    if protocol(path) in S3_PROTOCOLS:
        return "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary keys)"
    return "GOOGLE_APPLICATION_CREDENTIALS"


def _cause(exc: BaseException) -> str:
    """A short, secret-free cause: the innermost socket-level reason when there is one."""
    unknown_host = _error_types().unknown_host
    for item in _chain(exc):
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, unknown_host):
            return "host name not found"
        if isinstance(item, ConnectionResetError):
            return "connection reset"
    return f"{type(exc).__name__}: {first_line(exc)[:120]}"


def _is_missing(exc: BaseException) -> bool:
    return _kind(exc, _s3_code(exc), _http_status(exc)) == "missing"


def _is_permanent(exc: BaseException) -> bool:
    """Errors that trying again cannot fix: no space, no permission, a read-only disk, bad or missing credentials."""
    return _kind(exc, _s3_code(exc), _http_status(exc)) in _PERMANENT_KINDS


def _storage_error(path: str, exc: BaseException, **kwargs) -> StorageError:
    message = _explain(path, exc, **kwargs)
    kind = _kind(exc, _s3_code(exc), _http_status(exc))
    error = (StorageNotFoundError if kind == "missing" else StorageError)(message)
    error.permanent = kind in _PERMANENT_KINDS
    return error


def _explain_setup(path: str, exc: BaseException) -> str:
    """Creating the filesystem failed (bad credentials file, bad endpoint URL...)."""
    if protocol(path) in GCS_PROTOCOLS and not gcs_endpoint():
        credentials = (os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or "").strip()
        if credentials:
            return (
                f"{path}: GOOGLE_APPLICATION_CREDENTIALS file {credentials} holds no usable credentials "
                f"({type(exc).__name__}: {first_line(exc)[:80]}); use a service-account JSON key file "
                "or `gcloud auth application-default login`"
            )
    if protocol(path) in S3_PROTOCOLS and s3_endpoint() and isinstance(exc, ValueError):
        return f"{path}: {_endpoint_var(path)}={safe_url(s3_endpoint())} is not a valid URL; use http(s)://host:port"
    return _explain(path, exc)


def _explain(
    path: str,
    exc: BaseException,
    *,
    fs=None,
    fs_path: str | None = None,
    deadline: _Deadline | None = None,
    writing: bool = False,
    deleting: bool = False,
) -> str:
    """One line: path, cause, fix. With `fs`, may ask the store a follow-up question
    (does the bucket exist? which 403?) within what is left of `deadline`."""
    deadline = deadline or _Deadline(CHECK_TIMEOUT_S)
    remote = is_remote(path)
    endpoint = _endpoint_for(path)
    where = f" at {safe_url(endpoint)}" if endpoint else ""
    endpoint_fix = (
        f"check {_endpoint_var(path)} and that the server is up"
        if endpoint
        else "check the network (proxy, firewall, DNS)"
    )
    action = "delete" if deleting else ("write" if writing else "read")
    code, status = _s3_code(exc), _http_status(exc)
    if code in ("403", "400") and protocol(path) in S3_PROTOCOLS and fs is not None and fs_path:
        code = _s3_detail_code(fs, fs_path, deadline) or code
    kind = _kind(exc, code, status)

    if kind == "no-credentials":
        return f"{path}: no credentials found; set {_credential_vars(path)}"
    if kind in ("token-refused", "token-unreachable"):  # google-auth could not get an access token
        return (
            f"{path}: could not get an access token with the configured credentials ({_cause(exc)}); "
            f"check {_credential_vars(path)}"
        )
    if kind == "timeout":
        return f"{path}: no answer from the storage service{where} within {deadline.seconds:g} s; {endpoint_fix}"
    if kind == "unreachable":
        return f"{path}: the storage service{where} is unreachable ({_cause(exc)}); {endpoint_fix}"
    if kind == "rejected":
        return f"{path}: the credentials were rejected ({code or 'HTTP 401'}); check {_credential_vars(path)}"
    if kind == "denied" and remote:
        return (
            f"{path}: access denied ({code or status or 'permission'}); the credentials in "
            f"{_credential_vars(path)} need permission to {action} it"
        )
    if kind == "denied":
        return f"{path}: permission denied; make it {'writable' if writing else 'readable'} for this user"
    if kind == "missing":
        if remote and fs is not None and fs_path is not None:
            return _explain_missing(path, fs, fs_path, deadline, writing)
        if code == "NoSuchBucket":
            return f"{path}: the bucket does not exist{where}; check the bucket name"
        return f"{path}: no such file or directory; check the path"
    if kind == "is-a-directory":
        return f"{path}: is a directory; give a file path"
    if kind == "not-a-directory":
        return f"{path}: a parent of this path is a file, not a directory; choose another path"
    if kind == "no-space":
        return f"{path}: no space left on the device; free space or choose another location"
    if kind == "read-only":
        return f"{path}: read-only file system; choose a writable location"
    if kind == "quota":
        return f"{path}: disk quota exceeded; free space or choose another location"
    return f"{path}: cannot {action} ({_cause(exc)}); check the path and the storage credentials"


def _explain_missing(path: str, fs, fs_path: str, deadline: _Deadline, writing: bool) -> str:
    bucket = fs_path.split("/", 1)[0]
    endpoint = _endpoint_for(path)
    where = f" at {safe_url(endpoint)}" if endpoint else ""
    bucket_exists = None
    try:
        _within(deadline.left(floor=1.0), fs.info, bucket)
        bucket_exists = True
    except FileNotFoundError:
        bucket_exists = False
    except Exception:  # noqa: BLE001 - fall back to the plain message
        pass
    if bucket_exists is False:
        fix = "check the bucket name" + (f" and {_endpoint_var(path)}" if endpoint else "")
        if writing:
            fix = f"create the bucket, or {fix}"
        return f"{path}: bucket '{bucket}' does not exist{where}; {fix}"
    return f"{path}: no such object in bucket '{bucket}'; check the path"
