"""Causal-LM + LoRA through the real command line (issue 13): IMDB reviews from ../shared/data, a
tiny GPT-2 with LoRA adapters. One job's contracts: only the adapters cross the wire and land in
checkpoints, the packing of sites into processes does not change the result, a crash after round 2
resumes bitwise, the final folder loads with peft and the samples are recorded."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.cli import read_record, run_cli, run_records
from tests.ranks import SHARED_DATA

IMDB = SHARED_DATA / "imdb" / "IMDB Dataset.csv"


@pytest.fixture(scope="module")
def imdb_files(tmp_path_factory):
    """The first 180 reviews as a training file and the next 40 as a test file (IMDB's own columns)."""
    if not IMDB.exists():
        pytest.fail(f"{IMDB} is missing: the tests read real data from ../shared/data")
    folder = tmp_path_factory.mktemp("imdb")
    with open(IMDB, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:221]
    for name, part in (("train.csv", body[:180]), ("test.csv", body[180:])):
        with open(folder / name, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *part])
    return folder


def _job(imdb_files) -> list[str]:
    return [
        "objective=causal_lm",
        "model=tiny-gpt2",
        "peft=lora",
        "lora_r=4",
        "task_name=imdb",
        f"train_path={imdb_files / 'train.csv'}",
        f"test_path={imdb_files / 'test.csv'}",
        "max_seq_len=16",
        "batch_size=16",
        "learning_rate=0.01",
        "num_rounds=3",
        "seed=5",
    ]


def _run(tmp_path, imdb_files, name: str, *args: str, env: dict | None = None) -> dict:
    runs = tmp_path / name
    result = run_cli(tmp_path, "with", *_job(imdb_files), *args, f"job_name={name}", f"runs_dir={runs}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(run_records(runs)[0])
    record["dir"], record["stderr"] = run_records(runs)[0], result.stderr
    return record


@pytest.mark.slow
def test_a_lora_run_exchanges_adapters_only_packs_freely_and_resumes_bitwise(tmp_path, imdb_files):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    apart = _run(tmp_path, imdb_files, "apart", "num_sites=4", "processes_per_device=2")  # 2 processes x 2 sites
    packed = _run(
        tmp_path,
        imdb_files,
        "packed",
        "num_sites=4",
        "processes_per_device=1",  # the same 4 sites in one process, one frozen base
        f"checkpoints_dir={tmp_path / 'ck'}",
        "save_final_model=True",
        f"final_model_dir={tmp_path / 'final'}",
        "sample_prompts=['This movie was']",
    )
    crashed = _run(
        tmp_path,
        imdb_files,
        "crashed",
        "num_sites=4",
        "processes_per_device=1",
        f"checkpoints_dir={tmp_path / 'ck-crash'}",
        "max_restarts=1",
        env={"SCALING_FL_FAIL_AT": "site=0,round=3,attempts=1"},  # dies after round 2's checkpoint
    )

    # Only the adapters: 2 layers x (A: 4 x 64, B: 192 x 4) fp32 values cross the wire and are checkpointed.
    adapters = 2 * (4 * 64 + 192 * 4)
    metrics = packed["metrics"]
    assert metrics["comm.bytes_per_site"]["values"] == [4 * adapters] * 3
    state = json.loads((tmp_path / "ck" / "round-000003" / "state.json").read_text())
    names = [name for name, _ in state["trained_tensors"]]
    assert len(names) == 4 and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert load_file(str(tmp_path / "ck" / "round-000003" / "global.safetensors"))["global"].numel() == adapters

    # The causal-LM metrics, token-weighted; the validation loss falls every round.
    losses = metrics["validation.loss"]["values"]
    assert losses[0] > losses[1] > losses[2]
    assert np.allclose(metrics["validation.perplexity"]["values"], np.exp(losses))
    assert "train.tokens_per_s" in metrics and "test.perplexity" in metrics

    # Packing: 2 processes or one, the same model up to fp32 summation order.
    for metric in ("validation.loss", "train.loss"):
        assert (
            np.round(metrics[metric]["values"], 4).tolist() == np.round(apart["metrics"][metric]["values"], 4).tolist()
        )

    # A crash after round 2, resumed: bitwise the uninterrupted run.
    assert "sites restarted (restart 1 of at most 1)" in crashed["stderr"]
    assert crashed["info"]["final_weights_sha256"] == packed["info"]["final_weights_sha256"]

    # The final folder loads with peft on its base and holds the run's last global adapters, bit for bit
    # (that it scores as the run did: tests/test_llm.py).
    folder = tmp_path / "final"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base"), folder)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    final_global = load_file(str(tmp_path / "ck" / "round-000003" / "global.safetensors"))["global"]
    in_order = torch.cat([saved[name.replace(".default", "")].reshape(-1) for name in names])
    assert torch.equal(in_order, final_global)
    assert sum(1 for n, _ in loaded.named_parameters() if "lora_" in n) == 4
    assert (packed["dir"] / "final_model.adapter_model.safetensors").exists()
    samples = json.loads((packed["dir"] / "samples.json").read_text())
    assert samples[0]["prompt"] == "This movie was" and isinstance(samples[0]["completion"], str)


@pytest.mark.slow
def test_prompt_response_sft_from_json_lines_learns_the_responses_only(tmp_path):
    questions = ["is the film long", "who directed it", "was it funny", "would you see it again"] * 15
    answers = ["about two hours", "a first-time director", "now and then", "yes , with friends"] * 15
    for name, rows in (("train.jsonl", range(0, 48)), ("test.jsonl", range(48, 60))):
        with open(tmp_path / name, "w", encoding="utf-8") as handle:
            for i in rows:
                handle.write(json.dumps({"question": questions[i], "answer": answers[i]}) + "\n")
    runs = tmp_path / "runs"
    result = run_cli(
        tmp_path,
        "with",
        "objective=causal_lm",
        "model=tiny-gpt2",
        "task_name=csv",
        f"train_path={tmp_path / 'train.jsonl'}",
        f"test_path={tmp_path / 'test.jsonl'}",
        "prompt_column=question",
        "response_column=answer",
        "prompt_template=Q: {prompt} A:",
        "site_ids=[0,0]",
        "num_rounds=2",
        "max_seq_len=32",
        "learning_rate=0.003",
        "job_name=qa",
        f"runs_dir={runs}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_record(run_records(runs)[0])["metrics"]
    losses = metrics["validation.loss"]["values"]
    assert losses[1] < losses[0] and np.isfinite(metrics["test.perplexity"]["values"]).all()


@pytest.mark.slow
def test_compressed_exchange_adaptive_server_and_periodic_sync_work_on_the_adapters(tmp_path, imdb_files):
    # The exchanges, strategies and sync policies see the adapter vector as they see any flat vector:
    # top-k + int8 of the adapters, FedAdam on them, synchronization every 3 local steps.
    run = _run(
        tmp_path,
        imdb_files,
        "compressed",
        "site_ids=[0,0]",
        "num_rounds=2",
        "exchange=sparse_int8",
        "sparsity_level=0.1",
        "strategy=fedadam",
        "server_learning_rate=0.01",
        "sync=periodic",
        "comm_period=3",
    )
    metrics = run["metrics"]
    adapters = 2 * (4 * 64 + 192 * 4)
    sent = metrics["comm.bytes_per_site"]["values"]
    assert all(0 < per_round < 4 * adapters for per_round in sent)  # several syncs a round, each << dense
    assert metrics["comm.density"]["values"][-1] == pytest.approx(0.1, abs=0.01)
    assert np.isfinite(metrics["validation.loss"]["values"]).all()
