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

log = logging.getLogger("scaling_fl")

MARKER = "COMMITTED"
ROUND_DIR = re.compile(r"^round-(\d{6})$")
FORMAT_VERSION = 1

# Keys that define what an experiment is: resuming with a different value is refused
# unless resume=force. Schedules (num_rounds, learning rate...) may change.
DEFINING_KEYS = ("model", "task_name", "train_path", "test_path", "split", "dirichlet_beta", "sample_percentage",
                 "data_seed", "seed", "max_seq_len", "text_columns", "label_column", "synthetic_train_size",
                 "synthetic_test_size", "strategy", "exchange")


class CheckpointError(RuntimeError):
    """A one-line description of an unusable checkpoint and the fix."""


def defining_config(config: dict, num_sites: int) -> dict:
    defining = {key: config[key] for key in DEFINING_KEYS if key in config}
    defining["num_sites"] = num_sites
    return defining


def config_hash(defining: dict) -> str:
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def round_dir(checkpoints_dir: str, round_number: int) -> str:
    return f"{checkpoints_dir.rstrip('/')}/round-{round_number:06d}"


def site_file(site: int) -> str:
    return f"site-{site:05d}.safetensors"


# --- writing ---------------------------------------------------------------------------

def write_tensors(directory: str, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    payload = save_safetensors({key: value.detach().cpu().contiguous() for key, value in tensors.items()},
                               metadata={key: str(value) for key, value in (metadata or {}).items()})
    storage.atomic_write_bytes(f"{directory}/{name}", payload)


def write_state(directory: str, state: dict) -> None:
    storage.atomic_write_bytes(f"{directory}/state.json", json.dumps(state, indent=2, sort_keys=True).encode())


def commit(directory: str) -> None:
    """Seals a checkpoint: the marker lists every file's size and hash and is written last."""
    files = {}
    for path in storage.list_dir(directory):
        name = path.rsplit("/", 1)[-1]
        if name == MARKER or name.startswith("."):
            continue
        data = storage.read_bytes(path)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.atomic_write_bytes(f"{directory}/{MARKER}", json.dumps({"format": FORMAT_VERSION, "files": files},
                                                                    indent=2, sort_keys=True).encode())


def prune(checkpoints_dir: str, keep_last: int) -> list[str]:
    """Keeps the newest `keep_last` checkpoints that verify (so never the newest good one); removes
    older ones, and folders older than the newest kept one that do not verify (partial, truncated,
    tampered). Folders newer than every good checkpoint are left alone (one may be being written)."""
    rounds = list_rounds(checkpoints_dir)
    keep, broken = set(), {}
    for number in reversed(rounds):  # newest first; what is older than the N-th good one goes anyway
        if len(keep) >= max(1, keep_last):
            break
        try:
            verify(round_dir(checkpoints_dir, number))
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
            storage.remove_tree(directory)
            removed.append(directory)
    return removed


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
    if not storage.exists(marker_path):
        raise CheckpointError(f"{directory} has no {MARKER} marker (interrupted while being written)")
    files = _read_marker(marker_path)
    for name, expected in files.items():
        path = f"{directory}/{name}"
        if not storage.exists(path):
            raise CheckpointError(f"{path} is missing")
        data = storage.read_bytes(path)
        if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its marker ({len(data)} bytes, expected {expected['size']}): "
                                  "truncated or modified")
    for name in files:
        if name.endswith(".safetensors"):
            _check_safetensors_header(f"{directory}/{name}", storage.read_bytes(f"{directory}/{name}"))
    if "state.json" not in files or "global.safetensors" not in files:
        raise CheckpointError(f"{directory} lacks state.json or global.safetensors")
    state = _read_state(directory)
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
        if (not name or name.startswith(".") or ".." in name or any(sign in name for sign in "/\\\0")
                or name == MARKER):
            raise CheckpointError(f"{marker_path} is not a valid marker (file name {name!r} is not a plain "
                                  "name inside the folder)")
        if not (isinstance(entry, dict) and _is_count(entry.get("size")) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
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
            for entry in history):
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
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(offset) for offset in offsets)
                and 0 <= offsets[0] <= offsets[1] <= body):
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
    raise CheckpointError(f"checkpoint {found.directory} was made by a different experiment ({detail}); "
                          "use a new job_name / checkpoints_dir, or resume=force to continue anyway")


def check_job_name(found: Checkpoint, job_name: str, force: bool) -> None:
    """checkpoints_dir belongs to one job: another job_name would continue (and prune) its checkpoints."""
    stored = found.state.get("job_name")
    if stored is None or stored == job_name:  # (a checkpoint that names no job: nothing to compare)
        return
    if force:
        log.warning("resume=force: job %r continues %s of job %r", job_name, found.directory, stored)
        return
    raise CheckpointError(f"checkpoint {found.directory} belongs to job_name={stored!r}, not {job_name!r}: "
                          f"run with job_name={stored} to continue it, another checkpoints_dir for a new job, "
                          "or resume=force to continue it anyway")


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
