"""Robust aggregation (strategies/robust.py, exchange/gathered.py) and byzantine sites (train/faults.py).

The rules are checked against numpy / scipy written from their papers' definitions, on random updates;
the gathered exchange on real gloo ranks, in several packings of seven sites into processes and several
bucket sizes, must give the reference's result for the whole vector.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from scaling_fl.config import ConfigError, resolve
from scaling_fl.strategies.robust import (
    add_squared_distances_,
    coordinate_median,
    krum_selection,
    trimmed_mean,
)
from scaling_fl.train.faults import corrupt_update_
from tests.ranks import init_gloo, run_on_ranks

SITES, NUMEL = 7, 1000


def _updates(count: int = SITES, numel: int = NUMEL, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    updates = rng.normal(0, 0.01, size=(count, numel)).astype(np.float32)
    updates[1] *= -20  # an outlier, so the rules have something to reject
    return updates


def _krum_reference(updates: np.ndarray, f: int, m: int) -> tuple[list[int], np.ndarray]:
    """Blanchard et al. 2017, as written: score(i) = sum of the n - f - 2 smallest ||V_i - V_j||^2, j != i."""
    n = len(updates)
    as64 = updates.astype(np.float64)
    scores = []
    for i in range(n):
        distances = sorted(float(((as64[i] - as64[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(distances[: n - f - 2]))
    chosen = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])
    return chosen, updates[chosen].mean(axis=0)


@pytest.mark.parametrize("count", [4, 5, 7])
def test_median_and_trimmed_mean_equal_numpy_and_scipy(count):
    updates = _updates(count)
    rows = torch.from_numpy(updates)
    np.testing.assert_array_equal(coordinate_median(rows).numpy(), np.median(updates, axis=0).astype(np.float32))
    for fraction in (0.0, 0.2, 0.3, 0.49):
        expected = scipy.stats.trim_mean(updates.astype(np.float64), fraction, axis=0)
        np.testing.assert_allclose(trimmed_mean(rows, fraction).numpy(), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("f,m", [(0, 1), (1, 1), (2, 1), (1, 3)])
def test_krum_selection_equals_the_definition(f, m):
    updates = _updates()
    distances = torch.zeros(SITES, SITES, dtype=torch.float64)
    for start in range(0, NUMEL, 300):  # accumulated bucket by bucket, as the exchange does
        add_squared_distances_(distances, torch.from_numpy(updates[:, start : start + 300]))
    chosen, _ = _krum_reference(updates, f, m)
    assert krum_selection(distances, f, m) == chosen
    assert 1 not in chosen  # the outlier is never the most central


def test_a_byzantine_site_sends_the_flipped_or_scaled_update():
    global_, local = torch.linspace(-1, 1, 50), torch.linspace(-1, 1, 50) + 0.01 * torch.arange(50.0)
    flipped, scaled = local.clone(), local.clone()
    corrupt_update_(flipped, global_, "sign_flip", 10.0)
    corrupt_update_(scaled, global_, "scale", 10.0)
    torch.testing.assert_close(flipped - global_, -(local - global_))
    torch.testing.assert_close(scaled - global_, 10 * (local - global_), rtol=1e-5, atol=1e-6)


CASES = {
    "median": ("median", {}),
    "trimmed_mean": ("trimmed_mean", {"trim_fraction": 0.2}),
    "krum": ("krum", {"krum_byzantine": 1, "krum_select": 1}),
    "multi_krum": ("krum", {"krum_byzantine": 1, "krum_select": 3}),
}


def _gathered_on_ranks(hosted: list[list[int]], chosen: list[int], bucket_bytes: int, cases: dict) -> dict:
    """Every case's round on this rank: its hosted sites that are chosen add their update, then the means."""
    from scaling_fl.exchange.gathered import GatheredExchange
    from scaling_fl.strategies import make_strategy

    rank, _ = init_gloo()
    updates, start = torch.from_numpy(_updates()), torch.linspace(-1, 1, NUMEL)
    out = {}
    for label, (rule, options) in cases.items():
        exchange = GatheredExchange(
            rule, NUMEL, SITES, bucket_bytes=bucket_bytes, device=torch.device("cpu"), **options
        )
        global_ = start.clone()
        for site in hosted[rank]:
            if site in chosen:
                exchange.add_site_(start + updates[site], start, 0.5, site=site)
        strategy = make_strategy("fedavg", NUMEL)
        for part in exchange.means(global_):
            strategy.apply_(global_, part)
        out[label] = {"update": global_ - start, "chosen": exchange.chosen, "stats": exchange.stats}
    return out


