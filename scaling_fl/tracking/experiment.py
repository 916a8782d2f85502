"""The Sacred experiment: the config, the config hook and the main command.

The launching process owns the Sacred run. The config hook resolves the config and runs the
pre-flight (scaling_fl.job: data, model, devices, tracking server, previous run of this job,
claims) before Sacred starts its observers, so bad input costs one line and exit code 2 and
leaves no run record behind. The main command starts the sites (scaling_fl.job.run) and logs
what rank 0 reports to the run record.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from sacred import Experiment  # noqa: E402
from sacred.utils import apply_backspaces_and_linefeeds  # noqa: E402

from scaling_fl import cross_silo, job, processes, storage  # noqa: E402
from scaling_fl.config import DEFAULTS, Config, resolve  # noqa: E402
from scaling_fl.errors import EXIT_BAD_INPUT, UserError, print_error  # noqa: E402
from scaling_fl.launch import runs_in_launcher  # noqa: E402
from scaling_fl.tracking import resume, sacred_fixes  # noqa: E402
from scaling_fl.tracking.observers import mongo_client  # noqa: E402

sacred_fixes.apply()

MAIN_COMMAND = "train_federated"

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
# Set by the command line front end: the config keys given with `with` (a site's own training keys).
keys_given: list[str] = []


@dataclass
class Progress:
    """What the command line front end needs for its last line after a signal."""

    job_name: str = ""
    rounds_logged: int = 0
    num_rounds: int = 0
    checkpoints_dir: str | None = None


progress = Progress()


def fail_bad_input(error: UserError) -> None:
    print_error(error)
    raise SystemExit(EXIT_BAD_INPUT)


def config_from_sacred(config: dict) -> Config:
    return resolve({key: config[key] for key in DEFAULTS if key in config})


def interrupted_line(stop: processes.Interrupted) -> str:
    where = f" after round {progress.rounds_logged} of {progress.num_rounds}" if progress.num_rounds else ""
    if not progress.job_name:
        return f"interrupted by {stop}{where}; nothing was started"
    how = (
        "resume from its last checkpoint"
        if progress.checkpoints_dir
        else "continue its record (without checkpoints_dir, training starts over)"
    )
    return f"interrupted by {stop}{where}; re-run with job_name={progress.job_name} to {how}"


def lost_record_line(run) -> str | None:
    """One line when an observer lost the run record mid-run (the job itself finished)."""
    lost = [observer.lost for observer in getattr(run, "observers", []) if getattr(observer, "lost", None)]
    if not lost:
        return None
    what = "training finished and its checkpoints are complete" if progress.checkpoints_dir else "training finished"
    return (
        f"the run record was lost mid-run ({lost[0]}); {what}; re-run the same command "
        f"(job_name={progress.job_name}) once the store is back to complete the record"
    )


def make_observer(plan: job.Plan, cfg: Config):
    resume_id = plan.previous.run_id if plan.previous else None
    if plan.tracking == "mongo":
        return resume.ResumableMongoObserver(
            client=mongo_client(plan.mongo), db_name=plan.mongo.database, resume_id=resume_id, hosts=plan.mongo.hosts
        )
    if plan.tracking == "file":
        return resume.ResumableFileStorageObserver(cfg.runs_dir, resume_id=resume_id)
    return None


@ex.config_hook
def validate(config, command_name, logger):
    try:
        cfg = config_from_sacred(config)
        if command_name == MAIN_COMMAND and cfg.role == "site":  # the coordinator keeps the record
            cross_silo.check_site(cfg)
            ex.observers[:] = []
        elif command_name == MAIN_COMMAND:
            plan = job.preflight(cfg, pick_tracking=not explicit_observers)
            if not explicit_observers:
                observer = make_observer(plan, cfg)
                ex.observers[:] = [observer] if observer else []
    except UserError as error:
        fail_bad_input(error)
    return {"split": cfg.split, "job_name": cfg.job_name}


@ex.main
def train_federated(_config, _run):
    cfg = config_from_sacred(_config)
    if cfg.role == "site":
        results = cross_silo.join_and_train(cfg, keys_given)
        return {"weights_sha256": next(iter(results.values()))["weights_sha256"]}
    plan = job.preflight(cfg, pick_tracking=not explicit_observers)
    for observer in _run.observers:  # a continued record keeps its info (and Mongo's metric references)
        _run.info.update(getattr(observer, "previous_info", {}) or {})
    last_logged = plan.previous.last_round if plan.previous else 0
    progress.job_name, progress.num_rounds, progress.checkpoints_dir = cfg.job_name, cfg.num_rounds, cfg.checkpoints_dir
    progress.rounds_logged = plan.resume_point.round if plan.resume_point else 0
    if plan.previous:
        log.info(
            "continuing run %s of job %r (was %s, rounds logged: %d)",
            plan.previous.run_id,
            cfg.job_name,
            plan.previous.status,
            last_logged,
        )
    if plan.resume_point:
        log.info(
            "checkpoint %s found: the sites continue at round %d",
            plan.resume_point.directory,
            plan.resume_point.round + 1,
        )
    prepared = plan.prepared
    _run.info["sites"] = (
        {"role": "coordinator", "expected": plan.layout.num_sites}
        if cfg.role == "coordinator"
        else {
            "count": plan.topology.num_sites,
            "processes": plan.topology.num_nodes * plan.topology.workers_per_node,
            "in_launcher": runs_in_launcher(plan.topology),  # the one worker trains in the launcher's process
            "sizes": prepared.site_sizes(),
            "label_names": list(prepared.label_names),
            "label_histograms": prepared.histograms().tolist(),
            "test_rows": len(prepared.test),
            "validation_rows": len(prepared.validation),  # 0: validation.* are scored on the test set
        }
    )
    _add_json_artifact(_run, "config.resolved.json", cfg.as_dict())
    tensorboard = _tensorboard_writer(cfg)
    final: dict[str, float] = {}
    logged_up_to = [last_logged]  # grows as rounds arrive; replays after a restart are skipped

    def on_event(event: dict) -> None:
        if event["event"] == "start" and event["restart"] > 0:
            _run.info["restarts"] = event["restart"]
            log.warning(
                "sites restarted (restart %d of at most %d), continuing after round %d",
                event["restart"],
                cfg.max_restarts,
                event["start_round"],
            )
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
            for name in sorted(os.listdir(event["path"])):  # the folder's files (base/, merged/: in the copy)
                if os.path.isfile(os.path.join(event["path"], name)):
                    _run.add_artifact(os.path.join(event["path"], name), f"final_model.{name}")
            if cfg.final_model_dir:
                _run.info["final_model_dir"] = storage.put_tree(event["path"], cfg.final_model_dir)
                log.info("final model written to %s", storage.safe_url(cfg.final_model_dir))
        elif event["event"] == "sites_joined":  # a cross-silo coordinator: who came, what each reported
            _run.info["sites"]["joined"] = event["sites"]
        elif event["event"] == "membership":  # ... and who left or came (back) later
            _run.info["sites"].setdefault("changes", []).append({k: v for k, v in event.items() if k != "event"})
        elif event["event"] == "samples":
            _run.add_artifact(event["path"], "samples.json")

    try:
        _run.info["final_weights_sha256"] = job.run(cfg, plan, on_event)
    finally:
        if tensorboard:
            tensorboard.close()
    return {
        f"{part}.{name}": final[f"{part}.{name}"]
        for part in ("validation", "test")
        for name in ("accuracy", "loss", "f1_macro", "perplexity")
        if f"{part}.{name}" in final
    }


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
