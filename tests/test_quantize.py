"""int8 blockwise quantization: error bound, bytes, and the dense int8 exchange on 4 gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from scaling_fl.exchange.quantize import (
    Int8Exchange,
    block_scales,
    dequantize,
    int8_payload_bytes,
    num_blocks,
    quantize,
)
from scaling_fl.flat_state import flat_sha256
from scaling_fl.strategies.fedavg import FedAvg
from tests.ranks import init_gloo, run_on_ranks


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size,numel", [(256, 256 * 7), (256, 1000), (1024, 5000), (7, 50)])
def test_round_trip_error_within_half_a_step_per_block(block_size, numel, scale_dtype):
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g) * torch.logspace(-6, 1, numel)  # blocks of very different magnitude
    x[:block_size] = 0.0  # an all-zero block
    codes, scales = quantize(x, block_size, scale_dtype)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    assert scales.dtype == scale_dtype and scales.numel() == num_blocks(numel, block_size)
    error = (dequantize(codes, scales, block_size) - x).abs()
    for b in range(scales.numel()):
        block = slice(b * block_size, (b + 1) * block_size)
        absmax = float(x[block].abs().max())
        step = float(scales[b])
        assert step >= absmax / 127 * (1 - 1e-7)
        if scale_dtype == torch.float32:
            assert step <= absmax / 127 * (1 + 1e-6)
        else:  # rounded up to the next 16-bit float: one unit in the last place above, at most
            info = torch.finfo(scale_dtype)
            assert step <= absmax / 127 * (1 + 2 * info.eps) + info.smallest_normal * info.eps
        assert float(error[block].max()) <= step / 2 * (1 + 1e-6) + 1e-30
    assert float(error[:block_size].max()) == 0.0


def test_payload_bytes_include_scales_and_beat_dense_by_the_issue_target():
    n = 22_713_604
    assert int8_payload_bytes(n, 256, torch.float32) == n + 4 * num_blocks(n, 256)
    assert int8_payload_bytes(n, 1024, torch.float16) == n + 2 * num_blocks(n, 1024)
    exchange = Int8Exchange(n, world_size=4, error_feedback=False)
    assert exchange.payload_bytes == n + 4 * num_blocks(n, 256) + 8  # + the site's sample share
    assert exchange.payload_bytes / (4 * n) < 0.255  # issue target: <= 0.27x dense
    assert exchange.bucket_numel % 256 == 0


def test_fp16_scales_round_up():
    x = torch.tensor([1.0001, -0.3, 0.2])
    scale = block_scales(x, 3, torch.float16)
    assert scale.dtype == torch.float16 and float(scale[0]) >= 1.0001 / 127


NUMEL = 1000
SIZES = [10, 30, 20, 40]
BLOCK = 64


def _site_update(rank: int, round_index: int) -> torch.Tensor:
    scale = 10.0 ** (rank - 2)  # sites of very different magnitude
    return scale * torch.randn(NUMEL, generator=torch.Generator().manual_seed(10 * rank + round_index))


def _int8_on_rank() -> list[dict]:
    rank, world = init_gloo()
    global_ = torch.linspace(-1, 1, NUMEL)
    # 2 buckets of 192 values + a partial one: bucket bytes = per-value cost * 192
    exchange = Int8Exchange(NUMEL, bucket_bytes=(2 * world + 5) * 3 * BLOCK, block_size=BLOCK)
    weight = SIZES[rank] / sum(SIZES)
    out = []
    for round_index in range(2):
        before = global_.clone()
        residual_before = exchange.residual.clone()
        local = global_ + _site_update(rank, round_index)
        update = (local - global_) + residual_before  # what the site sends, as the exchange forms it
        sent = exchange.exchange_(local, global_, weight, FedAvg())
        out.append(
            {
                "before": before.numpy(),
                "after": global_.numpy().copy(),
                "update": update.numpy(),
                "residual": exchange.residual.numpy().copy(),
                "sha": flat_sha256(global_),
                "bytes": sent,
                "local_equals_global": bool(torch.equal(local, global_)),
                "stats": dict(exchange.stats),
                "buckets": len(exchange.ranges),
            }
        )
    dist.destroy_process_group()
    return out


def test_int8_exchange_decodes_before_summing_keeps_the_error_and_ranks_agree():
    results = run_on_ranks(_int8_on_rank, 4)
    weights = np.array(SIZES) / sum(SIZES)
    for round_index in range(2):
        per_rank = [r[round_index] for r in results]
        assert len({r["sha"] for r in per_rank}) == 1, "ranks hold different models"
        decoded = []
        for r in per_rank:
            update = torch.from_numpy(r["update"])
            codes, scales = quantize(update, BLOCK)
            dec = dequantize(codes, scales, BLOCK)
            decoded.append(dec.double().numpy())
            # error feedback: the residual is exactly what was not decoded, so sent + residual == update
            assert np.array_equal(r["residual"], (update - dec).numpy())
            np.testing.assert_allclose(dec.numpy() + r["residual"], r["update"], rtol=1e-6, atol=1e-12)
            assert r["local_equals_global"] and r["buckets"] == 6
            assert r["bytes"] == NUMEL + 4 * num_blocks(NUMEL, BLOCK) + 8
            assert r["stats"]["comm.bytes_per_site"] == r["bytes"]
        expected = per_rank[0]["before"].astype(np.float64) + sum(w * d for w, d in zip(weights, decoded))
        np.testing.assert_allclose(per_rank[0]["after"], expected, rtol=1e-6, atol=1e-6)
        # and close to the exact mean: within sum_i w_i * (absmax_i / 254) per value
        exact = per_rank[0]["before"] + sum(w * r["update"].astype(np.float64) for w, r in zip(weights, per_rank))
        bound = sum(w * np.abs(r["update"]).max() / 254 for w, r in zip(weights, per_rank))
        assert np.abs(per_rank[0]["after"] - exact).max() <= bound * 1.01 + 1e-6
