"""FedProx (proximal_mu): the proximal gradient against its closed form, mu=0 as plain training."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scaling_fl.config import ConfigError, resolve
from scaling_fl.train.local import ProximalTerm, train_round

ROWS = 12


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(5, 3)
        self.unused = torch.nn.Parameter(torch.ones(2))  # no gradient from the data loss

    def forward(self, x):
        return SimpleNamespace(logits=self.layer(x))


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, 5, generator=generator), torch.randint(0, 3, (ROWS,), generator=generator)


def _train(mu: float, max_grad_norm: float, steps: int = 3, lr: float = 0.5) -> Linear:
    torch.manual_seed(1)
    model = Linear()
    x, y = _data()
    rows = [{"x": x[i], "labels": y[i]} for i in range(ROWS)]

    def collate(items):
        return {
            "x": torch.stack([item["x"] for item in items]),
            "labels": torch.stack([item["labels"] for item in items]),
        }

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plan = [[np.arange(0, 6), np.arange(6, ROWS)]] * steps  # two micro-batches a step: one full batch
    train_round(
        model,
        rows,
        collate,
        plan,
        optimizer=optimizer,
        scheduler=scheduler,
        precision="fp32",
        max_grad_norm=max_grad_norm,
        device=torch.device("cpu"),
        proximal_mu=mu,
    )
    return model


def _by_hand(mu: float, max_grad_norm: float, steps: int = 3, lr: float = 0.5) -> dict[str, torch.Tensor]:
    """w <- w - lr * clip(grad CE_mean(w) + mu (w - w0)), the gradient of the proximal term written out."""
    torch.manual_seed(1)
    model = Linear()
    x, y = _data()
    start = {name: param.detach().clone() for name, param in model.named_parameters()}
    for _ in range(steps):
        loss = F.cross_entropy(model(x).logits, y)
        grads = dict(
            zip(dict(model.named_parameters()), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
        )
        with torch.no_grad():
            total = {}
            for name, param in model.named_parameters():
                data = grads[name] if grads[name] is not None else torch.zeros_like(param)
                total[name] = data + mu * (param - start[name])
            if max_grad_norm > 0:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in total.values()]))
                factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
                total = {name: g * factor for name, g in total.items()}
            for name, param in model.named_parameters():
                param -= lr * total[name]
    return {name: param.detach() for name, param in model.named_parameters()}


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05], ids=["no-clipping", "clipped"])
def test_local_steps_with_the_proximal_term_follow_its_closed_form_gradient(max_grad_norm):
    trained = dict(_train(0.7, max_grad_norm).named_parameters())
    expected = _by_hand(0.7, max_grad_norm)
    for name, value in expected.items():
        torch.testing.assert_close(trained[name].detach(), value, rtol=1e-5, atol=1e-6, msg=name)
    plain = dict(_train(0.0, max_grad_norm).named_parameters())
    assert not torch.allclose(plain["layer.weight"], trained["layer.weight"])  # the term pulls back toward w0


def test_mu_zero_is_plain_local_training_bitwise():
    plain = _train(0.0, 1.0)
    expected = _by_hand(0.0, 1.0)
    for name, param in plain.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6)
    # and mu=0 takes no other path: the same weights as a run that never heard of FedProx
    again = _train(0.0, 1.0)
    for (name, a), (_, b) in zip(plain.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(plain.unused, torch.ones(2))  # no gradient, no proximal pull: untouched


def test_the_proximal_gradient_is_mu_times_the_distance_to_the_start():
    model = Linear()
    term = ProximalTerm(model, mu=0.3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    expected = torch.autograd.grad(
        0.3 / 2 * sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), term.start, strict=True)),
        list(model.parameters()),
    )
    term.add_gradient_()
    for param, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(param.grad, grad)


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"proximal_mu": -0.1}, "proximal_mu=-0.1 is not allowed"),
        ({"proximal_mu": 0.1, "sync": "periodic", "comm_period": 2}, "0 unless sync=round"),
    ],
)
def test_bad_proximal_mu_is_refused_by_the_config(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve({"model": "tiny-bert", **raw})
