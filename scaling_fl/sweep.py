"""Sweeps over config keys and seeds: one Sacred run per point, resumable, and a mean +- std report.

    python scripts/sweep.py --name algos --grid strategy=fedavg,fedadam --grid proximal_mu=0,0.01 \
        --seeds 0 1 2 [--random 4] [--parallel 2] -- task_name=agnews train_path=... runs_dir=runs
    python scripts/sweep.py --name algos --report sweep-report [--runs-dir runs | --mongo-url URL]

Each point is the command line `scripts/train_federated.py with <base> <grid values> seed=S
job_name=<name>-<values>-seed-S`. The job name says what the point is, so a second start of the same
sweep finds each point's run in the store: a COMPLETED run is skipped, any other (failed,
interrupted, still marked running after a crash) is started again under its job name, which
continues its record and its checkpoints. The report groups the sweep's runs by their grid values,
over seeds, with pandas: a table of the final metrics (mean, std, number of seeds) and, per metric,
the mean per round with a +-1 std band.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import random
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scaling_fl.config import DEFAULTS
from scaling_fl.errors import EXIT_BAD_INPUT, UserError, print_error

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_federated.py"
REPORTED = ("validation.accuracy", "validation.loss", "validation.f1_macro", "test.accuracy", "test.f1_macro")


class SweepError(UserError, ValueError):
    """One line for the user: what is wrong with the sweep's arguments, and what to write instead."""


@dataclass(frozen=True)
class Point:
    values: tuple[tuple[str, str], ...]  # (key, value as written on the command line), in grid order
    seed: int
    job_name: str

    def arguments(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.values] + [f"seed={self.seed}", f"job_name={self.job_name}"]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """`key=v1,v2,...` items into {key: [v1, v2, ...]}; keys must be config keys (not seed or job_name)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise SweepError(f"--grid {item!r}: write key=value1,value2 (for example --grid strategy=fedavg,fedadam)")
        if key not in DEFAULTS:
            raise SweepError(f"--grid {item!r}: {key!r} is not a config key (see the README's config reference)")
        if key in ("seed", "job_name"):
            raise SweepError(f"--grid {item!r}: {key} is set by the sweep (use --seeds for seeds)")
        if key in grid:
            raise SweepError(f"--grid {item!r}: {key} is given twice; list all its values in one --grid")
        grid[key] = _split_values(values)
    return grid


def _split_values(text: str) -> list[str]:
    """Splits on commas outside brackets, so a list value such as site_ids=[0,0],[0,0,0,0] stays whole."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return [value for value in values if value]


def job_name(sweep: str, values: Sequence[tuple[str, str]], seed: int) -> str:
    """<sweep>-<key>-<value>-...-seed-<S>, characters a job name allows; long names end in a hash."""
    parts = [sweep, *(f"{key}-{value}" for key, value in values), f"seed-{seed}"]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts)).strip("_")
    if len(name) > 128:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name[:115]}-{digest}"
    return name


def plan(
    sweep: str, grid: dict[str, list[str]], seeds: Sequence[int], random_points: int | None, search_seed: int = 0
) -> list[Point]:
    """Every combination of the grid (or `random_points` of them, drawn from search_seed) x every seed."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", sweep):
        raise SweepError(f"--name {sweep!r}: letters, digits, _ . - (max 64), starting with a letter or digit")
    combinations = [tuple(zip(grid, chosen, strict=True)) for chosen in itertools.product(*grid.values())]
    if random_points is not None:
        if random_points < 1:
            raise SweepError(f"--random {random_points}: a number of grid points >= 1")
        combinations = random.Random(search_seed).sample(combinations, min(random_points, len(combinations)))
    return [Point(values, seed, job_name(sweep, values, seed)) for values in combinations for seed in seeds]


def finished_job_names(runs) -> set[str]:
    """Job names whose latest run in the store COMPLETED (runs: report.RunRecord, any order)."""
    latest = {}
    for run in runs:
        key = (int(run.run_id) if str(run.run_id).isdigit() else 0, str(run.run_id))
        if run.job_name not in latest or key > latest[run.job_name][0]:
            latest[run.job_name] = (key, run.status)
    return {name for name, (_, status) in latest.items() if status == "COMPLETED"}


def run_points(points: Sequence[Point], base: Sequence[str], parallel: int, python: str = sys.executable) -> list[str]:
    """Starts the points' command lines, `parallel` at a time; returns the job names that failed."""
    failed, running = [], []
    queue = list(points)
    while queue or running:
        while queue and len(running) < parallel:
            point = queue.pop(0)
            command = [python, str(SCRIPT), "with", *base, *point.arguments()]
            print(f"sweep: starting {point.job_name}", flush=True)
            running.append((point, subprocess.Popen(command)))
        point, process = running.pop(0)
        if process.wait() != 0:
            failed.append(point.job_name)
            print(f"sweep: {point.job_name} exited {process.returncode}", flush=True)
    return failed


