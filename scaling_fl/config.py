"""One place for the experiment's defaults, aliases and validation.

Validation runs in the launching process, before any observer or worker starts, so
a bad value costs the user one line and exit code 2, never a half-started job.
"""

from __future__ import annotations

import getpass
import math
import os
from dataclasses import dataclass
from typing import Any

SPLITS = ("iid", "label_sorted", "dirichlet")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "nccl", "gloo")
TRACKING = ("auto", "mongo", "file", "none")
RESUME = ("auto", "force")


def _default_author() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry inside some containers
        return os.environ.get("USER", "unknown")


DEFAULTS: dict[str, Any] = {
    # Keys of the original scaling_fl, same names and meaning.
    "learning_rate": 5e-5,
    "max_seq_len": 128,
    "batch_size": 16,
    "val_batch_size": 64,
    "num_rounds": 10,
    "num_local_epochs": 1,
    "site_ids": [0, 0, 0, 0],
    "task_name": "synthetic",
    "train_path": None,
    "test_path": None,
    "model": "minilm",
    "data_seed": 42,
    "iid_split": True,
    "job_name": None,
    "checkpoints_dir": None,
    "author": _default_author(),
    # Sites: how many, on how many processes, and who trains each round (see README, "Many sites").
    "num_sites": None,  # N sites spread over the devices of site_ids (None: one site per site_ids entry)
    "processes_per_device": None,  # worker processes per device (None: one per site_ids entry; with num_sites one per CPU core / GPU)
    "fraction_fit": 1.0,  # share of the sites that train each round, drawn from (seed, round)
    "min_fit_sites": 1,  # at least this many train each round
    # Data.
    "split": None,  # None: "iid", or "label_sorted" when iid_split=False
    "dirichlet_beta": 0.5,
    "sample_percentage": 1.0,
    "text_columns": None,
    "label_column": None,
    "synthetic_train_size": 2000,
    "synthetic_test_size": 500,
    # Local training.
    "seed": 42,
    "optimizer": "adamw",
    "momentum": 0.0,
    "weight_decay": 0.0,
    "warmup_ratio": 0.0,
    "lr_scheduler": "linear",
    "grad_accum_steps": 1,
    "max_grad_norm": 1.0,
    "local_steps": 0,
    "precision": "fp32",
    # Server strategy (what is done with the mean update); None takes the strategy's default.
    "strategy": "fedavg",
    "server_learning_rate": None,
    "server_momentum": None,
    "beta1": None,
    "beta2": None,
    "tau": None,
    # Exchange (how updates cross the wire) and synchronization (when).
    "exchange": "dense",
    "bucket_size_mb": 32,
    "sparsity_level": 0.1,
    "sparsity_scope": "model",
    "selection_criterion": "largest_magnitude_change",
    "sparse_average": "per_position",
    "error_feedback": True,
    "quantization_block_size": 256,
    "sync": "round",
    "comm_period": None,  # sync=periodic: local steps between synchronizations
    "check_every": None,  # sync=dynamic: local steps between divergence checks (None: once a round)
    "delta_threshold": None,  # sync=dynamic: synchronize when max ||w - r||^2 over sites exceeds it
    # Tracking.
    "tracking": "auto",  # mongo when SACRED_URL / SACRED_HOST is set, else the file store under runs_dir
    "runs_dir": "runs",
    "save_final_model": False,
    "tensorboard_dir": None,
    "per_site_metrics": False,
    # Checkpoints and fault tolerance.
    "checkpoint_every": 1,
    "keep_last_checkpoints": 3,
    "resume": "auto",  # auto: continue a compatible checkpoint; force: also when the config changed
    "resume_from": None,
    "max_restarts": 3,
    # Runtime.
    "backend": "auto",  # nccl when every GPU hosts one site, else gloo (NCCL refuses two ranks on one GPU)
    "collective_timeout_s": 60,
}


class ConfigError(ValueError):
    """A user-facing, one-line description of a bad config value and what is allowed."""


