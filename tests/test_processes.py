"""Process lifetimes, in-process: signals, parent death, stopped peers, temp folders, permanent errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from scaling_fl import processes, storage


def test_the_first_signal_interrupts_and_a_second_one_waits_for_the_cleanup():
    handler = processes.InterruptHandler()
    previous = {signum: signal.getsignal(signum) for signum in processes.INTERRUPT_SIGNALS}
    try:
        handler.install()
        with pytest.raises(processes.Interrupted) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stop.value.exit_code == 143 and str(stop.value) == "SIGTERM"
        assert isinstance(stop.value, KeyboardInterrupt)  # so Sacred records INTERRUPTED
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C during the cleanup: noted, not raised
        time.sleep(0.1)
        assert handler.received == signal.SIGTERM
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def test_a_grandchild_dies_with_its_parent_killed_by_sigkill(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    (tmp_path / "grandchild.py").write_text(
        textwrap.dedent(f"""
        import os, sys, time
        from scaling_fl import processes
        processes.die_with_parent(expected_parent=int(sys.argv[1]))
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    )
    (tmp_path / "parent.py").write_text(
        textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, {str(tmp_path / "grandchild.py")!r}, str(os.getpid())])
        time.sleep(60)
    """)
    )
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the grandchild did not start"
            time.sleep(0.05)
        grandchild = int(pid_file.read_text())
        assert processes.pid_alive(grandchild)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while processes.pid_alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not processes.pid_alive(grandchild)
    finally:
        parent.kill()


def test_a_stopped_process_is_continued_once_a_peer_has_exited():
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        with processes.StoppedSiteWatch(poll_s=0.1):
            time.sleep(0.5)
            assert processes.process_state(stopped.pid) == "T"  # nobody failed yet: left alone
            peer.kill()
            peer.wait()
            deadline = time.monotonic() + 5
            while processes.process_state(stopped.pid) == "T" and time.monotonic() < deadline:
                time.sleep(0.05)
        assert processes.process_state(stopped.pid) not in ("T", None)
    finally:
        stopped.kill()
        peer.kill()


def test_a_dead_launchers_temp_folder_is_removed_at_the_next_start_and_a_live_ones_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (
        ("scaling-fl-job-dead", dead.pid),
        ("scaling-fl-job-live", os.getpid()),
        ("scaling-fl-other-dead", dead.pid),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "owner.json").write_text(json.dumps({"pid": pid, "start_time": None}))
    workdir = processes.make_workdir("job")
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != os.path.basename(workdir)) == [
        "scaling-fl-job-live",
        "scaling-fl-other-dead",
    ]
    assert json.loads((tmp_path / os.path.basename(workdir) / "owner.json").read_text())["pid"] == os.getpid()


@pytest.mark.parametrize(
    "error, permanent",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (PermissionError(errno.EACCES, "Permission denied"), True),
        (OSError(errno.EROFS, "Read-only file system"), True),
        (OSError(errno.ECONNRESET, "Connection reset by peer"), False),
        (RuntimeError("Connection closed by peer"), False),
    ],
    ids=["no-space", "permission", "read-only", "connection-reset", "peer-gone"],
)
def test_errors_a_restart_cannot_fix_are_told_from_the_others(error, permanent, tmp_path):
    assert processes.restart_cannot_fix(error) is permanent
    try:  # also when wrapped by another exception, and when it comes as the storage layer's one line
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("while saving the checkpoint") from inner
    except RuntimeError as outer:
        assert processes.restart_cannot_fix(outer) is permanent
    full = tmp_path / "full"
    stored = storage._storage_error(str(full), error, writing=True)
    assert stored.permanent is permanent


def test_a_permanent_error_is_recorded_once_and_stops_the_restarted_sites(tmp_path):
    processes.record_permanent_error(str(tmp_path), 1, OSError(errno.ENOSPC, "No space left on device"))
    processes.record_permanent_error(str(tmp_path), 0, RuntimeError("a later error"))  # first writer wins
    found = processes.read_permanent_error(str(tmp_path))
    assert found["rank"] == 1 and "No space left on device" in found["message"]
    with pytest.raises(processes.PermanentSiteError, match="site 1 met an error a restart cannot fix"):
        processes.stop_if_permanent_error(str(tmp_path))


def test_the_fork_server_internals_the_launcher_stops_are_still_there():
    """launch._stop_fork_server uses CPython's private forkserver attributes: fail loudly when they go."""
    import multiprocessing.forkserver

    server = multiprocessing.forkserver._forkserver
    assert callable(getattr(server, "_stop", None)) and hasattr(server, "_forkserver_pid")


