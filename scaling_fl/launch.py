"""site_ids -> one worker process per site, through torch.distributed.elastic.

The launcher is the process the user started. It reads and splits the data once,
starts this node's sites with an elastic agent (no torchrun needed), follows rank 0's
events and learns from elastic which site failed and why. The same command runs one
node of a multi-node job when the environment says so:

- Kubeflow PyTorchJob / manual: MASTER_ADDR, MASTER_PORT, WORLD_SIZE = number of nodes, RANK = node index
- SLURM: SLURM_NNODES and SLURM_NODEID (MASTER_ADDR / MASTER_PORT exported by deploy/slurm/launch.sh)
- torchrun --nproc-per-node=1: each torchrun worker is one node's launcher

Total sites = nodes x len(site_ids); global rank = node index x len(site_ids) + local index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scaling_fl import processes
from scaling_fl.config import Config, ConfigError
from scaling_fl.data.prepared import PreparedData, save_prepared
from scaling_fl.events import EventFollower
from scaling_fl.sites import Layout, trains_sites_in_turn

log = logging.getLogger("scaling_fl")

SHUTDOWN_GRACE_S = 3


@dataclass(frozen=True)
class Topology:
    num_nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    sites_per_node: int
    workers_per_node: int  # the processes that host this node's sites

    @property
    def num_sites(self) -> int:
        return self.num_nodes * self.sites_per_node

    @property
    def is_main_node(self) -> bool:
        return self.node_rank == 0


class SiteFailure(RuntimeError):
    """A site process failed; the message names the site and carries its traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment {key}={env[key]!r} is not an integer") from None


def node_topology(sites_per_node: int, env: dict | None = None, workers_per_node: int | None = None) -> Topology:
    env = dict(os.environ if env is None else env)
    workers_per_node = workers_per_node or sites_per_node
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env:  # inside torchrun
        if env["LOCAL_WORLD_SIZE"] != "1":
            raise ConfigError("under torchrun use --nproc-per-node=1: scaling-fl starts one process per site itself")
        # torchrun's own store already listens on MASTER_PORT; the sites meet one port above.
        env["MASTER_PORT"] = str(_env_int(env, "MASTER_PORT") + 1)
    if "WORLD_SIZE" in env or "RANK" in env:
        num_nodes, node_rank = (
            _env_int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1,
            _env_int(env, "RANK") if "RANK" in env else 0,
        )
    elif "SLURM_NNODES" in env and "SLURM_NODEID" in env:
        num_nodes, node_rank = _env_int(env, "SLURM_NNODES"), _env_int(env, "SLURM_NODEID")
    else:
        num_nodes, node_rank = 1, 0
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ConfigError(f"node rank {node_rank} is outside 0..{num_nodes - 1} (check RANK / WORLD_SIZE)")
    if num_nodes > 1:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError("a multi-node job needs MASTER_ADDR and MASTER_PORT (the address of node 0)")
        return Topology(
            num_nodes, node_rank, env["MASTER_ADDR"], _env_int(env, "MASTER_PORT"), sites_per_node, workers_per_node
        )
    port = _env_int(env, "MASTER_PORT") if "MASTER_PORT" in env else _free_port()
    return Topology(1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, sites_per_node, workers_per_node)


