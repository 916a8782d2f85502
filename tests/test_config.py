"""Config validation: every bad value is one line, exit code 2, before any worker or record exists."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from scaling_fl import job
from scaling_fl.config import DEFAULTS, ConfigError, resolve
from scaling_fl.errors import UserError
from tests.cli import cli_command, raw_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_resolve_and_iid_split_alias():
    assert resolve({}).split == "iid"
    assert resolve({"iid_split": False}).split == "label_sorted"
    assert resolve({"iid_split": False, "split": "dirichlet"}).split == "dirichlet"
    assert resolve({"site_ids": [0, 0, 1, 1]}).site_ids == (0, 0, 1, 1)
    assert resolve({"job_name": None}).job_name  # generated
    assert resolve({"max_grad_norm": None}).max_grad_norm == 0.0


def test_original_scaling_fl_keys_keep_their_names():
    original = [
        "learning_rate",
        "max_seq_len",
        "batch_size",
        "val_batch_size",
        "num_rounds",
        "num_local_epochs",
        "site_ids",
        "task_name",
        "train_path",
        "test_path",
        "model",
        "data_seed",
        "iid_split",
        "job_name",
        "checkpoints_dir",
        "author",
    ]
    assert set(original) <= set(DEFAULTS)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("site_ids", [], "site_ids"),
        ("site_ids", [0, -1], "site_ids"),
        ("site_ids", "0,1", "site_ids"),
        ("num_rounds", 0, "num_rounds"),
        ("learning_rate", -1.0, "learning_rate"),
        ("learning_rate", float("nan"), "learning_rate"),
        ("batch_size", 2.5, "batch_size"),
        ("split", "random", "split"),
        ("sample_percentage", 1.5, "sample_percentage"),
        ("dirichlet_beta", 0, "dirichlet_beta"),
        ("optimizer", "adam", "optimizer"),
        ("lr_scheduler", "step", "lr_scheduler"),
        ("precision", "fp8", "precision"),
        ("task_name", "mnist", "task_name"),
        ("job_name", "bad name/../x", "job_name"),
        ("backend", "nccl", "backend"),
        ("warmup_ratio", 1.0, "warmup_ratio"),
        ("sparsity_level", 0.0, "sparsity_level"),
        ("sparsity_level", 1.5, "sparsity_level"),
        ("exchange", "gzip", "exchange"),
        ("strategy", "fedprox", "strategy"),
        ("server_momentum", 1.0, "server_momentum"),
        ("selection_criterion", "random", "selection_criterion"),
        ("sync", "dynamic", "delta_threshold"),
        ("sync", "periodic", "comm_period"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(key, value, needle):
    raw = {key: value}
    if key == "backend":
        raw["site_ids"] = [0, 0]
    with pytest.raises(ConfigError) as error:
        resolve(raw)
    message = str(error.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_is_allowed_exactly_where_cuda_is(precision):
    import torch

    if torch.cuda.is_available():
        assert resolve({"precision": precision}).precision == precision
    else:
        with pytest.raises(ConfigError, match="need CUDA"):
            resolve({"precision": precision})


def _cli(tmp_path, *updates):
    return subprocess.run(
        cli_command("with", f"runs_dir={tmp_path / 'runs'}", *updates),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


BAD_INPUT = [
    (["num_rounds=0"], "num_rounds=0"),
    (["site_ids=[0,-1]"], "site_ids"),
    (["task_name=nope"], "task_name='nope'"),
    (["task_name=agnews", "train_path=/no/such/file.csv", "test_path=/no/such/test.csv"], "/no/such/file.csv"),
    (["model=no-such-model-dir"], "no-such-model-dir"),
    (["exchange=sparse", "sparsity_level=1.5"], "sparsity_level=1.5"),
    (["sync=periodic", "comm_period=2", "split=dirichlet", "site_ids=[0,0,0]"], "local_steps"),
]


def _raw(tmp_path, updates: list[str]) -> dict:
    return raw_config(updates, model="tiny-bert", runs_dir=str(tmp_path / "runs"))


@pytest.mark.parametrize("updates, needle", BAD_INPUT)
def test_bad_input_is_one_user_error_from_the_checks_before_any_worker(tmp_path, updates, needle):
    with pytest.raises(UserError) as error:
        job.preflight(resolve(_raw(tmp_path, updates)))
    assert needle in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "updates, needle",
    [
        BAD_INPUT[0],  # refused by the config's own rules
        BAD_INPUT[3],  # refused by the pre-flight (data)
        (["num_round=3"], "did you mean num_rounds"),  # refused by the front end
    ],
)
def test_cli_rejects_bad_input_before_any_worker_or_record(tmp_path, updates, needle):
    result = _cli(tmp_path, "model=tiny-bert", *updates)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and needle in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "Started run" not in result.stderr + result.stdout  # no Sacred run, so no worker either
    assert not (tmp_path / "runs").exists()
