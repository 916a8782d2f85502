"""The Sacred experiment: config, validation before any record exists, and the main command.

The launching process owns the Sacred run. Validation and the data/model pre-flight
run in a config hook, i.e. before Sacred starts its observers, so a bad value or a
malformed file costs one line and exit code 2 and leaves no run record behind.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from sacred import Experiment  # noqa: E402
from sacred.observers import FileStorageObserver  # noqa: E402
from sacred.utils import apply_backspaces_and_linefeeds  # noqa: E402

from scaling_fl import models  # noqa: E402
from scaling_fl.config import DEFAULTS, Config, ConfigError, resolve  # noqa: E402
from scaling_fl.data.dataset import DataError  # noqa: E402
from scaling_fl.data.prepared import PreparedData, prepare_data  # noqa: E402
from scaling_fl.data.tasks import check_task_options  # noqa: E402
from scaling_fl.launch import Topology, check_devices, log_split, node_topology, run_sites  # noqa: E402

MAIN_COMMAND = "train_federated"
EXIT_BAD_INPUT = 2

log = logging.getLogger("scaling_fl")
ex = Experiment("scaling_fl", save_git_info=False)
ex.add_config(DEFAULTS)
ex.captured_out_filter = apply_backspaces_and_linefeeds
ex.logger = log

# Set by the command line front end when the user chose observers with Sacred flags (-F, -m, ...).
explicit_observers = False


def fail_bad_input(error: Exception) -> None:
    print(f"scaling-fl: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_INPUT)


def config_from_sacred(config: dict) -> Config:
    return resolve({key: config[key] for key in DEFAULTS if key in config})


@functools.lru_cache(maxsize=4)
def preflight(cfg: Config) -> tuple[PreparedData, Topology]:
    """Everything that can be checked before a worker starts; cached for the main command."""
    topology = node_topology(len(cfg.site_ids))
    check_devices(cfg)
    check_task_options(cfg.task_name, cfg.train_path, cfg.test_path,
                       list(cfg.text_columns) if cfg.text_columns else None, cfg.label_column)
    models.check_model(cfg.model)
    return prepare_data(cfg, topology.num_sites), topology


@ex.config_hook
def validate(config, command_name, logger):
    try:
        cfg = config_from_sacred(config)
        if command_name == MAIN_COMMAND:
            _, topology = preflight(cfg)
            if topology.is_main_node and not explicit_observers and not ex.observers:
                ex.observers.append(FileStorageObserver(cfg.runs_dir))
    except (ConfigError, DataError, models.ModelError) as error:
        fail_bad_input(error)
    return {"split": cfg.split, "job_name": cfg.job_name}


@ex.main
def train_federated(_config, _run):
    cfg = config_from_sacred(_config)
    prepared, topology = preflight(cfg)
    log_split(prepared)
    _run.info["sites"] = {
        "count": topology.num_sites,
        "sizes": prepared.site_sizes(),
        "label_names": list(prepared.label_names),
        "label_histograms": prepared.histograms().tolist(),
        "test_rows": len(prepared.test),
    }
    final: dict[str, float] = {}

    def on_event(event: dict) -> None:
        if event["event"] == "round":
            for name, value in event["metrics"].items():
                _run.log_scalar(name, value, event["round"])
            final.update(event["metrics"])

    results = run_sites(cfg, prepared, topology, on_event)
    fingerprints = {result["weights_sha256"] for result in results.values()}
    if len(fingerprints) != 1:
        raise RuntimeError(f"sites ended with different global models: {results}")
    _run.info["final_weights_sha256"] = fingerprints.pop()
    return {key: final[key] for key in ("validation.accuracy", "validation.loss", "validation.f1_macro") if key in final}