def check_devices(cfg: Config) -> None:
    """GPU ids must exist when CUDA does; on CPU they are ignored with one warning."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        bad = sorted({gpu for gpu in cfg.site_ids if gpu >= count})
        if bad:
            raise ConfigError(
                f"site_ids={list(cfg.site_ids)} names GPU(s) {bad} but this node has {count} (ids 0..{count - 1})"
            )
    else:
        if cfg.backend == "nccl":
            raise ConfigError("backend='nccl' needs CUDA; use backend=auto or gloo on a machine without GPUs")
        log.warning(
            "no CUDA device: the %d sites of this node run on the CPU with gloo; site_ids only set how many",
            len(cfg.site_ids),
        )


def check_layout(cfg: Config, layout: Layout, topology: Topology) -> None:
    """What sites packed into fewer processes, or sampled, cannot do (yet). Refused before any worker starts."""
    if not trains_sites_in_turn(cfg, layout):
        return
    how = (
        f"{layout.num_sites} sites in {layout.num_workers} process(es)"
        if not layout.one_site_per_worker
        else f"fraction_fit={cfg.fraction_fit}"
        if cfg.fraction_fit < 1.0
        else f"aggregation={cfg.aggregation}"
        if cfg.aggregation != "mean"
        else "byzantine_sites"
    )
    if cfg.sync != "round" and cfg.fraction_fit < 1.0:
        raise ConfigError(
            f"sync={cfg.sync} with fraction_fit={cfg.fraction_fit} is not supported: a site that sits a round out "
            "would keep a model no synchronization reaches; use sync=round with sampling, or fraction_fit=1"
        )
    if topology.num_nodes > 1:
        raise ConfigError(
            f"{how} runs on one node for now; on {topology.num_nodes} nodes use site_ids=[...] "
            "with one process per site and fraction_fit=1"
        )


def check_site_sizes(prepared: PreparedData) -> None:
    empty = [site for site, size in enumerate(prepared.site_sizes()) if size == 0]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
        raise ConfigError(
            f"{len(empty)} of {len(prepared.parts)} sites get no training rows (site {shown}): "
            f"use fewer sites (num_sites / site_ids) or more training data"
        )


def log_split(prepared: PreparedData, every_site_up_to: int = 16) -> None:
    """One line per site for a few sites; a summary for many (info.json keeps the full table)."""
    names = prepared.label_names
    sizes, histograms = prepared.site_sizes(), prepared.histograms()
    if len(sizes) <= every_site_up_to:
        for site, (size, histogram) in enumerate(zip(sizes, histograms)):
            labels = " ".join(f"{name}:{int(count)}" for name, count in zip(names, histogram))
            log.info("site %d: %d rows  %s", site, size, labels)
    else:
        import numpy as np

        shares = histograms / np.maximum(histograms.sum(axis=1, keepdims=True), 1)
        entropy = -(shares * np.log2(np.where(shares > 0, shares, 1))).sum(axis=1)
        log.info(
            "%d sites: rows min %d / median %d / max %d, label entropy min %.2f / median %.2f / max %.2f bits "
            "(per site: info.json)",
            len(sizes),
            min(sizes),
            int(np.median(sizes)),
            max(sizes),
            entropy.min(),
            np.median(entropy),
            entropy.max(),
        )
    log.info(
        "validation set: %s; test set: %d rows",
        f"{len(prepared.validation)} training rows held out" if len(prepared.validation) else "the test set",
        len(prepared.test),
    )


def run_sites(
    cfg: Config,
    prepared: PreparedData,
    topology: Topology,
    layout: Layout,
    on_event: Callable[[dict], None],
    max_restarts: int = 0,
    on_workdir: Callable[[str], None] | None = None,
) -> dict[int, dict]:
    """Starts this node's sites and blocks until they finish; returns each local site's result.
    on_workdir: told the job's folder before the workers start (a cross-silo coordinator's waiting room)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from scaling_fl.train.federated import run_site

    processes.start_fork_server()  # already running when started through the command line
    workdir = processes.make_workdir(cfg.job_name)
    try:
        if on_workdir is not None:
            on_workdir(workdir)
        save_prepared(prepared, os.path.join(workdir, "data"))
        with open(os.path.join(workdir, "layout.json"), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(layout), handle)  # the workers take the launcher's plan, not their own
        if runs_in_launcher(topology):
            _stop_fork_server()  # started by the command line before the layout was known; not needed
            with EventFollower(os.path.join(workdir, "events.jsonl"), on_event):
                return {0: run_in_launcher(cfg, topology, workdir, max_restarts)}
        logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
        launch_config = LaunchConfig(
            min_nodes=topology.num_nodes,
            max_nodes=topology.num_nodes,
            nproc_per_node=topology.workers_per_node,
            run_id=cfg.job_name,
            rdzv_backend="static",
            rdzv_endpoint=f"{topology.master_addr}:{topology.master_port}",
            rdzv_configs={"rank": topology.node_rank, "timeout": 900},
            max_restarts=max_restarts,
            monitor_interval=0.1,  # how soon a failed site is noticed (a cheap poll of the children)
            start_method="forkserver",
            logs_specs=DefaultLogsSpecs(log_dir=os.path.join(workdir, "elastic")),  # every site's error.json
            local_addr=topology.master_addr if topology.num_nodes == 1 else None,
            # Sites stopped for a restart get SIGTERM, then SIGKILL this much later: a frozen (SIGSTOPped,
            # wedged) site would otherwise hold the restart back by elastic's default 30 s.
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        with EventFollower(os.path.join(workdir, "events.jsonl"), on_event), processes.StoppedSiteWatch():
            try:
                return elastic_launch(launch_config, run_site)(cfg.as_dict(), workdir)
            except ChildFailedError as error:
                description = _describe_failure(
                    error, topology.node_rank, topology.workers_per_node, os.path.join(workdir, "elastic"), workdir
                )
                log.error("%s", description.splitlines()[0])  # the root cause, also in the captured output
                raise SiteFailure(description) from None
            except SignalException as error:  # SIGHUP, through elastic
                raise processes.Interrupted(error.sigval) from None
    finally:
        _stop_fork_server()
        shutil.rmtree(workdir, ignore_errors=True)


def runs_in_launcher(topology: Topology) -> bool:
    """One worker on one node trains in the launcher's own process: no fork server, no second copy
    of torch and transformers, no process that could lose its parent. Memory is what a single-worker
    simulation is chosen for (docs/benchmarks.md, "Many sites per process against Flower's
    simulation"). The price: a process killed from outside (SIGKILL, the OOM killer) is the whole
    job, continued by its next start from the last checkpoint rather than restarted by elastic."""
    return topology.num_nodes == 1 and topology.workers_per_node == 1


def run_in_launcher(cfg: Config, topology: Topology, workdir: str, max_restarts: int) -> dict:
    """The single worker's run in this process, as elastic would run it in a child: the same
    environment (rank 0 of 1, the restart count), a store it meets the process group through, a
    failure restarted from the last checkpoint up to max_restarts times and reported as a site's."""
    import torch.distributed as dist

    from scaling_fl.sites import stop_site
    from scaling_fl.train.federated import run_worker

    timeout = datetime.timedelta(seconds=cfg.collective_timeout_s)
    store = dist.TCPStore(topology.master_addr, topology.master_port, 1, is_master=True, timeout=timeout)
    try:
        for attempt in range(max_restarts + 1):
            environment = {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "GROUP_RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": topology.master_addr,
                "MASTER_PORT": str(store.port),
                "TORCHELASTIC_RESTART_COUNT": str(attempt),
            }
            with _environment(environment):
                try:
                    return run_worker(cfg.as_dict(), workdir)
                except Exception as error:  # noqa: BLE001 - reported as the site's failure, as elastic would
                    permanent = processes.restart_cannot_fix(error)
                    if permanent or attempt == max_restarts:
                        description = _describe_own_failure(error, permanent)
                        log.error("%s", description.splitlines()[0])
                        raise SiteFailure(description) from None
                    log.warning(
                        "site 0 failed (%s: %s); restarting it from the last checkpoint", type(error).__name__, error
                    )
                finally:
                    stop_site()
    finally:
        del store
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Sets environment variables for the duration of the block, then restores them (the launcher's
    own checks read RANK / WORLD_SIZE to tell a multi-node job)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _describe_own_failure(error: BaseException, permanent: bool) -> str:
    """The worker's failure in this process, worded as `_describe_failure` words a child's."""
    import traceback

    from scaling_fl.storage import first_line

    trace = "".join(traceback.format_exception(error))
    if permanent:
        message = first_line(error) if str(error) else type(error).__name__
        header = f"site 0 failed: {message} (not retried: a restart cannot fix this)"
        return f"{header}\n--- traceback of site 0 ---\n{trace}"
    return (
        f"site 0 (node rank 0, local index 0) failed: {type(error).__name__}: {error}"
        f"\n--- traceback of site 0 ---\n{trace}"
    )


def _stop_fork_server() -> None:
    """The fork server goes as soon as the sites are done: it holds no state, and its graceful exit
    (an interpreter with torch and transformers to tear down) would take ~2 s: it is killed. CPython's private
    forkserver attributes, used only here (3.9+; a test
    in tests/test_processes.py fails when they change)."""
    import multiprocessing.forkserver
    import signal

    server = multiprocessing.forkserver._forkserver
    stop, pid = getattr(server, "_stop", None), getattr(server, "_forkserver_pid", None)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if stop is not None:
        stop()


# Errors a site raises because ANOTHER site died: its peer closed the connection or stopped answering.
_COLLATERAL = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote worker crashing",
    "DistNetworkError",
    "DistBackendError",
    "Timed out waiting",
    "timed out",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL",
    "ECONNRESET",
)


