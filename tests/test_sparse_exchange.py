"""Sparse top-k exchange: selection, per-position averaging vs hand computation, FL4Health's rule,
error feedback, fallback, bytes, and every exchange x strategy keeping all ranks identical."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from scaling_fl.exchange import sparse
from scaling_fl.exchange.factory import make_exchange
from scaling_fl.exchange.quantize import dequantize, quantize
from scaling_fl.exchange.sparse import (
    CRITERIA,
    SparseExchange,
    _Keys,
    find_cut,
    iter_selected,
    order_keys_,
    scores_into,
    segments_from_model,
    topk_regions,
)
from scaling_fl.flat_state import flat_sha256, flatten_model_
from scaling_fl.strategies.factory import STRATEGIES, make_strategy
from scaling_fl.strategies.fedavg import FedAvg
from tests.ranks import init_gloo, run_on_ranks


def select_topk(
    update: torch.Tensor,
    global_: torch.Tensor,
    sparsity_level: float,
    *,
    criterion: str = "largest_magnitude_change",
    segments: list[tuple[int, int]] | None = None,
    scope: str = "model",
    chunk_numel: int = 1 << 20,
) -> torch.Tensor:
    """All selected flat indices at once (the exchange streams them)."""
    keys_of = _Keys(update, global_, criterion, chunk_numel)
    cuts = [
        find_cut(keys_of, s, e, k, chunk_numel)
        for s, e, k in topk_regions(update.numel(), sparsity_level, segments, scope)
    ]
    return torch.cat(list(iter_selected(cuts, keys_of, chunk_numel)))


# --- selection (pure) -----------------------------------------------------------------------


def test_each_criterion_selects_what_it_says():
    global_ = torch.tensor([5.0, -5.0, 0.1, 0.2])
    update = torch.tensor([-4.9, 0.5, 1.0, -0.3])  # local = [0.1, -4.5, 1.1, -0.1]
    picks = {c: select_topk(update, global_, 0.25, criterion=c).tolist() for c in CRITERIA}
    assert picks == {
        "largest_magnitude_change": [0],  # |update| 4.9
        "largest_final_magnitude": [1],  # |local| 4.5
        "largest_increase_in_magnitude": [2],
    }  # |local| - |global| = +1.0
    g = torch.Generator().manual_seed(0)
    update, global_ = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    for criterion in CRITERIA:
        chosen = select_topk(update, global_, 0.1, criterion=criterion, chunk_numel=1024)
        scores = scores_into(update, global_, criterion, torch.empty(5000))
        assert chosen.numel() == 500 and torch.all(chosen[1:] > chosen[:-1])
        assert set(chosen.tolist()) == set(torch.topk(scores, 500).indices.tolist())


@pytest.mark.parametrize("chunk_numel", [1024, 70_000])  # streamed radix passes / one sort
def test_exactly_k_with_ties_lowest_indices_first(chunk_numel):
    update = torch.tensor([1.0, 2.0, 2.0, 0.5] * 15_000)  # 30,000 twos, 15,000 ones
    chosen = select_topk(update, torch.zeros_like(update), 0.6, chunk_numel=chunk_numel)
    assert chosen.numel() == 36_000
    assert torch.all(update[chosen[update[chosen] == 1.0]] == 1.0)
    ones = chosen[update[chosen] == 1.0]
    assert ones.numel() == 6_000 and ones.tolist() == list(range(0, 4 * 6_000, 4))  # the first ones by index
    zeros = select_topk(torch.zeros(10_000), torch.zeros(10_000), 0.01, chunk_numel=chunk_numel)
    assert zeros.tolist() == list(range(100))


def test_radix_cut_equals_sorted_cut_on_negative_and_tied_scores():
    g = torch.Generator().manual_seed(1)
    update = torch.randn(20_000, generator=g).round(decimals=1)  # many ties
    global_ = torch.randn(20_000, generator=g)
    criterion = "largest_increase_in_magnitude"  # scores of both signs
    for k in (1, 77, 10_000, 19_999, 20_000):
        radix = find_cut(_Keys(update, global_, criterion, 1024), 0, 20_000, k, 1024)
        keys = _Keys(update, global_, criterion, 20_000)(0, 20_000).clone()
        key = int(torch.sort(keys, descending=True).values[k - 1])
        assert (radix.key, radix.ties) == (key, k - int((keys > key).sum()))


def test_per_tensor_scope_takes_ceil_level_times_size_in_every_tensor():
    update = torch.tensor([9.0, 8, 7, 1, 1, 2, 3, 4, 5, 6])
    segments = [(0, 3), (3, 5), (8, 2)]
    chosen = select_topk(update, torch.zeros(10), 0.3, segments=segments, scope="tensor").tolist()
    assert chosen == [0, 6, 7, 9]  # ceil(.9)=1 of the first, ceil(1.5)=2 of the second, ceil(.6)=1 of the last


def test_segments_from_a_flattened_model_tile_it():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    flat = flatten_model_(model)
    assert segments_from_model(model, flat) == [(0, 12), (12, 4), (16, 4), (20, 4), (24, 8), (32, 2)]
    with pytest.raises(ValueError, match="tile"):
        SparseExchange(34, sparsity_level=0.1, segments=[(0, 12), (13, 21)], world_size=4)
    with pytest.raises(ValueError, match="segments"):
        SparseExchange(34, sparsity_level=0.1, sparsity_scope="tensor", world_size=4)


# --- exact top-k against a plain sort (issue 12: sampled bracket, one pass, histogram fallback) -----


def _reference(keys: torch.Tensor, regions) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Per region, the k positions with the largest keys, ties by lowest index, by a plain sort:
    ([(k-th key, ties sent)], the sorted indices)."""
    cuts, chosen = [], []
    for s, e, k in regions:
        region = keys[s:e].long()
        order = np.lexsort((np.arange(e - s), -region.numpy()))[:k]  # by key descending, then index
        key = int(region[order[-1]])
        assert key == int(torch.topk(region, k).values[-1])
        cuts.append((key, k - int((region > key).sum())))
        chosen.append(torch.from_numpy(np.sort(order)) + s)
    return cuts, torch.cat(chosen)


