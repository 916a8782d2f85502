"""The exchange of workers that host several sites (or only a sampled fraction of the sites).

Each participating site's update is encoded exactly as if that site sent it alone: its own top-k
selection over its own update plus its own error-feedback residual, its own int8 scales, the same
buckets and the same byte count as the one-site-per-process exchanges (dense.py, quantize.py,
sparse.py), whose selection and quantization functions it calls. The worker decodes each site's
message at once and adds it, weighted by the site's share of the round's rows, into sums of the
model's size; `means` all_reduces the workers' sums and yields the mean, bucket by bucket, to the
round loop, which applies the strategy (exchange/base.py). So `comm.bytes_per_site` keeps
meaning what one site would put on the wire, and packing changes only the order of fp32 sums.

What the worker processes actually exchange among themselves: dense fp32 sums, one all_reduce per
bucket of the numerator (4 bytes a value) and, for sparse per-position averaging, one more of the
denominator (who sent each position, weighted): `comm.worker_bytes` reports it. Decoding before
the collective is what makes that possible; it costs one model-sized accumulator (two for sparse
per-position averaging) in every worker, not one per site.

Per-site state (error-feedback residuals) is not held here: the round loop checks each site's
residual out of its SiteStates before `add_site_` and back in after.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from scaling_fl.exchange.base import MeanPart
from scaling_fl.exchange.dense import bucket_ranges, ring_wire_bytes
from scaling_fl.exchange.quantize import (
    SCALE_DTYPES,
    block_scales,
    dequantize_into,
    int8_payload_bytes,
    num_blocks,
    quantize_into,
)
from scaling_fl.exchange.sparse import SparseExchange, _Keys, find_cut


class PackedExchange:
    """add_site_(local, global_, weight, residual) per participating site, then the round loop applies
    the strategy to every part of means(global_), as with any exchange (exchange/base.py).

    `weight` is the site's share of the rows of the round's participants (they sum to 1 over all
    workers). Construct once per worker; `state_shapes` is the per-site state a site needs (none when the
    configuration keeps none).
    """

    def __init__(
        self,
        name: str,
        numel: int,
        *,
        bucket_bytes: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        sparsity_level: float = 0.1,
        sparsity_scope: str = "model",
        segments: list[tuple[int, int]] | None = None,
        selection_criterion: str = "largest_magnitude_change",
        sparse_average: str = "per_position",
        error_feedback: bool = True,
        block_size: int = 256,
        scale_dtype: str = "fp32",
    ):
        self.numel, self.device, self.block_size = numel, torch.device(device), block_size
        self.bucket_numel = max(1, min(numel, bucket_bytes // torch.empty((), dtype=dtype).element_size()))
        self.sparse = None
        self.codec = name if name in ("dense", "int8") else "sparse"
        if name in ("sparse", "sparse_int8"):
            # One site alone with its weight given: the same k, buckets and fallback as a site in its own process.
            self.sparse = SparseExchange(
                numel,
                sparsity_level=sparsity_level,
                sparsity_scope=sparsity_scope,
                segments=segments,
                selection_criterion=selection_criterion,
                sparse_average=sparse_average,
                error_feedback=error_feedback,
                values="int8" if name == "sparse_int8" else "fp32",
                block_size=block_size,
                scale_dtype=scale_dtype,
                bucket_bytes=bucket_bytes,
                device="meta",
                dtype=dtype,
                world_size=1,
                site_weights=[1.0],
            )
            if self.sparse.uses_dense:  # sending k sparse values would cost more than every value
                self.codec = "int8" if name == "sparse_int8" else "dense"
        self.scale_dtype = SCALE_DTYPES[scale_dtype]
        self.error_feedback = error_feedback and self.codec != "dense"
        self.density = self.sparse.density if self.codec == "sparse" else 1.0
        self.numerator = torch.zeros(numel, dtype=dtype, device=self.device)
        self.per_position = self.codec == "sparse" and sparse_average == "per_position"
        self.fl4health = self.codec == "sparse" and sparse_average == "fl4health"
        self.denominator = torch.zeros(numel, dtype=dtype, device=self.device) if self.per_position else None
        self.tensor_weights = (
            torch.zeros(len(self.sparse.segments), dtype=torch.float64, device=self.device) if self.fl4health else None
        )
        self.site_bytes = 0
        self.stats: dict[str, float] = {}

    @property
    def state_shapes(self) -> dict[str, int]:
        """The per-site state a site needs checked out while it is encoded: {name: numel}."""
        return {"residual": self.numel} if self.error_feedback else {}

    def round_buffers(self) -> list[torch.Tensor]:
        """The model-sized sums this exchange keeps over a round (round_buffers_offload moves them out
        while a site trains)."""
        return [buffer for buffer in (self.numerator, self.denominator) if buffer is not None]

    def idle_stats(self) -> dict[str, float]:
        """The figures of a round without synchronization (sync=periodic / dynamic): nothing sent."""
        return {
            "comm.bytes_per_site": 0,
            "comm.density": self.density,
            "comm.wire_bytes_per_site": 0,
            "comm.worker_bytes": 0,
            "comm.worker_wire_bytes": 0,
            "memory.exchange_peak_mb": 0.0,
        }

    # --- one site -------------------------------------------------------------------------

    @torch.no_grad()
    def add_site_(
        self,
        local: torch.Tensor,
        global_: torch.Tensor,
        weight: float,
        site: int | None = None,
        residual: torch.Tensor | None = None,
    ) -> int:
        """Encodes this site's update, adds its decoded message x weight; `local` is scratch afterwards.
        Returns the bytes this site would put on the wire. (`site` is not needed: sums do not depend on
        who sent; the gathered exchange of robust aggregation takes the same arguments and needs it.)"""
        if self.codec == "dense":  # weights on models (as dense.py): sum_i w_i local_i = global + mean update
            self.numerator.add_(local, alpha=weight)
            sent = self.numel * local.element_size()
        else:  # the update is built in the residual (error feedback) or in `local`, as one site alone does
            update = local.sub_(global_)
            if residual is not None:
                update = residual.add_(update)
            if self.codec == "int8":
                sent = self._add_int8_(update, weight, keep_error=residual is not None)
            else:
                sent = self._add_sparse_(update, global_, weight, keep_error=residual is not None)
        self.site_bytes = sent
        return sent

    def _add_int8_(self, update: torch.Tensor, weight: float, keep_error: bool) -> int:
        work = torch.empty(min(self.bucket_numel, self.numel), dtype=torch.float32, device=update.device)
        codes = torch.empty(work.numel(), dtype=torch.int8, device=update.device)
        for start, end in bucket_ranges(self.numel, _aligned(self.bucket_numel, self.block_size)):
            n, part = end - start, update[start:end]
            scales = block_scales(part, self.block_size, self.scale_dtype)
            quantize_into(part, scales, self.block_size, codes[:n], work[:n])
            decoded = dequantize_into(codes[:n], scales, self.block_size, work[:n])
            self.numerator[start:end].add_(decoded, alpha=weight)
            if keep_error:  # what the others would decode is q * s; the residual keeps the rest
                part.sub_(decoded)
        return int8_payload_bytes(self.numel, self.block_size, self.scale_dtype)

    def _add_sparse_(self, update: torch.Tensor, global_: torch.Tensor, weight: float, keep_error: bool) -> int:
        sx, int8 = self.sparse, self.sparse.values == "int8"
        keys_of = _Keys(update, global_, sx.criterion, sx.bucket_numel)
        cuts = [find_cut(keys_of, s, e, k, sx.bucket_numel) for s, e, k in sx.regions]
        counts, flags = sx._count_(keys_of, cuts, update)
        if int(counts.sum()) != sx.k:
            raise RuntimeError(f"sparse selection chose {int(counts.sum())} values, expected {sx.k}")
        sent = sx.overhead_bytes
        if flags is not None:
            self.tensor_weights.add_(flags.to(self.tensor_weights), alpha=weight)
        ties = [cut.ties for cut in cuts]
        for start, end in sx.buckets:
            own = sx._select(keys_of, cuts, ties, start, end)
            m = own.numel()
            if m == 0:
                continue
            values = update[own]  # a copy
            if int8:
                scales = block_scales(values, self.block_size, sx.scale_dtype)
                work = torch.empty_like(values)
                codes = torch.empty(m, dtype=torch.int8, device=work.device)
                quantize_into(values, scales, self.block_size, codes, work)
                decoded = dequantize_into(codes, scales, self.block_size, work)
                sent += m * 5 + num_blocks(m, self.block_size) * sx.scale_dtype.itemsize
            else:
                decoded = values
                sent += m * 8
            self.numerator.index_add_(0, own, decoded, alpha=weight)
            if self.per_position:
                self.denominator.index_add_(0, own, torch.full_like(decoded, weight))
            if keep_error:  # sent + residual == update (int8: the quantization error stays)
                if int8:
                    update.index_put_((own,), values.sub_(decoded))
                else:
                    update.index_fill_(0, own, 0.0)
        return sent

    # --- all sites ----------------------------------------------------------------------------

    @torch.no_grad()
    def means(self, global_: torch.Tensor) -> Iterator[MeanPart]:
        """All workers: the participants' mean, bucket by bucket, for the round loop to apply the
        strategy to (exchange/base.py). Then resets the sums and sets `stats`."""
        world = dist.get_world_size()
        sums = [self.numerator] + ([self.denominator] if self.per_position else [])
        if self.fl4health:
            dist.all_reduce(self.tensor_weights, op=dist.ReduceOp.SUM)
        pending = [  # asynchronous, in bucket order: bucket b is applied while b + 1 is still on the wire
            (start, end, [dist.all_reduce(b[start:end], op=dist.ReduceOp.SUM, async_op=True) for b in sums])
            for start, end in bucket_ranges(self.numel, self.bucket_numel)
        ]
        for start, end, works in pending:
            for work in works:
                work.wait()
            total = self.numerator[start:end]
            if self.per_position:  # each position: the weighted mean over the sites that sent it
                senders = self.denominator[start:end]
                total.div_(senders.masked_fill_(senders == 0, 1.0))
            elif self.fl4health:
                _divide_by_tensor_(total, self.sparse.segments, self.tensor_weights.tolist(), start, end)
            # dense: a sum of weights (sum_i w_i local_i, the average model); others: of updates
            yield MeanPart(slice(start, end), total, is_average=self.codec == "dense")
        worker_bytes = sum(buffer.nbytes for buffer in sums)
        self.stats = {
            "comm.bytes_per_site": self.site_bytes,
            "comm.density": self.density,
            "comm.wire_bytes_per_site": ring_wire_bytes(
                self.site_bytes, world, "all_reduce" if self.codec == "dense" else "all_gather"
            ),
            "comm.worker_bytes": worker_bytes,
            "comm.worker_wire_bytes": ring_wire_bytes(worker_bytes, world, "all_reduce"),
            "memory.exchange_peak_mb": worker_bytes / 2**20,
        }
        for buffer in sums:
            buffer.zero_()
        if self.tensor_weights is not None:
            self.tensor_weights.zero_()


def _aligned(bucket_numel: int, block_size: int) -> int:
    """Buckets made of whole int8 blocks, so the blocks (and scales) are those of one site sending alone."""
    return max(block_size, bucket_numel // block_size * block_size)


def _divide_by_tensor_(
    total: torch.Tensor, segments: list[tuple[int, int]], denominators: list[float], start: int, end: int
) -> None:
    for (offset, size), den in zip(segments, denominators):
        a, b = max(start, offset), min(end, offset + size)
        if a < b and den > 0:
            total[a - start : b - start].div_(den)
