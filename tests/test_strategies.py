"""Server strategies against hand-computed steps (float64 numpy), bucket by bucket, and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from scaling_fl.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from scaling_fl.strategies.factory import STRATEGIES, STRATEGY_DEFAULTS, make_strategy
from scaling_fl.strategies.fedavg import FedAvg
from scaling_fl.strategies.fedavgm import FedAvgM

NUMEL = 10
SPLIT = 4  # the model is applied as two buckets, [0, 4) and [4, 10)
HP = {"server_learning_rate": 0.1, "server_momentum": 0.5, "beta1": 0.8, "beta2": 0.9, "tau": 1e-2}


def start() -> torch.Tensor:
    return torch.linspace(-0.5, 0.5, NUMEL)


def mean_update(step: int) -> torch.Tensor:
    return 0.05 * torch.randn(NUMEL, generator=torch.Generator().manual_seed(step))


def apply_in_buckets(strategy, weights: torch.Tensor, delta: torch.Tensor) -> None:
    delta = delta.clone()
    for where in (slice(0, SPLIT), slice(SPLIT, NUMEL)):
        strategy.apply_update_(weights[where], delta[where], where)


def reference(name: str, steps: int) -> np.ndarray:
    """The strategies' rules written out in float64, one whole-model step at a time."""
    x = start().double().numpy()
    m = np.zeros(NUMEL)
    v = np.zeros(NUMEL)
    lr, mu, b1, b2, tau = (HP[k] for k in ("server_learning_rate", "server_momentum", "beta1", "beta2", "tau"))
    for t in range(1, steps + 1):
        d = mean_update(t).double().numpy()
        if name in ("fedavg", "scaffold"):  # SCAFFOLD's model step; its variates: tests/test_scaffold.py
            x = x + lr * d
        elif name == "fedavgm":
            m = mu * m + d
            x = x + lr * m
        else:
            m = b1 * m + (1 - b1) * d
            if name == "fedadam":
                v = b2 * v + (1 - b2) * d * d
            elif name == "fedyogi":
                v = v - (1 - b2) * d * d * np.sign(v - d * d)
            else:
                v = v + d * d
            v_hat = v if name == "fedadagrad" else v / (1 - b2**t)
            x = x + lr * (m / (1 - b1**t)) / (np.sqrt(v_hat) + tau)
    return x


@pytest.mark.parametrize("name", STRATEGIES)
def test_three_steps_match_the_hand_computed_rule(name):
    strategy = make_strategy(name, NUMEL, "cpu", **HP)
    weights = start()
    for t in range(1, 4):
        apply_in_buckets(strategy, weights, mean_update(t))
        np.testing.assert_allclose(weights.double().numpy(), reference(name, t), rtol=1e-5, atol=1e-6)


def test_fedadam_is_torch_adam_on_the_negative_mean_update():
    ours = FedAdam(NUMEL, server_learning_rate=0.1, beta1=0.8, beta2=0.9, tau=1e-2)
    weights = start()
    param = torch.nn.Parameter(start())
    adam = torch.optim.Adam([param], lr=0.1, betas=(0.8, 0.9), eps=1e-2, foreach=False)
    for t in range(1, 4):
        apply_in_buckets(ours, weights, mean_update(t))
        param.grad = -mean_update(t)
        adam.step()
        torch.testing.assert_close(weights, param.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_dict_round_trip_through_safetensors_continues_identically(name, tmp_path):
    first = make_strategy(name, NUMEL, "cpu", **HP)
    weights = start()
    for t in (1, 2):
        apply_in_buckets(first, weights, mean_update(t))
    state = first.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    if state:  # checkpoints store strategy state as safetensors
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "strategy.safetensors")
        state = load_file(tmp_path / "strategy.safetensors")
    resumed = make_strategy(name, NUMEL, "cpu", **HP)
    resumed.load_state_dict(state)
    weights_resumed = weights.clone()
    for t in (3, 4):
        apply_in_buckets(first, weights, mean_update(t))
        apply_in_buckets(resumed, weights_resumed, mean_update(t))
    assert torch.equal(weights, weights_resumed)
    for key, value in first.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_generic_average_path_equals_update_path():
    hp = {k: HP[k] for k in ("server_learning_rate", "beta1", "beta2", "tau")}
    a, b = FedYogi(NUMEL, **hp), FedYogi(NUMEL, **hp)
    wa, wb = start(), start()
    for t in (1, 2):
        apply_in_buckets(a, wa, mean_update(t))
        average = wb + mean_update(t)
        for where in (slice(0, SPLIT), slice(SPLIT, NUMEL)):
            b.apply_average_(wb[where], average[where], where)
            assert torch.equal(wb[where], average[where])
    torch.testing.assert_close(wa, wb, rtol=0, atol=1e-7)


def test_factory_defaults_and_fedavg_server_learning_rate():
    assert isinstance(make_strategy("fedavg", NUMEL), FedAvg)
    assert isinstance(make_strategy("fedavgm", NUMEL), FedAvgM)
    adam = make_strategy("fedadam", NUMEL)
    assert (adam.server_learning_rate, adam.beta1, adam.beta2, adam.tau) == (1e-3, 0.9, 0.99, 1e-3)
    adagrad = make_strategy("fedadagrad", NUMEL, beta2=0.5)  # unused hyperparameters are ignored
    assert isinstance(adagrad, FedAdagrad) and adagrad.beta1 == 0.0
    assert make_strategy("fedavgm", NUMEL).server_momentum == STRATEGY_DEFAULTS["fedavgm"]["server_momentum"]
    scaled = make_strategy("fedavg", NUMEL, server_learning_rate=0.5)
    assert scaled.name == "fedavg" and scaled.state_dict() == {}
    weights = start()
    apply_in_buckets(scaled, weights, mean_update(1))
    torch.testing.assert_close(weights, start() + 0.5 * mean_update(1))
    assert isinstance(make_strategy("fedyogi", NUMEL), FedYogi)


@pytest.mark.parametrize(
    "kwargs", [{"server_learning_rate": 0.0}, {"server_momentum": 1.0}, {"beta1": 1.0}, {"tau": 0.0}]
)
def test_bad_hyperparameters_fail_clearly(kwargs):
    name = "fedavgm" if "server_momentum" in kwargs else "fedadam"
    with pytest.raises(ValueError):
        make_strategy(name, NUMEL, **kwargs)
    with pytest.raises(ValueError, match="strategy='fedsgd'"):
        make_strategy("fedsgd", NUMEL)


def test_adaptive_step_counts_once_per_exchange_and_loading_checks_shapes():
    strategy = FedAdam(NUMEL)
    with pytest.raises(RuntimeError):
        strategy.apply_update_(start()[SPLIT:], mean_update(1)[SPLIT:], slice(SPLIT, NUMEL))
    apply_in_buckets(strategy, start(), mean_update(1))
    apply_in_buckets(strategy, start(), mean_update(2))
    assert int(strategy.state_dict()["step"]) == 2
    with pytest.raises(ValueError):
        FedAdam(NUMEL + 1).load_state_dict(strategy.state_dict())
    with pytest.raises(ValueError):
        FedAvgM(NUMEL).load_state_dict({})
