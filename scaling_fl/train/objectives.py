"""What a model learns: the loss of a batch, what a loss is averaged over, and the evaluation's sums.

Two objectives share the round loop: sequence classification (a loss per row, accuracy and
macro F1 from a confusion matrix) and causal-LM fine-tuning (a loss per target token,
perplexity). Both return sums, never means, so a step over micro-batches, a mean over sites
and an evaluation sharded over processes are all exact: a causal-LM loss is divided by the
target tokens of the whole step or evaluation set, not averaged over batch means.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from scaling_fl.data.tokenize import TokenizedDataset, padding_collator, to_device, tokenize
from scaling_fl.train.evaluate import classification_metrics
from scaling_fl.train.local import autocast_for

IGNORE = -100  # the label of a token that is not predicted (padding, the prompt): torch's ignore_index


class Classification:
    """A label per row: cross-entropy summed over rows; scores are loss, accuracy and macro F1."""

    unit = "rows"  # what train.loss is averaged over (train.rows_per_s)

    def __init__(self, collate, num_labels: int, tokenizer=None, max_seq_len: int = 128):
        self.collate, self.num_labels = collate, num_labels
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len

    def dataset(self, rows) -> TokenizedDataset:
        """A TextDataset's rows, tokenized."""
        return tokenize(rows.texts, rows.labels, self.tokenizer, self.max_seq_len)

    def units(self, dataset, rows) -> int:
        """What a step's loss is averaged over: its rows."""
        return len(rows)

    def site_size(self, dataset) -> int:
        """A site's weight in the mean (sample-weighted FedAvg): its rows."""
        return len(dataset)

    def batch_sums(self, model, batch, precision: str, device) -> tuple[torch.Tensor, int, int]:
        """(loss summed over the batch, with its graph; rows; correct predictions)."""
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        with autocast_for(precision, device):
            logits = model(**batch).logits
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        return loss_sum, len(labels), int((logits.argmax(dim=-1) == labels).sum())

    @torch.inference_mode()
    def evaluation_sums(self, model, dataset, *, batch_size: int, precision: str, device) -> torch.Tensor:
        """[loss_sum, confusion (rows = truth, cols = prediction) ...] as one float64 vector."""
        from scaling_fl.train.evaluate import evaluation_sums

        loss_sum, confusion = evaluation_sums(
            model,
            dataset,
            self.collate,
            batch_size=batch_size,
            num_labels=self.num_labels,
            precision=precision,
            device=device,
        )
        return torch.cat([loss_sum, confusion.view(-1).double()])

    def scores(self, prefix: str, sums: torch.Tensor) -> dict[str, float]:
        n = self.num_labels
        scores = classification_metrics(sums[0].item(), sums[1 : 1 + n * n].view(n, -1).numpy())
        return {f"{prefix}.{name}": scores[name] for name in ("loss", "accuracy", "f1_macro")}

    def local_summary(self, sums: torch.Tensor) -> dict:
        """loss_sum, correct, count of one site's own evaluation (per_site_metrics)."""
        confusion = sums[1:].view(self.num_labels, -1).numpy()
        return {"loss_sum": float(sums[0]), "correct": int(np.trace(confusion)), "count": int(confusion.sum())}


class LMDataset(torch.utils.data.Dataset):
    """Token ids per row and their labels (IGNORE where a token is not learned: a prompt's tokens)."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]]):
        self.input_ids, self.labels = input_ids, labels
        # Targets of a row: its labelled tokens after the first (the first token is never predicted).
        self.targets = np.fromiter(
            (sum(1 for label in row[1:] if label != IGNORE) for row in labels), dtype=np.int64, count=len(labels)
        )

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self))


def end_token_id(tokenizer) -> int | None:
    """The token that ends a text: eos, or [SEP] for BERT-style vocabularies (tiny-gpt2 uses MiniLM's)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def lm_rows(
    tokenizer,
    texts: list[str],
    max_seq_len: int,
    responses: list[str] | None = None,
    template: str = "{prompt}\n",
) -> LMDataset:
    """Plain-text SFT (`responses` None): every token of a text is learned. Prompt/response SFT: the
    prompt (written with `template`) and its response are tokenized apart and joined, and only the
    response's tokens (and the end token) are learned, as TRL's completion-only collator does. A row
    ends with the end token unless truncated to max_seq_len."""
    end = end_token_id(tokenizer)
    input_ids, labels = [], []
    if not texts:  # a process that holds no rows of a set (a cross-silo site has no test rows)
        return LMDataset(input_ids, labels)
    if responses is None:
        # Whole texts first: a tokenizer that closes every text ([SEP]) also closes a truncated one, and
        # a row cut at max_seq_len must not end as if the text ended there.
        for ids in tokenizer(list(texts), verbose=False)["input_ids"]:
            if end is not None and (not ids or ids[-1] != end):
                ids = ids + [end]
            ids = ids[:max_seq_len]
            input_ids.append(ids)
            labels.append(list(ids))
        return LMDataset(input_ids, labels)
    prompts = tokenizer([template.format(prompt=text) for text in texts])["input_ids"]
    answers = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    for prompt, answer in zip(prompts, answers, strict=True):
        if end is not None and prompt and prompt[-1] == end:  # BERT-style tokenizers close every text
            prompt = prompt[:-1]
        answer = answer + ([end] if end is not None else [])
        ids = (prompt + answer)[:max_seq_len]
        input_ids.append(ids)
        labels.append(([IGNORE] * len(prompt) + answer)[:max_seq_len])
    return LMDataset(input_ids, labels)


