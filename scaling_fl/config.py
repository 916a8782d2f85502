"""One place for the experiment's config: every key is declared once, as a field of `Config`.

A declaration gives the key's name and type (the field), its default, the values it accepts
(a rule: bounds, choices, ...) and one line of help. Everything else is derived from the
declarations: `DEFAULTS` (Sacred's config), per-key validation in `resolve`, the `help`
listing (`python scripts/train_federated.py help`) and the README's config reference
(`python -m scaling_fl.config --readme README.md` rewrites it; a test fails when it drifts).
Rules that tie several keys together (split / iid_split, sync modes, site counts, ...) are
the explicit `_check_*` / `_resolve_*` functions below.

Validation runs in the launching process, before any observer or worker starts, so
a bad value costs the user one line and exit code 2, never a half-started job.

This module imports nothing from the rest of the package (the launcher reads it first, and
`python -m scaling_fl.config` renders the reference without torch); tests check that the
choices declared here are the ones the package implements.
"""

from __future__ import annotations

import dataclasses
import getpass
import math
import os
import re
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from scaling_fl.errors import UserError

# Choices of the keys whose values name something the package implements; tests/test_config_reference.py
# checks them against scaling_fl.data.TASK_NAMES, exchange.factory.EXCHANGES, exchange.sparse.*,
# exchange.dynamic.SYNC_MODES and strategies.factory.STRATEGIES.
TASK_NAMES = ("agnews", "yelp", "yelp_full", "imdb", "spooky_author", "csv", "synthetic")
SPLITS = ("iid", "label_sorted", "dirichlet", "none")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold")
EXCHANGES = ("dense", "sparse", "int8", "sparse_int8")
SCOPES = ("model", "tensor")
CRITERIA = ("largest_magnitude_change", "largest_final_magnitude", "largest_increase_in_magnitude")
SPARSE_AVERAGES = ("per_position", "fl4health")
SYNC_MODES = ("round", "periodic", "dynamic")
BACKENDS = ("auto", "nccl", "gloo")
TRACKING = ("auto", "mongo", "file", "none")
RESUME = ("auto", "force")
SITE_STATE_OFFLOADS = ("cpu", "disk", "device")
ROUND_BUFFER_OFFLOADS = ("none", "cpu", "disk")  # scaling_fl/round_buffers.py
DP_MODES = ("none", "client")
AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum")
BYZANTINE_MODES = ("sign_flip", "scale")
OBJECTIVES = ("sequence_classification", "causal_lm")
PEFT_METHODS = ("none", "lora")
LORA_VARIANTS = ("lora", "ffa")
ROLES = ("simulation", "coordinator", "site")


class ConfigError(UserError, ValueError):
    """A user-facing, one-line description of a bad config value and what is allowed."""


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _short_number(value: float) -> str:
    """1e6 -> 1e6, 10.0 -> 10, 0.5 -> 0.5: how bounds read in the help and the README."""
    text = f"{value:g}"
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", text)


# Rules: what one key accepts. `convert` returns the value the workers get or raises ValueError;
# `allowed` is the error's "is not allowed: ..." text; `short` is the help's and the README's.


class Rule:
    allowed = ""
    short = ""

    def convert(self, value: Any) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Rule):
    minimum: int

    @property
    def allowed(self) -> str:
        return f"an integer >= {self.minimum}"

    @property
    def short(self) -> str:
        return f"integer >= {self.minimum}"

    def convert(self, value: Any) -> int:
        if not _is_int(value) or value < self.minimum:
            raise ValueError
        return value


@dataclass(frozen=True)
class Number(Rule):
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def _interval(self, fmt: Callable[[float], str]) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{left}{fmt(self.low)}, {fmt(self.high)}{right}"

    @property
    def allowed(self) -> str:
        return f"a number in {self._interval(lambda bound: str(float(bound)))}"

    @property
    def short(self) -> str:
        return f"number in {self._interval(_short_number)}"

    def convert(self, value: Any) -> float:
        ok = (
            _is_number(value)
            and (value > self.low if self.low_open else value >= self.low)
            and (value < self.high if self.high_open else value <= self.high)
        )
        if not ok:
            raise ValueError
        return float(value)


@dataclass(frozen=True)
class Choice(Rule):
    choices: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.choices)

    @property
    def short(self) -> str:
        return ", ".join(self.choices)

    def convert(self, value: Any) -> str:
        if value not in self.choices:
            raise ValueError
        return value


@dataclass(frozen=True)
class Flag(Rule):
    allowed = "True or False"
    short = "True, False"

    def convert(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError
        return value


@dataclass(frozen=True)
class Text(Rule):
    """A string; non-empty (not only spaces) unless empty_ok."""

    allowed: str
    short: str = "text"
    empty_ok: bool = False

    def convert(self, value: Any) -> str:
        if not isinstance(value, str) or not (self.empty_ok or value.strip()):
            raise ValueError
        return value


PATH = Text("a non-empty string (a path, s3:// or gs:// URL)", "path, s3:// or gs:// URL")


@dataclass(frozen=True)
class Custom(Rule):
    """A rule of its own: `check` returns the converted value or raises ValueError."""

    check: Callable[[Any], Any]
    allowed: str
    short: str

    def convert(self, value: Any) -> Any:
        return self.check(value)


def _site_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) and v >= 0 for v in value):
        return tuple(value)
    raise ValueError


def _site_numbers(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)) and all(_is_int(v) and v >= 0 for v in value) and len(set(value)) == len(value):
        return tuple(sorted(value))
    raise ValueError


def _text_columns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError


