"""One base class for the errors a user can fix, one line on the command line, and the whole
chain of causes with SCALING_FL_DEBUG=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from scaling_fl import errors
from scaling_fl.checkpoint import CheckpointError
from scaling_fl.claim import ClaimRefused
from scaling_fl.config import ConfigError
from scaling_fl.data.dataset import DataError
from scaling_fl.errors import UserError
from scaling_fl.models import ModelError
from scaling_fl.tracking.observers import TrackingError
from scaling_fl.tracking.report import ReportError

# Each user-facing error and the built-in base existing `except` clauses rely on.
USER_ERRORS = [
    (ConfigError, ValueError),
    (DataError, ValueError),
    (ModelError, ValueError),
    (CheckpointError, RuntimeError),
    (TrackingError, RuntimeError),
    (ClaimRefused, RuntimeError),
    (ReportError, RuntimeError),
]


@pytest.mark.parametrize("error, builtin", USER_ERRORS, ids=[error.__name__ for error, _ in USER_ERRORS])
def test_user_errors_share_one_base_and_keep_their_builtin_one(error, builtin):
    assert issubclass(error, UserError) and issubclass(error, builtin)
    with pytest.raises(UserError):
        raise error("one line")
    with pytest.raises(builtin):
        raise error("one line")


def _raise_chained():
    try:
        try:
            {}["missing"]
        except KeyError as exc:
            raise OSError("the storage said no") from exc
    except OSError:
        raise DataError("data.csv: cannot open; check the path") from None


def test_debug_traceback_shows_every_cause_even_behind_from_none():
    with pytest.raises(DataError) as caught:
        _raise_chained()
    text = errors.debug_traceback(caught.value)
    assert text.index("KeyError") < text.index("OSError: the storage said no") < text.index("DataError: data.csv")
    assert "direct cause" in text and "During handling" in text
    assert "_raise_chained" in text  # frames, not just the messages


def test_print_error_is_one_line_unless_debug(capsys, monkeypatch):
    with pytest.raises(DataError) as caught:
        _raise_chained()
    monkeypatch.delenv(errors.DEBUG_VARIABLE, raising=False)
    errors.print_error(caught.value, prog="tool")
    assert capsys.readouterr().err == "tool: error: data.csv: cannot open; check the path\n"
    monkeypatch.setenv(errors.DEBUG_VARIABLE, "1")
    errors.print_error(caught.value, prog="tool")
    err = capsys.readouterr().err
    assert err.startswith("tool: error: data.csv: cannot open; check the path\nTraceback")
    assert "KeyError" in err and "OSError: the storage said no" in err


def test_report_prints_user_errors_through_the_same_path(tmp_path, capsys, monkeypatch):
    from scaling_fl.tracking import report

    monkeypatch.setenv(errors.DEBUG_VARIABLE, "1")
    assert report.main(["--runs-dir", str(tmp_path / "absent")], prog="report") == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("report: error: runs directory") and "ReportError" in err


def _cli(args: list[str], debug: bool, tmp_path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != errors.DEBUG_VARIABLE}
    if debug:
        env[errors.DEBUG_VARIABLE] = "1"
    code = f"from scaling_fl.cli import main; main({['train_federated.py', *args]!r})"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def test_unknown_key_is_one_line_and_debug_adds_the_traceback(tmp_path):
    args = ["with", "num_roundz=2"]
    plain = _cli(args, debug=False, tmp_path=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr == "scaling-fl: error: unknown config key 'num_roundz': did you mean num_rounds?\n"
    debug = _cli(args, debug=True, tmp_path=tmp_path)
    assert debug.returncode == 2
    lines = debug.stderr.splitlines()
    assert lines[0] == "scaling-fl: error: unknown config key 'num_roundz': did you mean num_rounds?"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "scaling_fl.config.ConfigError: unknown config key 'num_roundz': did you mean num_rounds?"


def test_bad_value_in_the_config_hook_shows_its_cause_with_debug(tmp_path):
    """print_config runs the config hook (validation) but starts nothing."""
    args = ["print_config", "with", "num_rounds=abc"]
    plain = _cli(args, debug=False, tmp_path=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == ["scaling-fl: error: num_rounds='abc' is not allowed: an integer >= 1"]
    debug = _cli(args, debug=True, tmp_path=tmp_path)
    assert debug.returncode == 2
    assert debug.stderr.startswith("scaling-fl: error: num_rounds='abc' is not allowed")
    assert "ValueError" in debug.stderr and "experiment.py" in debug.stderr
    assert debug.stderr.rstrip().endswith("ConfigError: num_rounds='abc' is not allowed: an integer >= 1")