def _full_keys(update, global_, criterion) -> torch.Tensor:
    return order_keys_(scores_into(update, global_, criterion, torch.empty_like(update)))


SELECTION_N = 60_000


def _selection_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    n = SELECTION_N
    mostly_zeros = torch.randn(n, generator=g).bfloat16().float()
    mostly_zeros[: n // 2] = 0.0
    mostly_zeros[torch.rand(n, generator=g) < 0.4] = 0.0
    heavy = 0.1 * torch.randn(n, generator=g)
    heavy[torch.rand(n, generator=g) < 0.3] = 1.0  # 30 % share one value, above all others
    return {
        "normal": torch.randn(n, generator=g),
        "ties": torch.randn(n, generator=g).round(decimals=1),
        "zeros": torch.zeros(n),
        "constant": torch.full((n,), -0.25),
        "mostly_zeros": mostly_zeros,
        "heavy_value": heavy,
    }


@pytest.fixture
def small_sample(monkeypatch):
    """A sample much smaller than the region (a real model samples 65,536 of 22.7M)."""
    monkeypatch.setattr(sparse, "_SAMPLE", 4096)


@pytest.mark.parametrize(
    "name, criterion",
    [(name, "largest_magnitude_change") for name in _selection_inputs()]
    + [(name, "largest_increase_in_magnitude") for name in ("normal", "ties", "mostly_zeros")]  # keys < 0 too
    + [("ties", "largest_final_magnitude")],
)
def test_cut_and_indices_equal_a_plain_sort(small_sample, name, criterion):
    update = _selection_inputs()[name]
    n = update.numel()
    global_ = torch.randn(n, generator=torch.Generator().manual_seed(3)).round(decimals=2)
    keys = _full_keys(update, global_, criterion)
    chunk = 4096  # 15 chunks: sampled bracket, one pass
    for k in (1, 7, n // 100, n // 10, n // 2, n - 1, n):
        (want_cut,), want = _reference(keys, [(0, n, k)])
        keys_of = _Keys(update, global_, criterion, chunk)
        cut = find_cut(keys_of, 0, n, k, chunk)
        assert (cut.key, cut.ties) == want_cut, (name, criterion, k)
        assert torch.equal(torch.cat(list(iter_selected([cut], keys_of, chunk))), want), (name, criterion, k)
        small = find_cut(_Keys(update[:3000], global_[:3000], criterion, chunk), 0, 3000, min(k, 3000), chunk)
        assert (small.key, small.ties) == _reference(keys[:3000], [(0, 3000, min(k, 3000))])[0][0]  # one chunk


def test_keys_of_the_magnitudes_are_their_float_bits():
    update = torch.tensor([-0.0, 0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), -1.5, 2.0, 1e-45])
    global_ = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.0, 1.0, 1.5, -2.0, -1e-45])
    for criterion in CRITERIA:
        keys = _Keys(update, global_, criterion, 16)(0, update.numel())
        assert torch.equal(keys, _full_keys(update, global_, criterion)), criterion


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("average", ["per_position", "fl4health"])
def test_exchange_counts_and_selects_exactly_the_sorted_top_k(small_sample, scope, average):
    inputs = _selection_inputs()
    update = torch.cat([inputs["mostly_zeros"], inputs["normal"][:20_000], inputs["ties"][:7_000]])
    n = update.numel()
    global_ = torch.zeros(n)
    segments = [(0, 50_000), (50_000, 3), (50_003, 30_000), (80_003, 6_997)]  # tensors across buckets
    ex = SparseExchange(
        n,
        sparsity_level=0.1,
        sparsity_scope=scope,
        segments=segments,
        sparse_average=average,
        world_size=4,
        bucket_bytes=5_000 * SparseExchange.BYTES_PER_POSITION,
    )
    keys_of = _Keys(update, global_, ex.criterion, ex.bucket_numel)
    cuts = [find_cut(keys_of, s, e, k, ex.bucket_numel) for s, e, k in ex.regions]
    want_cuts, want = _reference(_full_keys(update, global_, ex.criterion), ex.regions)
    assert [(c.key, c.ties) for c in cuts] == want_cuts
    counts, flags = ex._count_(keys_of, cuts, update)
    ties = [cut.ties for cut in cuts]
    chosen = [ex._select(keys_of, cuts, ties, s, e) for s, e in ex.buckets]
    assert torch.equal(torch.cat(chosen), want) and not any(ties)
    assert counts.tolist() == [c.numel() for c in chosen] and int(counts.sum()) == ex.k
    plain = [sparse.Cut(*cut) for cut in cuts]  # without find_cut's per-chunk counts: counted again
    assert torch.equal(ex._count_(keys_of, plain, update)[0], counts)
    if flags is not None:
        sent_nonzero = want[update[want] != 0]
        expected = [int(((sent_nonzero >= o) & (sent_nonzero < o + size)).any()) for o, size in segments]
        assert flags.tolist() == expected