def _train_paths(value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    raise ValueError


def _job_name(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", value):
        return value
    raise ValueError


def _site_name_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and value and len(set(value)) == len(value):
        return tuple(_job_name(name) for name in value)
    raise ValueError


def _address(value: Any) -> str:
    if (
        isinstance(value, str)
        and re.fullmatch(r"\[?[A-Za-z0-9_.:-]*\]?:[0-9]{1,5}", value)
        and int(value.rsplit(":")[-1]) < 65536
    ):
        return value
    raise ValueError


ADDRESS = Custom(_address, "HOST:PORT, e.g. coordinator.example.org:29400", "HOST:PORT")
NAME = Custom(
    _job_name,
    "letters, digits, '_', '.', '-' (max 128), starting with a letter or digit",
    "name (letters, digits, _ . -)",
)


def _default_author() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry inside some containers
        return os.environ.get("USER", "unknown")


@dataclass(frozen=True)
class Key:
    """One config key, as declared in `Config` (name and type come from the field)."""

    default: Any
    rule: Rule
    help: str
    optional: bool  # None is accepted (and kept, unless a _resolve_* function gives it a meaning)
    shown_default: str | None  # how the default reads where it is computed (author, job_name)
    section: str | None  # set on the first key of each section; KEYS carries it to the keys below
    name: str = ""
    type: str = ""

    @property
    def allowed(self) -> str:
        return self.rule.allowed + (" or None" if self.optional else "")

    @property
    def short(self) -> str:
        return self.rule.short + (" or None" if self.optional else "")

    @property
    def default_text(self) -> str:
        return self.shown_default if self.shown_default is not None else value_text(self.default)

    def validate(self, value: Any) -> Any:
        if value is None and self.optional:
            return None
        try:
            return self.rule.convert(value)
        except ValueError:
            raise _fail(self.name, value, self.allowed) from None


def value_text(value: Any) -> str:
    """A value as it is typed after `with` (lists without spaces, strings unquoted)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(item) for item in value) + "]"
    if isinstance(value, float):
        return _short_number(value) if value != int(value) or abs(value) >= 1e6 else repr(value)
    return str(value)


def key(
    default: Any,
    rule: Rule,
    help: str,
    *,
    optional: bool | None = None,
    shown_default: str | None = None,
    section: str | None = None,
) -> Any:
    """Declares a key as a field of Config; optional (None accepted) defaults to `default is None`."""
    optional = default is None if optional is None else optional
    return field(metadata={"key": Key(default, rule, help, optional, shown_default, section)})


# The README sections that say more about a section of keys: title and anchor.
SECTION_LINKS = {
    "strategy, exchange, sync": (
        "Strategies, exchanges and synchronization",
        "strategies-exchanges-and-synchronization",
    ),
    "tracking": ("Tracking", "tracking"),
    "checkpoints and faults": ("Checkpoints and resume", "checkpoints-and-resume"),
}

# The keys of the original scaling_fl, same names and meaning.
ORIGINAL_KEYS = (
    "learning_rate",
    "max_seq_len",
    "batch_size",
    "val_batch_size",
    "num_rounds",
    "num_local_epochs",
    "site_ids",
    "task_name",
    "train_path",
    "test_path",
    "model",
    "data_seed",
    "iid_split",
    "job_name",
    "checkpoints_dir",
    "author",
)


@dataclass(frozen=True)
class Config:
    """The validated, alias-resolved experiment config that workers receive.

    Each field declares one key: key(default, rule, help). The type is the resolved value's
    (site_ids becomes a tuple, split and job_name are never None, ...).
    """

    # Sites: how many, on how many processes, and who trains each round (see README, "Many sites").
    site_ids: tuple[int, ...] = key(
        [0, 0, 0, 0],
        Custom(
            _site_ids,
            "a non-empty list of GPU ids >= 0, one entry per site, e.g. site_ids=[0,0,1,1]",
            "list of GPU ids >= 0",
        ),
        "one entry per site on this node: the GPU it runs on (a GPU may appear several times). On a machine "
        "without CUDA all sites run on the CPU (gloo) and only the count matters",
        section="sites and rounds",
    )
    num_sites: int | None = key(
        None, Int(1), "N sites spread over the distinct devices of `site_ids` (`None`: one site per `site_ids` entry)"
    )
    processes_per_device: int | None = key(
        None,
        Int(1),
        "worker processes per device that host its sites (`None`: one per site; with `num_sites` "
        "one per GPU, or per CPU core)",
    )
    fraction_fit: float = key(
        1.0,
        Number(0.0, 1.0, low_open=True),
        "share of the sites that train each round (at least `min_fit_sites`), drawn from (seed, round)",
    )
    min_fit_sites: int = key(1, Int(1), "at least this many sites train each round")
    site_state_offload: str = key(
        "cpu",
        Choice(SITE_STATE_OFFLOADS),
        "where a process keeps the state of the sites it hosts between rounds (error-feedback residuals): "
        "`cpu` host memory, `disk` one file per site in the job's temporary folder, `device` the GPU",
    )
    round_buffers_offload: str = key(
        "none",
        Choice(ROUND_BUFFER_OFFLOADS),
        "where a process that trains sites in turn keeps the round's global model and update sums while a site "
        "trains: `none` in place, `cpu` host memory (from a GPU), `disk` a file in the job's temporary folder",
    )
    num_rounds: int = key(10, Int(1), "federated rounds")
    num_local_epochs: int = key(1, Int(1), "local epochs per round (ignored when `local_steps` > 0)")
    local_steps: int = key(0, Int(0), "local optimizer steps per round instead of epochs (0: use epochs)")

    # Local training.
    learning_rate: float = key(5e-5, Number(0.0, 10.0, low_open=True), "local learning rate", section="local training")
    batch_size: int = key(16, Int(1), "local training batch size")
    val_batch_size: int = key(64, Int(1), "evaluation batch size")
    grad_accum_steps: int = key(
        1, Int(1), "micro-batches per optimizer step (exactly one big batch: losses are summed over the step's rows)"
    )
    max_grad_norm: float = key(1.0, Number(0.0, 1e6), "gradient clipping; `0` or `None` turns it off", optional=True)
    optimizer: str = key(
        "adamw",
        Choice(OPTIMIZERS),
        "`adamw` (torch's fused kernel where the device has one), or `sgd` (with `momentum`)",
    )
    momentum: float = key(0.0, Number(0.0, 1.0, high_open=True), "SGD momentum")
    weight_decay: float = key(0.0, Number(0.0, 1.0), "AdamW/SGD weight decay (not on biases and norm weights)")
    proximal_mu: float = key(
        0.0,
        Number(0.0, 1e6),
        "FedProx: adds mu/2 ||w - w_global||^2 to each site's local loss (`0`: plain local training, bitwise)",
    )
    lr_scheduler: str = key(
        "linear",
        Choice(LR_SCHEDULERS),
        "learning rate schedule over all local steps of the whole run, after the warm-up",
    )
    warmup_ratio: float = key(0.0, Number(0.0, 1.0, high_open=True), "share of all local steps spent warming up")
    precision: str = key("fp32", Choice(PRECISIONS), "`fp32`, or `bf16` / `fp16` autocast (CUDA only)")
    max_seq_len: int = key(128, Int(8), "truncation length; batches are padded only to their longest row")
    seed: int = key(42, Int(0), "seeds model init, batch order and dropout (per site and round)")

    # Data.
    task_name: str = key("synthetic", Choice(TASK_NAMES), "the data set (see Tasks)", section="data")
    train_path: str | tuple[str, ...] | None = key(
        None,
        Custom(
            _train_paths, "a path, s3:// or gs:// URL, or a list of them (one per site, with split=none)", "path(s)"
        ),
        "training data of the task (see Tasks); with `split=none` a list, one file per site",
    )
    test_path: str | None = key(None, PATH, "test data of the task (see Tasks)")
    text_columns: tuple[str, ...] | None = key(
        None,
        Custom(_text_columns, "a list of CSV column names, e.g. text_columns=['title','body']", "list of column names"),
        "for `task_name=csv`: the columns joined into the text",
    )
    label_column: str | None = key(
        None, Text("a CSV column name", "column name"), "for `task_name=csv`: the label's column"
    )
    synthetic_train_size: int = key(2000, Int(4), "training rows of the synthetic task")
    synthetic_test_size: int = key(500, Int(4), "test rows of the synthetic task")
    split: str = key(
        None,
        Choice(SPLITS),
        "`iid`, `label_sorted` (the original non-IID split), `dirichlet`, or `none`: site k trains on the k-th "
        "`train_path` file (`None`: from `iid_split`)",
    )
    iid_split: bool = key(
        True, Flag(), "the original key: `False` means `split=label_sorted` (when `split` is not given)"
    )
    dirichlet_beta: float = key(
        0.5, Number(0.0, 1e6, low_open=True), "concentration of the Dirichlet split (small = skewed)"
    )
    sample_percentage: float = key(
        1.0, Number(0.0, 1.0, low_open=True), "fraction of the training set used (seeded), before splitting"
    )
    validation_fraction: float = key(
        0.1,
        Number(0.0, 0.5),
        "share of the training rows (after `sample_percentage`) held out, seeded and stratified, for the "
        "`validation.*` metrics of every round; `0`: no validation set, `validation.*` are then scored on "
        "the test set (as before this key)",
    )
    test_every: int = key(
        0, Int(0), "also score the test set (`test.*`) every N rounds; `0`: after the last round only"
    )
    data_seed: int = key(42, Int(0), "seeds the split, the validation set and the synthetic data")
    model: str = key(
        "minilm",
        Text(
            "a nickname (see README), a Hugging Face id or a local directory", "nickname, Hugging Face id or directory"
        ),
        "the model (see Models)",
    )

    # What is learned and which weights train (see README, "LLM fine-tuning").
    objective: str = key(
        "sequence_classification",
        Choice(OBJECTIVES),
        "`sequence_classification` (a head over the labels), or `causal_lm`: next-token SFT on the text "
        "(or on `response_column` after `prompt_column`)",
        section="LLM fine-tuning",
    )
    prompt_column: str | None = key(
        None, Text("a column name", "column name"), "`objective=causal_lm`: the prompt's CSV/JSONL column"
    )
    response_column: str | None = key(
        None,
        Text("a column name", "column name"),
        "`objective=causal_lm`: the response's column; the loss covers response tokens only",
    )
    prompt_template: str = key(
        "{prompt}\n",
        Text("a string containing {prompt}", "text with {prompt}"),
        "how a prompt is written before its response",
    )
    peft: str = key("none", Choice(PEFT_METHODS), "`lora`: train low-rank adapters (peft) on a frozen base")
    lora_r: int = key(8, Int(1), "`peft=lora`: the adapters' rank")
    lora_alpha: float = key(
        16.0, Number(0.0, 1e6, low_open=True), "`peft=lora`: scale alpha (the update is alpha/r BA)"
    )
    lora_dropout: float = key(0.0, Number(0.0, 1.0, high_open=True), "`peft=lora`: dropout on the adapters' input")
    lora_target_modules: tuple[str, ...] | None = key(
        None,
        Custom(_text_columns, "a list of module names, e.g. lora_target_modules=['c_attn']", "list of module names"),
        "`peft=lora`: the modules that get adapters (`None`: peft's default for the architecture)",
    )
    lora_variant: str = key(
        "lora",
        Choice(LORA_VARIANTS),
        "`ffa`: FFA-LoRA, A frozen at its seeded init and only B trained, so the mean of the updates is exact",
    )
    base_precision: str = key(
        "fp32",
        Choice(PRECISIONS),
        "`peft=lora`: dtype of the frozen base (`bf16`/`fp16` halve its memory; adapters stay fp32; fp16 needs CUDA)",
    )
    gradient_checkpointing: bool = key(
        False, Flag(), "recompute activations in the backward pass (less memory, about a third more time)"
    )
    merge_lora: bool = key(False, Flag(), "`save_final_model` with `peft=lora`: also write the merged model")
    sample_prompts: tuple[str, ...] | None = key(
        None,
        Custom(_text_columns, "a list of prompts, e.g. sample_prompts=['The movie was']", "list of prompts"),
        "`objective=causal_lm`: after the last round, decode these greedily into the run's `samples.json`",
    )
    sample_max_new_tokens: int = key(32, Int(1), "tokens generated per sample prompt")

    # Server strategy (what is done with the mean update); None takes the strategy's default.
    strategy: str = key(
        "fedavg", Choice(STRATEGIES), "what the server does with the mean update", section="strategy, exchange, sync"
    )
    server_learning_rate: float | None = key(
        None,
        Number(0.0, 1e3, low_open=True),
        "server step size (`None`: the strategy's default, see `scaling_fl/strategies/factory.py`)",
    )
    server_momentum: float | None = key(
        None, Number(0.0, 1.0, high_open=True), "`fedavgm` server momentum (`None`: the strategy's default)"
    )
    beta1: float | None = key(
        None,
        Number(0.0, 1.0, high_open=True),
        "`fedadam`/`fedyogi`/`fedadagrad` first moment decay (`None`: the strategy's default)",
    )
    beta2: float | None = key(
        None,
        Number(0.0, 1.0, high_open=True),
        "`fedadam`/`fedyogi`/`fedadagrad` second moment decay (`None`: the strategy's default)",
    )
    tau: float | None = key(
        None,
        Number(0.0, 1e3, low_open=True),
        "`fedadam`/`fedyogi`/`fedadagrad` adaptivity (`None`: the strategy's default)",
    )
    aggregation: str = key(
        "mean",
        Choice(AGGREGATIONS),
        "what the sites' updates are reduced to: their `mean`, or a robust rule (`median`, `trimmed_mean`, "
        "`krum`; unweighted, every participant's update gathered, see Robust aggregation)",
    )
    trim_fraction: float = key(
        0.1,
        Number(0.0, 0.5, high_open=True),
        "`aggregation=trimmed_mean`: share of the values dropped at each end of every coordinate",
    )
    krum_byzantine: int = key(0, Int(0), "`aggregation=krum`: f, the number of byzantine sites Krum tolerates")
    krum_select: int = key(
        1, Int(1), "`aggregation=krum`: m, how many of the best-scored updates are averaged (1: Krum, >1: Multi-Krum)"
    )
    byzantine_sites: tuple[int, ...] = key(
        [],
        Custom(_site_numbers, "a list of distinct site numbers >= 0, e.g. byzantine_sites=[0,3]", "list of sites"),
        "fault injection: these sites send a corrupted update every round they train (`byzantine_mode`)",
    )
    byzantine_mode: str = key(
        "sign_flip",
        Choice(BYZANTINE_MODES),
        "`sign_flip` sends -update, `scale` sends `byzantine_scale` x update",
    )
    byzantine_scale: float = key(10.0, Number(-1e6, 1e6), "`byzantine_mode=scale`: the factor")
    # Exchange (how updates cross the wire) and synchronization (when).
    exchange: str = key("dense", Choice(EXCHANGES), "how updates cross the wire")
    bucket_size_mb: float = key(
        32, Number(0.0, 4096.0, low_open=True), "bound of the buckets (and of every exchange buffer but the residual)"
    )
    sparsity_level: float = key(0.1, Number(0.0, 1.0, low_open=True), "fraction of values each site sends")
    sparsity_scope: str = key(
        "model", Choice(SCOPES), "`model` (global top-k) or `tensor` (the fraction of every tensor)"
    )
    selection_criterion: str = key("largest_magnitude_change", Choice(CRITERIA), "which values a sparse site sends")
    sparse_average: str = key(
        "per_position", Choice(SPARSE_AVERAGES), "`per_position`, or `fl4health` (their diluting rule, for comparison)"
    )
    error_feedback: bool = key(True, Flag(), "sparse and int8 keep what they did not send for the next exchange")
    quantization_block_size: int = key(256, Int(1), "values per int8 scale")
    sync: str = key(
        "round",
        Choice(SYNC_MODES),
        "`round`, `periodic` (every `comm_period` steps) or `dynamic` (`check_every`, `delta_threshold`)",
    )
    comm_period: int | None = key(None, Int(1), "`sync=periodic`: local steps between synchronizations")
    check_every: int | None = key(
        None, Int(1), "`sync=dynamic`: local steps between divergence checks (`None`: once a round)"
    )
    delta_threshold: float | None = key(
        None, Number(0.0, 1e12), "`sync=dynamic`: synchronize when max ‖w − r‖² over the sites exceeds it"
    )
    # Differential privacy.
    dp: str = key(
        "none",
        Choice(DP_MODES),
        "`client`: DP-FedAvg, each site's update clipped to `dp_clip_norm`, Gaussian noise on the mean",
    )
    dp_clip_norm: float | None = key(None, Number(0.0, 1e6, low_open=True), "`dp=client`: L2 bound of a site's update")
    dp_noise_multiplier: float = key(
        1.0, Number(0.0, 1e3), "`dp=client`: noise std on the mean = multiplier x clip norm / participants"
    )
    dp_delta: float = key(
        1e-5, Number(0.0, 1.0, low_open=True, high_open=True), "`dp=client`: delta of `privacy.epsilon`"
    )
    dp_adaptive_clip: bool = key(
        False,
        Flag(),
        "`dp=client`: adapt the clip norm each round toward `dp_target_quantile` of the updates' norms "
        "(Andrew et al. 2021); `dp_clip_norm` is the first round's",
    )
    dp_target_quantile: float = key(
        0.5, Number(0.0, 1.0, low_open=True, high_open=True), "`dp_adaptive_clip`: share of updates left unclipped"
    )
    dp_clip_learning_rate: float = key(
        0.2, Number(0.0, 10.0, low_open=True), "`dp_adaptive_clip`: eta of the geometric clip-norm update"
    )
    dp_clipped_count_stddev: float | None = key(
        None,
        Number(0.0, 1e6, low_open=True),
        "`dp_adaptive_clip`: noise std of the count of unclipped updates (`None`: participants / 20)",
    )

    # Tracking.
    job_name: str = key(
        None,
        Custom(
            _job_name,
            "letters, digits, '_', '.', '-' (max 128), starting with a letter or digit",
            "letters, digits, _ . - (max 128)",
        ),
        "names the run; the same name continues its record and checkpoints",
        shown_default="time stamp",
        section="tracking",
    )
    author: str = key(
        _default_author(), Text("a string", "text", empty_ok=True), "recorded in the config", shown_default="$USER"
    )
    tracking: str = key(
        "auto",
        Choice(TRACKING),
        "`auto`: Mongo when `SACRED_URL`/`SACRED_HOST` is set, else the file store under `runs_dir`",
    )
    runs_dir: str = key("runs", Text("a directory path", "directory"), "the Sacred file store")
    per_site_metrics: bool = key(
        False,
        Flag(),
        "also `site.{k}.*` metrics (each site scores its own local model on the full validation set); a "
        "cross-silo run always records each site's training metrics as `site.{site_name}.*`, and with this key "
        "its local model scored on its own validation rows",
    )
    save_final_model: bool = key(
        False,
        Flag(),
        "the final global model as a folder `from_pretrained` loads (LoRA: `PeftModel.from_pretrained`), tokenizer "
        "included; its files are run artifacts (`final_model.*`)",
    )
    final_model_dir: str | None = key(
        None, PATH, "`save_final_model`: also copy the folder there (local, `s3://`, `gs://`)"
    )
    tensorboard_dir: str | None = key(
        None, PATH, "also write TensorBoard event files there (needs the tensorboard extra)"
    )

    # Checkpoints and fault tolerance.
    checkpoints_dir: str | None = key(
        None, PATH, "where checkpoints go (local, `s3://`, `gs://`)", section="checkpoints and faults"
    )
    checkpoint_every: int = key(1, Int(1), "rounds between checkpoints (the last round always gets one)")
    keep_last_checkpoints: int = key(3, Int(1), "how many complete checkpoints to keep")
    resume: str = key(
        "auto",
        Choice(RESUME),
        "`auto` continues a compatible checkpoint; `force` also one of another job or experiment",
    )
    resume_from: str | None = key(None, PATH, "an explicit checkpoint (a round folder or a checkpoints folder)")
    max_restarts: int = key(
        3, Int(0), "restarts of all sites after a site failure (torch elastic), each from the last checkpoint"
    )

    # Cross-silo: a coordinator and sites started separately (README, "Cross-silo").
    role: str = key(
        "simulation",
        Choice(ROLES),
        "`simulation`: one command runs every site; `coordinator`: holds the config, the evaluation data and the "
        "tracking, admits `num_sites` sites and trains nothing; `site`: one silo, its own `train_path`, every "
        "training key from the coordinator",
        section="cross-silo",
    )
    listen_address: str = key(
        "0.0.0.0:29400",
        ADDRESS,
        "`role=coordinator`: where sites join (HOST:PORT); the sites also reach PORT+1 (the collective store)",
    )
    coordinator_address: str | None = key(
        None, ADDRESS, "`role=site`: the coordinator's HOST:PORT (the host name its TLS certificate names)"
    )
    site_name: str | None = key(None, NAME, "`role=site`: this site's name, unique in the run")
    site_names: tuple[str, ...] | None = key(
        None,
        Custom(
            _site_name_list, "a list of distinct names, e.g. site_names=['hospital-a','hospital-b']", "list of names"
        ),
        "`role=coordinator`: the invited sites, in rank order (`None`: any name; ranks by sorted name)",
    )
    min_sites: int | None = key(
        None,
        Int(1),
        "`role=coordinator`: start with at least this many at `join_timeout_s` (`None`: all); below the invited "
        "count the run also goes on when a site leaves (needs `site_names`, `checkpoints_dir`)",
    )
    join_timeout_s: float = key(
        600, Number(1.0, 86400.0), "how long the coordinator waits for its sites, and a site for the start"
    )
    tls_certfile: str | None = key(None, PATH, "`role=coordinator`: the TLS certificate of the door (PEM)")
    tls_keyfile: str | None = key(None, PATH, "`role=coordinator`: its private key (PEM)")
    tls_cafile: str | None = key(
        None, PATH, "`role=site`: the CA certificate that signed the coordinator's (`None`: the system's CAs)"
    )
    insecure: bool = key(
        False, Flag(), "plain TCP at the door instead of TLS: the join token crosses in clear text (a warning says so)"
    )
    config_hash: str | None = key(
        None,
        Text("the 16 hex digits the coordinator logs", "hash"),
        "`role=site`: join only the run with this config hash (the coordinator logs it)",
    )

    # Runtime.
    backend: str = key(
        "auto",
        Choice(BACKENDS),
        "`auto`: `nccl` when every GPU hosts one site, else `gloo` (NCCL refuses two ranks on one GPU); or force one",
        section="runtime",
    )
    collective_timeout_s: float = key(
        60, Number(1.0, 86400.0), "seconds after which a dead peer is detected (not torch's 30 minutes)"
    )

    @property
    def total_sites(self) -> int:
        """Sites on this node: num_sites, or one per site_ids entry."""
        return self.num_sites if self.num_sites is not None else len(self.site_ids)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (lists for the tuple keys), as Sacred records them and workers receive them."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in self.__dict__.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """The inverse of as_dict: the resolved config a worker was given."""
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


def _declared_keys() -> dict[str, Key]:
    keys, section = {}, None
    for declared in fields(Config):
        spec: Key = declared.metadata["key"]
        section = spec.section or section
        keys[declared.name] = dataclasses.replace(spec, name=declared.name, type=str(declared.type), section=section)
    return keys


KEYS: dict[str, Key] = _declared_keys()
DEFAULTS: dict[str, Any] = {name: spec.default for name, spec in KEYS.items()}


# Rules between keys, after each key passed its own.


def _resolve_split(values: dict) -> str:
    if values["role"] != "simulation":  # a cross-silo site trains on exactly its own file
        if values["split"] not in (None, "none"):
            raise _fail(
                "split", values["split"], f"none (or unset) with role={values['role']}: a site trains its own file"
            )
        return "none"
    if values["split"] is None:
        return "iid" if values["iid_split"] else "label_sorted"
    return values["split"]


def _check_precision(precision: str) -> None:
    if precision in ("bf16", "fp16"):
        import torch

        if not torch.cuda.is_available():
            raise _fail("precision", precision, "bf16 and fp16 need CUDA; use precision=fp32 on CPU")


def _check_privacy(values: dict) -> None:
    if values["dp"] == "none":
        return
    if values["dp_clip_norm"] is None:
        raise _fail("dp_clip_norm", None, "a number > 0 (the L2 bound of each site's update) with dp=client")
    if values["exchange"] != "dense":
        raise _fail(
            "exchange",
            values["exchange"],
            "dense with dp=client (top-k and int8 messages with error feedback or per-position averaging can "
            "carry more than the clipped norm into the mean)",
        )
    if values["sync"] != "round":
        raise _fail("sync", values["sync"], "round with dp=client (each round's update is clipped and noised once)")


def participant_count(num_sites: int, fraction_fit: float, min_fit_sites: int) -> int:
    """Sites that train each round: max(min_fit_sites, floor(fraction_fit x N)), at most N (Flower's rule)."""
    return min(num_sites, max(min_fit_sites, math.floor(fraction_fit * num_sites + 1e-9)))


def _check_robust(config: Config) -> None:
    """Robust aggregation and byzantine sites: what they need of the other keys and of the site count."""
    if config.aggregation != "mean":
        for key_name, needed, why in (
            ("exchange", "dense", "the rules read every participant's exact update"),
            ("sync", "round", "each round's updates are aggregated once"),
            ("dp", "none", "DP-FedAvg's noise is calibrated to the mean's sensitivity"),
        ):
            if getattr(config, key_name) != needed:
                raise _fail(
                    key_name, getattr(config, key_name), f"{needed} with aggregation={config.aggregation} ({why})"
                )
    if config.strategy == "scaffold":
        for key_name, needed, why in (
            ("sync", "round", "control variates are updated once per round of local steps"),
            ("dp", "none", "the control variates would carry un-noised gradients"),
            ("aggregation", "mean", "SCAFFOLD's server step is the mean of the sites' updates"),
        ):
            if getattr(config, key_name) != needed:
                raise _fail(key_name, getattr(config, key_name), f"{needed} with strategy=scaffold ({why})")
    if config.byzantine_sites and config.sync != "round":
        raise _fail("sync", config.sync, "round with byzantine_sites (a byzantine site corrupts each round's update)")
    sites = config.total_sites
    outside = [site for site in config.byzantine_sites if site >= sites]
    if outside:
        raise _fail(
            "byzantine_sites", list(config.byzantine_sites), f"site numbers below the number of sites ({sites})"
        )
    if config.aggregation == "krum":
        count = participant_count(sites, config.fraction_fit, config.min_fit_sites)
        if count < 2 * config.krum_byzantine + 3:
            raise _fail(
                "krum_byzantine",
                config.krum_byzantine,
                f"at most {(count - 3) // 2} with {count} sites a round (Krum needs 2 f + 3 sites)"
                if count >= 3
                else f"Krum needs at least 3 sites a round, this run has {count}",
            )
        if config.krum_select > count - config.krum_byzantine:
            raise _fail(
                "krum_select",
                config.krum_select,
                f"at most sites a round - krum_byzantine = {count - config.krum_byzantine}",
            )


def clipped_count_stddev(config: Config) -> float:
    """dp_clipped_count_stddev, or the paper's recommendation: expected participants / 20."""
    if config.dp_clipped_count_stddev is not None:
        return config.dp_clipped_count_stddev
    return participant_count(config.total_sites, config.fraction_fit, config.min_fit_sites) / 20


def _check_adaptive_clip(config: Config) -> None:
    """Adaptive clipping spends part of the noise on the clipped count: its std must exceed z / 2."""
    if config.dp == "none" or not config.dp_adaptive_clip or config.dp_noise_multiplier == 0:
        return
    stddev = clipped_count_stddev(config)
    if stddev <= config.dp_noise_multiplier / 2:
        raise _fail(
            "dp_clipped_count_stddev",
            stddev,
            f"more than dp_noise_multiplier / 2 = {config.dp_noise_multiplier / 2:g} with dp_adaptive_clip "
            "(the default, participants / 20, needs more than 10 x dp_noise_multiplier participants a round)",
        )


def _check_llm(config: Config) -> None:
    """Keys of the LLM section that only mean something together (the model-dependent checks, e.g. that
    every `lora_target_modules` name exists, run where the model is known: models.check_model)."""
    causal = config.objective == "causal_lm"
    for key_name in ("prompt_column", "response_column", "sample_prompts"):
        if getattr(config, key_name) is not None and not causal:
            raise _fail(key_name, getattr(config, key_name), "None unless objective=causal_lm")
    if (config.prompt_column is None) != (config.response_column is None):
        missing = "response_column" if config.response_column is None else "prompt_column"
        raise _fail(missing, None, "a column name: prompt_column and response_column come together")
    if "{prompt}" not in config.prompt_template:
        raise _fail("prompt_template", config.prompt_template, "a string containing {prompt}")
    if config.peft == "none":
        for key_name, default, why in (
            ("base_precision", "fp32", "the trained weights are the base; use precision=bf16 for autocast"),
            ("lora_variant", "lora", "it applies to peft=lora"),
            ("merge_lora", False, "it applies to peft=lora"),
        ):
            if getattr(config, key_name) != default:
                raise _fail(key_name, getattr(config, key_name), f"{value_text(default)} with peft=none ({why})")
    if config.base_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise _fail("base_precision", "fp16", "bf16 or fp32 on CPU (fp16 matmuls need CUDA)")
    if config.final_model_dir is not None and not config.save_final_model:
        raise _fail("final_model_dir", config.final_model_dir, "None unless save_final_model=True")
    if config.merge_lora and not config.save_final_model:
        raise _fail("merge_lora", True, "False unless save_final_model=True (the merged model is written beside it)")


def _check_sync(values: dict) -> None:
    if values["proximal_mu"] > 0 and values["sync"] != "round":
        raise _fail(
            "proximal_mu",
            values["proximal_mu"],
            "0 unless sync=round (FedProx pulls each site toward the global model of the round it started from)",
        )
    if values["sync"] == "periodic" and values["comm_period"] is None:
        raise _fail("comm_period", None, "an integer >= 1 (local steps between synchronizations) with sync=periodic")
    if values["sync"] == "dynamic" and values["delta_threshold"] is None:
        raise _fail(
            "delta_threshold", None, "a number >= 0 (synchronize when max ||w - r||^2 exceeds it) with sync=dynamic"
        )


def _check_backend(values: dict) -> None:
    site_ids = values["site_ids"]
    if values["backend"] == "nccl" and len(set(site_ids)) < len(site_ids):
        raise _fail(
            "backend", "nccl", "NCCL allows one site per GPU; use backend=gloo or auto when a GPU hosts several sites"
        )


# What a cross-silo run cannot do yet: per-site state a site would have to checkpoint on its own
# machine, sampling, synchronization inside rounds, simulated faults and per-site scoring.
CROSS_SILO_UNSUPPORTED = (
    ("fraction_fit", lambda c: c.fraction_fit < 1.0, "1 (every joined site trains every round)"),
    ("sync", lambda c: c.sync != "round", "round"),
    ("strategy", lambda c: c.strategy == "scaffold", "a strategy without per-site state (not scaffold)"),
    (
        "error_feedback",
        lambda c: c.exchange != "dense" and c.error_feedback,
        "False with a compressed exchange (a residual is per-site state)",
    ),
    ("byzantine_sites", lambda c: bool(c.byzantine_sites), "[] (fault injection is for simulations)"),
    ("dp_adaptive_clip", lambda c: c.dp_adaptive_clip, "False (its clip norm is state the sites would share)"),
)


def _check_cross_silo(config: Config) -> None:
    """The keys each role needs, and what a cross-silo run does not support yet."""
    if config.role == "simulation":
        for name in ("coordinator_address", "site_name", "site_names", "min_sites", "config_hash"):
            if getattr(config, name) is not None:
                raise _fail(name, getattr(config, name), "unset without role=coordinator or role=site")
        return
    if config.role == "site":
        for name, what in (("coordinator_address", "the coordinator's HOST:PORT"), ("site_name", "this site's name")):
            if getattr(config, name) is None:
                raise _fail(name, None, f"{what} with role=site")
        if not isinstance(config.train_path, str):
            raise _fail("train_path", config.train_path, "this site's one training file with role=site")
        if not (config.insecure or config.tls_cafile):
            raise _fail("tls_cafile", None, "the CA certificate of the coordinator with role=site (or insecure=True)")
        return
    sites = len(config.site_names) if config.site_names else config.num_sites
    if sites is None:
        raise _fail("num_sites", None, "the number of sites to admit with role=coordinator (or site_names=[...])")
    if config.site_names and config.num_sites not in (None, len(config.site_names)):
        raise _fail("num_sites", config.num_sites, f"{len(config.site_names)}, the length of site_names")
    if config.min_sites is not None and config.min_sites > sites:
        raise _fail("min_sites", config.min_sites, f"at most the {sites} sites the coordinator admits")
    if config.min_sites is not None and config.min_sites < sites and not (config.site_names and config.checkpoints_dir):
        raise _fail(
            "min_sites",
            config.min_sites,
            f"{sites} (all), or fewer with site_names=[...] (each site's place) and checkpoints_dir (where the "
            "others continue from when one leaves)",
        )
    if config.train_path is not None:
        raise _fail("train_path", config.train_path, "unset on the coordinator: each site gives its own")
    if config.test_path is None:
        raise _fail("test_path", None, "the test set with role=coordinator (the coordinator scores it)")
    if config.task_name == "synthetic":
        raise _fail("task_name", "synthetic", "a task whose files the sites hold (csv, agnews, imdb, ...)")
    if not config.insecure and not (config.tls_certfile and config.tls_keyfile):
        raise _fail(
            "tls_certfile",
            config.tls_certfile,
            "a certificate with tls_keyfile for the door (scripts/make_test_certs.sh makes a test pair), "
            "or insecure=True",
        )
    for name, unsupported, allowed in CROSS_SILO_UNSUPPORTED:
        if unsupported(config):
            raise _fail(name, getattr(config, name), f"{allowed} in a cross-silo run for now")


def _check_sites(config: Config) -> None:
    """Counts that contradict each other: more sites per round, or processes, than there are sites."""
    sites = config.total_sites
    if config.min_fit_sites > sites:
        raise _fail("min_fit_sites", config.min_fit_sites, f"at most the number of sites ({sites})")
    if config.processes_per_device is not None:
        devices = list(dict.fromkeys(config.site_ids))
        busiest = (
            max(sum(1 for where in config.site_ids if where == device) for device in devices)
            if config.num_sites is None
            else math.ceil(sites / len(devices))
        )
        if config.processes_per_device > busiest:
            raise _fail(
                "processes_per_device",
                config.processes_per_device,
                f"at most the number of sites a device hosts ({busiest}); a process without a site has "
                "nothing to train",
            )


def resolve(raw: dict[str, Any]) -> Config:
    """Validates every key and resolves aliases; raises ConfigError on the first bad value."""
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    given = {**DEFAULTS, **raw}
    values = {name: spec.validate(given[name]) for name, spec in KEYS.items()}
    _check_precision(values["precision"])
    values["split"] = _resolve_split(values)
    if isinstance(values["train_path"], tuple) and values["split"] != "none":
        raise _fail(
            "train_path",
            list(values["train_path"]),
            "one path, or a list of files with split=none (site k trains on the k-th file)",
        )
    values["job_name"] = values["job_name"] or time.strftime("%Y%m%d_%H%M%S")
    values["max_grad_norm"] = 0.0 if values["max_grad_norm"] is None else values["max_grad_norm"]
    _check_sync(values)
    _check_privacy(values)
    _check_backend(values)
    config = Config(**values)
    _check_sites(config)
    _check_robust(config)
    _check_adaptive_clip(config)
    _check_llm(config)
    _check_cross_silo(config)
    return config


# Renderings of the declarations: the `help` listing and the README's config reference.


def sections() -> dict[str, list[Key]]:
    grouped: dict[str, list[Key]] = {}
    for spec in KEYS.values():
        grouped.setdefault(spec.section, []).append(spec)
    return grouped


def help_text(width: int = 100) -> str:
    """Every key with its default, the values it accepts and its help, grouped as in the README."""
    lines = [
        "Config keys: python scripts/train_federated.py with key=value ...",
        '(key=default, <computed default>; the README\'s "Config reference" has the same table)',
    ]
    column = 32
    for title, keys in sections().items():
        more = f" (README: {SECTION_LINKS[title][0]})" if title in SECTION_LINKS else ""
        lines += ["", title + more]
        for spec in keys:
            default = spec.default_text if spec.shown_default is None else f"<{spec.shown_default}>"
            head = f"  {spec.name}={default}"
            text = f"{spec.help.replace('`', '')}; accepts {spec.short}"
            wrapped = textwrap.wrap(text, width - column, break_on_hyphens=False)
            if len(head) + 2 > column:
                lines.append(head)
            else:
                lines.append(head.ljust(column) + wrapped.pop(0))
            lines += [" " * column + rest for rest in wrapped]
    return "\n".join(lines)


README_START = "<!-- config-reference: generated by `python -m scaling_fl.config --readme README.md` -->"
README_END = "<!-- end of config-reference -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The README's config reference table, between its two markers."""
    rows = [README_START, "", "| key | default | accepts | meaning |", "|---|---|---|---|"]
    for title, keys in sections().items():
        more = "see [{}](#{})".format(*SECTION_LINKS[title]) if title in SECTION_LINKS else ""
        rows.append(f"| **{title}** | | | {more} |" if more else f"| **{title}** | | | |")
        for spec in keys:
            default = f"`{spec.default_text}`" if spec.shown_default is None else spec.shown_default
            rows.append(f"| `{spec.name}` | {_cell(default)} | {_cell(spec.short)} | {_cell(spec.help)} |")
    return "\n".join(rows + ["", README_END])


def readme_table(readme: str) -> str | None:
    """The generated part of a README's text (markers included), or None without the markers."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        return None
    return readme[start : end + len(README_END)]


def update_readme(path: str) -> bool:
    """Rewrites the config reference in the README at path; True when it changed."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    current = readme_table(text)
    if current is None:
        raise SystemExit(f"{path}: no config reference markers ({README_START} ... {README_END})")
    new = text.replace(current, markdown_table())
    if new != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(new)
    return new != text


def main(argv: list[str]) -> None:
    if argv[:1] == ["--markdown"]:
        print(markdown_table())
    elif argv[:1] == ["--readme"] and len(argv) == 2:
        print(f"{argv[1]}: {'updated' if update_readme(argv[1]) else 'already up to date'}")
    elif not argv:
        print(help_text())
    else:
        raise SystemExit("usage: python -m scaling_fl.config [--markdown | --readme README.md]")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
