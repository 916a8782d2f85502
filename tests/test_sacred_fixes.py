"""The Sacred patch (tracking/sacred_fixes.py): a private method of Sacred's Run is replaced, so a
test shows both that the bug is still there upstream and that the patch still fixes it."""

from __future__ import annotations

import pytest
from sacred import Experiment
from sacred.observers import FileStorageObserver
from sacred.run import Run

from scaling_fl.tracking import sacred_fixes


def _captured_output_of_a_failing_run(tmp_path) -> str:
    ex = Experiment("failing", save_git_info=False)
    ex.observers.append(FileStorageObserver(str(tmp_path)))

    @ex.main
    def main():
        print("the last words", flush=True)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ex.run(options={"--capture": "sys"})
    return (tmp_path / "1" / "cout.txt").read_text()


def test_sacred_still_loses_a_failing_runs_last_output_and_the_patch_keeps_it(tmp_path, monkeypatch):
    assert callable(getattr(Run, "_get_captured_output", None)), "Sacred renamed the method the patch replaces"
    monkeypatch.setattr(Run, "_get_captured_output", sacred_fixes._original)
    assert "the last words" not in _captured_output_of_a_failing_run(tmp_path / "plain"), (
        "Sacred fixed IDSIA/sacred#392 upstream: drop scaling_fl/tracking/sacred_fixes.py"
    )
    monkeypatch.setattr(Run, "_get_captured_output", sacred_fixes._get_captured_output_including_final)
    assert "the last words" in _captured_output_of_a_failing_run(tmp_path / "patched")
