"""Atomic, pickle-free checkpoints on local disks, s3:// and gs://, and finding one to resume.

Layout (one folder per checkpointed round, directly under `checkpoints_dir`):

    round-000012/global.safetensors     the global model (the flat vector) + layout metadata
    round-000012/strategy.safetensors   the strategy's state (server-optimizer moments)
    round-000012/site-00003.safetensors a site's own state, if any: its error-feedback residual, and its
                                        local model when the round ended between synchronizations
    round-000012/state.json             round, experiment-defining config and its hash, metrics so far
    round-000012/COMMITTED              written last: every file's size and sha256

A folder without a valid COMMITTED marker, or whose files do not match it (truncated,
tampered), is never used: a run skips it with a warning and takes the previous one.
Only safetensors and JSON are ever read, so loading cannot execute code.
Retention (keep_last_checkpoints) counts only checkpoints that verify.

Cost per checkpoint: each file is hashed from the bytes in memory as it is written, and its
writer leaves a small record next to it (`.NAME.sha256.json`: size, sha256 and the version the
store gave the file: ETag / generation / mtime+inode). `commit` takes a file's size and hash
from its record whenever the listing shows the file still is that version, so sealing reads
nothing model-sized back; a file without a record, or replaced since, is read and hashed as
before. Commit removes the records before it writes the marker. `verify` (on load) still reads
and checks everything. `prune` trusts, without reading them again, the checkpoints this process
committed or verified, as long as a listing shows their files and marker unchanged since; any
other is verified once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from scaling_fl import storage
from scaling_fl.errors import UserError

log = logging.getLogger("scaling_fl")

MARKER = "COMMITTED"
ROUND_DIR = re.compile(r"^round-(\d{6})$")
FORMAT_VERSION = 1

# Keys that define what an experiment is: resuming with a different value is refused
# unless resume=force. Schedules (num_rounds, learning rate...) may change.
DEFINING_KEYS = (
    "model",
    "task_name",
    "train_path",
    "test_path",
    "split",
    "dirichlet_beta",
    "sample_percentage",
    "validation_fraction",
    "data_seed",
    "seed",
    "max_seq_len",
    "text_columns",
    "label_column",
    "synthetic_train_size",
    "synthetic_test_size",
    "strategy",
    "exchange",
)


class CheckpointError(UserError, RuntimeError):
    """A one-line description of an unusable checkpoint and the fix."""


# Keys that joined later: part of the defining config only when not at their default, so that the
# checkpoints written before they existed keep their config hash.
DEFINING_KEYS_IF_SET = {
    "objective": "sequence_classification",
    "prompt_column": None,
    "response_column": None,
    "prompt_template": "{prompt}\n",
    "peft": "none",
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_target_modules": None,
    "lora_variant": "lora",
    "base_precision": "fp32",
}


def defining_config(config: dict, num_sites: int) -> dict:
    defining = {key: config[key] for key in DEFINING_KEYS if key in config}
    defining.update(
        {key: config[key] for key, default in DEFINING_KEYS_IF_SET.items() if config.get(key, default) != default}
    )
    defining["num_sites"] = num_sites
    return defining


def config_hash(defining: dict) -> str:
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def round_dir(checkpoints_dir: str, round_number: int) -> str:
    return f"{checkpoints_dir.rstrip('/')}/round-{round_number:06d}"


def site_file(site: int) -> str:
    return f"site-{site:05d}.safetensors"


# --- writing ---------------------------------------------------------------------------

RECORD_SUFFIX = ".sha256.json"  # `.NAME.sha256.json`: hidden, so never sealed or listed in a marker

# Checkpoints this process committed or verified: folder -> {file name: version} of the marker and
# of every file it lists, as a listing showed them then. prune() trusts such a folder while a new
# listing shows the very same versions, instead of reading it all again every round.
_trusted: dict[str, dict[str, list]] = {}


def record_name(name: str) -> str:
    return f".{name}{RECORD_SUFFIX}"


def write_tensors(directory: str, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    payload = save_safetensors(
        {key: value.detach().cpu().contiguous() for key, value in tensors.items()},
        metadata={key: str(value) for key, value in (metadata or {}).items()},
    )
    _write_file(directory, name, payload)


def write_state(directory: str, state: dict) -> None:
    _write_file(directory, "state.json", json.dumps(state, indent=2, sort_keys=True).encode())


def _write_file(directory: str, name: str, payload: bytes) -> None:
    """Writes the file, then its record: size and sha256 of the bytes in memory, and the version
    the store gave the file (so commit can tell that the file is still what was hashed)."""
    path = f"{directory}/{name}"
    digest = hashlib.sha256(payload).hexdigest()
    storage.atomic_write_bytes(path, payload)
    record = {"size": len(payload), "sha256": digest, "version": _version_of(path)}
    storage.atomic_write_bytes(f"{directory}/{record_name(name)}", json.dumps(record, sort_keys=True).encode())


def commit(directory: str) -> None:
    """Seals a checkpoint: the marker lists every file's size and hash and is written last.

    A file's entry comes from its writer's record when the listing shows the file still is the
    version recorded (nothing is read back); otherwise (no record: written by other means; or
    replaced since) the file is read and hashed as it is now. The records are removed before the
    marker is written, so a sealed folder holds only its files and the marker."""
    _trusted.pop(_key(directory), None)
    listing = _listing(directory)
    files, versions, all_recorded = {}, {}, True
    for name, info in sorted(listing.items()):
        if name == MARKER or name.startswith("."):
            continue
        version = _version(info)
        record = _read_record(directory, name) if record_name(name) in listing else None
        if record is not None and record["version"] == version:
            files[name] = {"size": record["size"], "sha256": record["sha256"]}
            if record["size"] != info.get("size"):  # the store holds other bytes than were written: verify will say
                all_recorded = False
        else:
            if record is not None:
                log.warning("%s/%s changed after it was written; sealing what it holds now", directory, name)
            data = storage.read_bytes(f"{directory}/{name}")
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            all_recorded = False
        versions[name] = version
    _remove_records(directory, [name for name in listing if name.startswith(".") and name.endswith(RECORD_SUFFIX)])
    marker_path = f"{directory}/{MARKER}"
    storage.atomic_write_bytes(
        marker_path, json.dumps({"format": FORMAT_VERSION, "files": files}, indent=2, sort_keys=True).encode()
    )
    marker_version = _version_of(marker_path)
    if all_recorded and marker_version is not None:  # every entry is the hash of the very bytes written
        _trusted[_key(directory)] = {**versions, MARKER: marker_version}


def prune(checkpoints_dir: str, keep_last: int) -> list[str]:
    """Keeps the newest `keep_last` checkpoints that verify (so never the newest good one); removes
    older ones, and folders older than the newest kept one that do not verify (partial, truncated,
    tampered). Folders newer than every good checkpoint are left alone (one may be being written).

    A checkpoint this process committed or already verified counts as good while a listing shows
    its marker and files unchanged since (no download); any other is verified (read) in full."""
    rounds = list_rounds(checkpoints_dir)
    keep, broken = set(), {}
    for number in reversed(rounds):  # newest first; what is older than the N-th good one goes anyway
        if len(keep) >= max(1, keep_last):
            break
        directory = round_dir(checkpoints_dir, number)
        if _still_trusted(directory):
            keep.add(number)
            continue
        try:
            verify(directory)
            keep.add(number)
        except CheckpointError as error:
            broken[number] = error
    newest_kept = max(keep) if keep else 0
    removed = []
    for number in rounds:
        if number not in keep and number < newest_kept:
            directory = round_dir(checkpoints_dir, number)
            if number in broken:
                log.warning("removing broken checkpoint %s: %s", directory, broken[number])
            _trusted.pop(_key(directory), None)
            storage.remove_tree(directory)
            removed.append(directory)
    return removed


def _key(directory: str) -> str:
    return directory.rstrip("/")


# What identifies one version of a file, as listings and info() give it: the size, plus the
# ETag (S3), generation and etag (GCS), or mtime and inode (local disks; a replace makes a new inode).
_VERSION_KEYS = ("size", "ETag", "etag", "generation", "mtime", "ino")


def _version(info: dict) -> list:
    return [
        value if value is None or isinstance(value, (str, int, float)) else str(value)
        for value in (info.get(key) for key in _VERSION_KEYS)
    ]


def _version_of(path: str) -> list | None:
    """The version of the file at `path` now (one stat / HEAD), or None if the store would not say."""
    fs, fs_path = storage.filesystem(path)
    try:
        fs.invalidate_cache(fs_path)
        return _version(fs.info(fs_path))
    except Exception:  # noqa: BLE001 - without a version, commit reads the file instead
        return None


def _listing(directory: str) -> dict[str, dict]:
    """The files directly in `directory` (hidden ones too): name -> info with size and version; {} if none."""
    fs, fs_path = storage.filesystem(directory)
    try:
        fs.invalidate_cache(fs_path)
        entries = fs.ls(fs_path, detail=True)
    except FileNotFoundError:
        return {}
    except Exception as exc:  # noqa: BLE001 - explained in one line
        raise storage.StorageError(storage.describe_error(directory, exc)) from None
    own = fs_path.rstrip("/")
    files = {}
    for entry in entries:
        name = entry["name"].rstrip("/")
        if name != own and entry.get("type") != "directory":
            files[name.rsplit("/", 1)[-1]] = entry
    return files


def _remove_records(directory: str, names: list[str]) -> None:
    """The records have served once the marker is being written: a sealed folder holds only its files
    and the marker. (One batch delete on object stores; a failure only leaves small hidden files.)"""
    if not names:
        return
    fs, fs_path = storage.filesystem(directory)
    try:
        fs.rm([f"{fs_path.rstrip('/')}/{name}" for name in names])
    except Exception as exc:  # noqa: BLE001 - harmless: never listed in a marker, removed with the folder
        log.debug("could not remove the records in %s: %s", directory, storage.describe_error(directory, exc))
    finally:
        fs.invalidate_cache(fs_path)


def _read_record(directory: str, name: str) -> dict | None:
    """A writer's record of `name`, or None when it cannot be used (then the file is hashed)."""
    try:
        record = json.loads(storage.read_bytes(f"{directory}/{record_name(name)}"))
    except (storage.StorageError, ValueError, RecursionError):
        return None
    if (
        isinstance(record, dict)
        and _is_count(record.get("size"))
        and isinstance(record.get("sha256"), str)
        and _SHA256.match(record["sha256"])
        and isinstance(record.get("version"), list)
    ):
        return record
    return None


