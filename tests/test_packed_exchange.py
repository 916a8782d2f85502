"""A process hosting several sites encodes each one as if it sent alone (exchange/packed.py).

Four sites with known updates, two rounds (so error-feedback residuals carry over), on real gloo
ranks: each site in its own process through the one-site exchanges (the reference), two processes
of two sites and one process of four through PackedExchange. Every exchange and a stateful
strategy; also: sampled sites keep their residual untouched, and per-site state offloaded to disk.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from scaling_fl.exchange import PackedExchange, make_exchange
from scaling_fl.site_state import SiteStates
from scaling_fl.strategies import make_strategy
from tests.ranks import init_gloo, run_on_ranks

NUMEL = 3000
SIZES = [30, 50, 20, 40]  # rows of the four sites
SEGMENTS = [(0, 1000), (1000, 1500), (2500, 500)]
CONFIGS = {
    "dense": ("dense", {}),
    "sparse": ("sparse", {"sparsity_level": 0.1}),
    "sparse_fl4health_tensor": (
        "sparse",
        {"sparsity_level": 0.05, "sparsity_scope": "tensor", "sparse_average": "fl4health", "segments": SEGMENTS},
    ),
    "sparse_final_no_feedback": (
        "sparse",
        {"sparsity_level": 0.02, "selection_criterion": "largest_final_magnitude", "error_feedback": False},
    ),
    "int8": ("int8", {"block_size": 128, "scale_dtype": "bf16"}),
    "sparse_int8": ("sparse_int8", {"sparsity_level": 0.1, "block_size": 64}),
    "sparse_fallback": ("sparse", {"sparsity_level": 0.6}),
}
STRATEGY_NAMES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
ROUNDS = 2


def _update(site: int, round_index: int) -> torch.Tensor:
    return 0.01 * torch.randn(NUMEL, generator=torch.Generator().manual_seed(1000 * site + round_index))


def _start() -> torch.Tensor:
    return torch.linspace(-1, 1, NUMEL)


def _strategy(name: str):
    # FedAdam at its default lr == tau: a larger lr / tau amplifies the fp32 summation-order difference
    # of a coordinate that barely moves by lr / tau (a property of the strategy, not of packing).
    return make_strategy(name, NUMEL, "cpu")


def _one_site_per_process(rank: int) -> dict:
    """The reference: rank == site, the exchanges of one site per process."""
    weights = [size / sum(SIZES) for size in SIZES]
    out = {}
    for label, (name, options) in CONFIGS.items():
        for strategy_name in STRATEGY_NAMES:
            exchange = make_exchange(name, NUMEL, bucket_bytes=8192, site_weights=weights, **options)
            strategy, global_ = _strategy(strategy_name), _start()
            sent = []
            for round_index in range(ROUNDS):
                sent.append(exchange.exchange_(global_ + _update(rank, round_index), global_, weights[rank], strategy))
            residual = exchange.state_dict().get("residual")
            out[f"{label}/{strategy_name}"] = {
                "global": global_,
                "sent": sent,
                "residuals": {rank: residual.clone()} if residual is not None else {},
            }
    return out


def _packed(rank: int, hosted: list[list[int]], chosen_by_round: list[list[int]], offload: str, tmp: str) -> dict:
    """Sites hosted[rank] in this process, only chosen_by_round[r] training in round r."""
    out = {}
    for label, (name, options) in CONFIGS.items():
        for strategy_name in STRATEGY_NAMES:
            options = {key: value for key, value in options.items()}
            exchange = PackedExchange(name, NUMEL, bucket_bytes=8192, device=torch.device("cpu"), **options)
            states = SiteStates(offload, torch.device("cpu"), f"{tmp}/{label}-{strategy_name}-{rank}")
            shapes = exchange.state_shapes
            strategy, global_ = _strategy(strategy_name), _start()
            sent, figures = [], []
            for round_index, chosen in enumerate(chosen_by_round):
                rows = sum(SIZES[site] for site in chosen)
                for site in sorted(set(hosted[rank]) & set(chosen)):
                    state = states.checkout(site, shapes)
                    local = global_ + _update(site, round_index)
                    sent.append(exchange.add_site_(local, global_, SIZES[site] / rows, **state))
                    states.checkin(site, state)
                for part in exchange.means(global_):
                    strategy.apply_(global_, part)
                figures.append(dict(exchange.stats))
            out[f"{label}/{strategy_name}"] = {
                "global": global_,
                "sent": sent,
                "figures": figures,
                "residuals": {site: states.state_of(site)["residual"].clone() for site in states.sites()},
            }
    return out


def _on_ranks(world: int, hosted, chosen_by_round, offload: str, tmp: str) -> dict:
    rank, _ = init_gloo()
    if hosted is None:
        result = _one_site_per_process(rank)
    else:
        result = _packed(rank, hosted, chosen_by_round, offload, tmp)
    dist.destroy_process_group()
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("packed"))
    every_round = [[0, 1, 2, 3]] * ROUNDS
    return {
        "4x1": run_on_ranks(_on_ranks, 4, 4, None, None, "cpu", tmp),
        "2x2": run_on_ranks(_on_ranks, 2, 2, [[0, 1], [2, 3]], every_round, "cpu", tmp),
        "1x4": run_on_ranks(_on_ranks, 1, 1, [[0, 1, 2, 3]], every_round, "disk", tmp),
        # round 1: sites 1 and 3 sit out; round 2: site 0 sits out
        "sampled": run_on_ranks(_on_ranks, 2, 2, [[0, 1], [2, 3]], [[0, 2], [1, 2, 3]], "cpu", tmp),
    }


def _residuals(results: list[dict], key: str) -> dict:
    return {site: tensor for result in results for site, tensor in result[key]["residuals"].items()}


@pytest.mark.parametrize("key", [f"{label}/{strategy}" for label in CONFIGS for strategy in STRATEGY_NAMES])
def test_packing_changes_only_the_order_of_sums(runs, key):
    reference = runs["4x1"][0][key]
    scale = float(reference["global"].abs().max())
    for packing in ("2x2", "1x4"):
        results = runs[packing]
        for result in results:  # every process ends with the same model ...
            assert torch.equal(result[key]["global"], results[0][key]["global"]), packing
        # ... which is the one-site-per-process model up to fp32 summation order
        assert float((results[0][key]["global"] - reference["global"]).abs().max()) <= 1e-6 * scale, packing
        assert not torch.equal(results[0][key]["global"], _start())
        # each site sent what it sends alone and kept its own residual (round 2 starts from a global
        # model that differs in the last bits, so the residuals do too)
        sent = sorted(value for result in results for value in result[key]["sent"])
        assert sent == sorted(value for r in runs["4x1"] for value in r[key]["sent"]), packing
        expected = _residuals(runs["4x1"], key)
        packed = _residuals(results, key)
        assert packed.keys() == expected.keys(), packing
        for site in expected:
            assert float((packed[site] - expected[site]).abs().max()) <= 1e-6 * scale, (packing, site)


def test_bytes_per_site_mean_what_one_site_sends_and_the_workers_sum_densely(runs):
    figures = runs["2x2"][0]["sparse/fedavg"]["figures"][0]
    assert figures["comm.bytes_per_site"] == runs["4x1"][0]["sparse/fedavg"]["sent"][0] <= 0.2 * 4 * NUMEL
    assert figures["comm.density"] < 0.11
    assert figures["comm.worker_bytes"] == 2 * 4 * NUMEL  # numerator + who sent each position
    assert runs["2x2"][0]["dense/fedavg"]["figures"][0]["comm.worker_bytes"] == 4 * NUMEL
    assert runs["2x2"][0]["sparse_fallback/fedavg"]["figures"][0]["comm.bytes_per_site"] == 4 * NUMEL


def test_sites_that_sit_a_round_out_keep_their_residual_untouched(runs):
    key = "sparse/fedavg"
    sampled = _residuals(runs["sampled"], key)
    # site 0 trained in round 1 only: its residual is the one it had after round 1 of the full run's
    # first round, whatever happened in round 2
    assert set(sampled) == {0, 1, 2, 3}
    after_round_one = _first_round_residual(0)
    assert torch.equal(sampled[0], after_round_one)


def _first_round_residual(site: int) -> torch.Tensor:
    """Site `site`'s residual after sending its round-1 update alone (sparse 10 %): what sampling must keep."""
    exchange = PackedExchange("sparse", NUMEL, bucket_bytes=8192, device=torch.device("cpu"), sparsity_level=0.1)
    residual = torch.zeros(NUMEL)
    exchange.add_site_(_start() + _update(site, 0), _start(), 1.0, residual=residual)
    return residual


