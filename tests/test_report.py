"""Figures and final-metric tables of runs recorded by real Sacred observers (file store and MongoDB)."""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import quote_plus

import pytest

from scaling_fl.tracking import report

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
from sacred import Experiment  # noqa: E402
from sacred.observers import FileStorageObserver, MongoObserver  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_fake_training(observer, job_name: str, rounds: int, start: float, bytes_per_round: int | None = 1000):
    """A tiny Sacred experiment that logs per-round scalars the way the trainer names them."""
    ex = Experiment("fake_federated", save_git_info=False)
    ex.add_config(job_name=job_name, num_rounds=rounds)

    @ex.main
    def train(_run, num_rounds):
        for round_ in range(1, num_rounds + 1):
            _run.log_scalar("validation.accuracy", start + 0.1 * round_, round_)
            _run.log_scalar("validation.loss", 2.0 / round_, round_)
            _run.log_scalar("validation.f1_macro", start + 0.05 * round_, round_)
            _run.log_scalar("time.round_s", 0.25 * round_, round_)
            if bytes_per_round is not None:
                _run.log_scalar("comm.bytes_per_site", bytes_per_round * round_, round_)

    ex.observers.append(observer)
    return ex.run(options={"--loglevel": "ERROR", "--capture": "sys"})


@pytest.fixture
def file_store(tmp_path) -> Path:
    runs = tmp_path / "runs"
    run_fake_training(FileStorageObserver(str(runs)), "alpha", rounds=3, start=0.1)  # run 1, superseded
    run_fake_training(FileStorageObserver(str(runs)), "beta", rounds=4, start=0.2, bytes_per_round=2000)  # run 2
    run_fake_training(FileStorageObserver(str(runs)), "alpha", rounds=5, start=0.3)  # run 3: alpha's latest
    return runs


def line_data(figure) -> dict[str, tuple[list, list]]:
    (axes,) = figure.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}


def test_file_store_figures_have_one_curve_per_run(file_store):
    runs = report.load_file_runs(file_store, ["alpha", "2"])
    assert [(run.run_id, run.job_name, run.status) for run in runs] == [
        (3, "alpha", "COMPLETED"),
        (2, "beta", "COMPLETED"),
    ]
    figures = report.make_figures(runs)
    assert set(figures) == {"accuracy_vs_round", "loss_vs_round", "accuracy_vs_bytes"}
    for figure in figures.values():
        assert len(figure.axes[0].get_lines()) == len(runs)

    accuracy = line_data(figures["accuracy_vs_round"])
    assert accuracy["alpha (run 3)"][0] == [1, 2, 3, 4, 5]
    assert accuracy["alpha (run 3)"][1] == pytest.approx([0.4, 0.5, 0.6, 0.7, 0.8])
    assert line_data(figures["loss_vs_round"])["beta (run 2)"][1] == pytest.approx([2.0, 1.0, 2 / 3, 0.5])
    # x = cumulative bytes per site (in kB here): beta sends 2000, 4000, 6000, 8000 bytes
    xs, ys = line_data(figures["accuracy_vs_bytes"])["beta (run 2)"]
    assert xs == pytest.approx([2.0, 6.0, 12.0, 20.0])
    assert ys == pytest.approx([0.3, 0.4, 0.5, 0.6])
    assert figures["accuracy_vs_bytes"].axes[0].get_xlabel() == "cumulative bytes sent per site (kB)"


def test_file_store_report_files_and_table(file_store, tmp_path):
    out = tmp_path / "report"
    runs = report.load_file_runs(file_store, ["alpha", "beta"])
    written = report.write_report(runs, out)
    for name in report.FIGURES.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert set(written) == {
        "accuracy_vs_round",
        "loss_vs_round",
        "accuracy_vs_bytes",
        "final_metrics_md",
        "final_metrics_csv",
    }

    rows = list(csv.DictReader(io.StringIO((out / "final_metrics.csv").read_text())))
    assert [(row["job_name"], row["run_id"], row["status"], row["rounds"]) for row in rows] == [
        ("alpha", "3", "COMPLETED", "5"),
        ("beta", "2", "COMPLETED", "4"),
    ]
    alpha, beta = rows
    assert float(alpha["final_validation_accuracy"]) == pytest.approx(0.8)
    assert float(alpha["final_validation_loss"]) == pytest.approx(0.4)
    assert float(alpha["final_validation_f1_macro"]) == pytest.approx(0.55)
    assert int(alpha["total_bytes_per_site"]) == 1000 * (1 + 2 + 3 + 4 + 5)
    assert float(alpha["mean_round_s"]) == pytest.approx(0.75)
    assert int(beta["total_bytes_per_site"]) == 20000

    markdown = (out / "final_metrics.md").read_text().splitlines()
    assert len(markdown) == 2 + len(runs)
    assert markdown[0].startswith("| job_name | run | status | rounds |")
    assert markdown[2] == "| alpha | 3 | COMPLETED | 5 | 0.8000 | 0.4000 | 0.5500 | 15,000 | 0.75 |"


