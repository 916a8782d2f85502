"""Per-round metrics from what the sites gathered: pure arithmetic, no collectives."""

from __future__ import annotations

import resource
import time

import torch

from scaling_fl.train.local import TrainSums

# Columns of the per-site vector every site contributes each round.
SITE_COLUMNS = (
    "train_loss_sum",
    "train_correct",
    "train_count",
    "peak_rss_mb",
    "peak_cuda_mb",
    "local_val_loss_sum",
    "local_val_correct",
    "local_val_count",
)


def peak_memory_mb(device: torch.device) -> tuple[float, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return rss, cuda


def site_vector(train: TrainSums, device: torch.device, local_eval: dict | None) -> torch.Tensor:
    rss, cuda = peak_memory_mb(device)
    local_eval = local_eval or {"loss_sum": 0.0, "correct": 0, "count": 0}
    return torch.tensor(
        [
            train.loss_sum,
            train.correct,
            train.count,
            rss,
            cuda,
            local_eval["loss_sum"],
            local_eval["correct"],
            local_eval["count"],
        ],
        dtype=torch.float64,
    )


def round_metrics(
    validation_sums: torch.Tensor,
    objective,
    per_site: torch.Tensor,
    *,
    with_per_site: bool,
    cuda: bool,
    site_ids: list[int | str] | None = None,
    test_sums: torch.Tensor | None = None,
) -> dict[str, float]:
    """validation_sums (and test_sums, in the rounds the test set is scored): the objective's evaluation
    sums (classification: [loss_sum, confusion...]) summed over sites; `objective` scores them (an int:
    the number of labels of a classification); per_site = [sites, SITE_COLUMNS], row k for site
    site_ids[k] (default: row k is site k). train.loss is per row, or per target token for a causal LM."""
    if isinstance(objective, int):
        from scaling_fl.train.objectives import Classification

        objective = Classification(None, objective)
    col = {name: per_site[:, index].numpy() for index, name in enumerate(SITE_COLUMNS)}
    metrics = objective.scores("validation", validation_sums)
    if test_sums is not None:
        metrics.update(objective.scores("test", test_sums))
    metrics.update(
        {
            "train.loss": float(col["train_loss_sum"].sum() / col["train_count"].sum()),
            "train.accuracy": float(col["train_correct"].sum() / col["train_count"].sum()),
            "memory.peak_rss_mb": float(col["peak_rss_mb"].max()),
        }
    )
    if cuda:
        metrics["memory.peak_cuda_mb"] = float(col["peak_cuda_mb"].max())
    if with_per_site:
        for row in range(per_site.shape[0]):
            site = site_ids[row] if site_ids is not None else row
            count = max(col["train_count"][row], 1)
            metrics[f"site.{site}.train.loss"] = float(col["train_loss_sum"][row] / count)
            metrics[f"site.{site}.train.accuracy"] = float(col["train_correct"][row] / count)
            metrics[f"site.{site}.memory.peak_rss_mb"] = float(col["peak_rss_mb"][row])
            if cuda:
                metrics[f"site.{site}.memory.peak_cuda_mb"] = float(col["peak_cuda_mb"][row])
            if col["local_val_count"][row] > 0:
                metrics[f"site.{site}.validation.accuracy"] = float(
                    col["local_val_correct"][row] / col["local_val_count"][row]
                )
                metrics[f"site.{site}.validation.loss"] = float(
                    col["local_val_loss_sum"][row] / col["local_val_count"][row]
                )
    return metrics


class SiteTable:
    """The SITE_COLUMNS of every site of a round, filled by the processes that host them and summed
    over processes: a [num_sites, columns] table (a few kB even for 1,000 sites)."""

    def __init__(self, num_sites: int, device: torch.device):
        self.device = device
        self.rows = torch.zeros(num_sites, len(SITE_COLUMNS), dtype=torch.float64)

    def add(self, site: int, train: TrainSums, local_eval: dict | None) -> None:
        self.rows[site] = site_vector(train, self.device, local_eval)

    def gathered(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Every process's rows, summed, and the peak memory of the busiest process (collectives: every
        process calls it). A site's memory columns are those of the process that trained it."""
        from scaling_fl.exchange import max_across_sites, sum_across_sites

        table = sum_across_sites(self.rows.to(self.device)).cpu()
        rss, cuda = peak_memory_mb(self.device)
        peaks = max_across_sites(torch.tensor([rss, cuda], dtype=torch.float64, device=self.device)).cpu()
        figures = {"memory.peak_rss_mb": float(peaks[0])}
        if self.device.type == "cuda":
            figures["memory.peak_cuda_mb"] = float(peaks[1])
        return table, figures


class RoundClock:
    """The round's time split: mark("train"), mark("aggregate"), mark("eval") as each part ends."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.parts: dict[str, float] = {}

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now

    def move(self, seconds: float, from_part: str, to_part: str) -> None:
        """Books `seconds` spent inside one part to another (a sync between local steps is not training)."""
        self.parts[from_part] -= seconds
        self.parts[to_part] = self.parts.get(to_part, 0.0) + seconds

    def figures(self) -> dict[str, float]:
        return {"time.round_s": self.last - self.start, **{f"time.{part}_s": s for part, s in self.parts.items()}}
