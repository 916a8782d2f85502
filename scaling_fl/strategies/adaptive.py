"""Adaptive server optimizers of Reddi et al. 2021 ("Adaptive Federated Optimization"), on the mean update Δ.

    m <- beta1 * m + (1 - beta1) * Δ
    v <- beta2 * v + (1 - beta2) * Δ²                  FedAdam
    v <- v - (1 - beta2) * Δ² * sign(v - Δ²)           FedYogi
    v <- v + Δ²                                        FedAdagrad
    global <- global + lr * m̂ / (sqrt(v̂) + tau)

m and v start at 0 and, unlike the paper's Algorithm 2, are bias-corrected as in Adam
(m̂ = m / (1 - beta1^t), v̂ = v / (1 - beta2^t); FedAdagrad's v is a plain sum and is not
corrected). Without the correction the first rounds move ~10x less than the later ones,
which matters in fine-tuning, where a run has few rounds. FedAdam is then exactly
`torch.optim.Adam(lr, betas=(beta1, beta2), eps=tau)` stepping on the pseudo-gradient -Δ
(tests/test_strategies.py checks it). Flower differs: its FedAdam corrects with exponent
round + 1, its FedYogi and FedAdagrad do not correct at all, and its FedAdagrad has beta1 = 0
(ours too, by default).

t counts applied mean updates. Exchanges apply the mean bucket by bucket in increasing
order, once per exchange, so a call whose slice starts at 0 begins a new step.
"""

from __future__ import annotations

import math

import torch

from scaling_fl.strategies.base import Strategy


class _AdaptiveStrategy(Strategy):
    correct_v = True

    def __init__(
        self,
        numel: int,
        device: torch.device | str = "cpu",
        *,
        server_learning_rate: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        dtype: torch.dtype = torch.float32,
    ):
        if not server_learning_rate > 0:
            raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
        if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.server_learning_rate, self.beta1, self.beta2, self.tau = float(server_learning_rate), beta1, beta2, tau
        self.m = torch.zeros(numel, device=device, dtype=dtype)
        self.v = torch.zeros(numel, device=device, dtype=dtype)
        self.step = 0

    def _second_moment_(self, v: torch.Tensor, delta: torch.Tensor) -> None:
        """v <- the rule's second moment; may overwrite delta (m is already updated)."""
        raise NotImplementedError

    def apply_update_(self, global_part: torch.Tensor, mean_update: torch.Tensor, where: slice) -> None:
        if (where.start or 0) == 0:
            self.step += 1
        elif self.step == 0:
            raise RuntimeError(f"{self.name}: the mean update must be applied from the start of the model first")
        m, v = self.m[where], self.v[where]
        m.mul_(self.beta1).add_(mean_update, alpha=1 - self.beta1)
        self._second_moment_(v, mean_update)
        bias1 = 1 - self.beta1**self.step
        bias2_sqrt = math.sqrt(1 - self.beta2**self.step) if self.correct_v else 1.0
        denominator = mean_update  # the contract lets us overwrite it: no extra buffer
        torch.sqrt(v, out=denominator).div_(bias2_sqrt).add_(self.tau)
        global_part.addcdiv_(m, denominator, value=self.server_learning_rate / bias1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"m": self.m, "v": self.v, "step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"m", "v", "step"} or state["m"].shape != self.m.shape or state["v"].shape != self.v.shape:
            raise ValueError(
                f"{self.name}: expected m, v of shape {tuple(self.m.shape)} and a 0-d step, got "
                f"{ {k: tuple(v.shape) for k, v in state.items()} }"
            )
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
        self.step = int(state["step"])


class FedAdam(_AdaptiveStrategy):
    name = "fedadam"

    def _second_moment_(self, v, delta):
        v.mul_(self.beta2).addcmul_(delta, delta, value=1 - self.beta2)


class FedYogi(_AdaptiveStrategy):
    name = "fedyogi"

    def _second_moment_(self, v, delta):
        square = delta.mul_(delta)
        sign = torch.sub(v, square).sign_()  # the one bucket-sized temporary of all the strategies
        v.addcmul_(square, sign, value=-(1 - self.beta2))


class FedAdagrad(_AdaptiveStrategy):
    name = "fedadagrad"
    correct_v = False

    def __init__(
        self,
        numel: int,
        device: torch.device | str = "cpu",
        *,
        server_learning_rate: float = 1e-3,
        beta1: float = 0.0,
        beta2: float = 0.0,
        tau: float = 1e-3,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(
            numel, device, server_learning_rate=server_learning_rate, beta1=beta1, beta2=beta2, tau=tau, dtype=dtype
        )

    def _second_moment_(self, v, delta):
        v.addcmul_(delta, delta)