def _site_errors(log_dir: str, node_rank: int, sites_per_node: int) -> dict[int, dict]:
    """Every error file this node's sites wrote in their last attempt: global rank -> {timestamp, message,
    trace}. torch elastic itself reports only the first process to exit, which may be a peer that lost
    its connection to the site that really failed."""
    import glob
    import json
    import re

    found: dict[int, tuple[int, dict]] = {}
    for path in glob.glob(os.path.join(log_dir, "*", "attempt_*", "*", "error.json")):
        match = re.search(r"attempt_(\d+)[/\\](\d+)[/\\]error\.json$", path)
        if not match:
            continue
        attempt, local_rank = int(match.group(1)), int(match.group(2))
        try:
            with open(path, encoding="utf-8") as handle:
                message = json.load(handle)["message"]
            error = {
                "timestamp": int(message["extraInfo"]["timestamp"]),
                "message": message.get("message", ""),
                "trace": message["extraInfo"].get("py_callstack", ""),
            }
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rank = node_rank * sites_per_node + local_rank
        if rank not in found or attempt > found[rank][0]:
            found[rank] = (attempt, error)
    newest = max((attempt for attempt, _ in found.values()), default=0)
    return {rank: error for rank, (attempt, error) in found.items() if attempt == newest}


def _is_collateral(trace: str) -> bool:
    return any(marker in trace for marker in _COLLATERAL)


