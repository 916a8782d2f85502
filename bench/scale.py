"""scaling-fl against Flower's simulation engine on one federated job: wall time, peak memory, accuracy.

Why: scaling-fl hosts many sites in a few worker processes (README, "Many sites per process"); Flower's
simulation engine hosts virtual clients in Ray actors. This runs the same job with both, alternating the
systems, and reports medians, so the claim "fewer bytes of RSS and less time for the same accuracy" is a
measurement on this machine rather than a belief.

The job. AG News (the Crepe CSV test.csv, `--data`; research-only licence: read where it lies, split
files only in a temporary folder): a seeded permutation of its 7,600 rows, the first 6,000 the training
pool, the last 1,600 the evaluation set. Pretrained MiniLM (offline, `model=minilm`; Flower loads the same
folder, scaling_fl.models.minilm_path()), max_seq_len 64, batch 16, AdamW lr 5e-5 with scaling-fl's default
linear decay over the run's local steps, gradient clipping 1.0, one local epoch, FedAvg weighted by rows,
the global model scored on the 1,600 rows after every round. Configurations:

  a   4 sites x 250 rows (site k = pool rows 250k..250k+249), 3 rounds, all sites train
  b   64 sites sharing the 6,000-row pool (93-94 rows each, site k = the k-th np.array_split chunk),
      fraction_fit 0.25 (16 sites a round), 3 rounds
  sweep N   N sites sharing the 6,000-row pool, fraction_fit 0.25, 3 rounds: about 1,500 rows trained per
      round at every N (at N=4 that is one site, so one of the two workers idles; N=64 is `b`)

Same partitions in both systems. scaling-fl's `iid` split is a seeded shuffle of the training file
(scaling_fl/data/splits.py: array_split(permutation(rows))); the training file is written in the order
that this shuffle reads back as site k = pool chunk k, so no project option is needed. Flower gets the
very same row lists per site (its partition-id = scaling-fl's site). Batch order and dropout are seeded
from (seed, site, round) in both (bench/flower_scale/scale_task.py copies scaling-fl's local training), so
in `a` both train the same models up to float summation order. Participants in `b` differ: scaling-fl
draws them from (seed, round), Flower's FedAvg samples its own.

scaling-fl: the committed tree (`--commit`, default HEAD, exported with git archive to a temporary folder
and put first on PYTHONPATH, so edits in progress in the working tree do not leak in) through the real
command line, `scripts/train_federated.py with num_sites=N processes_per_device=2 fraction_fit=F
iid_split=True ...` (2 worker processes, one per core, one torch thread each), the Sacred file
store in a temporary folder; per-round figures from the run's metrics.json. Flower: flwr[simulation] in
its own virtual environment, made here on first use (`--flower-venv`, default under ~/.cache, outside the
repo; never a project dependency), `run_simulation` with FedAvg(fraction_train=F, fraction_evaluate=0),
evaluate_fn on the 1,600 rows, client resources num_cpus=1 on a Ray of 2 CPUs: 2 actors, one torch thread
each, the same parallelism as scaling-fl's 2 workers (Flower's default num_cpus=2 would give 1 actor).
`--processes 1 --flower-actors 1` compares the other equal setting: one scaling-fl worker and one Flower
actor (Flower's default), each with 2 torch threads.

Measured per run: wall time from process start to exit; peak RSS of the process tree, sampled every 0.2 s
from /proc (what psutil reads; psutil is not a project dependency), summed over the root process, all its
descendants, every process of its session (it is started in a new one) and any process started after the
run began whose command line names Ray (`ray::`, raylet, gcs_server), in case Ray re-parents them. Summed
RSS counts shared pages (torch's libraries, forked copy-on-write memory, Ray's shared object store) once
per process; the proportional set size (PSS, every 1 s) splits them and is reported beside it.

    .venv/bin/python bench/scale.py --quick                  # both systems, 4 sites x 20 rows, 1 round: a few minutes
    nohup .venv/bin/python bench/scale.py --out /tmp/scale.json > /tmp/scale-bench.log 2>&1 &  # a, b x2 + sweep
    .venv/bin/python bench/scale.py --report /tmp/scale.json [more.json]  # table and figures from saved results

Figures (memory and wall time vs number of sites) go to docs/figures/scale/. Targets (issue 12):
4 sites: RSS <= 0.35x Flower, wall <= 0.9x, accuracy >= Flower - 0.5 pt; 64 sites, fraction 0.25: RSS <=
0.25x, wall <= 0.8x, accuracy >= Flower - 0.5 pt; scaling-fl 64 sites <= 1.3x the RSS of 4 sites (2 processes).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.comm import AGNEWS, ROOT  # noqa: E402

SYSTEMS = ("scaling-fl", "flower")
FLOWER_APP = ROOT / "bench" / "flower_scale" / "app.py"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scaling-fl-bench"
POOL_ROWS, EVAL_ROWS, SEED = 6000, 1600, 0
PROCESSES = 2  # Flower actors (and scaling-fl workers unless --processes says otherwise): one per core
RAY_MARKS = ("ray::", "raylet", "gcs_server", "/ray/", "ray/_private", "ray/dashboard")


@dataclass(frozen=True)
class Job:
    name: str
    sites: int
    pool_rows: int
    fraction_fit: float
    rounds: int
    eval_rows: int = EVAL_ROWS

    @property
    def participants(self) -> int:
        return max(1, math.floor(self.fraction_fit * self.sites + 1e-9))


def planned_jobs(args) -> tuple[list[Job], list[Job]]:
    """The compared configurations (run `--repeats` times each) and the extra sweep points (once each)."""
    if args.quick:
        return [Job("quick", 4, 80, 1.0, 1, eval_rows=64)], []
    main = [job for job in (Job("a", 4, 1000, 1.0, 3), Job("b", 64, POOL_ROWS, 0.25, 3)) if job.name in args.jobs]
    sweep = [Job(f"sweep {n}", n, POOL_ROWS, 0.25, 3) for n in args.sweep if n != 64]  # 64 is `b`
    return main, sweep


# ------------------------------------------------------------------------------------------- data


def read_rows(source: Path) -> list[list[str]]:
    with open(source, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def write_rows(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)


def pool_and_eval(rows: list[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
    """The first 6,000 rows of a seeded permutation are the training pool, the last 1,600 the evaluation set."""
    order = np.random.default_rng(SEED).permutation(len(rows))
    return [rows[i] for i in order[:POOL_ROWS]], [rows[i] for i in order[-EVAL_ROWS:]]


def site_chunks(job: Job) -> list[np.ndarray]:
    """Pool rows of each site: site k gets the k-th contiguous chunk (a: rows 250k..250k+249)."""
    return np.array_split(np.arange(job.pool_rows), job.sites)


def scaling_fl_parts(job: Job, data_seed: int) -> list[np.ndarray]:
    """The training-file rows scaling-fl's `iid` split gives each site (a seeded shuffle, then chunks)."""
    from scaling_fl.data.splits import split_indices

    return split_indices(np.zeros(job.pool_rows, dtype=np.int64), job.sites, "iid", data_seed)


