"""The strategy contract: pure tensor math on slices of the flat model."""

from __future__ import annotations

import torch


class Strategy:
    """Turns the sample-weighted mean update into the next global model.

    `where` is the slice of the flat model the tensors cover, so a stateful strategy
    can index its own flat state (moments) without holding a second layout.
    """

    name = "strategy"

    def apply_update_(self, global_part: torch.Tensor, mean_update: torch.Tensor, where: slice) -> None:
        """global_part <- next global model, given the mean update (may be overwritten)."""
        raise NotImplementedError

    def apply_average_(self, global_part: torch.Tensor, average: torch.Tensor, where: slice) -> None:
        """Same, given the weighted average of the local models; on return BOTH tensors hold the result."""
        mean_update = average.sub_(global_part)
        self.apply_update_(global_part, mean_update, where)
        average.copy_(global_part)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state, got {sorted(state)}")
