"""Per-round metrics from what the sites gathered: pure arithmetic, no collectives."""

from __future__ import annotations

import resource

import numpy as np
import torch

from scaling_fl.train.evaluate import classification_metrics
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
    validation_sums: torch.Tensor, num_labels: int, per_site: torch.Tensor, *, with_per_site: bool, cuda: bool
) -> dict[str, float]:
    """validation_sums = [loss_sum, confusion...] summed over sites; per_site = [sites, SITE_COLUMNS]."""
    validation = classification_metrics(
        validation_sums[0].item(), validation_sums[1 : 1 + num_labels**2].view(num_labels, -1).numpy()
    )
    col = {name: per_site[:, index].numpy() for index, name in enumerate(SITE_COLUMNS)}
    metrics = {
        "validation.loss": validation["loss"],
        "validation.accuracy": validation["accuracy"],
        "validation.f1_macro": validation["f1_macro"],
        "train.loss": float(col["train_loss_sum"].sum() / col["train_count"].sum()),
        "train.accuracy": float(col["train_correct"].sum() / col["train_count"].sum()),
        "memory.peak_rss_mb": float(col["peak_rss_mb"].max()),
    }
    if cuda:
        metrics["memory.peak_cuda_mb"] = float(col["peak_cuda_mb"].max())
    if with_per_site:
        for site in range(per_site.shape[0]):
            count = max(col["train_count"][site], 1)
            metrics[f"site.{site}.train.loss"] = float(col["train_loss_sum"][site] / count)
            metrics[f"site.{site}.train.accuracy"] = float(col["train_correct"][site] / count)
            metrics[f"site.{site}.memory.peak_rss_mb"] = float(col["peak_rss_mb"][site])
            if cuda:
                metrics[f"site.{site}.memory.peak_cuda_mb"] = float(col["peak_cuda_mb"][site])
            if col["local_val_count"][site] > 0:
                metrics[f"site.{site}.validation.accuracy"] = float(
                    col["local_val_correct"][site] / col["local_val_count"][site]
                )
                metrics[f"site.{site}.validation.loss"] = float(
                    col["local_val_loss_sum"][site] / col["local_val_count"][site]
                )
    return metrics


def local_eval_summary(loss_sum: torch.Tensor, confusion: torch.Tensor) -> dict:
    return {
        "loss_sum": float(loss_sum.item()),
        "correct": int(np.trace(confusion.numpy())),
        "count": int(confusion.sum().item()),
    }
