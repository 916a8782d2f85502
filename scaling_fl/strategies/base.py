"""The strategy contract: pure tensor math on slices of the flat model."""

from __future__ import annotations

import torch


class Strategy:
    """Turns the sample-weighted mean update into the next global model.

    `where` is the slice of the flat model the tensors cover, so a stateful strategy
    can index its own flat state (moments) without holding a second layout.
    """

    name = "strategy"
    needs_reference = True  # whether it reads the previous global model (FedAvg does not)

    def apply_(self, global_: torch.Tensor, part) -> None:
        """Applies one part of the participants' mean (an exchange.MeanPart) to the global model."""
        global_part = global_[part.where]
        if part.is_average:
            self.apply_average_(global_part, part.values, part.where)
        else:
            self.apply_update_(global_part, part.values, part.where)

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