def write_job_data(job: Job, pool: list, evaluation: list, directory: Path, data_seed: int) -> dict[str, Path]:
    """train.csv ordered so that scaling-fl's split hands site k pool chunk k; eval.csv; Flower's data JSON
    with the same texts (cleaned by scaling-fl's own reader) and the same row lists per site."""
    from scaling_fl.data.readers import read_agnews

    directory.mkdir(parents=True, exist_ok=True)
    parts = scaling_fl_parts(job, data_seed)
    ordered: list = [None] * job.pool_rows
    for part, chunk in zip(parts, site_chunks(job), strict=True):
        for file_row, pool_row in zip(part, chunk, strict=True):
            ordered[int(file_row)] = pool[int(pool_row)]
    paths = {"train": directory / "train.csv", "eval": directory / "eval.csv", "flower": directory / "flower.json"}
    write_rows(paths["train"], ordered)
    write_rows(paths["eval"], evaluation[: job.eval_rows])
    train, test = read_agnews(str(paths["train"])), read_agnews(str(paths["eval"]))
    flower_data = {
        "train": {"texts": list(train.texts), "labels": [int(x) for x in train.labels]},
        "eval": {"texts": list(test.texts), "labels": [int(x) for x in test.labels]},
        "parts": [[int(i) for i in part] for part in parts],
    }
    paths["flower"].write_text(json.dumps(flower_data), encoding="utf-8")
    return paths


# ------------------------------------------------------------------------------ process-tree memory


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session, start time in clock ticks since boot) from /proc/PID/stat, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _proc_text(pid: int, name: str) -> str:
    return _read(f"/proc/{pid}/{name}")


