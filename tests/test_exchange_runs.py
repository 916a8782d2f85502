"""Exchanges, strategies and sync policies through the real command line: the bytes each site put
into collectives, the sync decisions, and which model is evaluated when sites have not synchronized."""

from __future__ import annotations

import functools
import math

import pytest

from tests.cli import TINY_JOB, read_record, run_cli, run_records

pytestmark = pytest.mark.slow  # every test here starts the command line

SMALL = [*TINY_JOB, "synthetic_train_size=160", "synthetic_test_size=40", "site_ids=[0,0]"]


@functools.lru_cache(maxsize=1)
def _model_values() -> int:
    """Float values of the tiny-bert classifier: what one dense exchange sends, 4 bytes each."""
    from scaling_fl import models
    from scaling_fl.flat_state import flatten_model_

    return flatten_model_(models.load_model("tiny-bert", 4, seed=0)).numel()


def _run(tmp_path, *options: str) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    result = run_cli(tmp_path, "with", *SMALL, *options, f"runs_dir={tmp_path / 'runs'}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_records(tmp_path / "runs")
    record = read_record(run_dir)
    assert record["run"]["status"] == "COMPLETED"
    return record["metrics"]


def _values(metrics: dict, name: str) -> list:
    return metrics[name]["values"]


def _buckets(n: int) -> int:
    """Index buckets of the sparse exchange at the default 32 MiB bound (41 bytes a position)."""
    return math.ceil(n / (32 * 2**20 // 41))


def _sparse_k(n: int, level: float, value_bytes: int) -> int:
    """floor(level * n) values, less those that pay for the 4-byte per-bucket counts (weights are given)."""
    return math.floor(level * n) - math.ceil(4 * _buckets(n) / value_bytes)


@pytest.mark.parametrize(
    "options, payload, density",
    [
        (["exchange=dense", "strategy=fedavgm"], lambda n: (4 * n, 4 * n), lambda n: 1.0),
        (
            ["exchange=sparse", "sparsity_level=0.1", "strategy=fedadam"],
            lambda n: (4 * _buckets(n) + 8 * _sparse_k(n, 0.1, 8),) * 2,
            lambda n: _sparse_k(n, 0.1, 8) / n,
        ),
        (["exchange=int8"], lambda n: (n + 4 * math.ceil(n / 256),) * 2, lambda n: 1.0),
        (
            ["exchange=sparse_int8", "sparsity_level=0.05"],  # a bucket may start one more block of scales
            lambda n: (
                4 * _buckets(n) + 5 * _sparse_k(n, 0.05, 5) + 4 * math.ceil(_sparse_k(n, 0.05, 5) / 256),
                4 * _buckets(n)
                + 5 * _sparse_k(n, 0.05, 5)
                + 4 * (math.ceil(_sparse_k(n, 0.05, 5) / 256) + _buckets(n)),
            ),
            lambda n: _sparse_k(n, 0.05, 5) / n,
        ),
    ],
    ids=["dense-fedavgm", "sparse-fedadam", "int8", "sparse_int8"],
)
def test_each_exchange_puts_exactly_its_payload_into_collectives(tmp_path, options, payload, density):
    metrics = _run(tmp_path, "num_rounds=2", *options)
    n = _model_values()
    low, high = payload(n)
    assert all(low <= sent <= high for sent in _values(metrics, "comm.bytes_per_site")), (low, high)
    if "sparsity_level=0.1" in options:
        assert high <= 0.2 * 4 * n  # sparse 10 % never costs more than 0.2x dense
    assert _values(metrics, "comm.density") == pytest.approx([density(n)] * 2)
    assert _values(metrics, "sync.done") == [1, 1]
    peak = _values(metrics, "memory.exchange_peak_mb")
    if "exchange=dense" in options:
        assert peak == [0.0, 0.0]  # in place, no buffer
    else:  # the residual (one model-sized fp32 buffer) plus temporaries within the bucket
        assert all(4 * n / 2**20 < mb < 4 * n / 2**20 + 32 + 1 for mb in peak), peak


def test_periodic_sync_exchanges_between_local_steps(tmp_path):
    metrics = _run(tmp_path, "num_rounds=2", "sync=periodic", "comm_period=2", "local_steps=4")
    n = _model_values()
    assert _values(metrics, "sync.done") == [2, 2]
    assert _values(metrics, "comm.bytes_per_site") == [2 * 4 * n] * 2


def test_dynamic_sync_skips_below_the_threshold_and_evaluates_the_last_synchronized_model(tmp_path):
    n = _model_values()
    never = _run(tmp_path / "never", "num_rounds=3", "sync=dynamic", "delta_threshold=1e9", "local_steps=3")
    assert _values(never, "sync.skipped") == [1, 1, 0]
    assert _values(never, "sync.done") == [0, 0, 1]  # the last round always ends synchronized
    assert _values(never, "comm.bytes_per_site") == [8, 8, 4 * n]  # one float64 check; then the final exchange
    loss = _values(never, "validation.loss")
    assert loss[0] == loss[1] and loss[2] != loss[1]  # nothing synchronized: the global model is still the start

    always = _run(tmp_path / "always", "num_rounds=2", "sync=dynamic", "delta_threshold=0", "local_steps=3")
    assert _values(always, "sync.done") == [1, 1] and _values(always, "sync.skipped") == [0, 0]
    assert _values(always, "comm.bytes_per_site") == [4 * n + 8, 4 * n]
    assert all(d > 0 for d in _values(always, "sync.divergence_max"))


def test_client_dp_clips_every_update_and_records_the_privacy_spent(tmp_path):
    """dp=client on the one-site-per-process loop: a clip norm so small that no site can move the model,
    so the global model (and its loss) stays where it started; epsilon per round from opacus' accountant."""
    import math

    from scaling_fl.privacy import count_noise, epsilon

    adaptive = ["dp_adaptive_clip=True", "dp_clipped_count_stddev=1.0"]  # every update clipped: the norm grows
    metrics = _run(tmp_path, "num_rounds=2", "dp=client", "dp_clip_norm=1e-9", "dp_noise_multiplier=1.0", *adaptive)
    loss = _values(metrics, "validation.loss")
    assert loss[0] == pytest.approx(loss[1], abs=1e-6)
    assert _values(metrics, "privacy.epsilon") == pytest.approx([epsilon(1.0, 1.0, r, 1e-5) for r in (1, 2)])
    fraction = (0 - 2 / 2 + 1.0 * count_noise(42, 0)) / 2 + 0.5  # 2 sites, none unclipped, seeded noise
    assert _values(metrics, "privacy.unclipped_fraction")[0] == pytest.approx(fraction)
    assert _values(metrics, "privacy.clip_norm") == pytest.approx([1e-9, 1e-9 * math.exp(-0.2 * (fraction - 0.5))])
