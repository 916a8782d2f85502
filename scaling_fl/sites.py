"""Sites and workers: which process hosts which sites on which device, who takes part in a
round, device pinning and the process group of one worker.

A *site* is a data partition with its weight and its seeds (seed, site, round); a *worker* is a
process pinned to a device that trains its sites one after another. `site_ids=[0,0,1,1]` alone
keeps its meaning, one worker per site; `num_sites` and `processes_per_device` pack many sites
into few workers. Nothing a site computes depends on which worker hosts it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from scaling_fl.config import participant_count

if TYPE_CHECKING:
    import torch

# torch is imported where a site starts, not here: the command line plans the layout (plan_layout)
# before it starts the fork server, and that must not wait for torch's import.

# Written by a cross-silo coordinator's launcher into the job's folder when a site waits at the door:
# at the next checkpointed round every worker stops, and the sites meet again with it.
MEMBERSHIP_CHANGE = "membership-change"


@dataclass(frozen=True)
class Site:
    rank: int  # global rank == site index
    world_size: int  # total number of sites over all nodes
    local_rank: int  # index into this node's site_ids
    device: torch.device
    backend: str

    @property
    def is_leader(self) -> bool:
        """Rank 0 talks: logs, progress bars, events for the launcher."""
        return self.rank == 0


@dataclass(frozen=True)
class Layout:
    """Sites over this node's worker processes: `sites[w]` are the sites worker w hosts (in order).

    cross_silo: a coordinator and sites started apart (scaling_fl/cross_silo.py). Then every node has
    one worker, `devices` is this node's, `sites` lists every worker's sites by global rank (worker 0,
    the coordinator, hosts none), and each process scores all of the evaluation rows it holds (the
    coordinator the test set, a site its own validation rows) instead of a shard of shared ones;
    only the coordinator reads checkpoints; site_names are the roster, site k's name keys its
    metrics in the record."""

    num_sites: int
    devices: tuple[int, ...]  # the device id of each worker
    sites: tuple[tuple[int, ...], ...]
    cross_silo: bool = False
    site_names: tuple[str, ...] = ()

    def site_label(self, site: int) -> int | str:
        """How site `site` is named in metrics (`site.{label}.*`): its roster name, else its index."""
        return self.site_names[site] if self.site_names else site

    @property
    def num_workers(self) -> int:
        return len(self.devices)

    @property
    def one_site_per_worker(self) -> bool:
        return all(len(hosted) == 1 for hosted in self.sites)


def trains_sites_in_turn(cfg, layout: Layout) -> bool:
    """Whether the run needs the round loop that trains each worker's sites one after another
    (train/federated.py's _federate_sites): several sites in a process, a sampled fraction of the
    sites, or a feature that handles each site's update or state apart (robust aggregation,
    byzantine sites, SCAFFOLD's control variates). One site per process with all sites training
    takes the leaner loop."""
    return (
        not (layout.one_site_per_worker and cfg.fraction_fit == 1.0)
        or cfg.aggregation != "mean"
        or bool(cfg.byzantine_sites)
        or cfg.strategy == "scaffold"
    )


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_layout(
    site_ids: tuple[int, ...],
    num_sites: int | None,
    processes_per_device: int | None,
    cuda: bool,
    cores: int | None = None,
) -> Layout:
    """Where every site runs.

    - `site_ids` alone: site k on device site_ids[k], one worker per site (the classic layout).
    - `num_sites=N`: N sites spread round-robin over the distinct devices of `site_ids`.
    - `processes_per_device=P`: each device's sites are split into min(P, its sites) workers, in
      contiguous blocks. Default with `num_sites`: one worker per GPU, or one per CPU core on a
      machine without CUDA (never more workers than sites).
    """
    distinct = list(dict.fromkeys(site_ids))
    if num_sites is None:
        site_device = list(site_ids)
        if processes_per_device is None:
            return Layout(len(site_ids), tuple(site_ids), tuple((site,) for site in range(len(site_ids))))
    else:
        site_device = [distinct[site % len(distinct)] for site in range(num_sites)]
        if processes_per_device is None:
            processes_per_device = 1 if cuda else max(1, (cores or _cores()) // len(distinct))
    devices, sites = [], []
    for device in distinct:
        on_device = [site for site, where in enumerate(site_device) if where == device]
        workers = min(processes_per_device, len(on_device))
        for worker in range(workers):  # contiguous, near-equal blocks
            block = on_device[len(on_device) * worker // workers : len(on_device) * (worker + 1) // workers]
            devices.append(device)
            sites.append(tuple(block))
    return Layout(len(site_device), tuple(devices), tuple(sites))


def read_layout(workdir: str) -> Layout:
    """The launcher's layout (workdir/layout.json): the workers do not plan their own."""
    import json

    with open(os.path.join(workdir, "layout.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    return Layout(
        raw["num_sites"],
        tuple(raw["devices"]),
        tuple(tuple(hosted) for hosted in raw["sites"]),
        bool(raw.get("cross_silo", False)),
        tuple(raw.get("site_names", ())),
    )


def participants(seed: int, round_index: int, num_sites: int, fraction_fit: float, min_fit_sites: int) -> list[int]:
    """The sites that train in round `round_index` (0-based): max(min_fit_sites, floor(fraction_fit x N))
    of them, as Flower's fraction_fit / min_fit_clients, drawn from (seed, round) alone, so every
    worker, every packing and every restart agrees. Sorted."""
    import numpy as np

    count = participant_count(num_sites, fraction_fit, min_fit_sites)
    if count >= num_sites:
        return list(range(num_sites))
    generator = np.random.Generator(np.random.PCG64([seed, round_index, 0x5A3B1E]))
    return sorted(int(site) for site in generator.choice(num_sites, size=count, replace=False))


def site_device(site_ids: tuple[int, ...], local_rank: int) -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", site_ids[local_rank])
    return torch.device("cpu")


def threads_per_site(local_sites: int, environ: dict | None = None) -> int:
    """Splits this machine's cores between its sites so they do not oversubscribe them. OMP_NUM_THREADS,
    when set, wins, as it does under torchrun: the machine may be shared with other work."""
    given = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_sites))


def choose_backend(requested: str, site_ids: tuple[int, ...], cuda: bool) -> str:
    """NCCL when every GPU hosts one site; gloo otherwise (NCCL refuses two ranks on one GPU, gloo
    reduces CUDA tensors through host memory)."""
    if requested != "auto":
        return requested
    return "nccl" if cuda and len(set(site_ids)) == len(site_ids) else "gloo"


def start_site(site_ids: tuple[int, ...], requested_backend: str, collective_timeout_s: float) -> Site:
    """Joins the process group that torch.distributed.elastic prepared through the environment."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = site_device(site_ids, local_rank)
    torch.set_num_threads(threads_per_site(len(site_ids)))
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    backend = choose_backend(requested_backend, site_ids, device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    extra = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend, store=_attempt_store(world_size, timeout), rank=rank, world_size=world_size, timeout=timeout, **extra
    )
    return Site(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def _attempt_store(world_size: int, timeout: datetime.timedelta):
    """The elastic agent's store, under a prefix unique to this start of the workers.

    After a restart the agent's store still holds the previous attempt's rendezvous keys
    (the dead workers' addresses); reading them makes gloo connect to closed ports. A
    prefix per restart count gives every attempt a clean namespace.
    """
    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"scaling-fl/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def stop_site() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
