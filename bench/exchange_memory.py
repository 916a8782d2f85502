"""Extra peak memory, bytes and time of each exchange, vs holding a full state-dict copy per site.

For a MiniLM-size model (BERT, 22.7M fp32 values in one flat vector, random init from the
packaged config) on N gloo ranks, each method runs in fresh processes:
  state_dict_copy  the per-tensor way: a dict of weighted update tensors (a full model-sized copy),
                   one all_reduce per tensor, then applied (what streaming exchanges avoid)
  dense            scaling-fl's bucketed in-place all_reduce
  sparse / int8 / sparse_int8 (error feedback on unless marked)
Extra peak = the rise of the process's peak RSS during one exchange (VmHWM after resetting it
through /proc/self/clear_refs), with glibc told to return every freed block above 64 KiB to
the OS (MALLOC_MMAP_THRESHOLD_), so a freed buffer cannot hide a later one. Persistent state
(the error-feedback residual) is allocated before and reported separately: it is the
algorithm's state, which a state-dict-copy implementation of error feedback would need too.
"accounted" is what the exchange itself reports as memory.exchange_peak_mb (its own
buffers and estimated temporaries, state included), to check that metric against RSS.

    .venv/bin/python bench/exchange_memory.py --ranks 4 --repeats 3
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

METHODS = {
    "state_dict_copy": ("state_dict_copy", {}),
    "dense": ("dense", {}),
    "sparse 10%": ("sparse", {"sparsity_level": 0.1}),
    "sparse 10%, no error feedback": ("sparse", {"sparsity_level": 0.1, "error_feedback": False}),
    "sparse 1%": ("sparse", {"sparsity_level": 0.01}),
    "sparse 10%, per tensor, fl4health average": (
        "sparse",
        {"sparsity_level": 0.1, "sparsity_scope": "tensor", "sparse_average": "fl4health"},
    ),
    "int8": ("int8", {}),
    "sparse_int8 10%": ("sparse_int8", {"sparsity_level": 0.1}),
}


def _bench_rank(label: str, repeats: int, bucket_mb: float) -> dict:
    from transformers import BertConfig, BertForSequenceClassification

    from scaling_fl.exchange import make_exchange, segments_from_model
    from scaling_fl.flat_state import flatten_model_
    from scaling_fl.models import minilm_path
    from scaling_fl.strategies import FedAvg

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig.from_pretrained(minilm_path(), num_labels=4))
    local = flatten_model_(model)
    segments = segments_from_model(model, local)
    named = [(name, p) for name, p in model.named_parameters()]
    global_ = local.clone()
    noise = 1e-3 * torch.randn(local.numel(), generator=torch.Generator().manual_seed(rank))
    weight = (rank + 1) / sum(range(1, world + 1))
    kind, options = METHODS[label]
    strategy = FedAvg()
    bucket_bytes = int(bucket_mb * 2**20)
    exchange = None
    if kind != "state_dict_copy":
        if options.get("sparsity_scope") == "tensor":
            options = {**options, "segments": segments}
        exchange = make_exchange(kind, local.numel(), bucket_bytes=bucket_bytes, **options)
    global_params = {
        name: global_[p.data.storage_offset() : p.data.storage_offset() + p.numel()].view_as(p) for name, p in named
    }

    def once() -> int:
        local.copy_(global_).add_(noise)
        if exchange is not None:
            return exchange.exchange_(local, global_, weight, strategy)
        update = {name: (p.data - global_params[name]) * weight for name, p in named}  # the full copy
        sent = 0
        for name, tensor in update.items():
            dist.all_reduce(tensor)
            sent += tensor.nbytes
            global_params[name].add_(tensor)
        local.copy_(global_)
        return sent

    dist.barrier()
    rss_before = rss_mb("VmRSS")
    reset_peak()
    sent = once()
    extra_mb = rss_mb("VmHWM") - rss_before
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    stats = exchange.stats if exchange is not None else {}
    result = {
        "bytes": sent,
        "extra_peak_mb": extra_mb,
        "median_s": statistics.median(slowest.tolist()),
        "state_mb": stats.get("memory.exchange_state_mb", 0.0),
        "accounted_mb": stats.get("memory.exchange_peak_mb", float("nan")),
        "density": stats.get("comm.density", 1.0),
        "numel": local.numel(),
        "model_mb": local.nbytes / 2**20,
        "segments": len(segments),
    }
    dist.destroy_process_group()
    return result


def run(label: str, ranks: int, repeats: int, bucket_mb: float) -> dict:
    from tests.ranks import run_on_ranks

    results = run_on_ranks(_bench_rank, ranks, label, repeats, bucket_mb)
    return {**results[0], "extra_peak_mb": max(r["extra_peak_mb"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=float, default=32)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the rank processes

    results = {label: run(label, args.ranks, args.repeats, args.bucket_mb) for label in args.methods}
    any_result = next(iter(results.values()))
    dense_bytes = 4 * any_result["numel"]
    baseline = results.get("state_dict_copy")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo, "
        f"{args.ranks} ranks, {any_result['numel'] / 1e6:.2f}M fp32 values ({any_result['model_mb']:.1f} MiB, "
        f"{any_result['segments']} tensors), bucket {args.bucket_mb:g} MiB, time = median of {args.repeats}"
    )
    print(
        "| method | bytes per site (MiB) | vs dense | extra peak during exchange (MiB) | vs state-dict copy "
        "| persistent state (MiB) | accounted by the exchange, state included (MiB) | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        versus = f"{(r['extra_peak_mb'] / baseline['extra_peak_mb'] - 1) * 100:+.0f} %" if baseline else "-"
        accounted = "-" if r["accounted_mb"] != r["accounted_mb"] else f"{r['accounted_mb']:.1f}"
        print(
            f"| {label} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / dense_bytes:.3f}x | {r['extra_peak_mb']:.1f} "
            f"| {versus} | {r['state_mb']:.1f} | {accounted} | {r['median_s']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