def test_a_site_writes_where_the_launcher_writes_now_not_where_the_fork_server_started(tmp_path):
    """The fork server starts before Sacred's capture; each site takes the launcher's current pipes."""
    launcher = textwrap.dedent(f"""
        import os, subprocess, sys
        read_end, write_end = os.pipe()          # what Sacred's capture puts on fd 1 and 2
        stale = open({str(tmp_path / "stale.txt")!r}, 'w')  # what the fork server inherited
        os.dup2(write_end, 1); os.dup2(write_end, 2); os.close(write_end)
        site = subprocess.Popen([sys.executable, '-c',
            'from scaling_fl import processes; processes.adopt_launcher_output(); print("from the site", flush=True)'],
            stdout=stale, stderr=stale, env={{**os.environ, {processes.LAUNCHER_PID_ENV!r}: str(os.getpid())}})
        site.wait()
        os.close(1); os.close(2)
        sys.__stdout__ = None
        with open({str(tmp_path / "captured.txt")!r}, 'wb') as out:
            out.write(os.read(read_end, 1000))
    """)
    subprocess.run([sys.executable, "-c", launcher], timeout=60, check=False)
    assert (tmp_path / "captured.txt").read_text() == "from the site\n"
    assert (tmp_path / "stale.txt").read_text() == ""


def test_a_site_keeps_a_regular_file_it_shares_with_the_launcher(tmp_path):
    """`cmd > log.txt` without capture: reopening the file would write from offset 0; nothing changes."""
    log_file = tmp_path / "log.txt"
    with open(log_file, "w") as out:
        out.write("launcher line\n")
        out.flush()
        code = 'from scaling_fl import processes; processes.adopt_launcher_output(); print("site line", flush=True)'
        subprocess.run(
            [sys.executable, "-c", code],
            stdout=out,
            stderr=out,
            timeout=60,
            check=True,
            env={**os.environ, processes.LAUNCHER_PID_ENV: str(os.getpid())},
        )
    assert log_file.read_text() == "launcher line\nsite line\n"


def test_the_command_line_skips_the_teardown_but_runs_exit_functions_and_keeps_the_exit_code(tmp_path):
    """run_and_exit ends with os._exit after atexit's functions (a private CPython call, checked here)."""
    marker = tmp_path / "exit-functions-ran"
    code = textwrap.dedent(f"""
        import atexit, sys
        atexit.register(lambda: open({str(marker)!r}, "w").write("yes"))
        print("buffered line", end="")  # no newline, no flush: run_and_exit must flush it
        from scaling_fl.cli import run_and_exit
        run_and_exit(["train_federated.py", "with", "no_such_key=1"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown config key 'no_such_key'" in result.stderr
    assert result.stdout == "buffered line" and marker.read_text() == "yes"


def test_the_fork_server_starts_under_a_tmpdir_too_long_for_a_unix_socket(tmp_path):
    """multiprocessing puts the server's socket under TMPDIR; a long one (pytest-xdist's, a deep
    scratch folder) made `bind` fail with 'AF_UNIX path too long' before any site started."""
    deep = tmp_path / ("d" * 60) / ("e" * 30)
    deep.mkdir(parents=True)
    code = "from scaling_fl import processes; processes.start_fork_server(); print('started')"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(deep)},
    )
    assert result.returncode == 0 and result.stdout == "started\n", result.stderr[-2000:]


def test_a_site_reading_its_rows_imports_nothing_the_fork_server_has_not_loaded_and_frozen(tmp_path):
    """Every site is forked from the fork server: a module a site imports on its own costs CPU in
    every site of every run (pyarrow imports pandas on its first conversion from numpy, ~0.4 s)."""
    import numpy as np

    from scaling_fl.data.dataset import TextDataset
    from scaling_fl.data.prepared import PreparedData, save_prepared

    texts = [f"text {i}" for i in range(8)]
    rows = TextDataset(texts=texts, labels=np.arange(8) % 2, label_names=("a", "b"), source="t")
    save_prepared(PreparedData(train=rows, test=rows, parts=[np.arange(4), np.arange(4, 8)]), str(tmp_path))
    script = textwrap.dedent(
        f"""
        import json, sys
        import scaling_fl.train.preload
        loaded = set(sys.modules)
        from scaling_fl.data.prepared import load_worker_data
        data = load_worker_data({str(tmp_path)!r}, sites=(0, 1), worker=0, num_workers=1)
        assert data.site_sizes == [4, 4] and data.train[1].texts[0] == "text 4", data
        print(json.dumps(sorted(set(sys.modules) - loaded)))
        import gc
        print(json.dumps([gc.isenabled(), gc.get_freeze_count()]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    *_, imported, collector = result.stdout.strip().splitlines()
    imported_by_the_site = json.loads(imported)
    enabled, frozen = json.loads(collector)
    assert enabled and frozen > 100_000  # what the fork server loaded is frozen; the collector runs again
    assert not [name for name in imported_by_the_site if name.split(".")[0] in ("pandas", "torch", "transformers")]
    assert len(imported_by_the_site) < 10, imported_by_the_site


def test_imports_without_gc_pauses_the_collector_and_restores_what_it_found():
    import gc

    assert gc.isenabled()
    with processes.imports_without_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ImportError), processes.imports_without_gc():
        import no_such_module  # noqa: F401
    assert gc.isenabled()  # after a failed import too
    gc.disable()
    try:
        with processes.imports_without_gc():
            pass
        assert not gc.isenabled()  # it was off: it stays off
    finally:
        gc.enable()