def _rss_bytes(pid: int) -> int:
    text = _proc_text(pid, "statm").split()
    return int(text[1]) * os.sysconf("SC_PAGE_SIZE") if len(text) > 1 else 0


def _pss_bytes(pid: int) -> int:
    for line in _proc_text(pid, "smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def _boot_time() -> float:
    for line in _read("/proc/stat").splitlines():
        if line.startswith("btime"):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


def _label(pid: int) -> str:
    cmdline = _proc_text(pid, "cmdline").replace("\0", " ").strip()
    return cmdline[:160] or _proc_text(pid, "comm").strip()


class TreeSampler(threading.Thread):
    """Peak summed RSS (every `interval` s) and PSS (every `pss_every`-th sample) of a run's processes."""

    def __init__(self, root: int, limit_bytes: float, interval: float = 0.2, pss_every: int = 5):
        super().__init__(daemon=True)
        self.root, self.limit_bytes, self.interval, self.pss_every = root, limit_bytes, interval, pss_every
        self.over_limit = False
        self.session = os.getsid(root)
        self.start_ticks = (time.time() - _boot_time() - 1.0) * os.sysconf("SC_CLK_TCK")
        self.stop_event = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.at_peak: list[dict] = []
        self.seen: dict[int, str] = {}
        self.samples = 0

    def members(self) -> dict[int, str]:
        """pid -> why it counts: descendant, session or ray."""
        stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _proc_stat(int(p))) is not None}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        found, stack = {}, [self.root]
        while stack:
            pid = stack.pop()
            if pid in stats and pid not in found:
                found[pid] = "descendant"
                stack.extend(children.get(pid, []))
        for pid, (_, session, started) in stats.items():
            if pid in found:
                continue
            if session == self.session:
                found[pid] = "session"
            elif started >= self.start_ticks and any(mark in _proc_text(pid, "cmdline") for mark in RAY_MARKS):
                found[pid] = "ray"
        return found

    def sample(self) -> None:
        members = self.members()
        rss = {pid: _rss_bytes(pid) for pid in members}
        total = sum(rss.values())
        for pid, why in members.items():
            if pid not in self.seen:
                self.seen[pid] = f"{why}: {_label(pid)}"
        if total > self.peak_rss:
            self.peak_rss = total
            self.at_peak = [
                {"pid": pid, "why": members[pid], "rss_mb": rss[pid] / 2**20, "cmd": _label(pid)}
                for pid in sorted(rss, key=rss.get, reverse=True)
            ]
        if total > self.limit_bytes and not self.over_limit:  # stop the run before the machine runs out
            self.over_limit = True
            for pid in owned(members):
                _signal(pid, 9)
        if self.samples % self.pss_every == 0:
            self.peak_pss = max(self.peak_pss, sum(_pss_bytes(pid) for pid in members))
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def finish(self) -> list[int]:
        """Stops sampling; returns the run's own processes still alive (stragglers the root left behind)."""
        self.stop_event.set()
        self.join()
        return owned(self.members())


def owned(members: dict[int, str]) -> list[int]:
    """The members this script may signal: descendants and the run's session. Processes counted only because
    their command line names Ray are never signalled: on a shared machine they could be someone else's."""
    return sorted(pid for pid, why in members.items() if why != "ray")


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def measure(command: list[str], env: dict, log_path: Path, limit_gb: float) -> dict:
    """Runs `command` in a new session; wall time to its exit and the peaks of its process tree. A tree whose
    summed RSS passes `limit_gb` is killed and reported as not fitting."""
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        # cwd: the run's folder. A fork server (`python -c`) has the current directory first on sys.path, so
        # started in the repository its sites would import the working tree instead of the exported commit.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=log_path.parent
        )
        sampler = TreeSampler(process.pid, limit_gb * 2**30)
        sampler.start()
        returncode = process.wait()
        wall = time.monotonic() - started
    stragglers = [pid for pid in sampler.finish() if pid != process.pid]
    straggler_labels = [_label(pid) for pid in stragglers]
    for pid in stragglers:  # only processes of this run: its session or Ray processes it started
        _signal(pid, 15)
    if sampler.over_limit:
        return {"wall_s": wall, "peak_rss_mb": sampler.peak_rss / 2**20, "over_limit_gb": limit_gb}
    if returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"{' '.join(command[:3])} ... exited {returncode}; log {log_path}:\n{tail}")
    return {
        "wall_s": wall,
        "peak_rss_mb": sampler.peak_rss / 2**20,
        "peak_pss_mb": sampler.peak_pss / 2**20,
        "processes_seen": len(sampler.seen),
        "processes": sorted(sampler.seen.values()),
        "at_peak": sampler.at_peak,
        "stragglers": straggler_labels,
        "samples": sampler.samples,
    }


