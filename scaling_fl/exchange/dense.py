"""Dense exchange: the sample-weighted mean through flat, bounded buckets, in place.

Each site scales its bucket of local weights by n_i / N in place and one all_reduce per
bucket sums it over sites. Because the weights sum to one, that sum is the global model
plus the sample-weighted mean update, global + sum_i n_i/N (local_i - global): FedAvg on
updates, computed on weights. That costs two elementwise passes a bucket instead of four
(sub, scale, apply, copy back), which is what keeps the exchange within 1.3x of one raw
flat all_reduce (bench/aggregation.py). The price is rounding: the mean update a strategy
sees (average - global) carries an error of about eps * |weight| ~ 1e-8 for transformer
weights, against updates of 1e-6..1e-3 per round. The sparse and int8 exchanges, whose
selection and quantization depend on the update itself, work on (local - global) instead.
The buckets are slices of the site's own weight vector: no extra buffer at all, and never
one collective per tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from scaling_fl.exchange.base import ExchangeBase, MeanPart


def bucket_ranges(numel: int, bucket_numel: int) -> list[tuple[int, int]]:
    return [(start, min(start + bucket_numel, numel)) for start in range(0, numel, bucket_numel)]


def ring_wire_bytes(payload: int, world_size: int, collective: str) -> int:
    """Bytes a site sends on the wire with ring algorithms (gloo and NCCL use rings for large messages).

    all_reduce sends 2 (W - 1) / W x its payload; all_gather sends (W - 1) x its payload, because
    every site's payload must reach every other site. Payload bytes are what comm.bytes_per_site
    counts; this is what the network carries.
    """
    if collective == "all_reduce":
        return int(payload * 2 * (world_size - 1) / world_size)
    return payload * (world_size - 1)


def load_residual(residual: torch.Tensor | None, state: dict[str, torch.Tensor], what: str) -> None:
    """Loads an exchange's per-site state (the error-feedback residual, or nothing)."""
    expected = set() if residual is None else {"residual"}
    if set(state) != expected or (residual is not None and state["residual"].shape != residual.shape):
        raise ValueError(
            f"{what} exchange state: expected {sorted(expected)} "
            f"{'' if residual is None else tuple(residual.shape)}, got "
            f"{ {k: tuple(v.shape) for k, v in state.items()} }"
        )
    if residual is not None:
        residual.copy_(state["residual"])


class DenseExchange(ExchangeBase):
    """means(local, global_, weight) -> the weighted average, bucket by bucket (see exchange/base.py).

    Stateless: state_dict() is empty.
    """

    needs_reference = False  # it sums weights: the average alone is the mean

    def __init__(self, numel: int, bucket_bytes: int, dtype: torch.dtype, world_size: int | None = None):
        element_size = torch.empty((), dtype=dtype).element_size()
        self.bucket_numel = max(1, min(numel, bucket_bytes // element_size))
        self.ranges = bucket_ranges(numel, self.bucket_numel)
        self.world_size = world_size
        self.stats: dict[str, float] = {}

    @torch.no_grad()
    def means(self, local: torch.Tensor, global_: torch.Tensor, weight: float) -> Iterator[MeanPart]:
        """Yields the average of every bucket, in `local` itself; the strategy leaves local == global.

        The collectives run asynchronously in bucket order: while bucket b is being reduced,
        bucket b + 1 is scaled and bucket b - 1 is handed to the strategy, so the elementwise
        passes hide behind the wire instead of adding to it.
        """
        pending = []
        for start, end in self.ranges:
            bucket = local[start:end]
            bucket.mul_(weight)
            pending.append((start, end, dist.all_reduce(bucket, op=dist.ReduceOp.SUM, async_op=True)))
        sent = 0
        for start, end, work in pending:
            work.wait()
            sent += (end - start) * local.element_size()
            yield MeanPart(slice(start, end), local[start:end], is_average=True)
        world = self.world_size or dist.get_world_size()
        self.stats = {
            "comm.bytes_per_site": sent,
            "comm.density": 1.0,
            "comm.wire_bytes_per_site": ring_wire_bytes(sent, world, "all_reduce"),
            "memory.exchange_peak_mb": 0.0,
            "memory.exchange_state_mb": 0.0,
        }  # in place: no buffer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_residual(None, state, "dense")
