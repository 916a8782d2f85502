"""Rank 0 -> launcher channel: an append-only JSON-lines file in the launcher's work folder.

Workers never talk to Sacred or a database; rank 0 appends one line per event
(EventWriter, train/federated.py) and the launcher, which owns the Sacred run, follows
the file (EventFollower, launch.run_sites). A file survives worker
restarts and needs no connection that could cross a fork.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable


class EventWriter:
    def __init__(self, path: str):
        self.path = path

    def write(self, kind: str, **payload) -> None:
        line = json.dumps({"event": kind, "time": time.time(), **payload}, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class EventFollower:
    """Calls `on_event(event)` for each complete line, from a thread, until stopped and drained."""

    def __init__(self, path: str, on_event: Callable[[dict], None], poll_s: float = 0.2):
        self.path = path
        self.on_event = on_event
        self.poll_s = poll_s
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scaling-fl-events", daemon=True)

    def __enter__(self) -> EventFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read_new()  # whatever arrived after the last poll

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._read_new()

    def _read_new(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            while True:
                line = handle.readline()
                if not line.endswith(b"\n"):  # a line still being written: read it next time
                    break
                self._offset += len(line)
                self.on_event(json.loads(line))
