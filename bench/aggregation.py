"""Aggregation cost: our bucketed dense exchange vs the limit and vs the per-tensor way.

For a MiniLM-size model (BERT, 22.7M params, ~100 tensors) on N ranks, times
  ours        DenseExchange.exchange_: local*w per bucket, async all_reduce, FedAvg apply (see exchange/dense.py)
  flat        one raw all_reduce of one flat tensor of the same bytes (the limit)
  per_tensor  one all_reduce per parameter tensor, then divide (the original scaling_fl way)
and the extra peak memory each needs beyond the model and its global copy: the rise of
the process's peak RSS (VmHWM, reset through /proc/self/clear_refs just before, with glibc
told to return every freed block above 64 KiB to the OS, so a freed buffer cannot hide a
later one) or, on CUDA, of max_memory_allocated. Each method runs in fresh processes.
Targets (issue 2): ours <= 1.3x the flat all_reduce, <= 0.5x per-tensor, extra memory <= one bucket.

    .venv/bin/python bench/aggregation.py --ranks 4 --repeats 5 --cycles 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.peak_memory import reset_peak, rss_mb  # noqa: E402


def _bench_rank(method: str, repeats: int, bucket_mb: float, backend: str) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    from scaling_fl.exchange import DenseExchange
    from scaling_fl.flat_state import flatten_model_
    from scaling_fl.models import minilm_path
    from scaling_fl.strategies import FedAvg

    torch.set_num_threads(1)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig.from_pretrained(minilm_path(), num_labels=4)).to(device)
    params = [p for p in model.parameters()]
    local = flatten_model_(model)
    # As in the round loop: dense FedAvg keeps no separate global copy (train/federated.py).
    global_ = local if method == "ours" else local.clone()
    local.add_(0.01 * (rank + 1))  # a non-zero update
    exchange = DenseExchange(local.numel(), int(bucket_mb * 2**20), local.dtype) if method == "ours" else None
    strategy = FedAvg()
    flat_copy = local.clone() if method == "flat" else None  # the limit needs a flat tensor to exist

    def once() -> None:
        if method == "ours":
            exchange.exchange_(local, global_, 1 / world, strategy)
        elif method == "flat":
            dist.all_reduce(flat_copy)
        else:
            for param in params:
                dist.all_reduce(param.data)
                param.data.div_(world)

    dist.barrier()
    baseline_mb = rss_mb("VmRSS")
    reset_peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    once()  # warm-up, and the run the memory is read from
    extra_mb = rss_mb("VmHWM") - baseline_mb
    if device.type == "cuda":
        torch.cuda.synchronize()
        extra_mb = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
    times = []
    for _ in range(repeats):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a round waits for the slowest site
    result = {
        "median_s": statistics.median(slowest.tolist()),
        "times": slowest.tolist(),
        "extra_peak_mb": extra_mb,
        "numel": local.numel(),
        "tensors": len(params),
        "model_mb": local.numel() * 4 / 2**20,
    }
    dist.destroy_process_group()
    return result


def run(method: str, ranks: int, repeats: int, bucket_mb: float, backend: str) -> dict:
    from tests.ranks import run_on_ranks

    results = run_on_ranks(_bench_rank, ranks, method, repeats, bucket_mb, backend)
    return {**results[0], "extra_peak_mb": max(r["extra_peak_mb"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cycles",
        type=int,
        default=3,
        help="run the three methods this many times in turn (fresh processes each time) and take "
        "the median over all repeats, so a noisy moment does not decide a ratio",
    )
    parser.add_argument("--bucket-mb", type=float, default=32)
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the rank processes

    cycles = [
        {
            method: run(method, args.ranks, args.repeats, args.bucket_mb, args.backend)
            for method in ("flat", "ours", "per_tensor")
        }
        for _ in range(args.cycles)
    ]
    results = {}
    for method in ("flat", "ours", "per_tensor"):
        runs = [cycle[method] for cycle in cycles]
        results[method] = {
            **runs[0],
            "times": [t for r in runs for t in r["times"]],
            "median_s": statistics.median(t for r in runs for t in r["times"]),
            "extra_peak_mb": max(r["extra_peak_mb"] for r in runs),
        }
    ours, flat, per_tensor = results["ours"], results["flat"], results["per_tensor"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, backend {args.backend}, "
        f"{args.ranks} ranks, {ours['numel'] / 1e6:.1f}M params in {ours['tensors']} tensors "
        f"({ours['model_mb']:.1f} MiB), bucket {args.bucket_mb:g} MiB, median of {args.cycles} x {args.repeats} "
        "(the slowest rank of each)"
    )
    print("| method | median time (s) | vs flat all_reduce | vs per-tensor | extra peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for name, label in (
        ("flat", "one flat all_reduce (limit)"),
        ("ours", "scaling-fl dense buckets"),
        ("per_tensor", "one all_reduce per tensor"),
    ):
        r = results[name]
        print(
            f"| {label} | {r['median_s']:.3f} | {r['median_s'] / flat['median_s']:.2f}x | "
            f"{r['median_s'] / per_tensor['median_s']:.2f}x | {r['extra_peak_mb']:.1f} |"
        )
    bucket_mb = min(args.bucket_mb, ours["model_mb"])
    checks = [
        ("ours / flat all_reduce <= 1.3", ours["median_s"] / flat["median_s"] <= 1.3),
        ("ours / per-tensor <= 0.5", ours["median_s"] / per_tensor["median_s"] <= 0.5),
        (f"extra memory <= one bucket ({bucket_mb:.1f} MiB)", ours["extra_peak_mb"] <= bucket_mb),
    ]
    print("targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
