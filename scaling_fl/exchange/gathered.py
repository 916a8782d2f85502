"""The exchange of robust aggregation (aggregation=median | trimmed_mean | krum): every participant's
update, gathered bucket by bucket, reduced by a rule of strategies/robust.py.

Unlike a mean, these rules cannot be computed from sums: each bucket needs every participant's values
at once. What that costs, and how it stays bounded:

- each process keeps the full fp32 update of every participating site it hosts until the round's
  aggregation (one model size per hosted participant; one process per site: one model size);
- a bucket of all P participants' rows is gathered at a time, P x bucket_numel values, with
  bucket_numel = bucket_size_mb / (4 bytes x P): the gathered buffer stays within bucket_size_mb
  whatever P is (more participants, more and smaller buckets);
- a site puts its whole update on the wire once (Krum: twice, a pass for the distances and one for
  the mean of the chosen sites), where the mean sends it once and compressed exchanges less.

Rows are gathered with one all_reduce of a zero-filled [P, bucket] buffer in which each process fills
the rows of the sites it hosts, so any packing of sites into processes works and yields the same rows
in site order; a median or trimmed mean is then bitwise independent of the packing. The rules are
unweighted (see strategies/robust.py); the server strategy applies the result as a mean update.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from scaling_fl.exchange.base import MeanPart
from scaling_fl.exchange.dense import bucket_ranges, ring_wire_bytes
from scaling_fl.strategies.robust import add_squared_distances_, aggregate, krum_selection


class GatheredExchange:
    """add_site_(local, global_, weight, site) per participating site, then the round loop applies
    the strategy to every part of means(global_), as with PackedExchange (its contract)."""

    density = 1.0
    state_shapes: dict[str, int] = {}  # nothing per site survives the round

    def __init__(
        self,
        rule: str,
        numel: int,
        num_sites: int,
        *,
        bucket_bytes: int,
        device: torch.device,
        trim_fraction: float = 0.1,
        krum_byzantine: int = 0,
        krum_select: int = 1,
        keep_on: torch.device | str = "cpu",
    ):
        if rule not in ("median", "trimmed_mean", "krum"):
            raise ValueError(f"GatheredExchange aggregates median, trimmed_mean or krum, not {rule!r}")
        self.rule, self.numel, self.num_sites = rule, numel, num_sites
        self.bucket_bytes, self.device, self.keep_on = bucket_bytes, torch.device(device), torch.device(keep_on)
        self.trim_fraction, self.krum_byzantine, self.krum_select = trim_fraction, krum_byzantine, krum_select
        self.updates: dict[int, torch.Tensor] = {}  # site -> its update this round
        self.chosen: list[int] = []  # Krum: the sites whose mean was taken in the last round
        self.stats: dict[str, float] = {}

    def round_buffers(self) -> list[torch.Tensor]:
        """The updates kept until `means` (round_buffers_offload moves them out while a site trains)."""
        return list(self.updates.values())

    def idle_stats(self) -> dict[str, float]:
        return {"comm.bytes_per_site": 0, "comm.density": 1.0, "comm.wire_bytes_per_site": 0}

    @torch.no_grad()
    def add_site_(self, local: torch.Tensor, global_: torch.Tensor, weight: float, site: int) -> int:
        """Keeps the site's update (local - global_) until `means`; the weight is not used (unweighted rules)."""
        self.updates[site] = (local - global_).to(self.keep_on)
        return self.numel * 4

    @torch.no_grad()
    def means(self, global_: torch.Tensor) -> Iterator[MeanPart]:
        """All processes: the rule's result, bucket by bucket, as mean updates; then forgets the updates."""
        present = torch.zeros(self.num_sites, dtype=torch.float64, device=self.device)
        present[list(self.updates)] = 1.0
        dist.all_reduce(present, op=dist.ReduceOp.SUM)
        sites = [int(site) for site in present.nonzero().flatten().tolist()]
        row_of = {site: row for row, site in enumerate(sites)}
        count = len(sites)
        bucket_numel = max(1, min(self.numel, self.bucket_bytes // (4 * count)))
        ranges = bucket_ranges(self.numel, bucket_numel)
        rows = torch.empty(count * bucket_numel, dtype=torch.float32, device=self.device)

        def gathered(start: int, end: int) -> torch.Tensor:
            block = rows[: count * (end - start)].view(count, end - start).zero_()  # contiguous, for the collective
            for site, update in self.updates.items():
                block[row_of[site]].copy_(update[start:end])
            dist.all_reduce(block, op=dist.ReduceOp.SUM)
            return block

        passes = 1
        if self.rule == "krum":
            distances = torch.zeros(count, count, dtype=torch.float64)
            for start, end in ranges:
                add_squared_distances_(distances, gathered(start, end))
            self.chosen = [sites[row] for row in krum_selection(distances, self.krum_byzantine, self.krum_select)]
            mine = [site for site in self.chosen if site in self.updates]
            total = torch.empty(bucket_numel, dtype=torch.float32, device=self.device)
            for start, end in ranges:  # the chosen sites' mean: each process sums the chosen sites it hosts
                part = total[: end - start].zero_()
                for site in mine:
                    part.add_(self.updates[site][start:end].to(self.device))
                dist.all_reduce(part, op=dist.ReduceOp.SUM)
                yield MeanPart(slice(start, end), part.div_(len(self.chosen)), is_average=False)
            passes = 2
        else:
            for start, end in ranges:
                yield MeanPart(
                    slice(start, end), aggregate(gathered(start, end), self.rule, self.trim_fraction), is_average=False
                )
        sent = self.numel * 4 * passes
        world = dist.get_world_size()
        held = sum(update.nbytes for update in self.updates.values())
        self.stats = {
            "comm.bytes_per_site": sent,
            "comm.density": 1.0,
            "comm.wire_bytes_per_site": ring_wire_bytes(self.numel * 4, count, "all_gather")
            + (ring_wire_bytes(self.numel * 4, count, "all_reduce") if passes == 2 else 0),
            "comm.worker_bytes": self.numel * 4 * (count + passes - 1),
            "comm.worker_wire_bytes": ring_wire_bytes(self.numel * 4 * (count + passes - 1), world, "all_reduce"),
            "memory.exchange_peak_mb": (rows.nbytes + held) / 2**20,
        }
        self.updates.clear()