# ----------------------------------------------------------------------------------------- systems


def export_commit(directory: Path, commit: str) -> Path:
    """The project's files at `commit` (git archive) in `directory`, first on sys.path: scaling-fl runs from a
    clean committed tree, not from a working tree that others may be editing meanwhile."""
    directory.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    sys.path.insert(0, str(directory))
    return directory


def scaling_fl_command(
    job: Job, paths: dict[str, Path], runs: Path, source: Path, processes: int, options: list[str]
) -> list[str]:
    return [
        str(ROOT / ".venv" / "bin" / "python"),
        str(source / "scripts" / "train_federated.py"),
        "with",
        f"num_sites={job.sites}",
        f"processes_per_device={processes}",
        f"fraction_fit={job.fraction_fit}",
        "iid_split=True",
        "task_name=agnews",
        f"train_path={paths['train']}",
        f"test_path={paths['eval']}",
        "model=minilm",
        "max_seq_len=64",
        "batch_size=16",
        "val_batch_size=64",
        "optimizer=adamw",
        "learning_rate=5e-5",
        "num_local_epochs=1",
        f"num_rounds={job.rounds}",
        "seed=42",
        "data_seed=42",
        "validation_fraction=0",  # every pool row trains; validation.* is the 1,600-row evaluation set, as Flower's
        "tracking=file",
        f"runs_dir={runs}",
        "job_name=scale",
        *options,
    ]


def run_scaling_fl(
    job: Job, paths: dict[str, Path], workdir: Path, source: Path, limit_gb: float, processes: int, options: list[str]
) -> dict:
    runs = workdir / "runs"
    env = {**os.environ, "PYTHONPATH": str(source)}  # ahead of the .venv's editable install of ROOT
    command = scaling_fl_command(job, paths, runs, source, processes, options)
    result = measure(command, env, workdir / "scaling-fl.log", limit_gb)
    if "over_limit_gb" in result:
        return result
    (run_dir,) = [p for p in runs.iterdir() if p.name.isdigit()]
    values = {key: series["values"] for key, series in json.loads((run_dir / "metrics.json").read_text()).items()}
    result.update(
        accuracy_per_round=values["validation.accuracy"],
        round_s=values["time.round_s"],
        train_s=values["time.train_s"],
        eval_s=values["time.eval_s"],
        participants=values.get("sites.participants"),
    )
    return result


def run_flower(job: Job, paths: dict[str, Path], workdir: Path, venv: Path, limit_gb: float, actors: int) -> dict:
    from scaling_fl.models import minilm_path

    out = workdir / "flower-result.json"
    spec = {
        "data_path": str(paths["flower"]),
        "model_path": str(minilm_path()),
        "out_path": str(out),
        "num_sites": job.sites,
        "fraction_fit": job.fraction_fit,
        "num_rounds": job.rounds,
        "max_seq_len": 64,
        "batch_size": 16,
        "val_batch_size": 64,
        "learning_rate": 5e-5,
        "seed": 42,
        "client_cpus": PROCESSES // actors,  # Ray runs as many actors as its CPUs allow
        "ray_cpus": PROCESSES,
        "client_threads": PROCESSES // actors,
        "server_threads": PROCESSES,
    }
    spec_path = workdir / "flower-spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "FLOWER_SCALE_SPEC": str(spec_path), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("PYTHONPATH", None)
    result = measure([str(venv / "bin" / "python"), str(FLOWER_APP)], env, workdir / "flower.log", limit_gb)
    if "over_limit_gb" in result:
        return result
    record = json.loads(out.read_text())
    result.update(
        accuracy_per_round=[r["accuracy"] for r in record["rounds"]],
        round_s=[r["round_s"] for r in record["rounds"]],
        eval_s=[r["eval_s"] for r in record["rounds"]],
        simulation_s=record["simulation_s"],
    )
    return result