def test_site_states_live_where_offload_says_and_start_at_zero(tmp_path):
    for offload in ("cpu", "disk", "device"):
        states = SiteStates(offload, torch.device("cpu"), str(tmp_path / offload))
        assert states.sites() == [] and states.state_of(3) == {}
        state = states.checkout(3, {"residual": 5})
        assert torch.equal(state["residual"], torch.zeros(5))
        state["residual"].add_(2.0)
        states.checkin(3, state)
        assert states.sites() == [3] and torch.equal(states.state_of(3)["residual"], torch.full((5,), 2.0))
        assert states.checkout(4, {"residual": 5})["residual"].abs().sum() == 0  # the buffer is not site 3's
        assert (states.nbytes() == 0) == (offload == "disk")
        states.load(7, {"residual": torch.ones(5)})
        assert torch.equal(states.checkout(7, {"residual": 5})["residual"], torch.ones(5))
    with pytest.raises(ValueError, match="holds 5 values, expected 6"):
        states.checkout(7, {"residual": 6})
    with pytest.raises(ValueError, match="site_state_offload must be one of"):
        SiteStates("gpu", torch.device("cpu"))


def test_every_exchange_keeps_the_contract_and_the_round_loop_names_none():
    """The round loop calls exchanges, strategies and sync policies through their contracts only."""
    from pathlib import Path

    from scaling_fl.exchange.base import Exchange
    from scaling_fl.exchange.factory import EXCHANGES
    from scaling_fl.strategies.factory import STRATEGIES

    for name in EXCHANGES:
        assert isinstance(make_exchange(name, 4096, world_size=2, site_weights=[0.5, 0.5]), Exchange), name
    source = (Path(__file__).parents[1] / "scaling_fl" / "train" / "federated.py").read_text()
    for name in (*EXCHANGES, *STRATEGIES, "periodic", "dynamic"):
        assert f'"{name}"' not in source and f"'{name}'" not in source, name
    assert "getattr(" not in source and "isinstance(" not in source
