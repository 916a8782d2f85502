"""Rank 0's progress: a tqdm bar on a terminal, a plain line every few percent anywhere else.

A redrawn bar (carriage returns) is unreadable where the output lands in a file or a log
collector (CI, `docker logs`, `kubectl logs`, the run record's captured output), and tqdm has
no option for plain lines (tqdm/tqdm#750), so there `progress_bar` returns `LineProgress`: the
same calls, tqdm's own text (`tqdm.format_meter`: steps, percent, elapsed / remaining, rate,
postfix), one log line every `every_percent` % of the total and at the end, never a '\r'.

Whether the user sees a terminal is decided once, by the launcher, on its own stdout and stderr
before Sacred captures them (a site's are pipes either way), and passed to the sites in
SCALING_FL_PROGRESS=bar|lines; set it yourself to choose.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

from tqdm.auto import tqdm

PROGRESS_ENV = "SCALING_FL_PROGRESS"
MODES = ("bar", "lines")
EVERY_PERCENT = 5.0
LINE_FORMAT = "{desc}{percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

log = logging.getLogger("scaling_fl.progress")


def terminal_mode(*streams) -> str:
    """ "bar" when every one of `streams` (default: this process's stdout and stderr) is a terminal."""

    def is_tty(stream) -> bool:
        try:
            return stream is not None and stream.isatty()
        except (AttributeError, ValueError, OSError):  # no isatty, or closed
            return False

    return "bar" if all(is_tty(stream) for stream in (streams or (sys.stdout, sys.stderr))) else "lines"


def progress_mode() -> str:
    """SCALING_FL_PROGRESS when it says bar or lines, else decided on this process's own output."""
    mode = os.environ.get(PROGRESS_ENV, "").strip().lower()
    return mode if mode in MODES else terminal_mode()


def progress_bar(
    *,
    total: int | None,
    initial: int = 0,
    disable: bool = False,
    unit: str = "it",
    every_percent: float = EVERY_PERCENT,
):
    """A tqdm bar (terminal) or a `LineProgress` (anything else, see `progress_mode`)."""
    if progress_mode() == "bar":
        return tqdm(total=total, initial=initial, disable=disable, unit=unit, dynamic_ncols=True, mininterval=1.0)
    return LineProgress(total=total, initial=initial, disable=disable, unit=unit, every_percent=every_percent)


class LineProgress:
    """The part of tqdm's interface the round loop uses, as one log line ("scaling_fl.progress",
    INFO) each time the count passes another `every_percent` % of `total`, and at `close` when
    the last line is not already the final count. Nothing is drawn, so nothing is ever redrawn."""

    def __init__(
        self,
        *,
        total: int | None,
        initial: int = 0,
        disable: bool = False,
        unit: str = "it",
        every_percent: float = EVERY_PERCENT,
    ):
        self.total, self.n, self.initial, self.disable, self.unit = total, initial, initial, disable, unit
        self.desc, self.postfix = "", ""
        self.chunk = max(1, math.ceil(total * every_percent / 100)) if total else None
        self.start_t = time.monotonic()
        self.closed = False
        self._logged_n = initial  # a resumed run logs its first line at the next multiple of the chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        if self.disable or self.closed:
            return
        self.n += n
        if self.chunk and self.n // self.chunk > self._logged_n // self.chunk or self.total and self.n >= self.total:
            self._log()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{key}={str(value).strip()}" for key, value in values.items())

    def refresh(self) -> None:
        """No redraws: the next line has the new description and postfix."""

    def __str__(self) -> str:
        prefix = f"{self.desc}: " if self.desc else ""
        return tqdm.format_meter(
            self.n,
            self.total,
            time.monotonic() - self.start_t,
            prefix=prefix,
            unit=self.unit,
            postfix=self.postfix or None,
            initial=self.initial,
            bar_format=LINE_FORMAT if self.total else None,
        )

    def close(self) -> None:
        if self.disable or self.closed:
            return
        self.closed = True
        self._log()

    def _log(self) -> None:
        if self._logged_n == self.n:  # the final count, already logged
            return
        self._logged_n = self.n
        log.info("%s", self)