def ensure_flower_venv(venv: Path) -> str:
    """Flower's own virtual environment (flwr[simulation] with Ray, the project's torch and transformers
    versions); made once, reused after. Returns 'flwr X, ray Y'."""
    import torch
    import transformers

    python = venv / "bin" / "python"
    probe = "import flwr, ray; print(f'flwr {flwr.__version__}, ray {ray.__version__}')"
    if python.exists():
        found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if found.returncode == 0:
            return found.stdout.strip()
    print(f"making Flower's virtual environment in {venv} (a few minutes)", file=sys.stderr, flush=True)
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base), "-m", "venv", str(venv)], check=True)
    torch_version = torch.__version__.split("+")[0]  # the CPU wheel where pip finds one, as dev/setup.sh
    packages = [f"torch=={torch_version}", "flwr[simulation]", f"transformers=={transformers.__version__}"]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


# ------------------------------------------------------------------------------------------- runs


def schedule(
    main: list[Job], sweep: list[Job], repeats: int, systems: tuple[str, ...], flower_sweep: list[int] | None
) -> list[tuple]:
    """(job, system, repeat): every compared job alternates the systems (AB, BA, AB, ...); sweep points once
    (Flower's only at the sites of `flower_sweep`, when given)."""
    plan = []
    for job in main:
        for repeat in range(repeats):
            order = systems if repeat % 2 == 0 else tuple(reversed(systems))
            plan.extend((job, system, repeat) for system in order)
    for job in sweep:
        wanted = [s for s in systems if s != "flower" or flower_sweep is None or job.sites in flower_sweep]
        plan.extend((job, system, 0) for system in wanted)
    return plan


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict:
    model = next(
        (line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if "model name" in line),
        platform.machine(),
    )
    memory_kb = int(next(line.split()[1] for line in _read("/proc/meminfo").splitlines() if "MemTotal" in line))
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(memory_kb / 2**20, 1)}


def run_all(args) -> dict:
    main, sweep = planned_jobs(args)
    systems = tuple(s for s in SYSTEMS if s not in args.skip)
    flower = ensure_flower_venv(args.flower_venv) if "flower" in systems else None
    results = {
        "machine": machine(),
        "flower": flower,
        "flower_resources": {
            "ray_cpus": PROCESSES,
            "client_num_cpus": PROCESSES // args.flower_actors,
            "actors": args.flower_actors,
            "torch_threads": PROCESSES // args.flower_actors,
        },
        "scaling_fl_processes": args.processes,
        "scaling_fl_options": args.option,
        "jobs": {job.name: asdict(job) for job in main + sweep},
        "main": [job.name for job in main],
        "load_before": load_average(),
        "runs": [],
    }
    rows = read_rows(args.data)
    pool, evaluation = pool_and_eval(rows)
    with tempfile.TemporaryDirectory(prefix="scaling-fl-bench-scale-") as tmp:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.commit], capture_output=True, text=True)
        results["scaling_fl_commit"] = commit.stdout.strip()
        source = export_commit(Path(tmp) / "scaling-fl", results["scaling_fl_commit"])
        started = time.monotonic()
        for number, (job, system, repeat) in enumerate(schedule(main, sweep, args.repeats, systems, args.sweep_flower)):
            if job in sweep and over_budget(results["runs"], system, started, args.budget_min):
                print(f"skipping {job.name} {system}: past --budget-min {args.budget_min}", file=sys.stderr)
                results.setdefault("skipped", []).append(f"{job.name} {system}")
                continue
            workdir = Path(tmp) / f"{number:02d}-{job.name.replace(' ', '-')}-{system}"
            paths = write_job_data(job, pool, evaluation, workdir / "data", data_seed=42)
            print(f"[{time.strftime('%H:%M:%S')}] {job.name} {system} #{repeat}", file=sys.stderr, flush=True)
            if system == "scaling-fl":
                outcome = run_scaling_fl(job, paths, workdir, source, args.memory_limit_gb, args.processes, args.option)
            else:
                outcome = run_flower(job, paths, workdir, args.flower_venv, args.memory_limit_gb, args.flower_actors)
            results["runs"].append({"job": job.name, "system": system, "repeat": repeat, **outcome})
            print(f"    {summary_line(outcome)}", file=sys.stderr, flush=True)
            results["load_after"] = load_average()
            args.out.write_text(json.dumps(results, indent=2))
    return results


def over_budget(runs: list[dict], system: str, started: float, budget_min: float | None) -> bool:
    """Would another run of `system` (as long as its longest so far) end past the budget?"""
    if budget_min is None:
        return False
    expected = max((r["wall_s"] for r in runs if r["system"] == system), default=0.0)
    return time.monotonic() - started + expected > budget_min * 60


