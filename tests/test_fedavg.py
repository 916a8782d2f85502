"""Weighted FedAvg through the dense exchange on 4 real gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from scaling_fl.exchange import DenseExchange
from scaling_fl.flat_state import flat_sha256
from scaling_fl.strategies import FedAvg, Strategy
from tests.ranks import init_gloo, run_on_ranks

NUMEL = 1000
SIZES = [10, 30, 20, 40]  # samples per site


def start_weights() -> torch.Tensor:
    return torch.linspace(-1, 1, NUMEL, dtype=torch.float32)


def site_update(rank: int) -> torch.Tensor:
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 + rank))


class FedAvgThroughUpdates(Strategy):
    """FedAvg written only as an update rule: exercises the generic average -> update path."""

    def apply_update_(self, global_part, mean_update, where):
        global_part.add_(mean_update)


def _exchange_on_rank(bucket_bytes: int, generic: bool) -> dict:
    rank, world = init_gloo()
    global_weights = start_weights()
    local_weights = global_weights + site_update(rank)
    strategy = FedAvgThroughUpdates() if generic else FedAvg()
    exchange = DenseExchange(NUMEL, bucket_bytes, torch.float32)
    weight = SIZES[rank] / sum(SIZES)
    sent = exchange.exchange_(local_weights, global_weights, weight, strategy)
    result = {
        "global": global_weights.numpy().copy(),
        "sha": flat_sha256(global_weights),
        "local_equals_global": bool(torch.equal(local_weights, global_weights)),
        "bytes": sent,
        "buckets": len(exchange.ranges),
    }
    dist.destroy_process_group()
    return result


@pytest.mark.parametrize("generic", [False, True], ids=["fedavg", "update-rule-path"])
def test_weighted_fedavg_matches_hand_computed_mean_and_ranks_agree(generic):
    # 1000 floats in 384-byte buckets: 96 elements each, the last one partial.
    results = run_on_ranks(_exchange_on_rank, 4, 384, generic)
    expected = start_weights().double().numpy() + sum(
        SIZES[rank] / sum(SIZES) * site_update(rank).double().numpy() for rank in range(4)
    )
    for result in results:
        np.testing.assert_allclose(result["global"], expected, rtol=1e-6, atol=1e-6)
        assert result["local_equals_global"]
        assert result["bytes"] == NUMEL * 4
        assert result["buckets"] == 11
    assert len({result["sha"] for result in results}) == 1, "ranks hold different models"
    # A plain mean would differ: the weighting matters for this check to mean anything.
    plain = start_weights().double().numpy() + np.mean([site_update(r).double().numpy() for r in range(4)], axis=0)
    assert not np.allclose(results[0]["global"], plain, atol=1e-3)
