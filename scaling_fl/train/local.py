"""One site's local training for one round.

Every source of randomness (batch order, dropout) is seeded from (seed, site, round),
so a round replays identically after a restart without saving RNG state. The local
optimizer is rebuilt at the start of each round (stateless sites, as in FedAvg and
Flower's examples): the global model changes between rounds, and moments collected
for the previous global model would point the wrong way.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from scaling_fl.data.tokenize import TokenizedDataset
from scaling_fl.flat_state import views_of_parameters


@dataclass
class TrainSums:
    """Per-site sums, so the federation can weight them by samples exactly."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    lr_sum: float = 0.0  # the learning rates of the round's steps, summed (SCAFFOLD's K x lr)


def round_seed(seed: int, site: int, round_index: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, site, round_index, stream]).generate_state(1)[0])


def steps_per_round(
    num_rows: int, batch_size: int, grad_accum_steps: int, num_local_epochs: int, local_steps: int
) -> int:
    if local_steps > 0:
        return local_steps
    micro_batches = math.ceil(num_rows / batch_size)
    return math.ceil(micro_batches / grad_accum_steps) * num_local_epochs


def batch_plan(
    num_rows: int, batch_size: int, grad_accum_steps: int, num_local_epochs: int, local_steps: int, seed: int
) -> list[list[np.ndarray]]:
    """Optimizer steps of the round, each a list of micro-batches of row indices.

    Epoch mode: a fresh seeded permutation per epoch, the last step of an epoch may be
    short. Step mode (local_steps > 0): permutations are drawn until enough steps exist.
    """
    rng = np.random.default_rng(seed)

    def epoch_steps() -> list[list[np.ndarray]]:
        order = rng.permutation(num_rows)
        micro = [order[i : i + batch_size] for i in range(0, num_rows, batch_size)]
        return [micro[i : i + grad_accum_steps] for i in range(0, len(micro), grad_accum_steps)]

    if local_steps <= 0:
        return [step for _ in range(num_local_epochs) for step in epoch_steps()]
    steps: list[list[np.ndarray]] = []
    while len(steps) < local_steps:
        steps.extend(epoch_steps())
    return steps[:local_steps]


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Hugging Face's schedule shapes, over the whole federated run (all rounds)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, kind: str, learning_rate: float, weight_decay: float, momentum: float):
    """Biases and norm weights (1-d tensors) get no weight decay, like the HF Trainer. AdamW runs
    torch's fused kernel where the device has one (the HF Trainer's default, adamw_torch_fused):
    on the CPU its step is ~10x faster than the per-tensor loop (1.3 ms against 14 ms for
    tiny-bert's 2 M parameters), on a GPU one kernel instead of several per tensor."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum)
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel: torch's default loop
        return torch.optim.AdamW(groups, lr=learning_rate)


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_round(
    model: torch.nn.Module,
    dataset: TokenizedDataset,
    collate,
    plan: list[list[np.ndarray]],
    *,
    optimizer,
    scheduler,
    precision: str,
    max_grad_norm: float,
    device: torch.device,
    progress=None,
    after_step=None,
    proximal_mu: float = 0.0,
    control_correction: torch.Tensor | None = None,
    objective=None,
) -> TrainSums:
    """Runs the plan's optimizer steps; `after_step(k)` is called after the k-th (from 1), e.g. to
    synchronize within the round (sync=periodic / dynamic).

    proximal_mu > 0 (FedProx, Li et al. 2020): the loss of every step gets mu/2 ||w - w0||^2, w0 the
    weights the round started from (the global model: FedProx is allowed with sync=round only). Its
    gradient, mu (w - w0), is added to the step's gradient before clipping, as autograd would.

    control_correction (SCAFFOLD, Karimireddy et al. 2020): c - c_i, laid out as the model's flat state;
    every step's gradient gets it (before clipping too), y <- y - lr (g(y) + c - c_i).

    objective (train/objectives.py): the loss of a batch and what it is averaged over (rows, or target
    tokens for a causal LM); default: sequence classification with `collate`."""
    if objective is None:
        from scaling_fl.train.objectives import Classification

        objective = Classification(collate, num_labels=0)
    model.train()
    sums = TrainSums()
    proximal = ProximalTerm(model, proximal_mu) if proximal_mu > 0 else None
    correction = views_of_parameters(model, control_correction) if control_correction is not None else ()
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None
    for step_number, step_batches in enumerate(plan, start=1):
        step_units = max(1, sum(objective.units(dataset, rows) for rows in step_batches))
        for rows in step_batches:  # micro-batches of one optimizer step
            batch = objective.collate([dataset[int(i)] for i in rows])
            loss_sum, units, correct = objective.batch_sums(model, batch, precision, device)
            # Dividing by the rows (tokens) of the whole step makes accumulation equal to one big batch.
            loss = loss_sum / step_units
            (scaler.scale(loss) if scaler else loss).backward()
            sums.loss_sum += loss_sum.item()
            sums.correct += correct
            sums.count += units
        if scaler:
            scaler.unscale_(optimizer)
        if proximal is not None:
            proximal.add_gradient_()
        for param, term in correction:
            param.grad = term.clone() if param.grad is None else param.grad.add_(term)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        sums.lr_sum += float(optimizer.param_groups[0]["lr"])
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress.update(1)
        if after_step is not None:
            after_step(step_number)
    return sums


class ProximalTerm:
    """FedProx's mu/2 ||w - w0||^2 over the trainable parameters, w0 their values when it is made."""

    def __init__(self, model: torch.nn.Module, mu: float):
        self.mu = mu
        self.params = [param for param in model.parameters() if param.requires_grad]
        self.start = [param.detach().clone() for param in self.params]

    def add_gradient_(self) -> None:
        for param, start in zip(self.params, self.start, strict=True):
            pull = (param.detach() - start).mul_(self.mu)
            if param.grad is None:
                param.grad = pull
            else:
                param.grad.add_(pull)


def train_site_round(
    model: torch.nn.Module,
    dataset: TokenizedDataset,
    collate,
    cfg,
    site: int,
    round_index: int,
    device: torch.device,
    progress=None,
    after_step=None,
    control_correction: torch.Tensor | None = None,
    objective=None,
) -> TrainSums:
    """Site `site`'s local training in round `round_index`: its seeds, batch plan, a fresh optimizer
    and its place in the learning-rate schedule over all rounds (`cfg`: the run's Config)."""
    steps = steps_per_round(len(dataset), cfg.batch_size, cfg.grad_accum_steps, cfg.num_local_epochs, cfg.local_steps)
    total, offset = steps * cfg.num_rounds, steps * round_index
    warmup = int(cfg.warmup_ratio * total)
    torch.manual_seed(round_seed(cfg.seed, site, round_index, stream=1))  # dropout
    plan = batch_plan(
        len(dataset),
        cfg.batch_size,
        cfg.grad_accum_steps,
        cfg.num_local_epochs,
        cfg.local_steps,
        round_seed(cfg.seed, site, round_index),
    )
    optimizer = make_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay, cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(offset + step, total, warmup, cfg.lr_scheduler)
    )
    return train_round(
        model,
        dataset,
        collate,
        plan,
        optimizer=optimizer,
        scheduler=scheduler,
        precision=cfg.precision,
        max_grad_norm=cfg.max_grad_norm,
        device=device,
        progress=progress,
        after_step=after_step,
        proximal_mu=cfg.proximal_mu,
        control_correction=control_correction,
        objective=objective,
    )