@pytest.mark.parametrize(
    "hosted,bucket_bytes",
    [
        ([[0, 1, 2, 3, 4, 5, 6]], 1 << 20),  # one process hosts every site, one bucket
        ([[0, 1, 2], [3, 4, 5, 6]], 4 * 6 * 64),  # two processes, buckets of 64 values
        ([[0, 5], [1, 6], [2, 3, 4]], 4 * 6 * 333),  # three processes, a last bucket of one value
    ],
)
def test_the_gathered_exchange_gives_the_rule_over_all_sites_in_any_packing(hosted, bucket_bytes):
    updates = _updates()
    chosen = [0, 1, 2, 3, 5, 6]  # site 4 sits the round out
    results = run_on_ranks(_gathered_on_ranks, len(hosted), hosted, chosen, bucket_bytes, CASES)
    rows = updates[chosen]
    for label, (rule, options) in CASES.items():
        if rule == "median":
            expected = np.median(rows, axis=0)
        elif rule == "trimmed_mean":
            expected = scipy.stats.trim_mean(rows.astype(np.float64), 0.2, axis=0)
        else:
            picked, expected = _krum_reference(rows, options["krum_byzantine"], options["krum_select"])
            assert results[0][label]["chosen"] == [chosen[row] for row in picked], label
        for result in results:  # every process ends with the same model
            np.testing.assert_allclose(result[label]["update"].numpy(), expected, rtol=1e-4, atol=1e-6, err_msg=label)
            assert torch.equal(result[label]["update"], results[0][label]["update"]), label
        stats = results[0][label]["stats"]
        assert stats["comm.bytes_per_site"] == NUMEL * 4 * (2 if rule == "krum" else 1)
        gathered_bytes = len(chosen) * 4 * min(NUMEL, bucket_bytes // (4 * len(chosen)))
        assert stats["memory.exchange_peak_mb"] * 2**20 >= gathered_bytes  # the bucket of every participant


def test_median_and_trimmed_mean_are_bitwise_the_same_in_every_packing():
    everyone, cases = list(range(SITES)), {"median": CASES["median"], "trimmed_mean": CASES["trimmed_mean"]}
    one = run_on_ranks(_gathered_on_ranks, 1, [everyone], everyone, 1 << 20, cases)
    three = run_on_ranks(_gathered_on_ranks, 3, [[0, 5], [1, 6], [2, 3, 4]], everyone, 4 * 7 * 100, cases)
    for label in cases:
        assert torch.equal(one[0][label]["update"], three[2][label]["update"]), label


@pytest.mark.parametrize(
    "given,problem",
    [
        ({"aggregation": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction=0.5"),
        ({"aggregation": "krum", "krum_byzantine": 1, "site_ids": [0, 0, 0, 0]}, "krum_byzantine=1"),
        ({"aggregation": "krum", "num_sites": 10, "krum_byzantine": 3, "krum_select": 8}, "krum_select=8"),
        ({"aggregation": "krum", "num_sites": 10, "fraction_fit": 0.2}, "Krum needs at least 3 sites"),
        ({"aggregation": "median", "exchange": "sparse"}, "exchange='sparse'"),
        ({"aggregation": "median", "dp": "client", "dp_clip_norm": 1.0}, "dp='client'"),
        ({"aggregation": "median", "sync": "periodic", "comm_period": 2}, "sync='periodic'"),
        ({"byzantine_sites": [4]}, "byzantine_sites=[4]"),
        ({"byzantine_sites": [1, 1]}, "byzantine_sites=[1, 1]"),
        ({"byzantine_mode": "lie"}, "byzantine_mode='lie'"),
    ],
)
def test_bad_robust_settings_are_refused_with_one_line(given, problem):
    with pytest.raises(ConfigError) as refused:
        resolve({"site_ids": [0, 0, 0, 0], **given})
    assert problem in str(refused.value) and "\n" not in str(refused.value)


def test_krum_accepts_the_largest_f_the_sites_allow():
    config = resolve({"aggregation": "krum", "num_sites": 10, "krum_byzantine": 3, "krum_select": 7})
    assert (config.krum_byzantine, config.krum_select) == (3, 7)
    assert resolve({"byzantine_sites": [3, 0]}).byzantine_sites == (0, 3)
