"""Client-level DP (scaling_fl/privacy.py): clipping bound, noise std and seeding, equal weights, the
accountant, and the round loop's use of them on real gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch

from scaling_fl.config import ConfigError, resolve
from scaling_fl.exchange.base import MeanPart
from scaling_fl.privacy import (
    NOISE_BLOCK,
    ClientDP,
    NoPrivacy,
    clip_update_,
    count_noise,
    epsilon,
    noise,
    update_noise_multiplier,
    update_norm,
)


def test_every_clipped_update_is_within_the_bound_and_short_ones_are_untouched():
    generator = torch.Generator().manual_seed(0)
    global_ = torch.randn(10_000, generator=generator)
    for scale in (1e-4, 0.01, 0.1, 1.0, 10.0):
        local = global_ + scale * torch.randn(10_000, generator=generator)
        before = local.clone()
        norm = clip_update_(local, global_, clip_norm=1.0)
        assert norm == pytest.approx(float((before - global_).norm()), rel=1e-6)
        assert update_norm(local, global_) <= 1.0 + 1e-5
        if norm <= 1.0:
            assert torch.equal(local, before)
        else:  # same direction, length exactly the bound
            direction = (before - global_) / norm
            torch.testing.assert_close(local - global_, direction, rtol=1e-4, atol=1e-6)


def test_noise_depends_on_seed_round_and_position_only_not_on_the_slices():
    n = 2 * NOISE_BLOCK + 12_345
    whole = noise(0, n, seed=42, round_index=3)
    cuts = [0, 7, 1000, NOISE_BLOCK - 1, NOISE_BLOCK + 5, 2 * NOISE_BLOCK, n]
    pieces = torch.cat([noise(a, b, seed=42, round_index=3) for a, b in zip(cuts, cuts[1:], strict=False)])
    assert torch.equal(whole, pieces)
    assert torch.equal(whole, noise(0, n, seed=42, round_index=3))  # same seed, same noise (resume)
    assert not torch.equal(whole[:1000], noise(0, 1000, seed=42, round_index=4)[:1000])
    assert not torch.equal(whole[:1000], noise(0, 1000, seed=43, round_index=3)[:1000])
    assert abs(float(whole.mean())) < 0.005 and float(whole.std()) == pytest.approx(1.0, abs=0.005)


def test_the_mean_gets_noise_of_std_multiplier_times_clip_over_participants():
    dp = ClientDP(clip_norm=2.0, noise_multiplier=1.5, delta=1e-5, seed=1, sample_rate=1.0)
    values = torch.zeros(3 * NOISE_BLOCK // 2)
    part = MeanPart(slice(100, 100 + values.numel()), values, is_average=False)
    dp.noise_(part, round_index=0, participants=8)
    assert float(values.std()) == pytest.approx(1.5 * 2.0 / 8, rel=0.01)
    torch.testing.assert_close(values, 1.5 * 2.0 / 8 * noise(100, 100 + values.numel(), 1, 0))


def test_participants_weigh_equally_under_dp_and_by_rows_without():
    assert ClientDP(1.0, 1.0, 1e-5, 0, 1.0).weights([10, 30, 60]) == [1 / 3] * 3
    assert NoPrivacy().weights([10, 30, 60]) == [0.1, 0.3, 0.6]


@pytest.mark.parametrize("noise_multiplier, sample_rate, rounds", [(1.0, 1.0, 3), (1.1, 0.25, 50), (0.8, 0.01, 1000)])
def test_epsilon_is_opacus_rdp_accountant_called_directly(noise_multiplier, sample_rate, rounds):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    assert epsilon(noise_multiplier, sample_rate, rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    assert epsilon(noise_multiplier, sample_rate, rounds, 1e-5) < epsilon(
        noise_multiplier, sample_rate, rounds + 1, 1e-5
    )
    assert math.isinf(epsilon(0.0, sample_rate, rounds, 1e-5))


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"dp": "client"}, "dp_clip_norm=None is not allowed"),
        ({"dp": "client", "dp_clip_norm": 1.0, "dp_noise_multiplier": -1}, "dp_noise_multiplier=-1 is not allowed"),
        ({"dp": "client", "dp_clip_norm": 1.0, "exchange": "sparse"}, "exchange='sparse' is not allowed: dense"),
        ({"dp": "client", "dp_clip_norm": 1.0, "sync": "periodic", "comm_period": 2}, "round with dp=client"),
        ({"dp": "client", "dp_clip_norm": 0}, "dp_clip_norm=0 is not allowed"),
        ({"dp": "client", "dp_clip_norm": 1.0, "dp_adaptive_clip": True}, "dp_clipped_count_stddev=0.2 is not allowed"),
        (
            {"dp": "client", "dp_clip_norm": 1.0, "dp_adaptive_clip": True, "dp_clipped_count_stddev": 0.5},
            "more than dp_noise_multiplier / 2 = 0.5",
        ),
        ({"dp": "client", "dp_clip_norm": 1.0, "dp_adaptive_clip": True, "dp_target_quantile": 1.0}, "quantile=1.0"),
    ],
)
def test_bad_dp_settings_are_refused_by_the_config(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve({"model": "tiny-bert", **raw})


def test_adaptive_clipping_keeps_the_round_as_private_as_the_noise_multiplier_says():
    z, sigma_b = 1.0, 2.0
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)  # Andrew et al. 2021, Theorem 1
    assert z_update > z  # the updates get a little more noise
    dp = ClientDP(1.0, z, 1e-5, 0, 1.0, adaptive=True, count_stddev=sigma_b)
    part = MeanPart(slice(0, 1000), torch.zeros(1000), is_average=False)
    dp.noise_(part, 0, 4)
    assert float(part.values.std()) == pytest.approx(z_update / 4, rel=0.1)
    with pytest.raises(ValueError, match="must exceed dp_noise_multiplier / 2"):
        update_noise_multiplier(1.0, 0.5)


def test_the_clip_norm_moves_geometrically_toward_the_target_quantile():
    dp = ClientDP(1.0, 0.0, 1e-5, 7, 1.0, adaptive=True, target_quantile=0.5, clip_learning_rate=0.2, count_stddev=1.0)
    norms = torch.arange(1.0, 21.0)  # 20 participants with update norms 1..20: the median is 10.5
    start = torch.zeros(1)
    history = []
    for round_index in range(150):
        used = dp.clip_norm
        for norm in norms:
            dp.clip_(torch.tensor([float(norm)]), start)
        dp.adapt_clip_(dp.unclipped, round_index, len(norms))
        history.append(used)
        if round_index == 0:  # by hand: 1 of 20 within 1.0, the seeded count noise, C exp(-eta (b - gamma))
            b = (1 - 10 + count_noise(7, 0)) / 20 + 0.5
            assert dp.clip_norm == pytest.approx(math.exp(-0.2 * (b - 0.5)))
            assert dp.figures(1)["privacy.unclipped_fraction"] == pytest.approx(b)
    assert 8.0 < sum(history[-50:]) / 50 < 13.0  # settles around the median norm
    restored = ClientDP(1.0, 0.0, 1e-5, 7, 1.0, adaptive=True)
    restored.load_state_dict(dp.state_dict())
    assert restored.clip_norm == dp.clip_norm  # what a checkpoint carries
