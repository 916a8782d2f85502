"""How far top-k with error feedback moves the model, against the mean update it stands for.

A model of the sparse exchange's two averaging rules (scaling_fl/exchange/sparse.py), in NumPy:
N sites whose round updates share a mean and differ by noise each send their top k of update +
residual and keep the rest (error feedback). `per_position` averages a position over the sites
that sent it; `dilute` divides by all N (what `sparse_average=fl4health` does when every site sends
something into every tensor). The printed ratio is the total movement after R rounds, projected on
the mean update's direction, over R x the mean update: 1 is FedAvg's step.

    .venv/bin/python bench/sparse_bias.py
    .venv/bin/python bench/sparse_bias.py --sites 8 --noise 0.5

Per-position averaging applies a carried-over value at the full weight of the one site that sends
it, whenever it is sent, so the more the sites' selections differ (noise), the nearer the step
comes to N times the mean's; dilution keeps it at the mean's size.
"""

from __future__ import annotations

import argparse

import numpy as np


def movement_ratio(rule: str, sites: int, size: int, density: float, rounds: int, noise: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=size)
    k = max(1, int(density * size))
    residual = np.zeros((sites, size))
    model = np.zeros(size)
    for _ in range(rounds):
        updates = mean + rng.normal(scale=noise, size=(sites, size))
        total, senders = np.zeros(size), np.zeros(size)
        for site in range(sites):
            carried = updates[site] + residual[site]
            chosen = np.argpartition(-np.abs(carried), k)[:k]
            sent = np.zeros(size)
            sent[chosen] = carried[chosen]
            residual[site] = carried - sent
            total += sent
            senders[chosen] += 1
        if rule == "per_position":
            model += np.where(senders > 0, total / np.maximum(senders, 1), 0.0)
        else:
            model += total / sites
    return float(model @ mean / (mean @ mean) / rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 2.0], help="noise / mean, per site")
    args = parser.parse_args()
    print(f"{args.sites} sites, {args.size} values, top {args.density:.0%}, error feedback, {args.rounds} rounds")
    print("| site noise (x the mean update) | per_position | dilute (fl4health) |")
    print("|---|---|---|")
    for noise in args.noise:
        ratios = [
            movement_ratio(rule, args.sites, args.size, args.density, args.rounds, noise, args.seed)
            for rule in ("per_position", "dilute")
        ]
        print(f"| {noise:g} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |")


if __name__ == "__main__":
    main()
