"""Wall and CPU time of one start of the real command line, for one or more checkouts side by side.

The test suite starts the command line about 100 times; each start pays a fixed cost (imports in
the launcher, the sites' fork server importing torch and transformers, shutdown) before and
after a training step that takes a fraction of a second. This times a 1-round, 2-site tiny job
(tiny random BERT, the offline synthetic task, 200 rows) from each checkout, alternating between
checkouts so that both see the same machine load, and prints the median and the spread. CPU is
user + system time of every process of the start: this process is their subreaper, so the fork
server and the sites, which outlive the launcher by a moment, are counted too. On 2 cores with one
test worker per core, CPU is what the suite's time follows.

    .venv/bin/python bench/cli_start.py --repeats 5 OLD_CHECKOUT .
    .venv/bin/python bench/cli_start.py --repeats 5 --sites 8 OLD_CHECKOUT .

A checkout is a folder with scripts/train_federated.py and the scaling_fl package (for example
`git worktree add /tmp/old <rev>`); it runs with this interpreter, its own package first on the
path.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import resource
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
    "num_rounds=1",
    "synthetic_train_size=200",
    "synthetic_test_size=100",
]


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of a start (the fork server, when the launcher ends first) become our children."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def reap_all() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except OSError as error:
            if error.errno == errno.ECHILD:
                return
            raise


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_start(checkout: Path, sites: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        site_ids = f"site_ids=[{','.join(['0'] * sites)}]"
        cpu_before = children_cpu_s()
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(checkout / "scripts" / "train_federated.py"), *JOB, site_ids, f"runs_dir={work}/runs"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        elapsed = time.perf_counter() - started
        reap_all()
        cpu = children_cpu_s() - cpu_before
    if result.returncode != 0:
        raise SystemExit(f"{checkout}: exit code {result.returncode}\n{result.stderr[-2000:]}")
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sites", type=int, default=2, help="sites, one process each, on device 0")
    args = parser.parse_args()
    become_subreaper()
    checkouts = [path.resolve() for path in args.checkouts]
    times: dict[Path, list[float]] = {path: [] for path in checkouts}
    cpus: dict[Path, list[float]] = {path: [] for path in checkouts}
    for path in checkouts:  # warm the page cache; not counted
        one_start(path, args.sites)
    for _ in range(args.repeats):
        for path in checkouts:
            wall, cpu = one_start(path, args.sites)
            times[path].append(wall)
            cpus[path].append(cpu)
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {args.sites} sites")
    print("| checkout | wall, median (s) | min-max (s) | CPU, median (s) | min-max (s) |")
    print("|---|---|---|---|---|")
    for path in checkouts:
        wall, cpu = times[path], cpus[path]
        print(
            f"| {path} | {statistics.median(wall):.2f} | {min(wall):.2f}-{max(wall):.2f} "
            f"| {statistics.median(cpu):.2f} | {min(cpu):.2f}-{max(cpu):.2f} |"
        )
    if len(checkouts) == 2:
        for name, values in (("wall", times), ("CPU", cpus)):
            first, second = (statistics.median(values[path]) for path in checkouts)
            print(f"{name} ratio second/first: {second / first:.2f}")


if __name__ == "__main__":
    main()