@pytest.mark.parametrize(
    "bad",
    [
        "above",  # the k-th lies above the bracket
        "below",  # below it
        "wide",  # more keys inside it than a chunk holds
    ],
)
def test_a_missed_bracket_falls_back_to_the_histograms(monkeypatch, bad):
    update = _selection_inputs()["ties"]
    n, k, chunk = update.numel(), 6_000, 4096
    global_ = torch.zeros(n)
    keys = _full_keys(update, global_, "largest_magnitude_change")
    (want_cut,), want = _reference(keys, [(0, n, k)])
    key = want_cut[0]
    bracket = {
        "above": sparse._Bracket(hi=key - 1, lo=key - 2, split_hi=False, split_lo=False),
        "below": sparse._Bracket(hi=key + 2, lo=key + 1, split_hi=False, split_lo=False),
        "wide": sparse._Bracket(hi=None, lo=None, split_hi=False, split_lo=False),
    }[bad]
    keys_of = _Keys(update, global_, "largest_magnitude_change", chunk)
    assert sparse._cut_in_bracket(keys_of, 0, n, k, chunk, bracket) is None
    used = []
    histograms = sparse._cut_by_histograms
    monkeypatch.setattr(sparse, "_bracket", lambda *args: bracket)
    monkeypatch.setattr(sparse, "_cut_by_histograms", lambda *args: used.append(1) or histograms(*args))
    cut = find_cut(keys_of, 0, n, k, chunk)
    assert used == [1] and (cut.key, cut.ties) == want_cut
    assert torch.equal(torch.cat(list(iter_selected([cut], keys_of, chunk))), want)


