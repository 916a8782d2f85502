"""One live run per job: an atomic claim on a job name, held by a renewed lease.

Two launchers started with the same ``job_name`` must never both run. Before it creates any
run record, the launcher *acquires* a claim on the job in every place the run writes to (the
tracking store, the checkpoints folder), *renews* its lease while it runs and *releases* it
when it exits. A claim whose lease expired (its launcher died without releasing it) is taken
over by the next start.

Why generation records instead of one lock file: object stores have no rename and no
compare-and-swap on a file's content, but S3, GCS, local disks and MongoDB all have an
*exclusive create* ("create this name only if it does not exist"). A claim is therefore a
sequence of records ``claim-000001.json``, ``claim-000002.json``, ... (MongoDB: documents
``{_id: "<job>/000001", job: <job>, ...}`` in ``scaling_fl_claims``); the record with the
highest generation is the current claim. Taking a claim = exclusively creating the next
generation, so of two launchers that saw the same current claim only one can create its
successor. No record is ever read, modified and written back by anyone but its owner, and a
generation number is never reused (released records stay; only older generations are deleted).

Exclusive create per backend (all public APIs):

- local disk: the record is written to a temporary file and hard-linked to its final name;
  ``os.link`` fails atomically when the name exists, and readers never see a half-written
  record. Filesystems without hard links fall back to ``os.open(O_CREAT | O_EXCL)``.
- S3: ``fs.pipe_file(path, data, mode="create")`` of s3fs, a PutObject with ``If-None-Match: *``
  (s3fs raises FileExistsError on 412; a 409 ConditionalRequestConflict, a concurrent
  conditional write, also counts as taken). moto's server honours the condition.
- GCS: ``fs.pipe_file(path, data, mode="create")`` of gcsfs, an upload with
  ``ifGenerationMatch=0`` (gcsfs raises FileExistsError on 412). gcp-storage-emulator, the
  test server, IGNORES ifGenerationMatch and overwrites; see below.
- MongoDB: ``insert_one`` with the generation in ``_id`` (DuplicateKeyError = taken).

Stores that ignore the condition (emulators, old S3-compatible servers) are detected once per
bucket and process by a probe (create the same object twice); for them, and as a cheap extra
check everywhere, a new generation is read back after its creation and kept only if it still
holds our owner id. On a store that ignores conditions we wait ``UNCONDITIONAL_SETTLE_S``
before that read-back, so that every contender that saw the same old claim has written by then
and the last writer (the only one that reads back its own record) is the one that wins: safe
as long as a contender's read-to-write time stays under that delay.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from scaling_fl import storage
from scaling_fl.errors import UserError
from scaling_fl.processes import pid_alive, process_start_time

log = logging.getLogger("scaling_fl")

DEFAULT_LEASE_S = 30.0  # a launcher that stops renewing loses its claim after this long
DEFAULT_RENEW_INTERVAL_S = 5.0  # renewing six times per lease survives a few failed renewals
MONGO_COLLECTION = "scaling_fl_claims"
# Wait before the read-back on a store that ignores exclusive creates: 1 s let two of eight contenders
# win on a loaded 2-core CI machine (a read-to-write time over 1 s); 3 s leaves room.
UNCONDITIONAL_SETTLE_S = 3.0

_RECORD_NAME = re.compile(r"^claim-(\d+)\.json$")


class ClaimRefused(UserError, RuntimeError):
    """Another launcher holds the job: one line saying who, since when, and what to do."""


# ---------------------------------------------------------------- this process


def _pid_namespace() -> str | None:
    """The pid namespace of this process ("pid:[4026531836]"), or None where unknown.

    A launcher in a container that shares the host's hostname (``--network host``) sees other
    pids than the host: pids are only compared between records of the same namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _when(timestamp) -> str:
    """Local time HH:MM:SS, with the date in front when it is not today."""
    try:
        moment = time.localtime(float(timestamp))
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"
    if time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", moment)
    return time.strftime("%Y-%m-%d %H:%M:%S", moment)