def _still_trusted(directory: str) -> bool:
    expected = _trusted.get(_key(directory))
    if expected is None:
        return False
    try:
        listing = _listing(directory)
    except storage.StorageError:
        return False
    if all(name in listing and _version(listing[name]) == version for name, version in expected.items()):
        return True
    _trusted.pop(_key(directory), None)
    return False


# --- reading ---------------------------------------------------------------------------


def list_rounds(checkpoints_dir: str) -> list[int]:
    if not storage.exists(checkpoints_dir):
        return []
    numbers = []
    for path in storage.list_dir(checkpoints_dir):
        match = ROUND_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


@dataclass(frozen=True)
class Checkpoint:
    directory: str
    round: int
    state: dict  # the parsed state.json

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_safetensors(storage.read_bytes(f"{self.directory}/{name}"))

    def has(self, name: str) -> bool:
        return storage.exists(f"{self.directory}/{name}")


def verify(directory: str) -> Checkpoint:
    """Returns the checkpoint if its marker and every listed file check out; raises CheckpointError otherwise.

    Every way a sealed folder can be malformed (a marker or state.json of the wrong shape, a
    file name that leaves the folder, a round that is not the folder's) is a CheckpointError,
    so callers skip every broken checkpoint alike."""
    marker_path = f"{directory}/{MARKER}"
    listing = _listing(directory)  # before reading: a file replaced meanwhile then fails the next trust check
    if MARKER not in listing:
        raise CheckpointError(f"{directory} has no {MARKER} marker (interrupted while being written)")
    files = _read_marker(marker_path)
    for name, expected in files.items():
        path = f"{directory}/{name}"
        if name not in listing:
            raise CheckpointError(f"{path} is missing")
        data = storage.read_bytes(path)
        if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(
                f"{path} does not match its marker ({len(data)} bytes, expected {expected['size']}): "
                "truncated or modified"
            )
        if name.endswith(".safetensors"):
            _check_safetensors_header(path, data)
        del data
    if "state.json" not in files or "global.safetensors" not in files:
        raise CheckpointError(f"{directory} lacks state.json or global.safetensors")
    state = _read_state(directory)
    _trusted[_key(directory)] = {name: _version(listing[name]) for name in (*files, MARKER)}
    return Checkpoint(directory=directory, round=state["round"], state=state)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_count(value) -> bool:
    """An int that is not a bool (JSON true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _load_json(path: str, what: str):
    try:
        return json.loads(storage.read_bytes(path))
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        raise CheckpointError(f"{path} is not a valid {what} (not JSON)") from None


def _read_marker(marker_path: str) -> dict[str, dict]:
    """The marker's table of files, each entry checked: a plain name inside the folder, a size and a sha256."""
    marker = _load_json(marker_path, "marker")
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise CheckpointError(f"{marker_path} is not a valid marker (no table of files)")
    if "format" in marker and not (_is_count(marker["format"]) and marker["format"] == FORMAT_VERSION):
        raise CheckpointError(f"{marker_path} has format {marker['format']!r}, this version reads {FORMAT_VERSION}")
    files = marker["files"]
    for name, entry in files.items():
        if not name or name.startswith(".") or ".." in name or any(sign in name for sign in "/\\\0") or name == MARKER:
            raise CheckpointError(
                f"{marker_path} is not a valid marker (file name {name!r} is not a plain name inside the folder)"
            )
        if not (
            isinstance(entry, dict)
            and _is_count(entry.get("size"))
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _SHA256.match(entry["sha256"])
        ):
            raise CheckpointError(f"{marker_path} is not a valid marker (entry {name!r} lacks a size or sha256)")
    return files


