"""Server SGD with momentum on the mean update: FedAvgM (Hsu et al. 2019), and FedAvg with a server learning rate.

    buffer <- server_momentum * buffer + mean_update        (PyTorch SGD convention, buffer starts at 0)
    global <- global + server_learning_rate * buffer

This is Flower's FedAvgM written on updates (its pseudo-gradient is -mean_update). With
server_momentum == 0 no buffer is kept and the rule is `global += lr * mean_update`:
FedAvg with a server learning rate (lr == 1 is plain FedAvg; prefer `FedAvg` then, it
skips a subtraction on the dense path).
"""

from __future__ import annotations

import torch

from scaling_fl.strategies.base import Strategy


class FedAvgM(Strategy):
    name = "fedavgm"

    def __init__(
        self,
        numel: int,
        device: torch.device | str = "cpu",
        *,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.9,
        dtype: torch.dtype = torch.float32,
    ):
        if not server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        if not 0.0 <= server_momentum < 1.0:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        self.server_learning_rate = float(server_learning_rate)
        self.server_momentum = float(server_momentum)
        self.momentum = torch.zeros(numel, device=device, dtype=dtype) if server_momentum > 0 else None

    def apply_update_(self, global_part: torch.Tensor, mean_update: torch.Tensor, where: slice) -> None:
        if self.momentum is None:
            global_part.add_(mean_update, alpha=self.server_learning_rate)
            return
        buffer = self.momentum[where]
        buffer.mul_(self.server_momentum).add_(mean_update)
        global_part.add_(buffer, alpha=self.server_learning_rate)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.momentum is None else {"momentum": self.momentum}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.momentum is None:
            return super().load_state_dict(state)
        if set(state) != {"momentum"} or state["momentum"].shape != self.momentum.shape:
            raise ValueError(
                f"{self.name}: expected {{'momentum': {tuple(self.momentum.shape)}}}, got "
                f"{ {k: tuple(v.shape) for k, v in state.items()} }"
            )
        self.momentum.copy_(state["momentum"])
