"""SCAFFOLD (strategy=scaffold): local steps, control variates and the server step against the paper's
equations written out by hand; state and refusals; the round loop through the command line."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scaling_fl.config import ConfigError, resolve
from scaling_fl.exchange.base import MeanPart
from scaling_fl.flat_state import flatten_model_
from scaling_fl.strategies import make_strategy
from scaling_fl.strategies.scaffold import next_site_control
from scaling_fl.train.local import train_round

ROWS, STEPS, LR = 12, 3, 0.5


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(5, 3)

    def forward(self, x):
        return SimpleNamespace(logits=self.layer(x))


def _data(site: int):
    generator = torch.Generator().manual_seed(10 + site)
    x = torch.randn(ROWS, 5, generator=generator) + site  # the sites' data differ: their gradients drift apart
    return x, torch.randint(0, 3, (ROWS,), generator=generator)


def _model() -> tuple[Linear, torch.Tensor]:
    torch.manual_seed(1)
    model = Linear()
    return model, flatten_model_(model)


def _train_site(model, site: int, correction: torch.Tensor | None) -> float:
    """Our local training: STEPS full-batch SGD steps with the correction c - c_i; returns K x lr."""
    x, y = _data(site)
    rows = [{"x": x[i], "labels": y[i]} for i in range(ROWS)]

    def collate(items):
        return {"x": torch.stack([i["x"] for i in items]), "labels": torch.stack([i["labels"] for i in items])}

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sums = train_round(
        model,
        rows,
        collate,
        [[np.arange(ROWS)]] * STEPS,
        optimizer=optimizer,
        scheduler=scheduler,
        precision="fp32",
        max_grad_norm=0.0,
        device=torch.device("cpu"),
        control_correction=correction,
    )
    return sums.lr_sum


def _gradient(flat_weights: torch.Tensor, site: int) -> torch.Tensor:
    """The full-batch cross-entropy gradient at flat weights [W (3x5), b (3)], by autograd."""
    w = flat_weights[:15].view(3, 5).clone().requires_grad_(True)
    b = flat_weights[15:].clone().requires_grad_(True)
    x, y = _data(site)
    loss = F.cross_entropy(x @ w.T + b, y)
    gw, gb = torch.autograd.grad(loss, [w, b])
    return torch.cat([gw.flatten(), gb])


def _by_hand(rounds: int, sites: list[int], num_sites: int, participants_by_round: list[list[int]]):
    """The paper's Algorithm 1 with option II, sample weights equal (every site has ROWS rows)."""
    _, x = _model()
    x = x.detach().clone()
    c = torch.zeros_like(x)
    c_i = {site: torch.zeros_like(x) for site in sites}
    for participants in participants_by_round[:rounds]:
        dy, dc = [], []
        for site in participants:
            y = x.clone()
            for _ in range(STEPS):
                y = y - LR * (_gradient(y, site) + c - c_i[site])
            new = c_i[site] - c + (x - y) / (STEPS * LR)
            dy.append(y - x)
            dc.append(new - c_i[site])
            c_i[site] = new
        x = x + torch.stack(dy).mean(0)  # server lr 1
        c = c + len(participants) / num_sites * torch.stack(dc).mean(0)
    return x, c, c_i


def _ours(rounds: int, sites: list[int], num_sites: int, participants_by_round: list[list[int]]):
    """The same with our pieces: train_round's correction, next_site_control, the Scaffold strategy."""
    model, local = _model()
    global_ = local.detach().clone()
    strategy = make_strategy("scaffold", global_.numel())
    c_i = {site: torch.zeros_like(global_) for site in sites}
    for participants in participants_by_round[:rounds]:
        update_sum, control_sum = torch.zeros_like(global_), torch.zeros_like(global_)
        for site in participants:
            with torch.no_grad():
                local.copy_(global_)
            lr_sum = _train_site(model, site, strategy.control - c_i[site])
            new = next_site_control(c_i[site], strategy.control, local.detach(), global_, lr_sum)
            update_sum += (local.detach() - global_) / len(participants)
            control_sum += (new - c_i[site]) / num_sites
            c_i[site] = new
        strategy.apply_(global_, MeanPart(slice(0, global_.numel()), update_sum, is_average=False))
        strategy.apply_control_(MeanPart(slice(0, global_.numel()), control_sum, is_average=True))
    return global_, strategy.control, c_i


def test_one_site_with_full_participation_is_its_definition():
    # One site: c = c_1 after every round, so the correction c - c_1 is zero and local training is plain
    # SGD; the variate is the mean gradient along the round's path, (x - y) / (K lr).
    x, c, c_i = _ours(2, [0], 1, [[0], [0]])
    model, start = _model()
    path, y = [], start.detach().clone()
    for _ in range(2 * STEPS):  # two rounds of plain gradient descent
        path.append(_gradient(y, 0))
        y = y - LR * path[-1]
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    second_round_mean_gradient = torch.stack(path[STEPS:]).mean(0)
    torch.testing.assert_close(c, second_round_mean_gradient, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c_i[0], c)


def test_several_sites_with_sampling_follow_algorithm_1_option_ii():
    rounds = [[0, 1], [1, 2], [0, 2]]  # 2 of 3 sites a round: sites sitting out keep their variate
    expected = _by_hand(3, [0, 1, 2], 3, rounds)
    ours = _ours(3, [0, 1, 2], 3, rounds)
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[1], expected[1], rtol=1e-4, atol=1e-6)
    for site in (0, 1, 2):
        torch.testing.assert_close(ours[2][site], expected[2][site], rtol=1e-4, atol=1e-6)
    mean_of_sites = torch.stack(list(ours[2].values())).mean(0)
    torch.testing.assert_close(ours[1], mean_of_sites, rtol=1e-4, atol=1e-7)  # c stays the mean of all c_i
    assert float(ours[1].abs().max()) > 1e-3  # the correction was at work from round 2 on


def test_the_server_variate_is_checkpointed_and_restored_exactly():
    strategy = make_strategy("scaffold", 10)
    strategy.apply_control_(MeanPart(slice(2, 5), torch.tensor([1.0, -2.0, 3.0]), is_average=True))
    restored = make_strategy("scaffold", 10)
    restored.load_state_dict({k: v.clone() for k, v in strategy.state_dict().items()})
    assert torch.equal(restored.control, strategy.control)
    with pytest.raises(ValueError, match="scaffold: expected"):
        restored.load_state_dict({"momentum": torch.zeros(10)})


@pytest.mark.parametrize(
    "given,problem",
    [
        ({"dp": "client", "dp_clip_norm": 1.0}, "dp='client' is not allowed: none with strategy=scaffold"),
        ({"sync": "periodic", "comm_period": 2}, "sync='periodic' is not allowed: round with strategy=scaffold"),
        ({"aggregation": "median"}, "aggregation='median' is not allowed: mean with strategy=scaffold"),
    ],
)
def test_what_scaffold_cannot_combine_with_is_refused(given, problem):
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(")):
        resolve({"strategy": "scaffold", **given})
