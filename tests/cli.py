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


def run_cli(cwd: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_records(runs_dir: Path) -> list[Path]:
    return sorted((p for p in runs_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) if runs_dir.exists() else []


def read_record(run_dir: Path) -> dict:
    record = {name: json.loads((run_dir / f"{name}.json").read_text())
              for name in ("run", "config", "metrics", "info") if (run_dir / f"{name}.json").exists()}
    record["cout"] = (run_dir / "cout.txt").read_text() if (run_dir / "cout.txt").exists() else ""
    return record
