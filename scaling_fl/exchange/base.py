"""The exchange contract: what the round loop may ask of any exchange.

An exchange turns every site's local model into the participants' mean, bucket by bucket, and
hands each bucket to the round loop, which applies the strategy in one visible step:

    for part in exchange.means(local, global_, weight):
        strategy.apply_(global_, part)

so the strategy is never applied inside an exchange. The generator pipelines: while the loop
applies bucket b, the collectives of the next buckets are on the wire. After the loop `local ==
global_` on every site and `stats` holds the figures of the exchange (comm.bytes_per_site, ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import torch


class MeanPart(NamedTuple):
    """One bucket of the participants' mean: the sample-weighted mean update, or (dense exchanges,
    which sum weights rather than updates) the weighted average of the local models itself."""

    where: slice
    values: torch.Tensor
    is_average: bool


@runtime_checkable
class Exchange(Protocol):
    density: float  # the share of the values a site sends
    needs_reference: bool  # whether it reads the previous global model (dense: no, it sums weights)
    stats: dict[str, float]

    def means(self, local: torch.Tensor, global_: torch.Tensor, weight: float) -> Iterator[MeanPart]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class ExchangeBase:
    """The defaults, and `exchange_` for callers that hold the strategy (tests, benchmarks)."""

    density = 1.0
    needs_reference = True
    residual: torch.Tensor | None = None

    def means(self, local: torch.Tensor, global_: torch.Tensor, weight: float) -> Iterator[MeanPart]:
        raise NotImplementedError

    def exchange_(self, local: torch.Tensor, global_: torch.Tensor, weight: float, strategy) -> int:
        """The whole exchange with the strategy applied to every part; returns the bytes this site sent."""
        for part in self.means(local, global_, weight):
            strategy.apply_(global_, part)
        return int(self.stats["comm.bytes_per_site"])
