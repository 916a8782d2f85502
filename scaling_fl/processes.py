"""Process lifetimes: the sites die with their launcher, signals end a run cleanly, a job's temp
folder goes with it.

A launcher killed with SIGKILL (an OOM kill, a runtime that kills only the main process) cannot
clean up after itself, so its children watch it instead: the kernel sends SIGKILL to the fork
server when the launcher dies and to each site when the fork server dies (Linux's parent-death
signal), and each site also polls the launcher's pid, so no site trains on headless. The temp
folder of a killed launcher is removed at the next start of the same job.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time

log = logging.getLogger("scaling_fl")

LAUNCHER_PID_ENV = "SCALING_FL_LAUNCHER_PID"
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
UNIX_SOCKET_DIR_MAX = 60  # + "/pymp-XXXXXXXX/listener-XXXXXXXX" stays within a Unix socket path's 107 bytes


# --- is a process alive ------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid
    it names one process, even after the pid is reused. None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            # Field 2 (the command) is in parentheses and may hold spaces: split after the last ')'.
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True while the process `pid` (started at `start_time`, when known) runs; a zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # someone else's process: alive
    except OSError:
        return False
    if process_state(pid) == "Z":
        return False
    return start_time is None or process_start_time(pid) in (None, start_time)


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R running, S sleeping, T stopped, Z zombie...); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, grandchildren...), read from /proc (Linux; elsewhere empty)."""
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for name in entries:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", encoding="utf-8", errors="replace") as handle:
                    parents[int(name)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


class StoppedSiteWatch:
    """Continues (SIGCONT) the stopped processes of the job (SIGSTOP, a frozen container) as soon as
    another of its processes has exited: by then a peer timed out on the frozen site and elastic
    restarts every site with SIGTERM, which a stopped process only takes once continued. Elastic
    would otherwise wait its 30 s grace before SIGKILL, holding the restart back."""

    def __init__(self, poll_s: float = 0.1):
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scaling-fl-stopped-sites", daemon=True)

    def __enter__(self) -> StoppedSiteWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        known = descendants(os.getpid())
        while not self._stop.wait(self.poll_s):
            current = descendants(os.getpid())
            if known - current:  # a process of the job has exited
                for pid in current:
                    if process_state(pid) == "T":
                        log.warning(
                            "process %d of this job is stopped (SIGSTOP) and a peer has exited: "
                            "continuing it so that the sites can be restarted",
                            pid,
                        )
                        try:
                            os.kill(pid, signal.SIGCONT)
                        except OSError:
                            pass
            known = current


# --- children die with their parent ---------------------------------------------------------


def die_with_parent(expected_parent: int | None = None) -> None:
    """Asks the kernel to SIGKILL this process when its parent dies (Linux; elsewhere a no-op).
    If the parent is already gone (it died before the request), exits at once."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def watch_launcher(interval_s: float = 1.0) -> None:
    """In a site: a daemon thread that ends this process when the launcher is gone (a second line of
    defence next to the parent-death signal, and the only one off Linux)."""
    pid = int(os.environ.get(LAUNCHER_PID_ENV, "0") or 0)
    if pid <= 0:
        return
    start_time = process_start_time(pid)

    def watch() -> None:
        while pid_alive(pid, start_time):
            time.sleep(interval_s)
        os._exit(1)  # no checkpoint, no cleanup: the launcher that would record them is gone

    threading.Thread(target=watch, name="scaling-fl-launcher-watch", daemon=True).start()


# --- the sites' fork server -------------------------------------------------------------


@contextlib.contextmanager
def imports_without_gc(freeze: bool = False):
    """For a start's imports: torch, transformers and Sacred make about a million objects while they
    load, and Python's cyclic garbage collector scans them again and again meanwhile, though nearly
    all of them live as long as the process: paused, the fork server's imports take 2.9 instead of
    4.5 s of CPU and the launcher's 1.6 instead of 2.0 s (docs/benchmarks.md). freeze: what was
    loaded is moved out of the collector's sight for good (gc.freeze, meant for a process that forks
    without exec), so a site forked from the fork server neither scans it again nor copies the
    memory pages a scan would write to."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


def start_fork_server() -> None:
    """Sites start from a fork server that imported torch, transformers and the round loop once,
    instead of each site importing them again (seconds per site on a small machine). The server
    is a fresh single-threaded process, so forking from it is safe (CUDA is never initialized
    there), unlike forking this launcher. Idempotent.

    The command line starts it first thing, so its imports (the slowest part of a start) run
    while the launcher imports, reads the data and opens the run record. Its environment is
    fixed now: what the sites need from it is set here. Its stdout / stderr are the launcher's
    before Sacred began capturing; each site takes the launcher's current ones instead
    (`adopt_launcher_output`), so the sites' output lands in the run record.
    """
    import multiprocessing.forkserver

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the sites and the fork server watch it
    os.environ.setdefault("SCALING_FL_PROGRESS", "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines")
    # SIGINT / SIGTERM stay with our handler (InterruptHandler), which lets a second
    # Ctrl-C wait for the cleanup; elastic keeps SIGHUP, which it turns into a SignalException.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP"
    multiprocessing.set_forkserver_preload(["scaling_fl.train.preload"])
    # The server listens on a Unix socket in multiprocessing's temp folder (TMPDIR/pymp-*/listener-*),
    # and such paths are limited to 107 bytes: under a long TMPDIR it would not start at all.
    saved = tempfile.tempdir
    if len(tempfile.gettempdir()) > UNIX_SOCKET_DIR_MAX and os.access("/tmp", os.W_OK):
        tempfile.tempdir = "/tmp"
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        tempfile.tempdir = saved


