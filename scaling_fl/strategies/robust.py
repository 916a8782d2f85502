"""Robust aggregation rules: what replaces the mean of the sites' updates when some sites may lie.

Pure tensor math on `rows`, a [participants, n] slice of the participants' updates (one row per
site, in site order). The exchange (exchange/gathered.py) gathers the rows bucket by bucket and
calls these; the server strategy then applies the result as it applies a mean. The rules are
unweighted (each participant counts once, whatever its number of rows), as in their papers and in
Flower's FedMedian / FedTrimmedAvg / Krum: a weighted rule would let a lying site claim many rows.

    median        coordinate-wise median (Yin et al. 2018); an even count averages the middle two
    trimmed_mean  coordinate-wise mean after dropping the floor(trim_fraction x P) largest and as many
                  smallest values (Yin et al. 2018; scipy.stats.trim_mean's rule)
    krum          Multi-Krum (Blanchard et al. 2017): each site's score is the summed squared distance
                  to its P - f - 2 nearest other sites; the mean of the `select` lowest-scored updates
                  (select=1: Krum itself, the single most central update)
"""

from __future__ import annotations

import torch

RULES = ("mean", "median", "trimmed_mean", "krum")


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """The median of every column; for an even number of rows, the mean of the two middle values
    (numpy's definition; torch.median would return the lower one)."""
    count = rows.shape[0]
    ordered = rows.sort(dim=0).values
    middle = count // 2
    if count % 2:
        return ordered[middle].clone()
    return (ordered[middle - 1] + ordered[middle]) / 2


def trimmed_count(count: int, trim_fraction: float) -> int:
    """Rows dropped at EACH end: floor(trim_fraction x count), as scipy.stats.trim_mean."""
    return int(trim_fraction * count + 1e-9)


def trimmed_mean(rows: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """The mean of every column without its `trimmed_count` largest and smallest values."""
    cut = trimmed_count(rows.shape[0], trim_fraction)
    if 2 * cut >= rows.shape[0]:
        raise ValueError(f"trim_fraction={trim_fraction} drops all {rows.shape[0]} rows")
    kept = rows.sort(dim=0).values[cut : rows.shape[0] - cut]
    return kept.sum(dim=0) / kept.shape[0]


def add_squared_distances_(distances: torch.Tensor, rows: torch.Tensor) -> None:
    """distances[i, j] += ||rows[i] - rows[j]||^2, accumulated in float64 (called once per bucket).
    Direct differences, not the Gram-matrix shortcut, whose cancellation loses the small distances
    between honest updates."""
    for i in range(rows.shape[0]):
        distances[i] += (rows - rows[i]).double().pow_(2).sum(dim=1).to(distances.device)


def krum_scores(distances: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Each row's sum of squared distances to its P - f - 2 nearest other rows."""
    count = distances.shape[0]
    neighbours = count - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"Krum with krum_byzantine={byzantine} needs at least {2 * byzantine + 3} sites, got {count}")
    scores = []
    for i in range(count):
        others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
        scores.append(others.sort().values[:neighbours].sum())
    return torch.stack(scores)


def krum_selection(distances: torch.Tensor, byzantine: int, select: int) -> list[int]:
    """The rows Multi-Krum averages: the `select` lowest scores (ties: the lower row), in row order."""
    scores = krum_scores(distances, byzantine)
    if not 1 <= select <= distances.shape[0]:
        raise ValueError(f"krum_select={select} must be between 1 and the {distances.shape[0]} sites")
    order = sorted(range(len(scores)), key=lambda row: (float(scores[row]), row))
    return sorted(order[:select])


def aggregate(rows: torch.Tensor, rule: str, trim_fraction: float = 0.0) -> torch.Tensor:
    """The coordinate-wise rules on one bucket of rows (Krum needs all buckets first: krum_selection)."""
    if rule == "median":
        return coordinate_median(rows)
    if rule == "trimmed_mean":
        return trimmed_mean(rows, trim_fraction)
    if rule == "mean":
        return rows.sum(dim=0) / rows.shape[0]
    raise ValueError(f"aggregate() computes median, trimmed_mean or mean, not {rule!r}")
