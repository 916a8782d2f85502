"""Time and extra memory of one site's exact top-k selection, old (histograms) vs new (sampled bracket).

The selection of SparseExchange on a MiniLM-size update (22.7M fp32 values), as one exchange runs it:
find_cut of every region, _count_ (the values each bucket sends) and _select of every bucket (the
indices sent). "old" is the selection before issue 12, kept here as a reference: two streaming
passes of 65,536-bin histograms (torch.bincount over every key) for the k-th key, then the count and
select passes listing every chosen position. "new" is scaling_fl.exchange.sparse as it is now. Both
must agree exactly (same k-th key and ties, same counts, the same indices bucket by bucket); the
bench fails otherwise.

Updates (fixed seeds):
  normal      N(0, 1e-3) everywhere: no ties
  realistic   a fine-tuning round's shape: 70 % of the word-embedding rows (30,522 x 384) untouched
              (exact zeros), per-tensor scales 10^U(-1, 1), values rounded to bf16 (many ties)
  zeros       every value 0 (the k-th is a tie shared by the whole model)

Time: median (and min) of --repeats runs each, old and new in turn, in this process, with torch's
default thread count (or --threads).
Extra peak memory: the rise of peak RSS (VmHWM, reset through /proc/self/clear_refs) over one
selection, in a fresh process per method with MALLOC_MMAP_THRESHOLD_=65536, so every freed buffer
above 64 KiB goes back to the OS and cannot hide a later one.

    .venv/bin/python bench/topk.py                      # all updates, 10 % and 1 %
    .venv/bin/python bench/topk.py --updates normal --levels 0.1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.peak_memory import reset_peak, rss_mb  # noqa: E402
from scaling_fl.exchange.sparse import Cut, SparseExchange, _Keys, find_cut, scores_into  # noqa: E402

NUMEL = 22_700_000  # MiniLM-size (BERT, 6 layers, hidden 384: 22.7M fp32 values)
EMBEDDING_ROWS, HIDDEN = 30_522, 384
UPDATES = ("normal", "realistic", "zeros")
METHODS = ("old", "new")

# --- the old selection (before issue 12), kept as the reference -------------------------------------

_BINS = 1 << 16


def old_order_keys_(scores: torch.Tensor) -> torch.Tensor:
    bits = scores.view(torch.int32)
    return bits.bitwise_xor_((bits >> 31) & 0x7FFFFFFF)


class OldKeys:
    def __init__(self, update: torch.Tensor, global_: torch.Tensor, criterion: str, chunk_numel: int):
        self.update, self.global_, self.criterion = update, global_, criterion
        self.buffer = torch.empty(chunk_numel, dtype=torch.float32, device=update.device)
        self.device = update.device

    def __call__(self, a: int, b: int) -> torch.Tensor:
        out = self.buffer[: b - a]
        return old_order_keys_(scores_into(self.update[a:b], self.global_[a:b], self.criterion, out))


def _old_chunks(start: int, end: int, size: int):
    for a in range(start, end, size):
        yield a, min(a + size, end)


def _old_bin_holding(hist: torch.Tensor, k: int) -> tuple[int, int]:
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=hist.device)))
    return _BINS - 1 - j, int(from_top[j - 1]) if j else 0


def old_find_cut(keys_of, start: int, end: int, k: int, chunk_numel: int) -> Cut:
    n = end - start
    if n <= min(chunk_numel, _BINS):
        keys = keys_of(start, end)
        key = int(torch.sort(keys, descending=True).values[k - 1])
        return Cut(start, end, key, k - int((keys > key).sum()))
    high = torch.zeros(_BINS, dtype=torch.int64)
    for a, b in _old_chunks(start, end, chunk_numel):
        high += torch.bincount((keys_of(a, b) >> 16) + (_BINS // 2), minlength=_BINS)
    high_bin, above = _old_bin_holding(high, k)
    low = torch.zeros_like(high)
    for a, b in _old_chunks(start, end, chunk_numel):
        keys = keys_of(a, b)
        low += torch.bincount(keys[(keys >> 16) == high_bin - _BINS // 2] & 0xFFFF, minlength=_BINS)
    low_bin, above_low = _old_bin_holding(low, k - above)
    return Cut(start, end, (high_bin - _BINS // 2) * _BINS + low_bin, k - above - above_low)


def old_select(keys_of, cuts: list[Cut], ties: list[int], start: int, end: int) -> torch.Tensor:
    parts = []
    for index, cut in enumerate(cuts):
        a, b = max(start, cut.start), min(end, cut.end)
        if a >= b:
            continue
        keys = keys_of(a, b)
        chosen = keys > cut.key
        if ties[index] > 0:
            equal = torch.nonzero(keys == cut.key).squeeze(1)[: ties[index]]
            chosen[equal] = True
            ties[index] -= equal.numel()
        parts.append(torch.nonzero(chosen).squeeze(1).add_(a))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def old_count(ex: SparseExchange, keys_of, cuts: list[Cut]) -> torch.Tensor:
    counts = torch.zeros(len(ex.buckets), dtype=torch.int32)
    ties = [cut.ties for cut in cuts]
    for bucket, (start, end) in enumerate(ex.buckets):
        counts[bucket] = old_select(keys_of, cuts, ties, start, end).numel()
    return counts


# --- the bench -------------------------------------------------------------------------------------


def make_update(kind: str, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(12)
    if kind == "zeros":
        return torch.zeros(numel)
    update = torch.randn(numel, generator=g).mul_(1e-3)
    if kind == "normal":
        return update
    rows = min(EMBEDDING_ROWS, numel // HIDDEN)
    untouched = torch.rand(rows, generator=g) < 0.7
    update[: rows * HIDDEN].view(rows, HIDDEN)[untouched] = 0.0
    tensor = 147_456  # a 384 x 384 matrix
    scales = torch.pow(10.0, torch.rand(math.ceil(numel / tensor), generator=g) * 2 - 1)
    update.mul_(scales.repeat_interleave(tensor)[:numel])
    return update.bfloat16().float()


def select(method: str, ex: SparseExchange, update: torch.Tensor, global_: torch.Tensor, keep: bool):
    """One site's selection, as exchange_ runs it. Returns (cuts, counts, [indices of each bucket] if keep)."""
    if method == "old":
        keys_of = OldKeys(update, global_, ex.criterion, ex.bucket_numel)
        cuts = [old_find_cut(keys_of, s, e, k, ex.bucket_numel) for s, e, k in ex.regions]
        counts = old_count(ex, keys_of, cuts)
        pick = old_select
    else:
        keys_of = _Keys(update, global_, ex.criterion, ex.bucket_numel)
        cuts = [find_cut(keys_of, s, e, k, ex.bucket_numel) for s, e, k in ex.regions]
        counts, _ = ex._count_(keys_of, cuts, update)
        pick = ex._select
    ties = [cut.ties for cut in cuts]
    chosen = []
    for start, end in ex.buckets:
        own = pick(keys_of, cuts, ties, start, end)
        if keep:
            chosen.append(own)
    return cuts, counts, chosen


