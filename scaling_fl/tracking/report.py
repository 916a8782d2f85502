"""Plots and tables of tracked runs, from Sacred's file store or from MongoDB.

    python -m scaling_fl.report JOB_OR_ID [JOB_OR_ID ...] [--runs-dir runs | --mongo-url URL] [--out report]
    python scripts/plot_runs.py ...   (the same)

A selector is a run id (a number) or a `job_name` (its latest run). Without selectors every
run of the store is shown. Where the runs come from: `--mongo-url`, else `--runs-dir`, else
MongoDB when SACRED_URL / SACRED_HOST (+ SACRED_USER, SACRED_PASSWORD, SACRED_DATABASE) are
set, else the file store `runs/`.

Written to `--out`: accuracy_vs_round.png, loss_vs_round.png, accuracy_vs_bytes.png (several
runs on one figure each), final_metrics.md and final_metrics.csv (one row per run).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scaling_fl.errors import EXIT_BAD_INPUT, UserError, print_error

ACCURACY = "validation.accuracy"
LOSS = "validation.loss"
F1 = "validation.f1_macro"
BYTES = "comm.bytes_per_site"
ROUND_TIME = "time.round_s"

FIGURES = {
    "accuracy_vs_round": "accuracy_vs_round.png",
    "loss_vs_round": "loss_vs_round.png",
    "accuracy_vs_bytes": "accuracy_vs_bytes.png",
}
TABLE_COLUMNS = (
    # (CSV column, Markdown header)
    ("job_name", "job_name"),
    ("run_id", "run"),
    ("status", "status"),
    ("rounds", "rounds"),
    ("final_validation_accuracy", "final val. accuracy"),
    ("final_validation_loss", "final val. loss"),
    ("final_validation_f1_macro", "final val. F1 (macro)"),
    ("total_bytes_per_site", "bytes per site (total)"),
    ("mean_round_s", "mean round time (s)"),
)


class ReportError(UserError, RuntimeError):
    """One line for the user: what could not be found or read, and what to do."""


@dataclass(frozen=True)
class Series:
    steps: tuple[int, ...]
    values: tuple[float, ...]

    @classmethod
    def merged(cls, parts: Iterable[tuple[Sequence, Sequence]]) -> Series:
        """One value per step (the last one logged wins), sorted by step."""
        by_step: dict[int, float] = {}
        for steps, values in parts:
            for step, value in zip(steps or [], values or []):
                by_step[int(step)] = _to_float(value)
        ordered = sorted(by_step)
        return cls(tuple(ordered), tuple(by_step[step] for step in ordered))

    def last(self) -> float | None:
        return self.values[-1] if self.values else None


@dataclass
class RunRecord:
    run_id: int | str
    job_name: str
    status: str
    config: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    metrics: dict[str, Series] = field(default_factory=dict)
    start_time: str | None = None

    @property
    def label(self) -> str:
        return f"{self.job_name} (run {self.run_id})"

    def series(self, name: str) -> Series | None:
        found = self.metrics.get(name)
        return found if found and found.steps else None


def _to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _job_name(config: dict, run_id) -> str:
    name = config.get("job_name") if isinstance(config, dict) else None
    return str(name) if name else f"run-{run_id}"


# ---------------------------------------------------------------- selecting runs


def _select(selectors: Sequence[str], ids: Sequence, job_names: dict, where: str) -> list:
    """Run ids for the selectors, in the order given; all runs (by id) when there are none."""
    if not selectors:
        if not ids:
            raise ReportError(f"no runs in {where}")
        return sorted(ids, key=_id_key)
    chosen = []
    for selector in selectors:
        selector = str(selector).strip()
        if selector.isdigit() and _find_id(ids, selector) is not None:
            run_id = _find_id(ids, selector)
        else:
            matching = [run_id for run_id in ids if job_names.get(run_id) == selector]
            if not matching:
                known = sorted({name for name in job_names.values() if name})
                hint = (
                    f" (job names there: {', '.join(known[:10])}{', ...' if len(known) > 10 else ''})" if known else ""
                )
                what = "run id or job_name" if selector.isdigit() else "job_name"
                raise ReportError(f"no run with {what} '{selector}' in {where}{hint}")
            run_id = max(matching, key=_id_key)  # the latest run of that job
        if run_id not in chosen:
            chosen.append(run_id)
    return chosen


def _find_id(ids: Sequence, selector: str):
    for run_id in ids:
        if str(run_id) == selector:
            return run_id
    return None


def _id_key(run_id):
    return (0, int(run_id), "") if str(run_id).isdigit() else (1, 0, str(run_id))


# ---------------------------------------------------------------- Sacred file store


def _read_json(path: Path, default=None):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as error:
        raise ReportError(
            f"{path}: unreadable ({type(error).__name__}: {error}); the run folder is damaged or still being written"
        ) from None


def load_file_runs(runs_dir, selectors: Sequence[str] = ()) -> list[RunRecord]:
    """Runs from a Sacred FileStorageObserver folder: <runs_dir>/<id>/{run,config,metrics,info}.json."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ReportError(f"runs directory {root} does not exist; pass --runs-dir DIR or --mongo-url URL")
    folders = {
        int(entry.name): entry for entry in root.iterdir() if entry.name.isdigit() and (entry / "run.json").exists()
    }
    job_names = {}
    for run_id, folder in folders.items():
        config = _read_json(folder / "config.json", {}) or {}
        job_names[run_id] = _job_name(config, run_id)
    chosen = _select(selectors, list(folders), job_names, f"the file store {root}")
    return [_file_record(run_id, folders[run_id]) for run_id in chosen]


