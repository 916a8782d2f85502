"""Resumable run records: the same job_name continues the same Sacred run.

A restarted job re-opens its record (same id) instead of starting a new one: the
captured output and `info` (including Mongo's metric references) are kept, status goes
back to RUNNING, and the launcher skips rounds already logged, so a round logged
before a crash is never logged twice. Whether a job is live is not read from its record's
heartbeat but from its claim (scaling_fl/claim.py), which the launcher holds while it runs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from dataclasses import dataclass

from sacred.observers import FileStorageObserver, MongoObserver

log = logging.getLogger("scaling_fl")

ROUND_METRIC = "validation.accuracy"


@dataclass(frozen=True)
class PreviousRun:
    run_id: int | str
    status: str
    heartbeat: dt.datetime | None
    last_round: int  # the last round whose metrics were logged (0 if none)


def _parse_time(value) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


# --- a record that can be lost --------------------------------------------------------


class LossAwareObserver:
    """Mixed into our observers: a store that fails mid-run (MongoDB gone, runs_dir unwritable)
    marks the record as lost instead of raising into Sacred (which would print a traceback and
    still exit 0) or retrying for a minute. Training goes on; the launcher reads `lost` at the
    end and fails the job with one line. Re-running the same job_name completes the record."""

    lost: str | None = None  # why the record stopped being written, one secret-free line

    def _describe_store(self) -> str:
        raise NotImplementedError

    def _guarded(self, event, *args, **kwargs):
        if self.lost is not None:
            return None
        try:
            return event(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure of the store loses the record the same way
            from scaling_fl.storage import first_line

            self.lost = f"{self._describe_store()}: {type(error).__name__}: {first_line(error)}"
            log.warning(
                "the run record can no longer be written (%s); training goes on, its checkpoints are unaffected",
                self.lost,
            )
            return None

    def heartbeat_event(self, *args, **kwargs):
        return self._guarded(super().heartbeat_event, *args, **kwargs)

    def completed_event(self, *args, **kwargs):
        return self._guarded(super().completed_event, *args, **kwargs)

    def interrupted_event(self, *args, **kwargs):
        return self._guarded(super().interrupted_event, *args, **kwargs)

    def failed_event(self, *args, **kwargs):
        return self._guarded(super().failed_event, *args, **kwargs)

    def artifact_event(self, *args, **kwargs):
        return self._guarded(super().artifact_event, *args, **kwargs)

    def resource_event(self, *args, **kwargs):
        return self._guarded(super().resource_event, *args, **kwargs)

    def log_metrics(self, *args, **kwargs):
        return self._guarded(super().log_metrics, *args, **kwargs)


# --- file store ----------------------------------------------------------------------


def find_file_run(runs_dir: str, job_name: str) -> PreviousRun | None:
    if not os.path.isdir(runs_dir):
        return None
    for name in sorted((d for d in os.listdir(runs_dir) if d.isdigit()), key=int, reverse=True):
        run_dir = os.path.join(runs_dir, name)
        try:
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as handle:
                if json.load(handle).get("job_name") != job_name:
                    continue
            with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as handle:
                entry = json.load(handle)
        except (OSError, ValueError):
            continue  # an unrelated or unreadable folder
        last_round = 0
        try:
            with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as handle:
                last_round = max(json.load(handle).get(ROUND_METRIC, {}).get("steps", [0]) or [0])
        except (OSError, ValueError):
            pass
        return PreviousRun(int(name), entry.get("status", "?"), _parse_time(entry.get("heartbeat")), int(last_round))
    return None


class ResumableFileStorageObserver(LossAwareObserver, FileStorageObserver):
    """Sacred's file store, plus: re-open an existing run folder, atomic JSON writes, loss detection."""

    def _describe_store(self) -> str:
        return f"runs_dir {self.basedir}"

    def __init__(self, basedir: str, resume_id: int | None = None):
        super().__init__(basedir)
        self.resume_id = resume_id
        self.previous_info: dict = {}

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        if self.resume_id is None:
            return super().started_event(ex_info, command, host_info, start_time, config, meta_info, _id)
        self.dir = os.path.join(self.basedir, str(self.resume_id))
        with open(os.path.join(self.dir, "run.json"), encoding="utf-8") as handle:
            previous = json.load(handle)
        info_path = os.path.join(self.dir, "info.json")
        if os.path.exists(info_path):
            with open(info_path, encoding="utf-8") as handle:
                self.previous_info = json.load(handle)
        ex_info["sources"] = self.save_sources(ex_info)
        self.run_entry = _resumed_entry(previous, ex_info, command, host_info, meta_info, start_time.isoformat())
        self.config, self.info, self.cout, self.cout_write_cursor = config, dict(self.previous_info), "", 0
        self.save_json(self.run_entry, "run.json")
        self.save_json(self.config, "config.json")
        return self.resume_id

    def save_json(self, obj, filename):
        """Temp file + rename: a crash mid-write never leaves a half-written record."""
        from sacred.serializer import flatten

        handle, temp_path = tempfile.mkstemp(dir=self.dir, prefix=f".{filename}.")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(flatten(obj), out, sort_keys=True, indent=2)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_path, os.path.join(self.dir, filename))