class CausalLM:
    """Next-token prediction: cross-entropy summed over target tokens; scores are the token-weighted loss,
    its perplexity and next-token accuracy. A site weighs in the mean by its training tokens."""

    unit = "tokens"
    num_labels = 0

    def __init__(self, tokenizer, max_seq_len: int, responses_of=None, template: str = "{prompt}\n"):
        self.tokenizer, self.max_seq_len, self.template = tokenizer, max_seq_len, template
        self.responses_of = responses_of  # rows -> their responses (prompt/response SFT), or None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token_id(tokenizer)

    def dataset(self, rows) -> LMDataset:
        responses = self.responses_of(rows) if self.responses_of is not None else None
        return lm_rows(self.tokenizer, rows.texts, self.max_seq_len, responses, self.template)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded to the longest row (a multiple of 8); labels padded with IGNORE."""
        width = -(-max(len(row["input_ids"]) for row in rows) // 8) * 8
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def units(self, dataset: LMDataset, rows) -> int:
        return int(dataset.targets[np.asarray(rows, dtype=np.int64)].sum())

    def site_size(self, dataset: LMDataset) -> int:
        return int(dataset.targets.sum())

    def batch_sums(self, model, batch, precision: str, device) -> tuple[torch.Tensor, int, int]:
        """(loss summed over the batch's target tokens, with its graph; target tokens; correct next tokens)."""
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        with autocast_for(precision, device):
            logits = model(**batch).logits
        return token_sums(logits, labels)

    @torch.inference_mode()
    def evaluation_sums(self, model, dataset: LMDataset, *, batch_size: int, precision: str, device) -> torch.Tensor:
        """[loss_sum, target tokens, correct next tokens] over the dataset, float64."""
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        order = np.argsort(dataset.lengths(), kind="stable")
        for start in range(0, len(order), batch_size):
            batch = self.collate([dataset[int(i)] for i in order[start : start + batch_size]])
            loss_sum, tokens, correct = self.batch_sums(model, batch, precision, device)
            sums += torch.tensor([loss_sum.item(), tokens, correct], dtype=torch.float64)
        return sums

    def scores(self, prefix: str, sums: torch.Tensor) -> dict[str, float]:
        loss = float(sums[0] / max(sums[1].item(), 1))
        return {
            f"{prefix}.loss": loss,
            f"{prefix}.perplexity": math.exp(min(loss, 700.0)),
            f"{prefix}.accuracy": float(sums[2] / max(sums[1].item(), 1)),
        }

    def local_summary(self, sums: torch.Tensor) -> dict:
        return {"loss_sum": float(sums[0]), "correct": int(sums[2]), "count": int(sums[1])}


def token_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Token t predicts token t + 1: (loss summed over the labelled targets, their number, correct ones)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    learned = targets != IGNORE
    correct = int(((logits.argmax(dim=-1) == targets) & learned).sum())
    return loss_sum, int(learned.sum()), correct


def _responses(rows) -> list[str]:
    return rows.responses


def objective_from_config(cfg, tokenizer, num_labels: int):
    """The run's objective; prompt/response SFT (response_column set) reads the rows' responses."""
    if cfg.objective == "causal_lm":
        responses_of = _responses if cfg.response_column is not None else None
        return CausalLM(tokenizer, cfg.max_seq_len, responses_of, cfg.prompt_template)
    return Classification(padding_collator(tokenizer), num_labels, tokenizer, cfg.max_seq_len)