def _file_record(run_id: int, folder: Path) -> RunRecord:
    run = _read_json(folder / "run.json", {}) or {}
    config = _read_json(folder / "config.json", {}) or {}
    info = _read_json(folder / "info.json", {}) or {}
    raw = _read_json(folder / "metrics.json", {}) or {}
    metrics = {
        name: Series.merged([(entry.get("steps"), entry.get("values"))])
        for name, entry in raw.items()
        if isinstance(entry, dict)
    }
    return RunRecord(
        run_id=run_id,
        job_name=_job_name(config, run_id),
        status=str(run.get("status", "?")),
        config=config,
        info=info,
        metrics=metrics,
        start_time=run.get("start_time"),
    )


# ---------------------------------------------------------------- MongoDB


def load_mongo_runs(database, selectors: Sequence[str] = (), where: str = "MongoDB") -> list[RunRecord]:
    """Runs from Sacred's MongoObserver layout: `runs` (config, info, status) and `metrics`
    ({run_id, name, steps, values}) collections of a pymongo Database."""
    projection = {"_id": 1, "config.job_name": 1}
    entries = list(database["runs"].find({}, projection))
    ids = [entry["_id"] for entry in entries]
    # nx-27017 answers a nested projection with a flat "config.job_name" key; MongoDB nests it.
    job_names = {
        entry["_id"]: _job_name(entry.get("config") or {"job_name": entry.get("config.job_name")}, entry["_id"])
        for entry in entries
    }
    chosen = _select(selectors, ids, job_names, where)
    records = []
    for run_id in chosen:
        run = database["runs"].find_one({"_id": run_id}) or {}
        parts: dict[str, list] = {}
        for entry in database["metrics"].find({"run_id": run_id}):
            parts.setdefault(entry.get("name"), []).append((entry.get("steps"), entry.get("values")))
        metrics = {name: Series.merged(chunks) for name, chunks in parts.items() if name}
        config = run.get("config") or {}
        start = run.get("start_time")
        records.append(
            RunRecord(
                run_id=run_id,
                job_name=_job_name(config, run_id),
                status=str(run.get("status", "?")),
                config=config,
                info=run.get("info") or {},
                metrics=metrics,
                start_time=start.isoformat() if hasattr(start, "isoformat") else start,
            )
        )
    return records


def _mongo_target(url: str | None, database: str | None):
    from scaling_fl.tracking.observers import mongo_target_from_env

    if url:
        env = {"SACRED_URL": url}
        if database:
            env["SACRED_DATABASE"] = database
        return mongo_target_from_env(env)
    target = mongo_target_from_env()
    if target and database:
        from dataclasses import replace

        target = replace(target, database=database)
    return target


def load_mongo_runs_from(url: str | None, database: str | None, selectors: Sequence[str]) -> list[RunRecord]:
    """Connects (failing within seconds with one line), then load_mongo_runs."""
    import pymongo.errors

    from scaling_fl.tracking.observers import TrackingError, check_mongo, mongo_client

    try:
        target = _mongo_target(url, database)
    except TrackingError as error:
        raise ReportError(str(error)) from None
    if target is None:
        raise ReportError("no MongoDB configured; pass --mongo-url or set SACRED_URL / SACRED_HOST")
    try:
        check_mongo(target)
    except TrackingError as error:
        raise ReportError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - e.g. a server without authentication given credentials
        raise ReportError(
            f"MongoDB at {target.hosts}: cannot connect ({type(error).__name__}); check the URL, "
            "the credentials and whether the server expects them"
        ) from None
    client = mongo_client(target)
    try:
        return load_mongo_runs(
            client[target.database], selectors, where=f"MongoDB {target.hosts} database {target.database!r}"
        )
    except pymongo.errors.PyMongoError as error:  # its message may quote the URL: report the kind only
        code = getattr(error, "code", None)
        raise ReportError(
            f"MongoDB at {target.hosts}: reading runs failed ({type(error).__name__}"
            f"{f', code {code}' if code else ''}); check that the user may read database "
            f"{target.database!r}"
        ) from None
    finally:
        client.close()


