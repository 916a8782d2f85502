"""Client-level differential privacy: DP-FedAvg (McMahan et al. 2018, "Learning differentially private
recurrent language models").

Each participating site's update (its model minus the round's global model) is clipped to L2 norm
`dp_clip_norm` = C before it leaves the site, the participants are weighted equally, and the mean of
the n participants gets Gaussian noise of std `dp_noise_multiplier` x C / n. One site then moves the
mean by at most C / n, which is what the noise is calibrated to (sample-weighted means would let a
large site move it further). Every process draws the same noise from (seed, round, block of 2^20
positions), so all sites end the round with the same model, a resumed run draws what the
interrupted one would have, and how an exchange cuts the vector into buckets does not matter.

What the guarantee covers: the sequence of global models (what the coordinator, the evaluation and
anyone given the checkpoints see) is (epsilon, delta)-DP with respect to adding or removing one
site's whole data set. It does not cover what the sites show each other inside one run: the
processes sum the clipped, un-noised updates with collectives, so a process sees the partial sums it
takes part in (secure aggregation would be needed to hide them). The privacy spent is computed by
opacus' RDP accountant for the sampled Gaussian mechanism, with sampling rate participants / sites;
our participants are a fixed-size sample drawn without replacement, the accountant assumes Poisson
sampling of that rate (the approximation the DP-FedAvg literature and its libraries use).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from scaling_fl.exchange.base import MeanPart

NOISE_BLOCK = 1 << 20  # positions per independently seeded noise block
NOISE_STREAM = 7  # the seed stream of the noise, apart from the sites' batch order (0) and dropout (1)
CHUNK = 1 << 22  # positions per step when measuring and scaling an update (bounded temporary memory)


def update_norm(local: torch.Tensor, global_: torch.Tensor) -> float:
    """||local - global_||_2, accumulated in float64 chunk by chunk."""
    total = 0.0
    for start in range(0, local.numel(), CHUNK):
        stop = min(start + CHUNK, local.numel())
        total += float((local[start:stop] - global_[start:stop]).double().pow(2).sum())
    return math.sqrt(total)


def clip_update_(local: torch.Tensor, global_: torch.Tensor, clip_norm: float) -> float:
    """Scales local - global_ down to norm clip_norm when it is longer (in place, in local); returns its norm
    before clipping."""
    norm = update_norm(local, global_)
    if norm > clip_norm:
        factor = clip_norm / norm
        for start in range(0, local.numel(), CHUNK):
            stop = min(start + CHUNK, local.numel())
            piece, reference = local[start:stop], global_[start:stop]
            piece.sub_(reference).mul_(factor).add_(reference)
    return norm


def _block_seed(seed: int, round_index: int, block: int) -> int:
    return int(np.random.SeedSequence([seed, round_index, block, NOISE_STREAM]).generate_state(1)[0])


@lru_cache(maxsize=2)
def _noise_block(seed: int, round_index: int, block: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_block_seed(seed, round_index, block))
    return torch.randn(NOISE_BLOCK, generator=generator)


def noise(start: int, stop: int, seed: int, round_index: int) -> torch.Tensor:
    """Standard normal noise of the positions [start, stop) of round `round_index`: position i's value
    depends only on (seed, round, i), never on the slices it is asked for in."""
    pieces = []
    for block in range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1):
        low, high = max(start, block * NOISE_BLOCK), min(stop, (block + 1) * NOISE_BLOCK)
        pieces.append(_noise_block(seed, round_index, block)[low - block * NOISE_BLOCK : high - block * NOISE_BLOCK])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """The privacy spent after `rounds` rounds, by opacus' RDP accountant (inf without noise)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta))


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Adaptive clipping's noise multiplier of the updates, (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al.
    2021, Theorem 1): with the clipped count's noise sigma_b, the two releases together are as private as
    the updates alone with multiplier z."""
    if noise_multiplier == 0:
        return 0.0
    rest = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"the clipped count's noise {count_stddev} must exceed dp_noise_multiplier / 2 = {noise_multiplier / 2}"
        )
    return rest**-0.5


def count_noise(seed: int, round_index: int) -> float:
    """The standard normal draw of round `round_index` for the clipped count (the same on every process)."""
    return float(np.random.default_rng([seed, round_index, NOISE_STREAM + 1]).normal())


class NoPrivacy:
    """dp=none: sample-weighted means, nothing clipped or noised."""

    needs_reference = False
    adaptive = False

    def weights(self, sizes: list[int]) -> list[float]:
        return [size / sum(sizes) for size in sizes]

    def clip_(self, local: torch.Tensor, global_: torch.Tensor) -> None:
        pass

    def noise_(self, part: MeanPart, round_index: int, participants: int) -> None:
        pass

    def figures(self, round_number: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass


class ClientDP(NoPrivacy):
    """dp=client (see the module's docstring).

    With adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive
    clipping"), `dp_clip_norm` is the first round's clip norm C. Each round every participant also
    reports whether its update was within C (b_i); the processes sum the b_i, the sum gets seeded
    Gaussian noise of std sigma_b (`dp_clipped_count_stddev`, default participants / 20 as the paper
    recommends), and the next round's norm is C exp(-eta (b - gamma)), b the noisy fraction, gamma
    `dp_target_quantile`, eta `dp_clip_learning_rate`. The updates' noise multiplier is lowered so the
    round stays as private as `dp_noise_multiplier` says, and the accountant is called with that.
    """

    needs_reference = True

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        delta: float,
        seed: int,
        sample_rate: float,
        *,
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        count_stddev: float = 1.0,
    ) -> None:
        self.clip_norm, self.noise_multiplier, self.delta = clip_norm, noise_multiplier, delta
        self.seed, self.sample_rate = seed, sample_rate
        self.adaptive, self.target_quantile, self.clip_learning_rate = adaptive, target_quantile, clip_learning_rate
        self.count_stddev = count_stddev
        self.update_multiplier = (
            update_noise_multiplier(noise_multiplier, count_stddev) if adaptive else noise_multiplier
        )
        self.unclipped = 0  # this process's participants whose update was within the clip norm this round
        self.round_clip_norm, self.unclipped_fraction = clip_norm, None

    def weights(self, sizes: list[int]) -> list[float]:
        return [1.0 / len(sizes)] * len(sizes)

    def clip_(self, local: torch.Tensor, global_: torch.Tensor) -> None:
        self.unclipped += clip_update_(local, global_, self.clip_norm) <= self.clip_norm

    def noise_(self, part: MeanPart, round_index: int, participants: int) -> None:
        if self.update_multiplier == 0:
            return
        std = self.update_multiplier * self.clip_norm / participants
        drawn = noise(part.where.start, part.where.stop, self.seed, round_index)
        part.values.add_(drawn.to(device=part.values.device, dtype=part.values.dtype), alpha=std)

    def adapt_clip_(self, unclipped: int, round_index: int, participants: int) -> None:
        """After the round's noised mean: the next round's clip norm from all processes' count of updates
        within this one (`unclipped`, summed by the round loop)."""
        centered = unclipped - participants / 2 + self.count_stddev * count_noise(self.seed, round_index)
        self.unclipped_fraction = centered / participants + 0.5
        self.round_clip_norm = self.clip_norm
        self.clip_norm = self.clip_norm * math.exp(
            -self.clip_learning_rate * (self.unclipped_fraction - self.target_quantile)
        )
        self.unclipped = 0

    def figures(self, round_number: int) -> dict[str, float]:
        """privacy.epsilon after this round, at dp_delta (and the clip norm the round used)."""
        figures = {"privacy.epsilon": epsilon(self.noise_multiplier, self.sample_rate, round_number, self.delta)}
        if self.adaptive:
            figures["privacy.clip_norm"] = self.round_clip_norm
            figures["privacy.unclipped_fraction"] = self.unclipped_fraction
        return figures

    def state_dict(self) -> dict[str, float]:
        """What a resumed run needs: the clip norm the next round uses (adaptive clipping moves it)."""
        return {"clip_norm": self.clip_norm} if self.adaptive else {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if self.adaptive and "clip_norm" in state:
            self.clip_norm = float(state["clip_norm"])
