"""Rank <-> site, device pinning and the process group of one site worker."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def site_device(site_ids: tuple[int, ...], local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", site_ids[local_rank])
    return torch.device("cpu")


def threads_per_site(local_sites: int) -> int:
    """Splits this machine's cores between its sites so they do not oversubscribe them."""
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
    dist.init_process_group(backend, store=_attempt_store(world_size, timeout), rank=rank, world_size=world_size,
                            timeout=timeout, **extra)
    return Site(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def _attempt_store(world_size: int, timeout: datetime.timedelta):
    """The elastic agent's store, under a prefix unique to this start of the workers.

    After a restart the agent's store still holds the previous attempt's rendezvous keys
    (the dead workers' addresses); reading them makes gloo connect to closed ports. A
    prefix per restart count gives every attempt a clean namespace.
    """
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"scaling-fl/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def stop_site() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