def adopt_launcher_output() -> None:
    """Points this site's stdout and stderr at the launcher's current ones: while Sacred captures
    the run's output they are pipes to its tee, which the fork server (started earlier) does not
    hold. Only pipes and terminals are taken (opening a regular file again would start writing at
    offset 0); when they are the ones this process already has, nothing changes."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if not launcher.isdigit():
        return
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        path = f"/proc/{launcher}/fd/{fd}"
        try:
            target, current = os.stat(path), os.fstat(fd)
            if (target.st_dev, target.st_ino) == (current.st_dev, current.st_ino):
                continue
            if not (stat.S_ISFIFO(target.st_mode) or stat.S_ISCHR(target.st_mode)):
                continue
            opened = os.open(path, os.O_WRONLY)
        except OSError:
            continue
        stream.flush()
        os.dup2(opened, fd)
        os.close(opened)


# --- signals -----------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the launcher. A KeyboardInterrupt, so Sacred records the run as
    INTERRUPTED; the exit code is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class InterruptHandler:
    """The launcher's SIGINT/SIGTERM handler: the first signal raises `Interrupted` in the main
    thread; later ones (a second Ctrl-C) are only noted, so the cleanup the first one started
    (stopping the sites, removing the temp folder, closing the record) runs to its end."""

    def __init__(self):
        self.received: int | None = None

    def install(self) -> None:
        for signum in INTERRUPT_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            log.warning("%s again: still cleaning up, please wait", signal.Signals(signum).name)
            return
        self.received = signum
        raise Interrupted(signum)


# --- the job's temp folder -------------------------------------------------------------------


def _workdir_prefix(job_name: str) -> str:
    safe = "".join(char if char.isalnum() or char in "-_." else "_" for char in job_name)
    return f"scaling-fl-{safe}-"


def make_workdir(job_name: str) -> str:
    """A fresh temp folder for this start of the job, marked with the launcher's pid."""
    remove_stale_workdirs(job_name)
    workdir = tempfile.mkdtemp(prefix=_workdir_prefix(job_name))
    with open(os.path.join(workdir, "owner.json"), "w", encoding="utf-8") as handle:
        json.dump({"pid": os.getpid(), "start_time": process_start_time(os.getpid())}, handle)
    return workdir


def remove_stale_workdirs(job_name: str) -> list[str]:
    """Removes the temp folders of this job whose launcher is dead (killed before it could clean up)."""
    removed = []
    base, prefix = tempfile.gettempdir(), _workdir_prefix(job_name)
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if not name.startswith(prefix) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, "owner.json"), encoding="utf-8") as handle:
                owner = json.load(handle)
            alive = pid_alive(int(owner["pid"]), owner.get("start_time"))
        except (OSError, ValueError, KeyError, TypeError):
            alive = time.time() - os.path.getmtime(path) < 60  # being created right now, or not ours
        if not alive:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d temp folder(s) left by an earlier start of job %r", len(removed), job_name)
    return removed


# --- errors a restart cannot fix ------------------------------------------------------------


def restart_cannot_fix(error: BaseException) -> bool:
    """A full disk, a denied permission or rejected credentials stay so on the next attempt:
    restarting the sites would only burn `max_restarts` before the same error."""
    from scaling_fl import storage

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, storage.StorageError):
            return error.permanent
        if isinstance(error, PermissionError) or getattr(error, "errno", None) in storage.PERMANENT_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


PERMANENT_ERROR_FILE = "permanent-error.json"


class PermanentSiteError(RuntimeError):
    """Raised by a restarted site when an earlier attempt met an error that a restart cannot fix:
    it stops before any work, so the remaining restarts pass in seconds."""


def record_permanent_error(workdir: str, rank: int, error: BaseException) -> None:
    """Written by the site that met the error, first writer wins (a full disk may refuse even this)."""
    import traceback

    from scaling_fl.storage import first_line

    payload = {
        "rank": rank,
        "message": first_line(error) if str(error) else type(error).__name__,
        "trace": "".join(traceback.format_exception(error)),
    }
    try:
        with open(os.path.join(workdir, PERMANENT_ERROR_FILE), "x", encoding="utf-8") as handle:
            json.dump(payload, handle)
    except OSError:
        pass


def read_permanent_error(workdir: str) -> dict | None:
    try:
        with open(os.path.join(workdir, PERMANENT_ERROR_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def stop_if_permanent_error(workdir: str) -> None:
    found = read_permanent_error(workdir)
    if found is not None:
        raise PermanentSiteError(
            f"not restarted: site {found['rank']} met an error a restart cannot fix: {found['message']}"
        )
