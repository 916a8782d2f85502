"""Client-level DP (scaling_fl/privacy.py): clipping bound, noise std and seeding, equal weights, the
accountant, and the round loop's use of them on real gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch

from scaling_fl.config import ConfigError, resolve
from scaling_fl.exchange.base import MeanPart
from scaling_fl.privacy import NOISE_BLOCK, ClientDP, NoPrivacy, clip_update_, epsilon, noise, update_norm


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
    ],
)
def test_bad_dp_settings_are_refused_by_the_config(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve({"model": "tiny-bert", **raw})
