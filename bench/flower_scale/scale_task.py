"""The Flower side of bench/scale.py: the model, data and training that every Flower process runs.

Runs in its own virtual environment (flwr[simulation], torch, transformers; bench/scale.py makes it),
never in the project's. It lives in an importable module, not in app.py's `__main__`, so that Ray pickles
the ClientApp's functions by reference: each Ray actor then imports this module once and keeps its
caches (the working model, the tokenizer, the tokenized partitions) for the whole simulation, as a careful
Flower user would, instead of reloading MiniLM for every message.

The local training is scaling-fl's, step for step (scaling_fl/train/local.py): batch order and dropout
seeded from (seed, site, round), AdamW (no weight decay on 1-d tensors), a linear learning-rate decay over
all local steps of the whole run, gradient clipping at 1.0, batches padded to their longest row (a multiple
of 8). The central evaluation sorts the rows by length like scaling_fl/train/evaluate.py. So with the same
site partitions and participants both systems compute the same models up to float summation order.
"""

from __future__ import annotations

import json
import math
import os
from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

SPEC_ENV = "FLOWER_SCALE_SPEC"


@lru_cache(maxsize=1)
def spec() -> dict:
    """The job (paths, sizes, hyperparameters) bench/scale.py wrote; the path comes through the environment,
    which Ray's processes inherit from the driver."""
    with open(os.environ[SPEC_ENV], encoding="utf-8") as handle:
        return json.load(handle)


@lru_cache(maxsize=1)
def data() -> dict:
    with open(spec()["data_path"], encoding="utf-8") as handle:
        return json.load(handle)


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec()["model_path"])


@lru_cache(maxsize=1)
def collator():
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer(), pad_to_multiple_of=8, return_tensors="pt")


def load_model() -> torch.nn.Module:
    """MiniLM with a new 4-way head, seeded as scaling_fl.models.load_model seeds it."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(spec()["seed"])
    return AutoModelForSequenceClassification.from_pretrained(spec()["model_path"], num_labels=4)


@lru_cache(maxsize=1)
def working_model() -> torch.nn.Module:
    """One model per process (Ray actor or driver), loaded once and overwritten with each message's weights."""
    return load_model()


def encode(texts: list[str], labels: list[int]) -> list[dict]:
    encodings = tokenizer()(texts, truncation=True, max_length=spec()["max_seq_len"], padding=False)
    keep = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encodings]
    return [{**{key: encodings[key][i] for key in keep}, "labels": int(labels[i])} for i in range(len(labels))]


@cache
def site_rows(site: int) -> list[dict]:
    """The tokenized rows of one site (a Flower partition), cached per actor."""
    train = data()["train"]
    rows = data()["parts"][site]
    return encode([train["texts"][i] for i in rows], [train["labels"][i] for i in rows])


@lru_cache(maxsize=1)
def eval_rows() -> list[dict]:
    evaluation = data()["eval"]
    return encode(evaluation["texts"], evaluation["labels"])


def round_seed(seed: int, site: int, round_index: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, site, round_index, stream]).generate_state(1)[0])


def make_optimizer(model: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate)


def train_site(model: torch.nn.Module, site: int, round_index: int) -> tuple[float, int]:
    """One local epoch of `site` in round `round_index` (0-based); returns (mean loss, rows)."""
    job = spec()
    rows = site_rows(site)
    steps = math.ceil(len(rows) / job["batch_size"])
    total, offset = steps * job["num_rounds"], round_index * steps
    torch.manual_seed(round_seed(job["seed"], site, round_index, stream=1))  # dropout
    order = np.random.default_rng(round_seed(job["seed"], site, round_index)).permutation(len(rows))
    optimizer = make_optimizer(model, job["learning_rate"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - (offset + step) / total))
    model.train()
    loss_total = 0.0
    for start in range(0, len(rows), job["batch_size"]):
        batch = collator()([rows[int(i)] for i in order[start : start + job["batch_size"]]])
        labels = batch.pop("labels")
        loss_sum = F.cross_entropy(model(**batch).logits.float(), labels, reduction="sum")
        (loss_sum / len(labels)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_total += loss_sum.item()
    return loss_total / len(rows), len(rows)


@torch.inference_mode()
def evaluate(model: torch.nn.Module) -> dict[str, float]:
    """Accuracy and loss of `model` on all evaluation rows (length-sorted batches, as scaling-fl)."""
    rows = eval_rows()
    order = np.argsort([len(row["input_ids"]) for row in rows], kind="stable")
    model.eval()
    correct, loss_sum = 0, 0.0
    batch_size = spec()["val_batch_size"]
    for start in range(0, len(order), batch_size):
        batch = collator()([rows[int(i)] for i in order[start : start + batch_size]])
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return {"accuracy": correct / len(rows), "loss": loss_sum / len(rows)}


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(int(spec()["client_threads"]))
    site = int(context.node_config["partition-id"])
    round_index = int(msg.content["config"]["server-round"]) - 1
    model = working_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, count = train_site(model, site, round_index)
    metrics = MetricRecord({"train_loss": loss, "num-examples": count})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
