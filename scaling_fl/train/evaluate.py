"""Exact evaluation of the global model on the full test set, sharded over sites.

Each site scores rows rank, rank+W, rank+2W, ... so no row is dropped or counted
twice; sites return sums (loss, confusion matrix), never means of batch means.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scaling_fl.data.tokenize import TokenizedDataset, to_device
from scaling_fl.train.local import autocast_for


@torch.inference_mode()
def evaluation_sums(
    model: torch.nn.Module,
    dataset: TokenizedDataset,
    collate,
    *,
    batch_size: int,
    num_labels: int,
    precision: str,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss_sum [1] float64, confusion [num_labels, num_labels] int64, rows=truth, cols=prediction)."""
    model.eval()
    loss_sum = torch.zeros(1, dtype=torch.float64)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64)
    order = np.argsort(dataset.lengths(), kind="stable")  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        batch = to_device(collate([dataset[int(i)] for i in order[start : start + batch_size]]), device)
        labels = batch.pop("labels")
        with autocast_for(precision, device):
            logits = model(**batch).logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double().cpu()
        pairs = labels.cpu() * num_labels + logits.argmax(dim=-1).cpu()
        confusion += torch.bincount(pairs, minlength=num_labels * num_labels).view(num_labels, num_labels)
    return loss_sum, confusion


def classification_metrics(loss_sum: float, confusion: np.ndarray) -> dict[str, float]:
    """Loss, accuracy and macro F1 over the classes present in truth or predictions (as scikit-learn)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum()
    true_pos = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * true_pos[present] / (support[present] + predicted[present])
    return {
        "loss": float(loss_sum / total),
        "accuracy": float(true_pos.sum() / total),
        "f1_macro": float(f1.mean()) if f1.size else 0.0,
    }
