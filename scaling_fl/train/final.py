"""What a run leaves after its last round: the final model as a loadable folder, and sample generations.

The folder is what Hugging Face users load as is: `AutoModelFor...from_pretrained(dir)` for a full
fine-tune, `PeftModel.from_pretrained(base, dir)` for LoRA (the adapters only; a random-init base
such as tiny-gpt2 is written to `dir/base`, since nothing else could rebuild it), the tokenizer
beside it, and with merge_lora=True the merged model in `dir/merged`. safetensors only: no pickle.
"""

from __future__ import annotations

import json
import os

import torch

from scaling_fl import models
from scaling_fl.flat_state import unflatten_model_
from scaling_fl.train.objectives import end_token_id


def save_final_model(cfg, model: torch.nn.Module, tokenizer, num_labels: int, directory: str) -> str:
    """Writes the folder (see the module's docstring); the model's trained tensors get their own storage
    (save_pretrained would take views of one flat vector for tied weights), so call it last."""
    os.makedirs(directory, exist_ok=True)
    unflatten_model_(model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if cfg.peft == "lora" and cfg.model in models.RANDOM_INIT:
        base = models.build_model(_without_lora(cfg), num_labels, tokenizer)  # seeded: the run's very base
        base.save_pretrained(os.path.join(directory, "base"))
        tokenizer.save_pretrained(os.path.join(directory, "base"))
    if cfg.peft == "lora" and cfg.merge_lora:
        merged = model.merge_and_unload()
        merged.save_pretrained(os.path.join(directory, "merged"))
        tokenizer.save_pretrained(os.path.join(directory, "merged"))
    return directory


def _without_lora(cfg):
    import dataclasses

    return dataclasses.replace(cfg, peft="none", lora_variant="lora", merge_lora=False, gradient_checkpointing=False)


@torch.inference_mode()
def generate_samples(model, tokenizer, prompts, max_new_tokens: int, device: torch.device) -> list[dict]:
    """Greedy continuations of `prompts` (a text's end token stripped from the prompt, so the model
    continues it rather than starting a new text)."""
    model.eval()
    end = end_token_id(tokenizer)
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        if end is not None and ids and ids[-1] == end:
            ids = ids[:-1]
        input_ids = torch.tensor([ids], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end,
            eos_token_id=end,
        )
        samples.append(
            {"prompt": prompt, "completion": tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)}
        )
    return samples


def write_samples(samples: list[dict], path: str) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(samples, handle, indent=2, ensure_ascii=False)
    return path
