"""dev/gpu_check.sh --dry (issue 13, point 6): the GPU check's plumbing on the CPU, so it cannot rot
before a GPU runs it. Four command-line starts: a LoRA causal LM on a bf16 base against an fp32 base,
and 8 virtual sites in 2 processes against 1 process; every CUDA-only check is reported as skipped.
In-process: how a CUDA run is judged, and the dropout-free MiniLM copy the CUDA checks train."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.cli import ROOT

CHECKS = [
    "a-nccl-tiny-bert",
    "b-2sites-1gpu-tiny-bert",
    "c-bf16-tiny-bert",
    "c-fp16-tiny-bert",
    "d-lora-bf16-tiny-gpt2",
    "d-lora-fp16-tiny-gpt2",
    "e-virtual-tiny-bert",
    "a-nccl-minilm",
    "b-2sites-1gpu-minilm",
    "c-bf16-minilm",
    "c-fp16-minilm",
]
RUN_ON_CPU = {"d-lora-bf16-tiny-gpt2", "e-virtual-tiny-bert"}


@pytest.mark.slow
def test_the_dry_gpu_check_runs_the_cpu_checks_and_reports_every_check(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "dev" / "gpu_check.sh"), "--dry", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in result.stdout  # the same table on stdout
    cells = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[1:-1]]
        for line in table.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip() in CHECKS
    }
    assert list(cells) == CHECKS
    for name, row in cells.items():
        if name in RUN_ON_CPU:
            assert row[-1] == "pass", row
            assert row[2] == "cpu, gloo" and float(row[3]) > 0, row  # where it ran, wall seconds
            assert row[4].endswith("tokens/s" if "lora" in name else "rows/s"), row
        else:
            assert row[-1] == "skipped: no CUDA", row

    record = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {row["name"]: row for row in record["rows"]}
    for name in RUN_ON_CPU:  # each agreed with its CPU reference, within its tolerance
        assert rows[name]["relative_diff"] is not None and rows[name]["relative_diff"] <= rows[name]["tolerance"]
    # 8 sites in 2 processes vs 1 process, both fp32 on the CPU: only the order of fp32 sums differs
    assert rows["e-virtual-tiny-bert"]["relative_diff"] < 1e-5
    assert sorted(record["references"]) == ["cpu-d-lora-bf16-tiny-gpt2", "cpu-e-virtual-tiny-bert"]
    with tarfile.open(tmp_path / "gpu_check_runs.tar.gz") as archive:  # every run's Sacred record and log
        names = archive.getnames()
    for name in [*RUN_ON_CPU, *record["references"]]:
        assert f"runs/{name}/1/metrics.json" in names and f"logs/{name}.log" in names, (name, names)
    outputs = sorted(path.name for path in tmp_path.iterdir())
    assert outputs == ["gpu_check.json", "gpu_check.md", "gpu_check_runs.tar.gz"]  # few files: a GPU box returns few


# --- in-process: how a CUDA run is judged (no GPU needed) ------------------------------------


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "dev" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(gpu_check, losses, backend="nccl", device="cuda:0", peak=512.0, error=None):
    metrics = {"validation.loss": losses, "train.loss": losses, "train.rows_per_s": [900.0, 1000.0]}
    if peak is not None:
        metrics["memory.peak_cuda_mb"] = [peak, peak + 1]
    return gpu_check.Run(
        "x",
        [],
        returncode=0 if error is None else 1,
        wall_s=12.5,
        metrics=metrics,
        backend=backend,
        device=device,
        error=error,
    )


def test_a_cuda_run_passes_only_where_it_ran_on_cuda_with_the_expected_backend_and_agrees_with_the_cpu():
    gpu_check = _gpu_check()
    check = {c.name: c for c in gpu_check.checks(gpus=2)}["a-nccl-tiny-bert"]
    assert "site_ids=[0,1]" in check.args and "backend=nccl" in check.args
    reference = _run(gpu_check, [1.30, 1.20], backend="gloo", device="cpu", peak=None)

    good = gpu_check.judge(check, _run(gpu_check, [1.3001, 1.2001]), reference, cuda=True)
    assert good.passed and good.peak_cuda_mb == 513.0 and good.throughput == "1,000 rows/s"
    assert good.relative_diff == pytest.approx(1e-4 / 1.2)

    verdicts = {
        "far": gpu_check.judge(check, _run(gpu_check, [1.3, 1.25]), reference, cuda=True),
        "gloo": gpu_check.judge(check, _run(gpu_check, [1.3, 1.2], backend="gloo"), reference, cuda=True),
        "cpu": gpu_check.judge(check, _run(gpu_check, [1.3, 1.2], device="cpu", peak=None), reference, cuda=True),
        "nan": gpu_check.judge(check, _run(gpu_check, [1.3, float("nan")]), reference, cuda=True),
        "crash": gpu_check.judge(check, _run(gpu_check, [], error="exit code 1: boom"), reference, cuda=True),
        "no ref": gpu_check.judge(check, _run(gpu_check, [1.3, 1.2]), _run(gpu_check, [], error="x"), cuda=True),
    }
    assert all(row.failed for row in verdicts.values()), {k: v.result for k, v in verdicts.items()}
    assert "differs from the CPU's" in verdicts["far"].result
    assert "backend gloo, expected nccl" in verdicts["gloo"].result
    assert "not on CUDA" in verdicts["cpu"].result and "no memory.peak_cuda_mb" in verdicts["cpu"].result
    assert "not finite" in verdicts["nan"].result and "boom" in verdicts["crash"].result
    assert "CPU reference failed" in verdicts["no ref"].result

    table = gpu_check.table([good, verdicts["far"]])
    assert "| a-nccl-tiny-bert |" in table and "| pass |" in table and "8.3e-05 (1e-03)" in table


def test_the_minilm_copy_without_dropout_links_the_weights_and_zeroes_the_dropout(tmp_path):
    from scaling_fl.models import minilm_path

    folder = Path(_gpu_check().write_model("minilm", tmp_path, seed=7))
    config = json.loads((folder / "config.json").read_text())
    assert config["hidden_dropout_prob"] == 0.0 and config["attention_probs_dropout_prob"] == 0.0
    assert (folder / "model.safetensors").resolve() == (minilm_path() / "model.safetensors").resolve()
    assert (folder / "tokenizer.json").exists()
