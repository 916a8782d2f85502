"""What users lose when things go wrong around a run: two starts of one job, a launcher killed with
SIGKILL, a tracking store or runs_dir lost mid-run, signals, a frozen site, a full disk. Every test
starts the real command line and breaks it from outside."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from scaling_fl import checkpoint, processes
from scaling_fl.processes import descendants
from tests.cli import TINY_JOB, cli_command, read_record, run_cli, run_records
from tests.servers import free_port, port_open

pytestmark = pytest.mark.slow  # every test here starts the command line

# Six rounds: what a test does mid-run (a signal, a failing store) happens right after a committed
# round and meets the job alive with rounds to go; the mid-run second start holds the sites instead.
JOB = [*TINY_JOB, "site_ids=[0,0]", "synthetic_train_size=480", "synthetic_test_size=60", "num_rounds=6"]
REFUSED = re.compile(
    r"^scaling-fl: error: job_name='(\w+)' is already running: launcher pid (\d+) on host \S+", re.MULTILINE
)


class Launcher:
    """One start of the command line, its output in a file so that it can be read while it runs."""

    def __init__(self, cwd: Path, *args: str, env: dict | None = None, name: str = "launcher"):
        self.log = cwd / f"{name}-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                cli_command("with", *args),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output()[-3000:]}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_until(condition, launcher: Launcher, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert launcher.process.poll() is None, f"exited before {what}:\n{launcher.output()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{launcher.output()[-3000:]}"
        time.sleep(0.1)


def committed(ck: Path, round_number: int):
    return lambda: (ck / f"round-{round_number:06d}" / checkpoint.MARKER).exists()


def alive(pid: int) -> bool:
    return processes.process_state(pid) not in (None, "Z")


def final_record(runs: Path) -> dict:
    records = run_records(runs)
    assert len(records) == 1, records
    return read_record(records[0])


def assert_each_round_once(record: dict, rounds: int) -> None:
    for name in ("validation.accuracy", "validation.loss", "train.loss"):
        assert record["metrics"][name]["steps"] == list(range(1, rounds + 1)), name


@pytest.fixture(scope="module")
def two_starts(tmp_path_factory):
    """Three starts of one job: two at once, a third mid-run, once the winner has committed round 1.
    The winner's sites are held (SIGSTOP) until the third start has exited, so that it meets the job
    alive however long its own start takes on a loaded machine; the winner's launcher keeps renewing
    its claim meanwhile. The winner is the reference run."""
    tmp = tmp_path_factory.mktemp("two-starts")
    args = [*JOB, "job_name=twice", f"runs_dir={tmp / 'runs'}", f"checkpoints_dir={tmp / 'ck'}"]
    first, second = Launcher(tmp, *args), Launcher(tmp, *args)
    deadline = time.monotonic() + 240
    while not committed(tmp / "ck", 1)() or (first.process.poll() is None and second.process.poll() is None):
        assert first.process.poll() is None or second.process.poll() is None, first.output() + second.output()
        assert time.monotonic() < deadline, "no checkpoint of round 1 and one refusal within 240 s"
        time.sleep(0.1)
    (winner,) = [launcher for launcher in (first, second) if launcher.process.poll() is None]
    sites = descendants(winner.pid)
    for pid in sites:
        os.kill(pid, signal.SIGSTOP)
    try:
        late = Launcher(tmp, *args)
        late.wait()
    finally:
        for pid in sites:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    codes = [launcher.wait() for launcher in (first, second, late)]
    return tmp, [first, second, late], codes


def test_two_starts_of_one_job_at_once_or_one_mid_run_run_it_once(two_starts):
    tmp, launchers, codes = two_starts
    assert sorted(codes) == [0, 2, 2], [launcher.output()[-2000:] for launcher in launchers]
    winner = launchers[codes.index(0)]
    for launcher, code in zip(launchers, codes):
        if code == 2:
            refusal = REFUSED.search(launcher.output())
            assert refusal, launcher.output()[-2000:]
            assert refusal.group(1) == "twice" and int(refusal.group(2)) == winner.pid
            assert "resume=force" in launcher.output()
            assert "Traceback" not in launcher.output()
    record = final_record(tmp / "runs")
    assert record["run"]["status"] == "COMPLETED"
    assert_each_round_once(record, 6)
    assert checkpoint.list_rounds(str(tmp / "ck")) == [4, 5, 6]  # one writer, whose retention kept the last 3


def test_sigkill_of_the_launcher_takes_every_site_with_it_and_the_job_resumes_exactly(tmp_path, two_starts):
    reference = final_record(two_starts[0] / "runs")
    work = tmp_path / "tmp"
    work.mkdir()
    args = [*JOB, "job_name=killed", f"runs_dir={tmp_path / 'runs'}", f"checkpoints_dir={tmp_path / 'ck'}"]
    launcher = Launcher(tmp_path, *args, env={"TMPDIR": str(work)})
    try:
        wait_until(committed(tmp_path / "ck", 2), launcher, "checkpoint of round 2")
        family = descendants(launcher.pid)
        assert len(family) >= 3  # the fork server and two sites at least
        launcher.process.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in family if alive(pid)], "processes of the job outlived their launcher"
    finally:
        launcher.kill()
    rounds_when_killed = checkpoint.list_rounds(str(tmp_path / "ck"))
    time.sleep(2)
    assert checkpoint.list_rounds(str(tmp_path / "ck")) == rounds_when_killed  # nobody writes on headless
    assert any(path.name.startswith("scaling-fl-killed-") for path in work.iterdir())  # left by the SIGKILL

    resumed = Launcher(tmp_path, *args, env={"TMPDIR": str(work)})  # at once: the dead launcher's claim is free
    assert resumed.wait() == 0, resumed.output()[-3000:]
    assert "resumed from" in resumed.output()
    record = final_record(tmp_path / "runs")
    assert record["run"]["status"] == "COMPLETED"
    assert_each_round_once(record, 6)
    assert record["info"]["final_weights_sha256"] == reference["info"]["final_weights_sha256"]
    assert [path.name for path in work.iterdir() if path.name.startswith("scaling-fl-")] == []


def test_sigterm_and_a_double_ctrl_c_are_interruptions_not_failures(tmp_path):
    work = tmp_path / "tmp"
    work.mkdir()
    # SIGTERM reaches a launcher whose two sites are processes of their own; the double Ctrl-C one that
    # trains both sites itself (processes_per_device=1: one worker runs in the launcher's process).
    for signals, code, name, packing in (
        ([signal.SIGTERM], 143, "SIGTERM", []),
        ([signal.SIGINT, signal.SIGINT], 130, "SIGINT", ["processes_per_device=1"]),
    ):
        runs, ck = tmp_path / f"runs-{name}", tmp_path / f"ck-{name}"
        launcher = Launcher(
            tmp_path,
            *JOB,
            *packing,
            f"job_name=stop-{name}",
            f"runs_dir={runs}",
            f"checkpoints_dir={ck}",
            env={"TMPDIR": str(work)},
        )
        try:
            wait_until(committed(ck, 1), launcher, "checkpoint of round 1")
            for signum in signals:
                launcher.process.send_signal(signum)
                time.sleep(0.3)
            assert launcher.wait(60) == code, launcher.output()[-3000:]
        finally:
            launcher.kill()
        output = launcher.output()
        line = re.search(
            rf"^scaling-fl: interrupted by {name} after round (\d+) of 6; re-run with "
            rf"job_name=stop-{name} to resume from its last checkpoint$",
            output,
            re.MULTILINE,
        )
        assert line, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        record = final_record(runs)
        assert record["run"]["status"] == "INTERRUPTED"
        assert record["info"]["sites"]["in_launcher"] is bool(packing)
        # (torch keeps its compiler cache there, shared by every run: not something a run leaves behind)
        left = [path.name for path in work.iterdir() if not path.name.startswith("torchinductor_")]
        assert left == [], f"left in the temp folder after {name}: {left}"


def test_a_frozen_site_is_restarted_seconds_after_the_collective_timeout(tmp_path):
    ck = tmp_path / "ck"
    # Small rounds: the peer reaches the collective that waits for the frozen site at once.
    launcher = Launcher(
        tmp_path,
        *JOB,
        "num_rounds=4",
        "synthetic_train_size=160",
        "collective_timeout_s=10",
        "max_restarts=1",
        "job_name=frozen",
        f"runs_dir={tmp_path / 'runs'}",
        f"checkpoints_dir={ck}",
    )
    try:
        wait_until(committed(ck, 1), launcher, "checkpoint of round 1")
        first = site_pids(launcher.pid)
        assert len(first) == 2, first
        victim, (peer,) = max(first), first - {max(first)}
        os.kill(victim, signal.SIGSTOP)
        frozen_at = time.monotonic()
        # The collective timeout runs from when the peer waits for the frozen site: after it finished
        # the local steps of its round, which on a busy machine take a second or two.
        waiting_at = wait_until_idle(peer, launcher)
        wait_until(lambda: len(site_pids(launcher.pid) - first) == 2, launcher, "restarted sites", timeout=60)
        restarted = time.monotonic()
        assert launcher.wait() == 0, launcher.output()[-3000:]
    finally:
        launcher.kill()
    # The README: timeout + 5 s on an idle machine; CI's two loaded cores measured up to timeout + 6.1 s
    # (three runs: 15.1, 15.4, 16.1 s). The bound catches what matters: elastic's 30 s SIGTERM grace on a
    # stopped process (43.8 s before the stopped-site watch) or any other wait of that size.
    assert restarted - waiting_at <= 10 + 10, (restarted - waiting_at, waiting_at - frozen_at)
    assert waiting_at - frozen_at < 10, waiting_at - frozen_at  # the peer did reach the collective soon
    assert not alive(victim)
    assert_each_round_once(final_record(tmp_path / "runs"), 4)


def wait_until_idle(pid: int, launcher: Launcher, quiet_s: float = 0.5) -> float:
    """When process `pid` stopped using CPU (blocked, e.g. in a collective): the time of the first of
    the samples, 0.1 s apart, over which its CPU time stayed the same for `quiet_s`."""
    samples: list[tuple[float, int]] = []
    while True:
        assert launcher.process.poll() is None, f"exited while waiting for {pid} to block:\n{launcher.output()[-3000:]}"
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        samples.append((time.monotonic(), int(fields[11]) + int(fields[12])))  # utime + stime, in ticks
        still = [t for t, ticks in samples if ticks == samples[-1][1]]
        if samples[-1][0] - still[0] >= quiet_s:
            return still[0]
        time.sleep(0.1)


def site_pids(launcher_pid: int) -> set[int]:
    """The sites: the children of the launcher's fork server."""
    servers = [
        pid for pid in descendants(launcher_pid) if _parent(pid) == launcher_pid and "forkserver" in _cmdline(pid)
    ]
    return {pid for server in servers for pid in descendants(server) if _parent(pid) == server and alive(pid)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


# --- stores that fail -----------------------------------------------------------------


@pytest.fixture
def small_mount(tmp_path):
    """A tmpfs of its own (root only, as in CI): can be filled up or made read-only mid-run."""
    mounts = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"these tests mount a tmpfs and need root: {result.stderr}"
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_fails_at_once_without_burning_restarts(tmp_path, small_mount):
    ck = small_mount("ck", "12m")  # one tiny-bert checkpoint (~8.3 MB) fits, a second does not
    started = time.monotonic()
    result = run_cli(
        tmp_path,
        "with",
        *JOB,
        "max_restarts=3",
        "keep_last_checkpoints=2",
        "job_name=full",
        f"runs_dir={tmp_path / 'runs'}",
        f"checkpoints_dir={ck}",
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "no space left on the device" in result.stderr and "not retried" in result.stderr, result.stderr[-3000:]
    assert "sites restarted" not in result.stderr
    assert elapsed < 60, elapsed
    assert checkpoint.latest(str(ck)).round == 1  # the good checkpoint stays good
    assert final_record(tmp_path / "runs")["run"]["status"] == "FAILED"


def run_and_break_after_round_2(tmp_path, args: list[str], ck: Path, break_store, env: dict | None = None):
    """Starts the job, breaks its tracking store once round 2 is checkpointed, lets training finish;
    returns (launcher, exit code, seconds from the last checkpoint to the exit)."""
    launcher = Launcher(tmp_path, *args, env=env)
    try:
        wait_until(committed(ck, 2), launcher, "checkpoint of round 2")
        break_store()
        wait_until(committed(ck, 6), launcher, "checkpoint of round 6")
        trained_at = time.monotonic()
        code = launcher.wait(120)
        return launcher, code, time.monotonic() - trained_at
    finally:
        launcher.kill()


def test_runs_dir_made_read_only_mid_run_fails_the_job_and_a_rerun_completes_the_record(tmp_path, small_mount):
    runs = small_mount("runs", "64m")
    ck = tmp_path / "ck"
    args = [*JOB, "job_name=readonly", f"runs_dir={runs}", f"checkpoints_dir={ck}"]
    try:
        launcher, code, exited_after = run_and_break_after_round_2(
            tmp_path, args, ck, lambda: subprocess.run(["mount", "-o", "remount,ro", str(runs)], check=True)
        )
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(runs)], check=True)
    output = launcher.output()
    assert code == 3, output[-3000:]
    assert exited_after < 15, exited_after
    lines = [line for line in output.splitlines() if line.startswith("scaling-fl: error:")]
    assert len(lines) == 1 and f"runs_dir {runs}" in lines[0] and "job_name=readonly" in lines[0], output[-3000:]
    assert "Traceback" not in output
    assert read_record(run_records(runs)[0])["run"]["status"] == "RUNNING"  # the record stopped mid-run

    rerun = run_cli(tmp_path, "with", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    record = final_record(runs)
    assert record["run"]["status"] == "COMPLETED"
    assert_each_round_once(record, 6)


def test_mongo_lost_mid_run_fails_the_job_and_a_rerun_completes_the_record(tmp_path):
    from tests.servers import executable

    port, database = free_port(), tmp_path / "mongo.db"

    def start_mongo():
        process = subprocess.Popen(
            [
                executable("nx-27017"),
                "--db",
                str(database),
                "--host",
                "127.0.0.1",
                "-p",
                str(port),
                "--log-file",
                str(tmp_path / "mongo.log"),
                "--pid-file",
                str(tmp_path / "mongo.pid"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not port_open(port):
            assert process.poll() is None and time.monotonic() < deadline, "nx-27017 did not start"
            time.sleep(0.1)
        return process

    env = {"SACRED_URL": f"mongodb://127.0.0.1:{port}/", "SACRED_DATABASE": "lost"}
    ck = tmp_path / "ck"
    args = [*JOB, "job_name=mongo-lost", f"checkpoints_dir={ck}"]
    server = start_mongo()
    try:
        launcher, code, exited_after = run_and_break_after_round_2(tmp_path, args, ck, server.kill, env=env)
    finally:
        server.kill()
    output = launcher.output()
    assert code == 3, output[-3000:]
    assert exited_after < 15, exited_after
    lines = [line for line in output.splitlines() if line.startswith("scaling-fl: error:")]
    assert len(lines) == 1 and f"MongoDB at 127.0.0.1:{port}" in lines[0], output[-3000:]
    assert "Traceback" not in output and not list(tmp_path.glob("**/sacred_mongo_fail_*"))

    server = start_mongo()
    try:
        rerun = run_cli(tmp_path, "with", *args, env=env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        import pymongo

        db = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=5000)["lost"]
        runs = list(db.runs.find({"config.job_name": "mongo-lost"}))
        assert len(runs) == 1 and runs[0]["status"] == "COMPLETED"
        steps = db.metrics.find_one({"run_id": runs[0]["_id"], "name": "validation.accuracy"})["steps"]
        assert steps == [1, 2, 3, 4, 5, 6]
    finally:
        server.kill()
