"""Runs the real entry point in a subprocess and reads the Sacred file-store record it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_federated.py"

# Small and fast: tiny random BERT with the MiniLM vocabulary on the offline synthetic task.
TINY_JOB = ["model=tiny-bert", "task_name=synthetic", "max_seq_len=32", "learning_rate=0.003", "batch_size=16"]


# Set by an autouse fixture (tests/conftest.py) for each test: whether it is marked slow.
current_test_is_slow = True


def cli_command(*args: str) -> list[str]:
    """The real entry point's command line. Only tests marked slow may start it: the fast tier
    (./dev/test.sh --fast, `-m "not slow"`) stays in-process."""
    if not current_test_is_slow:
        raise AssertionError(
            "this test starts the command line (~10 s): mark it @pytest.mark.slow, "
            "or test the function it exercises in-process"
        )
    return [sys.executable, str(SCRIPT), *args]


def run_cli(cwd: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def raw_config(updates: list[str], **given) -> dict:
    """`key=value` command-line items as the raw config Sacred would make of them (values parsed as
    Python literals where they are one), over `given`."""
    import ast

    raw = dict(given)
    for update in updates:
        key, value = update.split("=", 1)
        try:
            raw[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raw[key] = value
    return raw


def run_records(runs_dir: Path) -> list[Path]:
    return (
        sorted((p for p in runs_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        if runs_dir.exists()
        else []
    )


def read_record(run_dir: Path) -> dict:
    record = {
        name: json.loads((run_dir / f"{name}.json").read_text())
        for name in ("run", "config", "metrics", "info")
        if (run_dir / f"{name}.json").exists()
    }
    record["cout"] = (run_dir / "cout.txt").read_text() if (run_dir / "cout.txt").exists() else ""
    return record
