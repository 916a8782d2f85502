"""Tokenization without padding; batches are padded to their own longest row (dynamic padding)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class TokenizedDataset(Dataset):
    """Token ids per row plus the label, as the transformers padding collator expects them."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: np.ndarray):
        self.encodings = encodings
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, list[int] | int]:
        row = {key: values[index] for key, values in self.encodings.items()}
        row["labels"] = int(self.labels[index])
        return row

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.encodings["input_ids"]), dtype=np.int64, count=len(self))


def tokenize(texts: list[str], labels: np.ndarray, tokenizer, max_seq_len: int) -> TokenizedDataset:
    if not texts:  # a process that holds no rows of a set (a cross-silo site has no test rows)
        return TokenizedDataset({"input_ids": [], "attention_mask": []}, np.empty(0, dtype=np.int64))
    encodings = tokenizer(texts, truncation=True, max_length=max_seq_len, padding=False)
    keep = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encodings]
    return TokenizedDataset({key: encodings[key] for key in keep}, np.asarray(labels, dtype=np.int64))


def padding_collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8, return_tensors="pt")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