def test_runs_without_a_metric_are_left_out_of_that_figure_only(tmp_path):
    runs_dir = tmp_path / "runs"
    run_fake_training(FileStorageObserver(str(runs_dir)), "dense", rounds=2, start=0.1)
    run_fake_training(FileStorageObserver(str(runs_dir)), "no-bytes", rounds=2, start=0.1, bytes_per_round=None)
    runs = report.load_file_runs(runs_dir)  # no selector: every run
    assert [run.job_name for run in runs] == ["dense", "no-bytes"]
    figures = report.make_figures(runs)
    assert len(figures["accuracy_vs_round"].axes[0].get_lines()) == 2
    assert list(line_data(figures["accuracy_vs_bytes"])) == ["dense (run 1)"]
    assert report.summarize(runs[1])["total_bytes_per_site"] is None


def run_script(*args: str, env: dict | None = None, module: bool = False) -> subprocess.CompletedProcess:
    command = (
        [sys.executable, "-m", "scaling_fl.report"]
        if module
        else [sys.executable, str(ROOT / "scripts" / "plot_runs.py")]
    )
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})}
    )


def test_command_line(file_store, tmp_path):
    out = tmp_path / "out"
    result = run_script("--runs-dir", str(file_store), "--out", str(out), "alpha", "beta")
    assert result.returncode == 0, result.stderr
    assert "| alpha | 3 | COMPLETED | 5 |" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*report.FIGURES.values(), "final_metrics.md", "final_metrics.csv"]
    )

    result = run_script("--runs-dir", str(file_store), "--out", str(out), "gamma", module=True)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "no run with job_name 'gamma'" in line and "alpha, beta" in line


# ---------------------------------------------------------------- MongoDB (nx-27017)


def test_mongo_runs_from_url_and_from_environment(mongo_env, tmp_path):
    server, database = mongo_env  # SACRED_URL / SACRED_DATABASE point here
    for job_name, rounds, start in (("alpha", 3, 0.1), ("beta", 4, 0.2), ("alpha", 5, 0.3)):
        result = run_fake_training(MongoObserver(url=server.url, db_name=database), job_name, rounds, start)
        assert result.status == "COMPLETED"

    client = server.client()
    try:
        runs = report.load_mongo_runs(client[database], ["alpha", "beta"])
    finally:
        client.close()
    assert [(run.run_id, run.job_name, run.status) for run in runs] == [
        (3, "alpha", "COMPLETED"),
        (2, "beta", "COMPLETED"),
    ]
    for figure in report.make_figures(runs).values():
        assert len(figure.axes[0].get_lines()) == 2
    assert report.summarize(runs[0])["final_validation_accuracy"] == pytest.approx(0.8)
    assert report.summarize(runs[1])["total_bytes_per_site"] == 10000

    out = tmp_path / "from-env"  # no --mongo-url: SACRED_URL from the environment
    assert report.main(["--out", str(out), "alpha", "1"]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "final_metrics.csv").read_text())))
    assert [(row["job_name"], row["run_id"], row["rounds"]) for row in rows] == [
        ("alpha", "3", "5"),
        ("alpha", "1", "3"),
    ]
    out = tmp_path / "from-url"
    result = run_script(
        "--mongo-url",
        server.url,
        "--database",
        database,
        "--out",
        str(out),
        "beta",
        env={"SACRED_URL": "", "SACRED_DATABASE": ""},
    )
    assert result.returncode == 0, result.stderr
    assert (out / "accuracy_vs_bytes.png").read_bytes().startswith(PNG_MAGIC)


def test_unreachable_mongo_is_one_line_in_seconds(tmp_path, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    code = report.main(
        ["--mongo-url", f"mongodb://reader:hunter2-secret@127.0.0.1:{port}/", "--out", str(tmp_path / "out"), "alpha"]
    )
    elapsed = time.monotonic() - started
    error = capsys.readouterr().err
    assert code == 2 and elapsed < 10
    (line,) = error.strip().splitlines()
    assert f"127.0.0.1:{port}" in line and "not reachable" in line
    assert "hunter2" not in error
    assert not (tmp_path / "out").exists()


def test_password_protected_mongo(mongo_auth_env, mongo_server, tmp_path, capsys, monkeypatch):
    proxy, database = mongo_auth_env  # SACRED_HOST / SACRED_USER / SACRED_PASSWORD / SACRED_DATABASE
    run_fake_training(MongoObserver(url=proxy.url(), db_name=database), "locked", rounds=2, start=0.5)

    assert report.main(["--out", str(tmp_path / "ok"), "locked"]) == 0
    assert "| locked | 1 | COMPLETED | 2 | 0.7000 |" in capsys.readouterr().out

    password = os.environ["SACRED_PASSWORD"]
    monkeypatch.setenv("SACRED_PASSWORD", "wrong-" + password)
    assert report.main(["--out", str(tmp_path / "wrong"), "locked"]) == 2
    error = capsys.readouterr().err
    (line,) = error.strip().splitlines()
    assert "authentication failed" in line and proxy.host in line
    assert password not in error and "wrong-" not in error

    # nx-27017 itself has no authentication: credentials sent to it fail in pymongo, still one line
    url = f"mongodb://user:{quote_plus(password)}@{mongo_server.host}/"
    assert report.main(["--mongo-url", url, "--out", str(tmp_path / "nx"), "locked"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert mongo_server.host in line and "p@ss" not in line