def test_frequent_boundary_keys_are_counted_not_collected(small_sample, monkeypatch):
    inputs = _selection_inputs()
    seen = []
    bracket = sparse._bracket
    monkeypatch.setattr(sparse, "_bracket", lambda *args: seen.append(bracket(*args)) or seen[-1])
    monkeypatch.setattr(sparse, "_cut_by_histograms", lambda *args: pytest.fail("the bracket missed"))
    cases = {  # (update, level): where the k-th lies
        ("zeros", 0.1): "at the only key, split",
        ("mostly_zeros", 0.5): "at 0, split (both ends of the bracket)",
        ("mostly_zeros", 0.3): "inside, above 0 (the split low end)",
        ("mostly_zeros", 0.31): "at 0, the split low end",
        ("heavy_value", 0.29): "at 1.0, the split high end",
        ("mostly_zeros", 0.05): "inside, no split",
    }
    for name, level in cases:
        update = inputs[name]
        n = update.numel()
        k = int(level * n)
        keys = _full_keys(update, torch.zeros(n), "largest_magnitude_change")
        keys_of = _Keys(update, torch.zeros(n), "largest_magnitude_change", 4096)
        cut = find_cut(keys_of, 0, n, k, 4096)
        assert (cut.key, cut.ties) == _reference(keys, [(0, n, k)])[0][0], cases[name, level]
        assert torch.equal(torch.cat(list(iter_selected([cut], keys_of, 4096))), _reference(keys, [(0, n, k)])[1])
    splits = [(b.split_hi, b.split_lo, b.hi == b.lo) for b in seen]  # (high end, low end, one key)
    assert splits == [
        (True, False, True),
        (True, False, True),
        (False, True, False),
        (False, True, False),
        (True, False, False),
        (False, False, False),
    ]


def test_any_keys_of_callable_works_and_the_sample_is_fixed():
    update = _selection_inputs()["ties"]
    n = update.numel()
    keys = _full_keys(update, torch.zeros(n), "largest_magnitude_change")

    def keys_of(a, b):  # no .at: the sample is read in blocks
        return keys[a:b].clone()

    for k in (1, 600, 30_000, n):
        cut = find_cut(keys_of, 0, n, k, 4096)
        assert (cut.key, cut.ties) == _reference(keys, [(0, n, k)])[0][0]
    positions = sparse._sample_positions(100, 100 + n, 1024, "cpu")
    strata = torch.arange(1025) * n // 1024 + 100
    assert torch.all(positions >= strata[:-1]) and torch.all(positions < strata[1:])
    assert torch.equal(positions, sparse._sample_positions(100, 100 + n, 1024, "cpu"))


# --- bytes and break-even (pure) --------------------------------------------------------------


def test_fp32_sparse_falls_back_to_dense_at_half_density():
    n = 100_000
    below = SparseExchange(n, sparsity_level=0.4999, world_size=4)
    # one bucket: 8 bytes of sample share + 4 of count, paid with 2 of the floor(0.4999 n) values
    assert below.k == math.floor(0.4999 * n) - 2 and below.overhead_bytes == 12
    assert not below.uses_dense and below.sparse_payload_bytes == 8 * below.k + 12
    assert below.sparse_payload_bytes < below.dense_payload_bytes == 4 * n
    at = SparseExchange(n, sparsity_level=0.5001, world_size=4)  # 8 bytes a value: dense is cheaper above half
    assert at.uses_dense and at.density == 1.0 and at.residual is None
    ten = SparseExchange(n, sparsity_level=0.1, world_size=4)
    assert ten.sparse_payload_bytes / ten.dense_payload_bytes == pytest.approx(0.2, abs=1e-4)
    assert ten.sparse_payload_bytes <= 0.2 * ten.dense_payload_bytes  # the counts come out of the budget


def test_sparse_never_costs_more_than_its_dense_counterpart():
    n = 50_000
    switched = {}
    for values in ("fp32", "int8"):
        for level in np.linspace(0.01, 1.0, 100):
            ex = SparseExchange(n, sparsity_level=float(level), values=values, world_size=4, bucket_bytes=1 << 16)
            if ex.uses_dense:
                assert ex.sparse_payload_bytes >= ex.dense_payload_bytes
                switched.setdefault(values, float(level))
            else:
                assert ex.sparse_payload_bytes < ex.dense_payload_bytes
    assert switched["fp32"] == pytest.approx(0.5, abs=0.01)
    assert switched["int8"] == pytest.approx(0.2, abs=0.011)  # 5 bytes a value vs 1 (+ 4/256 each)