# ------------------------------------------------------------------------------------------- report


def _grid_of(runs) -> list[str]:
    """The keys whose value differs between the sweep's runs (besides seed and job_name)."""
    keys = sorted({key for run in runs for key in run.config} - {"seed", "job_name"})
    return [key for key in keys if len({repr(run.config.get(key)) for run in runs}) > 1]


def summarize(runs, sweep: str):
    """(table, per_round): the sweep's completed runs grouped by their grid values over seeds, with pandas.

    table: one row per grid point, `<metric> mean` / `<metric> std` of the last round, and `seeds`;
    per_round: one row per (grid point, metric, round) with mean, std and count over seeds."""
    import pandas as pd

    mine = [run for run in runs if run.job_name.startswith(f"{sweep}-") and run.status == "COMPLETED"]
    if not mine:
        raise SweepError(f"no completed run of sweep {sweep!r} in the store; run the sweep first")
    keys = _grid_of(mine) or ["sweep"]  # seeds only: one group, named after the sweep
    rows = []
    for run in mine:
        point = {key: _cell(run.config.get(key)) for key in keys} if keys != ["sweep"] else {"sweep": sweep}
        for metric in REPORTED:
            series = run.series(metric)
            for step, value in zip(series.steps, series.values, strict=True) if series else ():
                rows.append({**point, "seed": run.config.get("seed"), "metric": metric, "round": step, "value": value})
    frame = pd.DataFrame(rows)
    per_round = frame.groupby([*keys, "metric", "round"])["value"].agg(["mean", "std", "count"]).reset_index()
    last = frame[frame["round"] == frame.groupby([*keys, "seed", "metric"])["round"].transform("max")]
    finals = last.groupby([*keys, "metric"])["value"].agg(["mean", "std", "count"]).reset_index()
    table = finals.pivot_table(index=keys, columns="metric", values=["mean", "std", "count"], dropna=False)
    seeds = table["count"].max(axis=1).astype(int)
    table = table[["mean", "std"]]
    table.columns = [f"{metric} {stat}" for stat, metric in table.columns]
    table = table[sorted(table.columns)]
    table["seeds"] = seeds
    return table.reset_index(), per_round


def _cell(value):
    """A config value as a table cell (lists as their text, so they can be grouped)."""
    return repr(value) if isinstance(value, (list, tuple, dict)) else value


