"""Flower's simulation engine on the job bench/scale.py describes: run by bench/scale.py, in Flower's venv.

    FLOWER_SCALE_SPEC=/tmp/.../flower-spec.json <flower-venv>/bin/python bench/flower_scale/app.py

One process (this driver: the ServerApp, FedAvg, the central evaluation) plus Ray (gcs_server, raylet, a
few helpers and `client_actors` actors, each hosting the ClientApp for one virtual site at a time). FedAvg
samples floor(fraction_fit x N) sites per round (at least 1), trains them, averages their weights by rows,
and evaluate_fn scores the new global model on all evaluation rows after every round (the initial model
is not scored: scaling-fl does not score it either). Federated (client-side) evaluation is off. The
per-round results go to the spec's `out_path` as JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import scale_task
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

server_app = ServerApp()
RECORD: dict = {"rounds": []}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    job = scale_task.spec()
    torch.set_num_threads(int(job["server_threads"]))
    model = scale_task.working_model()  # the driver's copy: initial weights, then the evaluated global model
    participants = max(1, math.floor(job["fraction_fit"] * job["num_sites"] + 1e-9))
    strategy = FedAvg(
        fraction_train=job["fraction_fit"],
        fraction_evaluate=0.0,
        min_train_nodes=participants,
        min_evaluate_nodes=0,
        min_available_nodes=job["num_sites"],
    )
    last = [time.perf_counter()]

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            last[0] = time.perf_counter()
            return None
        trained = time.perf_counter()
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = scale_task.evaluate(model)
        done = time.perf_counter()
        RECORD["rounds"].append({"round": server_round, **metrics, "round_s": done - last[0], "eval_s": done - trained})
        last[0] = done
        print(f"flower round {server_round}: accuracy {metrics['accuracy']:.4f}", file=sys.stderr, flush=True)
        return MetricRecord(metrics)

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=job["num_rounds"],
        evaluate_fn=evaluate_fn,
    )


def run() -> None:
    job = scale_task.spec()
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=scale_task.client_app,
        num_supernodes=job["num_sites"],
        backend_config={
            "client_resources": {"num_cpus": job["client_cpus"], "num_gpus": 0.0},
            "init_args": {"num_cpus": job["ray_cpus"], "include_dashboard": False},
        },
    )
    RECORD["simulation_s"] = time.perf_counter() - started
    if len(RECORD["rounds"]) != job["num_rounds"]:
        raise SystemExit(f"flower: {len(RECORD['rounds'])} of {job['num_rounds']} rounds evaluated")
    with open(job["out_path"], "w", encoding="utf-8") as handle:
        json.dump(RECORD, handle, indent=2)


if __name__ == "__main__":
    if scale_task.SPEC_ENV not in os.environ:
        raise SystemExit(f"set {scale_task.SPEC_ENV} to the spec bench/scale.py writes")
    run()