def _read_state(directory: str) -> dict:
    """state.json, checked for what resuming reads: round (the folder's), history, job_name, defining_config."""
    path = f"{directory}/state.json"
    state = _load_json(path, "checkpoint state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a valid checkpoint state (not a JSON object)")
    number = state.get("round")
    if not _is_count(number) or number < 1:
        raise CheckpointError(f"{path} is not a valid checkpoint state (round {number!r} is not a round number)")
    folder = ROUND_DIR.match(directory.rstrip("/").rsplit("/", 1)[-1])
    if folder and int(folder.group(1)) != number:
        raise CheckpointError(f"{path} says round {number}, its folder is round {int(folder.group(1))}")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(entry, dict) and _is_count(entry.get("round")) and isinstance(entry.get("metrics"), dict)
        for entry in history
    ):
        raise CheckpointError(f"{path} is not a valid checkpoint state (history is not a list of rounds)")
    if not isinstance(state.get("defining_config", {}), dict):
        raise CheckpointError(f"{path} is not a valid checkpoint state (defining_config is not an object)")
    if not isinstance(state.get("job_name", ""), (str, type(None))):
        raise CheckpointError(f"{path} is not a valid checkpoint state (job_name is not a string)")
    return state


def _check_safetensors_header(path: str, data: bytes) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then raw tensor bytes;
    anything else (a pickle, say) is rejected before any parser sees it."""
    if len(data) < 8:
        raise CheckpointError(f"{path} is not a safetensors file (too short)")
    header_length = int.from_bytes(data[:8], "little")
    if header_length > len(data) - 8:
        raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + header_length])
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a JSON object)")
    body = len(data) - 8 - header_length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(offset) for offset in offsets)
            and 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise CheckpointError(f"{path} is not a valid safetensors file (tensor {name!r} out of bounds)")


def latest(checkpoints_dir: str) -> Checkpoint | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning naming them."""
    for number in reversed(list_rounds(checkpoints_dir)):
        directory = round_dir(checkpoints_dir, number)
        try:
            return verify(directory)
        except CheckpointError as error:
            log.warning("skipping checkpoint %s: %s", directory, error)
    return None


