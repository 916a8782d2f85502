"""The round loop's parts, built from the config: the strategy, the exchange, the sync policy, privacy.

One place that reads the config for them, so the strategies/ and exchange/ packages stay plain
tensor code that knows nothing about Config, and both round loops build the very same parts.
"""

from __future__ import annotations

import torch

from scaling_fl.config import Config, clipped_count_stddev
from scaling_fl.exchange import (
    GatheredExchange,
    PackedExchange,
    SyncPolicy,
    make_exchange,
    make_sync_policy,
    segments_from_model,
)
from scaling_fl.privacy import ClientDP, NoPrivacy
from scaling_fl.strategies import Strategy, make_strategy


def strategy_from_config(cfg: Config, weights: torch.Tensor) -> Strategy:
    return make_strategy(
        cfg.strategy,
        weights.numel(),
        weights.device,
        dtype=weights.dtype,
        server_learning_rate=cfg.server_learning_rate,
        server_momentum=cfg.server_momentum,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        tau=cfg.tau,
    )


def _codec_options(cfg: Config, model: torch.nn.Module, weights: torch.Tensor) -> dict:
    per_tensor = cfg.sparsity_scope == "tensor" or cfg.sparse_average == "fl4health"
    return {
        "bucket_bytes": int(cfg.bucket_size_mb * 2**20),
        "device": weights.device,
        "dtype": weights.dtype,
        "sparsity_level": cfg.sparsity_level,
        "sparsity_scope": cfg.sparsity_scope,
        "segments": segments_from_model(model, weights) if per_tensor else None,
        "selection_criterion": cfg.selection_criterion,
        "sparse_average": cfg.sparse_average,
        "error_feedback": cfg.error_feedback,
        "block_size": cfg.quantization_block_size,
    }


def exchange_from_config(
    cfg: Config, model: torch.nn.Module, weights: torch.Tensor, world_size: int, site_weights: list[float]
):
    """The exchange of one site per process: each site's encoded update crosses the wire."""
    return make_exchange(
        cfg.exchange,
        weights.numel(),
        world_size=world_size,
        site_weights=site_weights,
        **_codec_options(cfg, model, weights),
    )


def packed_exchange_from_config(
    cfg: Config, model: torch.nn.Module, weights: torch.Tensor, num_sites: int
) -> PackedExchange | GatheredExchange:
    """The exchange of a process training its sites in turn: each encoded as if alone and the processes'
    sums crossing the wire, or (robust aggregation) every participant's update gathered bucket by bucket."""
    if cfg.aggregation != "mean":
        return GatheredExchange(
            cfg.aggregation,
            weights.numel(),
            num_sites,
            bucket_bytes=int(cfg.bucket_size_mb * 2**20),
            device=weights.device,
            trim_fraction=cfg.trim_fraction,
            krum_byzantine=cfg.krum_byzantine,
            krum_select=cfg.krum_select,
            keep_on=weights.device if cfg.site_state_offload == "device" else "cpu",
        )
    return PackedExchange(cfg.exchange, weights.numel(), **_codec_options(cfg, model, weights))


def variate_exchange_from_config(cfg: Config, weights: torch.Tensor) -> PackedExchange | None:
    """strategy=scaffold: the sites' control-variate changes, summed by a dense exchange of their own."""
    if cfg.strategy != "scaffold":
        return None
    return PackedExchange("dense", weights.numel(), bucket_bytes=int(cfg.bucket_size_mb * 2**20), device=weights.device)


def sync_policy_from_config(cfg: Config, steps_per_round: int) -> SyncPolicy:
    return make_sync_policy(
        cfg.sync,
        steps_per_round=steps_per_round,
        comm_period=cfg.comm_period,
        check_every=cfg.check_every or steps_per_round,
        delta_threshold=cfg.delta_threshold,
    )


def privacy_from_config(cfg: Config, num_sites: int, participants: int) -> NoPrivacy:
    """dp=client: clipping, equal weights and seeded noise (scaling_fl/privacy.py); dp=none: sample-weighted."""
    if cfg.dp == "none":
        return NoPrivacy()
    return ClientDP(
        cfg.dp_clip_norm,
        cfg.dp_noise_multiplier,
        cfg.dp_delta,
        cfg.seed,
        participants / num_sites,
        adaptive=cfg.dp_adaptive_clip,
        target_quantile=cfg.dp_target_quantile,
        clip_learning_rate=cfg.dp_clip_learning_rate,
        count_stddev=clipped_count_stddev(cfg),
    )
