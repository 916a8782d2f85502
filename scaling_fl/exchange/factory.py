"""exchange= name -> an exchange object (the contract of exchange/base.py: means(), stats, state_dict())."""

from __future__ import annotations

import torch

from scaling_fl.exchange.dense import DenseExchange
from scaling_fl.exchange.quantize import DEFAULT_BUCKET_BYTES, Int8Exchange
from scaling_fl.exchange.sparse import SparseExchange

EXCHANGES = ("dense", "sparse", "int8", "sparse_int8")


def make_exchange(
    name: str,
    numel: int,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    sparsity_level: float = 0.1,
    sparsity_scope: str = "model",
    segments: list[tuple[int, int]] | None = None,
    selection_criterion: str = "largest_magnitude_change",
    sparse_average: str = "per_position",
    error_feedback: bool = True,
    block_size: int = 256,
    scale_dtype: str = "fp32",
    world_size: int | None = None,
    site_weights: list[float] | None = None,
):
    """Options an exchange does not use are ignored (sparsity for int8, everything for dense)."""
    if name == "dense":
        return DenseExchange(numel, bucket_bytes, dtype, world_size=world_size)
    if name == "int8":
        return Int8Exchange(
            numel,
            bucket_bytes=bucket_bytes,
            block_size=block_size,
            scale_dtype=scale_dtype,
            error_feedback=error_feedback,
            device=device,
            dtype=dtype,
            world_size=world_size,
            site_weights=site_weights,
        )
    if name in ("sparse", "sparse_int8"):
        return SparseExchange(
            numel,
            sparsity_level=sparsity_level,
            sparsity_scope=sparsity_scope,
            segments=segments,
            selection_criterion=selection_criterion,
            sparse_average=sparse_average,
            error_feedback=error_feedback,
            values="int8" if name == "sparse_int8" else "fp32",
            block_size=block_size,
            scale_dtype=scale_dtype,
            bucket_bytes=bucket_bytes,
            device=device,
            dtype=dtype,
            world_size=world_size,
            site_weights=site_weights,
        )
    raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, got {name!r}")
