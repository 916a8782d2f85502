"""Ready for the first GPU (issue 13, point 6): short real runs of the command line on CUDA, checked
against the same runs on the CPU, with a results table. Started by dev/gpu_check.sh.

    dev/gpu_check.sh [--out DIR]    on a CUDA machine: every check (estimated 4-5 minutes on one H200; not yet run)
    dev/gpu_check.sh --dry          on the CPU, smallest sizes: the checks that can run without CUDA

Each check is one run of `scripts/train_federated.py with ... tracking=file runs_dir=...` on the GPU
and, where results must agree, the same run on the CPU (`CUDA_VISIBLE_DEVICES=`, shared between
checks that need the same reference):

  a  NCCL, one site per GPU (site_ids=[0,...,n-1], backend=nccl)
  b  two sites on one GPU (site_ids=[0,0]; backend=auto picks gloo, which reduces CUDA tensors)
  c  precision=bf16 / fp16 autocast (against the fp32 CPU run, looser bound)
  d  a LoRA causal LM (tiny-gpt2) with base_precision=bf16 / fp16 (fp16 is refused on the CPU)
  e  virtual sites: num_sites=8 processes_per_device=2 (against num_sites=8 processes_per_device=1 on the CPU)

The sequence classifiers (tiny-bert, minilm) run from local copies without dropout (written to a
temporary folder: MiniLM's weights linked, its config with dropout 0; tiny-bert saved from its seeded
init): CUDA draws dropout masks from another generator than the CPU, so with dropout a GPU run and a
CPU run train on different masks and their losses differ by far more than the kernels' rounding.
Without it, fp32 on CUDA and on the CPU should agree within `FP32_TOLERANCE` (relative, validation.loss in
every round; not bitwise: other kernels, other summation orders). tiny-gpt2 (check d) is the nickname
itself, dropout included: its loss (~10, a random base) moves little in a short run, so the bound of
the half-precision base is far wider than what the masks change.

A run passes when it exits 0, ran where it should (the backend and device its log names, a
memory.peak_cuda_mb on CUDA), its losses are finite and its validation.loss agrees with the CPU run.
The table (markdown, to stdout and OUT/gpu_check.md, and OUT/gpu_check.json) gives per check the wall
seconds of the run (start-up included), the last round's training throughput (train.rows_per_s or
train.tokens_per_s), the peak CUDA memory and the agreement. Every run's Sacred record
(runs/<label>/<id>/) and output (logs/<label>.log) are in OUT/gpu_check_runs.tar.gz: OUT holds three
files, rewritten after each check. Exit code 1 if a check failed or the time budget (--budget-s) left
checks unrun, after running all the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_federated.py"
sys.path.insert(0, str(ROOT))  # scaling_fl, also from an interpreter it is not installed in (GPU_CHECK_PYTHON)

FP32_TOLERANCE = 1e-3  # relative, validation.loss: fp32 on CUDA vs fp32 on the CPU
# bf16 / fp16 autocast vs fp32 on the CPU: bf16 rounds to 8 bits of mantissa; fp16 to 11, but its loss
# scaler skips the first steps whose scaled gradients overflow. Guesses until a GPU has run them: the
# table shows the numbers.
BF16_TOLERANCE = 5e-2
FP16_TOLERANCE = 5e-2
LORA_BASE_TOLERANCE = 1e-2  # a half-precision frozen base (fp32 adapters) vs an fp32 base on the CPU

ARCHIVE = "gpu_check_runs.tar.gz"  # in OUT: runs/<label>/<id>/ (Sacred records) and logs/<label>.log
SKIP_NO_CUDA = "skipped: no CUDA"
SKIP_BUDGET = "skipped: time budget"


@dataclass(frozen=True)
class Sizes:
    """How big each run is: the real check, or the dry one that only keeps the plumbing alive."""

    rounds: int
    tiny_rows: int
    tiny_seq: int
    tiny_batch: int
    minilm_rows: int
    minilm_seq: int
    minilm_batch: int
    lora_rows: int
    lora_seq: int
    test_rows: int
    run_timeout_s: int


REAL = Sizes(
    rounds=2,
    tiny_rows=960,
    tiny_seq=64,
    tiny_batch=16,
    minilm_rows=480,
    minilm_seq=128,
    minilm_batch=32,
    lora_rows=480,
    lora_seq=64,
    test_rows=192,
    run_timeout_s=180,
)
DRY = Sizes(
    rounds=1,
    tiny_rows=128,
    tiny_seq=32,
    tiny_batch=8,
    minilm_rows=64,
    minilm_seq=32,
    minilm_batch=8,
    lora_rows=32,
    lora_seq=16,
    test_rows=16,
    run_timeout_s=120,
)


@dataclass(frozen=True)
class Check:
    name: str
    what: str
    model: str  # tiny-bert, minilm (both from a dropout-free copy) or tiny-gpt2 (LoRA causal LM)
    args: tuple[str, ...]  # the run's keys beyond the model's job
    reference: tuple[str, ...] | None  # the CPU run's keys (None: no agreement check)
    tolerance: float
    backend: str  # the backend the GPU run must use
    runs_on_cpu: bool = False  # also runs in --dry mode (on the CPU, against its CPU reference)


@dataclass
class Run:
    label: str
    command: list[str]
    returncode: int | None = None
    wall_s: float = 0.0
    metrics: dict[str, list[float]] = field(default_factory=dict)
    backend: str | None = None
    device: str | None = None
    error: str | None = None


@dataclass
class Row:
    name: str
    what: str
    result: str
    where: str = "-"
    wall_s: float | None = None
    throughput: str = "-"
    peak_cuda_mb: float | None = None
    loss: float | None = None
    reference_loss: float | None = None
    relative_diff: float | None = None
    tolerance: float | None = None
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.result == "pass"

    @property
    def failed(self) -> bool:
        return self.result.startswith("FAIL")


def checks(gpus: int) -> list[Check]:
    """Every check, in the order they run (the tiny models first: they find most problems soonest)."""
    one_per_gpu = "site_ids=[" + ",".join(str(gpu) for gpu in range(max(1, gpus))) + "]"
    out = []
    for model in ("tiny-bert", "minilm"):
        out += [
            Check(
                f"a-nccl-{model}",
                f"NCCL, one site per GPU ({max(1, gpus)}), fp32",
                model,
                (one_per_gpu, "backend=nccl"),
                (one_per_gpu,),
                FP32_TOLERANCE,
                "nccl",
            ),
            Check(
                f"b-2sites-1gpu-{model}",
                "2 sites on one GPU, backend=auto (gloo on CUDA tensors), fp32",
                model,
                ("site_ids=[0,0]", "backend=auto"),
                ("site_ids=[0,0]",),
                FP32_TOLERANCE,
                "gloo",
            ),
        ]
        for precision, tolerance in (("bf16", BF16_TOLERANCE), ("fp16", FP16_TOLERANCE)):
            out.append(
                Check(
                    f"c-{precision}-{model}",
                    f"precision={precision} autocast, 1 site (vs fp32 on the CPU)",
                    model,
                    ("site_ids=[0]", f"precision={precision}"),
                    ("site_ids=[0]",),
                    tolerance,
                    "nccl",
                )
            )
        if model == "tiny-bert":
            for precision in ("bf16", "fp16"):
                out.append(
                    Check(
                        f"d-lora-{precision}-tiny-gpt2",
                        f"causal LM, LoRA on a {precision} base, 1 site (vs an fp32 base on the CPU)",
                        "tiny-gpt2",
                        ("site_ids=[0]", f"base_precision={precision}"),
                        ("site_ids=[0]", "base_precision=fp32"),
                        LORA_BASE_TOLERANCE,
                        "nccl",
                        runs_on_cpu=precision == "bf16",  # fp16 matmuls need CUDA: refused on the CPU
                    )
                )
            out.append(
                Check(
                    "e-virtual-tiny-bert",
                    "8 sites in 2 processes on one GPU (vs 8 sites in 1 process on the CPU), fp32",
                    "tiny-bert",
                    ("site_ids=[0]", "num_sites=8", "processes_per_device=2"),
                    ("site_ids=[0]", "num_sites=8", "processes_per_device=1"),
                    FP32_TOLERANCE,
                    "gloo",
                    runs_on_cpu=True,
                )
            )
    return out


# --- models ---------------------------------------------------------------------------------


def _no_dropout(config) -> None:
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if hasattr(config, name):
            setattr(config, name, 0.0 if name != "classifier_dropout" else None)


def write_model(model: str, folder: Path, seed: int) -> str:
    """A local copy of a sequence classifier without dropout: what `model=` gets."""
    from scaling_fl.models import TINY_BERT, minilm_path

    target = folder / f"{model}-no-dropout"
    if target.exists():
        return str(target)
    source = minilm_path()
    if model == "minilm":
        target.mkdir(parents=True)
        for entry in source.iterdir():  # the weights and tokenizer files, linked; the config rewritten
            if entry.name != "config.json":
                (target / entry.name).symlink_to(entry)
        config = json.loads((source / "config.json").read_text())
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        (target / "config.json").write_text(json.dumps(config, indent=2))
        return str(target)
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    vocab_size = BertConfig.from_pretrained(source).vocab_size
    config = BertConfig(vocab_size=vocab_size, num_labels=4, **TINY_BERT)  # the synthetic task's 4 labels
    _no_dropout(config)
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return str(target)


# --- runs -----------------------------------------------------------------------------------


def job_args(check: Check, sizes: Sizes, model_path: str) -> list[str]:
    common = [
        "task_name=synthetic",
        f"num_rounds={sizes.rounds}",
        f"synthetic_test_size={sizes.test_rows}",
        "seed=7",
        "data_seed=7",
        "max_restarts=0",  # a failing site fails the run at once, not after three restarts
        "collective_timeout_s=60",
        "tracking=file",
    ]
    if check.model == "tiny-gpt2":
        return [
            *common,
            "objective=causal_lm",
            "model=tiny-gpt2",
            "peft=lora",
            "lora_r=8",
            f"synthetic_train_size={sizes.lora_rows}",
            f"max_seq_len={sizes.lora_seq}",
            f"batch_size={sizes.tiny_batch}",
            "learning_rate=0.01",
        ]
    if check.model == "minilm":
        return [
            *common,
            f"model={model_path}",
            f"synthetic_train_size={sizes.minilm_rows}",
            f"max_seq_len={sizes.minilm_seq}",
            f"batch_size={sizes.minilm_batch}",
            "learning_rate=1e-4",
        ]
    return [
        *common,
        f"model={model_path}",
        f"synthetic_train_size={sizes.tiny_rows}",
        f"max_seq_len={sizes.tiny_seq}",
        f"batch_size={sizes.tiny_batch}",
        "learning_rate=0.003",
    ]


LOG_LINE = re.compile(r"backend (\w+), device of (?:site|process) 0: (\S+)")


def start(label: str, args: list[str], work: Path, cpu: bool, timeout_s: float) -> Run:
    """One run of the real command line; its record goes to work/runs/<label>, its output to work/logs.
    A run past `timeout_s` is killed with its workers (its own process group)."""
    runs_dir = work / "runs" / label
    shutil.rmtree(runs_dir, ignore_errors=True)  # a rerun into the same folder starts afresh
    command = [sys.executable, str(SCRIPT), "with", *args, f"runs_dir={runs_dir}", f"job_name=gpu-check-{label}"]
    path = os.pathsep.join(part for part in (str(ROOT), os.environ.get("PYTHONPATH", "")) if part)
    env = {**os.environ, "SCALING_FL_PROGRESS": "lines", "PYTHONPATH": path}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    run = Run(label, command)
    began = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        run.returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the site workers it started
        stdout, stderr = process.communicate()
        run.error = f"timed out after {timeout_s:.0f} s"
    except BaseException:  # interrupted: leave no workers behind
        os.killpg(process.pid, signal.SIGKILL)
        raise
    run.wall_s = time.monotonic() - began
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{label}.log").write_text(
        f"$ {' '.join(command)}{'  (CUDA_VISIBLE_DEVICES=)' if cpu else ''}\n"
        f"exit code {run.returncode}, {run.wall_s:.1f} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    )
    found = LOG_LINE.search(stdout + stderr)
    if found:
        run.backend, run.device = found.group(1), found.group(2)
    if run.error is None and run.returncode != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        run.error = f"exit code {run.returncode}: " + ((errors or lines or ["no output"])[-1].strip())[:300]
    records = sorted(p for p in runs_dir.glob("*/metrics.json") if p.parent.name.isdigit())
    if records:
        raw = json.loads(records[-1].read_text())
        run.metrics = {name: [float(v) for v in entry["values"]] for name, entry in raw.items()}
    elif run.error is None:
        run.error = f"no metrics.json under {runs_dir}"
    return run


# --- checking -------------------------------------------------------------------------------


def relative_diff(values: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(values, reference, strict=True))


def judge(check: Check, run: Run, reference: Run | None, cuda: bool) -> Row:
    row = Row(check.name, check.what, "pass", tolerance=check.tolerance if check.reference else None)
    row.where = f"{run.device or '?'}, {run.backend or '?'}"
    row.wall_s = run.wall_s
    for unit in ("rows", "tokens"):
        if f"train.{unit}_per_s" in run.metrics:
            row.throughput = f"{run.metrics[f'train.{unit}_per_s'][-1]:,.0f} {unit}/s"
    if "memory.peak_cuda_mb" in run.metrics:
        row.peak_cuda_mb = max(run.metrics["memory.peak_cuda_mb"])
    losses = run.metrics.get("validation.loss", [])
    row.loss = losses[-1] if losses else None
    problems = []
    if run.error:
        problems.append(run.error)
    else:
        if not losses or not all(math.isfinite(v) for v in losses + run.metrics.get("train.loss", [])):
            problems.append(f"losses not finite: validation.loss={losses}")
        if cuda:
            if run.backend != check.backend:
                problems.append(f"backend {run.backend}, expected {check.backend}")
            if not (run.device or "").startswith("cuda"):
                problems.append(f"ran on {run.device}, not on CUDA")
            if row.peak_cuda_mb is None:
                problems.append("no memory.peak_cuda_mb: not a CUDA run")
    if check.reference is not None:
        ref_losses = reference.metrics.get("validation.loss", []) if reference else []
        if reference is None or reference.error:
            problems.append(f"CPU reference failed: {reference.error if reference else 'not run'}")
        elif losses and len(ref_losses) == len(losses):
            row.reference_loss = ref_losses[-1]
            row.relative_diff = relative_diff(losses, ref_losses)
            if not row.relative_diff <= check.tolerance:
                problems.append(f"validation.loss differs from the CPU's by {row.relative_diff:.2e} relative")
        elif losses:
            problems.append(f"{len(losses)} rounds of validation.loss, the CPU reference has {len(ref_losses)}")
    if problems:
        row.result = "FAIL: " + "; ".join(problems)
    return row


# --- the table ------------------------------------------------------------------------------


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[Row]) -> str:
    lines = [
        "| check | what | device, backend | wall s | throughput | peak CUDA MB | val loss | CPU val loss "
        "| rel diff (tol) | result |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        agreement = "-" if row.relative_diff is None else f"{row.relative_diff:.1e} ({row.tolerance:.0e})"
        if row.relative_diff is None and row.tolerance is not None and row.passed:
            agreement = f"- ({row.tolerance:.0e})"
        cells = [
            row.name,
            row.what,
            row.where,
            _number(row.wall_s, ".1f"),
            row.throughput,
            _number(row.peak_cuda_mb, ",.0f"),
            _number(row.loss, ".5f"),
            _number(row.reference_loss, ".5f"),
            agreement,
            row.result.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe() -> dict:
    """torch and CUDA as a run sees them. Only counts devices: this process creates no CUDA context
    (the GPUs' names come from nvidia-smi)."""
    import torch

    found = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": torch.cuda.is_available(),
        "nvidia_smi": shutil.which("nvidia-smi") is not None,
        "gpus": [],
    }
    if found["cuda"]:
        found["gpus"] = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
        if found["nvidia_smi"]:
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
            )
            names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
            if done.returncode == 0 and len(names) == len(found["gpus"]):
                found["gpus"] = names
    return found


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() or "?"
    except OSError:
        return "?"


