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
    if backend == "nccl":
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return Site(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def stop_site() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
