"""The Sacred experiment: config, validation before any record exists, and the main command.

The launching process owns the Sacred run. Validation and the pre-flight (data, model,
devices, tracking server, previous run of this job) run in a config hook, i.e. before
Sacred starts its observers, so bad input costs one line and exit code 2 and leaves
no run record behind.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import torch  # noqa: E402
from sacred import Experiment  # noqa: E402
from sacred.utils import apply_backspaces_and_linefeeds  # noqa: E402

from scaling_fl import checkpoint, claim, models, processes  # noqa: E402
from scaling_fl.config import DEFAULTS, Config, ConfigError, resolve  # noqa: E402
from scaling_fl.data.dataset import DataError  # noqa: E402
from scaling_fl.data.prepared import PreparedData, prepare_data  # noqa: E402
from scaling_fl.data.tasks import check_task_options  # noqa: E402
from scaling_fl import storage  # noqa: E402
from scaling_fl.launch import (  # noqa: E402
    Topology, check_devices, check_layout, check_site_sizes, log_split, node_topology, run_sites,
)
from scaling_fl.sites import Layout, plan_layout  # noqa: E402
from scaling_fl.tracking import resume, sacred_fixes  # noqa: E402
from scaling_fl.tracking.observers import MongoTarget, TrackingError, check_mongo, choose_tracking, mongo_client  # noqa: E402

sacred_fixes.apply()

MAIN_COMMAND = "train_federated"
EXIT_BAD_INPUT = 2
EXIT_RECORD_LOST = 3

log = logging.getLogger("scaling_fl")
ex = Experiment("scaling_fl", save_git_info=False)
ex.add_config(DEFAULTS)
ex.captured_out_filter = apply_backspaces_and_linefeeds
ex.logger = log

# `help` (and -h / --help) is Sacred's own command: docopt takes the word before any command, config
# hook or worker runs, and prints the usage, whose description is the experiment's doc. So the doc
# lists every config key with its default and help (scaling_fl.config.help_text).
from scaling_fl.config import help_text as _config_help_text  # noqa: E402

ex.doc = _config_help_text()

# Set by the command line front end when the user chose observers with Sacred flags (-F, -m, ...).
explicit_observers = False


@dataclass
class Progress:
    """What the command line front end needs for its last line after a signal."""

    job_name: str = ""
    rounds_logged: int = 0
    num_rounds: int = 0
    checkpoints_dir: str | None = None


progress = Progress()
# The claims this process holds on its job (tracking store, checkpoints_dir); released at exit.
claims: claim.JobClaims | None = None


@dataclass(frozen=True)
class Plan:
    """What the pre-flight found out, shared by the config hook and the main command."""

    prepared: PreparedData
    topology: Topology
    layout: Layout
    tracking: str  # "mongo", "file" or "none"
    mongo: MongoTarget | None
    previous: resume.PreviousRun | None  # this job's earlier record, continued by this run
    resume_point: checkpoint.Checkpoint | None  # the checkpoint the sites will continue from


def fail_bad_input(error: Exception) -> None:
    print(f"scaling-fl: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_INPUT)


def config_from_sacred(config: dict) -> Config:
    return resolve({key: config[key] for key in DEFAULTS if key in config})


@functools.lru_cache(maxsize=4)
def preflight(cfg: Config) -> Plan:
    """Everything that can be checked before a worker starts; cached for the main command."""
    layout = plan_layout(cfg.site_ids, cfg.num_sites, cfg.processes_per_device, cuda=torch.cuda.is_available())
    topology = node_topology(layout.num_sites, workers_per_node=layout.num_workers)
    check_layout(cfg, layout, topology)
    check_devices(cfg)
    check_task_options(cfg.task_name, cfg.train_path, cfg.test_path,
                       list(cfg.text_columns) if cfg.text_columns else None, cfg.label_column)
    models.check_model(cfg.model)
    tracking, mongo, previous = "none", None, None
    if topology.is_main_node and not explicit_observers:
        tracking, mongo = choose_tracking(cfg.tracking)
        if mongo is not None:
            check_mongo(mongo)
            client = mongo_client(mongo)
            try:
                previous = resume.find_mongo_run(client[mongo.database], cfg.job_name)
            finally:
                client.close()
        elif tracking == "file":
            previous = resume.find_file_run(cfg.runs_dir, cfg.job_name)
    resume_point = checkpoint.preflight(cfg, topology.num_sites)
    prepared = prepare_data(cfg, topology.num_sites)
    check_site_sizes(prepared)
    check_sync_steps(cfg, prepared.site_sizes())
    if topology.is_main_node:  # the last check: bad input writes nothing, a record is only made after it
        claim_job(cfg, tracking, mongo)
    return Plan(prepared, topology, layout, tracking, mongo, previous, resume_point)


def claim_job(cfg: Config, tracking: str, mongo: MongoTarget | None) -> None:
    """One live run per job: an atomic claim with a renewed lease in the tracking store and in
    checkpoints_dir, taken before any record or checkpoint is written. A second start of a live
    job is refused; the claim of a launcher that died is taken over (at once on the same host)."""
    global claims
    if claims is not None:
        return
    places = []
    if tracking == "mongo":
        # A short server-selection timeout: with the server gone, renewing and releasing must not
        # hold the launcher's exit for long.
        places.append(claim.claim_in_mongo(mongo_client(mongo, timeout_s=2)[mongo.database], cfg.job_name))
    elif tracking == "file":
        places.append(claim.claim_in_directory(storage.join(cfg.runs_dir, ".claims", cfg.job_name), cfg.job_name))
    if cfg.checkpoints_dir:
        places.append(claim.claim_in_directory(storage.join(cfg.checkpoints_dir, ".claims"), cfg.job_name))
    claims = claim.JobClaims(places).acquire_all(force=cfg.resume == "force")
    claims.start_renewing(on_lost=_claim_lost)


def _claim_lost(message: str) -> None:
    """Another launcher took this job over (resume=force): stop, as if interrupted."""
    import signal

    log.error("%s: stopping this launcher", message)
    os.kill(os.getpid(), signal.SIGTERM)


def release_claims() -> None:
    if claims is not None:
        claims.release_all()


def interrupted_line(stop: processes.Interrupted) -> str:
    where = f" after round {progress.rounds_logged} of {progress.num_rounds}" if progress.num_rounds else ""
    if not progress.job_name:
        return f"interrupted by {stop}{where}; nothing was started"
    how = "resume from its last checkpoint" if progress.checkpoints_dir else \
        "continue its record (without checkpoints_dir, training starts over)"
    return f"interrupted by {stop}{where}; re-run with job_name={progress.job_name} to {how}"


def lost_record_line(run) -> str | None:
    """One line when an observer lost the run record mid-run (the job itself finished)."""
    lost = [observer.lost for observer in getattr(run, "observers", []) if getattr(observer, "lost", None)]
    if not lost:
        return None
    what = "training finished and its checkpoints are complete" if progress.checkpoints_dir else "training finished"
    return (f"the run record was lost mid-run ({lost[0]}); {what}; re-run the same command "
            f"(job_name={progress.job_name}) once the store is back to complete the record")


def check_sync_steps(cfg: Config, site_sizes: list[int]) -> None:
    """sync=periodic / dynamic synchronize between local steps, so every site must take as many."""
    from scaling_fl.train.local import steps_per_round

    if cfg.sync == "round":
        return
    steps = {steps_per_round(size, cfg.batch_size, cfg.grad_accum_steps, cfg.num_local_epochs, cfg.local_steps)
             for size in site_sizes}
    if len(steps) > 1:
        raise ConfigError(f"sync={cfg.sync} needs the same number of local steps on every site, but the split gives "
                          f"{min(steps)}..{max(steps)} steps a round; set local_steps=N (or use sync=round)")


def make_observer(plan: Plan, cfg: Config):
    resume_id = plan.previous.run_id if plan.previous else None
    if plan.tracking == "mongo":
        return resume.ResumableMongoObserver(client=mongo_client(plan.mongo), db_name=plan.mongo.database,
                                             resume_id=resume_id, hosts=plan.mongo.hosts)
    if plan.tracking == "file":
        return resume.ResumableFileStorageObserver(cfg.runs_dir, resume_id=resume_id)
    return None


@ex.config_hook
def validate(config, command_name, logger):
    try:
        cfg = config_from_sacred(config)
        if command_name == MAIN_COMMAND:
            plan = preflight(cfg)
            if not explicit_observers:
                observer = make_observer(plan, cfg)
                ex.observers[:] = [observer] if observer else []
    except (ConfigError, DataError, models.ModelError, TrackingError, checkpoint.CheckpointError,
            storage.StorageError, claim.ClaimRefused) as error:
        fail_bad_input(error)
    return {"split": cfg.split, "job_name": cfg.job_name}


@ex.main
def train_federated(_config, _run):
    cfg = config_from_sacred(_config)
    plan = preflight(cfg)
    for observer in _run.observers:  # a continued record keeps its info (and Mongo's metric references)
        _run.info.update(getattr(observer, "previous_info", {}) or {})
    last_logged = plan.previous.last_round if plan.previous else 0
    progress.job_name, progress.num_rounds, progress.checkpoints_dir = cfg.job_name, cfg.num_rounds, cfg.checkpoints_dir
    progress.rounds_logged = plan.resume_point.round if plan.resume_point else 0
    if plan.previous:
        log.info("continuing run %s of job %r (was %s, rounds logged: %d)", plan.previous.run_id, cfg.job_name,
                 plan.previous.status, last_logged)
    if plan.resume_point:
        log.info("checkpoint %s found: the sites continue at round %d", plan.resume_point.directory,
                 plan.resume_point.round + 1)
    prepared = plan.prepared
    log_split(prepared)
    _run.info["sites"] = {
        "count": plan.topology.num_sites,
        "processes": plan.topology.num_nodes * plan.topology.workers_per_node,
        "sizes": prepared.site_sizes(),
        "label_names": list(prepared.label_names),
        "label_histograms": prepared.histograms().tolist(),
        "test_rows": len(prepared.test),
    }
    _add_json_artifact(_run, "config.resolved.json", cfg.as_dict())
    tensorboard = _tensorboard_writer(cfg)
    final: dict[str, float] = {}
    logged_up_to = [last_logged]  # grows as rounds arrive; replays after a restart are skipped

    def on_event(event: dict) -> None:
        if event["event"] == "start" and event["restart"] > 0:
            _run.info["restarts"] = event["restart"]
            log.warning("sites restarted (restart %d of at most %d), continuing after round %d",
                        event["restart"], cfg.max_restarts, event["start_round"])
        elif event["event"] == "round" and event["round"] > logged_up_to[0]:  # never log a round twice
            logged_up_to[0] = progress.rounds_logged = event["round"]
            for name, value in event["metrics"].items():
                _run.log_scalar(name, value, event["round"])
                if tensorboard:
                    tensorboard.add_scalar(name, value, event["round"])
            final.update(event["metrics"])
            if "participants" in event:  # ids here, not one metric per site: N may be 1,000
                _run.info.setdefault("participants", {})[str(event["round"])] = event["participants"]
        elif event["event"] == "final_model":
            for name in ("model.safetensors", "config.json"):
                _run.add_artifact(os.path.join(event["path"], name), f"final_model.{name}")

    try:
        results = run_sites(cfg, plan.prepared, plan.topology, plan.layout, on_event, max_restarts=cfg.max_restarts)
    finally:
        if tensorboard:
            tensorboard.close()
    fingerprints = {result["weights_sha256"] for result in results.values()}
    if len(fingerprints) != 1:
        raise RuntimeError(f"sites ended with different global models: {results}")
    _run.info["final_weights_sha256"] = fingerprints.pop()
    return {key: final[key] for key in ("validation.accuracy", "validation.loss", "validation.f1_macro") if key in final}


def _add_json_artifact(run, name: str, payload: dict) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
        run.add_artifact(path, name)


def _tensorboard_writer(cfg: Config):
    if not cfg.tensorboard_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=os.path.join(cfg.tensorboard_dir, cfg.job_name))