# --- hand computations on 4 real ranks ----------------------------------------------------------

NUMEL = 12
SIZES = [10, 30, 20, 40]
CHOSEN = [[0, 1, 2], [1, 2, 3], [2, 3, 4], [5, 9, 10]]  # overlapping (1, 2, 3) and disjoint (0, 4, 5, 9, 10)
SEGMENTS = [(0, 6), (6, 6)]


def _first_update(rank: int) -> torch.Tensor:
    u = torch.tensor([0.001 * (1 + p + 12 * rank) * (-1) ** (p + rank) for p in range(NUMEL)])
    for p in CHOSEN[rank]:
        u[p] = (1 + rank + 0.1 * p) * (-1) ** p
    return u


def _second_update(rank: int) -> torch.Tensor:
    return 0.5 * torch.randn(NUMEL, generator=torch.Generator().manual_seed(rank))


# Sample shares given up front; a third of 12 values is 4, less one that pays for the bucket
# count (4 bytes): 3 values a site (sparse_payload_bytes is checked against the hand count below).
GIVEN_WEIGHTS = [s / sum(SIZES) for s in SIZES]
SCENARIOS = {
    "per_position": {"sparsity_level": 1 / 3},
    "fl4health": {"sparsity_level": 1 / 3, "sparse_average": "fl4health", "segments": SEGMENTS},
    "tensor_scope": {"sparsity_level": 0.25, "sparsity_scope": "tensor", "segments": [(0, 4), (4, 8)]},
    "int8_values": {"sparsity_level": 1 / 3, "values": "int8", "block_size": 2},
    "no_error_feedback": {"sparsity_level": 1 / 3, "error_feedback": False},
    "fallback": {"sparsity_level": 0.6},  # 7 - 1 = 6 values: 4 + 48 bytes >= 48 dense
}


def _hand_scenarios(rank: int) -> dict:
    weight = SIZES[rank] / sum(SIZES)
    out = {}
    for name, options in SCENARIOS.items():
        exchange = SparseExchange(NUMEL, site_weights=GIVEN_WEIGHTS, **options)
        assert exchange.uses_dense or exchange.k == 3
        global_ = torch.linspace(-1, 1, NUMEL)
        rounds = []
        for round_index, site_update in enumerate((_first_update, _second_update)):
            residual = exchange.residual.clone() if exchange.residual is not None else torch.zeros(NUMEL)
            local = global_ + site_update(rank)
            update = residual + (local - global_)  # the exchange's u, bit for bit
            before = global_.clone()
            if name == "fallback":  # the dense exchange on the same inputs, for comparison
                dense_local, dense_global = local.clone(), global_.clone()
                make_exchange("dense", NUMEL).exchange_(dense_local, dense_global, weight, FedAvg())
            sent = exchange.exchange_(local, global_, weight, FedAvg())
            rounds.append(
                {
                    "before": before.numpy(),
                    "after": global_.numpy().copy(),
                    "update": update.numpy(),
                    "residual": None if exchange.residual is None else exchange.residual.numpy().copy(),
                    "bytes": sent,
                    "stats": dict(exchange.stats),
                    "sha": flat_sha256(global_),
                    "local_equals_global": bool(torch.equal(local, global_)),
                    "dense_after": dense_global.numpy() if name == "fallback" else None,
                    "state_keys": sorted(exchange.state_dict()),
                }
            )
        out[name] = rounds
    return out


