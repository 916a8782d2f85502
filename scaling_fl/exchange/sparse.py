"""Sparse top-k exchange: each site sends only its k most important update values.

Selection. k = max(1, floor(sparsity_level * numel)) values of the site's update u = local - global
(+ its residual), scored by `selection_criterion` (FL4Health's criteria, written on the
flat model; `final` is global + u, which is local without error feedback):
    largest_magnitude_change        |u|
    largest_final_magnitude         |final|
    largest_increase_in_magnitude   |final| - |global|
chosen over the whole model (`sparsity_scope="model"`, global top-k: never more than the
fraction asked for) or ceil(level * n_t) per tensor (`"tensor"`, every tensor sends at least
one value; needs the tensors' (offset, numel) segments). The exact k-th largest score is found
without a model-sized score buffer, in one streaming pass: the scores' float bits map to
order-preserving int32 keys (a magnitude's bits already are), computed chunk by chunk. A region
that fits in one chunk is read once and its k-th key selected there. A larger one is bracketed
by a sample of 65,536 of its keys (one per stratum, at an offset fixed by the stratum: every site
samples the same positions), 5 standard deviations of the sample's rank either side of k; the
pass counts the keys above the bracket, counts apart a bracket end shared by many keys (exact
zeros, say), and collects those inside it (at most a chunk's worth), where the k-th is selected.
Should the k-th fall outside the bracket or more than a chunk's worth inside it, two passes of
65,536-bin histograms (high, then low 16 bits) find it instead: the sample decides the time,
never the result. The pass also counts each chunk's keys above and at the cut, so the per-bucket
counts gathered before sending need no pass of their own where the chunks are the buckets (model
scope); the second pass, bucket by bucket as they are sent, lists every position above the cut
plus the first ties at it, in index order, so every site sends exactly k values. Besides one
chunk, the selection holds the sample while it is drawn (about 2.5 MiB) and the per-chunk
counts. (FL4Health sends every score >= the k-th, so ties send more than k, and scores `final`
on the weights it sends.)

Wire format. The model is cut into index buckets (sized from `bucket_bytes`); a bucket's
positions are selected, sent, averaged and applied together. Per bucket each site sends its
selected positions as int32 flat indices + fp32 values (8 bytes a value), or + int8 codes with
one scale per block of values (`values="int8"`, ~5 bytes), in one broadcast per site, rank by
rank; how many it sends in each bucket (int32 counts, 4 bytes a bucket) is gathered first, so
every collective has a size every site knows. Plus each site's sample share (8 bytes) unless
`site_weights` are given. `comm.bytes_per_site` counts all of that payload, and k is the
fraction asked for less the few values that pay for the counts (a handful out of millions), so
the payload never exceeds sparsity_level x the fp32 cost of sending every value with its index:
10 % costs <= 0.2x the dense payload. On the wire, every site's selection must reach every other
site (W - 1 copies) while a ring all_reduce sends 2 (W - 1) / W x its payload, so at W sites
sparse carries W/2 x its payload ratio (10 %: 0.2x dense payload, 0.4x dense wire bytes at 4
sites): `comm.wire_bytes_per_site` estimates it.

Aggregation (every site, identically, in rank order).
    sparse_average="per_position" (default): each position is the sample-weighted mean over
        the sites that sent it, sum_{i sent p} n_i u_i[p] / sum_{i sent p} n_i; a position
        nobody sent gets mean update 0. A value is never diluted by the sites that did not
        send it (they have not lost that part of their update: it is in their residual).
    sparse_average="fl4health": FL4Health's FedAvgSparseCooTensor rule. Per tensor t, the
        sites that sent a non-zero value anywhere in t form the denominator:
        mean[p] = sum_{i sent p} n_i u_i[p] / sum_{i sent t} n_i, i.e. a site that sent
        other positions of t counts as a zero at p. (FL4Health applies it to weights, not
        updates, and clients then overwrite every unsent entry of a returned tensor with 0;
        here it is applied to updates so the two rules can be compared on equal terms.) The
        per-tensor flags (1 byte a tensor) are gathered with the counts.
    Without segments, "the tensor" is the whole model and this rule is plain dilution,
    sum_{i sent p} n_i u_i[p] / N (every site sends some non-zero value somewhere).

Error feedback (default). What a site did not send stays in its residual (sent + residual
== update, exactly for fp32 values; with int8 values the quantization error stays too) and
is added to its next update. The residual is per-site state: `state_dict()`.

Fallback. If sending k sparse values would cost at least as many bytes as the dense
exchange of the same value format, the dense one runs instead: fp32 above density 0.5
(8 vs 4 bytes a value), int8 values above ~0.2 (5 + 4/256 vs 1 + 4/256 bytes).

Memory. The update is built in the residual (error feedback) or one model-sized fp32
buffer (without); `local` is scratch until the end and accumulates the weighted sums. Every
other buffer (score keys, who sent what, one site's received indices and values, this site's
selection) covers one index bucket, ~36 bytes a position at most, and lives within
`bucket_bytes`: one model-sized buffer plus one bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from scaling_fl.exchange.base import ExchangeBase, MeanPart
from scaling_fl.exchange.dense import DenseExchange, bucket_ranges, load_residual, ring_wire_bytes
from scaling_fl.exchange.quantize import (
    DEFAULT_BUCKET_BYTES,
    SCALE_DTYPES,
    Int8Exchange,
    SiteWeights,
    block_scales,
    dequantize_into,
    int8_payload_bytes,
    num_blocks,
    quantize_into,
)

CRITERIA = ("largest_magnitude_change", "largest_final_magnitude", "largest_increase_in_magnitude")
SCOPES = ("model", "tensor")
SPARSE_AVERAGES = ("per_position", "fl4health")
VALUE_FORMATS = ("fp32", "int8")
_BINS = 1 << 16
_MAX_BITMASK_SITES = 8


# --- selection ---------------------------------------------------------------------------


def scores_into(update: torch.Tensor, global_part: torch.Tensor, criterion: str, out: torch.Tensor) -> torch.Tensor:
    """out <- the criterion's score of every position (higher is sent first)."""
    if criterion == "largest_magnitude_change":
        return torch.abs(update, out=out)
    torch.add(global_part, update, out=out).abs_()
    if criterion == "largest_final_magnitude":
        return out
    if criterion == "largest_increase_in_magnitude":
        return out.sub_(global_part.abs())
    raise ValueError(f"selection_criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


def order_keys_(scores: torch.Tensor) -> torch.Tensor:
    """Reinterprets fp32 scores in place as int32 keys with the same order (a view of the same memory)."""
    bits = scores.view(torch.int32)
    return bits.bitwise_xor_((bits >> 31).bitwise_and_(0x7FFFFFFF))  # negatives: reverse the magnitude order


class Cut(NamedTuple):
    """Positions [start, end) to send: every key above `key`, then the first `ties` positions equal to it."""

    start: int
    end: int
    key: int
    ties: int


class _CountedCut(Cut):
    """A Cut that also knows, for each chunk (a, b) find_cut read, (keys above the cut, keys at it):
    `counts`. _count_ and _select use them instead of counting again (valid for the keys it was found on)."""

    counts: dict[tuple[int, int], tuple[int, int]]

    def __repr__(self) -> str:
        return repr(Cut(*self))


def _counted(start: int, end: int, key: int, ties: int, counts: dict) -> Cut:
    cut = _CountedCut(start, end, key, ties)
    cut.counts = counts
    return cut


def _chunks(start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(start, end, size):
        yield a, min(a + size, end)


_SAMPLE = 1 << 16  # keys sampled to bracket the k-th of a region larger than a chunk
_SIGMAS = 5.0  # the bracket's half-width, in standard deviations of the sample's count above the k-th


def find_cut(keys_of, start: int, end: int, k: int, chunk_numel: int) -> Cut:
    """The exact k-th largest key of [start, end) and how many of its ties are sent.

    A region of at most one chunk is read once and its k-th selected in place (kthvalue). A larger
    one is bracketed by a fixed sample of its keys, then settled in one streaming pass that counts
    the keys above the bracket and collects those inside it (at most `chunk_numel`); should the k-th
    fall outside the bracket or too many keys inside it, two passes of 65,536-bin histograms find it
    instead. The result never depends on the sample, only the time does. The cut also carries each
    chunk's count of keys above and at it, so that _count_ need not read the keys again."""
    n = end - start
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if n <= chunk_numel:
        keys = keys_of(start, end)
        key = int(torch.kthvalue(keys, n - k + 1).values)
        greater, equal = int(torch.count_nonzero(keys > key)), int(torch.count_nonzero(keys == key))
        return _counted(start, end, key, k - greater, {(start, end): (greater, equal)})
    bracket = _bracket(_sample_keys(keys_of, start, end), n, k, chunk_numel)
    cut = _cut_in_bracket(keys_of, start, end, k, chunk_numel, bracket) if bracket is not None else None
    return cut if cut is not None else _cut_by_histograms(keys_of, start, end, k, chunk_numel)


class _Bracket(NamedTuple):
    """Keys above `hi` are counted and keys in [lo, hi] collected (None: no bound on that side); a
    `split_*` boundary key is too frequent to collect (e.g. exact zeros), so it is counted apart."""

    hi: int | None
    lo: int | None
    split_hi: bool
    split_lo: bool


def _sample_positions(start: int, end: int, m: int, device) -> torch.Tensor:
    """m positions of [start, end), one in each of m equal strata at a fixed pseudo-random offset (a
    function of the stratum alone: every site samples the same positions; no periodic aliasing)."""
    n = end - start
    i = torch.arange(m, dtype=torch.int64, device=device)
    low = i * n // m
    width = (i + 1) * n // m - low
    return ((i * 2654435761 + 40503) % 4294967291 % width).add_(low).add_(start)


def _sample_keys(keys_of, start: int, end: int) -> torch.Tensor:
    """min(_SAMPLE, n) keys of [start, end) (a copy): scattered positions where keys_of can read them
    (`keys_of.at`), otherwise evenly spaced blocks of 256."""
    n, device = end - start, _device(keys_of)
    m = min(_SAMPLE, n)
    at = getattr(keys_of, "at", None)
    if at is not None:
        return at(_sample_positions(start, end, m, device))
    block = min(256, n)
    blocks = max(1, m // block)
    firsts = [start + j * (n - block) // max(1, blocks - 1) for j in range(blocks)]
    return torch.cat([keys_of(a, a + block).clone() for a in firsts])


def _bracket(sample: torch.Tensor, n: int, k: int, capacity: int) -> _Bracket | None:
    """Where the k-th largest of n keys lies, judged from a sample: _SIGMAS standard deviations of the
    sample's rank either side of k/n of it. A boundary key holding (by the sample) more than 1/8 of
    `capacity` keys is split. None if the bracket would hold more than 3/4 of `capacity` keys."""
    sample = torch.sort(sample, descending=True).values
    m = sample.numel()
    p = k / n
    spread = _SIGMAS * math.sqrt(m * p * (1 - p)) + 2
    top, bottom = math.floor(p * m - 1 - spread), math.ceil(p * m - 1 + spread)
    hi = int(sample[top]) if top >= 0 else None
    lo = int(sample[bottom]) if bottom < m else None
    at_hi = int(torch.count_nonzero(sample == hi)) if hi is not None else 0
    at_lo = int(torch.count_nonzero(sample == lo)) if lo is not None and lo != hi else 0
    heavy = capacity * m / (8 * n)
    split_hi, split_lo = at_hi > heavy, at_lo > heavy
    inside = m
    if hi is not None:
        inside -= int(torch.count_nonzero(sample > hi)) + (at_hi if split_hi else 0)
    if lo is not None:
        inside -= int(torch.count_nonzero(sample < lo)) + (at_lo if split_lo else 0)
    if inside * n / m > 0.75 * capacity:
        return None
    return _Bracket(hi, lo, split_hi, split_lo)


def _cut_in_bracket(keys_of, start: int, end: int, k: int, chunk_numel: int, bracket: _Bracket) -> Cut | None:
    """One streaming pass: count the keys above the bracket and at its split boundaries, collect those
    inside it, and find the k-th among them. None if the k-th is not in the bracket or more than
    `chunk_numel` keys are inside it."""
    hi, lo, split_hi, split_lo = bracket
    inside = torch.empty(chunk_numel, dtype=torch.int32, device=_device(keys_of))
    chunks = list(_chunks(start, end, chunk_numel))
    above, at_hi, at_lo, ends = [], [], [], []  # per chunk; ends: where its keys end in `inside`
    used = 0
    for a, b in chunks:
        keys = keys_of(a, b)
        # A split boundary is counted over the whole chunk, so that a frequent key is never copied.
        at_hi.append(int(torch.count_nonzero(keys == hi)) if split_hi else 0)
        at_lo.append(int(torch.count_nonzero(keys == lo)) if split_lo else 0)
        if lo is not None:  # a small part unless k is large
            keys = keys[keys > lo] if split_lo or (split_hi and lo == hi) else keys[keys >= lo]
        if hi is None:
            above.append(0)
        elif split_hi and lo == hi:  # one key, counted apart: nothing inside
            above.append(keys.numel())
            keys = keys[:0]
        else:  # what is not inside the bracket is above it (or at its split high end)
            from_lo = keys.numel()
            keys = keys[keys < hi] if split_hi else keys[keys <= hi]
            above.append(from_lo - keys.numel() - at_hi[-1])
        if sum(above) >= k:  # the k-th is above the bracket
            return None
        if used + keys.numel() > chunk_numel:
            return None
        inside[used : used + keys.numel()].copy_(keys)
        used += keys.numel()
        ends.append(used)

    inside, total_above, total_hi = inside[:used], sum(above), sum(at_hi)
    rank = k - total_above  # of the k-th among the keys not above the bracket, from 1
    if split_hi and rank <= total_hi:
        key, greater, equal = hi, above, at_hi
    elif rank - total_hi <= used:
        key = int(torch.kthvalue(inside, used - (rank - total_hi) + 1).values)
        starts = [0] + ends[:-1]
        greater = [
            x + y + int(torch.count_nonzero(inside[s:e] > key)) for x, y, s, e in zip(above, at_hi, starts, ends)
        ]
        equal = [int(torch.count_nonzero(inside[s:e] == key)) for s, e in zip(starts, ends)]
    elif split_lo and rank - total_hi - used <= sum(at_lo):
        key, equal = lo, at_lo
        greater = [x + y + e - s for x, y, s, e in zip(above, at_hi, [0] + ends[:-1], ends)]
    else:
        return None
    return _counted(start, end, key, k - sum(greater), dict(zip(chunks, zip(greater, equal))))


def _cut_by_histograms(keys_of, start: int, end: int, k: int, chunk_numel: int) -> Cut:
    """find_cut's fallback: two streaming passes of 65,536-bin histograms (the high, then the low 16
    bits of the keys)."""
    high = torch.zeros(_BINS, dtype=torch.int64, device=_device(keys_of))
    for a, b in _chunks(start, end, chunk_numel):
        high += torch.bincount((keys_of(a, b) >> 16) + (_BINS // 2), minlength=_BINS)
    high_bin, above = _bin_holding(high, k)
    low = torch.zeros_like(high)
    for a, b in _chunks(start, end, chunk_numel):
        keys = keys_of(a, b)
        low += torch.bincount(keys[(keys >> 16) == high_bin - _BINS // 2] & 0xFFFF, minlength=_BINS)
    low_bin, above_low = _bin_holding(low, k - above)
    return Cut(start, end, (high_bin - _BINS // 2) * _BINS + low_bin, k - above - above_low)


def _bin_holding(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(the bin holding the k-th largest value, how many values lie in higher bins)."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=hist.device)))
    return _BINS - 1 - j, int(from_top[j - 1]) if j else 0


def _device(keys_of) -> torch.device:
    return getattr(keys_of, "device", torch.device("cpu"))


def _known(cut: Cut, a: int, b: int) -> tuple[int, int] | None:
    """(keys above the cut, keys at it) in [a, b), if find_cut counted exactly that chunk."""
    counts = getattr(cut, "counts", None)
    return counts.get((a, b)) if counts is not None else None


def _chosen(keys: torch.Tensor, key: int, ties: int, known: tuple[int, int] | None = None) -> tuple[torch.Tensor, int]:
    """Positions in `keys` (int64, increasing) of every key above `key` and of the first `ties` equal
    to it; and how many ties that took. `known`: (above, at) the key, if counted already."""
    equal = known[1] if known is not None else None
    if ties <= 0 or equal == 0:
        return torch.nonzero(keys > key).squeeze(1), 0
    if equal is not None and equal <= ties:
        return torch.nonzero(keys >= key).squeeze(1), equal
    at = torch.nonzero(keys == key).squeeze(1)
    if at.numel() <= ties:
        return torch.nonzero(keys >= key).squeeze(1), at.numel()
    stop = int(at[ties])  # the first tie not sent
    del at
    chosen = keys >= key
    torch.gt(keys[stop:], key, out=chosen[stop:])
    return torch.nonzero(chosen).squeeze(1), ties


def _how_many_chosen(keys_of, cut: Cut, a: int, b: int, ties: int) -> tuple[int, int]:
    """(how many positions of [a, b) _chosen picks, how many ties that takes), without listing them."""
    known = _known(cut, a, b)
    if known is None:
        keys = keys_of(a, b)
        above = int(torch.count_nonzero(keys > cut.key))
        known = above, int(torch.count_nonzero(keys == cut.key)) if ties > 0 else 0
    taken = min(ties, known[1]) if ties > 0 else 0
    return known[0] + taken, taken


def iter_selected(cuts: list[Cut], keys_of, chunk_numel: int) -> Iterator[torch.Tensor]:
    """Flat int64 indices of the selected positions, chunk by chunk, in increasing order."""
    for cut in cuts:
        ties = cut.ties
        for a, b in _chunks(cut.start, cut.end, chunk_numel):
            chosen, taken = _chosen(keys_of(a, b), cut.key, ties, _known(cut, a, b))
            ties -= taken
            yield chosen.add_(a)


class _Keys:
    """keys_of(a, b): the order keys of positions [a, b) of the update, in one reused chunk buffer;
    keys_of.at(positions): those of scattered positions, in a new tensor."""

    def __init__(self, update: torch.Tensor, global_: torch.Tensor, criterion: str, chunk_numel: int):
        self.update, self.global_, self.criterion = update, global_, criterion
        self.buffer = torch.empty(chunk_numel, dtype=torch.float32, device=update.device)
        self.device = update.device
        # Magnitudes are >= 0 with the sign bit clear (abs clears it, NaN's too): their float bits
        # already are their order keys. Only the increase in magnitude can be negative.
        self.signed = criterion == "largest_increase_in_magnitude"

    def __call__(self, a: int, b: int) -> torch.Tensor:
        return self._keys(scores_into(self.update[a:b], self.global_[a:b], self.criterion, self.buffer[: b - a]))

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        update = self.update[positions]
        global_ = update if self.criterion == "largest_magnitude_change" else self.global_[positions]
        return self._keys(scores_into(update, global_, self.criterion, torch.empty_like(update)))

    def _keys(self, scores: torch.Tensor) -> torch.Tensor:
        return order_keys_(scores) if self.signed else scores.view(torch.int32)


def topk_regions(
    numel: int, sparsity_level: float, segments: list[tuple[int, int]] | None, scope: str
) -> list[tuple[int, int, int]]:
    """(start, end, k) of every region a fixed k is chosen in: the model, or each tensor."""
    if scope == "model":
        return [(0, numel, max(1, math.floor(sparsity_level * numel)))]
    return [(offset, offset + size, math.ceil(sparsity_level * size)) for offset, size in segments]


def segments_from_model(model: torch.nn.Module, flat: torch.Tensor) -> list[tuple[int, int]]:
    """(offset, numel) in `flat` of every float parameter and buffer that lives in it (after flatten_model_)."""
    pointer, base = flat.untyped_storage().data_ptr(), flat.storage_offset()
    found = {
        (t.storage_offset() - base, t.numel())
        for t in list(model.parameters()) + list(model.buffers())
        if t.is_floating_point() and t.untyped_storage().data_ptr() == pointer
    }
    return sorted(found)


def _check_segments(segments: list[tuple[int, int]], numel: int) -> list[tuple[int, int]]:
    segments = sorted((int(o), int(n)) for o, n in segments)
    position = 0
    for offset, size in segments:
        if offset != position or size < 1:
            raise ValueError(f"segments must tile [0, {numel}) without gaps or overlaps; bad ({offset}, {size})")
        position += size
    if position != numel:
        raise ValueError(f"segments cover [0, {position}), the model has {numel} values")
    return segments


# --- the exchange ------------------------------------------------------------------------


class SparseExchange(ExchangeBase):
    """means(local, global_, weight): the exchange contract of exchange/base.py (see the module docstring).

    sparsity_level      fraction of values each site sends, in (0, 1] (see the module docstring for k)
    sparsity_scope      "model" (global top-k) or "tensor" (ceil(level * n_t) per tensor; needs segments)
    segments            [(offset, numel)] of the model's tensors in the flat vector (segments_from_model)
    selection_criterion largest_magnitude_change | largest_final_magnitude | largest_increase_in_magnitude
    sparse_average      "per_position" (not diluted) | "fl4health" (their per-tensor rule; give segments)
    error_feedback      keep what was not sent (or its quantization error) for the next exchange
    values              "fp32" | "int8" (block_size, scale_dtype as in Int8Exchange)
    bucket_bytes        bound of every buffer but the residual: sets the index bucket size
    world_size          defaults to the process group's
    site_weights        every site's n_i / N, by rank; given, no 8-byte gather per exchange

    After a call: `stats` (comm.bytes_per_site, comm.density, comm.wire_bytes_per_site,
    memory.exchange_peak_mb, memory.exchange_state_mb); `uses_dense`, `density`, `k`,
    `sparse_payload_bytes` (an upper bound with int8 values, exact otherwise) and
    `dense_payload_bytes` are known at construction.
    """

    # Bytes a bucket position may need at most: its score key (4), who sent it (4), this site's
    # selection (int64 index 8, value 4, code 1) and one site's received index (4 + an int64 copy 8)
    # and value (4, + 4 decoded).
    BYTES_PER_POSITION = 41

    def __init__(
        self,
        numel: int,
        *,
        sparsity_level: float,
        sparsity_scope: str = "model",
        segments: list[tuple[int, int]] | None = None,
        selection_criterion: str = "largest_magnitude_change",
        sparse_average: str = "per_position",
        error_feedback: bool = True,
        values: str = "fp32",
        block_size: int = 256,
        scale_dtype: str = "fp32",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        world_size: int | None = None,
        site_weights: list[float] | None = None,
    ):
        if not 0 < sparsity_level <= 1:
            raise ValueError(f"sparsity_level must be in (0, 1], got {sparsity_level}")
        for value, choices, what in (
            (sparsity_scope, SCOPES, "sparsity_scope"),
            (selection_criterion, CRITERIA, "selection_criterion"),
            (sparse_average, SPARSE_AVERAGES, "sparse_average"),
            (values, VALUE_FORMATS, "values"),
            (scale_dtype, SCALE_DTYPES, "scale_dtype"),
        ):
            if value not in choices:
                raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
        if sparsity_scope == "tensor" and segments is None:
            raise ValueError("sparsity_scope='tensor' needs the tensors' (offset, numel) segments")
        if numel >= 2**31:
            raise ValueError("int32 indices address at most 2**31 - 1 values")
        self.numel, self.sparsity_level, self.scope = numel, sparsity_level, sparsity_scope
        self.segments = _check_segments(segments, numel) if segments is not None else [(0, numel)]
        self.criterion, self.average, self.values = selection_criterion, sparse_average, values
        self.block_size, self.scale_dtype = block_size, SCALE_DTYPES[scale_dtype]
        self.bucket_bytes, self.device, self.dtype = bucket_bytes, torch.device(device), dtype
        self.world_size = world_size or dist.get_world_size()
        self.site_weights = SiteWeights(site_weights)
        self.bucket_numel = min(numel, max(block_size, bucket_bytes // self.BYTES_PER_POSITION))
        self.buckets = bucket_ranges(numel, self.bucket_numel)

        # What every exchange sends besides the values: sample shares, per-bucket counts, per-tensor flags.
        self.overhead_bytes = (
            self.site_weights.bytes
            + 4 * len(self.buckets)
            + (len(self.segments) if sparse_average == "fl4health" else 0)
        )
        value_bytes = 8 if values == "fp32" else 5
        if sparsity_scope == "model":  # the counts are paid out of the budget of floor(level * n) values
            k = max(1, math.floor(sparsity_level * numel) - math.ceil(self.overhead_bytes / value_bytes))
            self.regions = [(0, numel, k)]
        else:
            self.regions = topk_regions(numel, sparsity_level, self.segments, sparsity_scope)
        self.k = sum(k for _, _, k in self.regions)
        if values == "fp32":
            self.sparse_payload_bytes = self.overhead_bytes + 8 * self.k
            self.dense_payload_bytes = 4 * numel
        else:  # each bucket may start one more (partial) block of scales
            scales = (num_blocks(self.k, block_size) + len(self.buckets)) * self.scale_dtype.itemsize
            self.sparse_payload_bytes = self.overhead_bytes + 5 * self.k + scales
            self.dense_payload_bytes = int8_payload_bytes(numel, block_size, self.scale_dtype) + self.site_weights.bytes

        self._dense = None
        if self.sparse_payload_bytes >= self.dense_payload_bytes:
            if values == "fp32":
                self._dense = DenseExchange(numel, bucket_bytes, dtype, world_size=self.world_size)
            else:
                self._dense = Int8Exchange(
                    numel,
                    bucket_bytes=bucket_bytes,
                    block_size=block_size,
                    scale_dtype=scale_dtype,
                    error_feedback=error_feedback,
                    device=device,
                    dtype=dtype,
                    world_size=self.world_size,
                    site_weights=site_weights,
                )
        self.density = 1.0 if self._dense is not None else self.k / numel
        if self._dense is not None:
            self.residual = getattr(self._dense, "residual", None)
        else:
            self.residual = torch.zeros(numel, device=device, dtype=dtype) if error_feedback else None
        self.stats: dict[str, float] = {}

    @property
    def uses_dense(self) -> bool:
        """True when this configuration falls back to the dense exchange (sparse would not save bytes)."""
        return self._dense is not None

    @torch.no_grad()
    def means(self, local: torch.Tensor, global_: torch.Tensor, weight: float) -> Iterator[MeanPart]:
        """Yields the per-position mean of everyone's top-k updates, bucket by bucket; leaves local == global."""
        if self._dense is not None:
            yield from self._dense.means(local, global_, weight)
            self.stats = dict(self._dense.stats)
            return
        weights = self.site_weights(weight, local.device)
        sent = self.site_weights.bytes
        error_feedback = self.residual is not None

        # 1. The update (+ residual) into `work`; `local` becomes the accumulator of weighted sums.
        work = self.residual if error_feedback else torch.empty_like(local)
        for start, end in bucket_ranges(self.numel, self.bucket_numel):
            update = local[start:end].sub_(global_[start:end])
            work[start:end].add_(update) if error_feedback else work[start:end].copy_(update)
        local.zero_()

        # 2. The exact k-th score of every region, then how many positions each bucket sends.
        keys_of = _Keys(work, global_, self.criterion, self.bucket_numel)
        cuts = [find_cut(keys_of, s, e, k, self.bucket_numel) for s, e, k in self.regions]
        counts, flags = self._count_(keys_of, cuts, work)
        counts_all, flags_all = self._gather_counts(counts, flags, local.device)
        sent += counts.nbytes + (flags.nbytes if flags is not None else 0)

        # 3. Bucket by bucket: send, sum in rank order, divide by who sent, apply.
        if self.average == "fl4health":
            denominators = self._tensor_denominators(flags_all, weights)
        else:
            table = _mask_table(weights, local.device) if self.world_size <= _MAX_BITMASK_SITES else None
        workspace = keys_of.buffer.nbytes
        ties = [cut.ties for cut in cuts]
        for bucket, (start, end) in enumerate(self.buckets):
            own = self._select(keys_of, cuts, ties, start, end)
            sent_here, buffers, senders = self._send_and_sum_(
                local, work, own, counts_all[:, bucket], weights, start, end
            )
            sent += sent_here
            workspace = max(workspace, keys_of.buffer.nbytes + buffers)
            if self.average == "fl4health":
                _divide_by_tensor_(local, self.segments, denominators, start, end)
            elif table is not None:  # bitmask of senders -> the sum of their weights
                local[start:end].div_(table[senders.long()])
            else:
                local[start:end].div_(senders.masked_fill_(senders == 0, 1.0))
            yield MeanPart(slice(start, end), local[start:end], is_average=False)
            local[start:end].copy_(global_[start:end])
        if sent > self.sparse_payload_bytes:
            raise RuntimeError(f"sparse exchange sent {sent} bytes, planned at most {self.sparse_payload_bytes}")

        state = self.residual.nbytes if error_feedback else 0
        if not error_feedback:
            workspace += work.nbytes
        self.stats = {
            "comm.bytes_per_site": sent,
            "comm.density": self.density,
            "comm.wire_bytes_per_site": ring_wire_bytes(sent, self.world_size, "all_gather"),
            "memory.exchange_peak_mb": (workspace + state) / 2**20,
            "memory.exchange_state_mb": state / 2**20,
        }

    def _select(self, keys_of, cuts: list[Cut], ties: list[int], start: int, end: int) -> torch.Tensor:
        """This site's selected positions in [start, end), in increasing order (int64). Every key above
        its region's cut, then the region's first remaining ties; `ties` is consumed in index order."""
        parts = []
        for index, cut in enumerate(cuts):
            a, b = max(start, cut.start), min(end, cut.end)
            if a >= b:
                continue
            chosen, taken = _chosen(keys_of(a, b), cut.key, ties[index], _known(cut, a, b))
            ties[index] -= taken
            parts.append(chosen.add_(a))
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=keys_of.device)

    def _count_(self, keys_of, cuts: list[Cut], work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Selected positions per bucket (int32), and for the fl4health rule whether this site sends a
        non-zero value into each tensor (uint8). The counts come from find_cut's where it read the
        bucket as one chunk (so no key is read again), from the keys otherwise."""
        counts = [0] * len(self.buckets)
        flags = (
            torch.zeros(len(self.segments), dtype=torch.uint8, device=work.device)
            if self.average == "fl4health"
            else None
        )
        seg_starts = torch.tensor([o for o, _ in self.segments], dtype=torch.int64, device=work.device)
        ties = [cut.ties for cut in cuts]
        for bucket, (start, end) in enumerate(self.buckets):
            if flags is not None:  # which tensors get a non-zero value: the positions are needed
                chosen = self._select(keys_of, cuts, ties, start, end)
                counts[bucket] = chosen.numel()
                if chosen.numel():
                    nonzero = chosen[work[chosen] != 0]
                    flags[torch.searchsorted(seg_starts, nonzero, right=True) - 1] = 1
                continue
            for index, cut in enumerate(cuts):
                a, b = max(start, cut.start), min(end, cut.end)
                if a < b:
                    here, taken = _how_many_chosen(keys_of, cut, a, b, ties[index])
                    ties[index] -= taken
                    counts[bucket] += here
        if any(ties):
            raise RuntimeError(f"sparse selection left ties {ties} unassigned")
        return torch.tensor(counts, dtype=torch.int32, device=work.device), flags

    def _gather_counts(self, counts: torch.Tensor, flags: torch.Tensor | None, device) -> tuple:
        world = self.world_size
        counts_all = torch.empty(world, counts.numel(), dtype=counts.dtype, device=device)
        dist.all_gather(list(counts_all.unbind(0)), counts)
        if int(counts_all.sum(dim=1).min()) != int(counts_all.sum(dim=1).max()) or int(counts_all[0].sum()) != self.k:
            raise RuntimeError(f"sites selected {counts_all.sum(dim=1).tolist()} values, expected {self.k} each")
        flags_all = None
        if flags is not None:
            flags_all = torch.empty(world, flags.numel(), dtype=flags.dtype, device=device)
            dist.all_gather(list(flags_all.unbind(0)), flags)
        return counts_all.cpu(), flags_all

    def _send_and_sum_(
        self,
        local: torch.Tensor,
        work: torch.Tensor,
        own: torch.Tensor,
        counts: torch.Tensor,
        weights: list[float],
        start: int,
        end: int,
    ) -> tuple[int, int, torch.Tensor]:
        """Every site broadcasts its selection of [start, end) in turn; all add it into `local` in rank
        order (bitwise the same everywhere) and record who sent each position. Returns (bytes this
        site sent, bytes of the buffers used, who sent each position: a bitmask or a weight sum)."""
        world, device, rank = self.world_size, local.device, dist.get_rank()
        int8, error_feedback = self.values == "int8", self.residual is not None
        width = max(1, int(counts.max()))
        indices = torch.empty(width, dtype=torch.int32, device=device)
        decoded = torch.empty(width, dtype=torch.float32, device=device)
        received = torch.empty(width, dtype=torch.int8 if int8 else torch.float32, device=device)
        scales = torch.empty(num_blocks(width, self.block_size), dtype=self.scale_dtype, device=device)
        by_mask = world <= _MAX_BITMASK_SITES
        senders = torch.zeros(
            end - start if self.average == "per_position" else 0,
            dtype=torch.uint8 if by_mask else torch.float32,
            device=device,
        )

        m = own.numel()
        own_values = work[own]
        own_scales = None
        if int8 and m:
            own_scales = block_scales(own_values, self.block_size, self.scale_dtype)
            own_codes = quantize_into(
                own_values, own_scales, self.block_size, torch.empty(m, dtype=torch.int8, device=device), decoded[:m]
            )
            if error_feedback:  # keep what the others will decode differently
                work.index_put_(
                    (own,), own_values.sub_(dequantize_into(own_codes, own_scales, self.block_size, decoded[:m]))
                )
            own_values = own_codes
        elif error_feedback:
            work.index_fill_(0, own, 0.0)

        sent = 0
        for site in range(world):
            n = int(counts[site])
            if n == 0:
                continue
            site_indices, site_values = indices[:n], received[:n]
            nb = num_blocks(n, self.block_size)
            if site == rank:
                site_indices.copy_(own)
                site_values.copy_(own_values)
                if int8:
                    scales[:nb].copy_(own_scales)
            dist.broadcast(site_indices, src=site)
            dist.broadcast(site_values, src=site)
            if int8:
                dist.broadcast(scales[:nb], src=site)
                values = dequantize_into(site_values, scales[:nb], self.block_size, decoded[:n])
            else:
                values = site_values
            if site == rank:
                sent += n * (4 + (1 if int8 else 4)) + (nb * self.scale_dtype.itemsize if int8 else 0)
            positions = site_indices.long()
            local.index_add_(0, positions, values, alpha=weights[site])
            if self.average == "per_position":
                alpha = (1 << site) if by_mask else weights[site]
                senders.index_add_(
                    0, positions.sub_(start), torch.ones(n, dtype=senders.dtype, device=device), alpha=alpha
                )
        buffers = (
            indices.nbytes
            + decoded.nbytes
            + received.nbytes
            + scales.nbytes
            + senders.nbytes
            + own.nbytes
            + 4 * m
            + 12 * width
        )  # + own values, int64 positions, ones
        return sent, buffers, senders

    def _tensor_denominators(self, flags_all: torch.Tensor, weights: list[float]) -> list[float]:
        """FL4Health's rule: per tensor, the weight of every site that sent a non-zero value into it."""
        w = torch.tensor(weights, dtype=torch.float64, device=flags_all.device)
        return (flags_all.to(torch.float64) * w[:, None]).sum(0).tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per-site state (save one per site): the residual of error feedback."""
        return {} if self.residual is None else {"residual": self.residual}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_residual(self.residual, state, "sparse")


def _mask_table(weights: list[float], device) -> torch.Tensor:
    """Denominators of per-position averaging, indexed by the bitmask of the sites that sent a
    position (up to 8 sites): the sum of their weights (1 where nobody sent: the sum is 0 there)."""
    world = len(weights)
    sums = [sum(weights[i] for i in range(world) if mask >> i & 1) for mask in range(1 << world)]
    return torch.tensor([s if s > 0 else 1.0 for s in sums], dtype=torch.float32, device=device)


def _divide_by_tensor_(
    local: torch.Tensor, segments: list[tuple[int, int]], denominators: list[float], start: int, end: int
) -> None:
    for (offset, size), den in zip(segments, denominators):
        a, b = max(start, offset), min(end, offset + size)
        if a < b and den > 0:
            local[a:b].div_(den)
