"""FedAvg (McMahan et al. 2017) on updates: global += mean update."""

from __future__ import annotations

import torch

from scaling_fl.strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"
    needs_reference = False  # with a dense exchange the average is the next global model

    def apply_update_(self, global_part: torch.Tensor, mean_update: torch.Tensor, where: slice) -> None:
        global_part.add_(mean_update)

    def apply_average_(self, global_part: torch.Tensor, average: torch.Tensor, where: slice) -> None:
        # global + (average - global) is the average itself: skip the round trip. When the round
        # loop keeps no separate global copy (dense FedAvg), both are the same memory.
        if global_part.data_ptr() != average.data_ptr():
            global_part.copy_(average)