def _expected_delta(updates, chosen, rule="per_position", segments=((0, NUMEL),), int8_block=None):
    """The mean update by hand, in float64, from every site's update and chosen positions."""
    weights = np.array(SIZES) / sum(SIZES)
    num, den = np.zeros(NUMEL), np.zeros(NUMEL)
    sent_in = np.zeros((4, len(segments)), dtype=bool)
    for i, (u, positions) in enumerate(zip(updates, chosen)):
        values = torch.from_numpy(u[positions])
        if int8_block:
            values = dequantize(*quantize(values, int8_block), int8_block)
        values = values.double().numpy()
        num[positions] += weights[i] * values
        den[positions] += weights[i]
        for t, (offset, size) in enumerate(segments):
            inside = (positions >= offset) & (positions < offset + size)
            sent_in[i, t] = bool(np.any(values[inside] != 0))
    if rule == "fl4health":
        for t, (offset, size) in enumerate(segments):
            den[offset : offset + size] = (weights * sent_in[:, t]).sum()
    return np.divide(num, den, out=np.zeros(NUMEL), where=den > 0)


@pytest.fixture(scope="module")
def rank_results():
    return run_on_ranks(_on_rank, 4)


@pytest.fixture(scope="module")
def hand_results(rank_results):
    return [r["hand"] for r in rank_results]


def _checked_rounds(hand_results, case):
    """One case's two rounds on every rank, after checking that the ranks agree after each."""
    rounds_by_rank = [r[case] for r in hand_results]
    for round_index in range(2):
        per_rank = [rounds[round_index] for rounds in rounds_by_rank]
        assert len({r["sha"] for r in per_rank}) == 1, "ranks hold different models"
        assert all(r["local_equals_global"] for r in per_rank)
    return rounds_by_rank


def _first_round(rounds_by_rank):
    """Every rank's first round, and the change it made to the model."""
    first = [r[0] for r in rounds_by_rank]
    return first, first[0]["after"] - first[0]["before"]


def test_per_position_average_is_not_diluted_and_error_feedback_conserves_mass(hand_results):
    rounds = _checked_rounds(hand_results, "per_position")
    first, delta = _first_round(rounds)
    chosen = [np.array(c) for c in CHOSEN]
    np.testing.assert_allclose(delta, _expected_delta([r["update"] for r in first], chosen), rtol=1e-6, atol=1e-7)
    # disjoint positions carry their single sender's value, undiluted; nobody sent 6, 7, 8, 11
    for p, site in ((0, 0), (4, 2), (5, 3), (9, 3), (10, 3)):
        assert delta[p] == pytest.approx(first[site]["update"][p], rel=1e-6)
    assert np.all(delta[[6, 7, 8, 11]] == 0)
    # overlap: position 2, sent by sites 0, 1, 2 with weights .1 .3 .2
    u2 = [first[i]["update"][2] for i in range(3)]
    assert delta[2] == pytest.approx((0.1 * u2[0] + 0.3 * u2[1] + 0.2 * u2[2]) / 0.6, rel=1e-6)
    for site, r in enumerate(first):
        sent = np.zeros(NUMEL, dtype=np.float32)
        sent[CHOSEN[site]] = r["update"][CHOSEN[site]]
        assert np.array_equal(sent + r["residual"], r["update"])  # exactly: nothing lost, nothing made up
        assert np.all(r["residual"][CHOSEN[site]] == 0)
        assert r["bytes"] == 4 + 3 * (4 + 4) and r["stats"]["comm.density"] == 0.25  # count + 3 x (index, value)
        assert r["state_keys"] == ["residual"]
    _check_second_round(rounds, [r["residual"] for r in first])  # the residual joined the new update


def _check_second_round(rounds, residuals):
    """Round 2 selects from (residual + new update) and averages the selection like round 1."""
    second = [r[1] for r in rounds]
    updates = [r["update"] for r in second]
    for site in range(4):
        np.testing.assert_allclose(updates[site], residuals[site] + _second_update(site).numpy(), rtol=1e-6, atol=1e-6)
    chosen = [select_topk(torch.from_numpy(u), torch.zeros(NUMEL), 0.25).numpy() for u in updates]
    np.testing.assert_allclose(
        second[0]["after"] - second[0]["before"], _expected_delta(updates, chosen), rtol=1e-6, atol=1e-6
    )