def to_markdown(table) -> str:
    """A Markdown table of a DataFrame (numbers with 4 decimals)."""

    def text(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(text(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_report(runs, sweep: str, out_dir) -> dict[str, Path]:
    """final_metrics.md / .csv and <metric>_vs_round.png (mean per round, +-1 std band) in out_dir."""
    from scaling_fl.tracking import report

    report.require_plots()
    table, per_round = summarize(runs, sweep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "final_metrics.csv", "md": out / "final_metrics.md"}
    table.to_csv(written["csv"], index=False)
    written["md"].write_text(to_markdown(table), encoding="utf-8")
    keys = [column for column in per_round.columns if column not in ("metric", "round", "mean", "std", "count")]
    for metric in REPORTED:
        rows = per_round[per_round["metric"] == metric]
        if rows.empty or metric.startswith("test."):  # test.*: after the last round only, a table's figure
            continue
        figure, axes = report._new_figure(f"{sweep}: {metric}, mean ± std over seeds", "round", metric)
        groups = rows.groupby(keys, dropna=False)
        for index, (point, group) in enumerate(groups):
            point = point if isinstance(point, tuple) else (point,)
            label = ", ".join(f"{key}={value}" for key, value in zip(keys, point, strict=True))
            std = group["std"].fillna(0.0)
            line = axes.plot(group["round"], group["mean"], label=label, **report._style(index, len(group)))[0]
            axes.fill_between(
                group["round"], group["mean"] - std, group["mean"] + std, alpha=0.2, color=line.get_color()
            )
        axes.legend(fontsize="small")
        path = out / f"{metric.replace('.', '_')}_vs_round.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(figure)
        written[metric] = path
    return written


# ------------------------------------------------------------------------------------------ command


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a grid (or random search) of config values x seeds, one Sacred run each; "
        "or report a sweep's runs. Base config after `--`, as `key=value` items.",
    )
    parser.add_argument("--name", required=True, help="the sweep's name: every job name starts with it")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a config key's values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="seeds of every grid point")
    parser.add_argument("--random", type=int, metavar="N", help="N grid points drawn at random instead of all")
    parser.add_argument("--search-seed", type=int, default=0, help="seeds the --random draw")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1: one after another)")
    parser.add_argument("--dry-run", action="store_true", help="list the points and what would run, start nothing")
    parser.add_argument("--report", metavar="OUT", help="write the report of the sweep's runs to OUT instead")
    parser.add_argument("--runs-dir", help="the file store (default: the base's runs_dir, else runs/)")
    parser.add_argument("--mongo-url", help="read the runs from MongoDB (default: SACRED_URL / SACRED_HOST if set)")
    parser.add_argument("base", nargs="*", help="key=value items every run gets (after --)")
    return parser


def _runs_dir(args) -> str | None:
    if args.runs_dir:
        return args.runs_dir
    given = [item.split("=", 1)[1] for item in args.base if item.startswith("runs_dir=")]
    return given[-1] if given else None


def main(argv: Sequence[str] | None = None, prog: str = "sweep.py") -> int:
    from scaling_fl.tracking import report

    args = build_parser(prog).parse_args(argv)
    try:
        if args.parallel < 1:
            raise SweepError(f"--parallel {args.parallel}: a number of runs >= 1")
        for item in args.base:
            if "=" not in item:
                raise SweepError(f"{item!r} after --: write the base config as key=value items")
            ast.parse(item.split("=", 1)[0].strip(), mode="eval")
        if args.report:
            runs = report.load_runs([], runs_dir=_runs_dir(args), mongo_url=args.mongo_url)
            written = write_report(runs, args.name, args.report)
            print(to_markdown(summarize(runs, args.name)[0]), end="")
            for path in written.values():
                print(f"wrote {path}")
            return 0
        points = plan(args.name, parse_grid(args.grid), args.seeds, args.random, args.search_seed)
        try:
            done = finished_job_names(report.load_runs([], runs_dir=_runs_dir(args), mongo_url=args.mongo_url))
        except report.ReportError:  # an empty or new store: nothing finished yet
            done = set()
    except (UserError, SyntaxError) as error:
        print_error(error if isinstance(error, UserError) else SweepError(f"bad base item: {error}"), prog=prog)
        return EXIT_BAD_INPUT
    todo = [point for point in points if point.job_name not in done]
    print(f"sweep {args.name}: {len(points)} runs, {len(points) - len(todo)} already completed, {len(todo)} to run")
    if args.dry_run:
        for point in points:
            print(f"  {'done' if point.job_name in done else 'todo'}  {point.job_name}")
        return 0
    failed = run_points(todo, args.base, args.parallel)
    if failed:
        print(f"sweep {args.name}: {len(failed)} runs failed: {', '.join(failed)}; start the sweep again to retry them")
        return 1
    print(f"sweep {args.name}: every run completed")
    return 0
