"""Runs a function on N real gloo ranks (spawned processes) and returns each rank's result."""

from __future__ import annotations

import socket

from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The ranks fork from a server that imported these once, instead of each spawned rank importing
# torch again (seconds per rank on two cores; the gloo tests start dozens of ranks).
PRELOAD = ["torch", "torch.distributed", "scaling_fl.exchange.factory", "scaling_fl.strategies.factory", "tests.ranks"]


def run_on_ranks(fn, world_size: int, *args) -> list:
    """fn(*args) runs in every rank with RANK/WORLD_SIZE/MASTER_* set; results come back by rank."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(PRELOAD)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=f"test-{free_port()}",
        rdzv_backend="static",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"rank": 0},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="forkserver",
        local_addr="127.0.0.1",
    )
    results = elastic_launch(config, fn)(*args)
    return [results[rank] for rank in range(world_size)]


def init_gloo() -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"
