"""When to synchronize: at round ends, every `comm_period` local steps, or dynamically (Kamp et al. 2018).

Dynamic averaging (as in dyn-fed): every `check_every` local steps each site computes its
divergence ||w - r||² from the reference model r, the model of the last synchronization
(the round loop's `global_`: after an exchange local == global_ on every site). One
scalar all_reduce(MAX) tells every site the largest divergence; all of them synchronize
when it exceeds `delta_threshold`, so the decision is the same everywhere. (Kamp et al.
let a coordinator first try to resolve a violation with a subset of learners; here any
violation triggers a full synchronization.)

    policy = make_sync_policy(cfg.sync, steps_per_round=steps, comm_period=..., check_every=..., delta_threshold=...)
    for step in ...:                                   # step: local steps done so far, from 1
        train_one_step()
        if policy.should_sync(local_weights, global_weights, step):
            for part in exchange.means(local_weights, global_weights, weight):
                strategy.apply_(global_weights, part)
    metrics.update(policy.pop_stats())                 # sync.done, sync.skipped, sync.checks, ...
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SYNC_MODES = ("round", "periodic", "dynamic")


def squared_distance(local: torch.Tensor, reference: torch.Tensor, chunk_numel: int = 1 << 22) -> float:
    """||local - reference||², accumulated in float64, one chunk-sized temporary at a time."""
    total = torch.zeros((), dtype=torch.float64, device=local.device)
    for start in range(0, local.numel(), chunk_numel):
        diff = local[start : start + chunk_numel] - reference[start : start + chunk_numel]
        total += diff.square_().sum(dtype=torch.float64)
    return float(total)


class SyncPolicy:
    """should_sync(local, reference, step) -> bool, the same answer on every site; counts what it decided.

    mode "periodic": True every `period` steps (mode "round" is periodic with the round's steps).
    mode "dynamic": every `check_every` steps, one all_reduce(MAX) of ||local - reference||²;
    True when it is > delta_threshold. Steps in between return False without communicating.
    `force=True` (e.g. at the end of training) syncs without checking and counts it as done.
    """

    def __init__(
        self,
        mode: str,
        *,
        period: int | None = None,
        check_every: int | None = None,
        delta_threshold: float | None = None,
        chunk_numel: int = 1 << 22,
    ):
        if mode not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, got {mode!r}")
        if mode == "dynamic":
            if not check_every or check_every < 1:
                raise ValueError(f"sync=dynamic needs check_every >= 1, got {check_every}")
            if delta_threshold is None or delta_threshold < 0:
                raise ValueError(f"sync=dynamic needs delta_threshold >= 0, got {delta_threshold}")
        elif not period or period < 1:
            raise ValueError(f"sync={mode} needs a period >= 1 (steps), got {period}")
        self.mode, self.period, self.check_every = mode, period, check_every
        self.delta_threshold, self.chunk_numel = delta_threshold, chunk_numel
        self.totals = {"sync.done": 0, "sync.skipped": 0, "sync.checks": 0, "sync.check_bytes": 0}
        self._since_pop = dict(self.totals)
        self.last_divergence: float | None = None
        self._checked_since_pop = False

    def should_sync(self, local: torch.Tensor, reference: torch.Tensor, step: int, *, force: bool = False) -> bool:
        divergence = squared_distance(local, reference, self.chunk_numel) if self.needs_divergence(step) else None
        return self.decide(step, divergence=divergence, force=force, device=local.device)

    @property
    def needs_reference(self) -> bool:
        """Whether the round loop must keep the last synchronized model (sites drift from it between syncs)."""
        return self.mode != "round"

    def needs_divergence(self, step: int) -> bool:
        """Whether `decide` at this step needs this process's divergence (sync=dynamic's check steps)."""
        return self.mode == "dynamic" and step % self.check_every == 0

    def decide(
        self, step: int, *, divergence: float | None = None, force: bool = False, device: torch.device | None = None
    ) -> bool:
        """The decision at `step`; at a dynamic check, `divergence` is this process's largest ||w - r||²
        (of its one site, or of all the sites it hosts) and one all_reduce(MAX) on `device` makes it everyone's."""
        if force:
            return self._count(True)
        if self.mode != "dynamic":
            return self._count(True) if step % self.period == 0 else False
        if step % self.check_every:
            return False
        if divergence is None:
            raise ValueError(f"sync=dynamic checks at step {step}: give this process's divergence")
        largest = torch.tensor([divergence], dtype=torch.float64, device=device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        self.last_divergence = float(largest)
        self._checked_since_pop = True
        self._add("sync.checks", 1)
        self._add("sync.check_bytes", largest.element_size())
        return self._count(self.last_divergence > self.delta_threshold)

    def _count(self, sync: bool) -> bool:
        self._add("sync.done" if sync else "sync.skipped", 1)
        return sync

    def _add(self, key: str, value: int) -> None:
        self.totals[key] += value
        self._since_pop[key] += value

    def pop_stats(self) -> dict[str, float]:
        """Counts since the last call (per-round metrics), plus the last divergence checked since then (dynamic)."""
        stats: dict[str, float] = dict(self._since_pop)
        if self._checked_since_pop:
            stats["sync.divergence_max"] = self.last_divergence
        self._since_pop = dict.fromkeys(self._since_pop, 0)
        self._checked_since_pop = False
        return stats


def make_sync_policy(
    sync: str,
    *,
    steps_per_round: int,
    comm_period: int | None = None,
    check_every: int | None = None,
    delta_threshold: float | None = None,
) -> SyncPolicy:
    """sync="round": every steps_per_round steps; "periodic": every comm_period; "dynamic": see SyncPolicy."""
    if sync == "round":
        return SyncPolicy("round", period=steps_per_round)
    if sync == "periodic":
        return SyncPolicy("periodic", period=comm_period)
    return SyncPolicy(sync, check_every=check_every, delta_threshold=delta_threshold)
