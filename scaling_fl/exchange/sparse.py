"""Sparse top-k exchange: each site sends only its k most important update values.

Selection. k = max(1, floor(sparsity_level * numel)) values of the site's update u = local - global
(+ its residual), scored by `selection_criterion` (FL4Health's criteria, written on the
flat model; `final` is global + u, which is local without error feedback):
    largest_magnitude_change        |u|
    largest_final_magnitude         |final|
    largest_increase_in_magnitude   |final| - |global|
chosen over the whole model (`sparsity_scope="model"`, global top-k: never more than the
fraction asked for) or ceil(level * n_t) per tensor (`"tensor"`, every tensor sends at least
one value; needs the tensors' (offset, numel) segments). The threshold is found without a model-sized score buffer: the scores' float bits map to order-preserving
int32 keys and two passes of 65,536-bin histograms (high, then low 16 bits) give the exact
k-th largest key; a third pass streams out every position above it plus the first ties
at it, in index order, so every site sends exactly k values. (FL4Health sends every score
>= the k-th, so ties send more than k, and scores `final` on the weights it sends.)

Wire format. int32 flat indices + fp32 values (8 bytes a value), or + int8 codes with
one scale per block of values (`values="int8"`, ~5 bytes). All sites send the same k,
in the same number of fixed-size chunks, through all_gather; plus each site's sample
share (8 bytes) once per exchange, unless `site_weights` are given. `comm.bytes_per_site`
counts that payload. On the wire, a ring all_gather makes each site send (W - 1) x its
payload while a ring all_reduce sends 2 (W - 1) / W x, so at W sites sparse carries W/2 x
its payload ratio (10 %: 0.2x dense payload, 0.4x dense wire bytes at 4 sites):
`comm.wire_bytes_per_site` estimates it.

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
        here it is applied to updates so the two rules can be compared on equal terms.)
    Without segments, "the tensor" is the whole model and this rule is plain dilution,
    sum_{i sent p} n_i u_i[p] / N (every site sends some non-zero value somewhere).

Error feedback (default). What a site did not send stays in its residual (sent + residual
== update, exactly for fp32 values; with int8 values the quantization error stays too) and
is added to its next update. The residual is per-site state: `state_dict()`.

Fallback. If sending k sparse values would cost at least as many bytes as the dense
exchange of the same value format, the dense one runs instead: fp32 above density 0.5
(8 vs 4 bytes a value), int8 values above ~0.2 (5 + 4/256 vs 1 + 4/256 bytes).

Memory. The update is built in the residual (error feedback) or one model-sized fp32
buffer (without); `local` is scratch until the end and accumulates the weighted sums.
Per-position averaging also records who sent each position: one byte a value for up to
8 sites (a bitmask, 1/4 of the model), else 4 (a weight sum); this is the one buffer beyond
"one model-sized buffer plus one bucket", the price of not diluting (the fl4health rule needs
only a flag per site and tensor). All other temporaries are chunks within `bucket_bytes`.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

from scaling_fl.exchange.dense import DenseExchange, bucket_ranges, load_residual, ring_wire_bytes
from scaling_fl.exchange.quantize import (
    DEFAULT_BUCKET_BYTES, SCALE_DTYPES, Int8Exchange, SiteWeights, block_scales, dequantize_into, int8_payload_bytes,
    num_blocks, quantize_into,
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
    return bits.bitwise_xor_((bits >> 31) & 0x7FFFFFFF)  # negatives: reverse the magnitude order


class Cut(NamedTuple):
    """Positions [start, end) to send: every key above `key`, then the first `ties` positions equal to it."""
    start: int
    end: int
    key: int
    ties: int


def _chunks(start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    for a in range(start, end, size):
        yield a, min(a + size, end)


def find_cut(keys_of, start: int, end: int, k: int, chunk_numel: int) -> Cut:
    """The exact k-th largest key of [start, end), in at most two streaming passes."""
    n = end - start
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    if n <= min(chunk_numel, _BINS):  # small: sort it
        keys = keys_of(start, end)
        key = int(torch.sort(keys, descending=True).values[k - 1])
        return Cut(start, end, key, k - int((keys > key).sum()))
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


def iter_selected(cuts: list[Cut], keys_of, chunk_numel: int) -> Iterator[torch.Tensor]:
    """Flat int64 indices of the selected positions, chunk by chunk, in increasing order."""
    for cut in cuts:
        ties = cut.ties
        for a, b in _chunks(cut.start, cut.end, chunk_numel):
            keys = keys_of(a, b)
            chosen = keys > cut.key
            if ties > 0:
                equal = torch.nonzero(keys == cut.key).squeeze(1)[:ties]
                chosen[equal] = True
                ties -= equal.numel()
            yield torch.nonzero(chosen).squeeze(1).add_(a)


class _Keys:
    """keys_of(a, b): the order keys of positions [a, b) of the update, in one reused chunk buffer."""

    def __init__(self, update: torch.Tensor, global_: torch.Tensor, criterion: str, chunk_numel: int):
        self.update, self.global_, self.criterion = update, global_, criterion
        self.buffer = torch.empty(chunk_numel, dtype=torch.float32, device=update.device)
        self.device = update.device

    def __call__(self, a: int, b: int) -> torch.Tensor:
        out = self.buffer[: b - a]
        return order_keys_(scores_into(self.update[a:b], self.global_[a:b], self.criterion, out))


def topk_regions(numel: int, sparsity_level: float, segments: list[tuple[int, int]] | None,
                 scope: str) -> list[tuple[int, int, int]]:
    """(start, end, k) of every region a fixed k is chosen in: the model, or each tensor."""
    if scope == "model":
        return [(0, numel, max(1, math.floor(sparsity_level * numel)))]
    return [(offset, offset + size, math.ceil(sparsity_level * size)) for offset, size in segments]


def select_topk(update: torch.Tensor, global_: torch.Tensor, sparsity_level: float, *,
                criterion: str = "largest_magnitude_change", segments: list[tuple[int, int]] | None = None,
                scope: str = "model", chunk_numel: int = 1 << 20) -> torch.Tensor:
    """All selected flat indices at once (for tests and diagnostics; the exchange streams them)."""
    keys_of = _Keys(update, global_, criterion, chunk_numel)
    cuts = [find_cut(keys_of, s, e, k, chunk_numel)
            for s, e, k in topk_regions(update.numel(), sparsity_level, segments, scope)]
    return torch.cat(list(iter_selected(cuts, keys_of, chunk_numel)))


def segments_from_model(model: torch.nn.Module, flat: torch.Tensor) -> list[tuple[int, int]]:
    """(offset, numel) in `flat` of every float parameter and buffer that lives in it (after flatten_model_)."""
    pointer, base = flat.untyped_storage().data_ptr(), flat.storage_offset()
    found = {(t.storage_offset() - base, t.numel())
             for t in list(model.parameters()) + list(model.buffers())
             if t.is_floating_point() and t.untyped_storage().data_ptr() == pointer}
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

class SparseExchange:
    """exchange_(local, global_, weight, strategy) -> payload bytes this site sent (see the module docstring).

    sparsity_level      fraction of values each site sends, in (0, 1]; k = max(1, floor(level * n))
    sparsity_scope      "model" (global top-k) or "tensor" (ceil(level * n_t) per tensor; needs segments)
    segments            [(offset, numel)] of the model's tensors in the flat vector (segments_from_model)
    selection_criterion largest_magnitude_change | largest_final_magnitude | largest_increase_in_magnitude
    sparse_average      "per_position" (not diluted) | "fl4health" (their per-tensor rule; give segments)
    error_feedback      keep what was not sent (or its quantization error) for the next exchange
    values              "fp32" | "int8" (block_size, scale_dtype as in Int8Exchange)
    bucket_bytes        bound of the temporaries (not counting the residual and who-sent-what)
    world_size          defaults to the process group's
    site_weights        every site's n_i / N, by rank; given, no 8-byte gather per exchange

    After a call: `stats` (comm.bytes_per_site, comm.density, comm.wire_bytes_per_site,
    memory.exchange_peak_mb, memory.exchange_state_mb); `uses_dense`, `density`, `k`,
    `sparse_payload_bytes`, `dense_payload_bytes` are known at construction.
    """

    def __init__(self, numel: int, *, sparsity_level: float, sparsity_scope: str = "model",
                 segments: list[tuple[int, int]] | None = None,
                 selection_criterion: str = "largest_magnitude_change", sparse_average: str = "per_position",
                 error_feedback: bool = True, values: str = "fp32", block_size: int = 256, scale_dtype: str = "fp32",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, world_size: int | None = None,
                 site_weights: list[float] | None = None):
        if not 0 < sparsity_level <= 1:
            raise ValueError(f"sparsity_level must be in (0, 1], got {sparsity_level}")
        for value, choices, what in ((sparsity_scope, SCOPES, "sparsity_scope"),
                                     (selection_criterion, CRITERIA, "selection_criterion"),
                                     (sparse_average, SPARSE_AVERAGES, "sparse_average"),
                                     (values, VALUE_FORMATS, "values"), (scale_dtype, SCALE_DTYPES, "scale_dtype")):
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
        self.regions = topk_regions(numel, sparsity_level, self.segments, sparsity_scope)
        self.k = sum(k for _, _, k in self.regions)

        # Chunk sizes, so that each phase's temporaries stay within bucket_bytes. While streaming,
        # the score chunk and its temporaries (<= ~24 bytes a value) take half, the send chunk
        # the other half: per entry its int64 + int32 index, value, decoded value, and everyone's
        # index + value twice (the collective flattens the gathered list into one more buffer).
        self.score_numel = max(1024, bucket_bytes // 48)
        value_bytes = 4 if values == "fp32" else 1
        per_entry = 8 + 4 + 4 + 4 + 2 * self.world_size * (4 + value_bytes)
        chunk = max(1, bucket_bytes // 2 // per_entry)
        if values == "int8":
            chunk = max(block_size, chunk // block_size * block_size)
        self.send_chunk = min(chunk, self.k)
        self.final_numel = max(1, bucket_bytes // 12)  # dividing by the senders' weight: int64 + fp32 a value
        self.sparse_payload_bytes = self.site_weights.bytes + sum(self._chunk_bytes(m) for m in self._chunk_sizes())

        # The dense exchange of the same value format, and what it would cost.
        if values == "fp32":
            self.dense_payload_bytes = 4 * numel
        else:
            self.dense_payload_bytes = int8_payload_bytes(numel, block_size, self.scale_dtype) + self.site_weights.bytes
        self._dense = None
        if self.sparse_payload_bytes >= self.dense_payload_bytes:
            if values == "fp32":
                self._dense = DenseExchange(numel, bucket_bytes, dtype, world_size=self.world_size)
            else:
                self._dense = Int8Exchange(numel, bucket_bytes=bucket_bytes, block_size=block_size,
                                           scale_dtype=scale_dtype, error_feedback=error_feedback, device=device,
                                           dtype=dtype, world_size=self.world_size, site_weights=site_weights)
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

    def _chunk_sizes(self) -> list[int]:
        full, rest = divmod(self.k, self.send_chunk)
        return [self.send_chunk] * full + ([rest] if rest else [])

    def _chunk_bytes(self, m: int) -> int:
        if self.values == "fp32":
            return 8 * m
        return 5 * m + num_blocks(m, self.block_size) * self.scale_dtype.itemsize

    @torch.no_grad()
    def exchange_(self, local: torch.Tensor, global_: torch.Tensor, weight: float, strategy) -> int:
        """Applies the per-position mean of everyone's top-k updates; leaves local == global. Returns bytes sent."""
        if self._dense is not None:
            sent = self._dense.exchange_(local, global_, weight, strategy)
            self.stats = dict(self._dense.stats)
            return sent
        weights = self.site_weights(weight, local.device)
        error_feedback = self.residual is not None

        # 1. The update (+ residual) into `work`; `local` becomes the accumulator of weighted sums.
        work = self.residual if error_feedback else torch.empty_like(local)
        for start, end in bucket_ranges(self.numel, max(1, self.bucket_bytes // 4)):
            update = local[start:end].sub_(global_[start:end])
            work[start:end].add_(update) if error_feedback else work[start:end].copy_(update)
        local.zero_()

        # 2-3. Select, send, and add everyone's values into `local`; learn who sent what.
        senders, sent, stream_bytes = self._send_and_sum_(local, global_, work, weights)
        if not error_feedback:
            del work

        # 4. Weighted sums -> means -> the strategy, bucket by bucket from the start.
        self._divide_by_senders_(local, senders, weights)
        senders_bytes = senders.nbytes
        del senders
        for start, end in bucket_ranges(self.numel, max(1, self.bucket_bytes // 4)):
            strategy.apply_update_(global_[start:end], local[start:end], slice(start, end))
            local[start:end].copy_(global_[start:end])

        state = self.residual.nbytes if error_feedback else 0
        workspace = (senders_bytes + (0 if error_feedback else local.nbytes)
                     + max(stream_bytes, 12 * min(self.final_numel, self.numel)))
        self.stats = {"comm.bytes_per_site": sent, "comm.density": self.density,
                      "comm.wire_bytes_per_site": ring_wire_bytes(sent, self.world_size, "all_gather"),
                      "memory.exchange_peak_mb": (workspace + state) / 2**20,
                      "memory.exchange_state_mb": state / 2**20}
        return sent

    def _send_and_sum_(self, local: torch.Tensor, global_: torch.Tensor, work: torch.Tensor,
                       weights: list[float]) -> tuple[torch.Tensor, int, int]:
        """Streams the selection out in fixed-size chunks; every site adds every site's chunk into `local`.

        Returns (who sent what: a per-position bitmask / weight sum, or per-tensor flags; bytes
        sent; bytes of the buffers held while streaming). Its buffers are freed on return.
        """
        world, device, error_feedback = self.world_size, local.device, self.residual is not None
        keys_of = _Keys(work, global_, self.criterion, self.score_numel)
        cuts = [find_cut(keys_of, s, e, k, self.score_numel) for s, e, k in self.regions]

        c, int8 = self.send_chunk, self.values == "int8"
        indices_all = torch.empty(world, c, dtype=torch.int32, device=device)
        if int8:
            codes_all = torch.empty(world, c, dtype=torch.int8, device=device)
            scales_all = torch.empty(world, num_blocks(c, self.block_size), dtype=self.scale_dtype, device=device)
            own_codes = torch.empty(c, dtype=torch.int8, device=device)
            buffers = [indices_all, codes_all, scales_all, own_codes]
        else:
            values_all = torch.empty(world, c, dtype=torch.float32, device=device)
            buffers = [indices_all, values_all]
        decoded = torch.empty(c, dtype=torch.float32, device=device)
        ones = torch.ones(c, dtype=torch.uint8 if world <= _MAX_BITMASK_SITES else torch.float32, device=device)
        if self.average == "per_position":
            senders = torch.zeros(self.numel, dtype=ones.dtype, device=device)
        else:
            seg_starts = torch.tensor([o for o, _ in self.segments], dtype=torch.int64, device=device)
            senders = torch.zeros(world, len(self.segments), dtype=torch.bool, device=device)
        sent = self.site_weights.bytes

        def send(index: torch.Tensor) -> None:
            nonlocal sent
            m = index.numel()
            values = work[index]
            if int8:
                scales = block_scales(values, self.block_size, self.scale_dtype)
                codes = quantize_into(values, scales, self.block_size, own_codes[:m], decoded[:m])
                if error_feedback:  # keep what the others will not decode
                    work.index_put_((index,), values.sub_(dequantize_into(codes, scales, self.block_size,
                                                                          decoded[:m])))
                nb = scales.numel()
                dist.all_gather([codes_all[i, :m] for i in range(world)], codes)
                dist.all_gather([scales_all[i, :nb] for i in range(world)], scales)
            else:
                if error_feedback:
                    work.index_fill_(0, index, 0.0)
                dist.all_gather([values_all[i, :m] for i in range(world)], values)
            dist.all_gather([indices_all[i, :m] for i in range(world)], index.to(torch.int32))
            sent += self._chunk_bytes(m)
            for site in range(world):  # rank order: every site adds bitwise the same
                site_index = indices_all[site, :m]
                if int8:
                    site_values = dequantize_into(codes_all[site, :m], scales_all[site, :nb], self.block_size,
                                                  decoded[:m])
                else:
                    site_values = values_all[site, :m]
                local.index_add_(0, site_index, site_values, alpha=weights[site])
                if self.average == "per_position":
                    alpha = (1 << site) if world <= _MAX_BITMASK_SITES else weights[site]
                    senders.index_add_(0, site_index, ones[:m], alpha=alpha)
                else:  # FL4Health counts a site in a tensor when it sent a non-zero value there
                    nonzero = site_index[site_values != 0].long()
                    senders[site, torch.searchsorted(seg_starts, nonzero, right=True) - 1] = True

        pending, count, emitted = [], 0, 0
        for chosen in iter_selected(cuts, keys_of, self.score_numel):
            pending.append(chosen)
            count += chosen.numel()
            while count >= c:
                joined = torch.cat(pending)
                send(joined[:c])
                emitted += c
                pending, count = [joined[c:]], count - c
        if count:
            send(torch.cat(pending))
            emitted += count
        if emitted != self.k or sent != self.sparse_payload_bytes:
            raise RuntimeError(f"sparse exchange sent {emitted} values / {sent} bytes, planned {self.k} / "
                               f"{self.sparse_payload_bytes}")
        gathered = indices_all.nbytes + (codes_all.nbytes + scales_all.nbytes if int8 else values_all.nbytes)
        stream_bytes = (sum(b.nbytes for b in buffers) + gathered + decoded.nbytes + ones.nbytes
                        + 12 * c + 6 * keys_of.buffer.nbytes)  # + index copies, score-chunk temporaries
        return senders, sent, stream_bytes

    def _divide_by_senders_(self, local: torch.Tensor, senders: torch.Tensor, weights: list[float]) -> None:
        """local <- weighted sums / the weight of the sites each position is averaged over."""
        world = self.world_size
        if self.average == "fl4health":
            per_tensor = (senders.to(torch.float64) * torch.tensor(weights, dtype=torch.float64,
                                                                   device=local.device)[:, None]).sum(0).tolist()
            for (offset, size), den in zip(self.segments, per_tensor):
                if den > 0:
                    local[offset:offset + size].div_(den)
            return
        if world <= _MAX_BITMASK_SITES:  # bitmask -> weight sum through a 2**W table
            sums = [sum(weights[i] for i in range(world) if mask >> i & 1) for mask in range(1 << world)]
            table = torch.tensor([s if s > 0 else 1.0 for s in sums], dtype=torch.float32, device=local.device)
        for start, end in bucket_ranges(self.numel, self.final_numel):
            if world <= _MAX_BITMASK_SITES:
                local[start:end].div_(table.index_select(0, senders[start:end].long()))
            else:
                den = senders[start:end]
                den[den == 0] = 1.0
                local[start:end].div_(den)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per-site state (save one per site): the residual of error feedback."""
        return {} if self.residual is None else {"residual": self.residual}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_residual(self.residual, state, "sparse")
