"""Rank 0's progress: a tqdm bar on a terminal, a plain line every few percent elsewhere (in-process)."""

import io
import logging

import pytest
from tqdm import tqdm

from scaling_fl.train import progress
from scaling_fl.train.progress import PROGRESS_ENV, LineProgress, progress_bar, progress_mode, terminal_mode


@pytest.fixture
def lines():
    """What the progress logger writes, as the run's captured output would hold it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logger = logging.getLogger("scaling_fl.progress")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_not_a_terminal_logs_a_line_every_few_percent_and_no_carriage_return(monkeypatch, lines, capfd):
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    bar = progress_bar(total=1000, unit="step", every_percent=5)
    assert isinstance(bar, LineProgress)
    bar.set_description("round 1/2")
    for step in range(1000):
        bar.update(1)
        if step == 499:
            bar.set_postfix(val_acc=f"{0.81234:.4f}")
    bar.close()
    bar.close()  # a second close adds nothing

    text = lines.getvalue()
    logged = text.splitlines()
    assert len(logged) == 100 // 5, text
    assert "\r" not in text
    assert " INFO round 1/2:   5% 50/1000 [" in logged[0]
    assert "100% 1000/1000" in logged[-1] and "step/s" in logged[-1] and logged[-1].endswith(", val_acc=0.8123]")
    assert "val_acc" not in logged[8] and "val_acc=0.8123" in logged[10]
    out, err = capfd.readouterr()
    assert "\r" not in out + err


def test_lines_uneven_totals_resume_and_the_final_count(monkeypatch, lines):
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    bar = progress_bar(total=7, unit="round")  # fewer steps than lines: one line per step
    for _ in range(7):
        bar.update(1)
    bar.close()
    assert len(lines.getvalue().splitlines()) == 7

    lines.truncate(0), lines.seek(0)
    bar = progress_bar(total=1000, initial=400, unit="step")  # a resumed run: lines from 45 % on
    for _ in range(240):
        bar.update(1)
    bar.close()  # stopped early: the last count is logged at close
    logged = lines.getvalue().splitlines()
    assert "45% 450/1000" in logged[0] and "60% 600/1000" in logged[-2] and "64% 640/1000" in logged[-1]
    assert len(logged) == 5

    lines.truncate(0), lines.seek(0)
    with progress_bar(total=1000, disable=True) as quiet:  # the other ranks
        quiet.update(1000)
    assert lines.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "bar")
    bar = progress_bar(total=10, disable=True, unit="step")
    try:
        assert isinstance(bar, tqdm)
    finally:
        bar.close()


def test_the_variable_overrides_what_the_process_sees(monkeypatch):
    monkeypatch.setattr("sys.stdout", FakeTerminal())
    monkeypatch.setattr("sys.stderr", FakeTerminal())
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert progress_mode() == "bar"  # unset: decided on this process's own output
    monkeypatch.setenv(PROGRESS_ENV, "lines")
    assert progress_mode() == "lines" and isinstance(progress_bar(total=10), LineProgress)
    monkeypatch.setenv(PROGRESS_ENV, "nonsense")
    assert progress_mode() == "bar"  # not bar / lines: as if unset

    monkeypatch.setattr("sys.stderr", io.StringIO())  # the bar's stream is a file or a pipe
    monkeypatch.delenv(PROGRESS_ENV)
    assert progress_mode() == "lines"
    monkeypatch.setenv(PROGRESS_ENV, " BAR ")
    assert progress_mode() == "bar"
    assert terminal_mode(FakeTerminal(), None) == "lines" and terminal_mode(FakeTerminal()) == "bar"


def test_the_launcher_passes_its_own_terminal_to_the_sites(monkeypatch):
    """start_fork_server's rule, as it runs before Sacred captures the launcher's output."""
    import multiprocessing
    import multiprocessing.forkserver

    from scaling_fl import processes

    monkeypatch.setattr(multiprocessing, "set_forkserver_preload", lambda modules: None)
    monkeypatch.setattr(multiprocessing.forkserver, "ensure_running", lambda: None)
    for name in ("TOKENIZERS_PARALLELISM", processes.LAUNCHER_PID_ENV, "TORCHELASTIC_SIGNALS_TO_HANDLE"):
        monkeypatch.setenv(name, "")  # restored after the test
    for stdout, stderr, expected in (
        (FakeTerminal(), FakeTerminal(), "bar"),
        (io.StringIO(), FakeTerminal(), "lines"),
        (FakeTerminal(), io.StringIO(), "lines"),
    ):
        monkeypatch.delenv(PROGRESS_ENV, raising=False)
        monkeypatch.setattr("sys.stdout", stdout)
        monkeypatch.setattr("sys.stderr", stderr)
        processes.start_fork_server()
        assert progress.os.environ[PROGRESS_ENV] == expected == terminal_mode()
    monkeypatch.setenv(PROGRESS_ENV, "bar")  # the user's choice stays
    processes.start_fork_server()
    assert progress.os.environ[PROGRESS_ENV] == "bar"