def test_fl4health_rule_dilutes_by_every_site_that_sent_into_the_tensor(hand_results):
    rounds = _checked_rounds(hand_results, "fl4health")
    first, delta = _first_round(rounds)
    expected = _expected_delta([r["update"] for r in first], [np.array(c) for c in CHOSEN], "fl4health", SEGMENTS)
    np.testing.assert_allclose(delta, expected, rtol=1e-6, atol=1e-7)
    # tensor [0, 6): all four sites sent into it (site 3 sent position 5), so the denominator is N;
    # tensor [6, 12): only site 3 sent, so its values are divided by its own weight
    assert delta[0] == pytest.approx(0.1 * first[0]["update"][0], rel=1e-6)
    assert delta[9] == pytest.approx(first[3]["update"][9], rel=1e-6)
    ours = [r["per_position"][0] for r in hand_results][0]
    assert ours["after"][0] - ours["before"][0] == pytest.approx(first[0]["update"][0], rel=1e-6)


def test_per_tensor_scope_sends_a_fixed_share_of_every_tensor(hand_results):
    rounds = _checked_rounds(hand_results, "tensor_scope")
    for r in (rounds_[0] for rounds_ in rounds):
        sent = np.flatnonzero(r["residual"] == 0)
        assert len(sent) == 3 and np.sum(sent < 4) == 1 and np.sum(sent >= 4) == 2
        magnitude = np.abs(r["update"])
        assert sent[0] == np.argmax(magnitude[:4])
        assert set(sent[1:]) == set(4 + np.argsort(-magnitude[4:])[:2])


def test_int8_values_decode_before_averaging_and_keep_the_quantization_error(hand_results):
    rounds = _checked_rounds(hand_results, "int8_values")
    first, delta = _first_round(rounds)
    chosen = [np.array(c) for c in CHOSEN]
    np.testing.assert_allclose(
        delta, _expected_delta([r["update"] for r in first], chosen, int8_block=2), rtol=1e-6, atol=1e-7
    )
    for site, r in enumerate(first):
        values = torch.from_numpy(r["update"][CHOSEN[site]])
        decoded = dequantize(*quantize(values, 2), 2).numpy()
        np.testing.assert_array_equal(r["residual"][CHOSEN[site]], values.numpy() - decoded)
        np.testing.assert_allclose(r["residual"][CHOSEN[site]] + decoded, values.numpy(), rtol=1e-6)
        assert r["bytes"] == 4 + 3 * 4 + 3 * 1 + 2 * 4  # count + indices + codes + 2 fp32 scales


def test_without_error_feedback_nothing_is_kept(hand_results):
    rounds = _checked_rounds(hand_results, "no_error_feedback")
    assert rounds[0][0]["residual"] is None and rounds[0][0]["state_keys"] == []
    _check_second_round(rounds, [np.zeros(NUMEL, dtype=np.float32)] * 4)  # no residual: just the new update


def test_above_break_even_the_dense_exchange_runs(hand_results):
    rounds = _checked_rounds(hand_results, "fallback")
    for r in (x for rs in rounds for x in rs):
        assert r["bytes"] == 4 * NUMEL and r["stats"]["comm.density"] == 1.0
        assert np.array_equal(r["after"], r["dense_after"])


# --- every exchange x strategy keeps the ranks identical ------------------------------------------

BIG = 3000
EXCHANGE_CONFIGS = {
    "dense": ("dense", {}),
    "sparse": ("sparse", {"sparsity_level": 0.1}),
    "sparse_fl4health": (
        "sparse",
        {"sparsity_level": 0.1, "sparse_average": "fl4health", "segments": [(0, 1000), (1000, 1500), (2500, 500)]},
    ),
    "sparse_tensor": (
        "sparse",
        {
            "sparsity_level": 0.05,
            "sparsity_scope": "tensor",
            "segments": [(0, 1000), (1000, 1500), (2500, 500)],
            "selection_criterion": "largest_increase_in_magnitude",
        },
    ),
    "sparse_final": ("sparse", {"sparsity_level": 0.02, "selection_criterion": "largest_final_magnitude"}),
    "int8": ("int8", {"block_size": 128, "scale_dtype": "bf16"}),
    "sparse_int8": ("sparse_int8", {"sparsity_level": 0.1, "block_size": 64}),
    "sparse_fallback": ("sparse", {"sparsity_level": 0.6}),
    "sparse_given_weights": ("sparse", {"sparsity_level": 0.1, "site_weights": [s / sum(SIZES) for s in SIZES]}),
    "int8_given_weights": (
        "int8",
        {"block_size": 128, "scale_dtype": "bf16", "site_weights": [s / sum(SIZES) for s in SIZES]},
    ),
}


