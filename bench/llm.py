"""Federated causal-LM fine-tuning on IMDB reviews (issue 13): full fine-tune against LoRA, LoRA with a sparse
exchange and FFA-LoRA: validation perplexity per round, bytes per round and site, peak memory, time per round.

Why: LoRA claims that training and sending a few adapters instead of every weight costs far fewer bytes and
less memory for about the same model. This measures the claim on one job through the real command line.

The base model. LoRA only makes sense on a pretrained base; the one pretrained causal LM the registries
offer (SmolLM2-135M, `model=smollm2`) takes seconds per step on 2 CPU cores, so the bench first
pre-trains a small GPT-2 (n_embd 128, 4 layers, 4 heads, 128 positions, 4.7M parameters, most of them the
30,522 x 128 tied embedding) centrally on another corpus: AG News `agnews/test.csv` (title + description) and
Spooky `spooky_author/train.csv` (the texts), read by the project's own readers from ../shared/data
(research-only licence: read where they lie). Tokenizer: MiniLM's BERT WordPiece vocabulary, the one of
`tiny-gpt2` (scaling_fl.models.load_tokenizer("tiny-gpt2")); bos = [CLS], eos = [SEP], pad = [PAD], as
scaling_fl/models.py `_special_ids` sets them. Every text is tokenized as the fine-tuning tokenizes a row
([CLS] text [SEP]); the texts (seeded order, 1 % held out) are packed into one stream cut into windows of
`--pretrain-seq` tokens; AdamW (`--pretrain-lr`, weight decay 0.01 on matrices), linear warm-up over 5 % of
the steps then cosine to 10 %, batch `--pretrain-batch`, `--pretrain-steps` steps (250: ~5 min at ~1.2 s a
step; a step count rather than minutes, so that the cached base depends on its settings only, not on the
machine's speed). The folder
(`save_pretrained` of the GPT2LMHeadModel + the tokenizer + pretrain.json with its loss and time) is cached
in ~/.cache/scaling-fl-bench/llm/base-<hash of its settings and of the corpus files>/ and passed to the runs
as `model=<folder>`. `--base DIR` uses another causal LM folder (with its tokenizer) instead.

The job. A seeded permutation of the 2,798 IMDB reviews: the first 2,400 a training file, the other 398 a
test file (CSV review,sentiment, written to the cache folder, never to the repo); `task_name=imdb
objective=causal_lm` (plain-text SFT: every token of a review is learned), validation_fraction 0.1 (216
reviews carved from the training file, scored after every round), 4 IID sites, max_seq_len 64, batch 16, one
local epoch a round, AdamW with the project's linear decay over the run, `--rounds` rounds, seed 42. The
evaluation batch is the training batch (val_batch_size 16, `--val-batch`): the logits of a batch are
rows x 64 x 30,522 floats (125 MB at 16 rows), so at the default 64 the evaluation's logits (500 MB, and as
much again for their log-softmax) would set every configuration's peak RSS and hide what training costs.

Layout: `site_ids=[0,0,0,0]` (`--layout apart`, the default), 4 worker processes of 1 torch thread each, one
site each, on the 2 cores. The alternative, `num_sites=4 processes_per_device=1` (`--layout packed`), trains
the 4 sites one after another in one process of 2 threads. Apart was the faster of the two here: a full
fine-tune of 640 reviews, 2 rounds, alternated packed/apart/apart/packed, took 55-57 s against 59-62 s
(training 43-45 s against 48-53 s) for the same CPU seconds, because at these sizes (batch 16 x 64 tokens,
n_embd 128) a 2-thread kernel is only ~1.6x faster than a 1-thread one (20 % more CPU per step) while 4
single-thread processes keep both cores busy without intra-op synchronization; the 3 extra worker starts are
paid once. Its cost is memory: 4 torch runtimes and 4 bases, ~4.5 GB for the process tree against ~1.9 GB
packed (the per-run metric, the busiest worker's peak, is about the same). Both give the same perplexities
(the project's packing contract). Configurations:

  full          peft=none (every weight trains and crosses the wire), learning_rate `--lr-full`
  lora          peft=lora lora_r=8 (adapters on c_attn, alpha 16), `--lr-lora`
  lora-sparse   lora + exchange=sparse sparsity_level=0.1 error_feedback=False (top 10 % of the adapters'
                update; what is not sent is dropped)
  ffa-lora      lora + lora_variant=ffa (A frozen at its seeded init, only B trains), `--lr-ffa`
  lora-sparse-ef  lora-sparse with error feedback (the exchange's default: what is not sent is carried to
                the next round), for comparison; not held to the targets

Each configuration runs `scripts/train_federated.py with ...` (from the committed tree, `--commit`, exported
with git archive as bench/scale.py does, so that edits in progress do not leak in; `--commit worktree` runs
the working tree), tracking=file in a temporary runs_dir; from its metrics.json: validation.perplexity per
round, comm.bytes_per_site per round, memory.peak_rss_mb (the busiest worker's peak, max over rounds),
time.round_s, test.perplexity after the last round. bench/scale.py's sampler also reads the RSS (and PSS) of
the whole process tree (launcher + workers) every 0.2 s from /proc, and the CPU seconds of the run (user +
system of the finished tree, from getrusage: steadier than wall time on a shared machine). The base's own test
perplexity (before any fine-tuning) is scored in-process with the project's CausalLM objective, as a reference.

    .venv/bin/python bench/llm.py --quick                          # smoke test: tiny pre-training, 2 rounds (~3 min)
    nohup .venv/bin/python bench/llm.py --out /tmp/llm.json > /tmp/llm-bench.log 2>&1 &   # the benchmark
    .venv/bin/python bench/llm.py --report /tmp/llm.json           # table and figure from saved results

The figure (validation perplexity against cumulative bytes sent per site, log x) goes to
docs/figures/llm/perplexity_vs_bytes.png (`--quick`: next to the JSON). Targets (issue 13): LoRA bytes per
round <= 0.02x the full fine-tune's; LoRA peak RSS below the full fine-tune's; validation perplexity falls
every round for every configuration; LoRA's final test perplexity within 10 % of the full fine-tune's.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.scale import export_commit, load_average, machine, measure  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
IMDB = DATA / "imdb" / "IMDB Dataset.csv"
CORPUS = (DATA / "agnews" / "test.csv", DATA / "spooky_author" / "train.csv")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scaling-fl-bench" / "llm"
FIGURE = ROOT / "docs" / "figures" / "llm" / "perplexity_vs_bytes.png"
PYTHON = ROOT / ".venv" / "bin" / "python"

TRAIN_ROWS, SEED, DATA_SEED = 2400, 42, 42
MAX_SEQ_LEN, BATCH = 64, 16
LORA = ["peft=lora", "lora_r=8"]
# name -> (extra keys, which learning rate)
CONFIGS = {
    "full": (["peft=none"], "full"),
    "lora": (LORA, "lora"),
    "lora-sparse": ([*LORA, "exchange=sparse", "sparsity_level=0.1", "error_feedback=False"], "lora"),
    "ffa-lora": ([*LORA, "lora_variant=ffa"], "ffa"),
    "lora-sparse-ef": ([*LORA, "exchange=sparse", "sparsity_level=0.1", "error_feedback=True"], "lora"),
}
# Shown beside the targets' configurations, not held to them: the sparse exchange's default, error feedback,
# which the adapters do not take well (docs/benchmarks.md says why).
COMPARISONS = {"lora-sparse-ef"}
LAYOUTS = {"packed": ["num_sites=4", "processes_per_device=1"], "apart": ["site_ids=[0,0,0,0]"]}
QUICK = {"train_rows": 160, "test_rows": 48, "rounds": 2, "pretrain_steps": 20}


# ------------------------------------------------------------------------------------------- base model


def base_settings(args) -> dict:
    """Everything the pre-trained base depends on (its cache key)."""
    import torch
    import transformers

    return {
        "architecture": {"n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 128, "dropout": args.dropout},
        "tokenizer": "tiny-gpt2 (MiniLM WordPiece)",
        "corpus": {path.relative_to(DATA).as_posix(): file_digest(path) for path in CORPUS},
        "held_out": 0.01,
        "steps": args.pretrain_steps,
        "batch": args.pretrain_batch,
        "seq": args.pretrain_seq,
        "lr": args.pretrain_lr,
        "warmup": 0.05,
        "final_lr": 0.1,
        "weight_decay": 0.01,
        "seed": SEED,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def corpus_windows(tokenizer, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out windows of `seq` tokens: the corpus texts in a seeded order, each tokenized as
    [CLS] text [SEP], joined into one stream; the last 1 % of the texts are held out."""
    from scaling_fl.data.readers import read_agnews, read_spooky_author

    texts = list(read_agnews(str(CORPUS[0])).texts) + list(read_spooky_author(str(CORPUS[1])).texts)
    texts = [texts[i] for i in np.random.default_rng(SEED).permutation(len(texts))]
    held = max(1, len(texts) // 100)

    def windows(part: list[str]) -> np.ndarray:
        stream = np.fromiter((t for ids in tokenizer(part)["input_ids"] for t in ids), dtype=np.int64)
        return stream[: len(stream) // seq * seq].reshape(-1, seq)

    return windows(texts[:-held]), windows(texts[-held:])


def pretrain(settings: dict, folder: Path) -> dict:
    """Trains the base centrally and saves it (model + tokenizer + pretrain.json) into `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from scaling_fl.models import _special_ids, load_tokenizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    tokenizer = load_tokenizer("tiny-gpt2")
    train, held = corpus_windows(tokenizer, settings["seq"])
    arch = settings["architecture"]
    dropout = arch["dropout"]
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=arch["n_embd"],
        n_layer=arch["n_layer"],
        n_head=arch["n_head"],
        n_positions=arch["n_positions"],
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        **_special_ids(tokenizer),
    )
    torch.manual_seed(settings["seed"])
    model = GPT2LMHeadModel(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings["lr"],
    )
    steps, warmup = settings["steps"], max(1, round(settings["warmup"] * settings["steps"]))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return settings["final_lr"] + (1 - settings["final_lr"]) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = np.random.default_rng(settings["seed"])
    order, cursor, losses = rng.permutation(len(train)), 0, []
    setup_s = time.perf_counter() - started
    model.train()
    for step in range(steps):
        if cursor + settings["batch"] > len(order):  # next epoch
            order, cursor = rng.permutation(len(train)), 0
        batch = torch.from_numpy(train[order[cursor : cursor + settings["batch"]]])
        cursor += settings["batch"]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"  pre-training step {step + 1}/{steps}: loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - started - setup_s
    model.eval()
    with torch.inference_mode():
        held_batches = [torch.from_numpy(held[i : i + 64]) for i in range(0, min(len(held), 256), 64)]
        held_loss = float(np.mean([model(input_ids=b, labels=b).loss.item() for b in held_batches]))
    tail = max(1, steps // 10)
    info = {
        "settings": settings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_windows": len(train),
        "tokens_seen": steps * settings["batch"] * settings["seq"],
        "epochs": steps * settings["batch"] / len(train),
        "final_train_loss": float(np.mean(losses[-tail:])),
        "final_train_loss_over_steps": tail,
        "held_out_loss": held_loss,
        "held_out_perplexity": math.exp(held_loss),
        "loss_curve": [[i + 1, losses[i]] for i in range(0, steps, max(1, steps // 50))],
        "setup_s": setup_s,
        "train_s": train_s,
        "step_s": train_s / steps,
    }
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "pretrain.json").write_text(json.dumps(info, indent=2))
    return info


def ensure_base(args) -> tuple[Path, dict]:
    """The cached pre-trained base for these settings (trained now when missing)."""
    if args.base:
        return args.base.resolve(), {"given": str(args.base.resolve())}
    settings = base_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = CACHE / f"base-{key}"
    if (folder / "pretrain.json").exists():
        info = json.loads((folder / "pretrain.json").read_text())
        print(f"base: cached {folder}", file=sys.stderr, flush=True)
        return folder, {**info, "folder": str(folder), "cached": True}
    print(f"base: pre-training {args.pretrain_steps} steps into {folder}", file=sys.stderr, flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".base-{key}-", dir=CACHE))
    try:
        info = pretrain(settings, partial)
        partial.rename(folder)  # complete folders only
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder, {**info, "folder": str(folder), "cached": False}


def base_test_perplexity(folder: Path, test_path: Path) -> float:
    """The base's perplexity on the test file before any fine-tuning (the project's CausalLM objective)."""
    import torch
    from transformers import AutoModelForCausalLM

    from scaling_fl.data.readers import read_imdb
    from scaling_fl.models import load_tokenizer
    from scaling_fl.train.objectives import CausalLM

    objective = CausalLM(load_tokenizer(str(folder)), MAX_SEQ_LEN)
    model = AutoModelForCausalLM.from_pretrained(folder)
    sums = objective.evaluation_sums(
        model, objective.dataset(read_imdb(str(test_path))), batch_size=64, precision="fp32", device=torch.device("cpu")
    )
    return objective.scores("test", sums)["test.perplexity"]


# ------------------------------------------------------------------------------------------------- data


def write_imdb_split(train_rows: int, test_rows: int | None) -> tuple[Path, Path, int]:
    """The first `train_rows` reviews of a seeded permutation as train.csv, the next `test_rows` (None: all the
    rest) as test.csv, in the cache folder (header review,sentiment); the two paths and the test rows."""
    with open(IMDB, newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    order = np.random.default_rng(SEED).permutation(len(rows))
    train_part = order[:train_rows]
    test_part = order[train_rows:] if test_rows is None else order[train_rows : train_rows + test_rows]
    folder = CACHE / f"imdb-{file_digest(IMDB)}-seed{SEED}-{train_rows}-{len(test_part)}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "train.csv", folder / "test.csv")
    for path, part in zip(paths, (train_part, test_part), strict=True):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *(rows[i] for i in part)])
    return (*paths, len(test_part))


# ------------------------------------------------------------------------------------------------- runs


def run_command(args, name: str, base: Path, paths: tuple[Path, Path], runs: Path, source: Path) -> list[str]:
    extra, which = CONFIGS[name]
    lr = {"full": args.lr_full, "lora": args.lr_lora, "ffa": args.lr_ffa or args.lr_lora}[which]
    return [
        str(PYTHON),
        str(source / "scripts" / "train_federated.py"),
        "with",
        "objective=causal_lm",
        f"model={base}",
        *extra,
        "task_name=imdb",
        f"train_path={paths[0]}",
        f"test_path={paths[1]}",
        "validation_fraction=0.1",
        *LAYOUTS[args.layout],
        f"max_seq_len={MAX_SEQ_LEN}",
        f"batch_size={BATCH}",
        f"val_batch_size={args.val_batch}",
        f"learning_rate={lr}",
        f"num_rounds={args.rounds}",
        f"seed={SEED}",
        f"data_seed={DATA_SEED}",
        "tracking=file",
        f"runs_dir={runs}",
        f"job_name=llm-{name}",
        *args.option,
    ]


def run_config(args, name: str, base: Path, paths, workdir: Path, source: Path, env: dict) -> dict:
    runs = workdir / name / "runs"
    runs.mkdir(parents=True)
    command = run_command(args, name, base, paths, runs, source)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tree = measure(command, env, workdir / name / "run.log", args.memory_limit_gb)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if "over_limit_gb" in tree:
        return {"name": name, "command": command[3:], "killed_over_gb": tree["over_limit_gb"], "wall_s": tree["wall_s"]}
    (record,) = [p for p in runs.iterdir() if p.name.isdigit()]
    metrics = json.loads((record / "metrics.json").read_text())

    def series(key: str) -> list[float]:
        return list(metrics[key]["values"]) if key in metrics else []

    return {
        "name": name,
        "command": command[3:],
        "rounds": list(metrics["validation.perplexity"]["steps"]),
        "validation_perplexity": series("validation.perplexity"),
        "validation_loss": series("validation.loss"),
        "train_loss": series("train.loss"),
        "bytes_per_site": series("comm.bytes_per_site"),
        "round_s": series("time.round_s"),
        "train_s": series("time.train_s"),
        "aggregate_s": series("time.aggregate_s"),
        "eval_s": series("time.eval_s"),
        "train_tokens_per_s": series("train.tokens_per_s"),
        "peak_rss_mb_per_round": series("memory.peak_rss_mb"),
        "peak_rss_mb": max(series("memory.peak_rss_mb")),
        "test_perplexity": series("test.perplexity")[-1],
        "test_loss": series("test.loss")[-1],
        "wall_s": tree["wall_s"],
        "cpu_s": cpu_s,
        "tree_peak_rss_mb": tree["peak_rss_mb"],
        "tree_peak_pss_mb": tree["peak_pss_mb"],
        "processes_seen": tree["processes_seen"],
    }


def run_all(args) -> dict:
    results = {
        "machine": machine(),
        "quick": args.quick,
        "layout": args.layout,
        "options": args.option,
        "val_batch_size": args.val_batch,
        "rounds": args.rounds,
        "learning_rates": {"full": args.lr_full, "lora": args.lr_lora, "ffa": args.lr_ffa or args.lr_lora},
        "load_before": load_average(),
        "configs": [],
    }
    with tempfile.TemporaryDirectory(prefix="scaling-fl-bench-llm-") as tmp:
        workdir = args.runs_dir.resolve() if args.runs_dir else Path(tmp)  # <workdir>/<configuration>/runs
        if args.commit == "worktree":
            source, env, results["commit"] = ROOT, dict(os.environ), "worktree"
        else:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.commit], capture_output=True, text=True)
            results["commit"] = commit.stdout.strip()
            source = export_commit(Path(tmp) / "scaling-fl", results["commit"])  # also first on sys.path
            env = {**os.environ, "PYTHONPATH": str(source)}
        started = time.perf_counter()
        base, results["base"] = ensure_base(args)
        results["base_s"] = time.perf_counter() - started
        paths = write_imdb_split(args.train_rows, args.test_rows)
        paths, test_rows = paths[:2], paths[2]
        results["data"] = {"train": str(paths[0]), "test": str(paths[1]), "train_rows": args.train_rows}
        results["data"]["test_rows"] = test_rows
        results["runs_dir"] = str(args.runs_dir.resolve()) if args.runs_dir else None
        results["base_test_perplexity"] = base_test_perplexity(base, paths[1])
        print(f"base test perplexity (no fine-tuning): {results['base_test_perplexity']:.1f}", file=sys.stderr)
        for name in args.configs:
            results["configs"].append(run_config(args, name, base, paths, workdir, source, env))
            results["load_after"] = load_average()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
            print(f"    {summary_line(results['configs'][-1])}", file=sys.stderr, flush=True)
    results["total_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=2))
    return results


def summary_line(run: dict) -> str:
    if "killed_over_gb" in run:
        return f"{run['name']}: killed past {run['killed_over_gb']} GiB"
    ppl = " > ".join(f"{p:.1f}" for p in run["validation_perplexity"])
    return (
        f"{run['name']}: validation perplexity {ppl}, test {run['test_perplexity']:.1f}, "
        f"{np.mean(run['bytes_per_site']) / 1e6:.3f} MB/round/site, peak RSS {run['peak_rss_mb']:.0f} MiB "
        f"(tree {run['tree_peak_rss_mb']:.0f}), {np.mean(run['round_s']):.1f} s/round, wall {run['wall_s']:.0f} s, "
        f"CPU {run['cpu_s']:.0f} s"
    )


# ----------------------------------------------------------------------------------------------- report


def _bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.{3 if unit == 'MB' else 1}f} {unit}"
    return f"{n:.0f} B"


def table(results: dict) -> str:
    base = results["base"]
    lines = []
    m = results["machine"]
    lines.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB; commit {results['commit'][:12]}; "
        f"load before {results['load_before']}, after {results.get('load_after')}."
    )
    if "given" in base:
        lines.append(f"Base: {base['given']} (given with --base).")
    else:
        s = base["settings"]
        lines.append(
            f"Base: GPT-2 {s['architecture']['n_layer']} layers x {s['architecture']['n_embd']}, "
            f"{base['parameters'] / 1e6:.2f}M parameters, pre-trained {s['steps']} steps of {s['batch']} x {s['seq']} "
            f"tokens ({base['epochs']:.2f} epochs of AG News test + Spooky) in {base['train_s'] / 60:.1f} min "
            f"({base['step_s']:.2f} s/step{', cached' if base.get('cached') else ''}): final training loss "
            f"{base['final_train_loss']:.3f} (mean of the last {base['final_train_loss_over_steps']} steps), held-out "
            f"loss {base['held_out_loss']:.3f} (perplexity {base['held_out_perplexity']:.1f})."
        )
    d = results["data"]
    lines.append(
        f"Data: IMDB, {d['train_rows']} training reviews (10 % of them validation), {d['test_rows']} test reviews; "
        f"4 IID sites ({results['layout']}), {results['rounds']} rounds, batch {BATCH}, evaluation batch "
        f"{results.get('val_batch_size', 64)}; the base's test perplexity before "
        f"fine-tuning: {results['base_test_perplexity']:.1f}."
    )
    lines += [
        "",
        "| configuration | lr | validation perplexity per round | test perplexity | bytes / round / site "
        "| vs full | peak RSS, run (MiB) | peak RSS, tree (MiB) | time / round (s) | wall (s) | CPU (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = {run["name"]: run for run in results["configs"]}
    full = runs.get("full")
    for name, run in runs.items():
        if "killed_over_gb" in run:
            lines.append(f"| {name} | killed past {run['killed_over_gb']} GiB | | | | | | | | | |")
            continue
        which = CONFIGS[name][1]
        lr = results["learning_rates"][which]
        sent = float(np.mean(run["bytes_per_site"]))
        ratio = f"{sent / np.mean(full['bytes_per_site']):.4f}x" if full and "bytes_per_site" in full else ""
        ppl = " → ".join(f"{p:.2f}" for p in run["validation_perplexity"])
        lines.append(
            f"| {name} | {lr:g} | {ppl} | {run['test_perplexity']:.2f} | {_bytes(sent)} | {ratio} "
            f"| {run['peak_rss_mb']:.0f} | {run['tree_peak_rss_mb']:.0f} | {np.mean(run['round_s']):.1f} "
            f"| {run['wall_s']:.0f} | {run.get('cpu_s', float('nan')):.0f} |"
        )
    lines += ["", *[f"- {check}" for check in checks(runs)]]
    if "total_s" in results:
        lines.append(f"\nTotal wall time {results['total_s'] / 60:.1f} min (base {results['base_s'] / 60:.1f} min).")
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def checks(runs: dict) -> list[str]:
    done = {name: run for name, run in runs.items() if "killed_over_gb" not in run}
    found = []
    full, lora = done.get("full"), done.get("lora")
    if full and lora:
        ratio = np.mean(lora["bytes_per_site"]) / np.mean(full["bytes_per_site"])
        found.append(f"LoRA bytes per round {ratio:.4f}x the full fine-tune's <= 0.02x: {verdict(ratio <= 0.02)}")
        rss, tree = lora["peak_rss_mb"] / full["peak_rss_mb"], lora["tree_peak_rss_mb"] / full["tree_peak_rss_mb"]
        found.append(
            f"LoRA peak RSS {lora['peak_rss_mb']:.0f} MiB vs full {full['peak_rss_mb']:.0f} MiB ({rss:.2f}x; process "
            f"tree {tree:.2f}x) below: {verdict(rss < 1)}"
        )
        gap = lora["test_perplexity"] / full["test_perplexity"] - 1
        found.append(
            f"LoRA final test perplexity {lora['test_perplexity']:.2f} vs full {full['test_perplexity']:.2f} "
            f"({gap * 100:+.1f} %) within 10 %: {verdict(gap <= 0.10)}"
            + ("" if gap <= 0.10 else f" (misses by {(gap - 0.10) * 100:.1f} points)")
        )
    for name, run in done.items():
        ppl = run["validation_perplexity"]
        falls = all(b < a for a, b in zip(ppl, ppl[1:], strict=False))
        if name in COMPARISONS:
            found.append(f"{name} (comparison, no target): validation perplexity falls every round: {falls}")
        else:
            found.append(f"{name}: validation perplexity falls every round: {verdict(falls)}")
    return found


def figure(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v")]
    for (linestyle, marker), run in zip(styles * 2, results["configs"]):
        if "killed_over_gb" in run:
            continue
        sent = np.cumsum(run["bytes_per_site"])
        ax.plot(sent, run["validation_perplexity"], linestyle=linestyle, marker=marker, label=run["name"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes sent per site (after each round)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"IMDB causal-LM SFT, 4 sites, {results['rounds']} rounds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------- main


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 20 pre-training steps, 160/48 rows, 2 rounds")
    parser.add_argument("--out", type=Path, help="results JSON (default: CACHE/llm[-quick].json)")
    parser.add_argument("--report", type=Path, help="only print the table and draw the figure of a saved JSON")
    parser.add_argument("--figure", type=Path, help=f"default {FIGURE.relative_to(ROOT)}; --quick: by --out")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, help="federated rounds (default 4; --quick 2)")
    parser.add_argument("--train-rows", type=int, help=f"IMDB training reviews (default {TRAIN_ROWS}; --quick 160)")
    parser.add_argument("--test-rows", type=int, help="IMDB test reviews (default: all the rest, 398; --quick 48)")
    parser.add_argument("--lr-full", type=float, default=3e-4, help="learning rate of the full fine-tune")
    parser.add_argument("--lr-lora", type=float, default=3e-3, help="learning rate of LoRA (and of lora-sparse)")
    parser.add_argument("--lr-ffa", type=float, help="learning rate of FFA-LoRA (default: --lr-lora)")
    parser.add_argument(
        "--val-batch", type=int, default=BATCH, help="val_batch_size (default 16, the training batch: see above)"
    )
    parser.add_argument(
        "--option", nargs="*", default=[], help="more config for every run (KEY=VALUE), e.g. error_feedback=False"
    )
    parser.add_argument("--layout", choices=list(LAYOUTS), default="apart", help="apart: 4 processes; packed: 1")
    parser.add_argument("--base", type=Path, help="a pretrained causal LM folder (with its tokenizer) to fine-tune")
    parser.add_argument("--pretrain-steps", type=int, help="pre-training steps (default 250, ~5 min on 2 cores)")
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-seq", type=int, default=64)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--dropout", type=float, default=0.1, help="the base's dropout (GPT-2's default)")
    parser.add_argument("--runs-dir", type=Path, help="keep the runs' Sacred records and logs there (a new folder)")
    parser.add_argument("--commit", default="HEAD", help="the commit to run (git archive), or 'worktree'")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0, help="kill a run whose process tree passes it")
    args = parser.parse_args()
    quick = QUICK if args.quick else {"train_rows": TRAIN_ROWS, "test_rows": None, "rounds": 4, "pretrain_steps": 250}
    for key, value in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = CACHE / ("llm-quick.json" if args.quick else "llm.json")
    return args


def main() -> None:
    args = parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
        out = args.report
    else:
        for path in (IMDB, *CORPUS):
            if not path.exists() and not (args.base and path in CORPUS):
                raise SystemExit(f"{path} is missing: the bench reads ../shared/data")
        results = run_all(args)
        out = args.out
    print(table(results))
    path = args.figure or (out.with_suffix(".png") if results["quick"] else FIGURE)
    print(f"figure: {figure(results, path)}")
    if not args.report:
        print(f"results: {out}")


if __name__ == "__main__":
    main()