@dataclass(frozen=True)
class Config:
    """The validated, alias-resolved experiment config that workers receive."""

    learning_rate: float
    max_seq_len: int
    batch_size: int
    val_batch_size: int
    num_rounds: int
    num_local_epochs: int
    site_ids: tuple[int, ...]
    task_name: str
    train_path: str | None
    test_path: str | None
    model: str
    data_seed: int
    iid_split: bool
    job_name: str
    checkpoints_dir: str | None
    author: str
    split: str
    dirichlet_beta: float
    sample_percentage: float
    text_columns: tuple[str, ...] | None
    label_column: str | None
    synthetic_train_size: int
    synthetic_test_size: int
    seed: int
    optimizer: str
    momentum: float
    weight_decay: float
    warmup_ratio: float
    lr_scheduler: str
    grad_accum_steps: int
    max_grad_norm: float
    local_steps: int
    precision: str
    strategy: str
    server_learning_rate: float | None
    server_momentum: float | None
    beta1: float | None
    beta2: float | None
    tau: float | None
    exchange: str
    bucket_size_mb: float
    sparsity_level: float
    sparsity_scope: str
    selection_criterion: str
    sparse_average: str
    error_feedback: bool
    quantization_block_size: int
    sync: str
    comm_period: int | None
    check_every: int | None
    delta_threshold: float | None
    backend: str
    collective_timeout_s: float
    tracking: str
    runs_dir: str
    save_final_model: bool
    tensorboard_dir: str | None
    per_site_metrics: bool
    checkpoint_every: int
    keep_last_checkpoints: int
    resume: str
    resume_from: str | None
    max_restarts: int
    num_sites: int | None
    processes_per_device: int | None
    fraction_fit: float
    min_fit_sites: int

    @property
    def total_sites(self) -> int:
        """Sites on this node: num_sites, or one per site_ids entry."""
        return self.num_sites if self.num_sites is not None else len(self.site_ids)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["site_ids"] = list(self.site_ids)
        out["text_columns"] = list(self.text_columns) if self.text_columns else None
        return out


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int(cfg: dict, key: str, minimum: int) -> int:
    value = cfg[key]
    if not _is_int(value) or value < minimum:
        raise _fail(key, value, f"an integer >= {minimum}")
    return value


def _number(cfg: dict, key: str, low: float, high: float, *, low_open=False, high_open=False) -> float:
    value = cfg[key]
    ok = _is_number(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise _fail(key, value, f"a number in {left}{low}, {high}{right}")
    return float(value)


def _choice(cfg: dict, key: str, choices: tuple[str, ...]) -> str:
    value = cfg[key]
    if value not in choices:
        raise _fail(key, value, "one of " + ", ".join(choices))
    return value


def _bool(cfg: dict, key: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):
        raise _fail(key, value, "True or False")
    return value


def _optional_str(cfg: dict, key: str) -> str | None:
    value = cfg[key]
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, value, "a non-empty string (a path, s3:// or gs:// URL) or None")
    return value


def _optional_number(cfg: dict, key: str, low: float, high: float, **bounds) -> float | None:
    return None if cfg[key] is None else _number(cfg, key, low, high, **bounds)


def _optional_int(cfg: dict, key: str, minimum: int) -> int | None:
    return None if cfg[key] is None else _int(cfg, key, minimum)


def _sync(cfg: dict) -> str:
    from scaling_fl.exchange.dynamic import SYNC_MODES

    sync = _choice(cfg, "sync", SYNC_MODES)
    if sync == "periodic" and cfg["comm_period"] is None:
        raise _fail("comm_period", None, "an integer >= 1 (local steps between synchronizations) with sync=periodic")
    if sync == "dynamic" and cfg["delta_threshold"] is None:
        raise _fail("delta_threshold", None, "a number >= 0 (synchronize when max ||w - r||^2 exceeds it) "
                                             "with sync=dynamic")
    return sync


def _site_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) and v >= 0 for v in value):
        return tuple(value)
    raise _fail("site_ids", value, "a non-empty list of GPU ids >= 0, one entry per site, e.g. site_ids=[0,0,1,1]")