def _describe_failure(error, node_rank: int, sites_per_node: int, log_dir: str, workdir: str) -> str:
    """The site that failed first for a reason of its own, with its traceback. Error files carry whole
    seconds only, so sites that failed in the same second are told apart by their traceback: a lost
    peer is collateral. An error a restart cannot fix, recorded by the site that met it, comes first."""
    permanent = processes.read_permanent_error(workdir)
    if permanent is not None:
        return f"site {permanent['rank']} failed: {permanent['message']} (not retried: a restart cannot fix this)" + (
            f"\n--- traceback of site {permanent['rank']} ---\n{permanent['trace']}" if permanent["trace"] else ""
        )
    errors = _site_errors(log_dir, node_rank, sites_per_node)
    for rank, failure in error.failures.items():  # signals and sites without an error file
        if rank not in errors:
            cause = failure.message if isinstance(failure.message, str) and failure.message else ""
            if failure.signal_name() != "<N/A>":
                cause = f"killed by {failure.signal_name()}"
            errors[rank] = {
                "timestamp": failure.timestamp,
                "message": cause or f"exit code {failure.exitcode}",
                "trace": "",
                "exitcode": failure.exitcode,
            }
    rank = min(errors, key=lambda r: (errors[r]["timestamp"], _is_collateral(errors[r]["trace"]), r))
    chosen = errors[rank]
    cause = chosen["message"] or f"exit code {chosen.get('exitcode', 1)}"
    header = f"site {rank} (node rank {rank // sites_per_node}, local index {rank % sites_per_node}) failed: {cause}"
    others = sorted(r for r in errors if r != rank)
    if others:
        header += f" (then site(s) {', '.join(map(str, others))} stopped)"
    return header + (f"\n--- traceback of site {rank} ---\n{chosen['trace']}" if chosen["trace"] else "")
