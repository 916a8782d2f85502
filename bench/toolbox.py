"""The researcher's toolbox on one non-IID job: algorithms over seeds, robust aggregation under attack,
DP-FedAvg at several noise levels. One command runs every part through scripts/sweep.py (one Sacred run
per point, resumable: a second start skips what completed) and writes the tables.

The job. AG News (the Crepe CSV, `--data`; research-only licence: read where it lies, the subsets are
written to the output folder, not the repo): a seeded sample of `--train-rows` training rows and
`--test-rows` test rows. Pretrained MiniLM (offline), max_seq_len 64, batch 16, local AdamW lr 5e-5 (the
project's defaults), one local epoch; 16 sites, Dirichlet(0.1) label split, 8 sites sampled a round
(fraction_fit 0.5), `--rounds` rounds, validation_fraction 0.1 (validation.* every round, test.* after
the last), one worker process (processes_per_device=1, the leaner choice on a 2-core machine).

  algorithms  FedAvg, FedProx (proximal_mu 0.01), SCAFFOLD, FedAdam (the project's defaults), `--seeds`
  robust      sites 0 and 1 send -update whenever sampled (byzantine_mode=sign_flip); aggregation mean,
              median, trimmed_mean (trim_fraction 0.25: 2 of 8 at each end), krum (f=2, the 4 best)
  dp          dp=client, dp_clip_norm `--clip`, dp_noise_multiplier 0.1, 0.5, 1.0; epsilon at delta 1e-5

    .venv/bin/python bench/toolbox.py --out /tmp/toolbox                    # every part (~35 min on 2 cores)
    .venv/bin/python bench/toolbox.py --out /tmp/toolbox --parts dp --rounds 2
    .venv/bin/python bench/toolbox.py --out /tmp/toolbox --report-only      # the tables of what completed

The tables go to OUT/toolbox.md (paste into docs/benchmarks.md with the command and the machine).
"""

from __future__ import annotations

import argparse
import csv
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaling_fl.sweep import summarize  # noqa: E402
from scaling_fl.tracking import report  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "agnews"
SEED = 20261202

ALGORITHMS = {
    "fedavg": [],
    "fedprox": ["proximal_mu=0.01"],
    "scaffold": ["strategy=scaffold"],
    "fedadam": ["strategy=fedadam"],
}
ROBUST = [
    "byzantine_sites=[0,1]",
    "byzantine_mode=sign_flip",
    "trim_fraction=0.25",
    "krum_byzantine=2",
    "krum_select=4",
]
AGGREGATIONS = "mean,median,trimmed_mean,krum"
NOISE = "0.1,0.5,1.0"