# ---------------------------------------------------------------- figures

PLOTS_EXTRA_HINT = "the report's figures need the plots extra: pip install 'scaling-fl[plots]'"


def require_plots() -> None:
    """matplotlib comes with the plots extra; without it, one line that names the fix."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        found = False
    if not found:
        raise ReportError(PLOTS_EXTRA_HINT)


def _new_figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(figure)  # render with Agg whatever backend pyplot would pick
    axes = figure.add_subplot(1, 1, 1)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _finish(figure, axes, plotted: int, missing: list[str], metric: str):
    if plotted:
        axes.legend(fontsize="small" if plotted <= 8 else "x-small", loc="best")
    if missing:
        axes.text(
            0.01,
            0.01,
            f"no {metric} for: {', '.join(missing)}",
            transform=axes.transAxes,
            fontsize="x-small",
            color="gray",
            va="bottom",
        )
    figure.tight_layout()
    return figure


# Runs that end up on the same values (dense and int8 exchanges, say) draw the same line: each run
# gets its own colour, line style and marker, so the one drawn last does not hide the others.
_COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "x", "P", "*", "<", ">", "h")


def _style(index: int, n_points: int) -> dict:
    """The look of the index-th run's line, the same in every figure: no two of the first 20 runs
    share colour and dash pattern, and short series (<= 40 points) also get one of 11 open markers."""
    linestyle = _LINESTYLES[index % len(_LINESTYLES)]
    # Solid lines are wider and drawn below the broken ones, so where two runs coincide the broken
    # line shows through with the solid one's colour in its gaps.
    solid = linestyle == "-"
    style = {
        "color": _COLORS[index % len(_COLORS)],
        "linestyle": linestyle,
        "linewidth": 2.4 if solid else 1.5,
        "zorder": 2.0 if solid else 2.5,
    }
    if n_points <= 40:
        style.update(
            marker=_MARKERS[index % len(_MARKERS)],
            markersize=7 if solid else 5,
            markerfacecolor="none",
            markeredgewidth=1.2,
        )
    return style


def plot_metric_vs_round(runs: Sequence[RunRecord], metric: str, ylabel: str | None = None, title: str | None = None):
    """A matplotlib Figure with one line per run that logged `metric`."""
    figure, axes = _new_figure(title or f"{metric} by round", "round", ylabel or metric)
    plotted, missing = 0, []
    for index, run in enumerate(runs):
        series = run.series(metric)
        if series is None:
            missing.append(run.label)
            continue
        axes.plot(series.steps, series.values, label=run.label, **_style(index, len(series.steps)))
        plotted += 1
    if plotted:
        axes.xaxis.get_major_locator().set_params(integer=True)
    return _finish(figure, axes, plotted, missing, metric)


def cumulative_bytes(run: RunRecord, metric: str = ACCURACY) -> tuple[list[float], list[float]]:
    """(cumulative bytes per site at each round where `metric` was logged, metric values)."""
    series, sent = run.series(metric), run.series(BYTES)
    if series is None or sent is None:
        return [], []
    total, cumulative = 0.0, {}
    for step, value in zip(sent.steps, sent.values):
        total += 0.0 if math.isnan(value) else value
        cumulative[step] = total
    xs, ys = [], []
    for step, value in zip(series.steps, series.values):
        if step in cumulative:
            xs.append(cumulative[step])
            ys.append(value)
    return xs, ys


def plot_accuracy_vs_bytes(runs: Sequence[RunRecord], metric: str = ACCURACY, title: str | None = None):
    """Validation accuracy against the cumulative bytes each site sent (sum of comm.bytes_per_site)."""
    largest = max(
        (cumulative_bytes(run, metric)[0][-1] for run in runs if cumulative_bytes(run, metric)[0]), default=0.0
    )
    unit, scale = _byte_unit(largest)
    figure, axes = _new_figure(
        title or f"{metric} by data sent",
        f"cumulative bytes sent per site ({unit})",
        "validation accuracy" if metric == ACCURACY else metric,
    )
    plotted, missing = 0, []
    for index, run in enumerate(runs):
        xs, ys = cumulative_bytes(run, metric)
        if not xs:
            missing.append(run.label)
            continue
        axes.plot([x / scale for x in xs], ys, label=run.label, **_style(index, len(xs)))
        plotted += 1
    return _finish(figure, axes, plotted, missing, f"{metric} with {BYTES}")


def _byte_unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if largest >= scale:
            return unit, scale
    return "bytes", 1.0


def make_figures(runs: Sequence[RunRecord]) -> dict:
    """{name: Figure} for the three standard figures."""
    return {
        "accuracy_vs_round": plot_metric_vs_round(
            runs, ACCURACY, "validation accuracy", "Validation accuracy by round"
        ),
        "loss_vs_round": plot_metric_vs_round(runs, LOSS, "validation loss", "Validation loss by round"),
        "accuracy_vs_bytes": plot_accuracy_vs_bytes(runs, ACCURACY, "Validation accuracy by data sent"),
    }


# ---------------------------------------------------------------- tables


def summarize(run: RunRecord) -> dict:
    """One table row: the final metrics of a run (None where a metric was not logged)."""
    accuracy = run.series(ACCURACY)
    steps = accuracy.steps if accuracy else tuple(step for series in run.metrics.values() for step in series.steps)
    sent, round_time = run.series(BYTES), run.series(ROUND_TIME)
    times = [value for value in round_time.values if not math.isnan(value)] if round_time else []
    return {
        "job_name": run.job_name,
        "run_id": run.run_id,
        "status": run.status,
        "rounds": max(steps) if steps else 0,
        "final_validation_accuracy": accuracy.last() if accuracy else None,
        "final_validation_loss": run.series(LOSS).last() if run.series(LOSS) else None,
        "final_validation_f1_macro": run.series(F1).last() if run.series(F1) else None,
        "total_bytes_per_site": int(sum(v for v in sent.values if not math.isnan(v))) if sent else None,
        "mean_round_s": sum(times) / len(times) if times else None,
    }


def table_rows(runs: Sequence[RunRecord]) -> list[dict]:
    return [summarize(run) for run in runs]


def _markdown_cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "total_bytes_per_site":
        return f"{int(value):,}"
    if key == "mean_round_s":
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def to_markdown(rows: Sequence[dict]) -> str:
    headers = [header for _, header in TABLE_COLUMNS]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if key not in ("job_name", "status") else "---" for key, _ in TABLE_COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(key, row.get(key)) for key, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([key for key, _ in TABLE_COLUMNS])
    for row in rows:
        writer.writerow(["" if row.get(key) is None else row.get(key) for key, _ in TABLE_COLUMNS])
    return buffer.getvalue()


# ---------------------------------------------------------------- the whole report


def write_report(runs: Sequence[RunRecord], out_dir) -> dict[str, Path]:
    """Writes the figures and tables; returns {name: path}."""
    if not runs:
        raise ReportError("no runs selected")
    require_plots()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, figure in make_figures(runs).items():
        path = out / FIGURES[name]
        figure.savefig(path)
        written[name] = path
    rows = table_rows(runs)
    for name, text in (("final_metrics.md", to_markdown(rows)), ("final_metrics.csv", to_csv(rows))):
        path = out / name
        path.write_text(text, encoding="utf-8")
        written[name.replace(".", "_")] = path
    return written


def load_runs(
    selectors: Sequence[str], runs_dir: str | None = None, mongo_url: str | None = None, database: str | None = None
) -> list[RunRecord]:
    """From Mongo (explicit URL, or SACRED_* when no runs_dir is given) or from the file store."""
    if mongo_url or (runs_dir is None and _mongo_in_env()):
        return load_mongo_runs_from(mongo_url, database, selectors)
    return load_file_runs(runs_dir or "runs", selectors)


def _mongo_in_env() -> bool:
    return bool(os.environ.get("SACRED_URL", "").strip() or os.environ.get("SACRED_HOST", "").strip())


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Plot and tabulate tracked runs (Sacred file store or MongoDB)."
    )
    parser.add_argument(
        "runs", nargs="*", metavar="JOB_OR_ID", help="a run id, or a job_name (its latest run); none: every run"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--runs-dir", help="Sacred file-store folder (default: runs/, unless SACRED_* is set)")
    source.add_argument("--mongo-url", help="mongodb:// URL (default: SACRED_URL or SACRED_HOST/USER/PASSWORD)")
    parser.add_argument("--database", help="MongoDB database (default: SACRED_DATABASE, the URL's, or sacred)")
    parser.add_argument("--out", default="report", help="output folder (default: report/)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    name = prog or "scaling_fl.report"
    try:
        require_plots()  # before any run is read
        runs = load_runs(args.runs, runs_dir=args.runs_dir, mongo_url=args.mongo_url, database=args.database)
        written = write_report(runs, args.out)
    except UserError as error:
        print_error(error, prog=name)
        return EXIT_BAD_INPUT
    sys.stdout.write(to_markdown(table_rows(runs)))
    for path in written.values():
        print(f"wrote {path}")
    return 0
