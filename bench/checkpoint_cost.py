"""Checkpoint cost per round on S3 (moto): bytes up, bytes down, requests and seconds.

What the leader does at the end of a round of dense FedAvg (the default: sites keep no state):
write global.safetensors (the flat model) and state.json, commit, prune (keep_last_checkpoints).
`before` is scaling_fl/checkpoint.py as of --before-rev (commit re-reads every file, prune verifies
every kept checkpoint each round), loaded from git into a temporary module; `after` is the working
tree's. Both run side by side against one moto server (started here as the tests start it, on a
free loopback port), each round the two in turn (alternating which goes first), each under its
own prefix. Bytes are counted at the botocore level on the S3 client both share: request bodies
of PutObject / UploadPart (up) and the ContentLength of GetObject answers (down).

    .venv/bin/python bench/checkpoint_cost.py --rounds 6 --keep-last 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BEFORE_REV = "b20c9cf"  # the last change to checkpoint.py before it stopped re-reading on commit and prune
MIB = 2**20


class Traffic:
    """Bytes and requests through one botocore (aiobotocore) client, by operation."""

    def __init__(self):
        self.up = 0
        self.down = 0
        self.requests: Counter = Counter()

    def reset(self):
        self.up, self.down, self.requests = 0, 0, Counter()

    def before_call(self, model=None, params=None, **_):
        self.requests[model.name] += 1
        body = (params or {}).get("body")
        if isinstance(body, (bytes, bytearray, memoryview)):
            self.up += len(body)
        elif body is not None and hasattr(body, "seek"):  # a file-like body: its length
            position = body.tell()
            self.up += body.seek(0, os.SEEK_END) - position
            body.seek(position)

    def after_call(self, model=None, parsed=None, **_):
        if model.name == "GetObject" and parsed:
            self.down += int(parsed.get("ContentLength") or 0)


def load_before(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:scaling_fl/checkpoint.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="checkpoint-before-")) / "checkpoint_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("checkpoint_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def one_round(module, ck: str, number: int, weights, keep_last: int, traffic: Traffic) -> dict:
    directory = module.round_dir(ck, number)
    traffic.reset()
    started = time.perf_counter()
    module.write_tensors(directory, "global.safetensors", {"global": weights}, metadata={"numel": weights.numel()})
    module.write_state(directory, {"format": 1, "round": number, "job_name": "bench", "history": []})
    written = time.perf_counter()
    module.commit(directory)
    committed = time.perf_counter()
    module.prune(ck, keep_last)
    pruned = time.perf_counter()
    return {
        "round": number,
        "up": traffic.up,
        "down": traffic.down,
        "requests": dict(traffic.requests),
        "write_s": written - started,
        "commit_s": committed - written,
        "prune_s": pruned - committed,
        "total_s": pruned - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=22_700_000, help="float32 values in the model (MiniLM: 22.7M)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--before-rev", default=BEFORE_REV)
    parser.add_argument("--json", help="also write every round's figures here")
    args = parser.parse_args()

    import torch

    from scaling_fl import checkpoint as after
    from scaling_fl import storage
    from tests.servers import _AWS_ISOLATION, start_s3

    before = load_before(args.before_rev)
    log_dir = Path(tempfile.mkdtemp(prefix="checkpoint-cost-moto-"))
    s3 = start_s3(log_dir)
    try:
        for name in _AWS_ISOLATION:
            os.environ.pop(name, None)
        os.environ.update(s3.env())
        base = f"s3://{s3.bucket}/checkpoint-cost"
        fs, _ = storage.filesystem(base)
        fs.ls(s3.bucket)  # connects: the client exists from here on
        traffic = Traffic()
        fs.s3.meta.events.register("before-call.s3", traffic.before_call)
        fs.s3.meta.events.register("after-call.s3", traffic.after_call)

        weights = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
        variants = {"before": before, "after": after}
        results: dict[str, list[dict]] = {name: [] for name in variants}
        for number in range(1, args.rounds + 1):
            order = list(variants) if number % 2 else list(reversed(variants))
            for name in order:
                results[name].append(
                    one_round(variants[name], f"{base}/{name}", number, weights, args.keep_last, traffic)
                )
        for name in variants:
            kept = [int(path.rstrip("/").rsplit("-", 1)[-1]) for path in storage.list_dir(f"{base}/{name}")]
            results[name + "_kept"] = kept
            found = variants[name].latest(f"{base}/{name}")
            assert found is not None and found.round == args.rounds, (name, found)
    finally:
        s3.stop()

    model_mib = args.numel * 4 / MIB
    steady = [r for r in range(1, args.rounds + 1) if r > args.keep_last]  # prune has keep_last to look at
    print(
        f"model: {args.numel:,} float32 values ({model_mib:.1f} MiB); keep_last_checkpoints={args.keep_last}; "
        f"{args.rounds} rounds; steady state = rounds {steady[0]}-{steady[-1]} (median)"
    )
    print(
        "| code | MiB up per round | MiB down per round | requests per round | write (s) | commit (s) | "
        "prune (s) | write+commit+prune (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for name in variants:
        rows = [row for row in results[name] if row["round"] in steady]
        med = {
            key: statistics.median(row[key] for row in rows)
            for key in ("up", "down", "write_s", "commit_s", "prune_s", "total_s")
        }
        med["requests"] = statistics.median(sum(row["requests"].values()) for row in rows)
        summary[name] = med
        print(
            f"| {name} | {med['up'] / MIB:.1f} | {med['down'] / MIB:.4f} | {med['requests']:.0f} | "
            f"{med['write_s']:.2f} | {med['commit_s']:.2f} | {med['prune_s']:.2f} | {med['total_s']:.2f} |"
        )
    b, a = summary["before"], summary["after"]
    print(
        f"after/before: up {a['up'] / b['up']:.3f}x, down {a['down'] / max(b['down'], 1):.2e}x, "
        f"time {a['total_s'] / b['total_s']:.2f}x; per round in models up {b['up'] / (model_mib * MIB):.3f} -> "
        f"{a['up'] / (model_mib * MIB):.3f}, down {b['down'] / (model_mib * MIB):.3f} -> "
        f"{a['down'] / (model_mib * MIB):.6f} ({int(b['down']):,} -> {int(a['down']):,} bytes)"
    )
    for name in variants:
        print(
            f"{name}: rounds kept {results[name + '_kept']}; requests in the last round "
            f"{dict(sorted(results[name][-1]['requests'].items()))}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
