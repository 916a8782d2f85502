"""One job, put together: the pre-flight checks, the run plan, the claims and starting the sites.

The composition root. A config value goes from the command line (cli.py) through Sacred's
config hook (tracking/experiment.py) to `preflight`, which checks everything that can fail
before a worker starts, in this order: layout and devices, task options, model, tracking
store (and this job's earlier record), checkpoint, data, site sizes and sync steps, and last
the claims on the job, so bad input leaves nothing behind. `run` starts this node's sites
with the plan. Sacred, its observers and the run record stay in tracking/.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scaling_fl import checkpoint, claim, cross_silo, models, storage
from scaling_fl.config import Config, ConfigError
from scaling_fl.data.prepared import PreparedData, prepare_data
from scaling_fl.data.tasks import check_task_options
from scaling_fl.launch import (
    Topology,
    check_devices,
    check_layout,
    check_site_sizes,
    log_split,
    node_topology,
    run_sites,
)
from scaling_fl.sites import Layout, plan_layout, trains_sites_in_turn
from scaling_fl.tracking import resume
from scaling_fl.tracking.observers import MongoTarget, check_mongo, choose_tracking, mongo_client

log = logging.getLogger("scaling_fl")

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


@functools.lru_cache(maxsize=4)
def preflight(cfg: Config, pick_tracking: bool = True) -> Plan:
    """Everything that can be checked before a worker starts; cached for the main command.

    pick_tracking=False when the user chose Sacred observers on the command line: then no tracking
    store is chosen here, no earlier record looked up and no claim taken in one.

    A cross-silo coordinator plans for the sites it expects; what it runs is settled at the door
    (cross_silo.coordinate). A site has no plan of its own: it trains the coordinator's."""
    coordinating = cfg.role == "coordinator"
    if coordinating:
        layout, topology = cross_silo.expected_plan(cfg)
    else:
        layout = plan_layout(cfg.site_ids, cfg.num_sites, cfg.processes_per_device, cuda=torch.cuda.is_available())
        topology = node_topology(layout.num_sites, workers_per_node=layout.num_workers)
        check_layout(cfg, layout, topology)
        check_devices(cfg)
    check_extras(cfg)
    check_task_options(
        cfg.task_name,
        cfg.test_path if coordinating else cfg.train_path,  # the coordinator reads no training file
        cfg.test_path,
        list(cfg.text_columns) if cfg.text_columns else None,
        cfg.label_column,
        cfg.objective,
        cfg.prompt_column,
        cfg.response_column,
    )
    models.check_model(cfg.model, cfg)
    tracking, mongo, previous = "none", None, None
    if topology.is_main_node and pick_tracking:
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
    resume_point = checkpoint.preflight(cfg, layout.num_sites if coordinating else topology.num_sites)
    if cfg.final_model_dir and topology.is_main_node:
        storage.check_writable(cfg.final_model_dir)
    if coordinating:
        prepared = cross_silo.coordinator_data(cfg)
    else:
        prepared = prepare_data(cfg, topology.num_sites)
        check_site_sizes(prepared)
        check_sync_steps(cfg, prepared.site_sizes(), packed=trains_sites_in_turn(cfg, layout))
    if topology.is_main_node:  # the last check: bad input writes nothing, a record is only made after it
        claim_job(cfg, tracking, mongo)
    return Plan(prepared, topology, layout, tracking, mongo, previous, resume_point)


def check_extras(cfg: Config) -> None:
    """An optional feature that is switched on needs its extra installed (pyproject's optional-dependencies)."""
    if cfg.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard_dir needs the tensorboard extra: pip install 'scaling-fl[tensorboard]'")
    if cfg.dp != "none" and importlib.util.find_spec("opacus") is None:
        raise ConfigError("dp=client needs the privacy extra (its accountant): pip install 'scaling-fl[privacy]'")


def check_sync_steps(cfg: Config, site_sizes: list[int], packed: bool = False) -> None:
    """sync=periodic / dynamic synchronize between local steps, so every site must take as many; a
    process hosting several sites (packed) trains them one after another, so only at round ends."""
    from scaling_fl.train.local import steps_per_round

    if cfg.sync == "round":
        return
    steps = {
        steps_per_round(size, cfg.batch_size, cfg.grad_accum_steps, cfg.num_local_epochs, cfg.local_steps)
        for size in site_sizes
    }
    if len(steps) > 1:
        raise ConfigError(
            f"sync={cfg.sync} needs the same number of local steps on every site, but the split gives "
            f"{min(steps)}..{max(steps)} steps a round; set local_steps=N (or use sync=round)"
        )
    step, key = steps.pop(), "comm_period" if cfg.sync == "periodic" else "check_every"
    period = cfg.comm_period if cfg.sync == "periodic" else (cfg.check_every or step)
    if packed and period % step:
        raise ConfigError(
            f"{key}={period} with sites packed into fewer processes (or sampled) is not supported: a process "
            f"trains its sites one after another, so they synchronize at round ends only; use a multiple of the "
            f"{step} local steps of a round (e.g. {key}={2 * step}), or one process per site"
        )


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


def run(cfg: Config, plan: Plan, on_event: Callable[[dict], None]) -> str:
    """Starts this node's sites as planned and blocks until they finish (restarting them up to
    max_restarts times); `on_event` gets rank 0's events. Returns the SHA-256 of the global model,
    which every site must end with. A cross-silo coordinator first waits at the door for its sites."""
    if cfg.role == "coordinator":
        results = cross_silo.coordinate(cfg, plan.prepared, on_event)
    else:
        log_split(plan.prepared)
        results = run_sites(cfg, plan.prepared, plan.topology, plan.layout, on_event, max_restarts=cfg.max_restarts)
    fingerprints = {result["weights_sha256"] for result in results.values()}
    if len(fingerprints) != 1:
        raise RuntimeError(f"sites ended with different global models: {results}")
    return fingerprints.pop()
