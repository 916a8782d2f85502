"""FedAvg with one local SGD step on equal shards equals one centralized SGD step on the union batch."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from scaling_fl import models
from scaling_fl.data.tokenize import padding_collator, tokenize
from scaling_fl.exchange import DenseExchange
from scaling_fl.flat_state import flatten_model_
from scaling_fl.strategies import FedAvg
from scaling_fl.train import local
from tests.ranks import init_gloo, run_on_ranks

SITES, ROWS_PER_SITE, LR = 4, 8, 0.5
WORDS = "the match goal team market shares profit vote election senate atom physics cell orbit league coach".split()


def union_batch():
    rng = np.random.default_rng(0)
    # Different lengths on purpose: shards and the union batch are padded differently,
    # so the attention masks must make padding irrelevant.
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 30))) for _ in range(SITES * ROWS_PER_SITE)]
    labels = rng.integers(0, 4, size=len(texts))
    return texts, labels


def sgd_step(rows: np.ndarray) -> tuple[torch.nn.Module, torch.Tensor]:
    """One plain SGD step (no momentum, no clipping, constant lr, no dropout) on the given rows."""
    tokenizer = models.load_tokenizer("tiny-bert")
    model = models.load_model("tiny-bert", 4, seed=7)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    flat = flatten_model_(model)
    texts, labels = union_batch()
    dataset = tokenize([texts[i] for i in rows], labels[rows], tokenizer, max_seq_len=64)
    optimizer = local.make_optimizer(model, "sgd", LR, weight_decay=0.0, momentum=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plan = local.batch_plan(
        len(rows), batch_size=len(rows), grad_accum_steps=1, num_local_epochs=1, local_steps=1, seed=0
    )
    local.train_round(
        model,
        dataset,
        padding_collator(tokenizer),
        plan,
        optimizer=optimizer,
        scheduler=scheduler,
        precision="fp32",
        max_grad_norm=0.0,
        device=torch.device("cpu"),
    )
    return model, flat


def _federated_round_on_rank() -> np.ndarray:
    rank, world = init_gloo()
    model, local_weights = sgd_step(np.arange(rank * ROWS_PER_SITE, (rank + 1) * ROWS_PER_SITE))
    untrained = models.load_model("tiny-bert", 4, seed=7)
    global_weights = flatten_model_(untrained).clone()
    strategy = FedAvg()
    exchange = DenseExchange(local_weights.numel(), 2**20, torch.float32)
    exchange.exchange_(local_weights, global_weights, 1 / world, strategy)
    dist.destroy_process_group()
    return global_weights.numpy().copy()


def test_one_sgd_step_fedavg_equals_centralized_step():
    federated = run_on_ranks(_federated_round_on_rank, SITES)
    _, centralized = sgd_step(np.arange(SITES * ROWS_PER_SITE))
    initial = flatten_model_(models.load_model("tiny-bert", 4, seed=7)).numpy()
    moved = np.abs(centralized.numpy() - initial).max()
    assert moved > 1e-3, "the step must move the weights for the comparison to mean anything"
    for weights in federated:
        np.testing.assert_allclose(weights, centralized.numpy(), rtol=0, atol=2e-6)
