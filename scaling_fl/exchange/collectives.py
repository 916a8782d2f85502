"""Small collectives shared by the round loop: start-up broadcast and metric sums."""

from __future__ import annotations

import torch
import torch.distributed as dist


def broadcast_flat_(flat: torch.Tensor, bucket_numel: int, src: int = 0) -> None:
    """Gives every site rank `src`'s weights, bucket by bucket (in place)."""
    for start in range(0, flat.numel(), bucket_numel):
        dist.broadcast(flat[start : start + bucket_numel], src=src)


def sum_across_sites(values: torch.Tensor) -> torch.Tensor:
    """Sums a small tensor of counters over all sites (in place, returned for chaining)."""
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def max_across_sites(values: torch.Tensor) -> torch.Tensor:
    """The elementwise largest value over all sites (in place, returned for chaining)."""
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def gather_from_sites(values: torch.Tensor) -> torch.Tensor:
    """Every site's small vector of values, stacked by rank ([world_size, n]) on every site."""
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values)
    return torch.stack(parts)


def broadcast_int(value: int, device: torch.device, src: int = 0) -> int:
    """Rank `src`'s decision (e.g. which checkpoint round to resume), the same on every site."""
    holder = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(holder, src=src)
    return int(holder.item())


def broadcast_state_(state: dict[str, torch.Tensor], src: int = 0) -> None:
    """Rank `src`'s tensors into every rank's tensors of the same names and shapes (in place)."""
    for name in sorted(state):
        dist.broadcast(state[name], src=src)


def wait_for_all_sites() -> None:
    dist.barrier()