def write_report(out: Path, header: list[str], rows: list[Row], references: dict[str, Run]) -> str:
    refs = [
        f"| {run.label} | {run.device or '?'}, {run.backend or '?'} | {run.wall_s:.1f} | "
        f"{'ok' if not run.error else 'FAIL: ' + run.error.replace('|', '/')} |"
        for run in references.values()
    ]
    text = "\n".join(
        [
            *header,
            "",
            table(rows),
            "",
            "CPU reference runs:",
            "",
            "| run | device, backend | wall s | result |",
            "|---|---|---:|---|",
            *refs,
            "",
        ]
    )
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(
        json.dumps(
            {
                "header": header,
                "rows": [asdict(row) for row in rows],
                "references": {key: {**asdict(run), "metrics": run.metrics} for key, run in references.items()},
            },
            indent=2,
        )
    )
    return text


def archive(work: Path, out: Path) -> None:
    """The runs' Sacred records and logs as one file (OUT stays three files: a device machine returns few)."""
    partial = out / f"{ARCHIVE}.partial"
    with tarfile.open(partial, "w:gz") as tar:
        for part in ("runs", "logs"):
            if (work / part).exists():
                tar.add(work / part, arcname=part, filter=lambda entry: None if "/_sources" in entry.name else entry)
    partial.replace(out / ARCHIVE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="dev/gpu_check.sh")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder of the results (default: $OUT, else runs/gpu_check)"
    )
    parser.add_argument(
        "--dry", action="store_true", help="on the CPU, smallest sizes, only the checks that run without CUDA"
    )
    parser.add_argument("--only", default="", help="comma-separated check names (or prefixes) to run; others skip")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="seconds for everything: no check starts with less than 30 s left, a run still going at the end "
        "is killed (default 450: 8 minutes with room for the start)",
    )
    args = parser.parse_args(argv)
    out = (args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    sizes = DRY if args.dry else REAL

    found = probe()
    cuda = bool(found["cuda"]) and not args.dry
    header = [
        f"# GPU check ({'dry, on the CPU' if args.dry else 'CUDA'})",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, commit {_git_commit()}, torch {found['torch']} "
        f"(CUDA build: {found['torch_cuda']}), GPUs: {', '.join(found['gpus']) or 'none'}",
    ]
    if not found["cuda"] and found.get("nvidia_smi"):
        warning = (
            f"WARNING: nvidia-smi is present but torch {found['torch']} (CUDA build: {found['torch_cuda']}) "
            f"sees no CUDA device in {sys.executable}: a CPU build of torch (or the driver is not usable). "
            "Nothing runs on a GPU; use an interpreter with a CUDA build of torch (GPU_CHECK_PYTHON)."
        )
        header += ["", f"**{warning}**"]
        print(warning, file=sys.stderr)
    if not args.dry and not found["cuda"]:
        header += ["", "**No CUDA: every check fails (use --dry for the CPU plumbing check).**"]

    def left() -> float:
        return args.budget_s - (time.monotonic() - began)

    def timeout() -> float:
        return max(1.0, min(sizes.run_timeout_s, left()))

    only = [name for name in args.only.split(",") if name]
    all_checks = checks(len(found["gpus"]) if cuda else 1)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # models, run records, logs: archived into OUT
    model_paths: dict[str, str] = {}
    references: dict[tuple[str, ...], Run] = {}
    reference_labels: dict[str, Run] = {}
    rows: list[Row] = []
    try:
        for check in all_checks:
            if only and not any(check.name.startswith(name) for name in only):
                continue
            if not args.dry and not found["cuda"]:
                rows.append(Row(check.name, check.what, f"FAIL: no CUDA (torch {found['torch']} sees no GPU)"))
                continue
            if args.dry and not check.runs_on_cpu:
                rows.append(Row(check.name, check.what, SKIP_NO_CUDA))
                continue
            if left() < 30:
                rows.append(Row(check.name, check.what, SKIP_BUDGET))
                continue
            print(f"gpu_check: {check.name}: {check.what}", file=sys.stderr, flush=True)
            try:
                if check.model != "tiny-gpt2" and check.model not in model_paths:
                    model_paths[check.model] = write_model(check.model, work / "models", seed=7)
            except Exception as exc:  # the check fails, the others still run
                rows.append(Row(check.name, check.what, f"FAIL: writing its model: {type(exc).__name__}: {exc}"))
                continue
            base = job_args(check, sizes, model_paths.get(check.model, check.model))
            reference = None
            if check.reference is not None:
                key = (*base, *check.reference)
                if key not in references:
                    label = f"cpu-{check.name}"
                    references[key] = start(label, list(key), work, cpu=True, timeout_s=timeout())
                    reference_labels[label] = references[key]
                reference = references[key]
            run = start(check.name, [*base, *check.args], work, cpu=not cuda, timeout_s=timeout())
            rows.append(judge(check, run, reference, cuda))
            print(f"gpu_check: {check.name}: {rows[-1].result}", file=sys.stderr, flush=True)
            write_report(out, header, rows, reference_labels)  # what is done so far survives a kill
            archive(work, out)
        header += ["", f"{len(rows)} checks in {time.monotonic() - began:.0f} s; results in {out}"]
        print(write_report(out, header, rows, reference_labels))
        archive(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    incomplete = [row.name for row in rows if row.result == SKIP_BUDGET]
    failed = [row.name for row in rows if row.failed]
    if failed or incomplete:
        print(
            f"gpu_check: {len(failed)} failed ({', '.join(failed) or '-'}), {len(incomplete)} left unrun by the "
            f"time budget ({', '.join(incomplete) or '-'})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