def _resumed_entry(previous: dict, ex_info, command, host_info, meta_info, start_time) -> dict:
    entry = {key: value for key, value in previous.items() if key not in ("stop_time", "fail_trace", "result")}
    entry.update(
        experiment=dict(ex_info),
        command=command,
        host=dict(host_info),
        meta=meta_info,
        status="RUNNING",
        heartbeat=None,
    )
    entry["resumed_at"] = list(previous.get("resumed_at", [])) + [start_time]
    entry["previous_statuses"] = list(previous.get("previous_statuses", [])) + [previous.get("status")]
    return entry


# --- MongoDB ---------------------------------------------------------------------------


def find_mongo_run(database, job_name: str) -> PreviousRun | None:
    entry = database.runs.find_one(
        {"config.job_name": job_name}, sort=[("_id", -1)], projection={"status": 1, "heartbeat": 1}
    )
    if entry is None:
        return None
    series = database.metrics.find_one({"run_id": entry["_id"], "name": ROUND_METRIC}, projection={"steps": 1})
    last_round = max(series["steps"]) if series and series.get("steps") else 0
    return PreviousRun(entry["_id"], entry.get("status", "?"), _parse_time(entry.get("heartbeat")), int(last_round))


class ResumableMongoObserver(LossAwareObserver, MongoObserver):
    """Sacred's Mongo observer, plus: re-open an existing run document (same _id), loss detection.

    Sacred's own `save` ignores a lost connection and its final save retries for about a minute,
    then pickles the record into the working directory; here a failed write raises at once (after
    the client's server-selection timeout) and marks the record lost."""

    def __init__(self, *args, resume_id=None, hosts: str = "?", **kwargs):
        super().__init__(*args, **kwargs)
        self.hosts = hosts  # for messages: never the URL, which may carry a password
        self.resume_id = resume_id
        self.previous_info: dict = {}
        self.previous_out = ""

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        if self.resume_id is None:
            return super().started_event(ex_info, command, host_info, start_time, config, meta_info, _id)
        from sacred.serializer import flatten

        previous = self.runs.find_one({"_id": self.resume_id})
        self.previous_info = previous.get("info") or {}
        self.previous_out = previous.get("captured_out") or ""
        self.run_entry = _resumed_entry(previous, ex_info, command, host_info, meta_info, start_time)
        self.run_entry["config"] = flatten(config)
        self.run_entry["experiment"]["sources"] = self.save_sources(ex_info)
        self.runs.replace_one({"_id": self.resume_id}, self.run_entry)
        return self.resume_id

    def _describe_store(self) -> str:
        return f"MongoDB at {self.hosts} (database {self.runs.database.name!r})"

    def heartbeat_event(self, info, captured_out, beat_time, result):
        super().heartbeat_event(info, self.previous_out + captured_out, beat_time, result)

    def save(self):
        self.runs.update_one({"_id": self.run_entry["_id"]}, {"$set": self.run_entry})

    def final_save(self, attempts):
        self.runs.update_one({"_id": self.run_entry["_id"]}, {"$set": self.run_entry}, upsert=True)
