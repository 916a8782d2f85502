"""Dense exchange: the sample-weighted mean through flat, bounded buckets, in place.

Each site scales its bucket of local weights by n_i / N and one all_reduce per
bucket sums it over sites. Because the weights sum to one, that sum is the global
model plus the sample-weighted mean update, sum_i n_i/N (local_i - global), so the
strategy sees exactly what FedAvg on updates defines, while the bucket costs two
elementwise passes instead of four (measured in bench/aggregation.py). The buckets
are slices of the site's own weight vector: no extra buffer at all, and never one
collective per tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def bucket_ranges(numel: int, bucket_numel: int) -> list[tuple[int, int]]:
    return [(start, min(start + bucket_numel, numel)) for start in range(0, numel, bucket_numel)]


class DenseExchange:
    def __init__(self, numel: int, bucket_bytes: int, dtype: torch.dtype):
        element_size = torch.empty((), dtype=dtype).element_size()
        self.bucket_numel = max(1, min(numel, bucket_bytes // element_size))
        self.ranges = bucket_ranges(numel, self.bucket_numel)

    @torch.no_grad()
    def exchange_(self, local: torch.Tensor, global_: torch.Tensor, weight: float, strategy) -> int:
        """Aggregates and applies the round's mean; leaves local == global on every site. Returns bytes sent."""
        sent = 0
        for start, end in self.ranges:
            bucket = local[start:end]
            bucket.mul_(weight)
            dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
            sent += bucket.numel() * bucket.element_size()
            strategy.apply_average_(global_[start:end], bucket, slice(start, end))
        return sent
