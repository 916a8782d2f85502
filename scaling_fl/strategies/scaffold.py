"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"), option II.

Control variates estimate gradients: c for all sites (the server's), c_i for site i. Each local step
corrects the site's drift with them, y <- y - lr (g_i(y) + c - c_i) (train/local.py). After its K
local steps a site sets

    c_i+ = c_i - c + (x - y_i) / (K lr)          (option II; K lr is the sum of the steps' learning
                                                  rates, so a schedule is followed exactly)

and sends its model update y_i - x and its variate update c_i+ - c_i. The server applies

    x <- x + server_learning_rate * mean_i (y_i - x)        (the exchange's sample-weighted mean)
    c <- c + (1 / N) * sum over participants (c_i+ - c_i)   (= |S|/N x their unweighted mean)

so c stays the mean of all N sites' variates, also under sampling. Sites that sit a round out keep
their c_i; c_i lives with the site's state (site_state.py, checkpointed per site), c with the
strategy (checkpointed). The variate update is a second model-sized message per site and round.
"""

from __future__ import annotations

import torch

from scaling_fl.strategies.base import Strategy


class Scaffold(Strategy):
    name = "scaffold"

    def __init__(
        self,
        numel: int,
        device: torch.device | str = "cpu",
        *,
        server_learning_rate: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ):
        if not server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        self.server_learning_rate = float(server_learning_rate)
        self.control = torch.zeros(numel, device=device, dtype=dtype)  # c

    def apply_update_(self, global_part: torch.Tensor, mean_update: torch.Tensor, where: slice) -> None:
        global_part.add_(mean_update, alpha=self.server_learning_rate)

    def apply_control_(self, part) -> None:
        """c += one bucket of sum_i (c_i+ - c_i) / N (an exchange.MeanPart of the variate exchange)."""
        self.control[part.where].add_(part.values)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"control": self.control}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"control"} or state["control"].shape != self.control.shape:
            raise ValueError(
                f"scaffold: expected {{'control': {tuple(self.control.shape)}}}, got "
                f"{ {k: tuple(v.shape) for k, v in state.items()} }"
            )
        self.control.copy_(state["control"])


@torch.no_grad()
def next_site_control(
    site_control: torch.Tensor, server_control: torch.Tensor, local: torch.Tensor, global_: torch.Tensor, lr_sum: float
) -> torch.Tensor:
    """Option II: c_i+ = c_i - c + (x - y_i) / (K lr), a new tensor. A round whose steps all had learning
    rate 0 (the first warm-up step alone) moved nothing and teaches nothing: c_i stays."""
    if lr_sum <= 0:
        return site_control.clone()
    return (global_ - local).div_(lr_sum).add_(site_control).sub_(server_control)
