"""Synchronization policies: periodic schedules, and dynamic averaging syncing exactly when the threshold is crossed."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from scaling_fl.exchange.dynamic import SyncPolicy, make_sync_policy, squared_distance
from tests.ranks import init_gloo, run_on_ranks


def test_round_and_periodic_sync_on_their_period_without_communicating():
    x = torch.zeros(3)
    round_policy = make_sync_policy("round", steps_per_round=4)
    assert [s for s in range(1, 13) if round_policy.should_sync(x, x, s)] == [4, 8, 12]
    periodic = make_sync_policy("periodic", steps_per_round=4, comm_period=3)
    assert [s for s in range(1, 13) if periodic.should_sync(x, x, s)] == [3, 6, 9, 12]
    assert periodic.pop_stats() == {"sync.done": 4, "sync.skipped": 0, "sync.checks": 0, "sync.check_bytes": 0}
    assert periodic.should_sync(x, x, 13, force=True)
    assert periodic.pop_stats()["sync.done"] == 1 and periodic.totals["sync.done"] == 5


def test_squared_distance_streams_in_chunks():
    a, b = torch.arange(10.0), torch.ones(10)
    assert squared_distance(a, b, chunk_numel=3) == float(((a - b) ** 2).sum())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sync": "dynamic", "check_every": 0, "delta_threshold": 1.0},
        {"sync": "dynamic", "check_every": 2},
        {"sync": "periodic"},
        {"sync": "sometimes"},
    ],
)
def test_bad_settings_fail_clearly(kwargs):
    with pytest.raises(ValueError):
        make_sync_policy(steps_per_round=4, **kwargs)


THRESHOLD = 9.0


def _dynamic_on_rank() -> dict:
    rank, _ = init_gloo()
    policy = SyncPolicy("dynamic", check_every=3, delta_threshold=THRESHOLD)
    reference = torch.zeros(4)
    decisions, divergences = [], []
    for step in range(1, 13):
        # Only site 2 drifts: ||w - r||² = 4 * (step / 4)² = step² / 4, which is 2.25, 9 (not above 9), 20.25, 36
        # at the checks (steps 3, 6, 9, 12). The others stay at the reference and must follow site 2's verdict.
        local = torch.full((4,), step / 4) if rank == 2 else reference.clone()
        decisions.append(policy.should_sync(local, reference, step))
        divergences.append(policy.last_divergence)
    stats = policy.pop_stats()
    dist.destroy_process_group()
    return {"decisions": decisions, "stats": stats, "divergences": divergences}


def test_dynamic_averaging_syncs_exactly_when_the_largest_divergence_exceeds_the_threshold():
    results = run_on_ranks(_dynamic_on_rank, 4)
    expected = [step in (9, 12) for step in range(1, 13)]
    for r in results:
        assert r["decisions"] == expected
        assert r["stats"] == {
            "sync.done": 2,
            "sync.skipped": 2,
            "sync.checks": 4,
            "sync.check_bytes": 32,
            "sync.divergence_max": 36.0,
        }
        assert r["divergences"][5] == THRESHOLD  # the boundary itself does not sync