def open_checkpoint(path: str) -> Checkpoint:
    """An explicit checkpoint (resume_from=...): a round folder, or a checkpoints dir (its latest)."""
    if storage.exists(f"{path.rstrip('/')}/{MARKER}") or ROUND_DIR.match(path.rstrip("/").rsplit("/", 1)[-1]):
        return verify(path.rstrip("/"))
    found = latest(path)
    if found is None:
        raise CheckpointError(f"resume_from={path!r} holds no complete checkpoint")
    return found


def check_compatible(found: Checkpoint, defining: dict, force: bool) -> None:
    stored = found.state.get("defining_config", {})
    if config_hash(stored) == config_hash(defining):
        return
    changed = sorted(key for key in set(stored) | set(defining) if stored.get(key) != defining.get(key))
    detail = ", ".join(f"{key}: {stored.get(key)!r} -> {defining.get(key)!r}" for key in changed)
    if force:
        log.warning("resume=force: continuing %s although the experiment changed (%s)", found.directory, detail)
        return
    raise CheckpointError(
        f"checkpoint {found.directory} was made by a different experiment ({detail}); "
        "use a new job_name / checkpoints_dir, or resume=force to continue anyway"
    )


def check_job_name(found: Checkpoint, job_name: str, force: bool) -> None:
    """checkpoints_dir belongs to one job: another job_name would continue (and prune) its checkpoints."""
    stored = found.state.get("job_name")
    if stored is None or stored == job_name:  # (a checkpoint that names no job: nothing to compare)
        return
    if force:
        log.warning("resume=force: job %r continues %s of job %r", job_name, found.directory, stored)
        return
    raise CheckpointError(
        f"checkpoint {found.directory} belongs to job_name={stored!r}, not {job_name!r}: "
        f"run with job_name={stored} to continue it, another checkpoints_dir for a new job, "
        "or resume=force to continue it anyway"
    )


def preflight(cfg, num_sites: int) -> Checkpoint | None:
    """In the launcher: the checkpoint a run will continue from, refused early if incompatible.

    The newest checkpoint of checkpoints_dir must belong to this job_name; an explicit
    resume_from may come from another job (that is what naming it is for)."""
    if cfg.checkpoints_dir:
        storage.check_writable(cfg.checkpoints_dir)
    own = latest(cfg.checkpoints_dir) if cfg.checkpoints_dir else None
    explicit = open_checkpoint(cfg.resume_from) if cfg.resume_from else None
    candidates = [found for found in (own, explicit) if found is not None]
    if not candidates:
        return None
    force = cfg.resume == "force"
    if own is not None:
        check_job_name(own, cfg.job_name, force)
    found = max(candidates, key=lambda c: c.round)  # a tie goes to checkpoints_dir, as in the sites' _restore
    check_compatible(found, defining_config(cfg.as_dict(), num_sites), force=force)
    return found