def summary_line(outcome: dict) -> str:
    if "over_limit_gb" in outcome:
        return f"did not fit: process tree past {outcome['over_limit_gb']} GiB after {outcome['wall_s']:.0f} s, killed"
    accuracy = ", ".join(f"{a:.4f}" for a in outcome["accuracy_per_round"])
    return (
        f"wall {outcome['wall_s']:.0f} s, peak tree RSS {outcome['peak_rss_mb']:.0f} MiB "
        f"(PSS {outcome['peak_pss_mb']:.0f}), {outcome['processes_seen']} processes, accuracy {accuracy}"
    )


# ----------------------------------------------------------------------------------------- report


def medians(results: dict, job: str, system: str) -> dict | None:
    runs = [r for r in results["runs"] if r["job"] == job and r["system"] == system and "over_limit_gb" not in r]
    if not runs:
        return None
    per_round = list(zip(*(r["accuracy_per_round"] for r in runs), strict=True))
    return {
        "n": len(runs),
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "peak_pss_mb": statistics.median(r["peak_pss_mb"] for r in runs),
        "accuracy": [statistics.median(values) for values in per_round],
    }


TARGETS = {"a": (0.35, 0.9, 0.5), "b": (0.25, 0.8, 0.5), "quick": (0.35, 0.9, 0.5)}


def target_checks(job: str, ours: dict, theirs: dict) -> list[str]:
    rss_target, wall_target, points = TARGETS.get(job, (None, None, None))
    if rss_target is None:
        return []
    rss, wall = ours["peak_rss_mb"] / theirs["peak_rss_mb"], ours["wall_s"] / theirs["wall_s"]
    gap = (ours["accuracy"][-1] - theirs["accuracy"][-1]) * 100
    return [
        f"RSS {rss:.2f}x <= {rss_target}x: {verdict(rss <= rss_target)}",
        f"wall {wall:.2f}x <= {wall_target}x: {verdict(wall <= wall_target)}",
        f"accuracy {gap:+.1f} pt >= -{points} pt: {verdict(gap >= -points)}",
    ]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(results: dict) -> str:
    jobs = results["jobs"]
    lines = [
        "| job | system | runs | wall (s) | peak tree RSS (MiB) | peak tree PSS (MiB) | accuracy after each round |",
        "|---|---|---|---|---|---|---|",
    ]
    checks = []
    for name, job in jobs.items():
        found = {system: medians(results, name, system) for system in SYSTEMS}
        label = f"{name}: {job['sites']} sites, {job['pool_rows']} rows, fraction {job['fraction_fit']:g}"
        for system, m in found.items():
            if m:
                accuracy = " / ".join(f"{a:.4f}" for a in m["accuracy"])
                lines.append(
                    f"| {label} | {system} | {m['n']} | {m['wall_s']:.0f} | {m['peak_rss_mb']:.0f} "
                    f"| {m['peak_pss_mb']:.0f} | {accuracy} |"
                )
        for run in results["runs"]:
            if run["job"] == name and "over_limit_gb" in run:
                killed = f"did not fit: killed past {run['over_limit_gb']:g} GiB"
                lines.append(f"| {label} | {run['system']} | {killed} | | | | |")
        ours, theirs = found["scaling-fl"], found["flower"]
        if ours and theirs:
            accuracy = " / ".join(f"{(a - b) * 100:+.1f} pt" for a, b in zip(ours["accuracy"], theirs["accuracy"]))
            lines.append(
                f"| {label} | scaling-fl / Flower | | {ours['wall_s'] / theirs['wall_s']:.2f}x "
                f"| {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x "
                f"| {ours['peak_pss_mb'] / theirs['peak_pss_mb']:.2f}x | {accuracy} |"
            )
            if name in results["main"]:
                checks.append(f"{name}: " + "; ".join(target_checks(name, ours, theirs)))
    four, many = medians(results, "a", "scaling-fl"), medians(results, "b", "scaling-fl")
    if four and many:
        ratio = many["peak_rss_mb"] / four["peak_rss_mb"]
        checks.append(f"scaling-fl 64 sites / 4 sites RSS {ratio:.2f}x <= 1.3x: {verdict(ratio <= 1.3)}")
    return "\n".join(lines + [""] + [f"- {check}" for check in checks])