def write_subset(source: Path, target: Path, rows: int, seed: int) -> None:
    with open(source, newline="", encoding="utf-8") as handle:
        every = list(csv.reader(handle))
    chosen = np.sort(np.random.default_rng(seed).permutation(len(every))[:rows])
    with open(target, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(every[i] for i in chosen)


def base_config(args, data: Path, runs: Path) -> list[str]:
    return [
        "task_name=agnews",
        f"train_path={data / 'train.csv'}",
        f"test_path={data / 'test.csv'}",
        "model=minilm",
        "max_seq_len=64",
        "split=dirichlet",
        "dirichlet_beta=0.1",
        "num_sites=16",
        "fraction_fit=0.5",
        "processes_per_device=1",
        f"num_rounds={args.rounds}",
        f"runs_dir={runs}",
        "tracking=file",
    ]


def sweep(name: str, base: list[str], seeds: list[int], grid: list[str] = ()) -> float:
    """One sweep through scripts/sweep.py; returns its wall seconds."""
    command = [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--name", name, "--seeds", *map(str, seeds)]
    for item in grid:
        command += ["--grid", item]
    started = time.perf_counter()
    print("$", " ".join(command), "--", " ".join(base), flush=True)
    subprocess.run([*command, "--", *base], check=False)
    return time.perf_counter() - started


def _series_table(runs, name: str, key: str | None, metric: str) -> list[str]:
    """Per round: mean +- std of `metric` over seeds, one row per group."""
    _, per_round = summarize(runs, name)
    rows = per_round[per_round["metric"] == metric]
    if rows.empty:
        return []
    rounds = sorted(rows["round"].unique())
    lines = [
        f"| {key or 'variant'} | " + " | ".join(f"round {r}" for r in rounds) + " |",
        "|---|" + "---|" * len(rounds),
    ]
    groups = rows.groupby(key) if key else [(name, rows)]
    for label, group in groups:
        cells = []
        for r in rounds:
            at = group[group["round"] == r]
            mean, std, count = float(at["mean"].iloc[0]), at["std"].iloc[0], int(at["count"].iloc[0])
            cells.append(f"{mean:.3f} ± {float(std):.3f}" if count > 1 else f"{mean:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _final(runs, job_prefix: str, metric: str) -> list[float]:
    values = []
    for run in runs:
        if run.job_name.startswith(job_prefix) and run.status == "COMPLETED" and run.series(metric):
            values.append(run.series(metric).last())
    return values


def write_tables(args, runs_dir: Path, seconds: dict) -> str:
    runs = report.load_runs([], runs_dir=str(runs_dir))
    lines = [
        f"Machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, "
        f"Python {platform.python_version()}; {args.train_rows} training rows, {args.test_rows} test rows, "
        f"{args.rounds} rounds.",
        "",
    ]
    if "algorithms" in args.parts:
        lines += [f"**Algorithms**, validation accuracy per round, mean ± std over seeds {args.seeds}:", ""]
        header = None
        for variant in ALGORITHMS:
            table = _series_table(runs, f"tb-{variant}", None, "validation.accuracy")
            if table:
                if header is None:
                    header = table[:2]
                    lines += [header[0].replace("variant", "algorithm"), header[1]]
                lines.append(table[2].replace(f"tb-{variant}", variant))
        lines += ["", "| algorithm | final test accuracy (mean ± std) | seeds |", "|---|---|---|"]
        for variant in ALGORITHMS:
            finals = _final(runs, f"tb-{variant}-", "test.accuracy")
            if finals:
                spread = np.std(finals, ddof=1) if len(finals) > 1 else 0.0
                lines.append(f"| {variant} | {np.mean(finals):.3f} ± {spread:.3f} | {len(finals)} |")
        lines.append("")
    if "robust" in args.parts:
        lines += ["**Robust aggregation**, sites 0 and 1 sign-flipping, validation accuracy per round:", ""]
        lines += _series_table(runs, "tb-robust", "aggregation", "validation.accuracy")
        lines += ["", "| aggregation | final test accuracy | bytes per site and round |", "|---|---|---|"]
        for rule in AGGREGATIONS.split(","):
            finals = _final(runs, f"tb-robust-aggregation-{rule}-", "test.accuracy")
            sent = _final(runs, f"tb-robust-aggregation-{rule}-", "comm.bytes_per_site")
            if finals:
                lines.append(f"| {rule} | {finals[0]:.3f} | {sent[0] / 1e6:.1f} MB |")
        lines.append("")
    if "dp" in args.parts:
        lines += [f"**DP-FedAvg** (dp_clip_norm {args.clip}), validation accuracy per round:", ""]
        lines += _series_table(runs, "tb-dp", "dp_noise_multiplier", "validation.accuracy")
        lines += ["", "| dp_noise_multiplier | final test accuracy | epsilon (delta 1e-5) |", "|---|---|---|"]
        for z in NOISE.split(","):
            finals = _final(runs, f"tb-dp-dp_noise_multiplier-{z}-", "test.accuracy")
            spent = _final(runs, f"tb-dp-dp_noise_multiplier-{z}-", "privacy.epsilon")
            if finals:
                lines.append(f"| {z} | {finals[0]:.3f} | {spent[0]:.2f} |")
        lines.append("")
    if seconds:
        lines.append("Wall time: " + ", ".join(f"{part} {s / 60:.1f} min" for part, s in seconds.items()) + ".")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--parts", nargs="+", default=["algorithms", "robust", "dp"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-rows", type=int, default=480)
    parser.add_argument("--test-rows", type=int, default=400)
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    data, runs = args.out / "data", args.out / "runs"
    data.mkdir(parents=True, exist_ok=True)
    seconds = {}
    if not args.report_only:
        write_subset(args.data / "train.csv", data / "train.csv", args.train_rows, SEED)
        write_subset(args.data / "test.csv", data / "test.csv", args.test_rows, SEED + 1)
        base = base_config(args, data, runs)
        if "algorithms" in args.parts:
            seconds["algorithms"] = sum(
                sweep(f"tb-{variant}", [*base, *extra], args.seeds) for variant, extra in ALGORITHMS.items()
            )
        if "robust" in args.parts:
            seconds["robust"] = sweep("tb-robust", [*base, *ROBUST], args.seeds[:1], [f"aggregation={AGGREGATIONS}"])
        if "dp" in args.parts:
            private = [*base, "dp=client", f"dp_clip_norm={args.clip}"]
            seconds["dp"] = sweep("tb-dp", private, args.seeds[:1], [f"dp_noise_multiplier={NOISE}"])
    text = write_tables(args, runs, seconds)
    (args.out / "toolbox.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