def _all_combinations(rank: int) -> dict:
    weight = SIZES[rank] / sum(SIZES)
    out = {}
    for label, (name, options) in EXCHANGE_CONFIGS.items():
        for strategy_name in STRATEGIES:
            # 8 KiB buckets: several buckets and chunks, so several collectives per exchange
            exchange = make_exchange(name, BIG, bucket_bytes=8192, **options)
            strategy = make_strategy(
                strategy_name, BIG, "cpu", server_learning_rate=0.5 if "fedavg" in strategy_name else 1e-2
            )
            global_ = torch.linspace(-1, 1, BIG)
            records = []
            for step in range(2):
                local = global_ + _big_update(rank, step)
                before = global_.clone()
                sent = exchange.exchange_(local, global_, weight, strategy)
                records.append(
                    (
                        flat_sha256(global_),
                        bool(torch.equal(local, global_)),
                        sent,
                        exchange.stats["comm.bytes_per_site"],
                        not torch.equal(before, global_),
                    )
                )
            out[f"{label}/{strategy_name}"] = records
    return out


def _resume(rank: int) -> dict:
    """A residual saved after round 1 and loaded into a new exchange continues bit for bit."""
    weight = SIZES[rank] / sum(SIZES)
    out = {}
    for name in ("sparse", "sparse_int8", "int8"):
        first = make_exchange(name, BIG, bucket_bytes=8192, sparsity_level=0.1)
        global_ = torch.zeros(BIG)
        first.exchange_(global_ + _big_update(rank, 0), global_, weight, FedAvg())
        resumed = make_exchange(name, BIG, bucket_bytes=8192, sparsity_level=0.1)
        resumed.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
        results = []
        for exchange in (first, resumed):
            g = global_.clone()
            exchange.exchange_(g + _big_update(rank, 1), g, weight, FedAvg())
            results.append((flat_sha256(g), flat_sha256(exchange.state_dict()["residual"])))
        out[name] = results
    return out


def _big_update(rank: int, step: int) -> torch.Tensor:
    return 0.01 * torch.randn(BIG, generator=torch.Generator().manual_seed(1000 * rank + step))


def test_exchange_state_round_trip_continues_identically(rank_results):
    for r in rank_results:
        for name, (first, resumed) in r["resume"].items():
            assert first == resumed, name


def _on_rank() -> dict:
    """One process group for all the rank tests of this file (starting 4 ranks costs seconds)."""
    rank, _ = init_gloo()
    out = {"hand": _hand_scenarios(rank), "combinations": _all_combinations(rank), "resume": _resume(rank)}
    dist.destroy_process_group()
    return out


def test_every_exchange_and_strategy_keeps_all_ranks_bitwise_identical(rank_results):
    results = [r["combinations"] for r in rank_results]
    for key in results[0]:
        for step in range(2):
            records = [r[key][step] for r in results]
            assert len({rec[0] for rec in records}) == 1, f"{key} step {step}: ranks differ"
            assert all(rec[1] for rec in records), f"{key}: local != global after the exchange"
            assert all(rec[2] == rec[3] > 0 for rec in records), f"{key}: bytes"
            assert all(rec[4] for rec in records), f"{key}: the model did not move"
    sparse = results[0]["sparse/fedavg"][0][2]
    # 12 buckets of 256 positions: 8 bytes of sample share + 12 counts, paid with 7 of the 300 values
    assert sparse == 8 + 4 * 12 + 8 * 293 <= 0.2 * 4 * BIG and results[0]["dense/fedavg"][0][2] == 4 * BIG
    assert results[0]["sparse_fallback/fedavg"][0][2] == 4 * BIG
    # sample shares given up front: no 8-byte gather (sparse spends it on one more value); int8: the same model
    assert results[0]["sparse_given_weights/fedadam"][0][2] == 4 * 12 + 8 * 294
    assert results[0]["int8_given_weights/fedyogi"][0][2] == results[0]["int8/fedyogi"][0][2] - 8
    for strategy in STRATEGIES:
        assert [x[0] for x in results[0][f"int8_given_weights/{strategy}"]] == [
            x[0] for x in results[0][f"int8/{strategy}"]
        ]
