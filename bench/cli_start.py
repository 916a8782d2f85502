"""Wall time of one start of the real command line, for one or more checkouts side by side.

The test suite starts the command line about 60 times; each start pays a fixed cost (imports in
the launcher, the sites' fork server importing torch and transformers, shutdown) before and
after a training step that takes a fraction of a second. This times a 1-round, 2-site tiny job
(tiny random BERT, the offline synthetic task, 200 rows) from each checkout, alternating between
checkouts so that both see the same machine load, and prints the median and the spread.

    .venv/bin/python bench/cli_start.py --repeats 5 OLD_CHECKOUT .

A checkout is a folder with scripts/train_federated.py and the scaling_fl package (for example
`git worktree add /tmp/old <rev>`); it runs with this interpreter, its own package first on the
path.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = [
    "with",
    "model=tiny-bert",
    "task_name=synthetic",
    "max_seq_len=32",
    "batch_size=16",
    "site_ids=[0,0]",
    "num_rounds=1",
    "synthetic_train_size=200",
    "synthetic_test_size=100",
]


def one_start(checkout: Path) -> float:
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(checkout / "scripts" / "train_federated.py"), *JOB, f"runs_dir={work}/runs"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{checkout}: exit code {result.returncode}\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    checkouts = [path.resolve() for path in args.checkouts]
    times: dict[Path, list[float]] = {path: [] for path in checkouts}
    for path in checkouts:  # warm the page cache; not counted
        one_start(path)
    for _ in range(args.repeats):
        for path in checkouts:
            times[path].append(one_start(path))
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("| checkout | median (s) | min-max (s) |")
    print("|---|---|---|")
    for path, values in times.items():
        print(f"| {path} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |")
    if len(checkouts) == 2:
        first, second = (statistics.median(times[path]) for path in checkouts)
        print(f"ratio second/first: {second / first:.2f}")


if __name__ == "__main__":
    main()