def exchange_for(numel: int, level: float, bucket_mb: float) -> SparseExchange:
    return SparseExchange(numel, sparsity_level=level, bucket_bytes=int(bucket_mb * 2**20), world_size=4)


def peak_mb(method: str, kind: str, level: float, numel: int, bucket_mb: float) -> float:
    """Extra peak RSS of one selection, in this (fresh) process."""
    update = make_update(kind, numel)
    global_ = torch.zeros(numel)
    ex = exchange_for(numel, level, bucket_mb)
    select(method, ex, update, global_, keep=False)  # warm up: torch's first calls allocate for good
    before = rss_mb("VmRSS")
    reset_peak()
    select(method, ex, update, global_, keep=False)
    return rss_mb("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=NUMEL)
    parser.add_argument("--updates", nargs="*", default=list(UPDATES), choices=UPDATES)
    parser.add_argument("--levels", nargs="*", type=float, default=[0.1, 0.01])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--peak", nargs=3, metavar=("METHOD", "UPDATE", "LEVEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak:
        method, kind, level = args.peak
        print(json.dumps(peak_mb(method, kind, float(level), args.numel, args.bucket_mb)))
        return

    print(
        f"machine: {_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {platform.python_version()}; {args.numel / 1e6:.1f}M fp32 values, bucket "
        f"{args.bucket_mb:g} MiB, time = median (min) of {args.repeats}, load average before: {_load()}"
    )
    print("| update | level | k | old (s) | new (s) | speed-up | old extra peak (MiB) | new extra peak (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    global_ = torch.zeros(args.numel)
    for kind in args.updates:
        update = make_update(kind, args.numel)
        for level in args.levels:
            ex = exchange_for(args.numel, level, args.bucket_mb)
            row = {"update": kind, "level": level, "k": ex.k}
            outcome = {method: select(method, ex, update, global_, keep=True) for method in METHODS}  # + warm-up
            times = {method: [] for method in METHODS}
            for _ in range(args.repeats):  # old and new in turn, so that both see the same load
                for method in METHODS:
                    start = time.perf_counter()
                    select(method, ex, update, global_, keep=False)
                    times[method].append(time.perf_counter() - start)
            for method in METHODS:
                row[f"{method}_median_s"], row[f"{method}_min_s"] = statistics.median(times[method]), min(times[method])
                row[f"{method}_peak_mb"] = _peak_in_fresh_process(method, kind, level, args)
            _check_same(outcome["old"], outcome["new"], ex.k, f"{kind} {level}")
            results.append(row)
            print(
                f"| {kind} | {level:g} | {ex.k:,} | {row['old_median_s']:.3f} ({row['old_min_s']:.3f}) "
                f"| {row['new_median_s']:.3f} ({row['new_min_s']:.3f}) "
                f"| {row['old_median_s'] / row['new_median_s']:.1f}x "
                f"| {row['old_peak_mb']:.1f} | {row['new_peak_mb']:.1f} |",
                flush=True,
            )
    print(f"load average after: {_load()}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


def _check_same(old, new, k: int, what: str) -> None:
    (old_cuts, old_counts, old_chosen), (new_cuts, new_counts, new_chosen) = old, new
    if old_cuts != new_cuts or not torch.equal(old_counts, new_counts) or int(new_counts.sum()) != k:
        raise SystemExit(f"{what}: old and new selections differ: {old_cuts} {new_cuts}")
    for a, b in zip(old_chosen, new_chosen, strict=True):
        if not torch.equal(a, b):
            raise SystemExit(f"{what}: old and new select different indices")


def _peak_in_fresh_process(method: str, kind: str, level: float, args) -> float:
    command = [sys.executable, __file__, "--peak", method, kind, str(level), "--numel", str(args.numel)]
    command += ["--bucket-mb", str(args.bucket_mb), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return float(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