def _resolve_split(cfg: dict) -> str:
    if cfg["split"] is None:
        if not isinstance(cfg["iid_split"], bool):
            raise _fail("iid_split", cfg["iid_split"], "True or False (or set split=iid|label_sorted|dirichlet)")
        return "iid" if cfg["iid_split"] else "label_sorted"
    return _choice(cfg, "split", SPLITS)


def _text_columns(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise _fail("text_columns", value, "a list of CSV column names, e.g. text_columns=['title','body']")


def _backend(cfg: dict) -> str:
    backend = _choice(cfg, "backend", BACKENDS)
    if backend == "nccl" and isinstance(cfg["site_ids"], (list, tuple)) and len(set(cfg["site_ids"])) < len(cfg["site_ids"]):
        raise _fail("backend", backend, "NCCL allows one site per GPU; use backend=gloo or auto when a GPU hosts several sites")
    return backend


def _job_name(value: Any) -> str:
    import re
    import time

    if value is None:
        return time.strftime("%Y%m%d_%H%M%S")
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", value):
        raise _fail("job_name", value, "letters, digits, '_', '.', '-' (max 128), starting with a letter or digit")
    return value


def resolve(raw: dict[str, Any]) -> Config:
    """Validates every key and resolves aliases; raises ConfigError on the first bad value."""
    from scaling_fl.data import TASK_NAMES
    from scaling_fl.exchange.factory import EXCHANGES
    from scaling_fl.exchange.sparse import CRITERIA, SCOPES, SPARSE_AVERAGES
    from scaling_fl.strategies.factory import STRATEGIES

    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    cfg = {**DEFAULTS, **raw}
    if cfg["precision"] in ("bf16", "fp16"):
        import torch

        if not torch.cuda.is_available():
            raise _fail("precision", cfg["precision"], "bf16 and fp16 need CUDA; use precision=fp32 on CPU")
    if not isinstance(cfg["model"], str) or not cfg["model"].strip():
        raise _fail("model", cfg["model"], "a nickname (see README), a Hugging Face id or a local directory")
    if not isinstance(cfg["author"], str):
        raise _fail("author", cfg["author"], "a string")
    if not isinstance(cfg["runs_dir"], str) or not cfg["runs_dir"]:
        raise _fail("runs_dir", cfg["runs_dir"], "a directory path")
    label_column = cfg["label_column"]
    if label_column is not None and (not isinstance(label_column, str) or not label_column):
        raise _fail("label_column", label_column, "a CSV column name")
    max_grad_norm = cfg["max_grad_norm"]
    if max_grad_norm is None:
        max_grad_norm = 0.0
    config = Config(
        learning_rate=_number(cfg, "learning_rate", 0.0, 10.0, low_open=True),
        max_seq_len=_int(cfg, "max_seq_len", 8),
        batch_size=_int(cfg, "batch_size", 1),
        val_batch_size=_int(cfg, "val_batch_size", 1),
        num_rounds=_int(cfg, "num_rounds", 1),
        num_local_epochs=_int(cfg, "num_local_epochs", 1),
        site_ids=_site_ids(cfg["site_ids"]),
        task_name=_choice(cfg, "task_name", TASK_NAMES),
        train_path=_optional_str(cfg, "train_path"),
        test_path=_optional_str(cfg, "test_path"),
        model=cfg["model"],
        data_seed=_int(cfg, "data_seed", 0),
        iid_split=_bool(cfg, "iid_split"),
        job_name=_job_name(cfg["job_name"]),
        checkpoints_dir=_optional_str(cfg, "checkpoints_dir"),
        author=cfg["author"],
        split=_resolve_split(cfg),
        dirichlet_beta=_number(cfg, "dirichlet_beta", 0.0, 1e6, low_open=True),
        sample_percentage=_number(cfg, "sample_percentage", 0.0, 1.0, low_open=True),
        text_columns=_text_columns(cfg["text_columns"]),
        label_column=label_column,
        synthetic_train_size=_int(cfg, "synthetic_train_size", 4),
        synthetic_test_size=_int(cfg, "synthetic_test_size", 4),
        seed=_int(cfg, "seed", 0),
        optimizer=_choice(cfg, "optimizer", OPTIMIZERS),
        momentum=_number(cfg, "momentum", 0.0, 1.0, high_open=True),
        weight_decay=_number(cfg, "weight_decay", 0.0, 1.0),
        warmup_ratio=_number(cfg, "warmup_ratio", 0.0, 1.0, high_open=True),
        lr_scheduler=_choice(cfg, "lr_scheduler", LR_SCHEDULERS),
        grad_accum_steps=_int(cfg, "grad_accum_steps", 1),
        max_grad_norm=_number({"max_grad_norm": max_grad_norm}, "max_grad_norm", 0.0, 1e6),
        local_steps=_int(cfg, "local_steps", 0),
        precision=_choice(cfg, "precision", PRECISIONS),
        strategy=_choice(cfg, "strategy", STRATEGIES),
        server_learning_rate=_optional_number(cfg, "server_learning_rate", 0.0, 1e3, low_open=True),
        server_momentum=_optional_number(cfg, "server_momentum", 0.0, 1.0, high_open=True),
        beta1=_optional_number(cfg, "beta1", 0.0, 1.0, high_open=True),
        beta2=_optional_number(cfg, "beta2", 0.0, 1.0, high_open=True),
        tau=_optional_number(cfg, "tau", 0.0, 1e3, low_open=True),
        exchange=_choice(cfg, "exchange", EXCHANGES),
        bucket_size_mb=_number(cfg, "bucket_size_mb", 0.0, 4096.0, low_open=True),
        sparsity_level=_number(cfg, "sparsity_level", 0.0, 1.0, low_open=True),
        sparsity_scope=_choice(cfg, "sparsity_scope", SCOPES),
        selection_criterion=_choice(cfg, "selection_criterion", CRITERIA),
        sparse_average=_choice(cfg, "sparse_average", SPARSE_AVERAGES),
        error_feedback=_bool(cfg, "error_feedback"),
        quantization_block_size=_int(cfg, "quantization_block_size", 1),
        sync=_sync(cfg),
        comm_period=_optional_int(cfg, "comm_period", 1),
        check_every=_optional_int(cfg, "check_every", 1),
        delta_threshold=_optional_number(cfg, "delta_threshold", 0.0, 1e12),
        backend=_backend(cfg),
        collective_timeout_s=_number(cfg, "collective_timeout_s", 1.0, 86400.0),
        tracking=_choice(cfg, "tracking", TRACKING),
        runs_dir=cfg["runs_dir"],
        save_final_model=_bool(cfg, "save_final_model"),
        tensorboard_dir=_optional_str(cfg, "tensorboard_dir"),
        per_site_metrics=_bool(cfg, "per_site_metrics"),
        checkpoint_every=_int(cfg, "checkpoint_every", 1),
        keep_last_checkpoints=_int(cfg, "keep_last_checkpoints", 1),
        resume=_choice(cfg, "resume", RESUME),
        resume_from=_optional_str(cfg, "resume_from"),
        max_restarts=_int(cfg, "max_restarts", 0),
        num_sites=_optional_int(cfg, "num_sites", 1),
        processes_per_device=_optional_int(cfg, "processes_per_device", 1),
        fraction_fit=_number(cfg, "fraction_fit", 0.0, 1.0, low_open=True),
        min_fit_sites=_int(cfg, "min_fit_sites", 1),
    )
    _check_sites(config)
    return config


def _check_sites(config: Config) -> None:
    """Counts that contradict each other: more sites per round, or processes, than there are sites."""
    sites = config.total_sites
    if config.min_fit_sites > sites:
        raise _fail("min_fit_sites", config.min_fit_sites, f"at most the number of sites ({sites})")
    if config.processes_per_device is not None:
        devices = list(dict.fromkeys(config.site_ids))
        busiest = max(sum(1 for where in config.site_ids if where == device) for device in devices) \
            if config.num_sites is None else math.ceil(sites / len(devices))
        if config.processes_per_device > busiest:
            raise _fail("processes_per_device", config.processes_per_device,
                        f"at most the number of sites a device hosts ({busiest}); a process without a site has "
                        "nothing to train")