# ---------------------------------------------------------------- where the records live


class _Store(Protocol):
    """Generation records of one job in one place. `create` is the only primitive that must
    be atomic; everything else is a plain read, overwrite or delete."""

    location: str  # printable, without secrets
    settle_s: float  # wait between an exclusive create and its read-back (0 where creates are exclusive)

    def generations(self) -> list[int]: ...  # sorted ascending
    def read(self, generation: int) -> dict | None: ...  # None when it does not exist
    def create(self, generation: int, record: dict) -> bool: ...  # False when it already exists
    def overwrite(self, generation: int, record: dict) -> None: ...
    def delete(self, generation: int) -> None: ...


class UnreadableClaim(ValueError):
    """A claim record exists but is not a JSON object (written by hand, or damaged)."""


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _decode(data: bytes, where: str) -> dict:
    try:
        record = json.loads(data)
    except ValueError as exc:
        raise UnreadableClaim(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise UnreadableClaim(f"{where} is not a JSON object")
    return record


class _DirectoryStore:
    """Records as files ``claim-NNNNNN.json`` in a local folder, s3://bucket/prefix or gs://bucket/prefix."""

    def __init__(self, url: str):
        self.url = os.fspath(url).rstrip("/") or "/"
        self.remote = storage.is_remote(self.url)
        self.location = storage.safe_url(self.url) if self.remote else self.url
        self.settle_s = 0.0

    def _path(self, generation: int) -> str:
        return storage.join(self.url, f"claim-{generation:06d}.json")

    def generations(self) -> list[int]:
        found = []
        for entry in storage.list_dir(self.url):
            match = _RECORD_NAME.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def read(self, generation: int) -> dict | None:
        path = self._path(generation)
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:  # StorageNotFoundError: deleted since it was listed
            return None
        return _decode(data, path)

    def create(self, generation: int, record: dict) -> bool:
        path = self._path(generation)
        data = _encode(record)
        if not self.remote:
            return _create_local_file(path, data)
        fs, fs_path = storage.filesystem(path)
        if not _refuses_overwrite(fs, self.url):
            self.settle_s = UNCONDITIONAL_SETTLE_S
        return _create_object(fs, fs_path, path, data)

    def overwrite(self, generation: int, record: dict) -> None:
        storage.atomic_write_bytes(self._path(generation), _encode(record))

    def delete(self, generation: int) -> None:
        path = self._path(generation)
        fs, fs_path = storage.filesystem(path)
        try:
            fs.rm_file(fs_path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - one line, no secret
            raise storage.StorageError(storage.describe_error(path, exc)) from None
        finally:
            fs.invalidate_cache(fs_path)


def _create_local_file(path: str, data: bytes) -> bool:
    """Create `path` holding `data` only if it does not exist; False if it does.

    The data goes to a temporary file first, which is then hard-linked to `path`: the link
    fails atomically if `path` exists (also on NFS), and a reader never sees an empty or
    half-written record, nor does a crash leave one behind."""
    directory = os.path.dirname(path) or "."
    temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                raise
            return _create_local_file_without_links(path, data)
    except OSError as exc:
        raise storage.StorageError(storage.describe_error(path, exc)) from None
    finally:
        try:
            os.unlink(temp)
        except OSError:
            pass
    storage.fsync_dir(directory)
    return True


def _create_local_file_without_links(path: str, data: bytes) -> bool:
    """O_CREAT | O_EXCL for filesystems without hard links (vfat, some FUSE mounts)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _create_object(fs, fs_path: str, url: str, data: bytes) -> bool:
    """Exclusive create of one object through fsspec's public ``pipe_file(..., mode="create")``:
    s3fs sends ``If-None-Match: *``, gcsfs ``ifGenerationMatch=0``; both raise FileExistsError
    when the object exists. False when it exists (or another conditional write to it is in flight)."""
    if "mode" not in inspect.signature(fs.pipe_file).parameters:
        raise storage.StorageError(
            f"{url}: the installed {type(fs).__module__.split('.')[0]} has no exclusive "
            "create (pipe_file mode='create'); upgrade s3fs / gcsfs"
        )
    try:
        fs.pipe_file(fs_path, data, mode="create")
    except FileExistsError:
        return False
    except Exception as exc:  # noqa: BLE001 - one line, no secret
        if _s3_error_code(exc) == "ConditionalRequestConflict":  # S3's 409: a concurrent conditional write
            return False
        raise storage.StorageError(storage.describe_error(url, exc)) from None
    finally:
        fs.invalidate_cache(fs_path)
    return True


def _s3_error_code(exc: BaseException) -> str | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
        exc = exc.__cause__ or exc.__context__
    return None


_refuses_overwrite_cache: dict[tuple, bool] = {}
_refuses_overwrite_lock = threading.Lock()


def _refuses_overwrite(fs, url: str) -> bool:
    """Whether the bucket of `url` refuses a second exclusive create of the same object.

    Asked once per process, bucket and endpoint: real S3, GCS and MinIO do; gcp-storage-emulator
    does not (it ignores ifGenerationMatch), nor do some older S3-compatible servers."""
    proto = storage.protocol(url)
    fs_path = storage.filesystem(url)[1]
    bucket = fs_path.split("/", 1)[0]
    endpoint = storage.s3_endpoint() if proto in storage.S3_PROTOCOLS else storage.gcs_endpoint()
    key = (proto, endpoint, bucket)
    with _refuses_overwrite_lock:
        if key not in _refuses_overwrite_cache:
            probe = f"{fs_path.rstrip('/')}/.exclusive-create-check-{uuid.uuid4().hex[:12]}"
            probe_url = f"{proto}://{probe}"
            if not _create_object(fs, probe, probe_url, b"1\n"):
                raise storage.StorageError(f"{probe_url}: a new, unique object name already exists")
            try:
                refused = not _create_object(fs, probe, probe_url, b"2\n")
            finally:
                try:
                    fs.rm_file(probe)
                except Exception as exc:  # noqa: BLE001 - a leftover probe object is harmless
                    log.debug("could not delete %s: %s", probe_url, exc)
            if not refused:
                log.warning(
                    "%s://%s%s ignores exclusive creates (If-None-Match / ifGenerationMatch), as "
                    "emulators do: job claims there fall back to write, wait %g s, read back, which is "
                    "exclusive only while launchers start less than %g s apart",
                    proto,
                    bucket,
                    f" at {storage.safe_url(endpoint)}" if endpoint else "",
                    UNCONDITIONAL_SETTLE_S,
                    UNCONDITIONAL_SETTLE_S,
                )
            _refuses_overwrite_cache[key] = refused
        return _refuses_overwrite_cache[key]


class _MongoStore:
    """Records as documents ``{_id: "<job>/NNNNNN", job: <job>, ...}`` in ``scaling_fl_claims``."""

    settle_s = 0.0  # insert_one on a unique _id is exclusive

    def __init__(self, database, job_name: str):
        self.collection = database[MONGO_COLLECTION]
        self.job_name = job_name
        self.location = f"MongoDB database {database.name}"

    def _id(self, generation: int) -> str:
        return f"{self.job_name}/{generation:06d}"

    def generations(self) -> list[int]:
        found = []
        for document in self.collection.find({"job": self.job_name}, {"_id": 1}):
            suffix = str(document["_id"]).rsplit("/", 1)[-1]
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def read(self, generation: int) -> dict | None:
        document = self.collection.find_one({"_id": self._id(generation)})
        if document is None:
            return None
        document.pop("_id", None)
        document.pop("job", None)
        return document

    def create(self, generation: int, record: dict) -> bool:
        from pymongo.errors import DuplicateKeyError

        try:
            self.collection.insert_one({"_id": self._id(generation), "job": self.job_name, **record})
        except DuplicateKeyError:
            return False
        return True

    def overwrite(self, generation: int, record: dict) -> None:
        self.collection.replace_one({"_id": self._id(generation)}, {"job": self.job_name, **record}, upsert=True)

    def delete(self, generation: int) -> None:
        self.collection.delete_one({"_id": self._id(generation)})


# ---------------------------------------------------------------- one claim


class JobClaim:
    """A claim on `job_name` in one place; see the module docstring.

    acquire(force) -> takes the claim or raises ClaimRefused; renew() -> False once another
    launcher took it over; release() -> marks it released (never raises)."""

    def __init__(self, store: _Store, job_name: str, lease_s: float = DEFAULT_LEASE_S):
        self._store = store
        self.job_name = job_name
        self.lease_s = float(lease_s)
        self.location = store.location
        self.owner = uuid.uuid4().hex
        # Who we are, as written into our record (tests may change them before acquire()).
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = process_start_time(self.pid)
        self.pid_namespace = _pid_namespace()
        self.generation: int | None = None  # ours, once acquired
        self.successor: dict | None = None  # the record that took over ours, once renew() saw one
        self._record: dict | None = None
        self._released = False
        self._lock = threading.Lock()  # renew (renewal thread) vs. release (main thread)

    def __repr__(self) -> str:
        return f"JobClaim({self.job_name!r} at {self.location}, generation {self.generation})"

    @property
    def held(self) -> bool:
        return self.generation is not None and not self._released

    # -- reading

    def _current(self) -> tuple[int, dict | None]:
        """(highest generation, its record); (0, None) when there is none.

        A record may vanish between listing and reading (a launcher that lost a race deletes its
        own): list again."""
        top = 0
        for _ in range(5):
            generations = self._store.generations()
            if not generations:
                return 0, None
            top = generations[-1]
            record = self._store.read(top)
            if record is not None:
                return top, dict(record, generation=top)
        return top, None

    def holder(self) -> dict | None:
        """The current (highest-generation) record, with its "generation" added; None if none.

        It may be released or expired: see `is_free`."""
        return self._current()[1]

    def is_free(self, record: dict | None, now: float | None = None) -> bool:
        """Whether `record` no longer holds the job: absent, released, lease expired, or written
        by a launcher on this host (and pid namespace) whose process is gone or whose pid now
        belongs to another process."""
        if record is None or record.get("released"):
            return True
        now = time.time() if now is None else now
        try:
            if float(record.get("expires_at")) < now:
                return True
        except (TypeError, ValueError):
            return True  # no usable lease: nobody renews it
        if record.get("host") != self.host:
            return False
        theirs = record.get("pid_namespace")
        if theirs and self.pid_namespace and theirs != self.pid_namespace:
            return False  # another container with our hostname: its pids are not ours to check
        pid, started = record.get("pid"), record.get("pid_start")
        return not (isinstance(pid, int) and pid > 0 and pid_alive(pid, started))

    def refusal(self, record: dict | None) -> str:
        """The one-line ClaimRefused message for `record` (the holder)."""
        if record is None:
            return (
                f"job_name={self.job_name!r} is being claimed by another launcher at this moment (claim at "
                f"{self.location}); stop it first, or if it is really dead re-run with resume=force"
            )
        return (
            f"job_name={self.job_name!r} is already running: launcher pid {record.get('pid')} on host "
            f"{record.get('host')}, started {_when(record.get('started_at'))}, lease renewed until "
            f"{_when(record.get('expires_at'))} (claim at {self.location}); stop it first, or if it is "
            "really dead re-run with resume=force (or wait until its lease expires)"
        )

    def _refuse_for_winner(self) -> ClaimRefused:
        try:
            record = self.holder()
        except Exception:  # noqa: BLE001 - the refusal matters more than who won
            record = None
        return ClaimRefused(self.refusal(record))

    # -- acquiring, renewing, releasing

    def _new_record(self, now: float) -> dict:
        return {
            "job_name": self.job_name,
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "pid_namespace": self.pid_namespace,
            "started_at": now,
            "expires_at": now + self.lease_s,
            "released": False,
        }

    def acquire(self, force: bool = False) -> JobClaim:
        """Take the claim, or raise ClaimRefused (one line) if a live launcher holds it.

        force=True takes it even from a live holder (resume=force: the user says it is dead).
        Storage errors propagate (StorageError for file stores, PyMongoError for MongoDB)."""
        if self.generation is not None:
            raise RuntimeError(f"{self!r} was already acquired; make a new JobClaim")
        try:
            top, record = self._current()
        except UnreadableClaim as exc:
            if not force:
                raise ClaimRefused(
                    f"job_name={self.job_name!r}: {exc}; if no launcher of this job runs, re-run with resume=force"
                ) from None
            top, record = max(self._store.generations(), default=0), None
        if not force and not self.is_free(record):
            raise ClaimRefused(self.refusal(record))
        if force and record is not None and not self.is_free(record):
            log.warning(
                "resume=force: taking the claim on job %r at %s from launcher pid %s on host %s",
                self.job_name,
                self.location,
                record.get("pid"),
                record.get("host"),
            )

        generation = top + 1
        now = time.time()
        mine = self._new_record(now)
        if not self._store.create(generation, mine):
            raise self._refuse_for_winner()  # another launcher created this generation first
        if self._store.settle_s:
            time.sleep(self._store.settle_s)
        # On a store that ignores exclusive creates another launcher may have overwritten ours.
        try:
            stored = self._store.read(generation)
        except UnreadableClaim:
            stored = None
        if stored is None or stored.get("owner") != self.owner:
            raise self._refuse_for_winner()
        # A launcher that saw our record (forced, or ours was expired already) may have created
        # the next generation: then it won, and ours must not stay the current claim.
        if any(other > generation for other in self._store.generations()):
            self._delete_quietly(generation)
            raise self._refuse_for_winner()

        self.generation = generation
        self._record = mine
        for old in self._store.generations():
            if old < generation:
                self._delete_quietly(old)
        return self

    def renew(self) -> bool:
        """Push our lease to now + lease_s. False (and nothing written) if another launcher
        took the claim over, or after release(). Storage errors propagate: retry later."""
        with self._lock:
            if self.generation is None:
                raise RuntimeError(f"{self!r} was never acquired")
            if self._released or self.successor is not None:
                return False
            newer = [other for other in self._store.generations() if other > self.generation]
            if newer:
                try:
                    self.successor = dict(self._store.read(newer[-1]) or {}, generation=newer[-1])
                except Exception:  # noqa: BLE001 - who it was is only for the message
                    self.successor = {"generation": newer[-1]}
                return False
            record = dict(self._record, expires_at=time.time() + self.lease_s)
            self._store.overwrite(self.generation, record)
            self._record = record
            return True

    def lost_message(self) -> str:
        """One line for a launcher whose renew() returned False."""
        other = self.successor or {}
        who = f"launcher pid {other.get('pid')} on host {other.get('host')}" if other.get("pid") else "another launcher"
        return (
            f"job_name={self.job_name!r}: {who} took over the claim at {self.location} "
            f"(generation {other.get('generation', '?')}); this launcher no longer owns the job and stops"
        )

    def release(self) -> None:
        """Mark our record released, so the next launcher starts at once. The record stays:
        generation numbers are never reused. Best effort: errors are logged, not raised."""
        with self._lock:
            if self.generation is None or self._released:
                return
            self._released = True
            try:
                if self.successor is not None or any(g > self.generation for g in self._store.generations()):
                    return  # taken over: our record is history (maybe deleted already), leave it be
                self._store.overwrite(self.generation, dict(self._record, released=True, expires_at=time.time()))
            except Exception as exc:  # noqa: BLE001 - its lease expires anyway
                log.warning(
                    "could not release the claim on job %r at %s (%s); it expires within %g s",
                    self.job_name,
                    self.location,
                    _one_line(exc),
                    self.lease_s,
                )

    def _delete_quietly(self, generation: int) -> None:
        try:
            self._store.delete(generation)
        except Exception as exc:  # noqa: BLE001 - an old record left over is harmless
            log.debug("could not delete generation %d of the claim at %s: %s", generation, self.location, exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return storage.redact(text)[:300]


def claim_in_directory(url: str, job_name: str, lease_s: float = DEFAULT_LEASE_S) -> JobClaim:
    """A claim whose generation files go directly into `url` (a local folder, s3://bucket/prefix
    or gs://bucket/prefix; the caller picks a folder of the job's own)."""
    return JobClaim(_DirectoryStore(url), job_name, lease_s)


def claim_in_mongo(database, job_name: str, lease_s: float = DEFAULT_LEASE_S) -> JobClaim:
    """A claim in the ``scaling_fl_claims`` collection of a pymongo Database."""
    return JobClaim(_MongoStore(database, job_name), job_name, lease_s)


# ---------------------------------------------------------------- all claims of a launcher


class JobClaims:
    """The claims of one launcher (e.g. tracking store and checkpoints folder), held together.

    claims = JobClaims([claim_in_mongo(db, job), claim_in_directory(ckpt_claims, job)])
    with claims.acquire_all(force):      # raises ClaimRefused, holding nothing
        claims.start_renewing(on_lost)   # on_lost(message) once, from the renewal thread
        ...                              # release_all() on exit, also after an exception
    """

    def __init__(self, claims: list[JobClaim], interval_s: float = DEFAULT_RENEW_INTERVAL_S):
        self.claims = list(claims)
        self.interval_s = float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_reported = False

    def __enter__(self) -> JobClaims:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release_all()

    def acquire_all(self, force: bool = False) -> JobClaims:
        """Acquire every claim in order; if one is refused (or fails), release those already
        taken and re-raise, so a refused launcher holds nothing."""
        taken = []
        try:
            for claim in self.claims:
                claim.acquire(force)
                taken.append(claim)
        except BaseException:
            for claim in reversed(taken):
                claim.release()
            raise
        return self

    def start_renewing(self, on_lost: Callable[[str], None]) -> None:
        """Renew all claims every interval_s in one daemon thread. When a claim was taken over,
        on_lost(one-line message) is called once; renewal errors are logged (once per claim and
        distinct error) and retried at the next interval."""
        if self._thread is not None:
            raise RuntimeError("start_renewing() was already called")
        self._thread = threading.Thread(
            target=self._renew_loop, args=(on_lost,), name="scaling-fl-claim-renewal", daemon=True
        )
        self._thread.start()

    def _renew_loop(self, on_lost: Callable[[str], None]) -> None:
        seen_errors: dict[int, set[str]] = {}
        lost: set[int] = set()
        while not self._stop.wait(self.interval_s):
            for index, claim in enumerate(self.claims):
                if index in lost or self._stop.is_set():
                    continue
                try:
                    renewed = claim.renew()
                except Exception as exc:  # noqa: BLE001 - retried at the next interval
                    text = _one_line(exc)
                    errors = seen_errors.setdefault(index, set())
                    if text not in errors:
                        errors.add(text)
                        log.warning(
                            "could not renew the claim on job %r at %s (%s); retrying every %g s",
                            claim.job_name,
                            claim.location,
                            text,
                            self.interval_s,
                        )
                    continue
                if seen_errors.pop(index, None):
                    log.info("renewed the claim on job %r at %s again", claim.job_name, claim.location)
                if not renewed and not self._stop.is_set():
                    lost.add(index)
                    if not self._lost_reported:
                        self._lost_reported = True
                        try:
                            on_lost(claim.lost_message())
                        except Exception:  # noqa: BLE001 - the thread must survive its callback
                            log.exception("the on_lost callback of the job claims failed")

    def release_all(self) -> None:
        """Stop renewing and release every claim; safe to call more than once."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(10.0, 2 * self.interval_s))
        for claim in reversed(self.claims):
            claim.release()