def sweep_points(results: dict, system: str) -> list[tuple[int, dict]]:
    """(sites, medians) of the jobs on the 6,000-row pool with fraction 0.25: the sweep and `b`."""
    points = []
    for name, job in results["jobs"].items():
        if job["pool_rows"] == POOL_ROWS and job["fraction_fit"] == 0.25 and (m := medians(results, name, system)):
            points.append((job["sites"], m))
    return sorted(points, key=lambda point: point[0])


def figures(results: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"scaling-fl": {"linestyle": "-", "marker": "o"}, "flower": {"linestyle": "--", "marker": "s"}}
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key, ylabel, stem in (
        ("peak_rss_mb", "peak RSS of the process tree (MiB)", "memory_vs_sites"),
        ("wall_s", "wall time, 3 rounds (s)", "wall_vs_sites"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for system in SYSTEMS:
            points = sweep_points(results, system)
            if points:
                ax.plot([n for n, _ in points], [m[key] for _, m in points], label=system, **styles[system])
        ax.set_xscale("log", base=2)
        sites = sorted({n for system in SYSTEMS for n, _ in sweep_points(results, system)})
        ax.set_xticks(sites, [str(n) for n in sites])
        ax.minorticks_off()
        ax.set_xlabel("sites (6,000 rows shared, fraction_fit 0.25)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = directory / f"{stem}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def merge(parts: list[dict]) -> dict:
    """Results of several invocations (e.g. the compared jobs, then more sweep points) as one."""
    results = {**parts[0], "jobs": {}, "runs": [], "main": []}
    for part in parts:
        results["jobs"].update(part["jobs"])
        results["runs"].extend(part["runs"])
        results["main"].extend(name for name in part["main"] if name not in results["main"])
        results["flower"] = results["flower"] or part["flower"]
    if len(parts) > 1:
        results["load_before"] = ", ".join(part["load_before"] for part in parts)
        results["load_after"] = ", ".join(str(part.get("load_after")) for part in parts)
    return results


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=AGNEWS, help=f"AG News test.csv (default: {AGNEWS})")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "scaling-fl-bench-scale.json")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 sites x 20 rows, 1 round, 64 eval rows")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each compared job per system")
    parser.add_argument("--sweep", type=int, nargs="*", default=[4, 16, 64, 256], help="sites of the sweep points")
    parser.add_argument(
        "--budget-min", type=float, help="skip sweep runs that would end later than this many minutes after the start"
    )
    parser.add_argument(
        "--memory-limit-gb", type=float, default=16.0, help="kill a run whose process tree passes this (summed RSS)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=SYSTEMS, help="leave a system out")
    parser.add_argument("--jobs", nargs="*", default=["a", "b"], choices=["a", "b"], help="compared jobs to run")
    parser.add_argument(
        "--processes", type=int, default=PROCESSES, help="scaling-fl's processes_per_device (torch threads: cores / it)"
    )
    parser.add_argument(
        "--flower-actors",
        type=int,
        default=PROCESSES,
        choices=[1, 2],
        help="Flower's actors (torch threads: cores / it)",
    )
    parser.add_argument(
        "--option", nargs="*", default=[], help="more scaling-fl config (KEY=VALUE), e.g. round_buffers_offload=disk"
    )
    parser.add_argument("--commit", default="HEAD", help="the scaling-fl commit to run (exported with git archive)")
    parser.add_argument("--flower-venv", type=Path, default=CACHE / "flower-venv")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures" / "scale")
    parser.add_argument(
        "--sweep-flower", type=int, nargs="*", help="Flower's sweep points, when fewer than --sweep (default: the same)"
    )
    parser.add_argument(
        "--report", type=Path, nargs="+", help="only print the table and draw the figures of saved results (merged)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.report:
        results = merge([json.loads(path.read_text()) for path in args.report])
    else:
        if not args.data.exists():
            raise SystemExit(f"{args.data} is missing: pass the AG News test split with --data PATH")
        results = run_all(args)
    m = results["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB; {results['flower'] or 'no Flower'}; "
        f"load before {results['load_before']}, after {results.get('load_after')}"
    )
    print(
        f"scaling-fl: processes_per_device={results.get('scaling_fl_processes')} "
        f"{' '.join(results.get('scaling_fl_options', []))}".rstrip()
    )
    print(table(results))
    if not args.quick and any(len(sweep_points(results, s)) > 1 for s in SYSTEMS):
        for path in figures(results, args.figures):
            print(f"figure: {path}")


if __name__ == "__main__":
    main()
