"""strategy= name -> Strategy, with per-strategy defaults for fine-tuning pretrained transformers.

Defaults (a hyperparameter left as None takes them):

| strategy   | server_learning_rate | server_momentum | beta1 | beta2 | tau  |
|------------|----------------------|-----------------|-------|-------|------|
| fedavg     | 1.0                  | -               | -     | -     | -    |
| fedavgm    | 1.0                  | 0.9             | -     | -     | -    |
| fedadam    | 1e-3                 | -               | 0.9   | 0.99  | 1e-3 |
| fedyogi    | 1e-3                 | -               | 0.9   | 0.99  | 1e-3 |
| fedadagrad | 1e-3                 | -               | 0.0   | -     | 1e-3 |
| scaffold   | 1.0                  | -               | -     | -     | -    |

Why: FedAvg/FedAvgM use lr 1 and momentum 0.9 as in Hsu et al. 2019 and Reddi et al. 2021
(its effective step for a steady direction is lr / (1 - momentum) = 10x FedAvg's: lower
lr to 0.1-0.3 if rounds overshoot). For the adaptive ones, Flower's defaults (eta 0.1,
tau 1e-9) are made for training from scratch: with tau 1e-9 every coordinate moves by
about eta per round, and 0.1 per round destroys a pretrained transformer, whose weights
are ~0.05 and move ~1e-4..1e-3 per round under client AdamW. Reddi et al. found tau 1e-3
best on most tasks. With lr == tau == 1e-3 a coordinate whose update is below 1e-3 moves
about as under FedAvg (lr/tau = 1), and none moves more than ~1e-3 per round: a
per-coordinate trust region. Raise lr (keep tau) to move faster. betas are Flower's and
the paper's; FedAdagrad has no momentum by default (Flower's choice).
"""

from __future__ import annotations

import torch

from scaling_fl.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from scaling_fl.strategies.base import Strategy
from scaling_fl.strategies.fedavg import FedAvg
from scaling_fl.strategies.fedavgm import FedAvgM
from scaling_fl.strategies.scaffold import Scaffold

STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold")

STRATEGY_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {"server_learning_rate": 1.0},
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.9},
    "fedadam": {"server_learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"server_learning_rate": 1e-3, "beta1": 0.0, "tau": 1e-3},
    "scaffold": {"server_learning_rate": 1.0},
}


def strategy_hyperparameters(name: str, **given: float | None) -> dict[str, float]:
    """The hyperparameters `name` uses: the given ones over its defaults (None = default)."""
    if name not in STRATEGY_DEFAULTS:
        raise ValueError(f"strategy={name!r}: choose one of {', '.join(STRATEGIES)}")
    defaults = STRATEGY_DEFAULTS[name]
    return {key: (given[key] if given.get(key) is not None else default) for key, default in defaults.items()}


def make_strategy(
    name: str,
    numel: int,
    device: torch.device | str = "cpu",
    *,
    server_learning_rate: float | None = None,
    server_momentum: float | None = None,
    beta1: float | None = None,
    beta2: float | None = None,
    tau: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Strategy:
    """Builds the strategy; hyperparameters it does not use are ignored, None takes its default."""
    hp = strategy_hyperparameters(
        name,
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
        beta1=beta1,
        beta2=beta2,
        tau=tau,
    )
    if name == "fedavg":
        if hp["server_learning_rate"] == 1.0:
            return FedAvg()
        strategy = FedAvgM(
            numel, device, server_learning_rate=hp["server_learning_rate"], server_momentum=0.0, dtype=dtype
        )
        strategy.name = "fedavg"
        return strategy
    if name == "fedavgm":
        return FedAvgM(numel, device, dtype=dtype, **hp)
    if name == "scaffold":
        return Scaffold(numel, device, dtype=dtype, **hp)
    cls = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[name]
    return cls(numel, device, dtype=dtype, **hp)
