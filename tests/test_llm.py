"""Causal-LM fine-tuning and LoRA (issue 13), in-process: masking, exact token-weighted sums, what a
LoRA run trains, exchanges and checkpoints, FFA-LoRA, the final model's folder, the checks that
refuse bad values before any worker starts. The command-line contracts (resume, packing) are in
tests/test_llm_runs.py."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scaling_fl import models
from scaling_fl.config import ConfigError, resolve
from scaling_fl.data.dataset import TextDataset
from scaling_fl.flat_state import flatten_model_, trained_names
from scaling_fl.train import final, local
from scaling_fl.train.objectives import IGNORE, CausalLM, lm_rows, token_sums

TEXTS = [
    "the film was a quiet delight from start to finish",
    "a dull and predictable story",
    "great acting , weak script",
    "i would watch it again tomorrow",
    "not worth the ticket",
    "an instant classic of the genre",
]


def _cfg(**overrides):
    base = dict(objective="causal_lm", model="tiny-gpt2", task_name="synthetic", max_seq_len=24, seed=3)
    return resolve({**base, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer("tiny-gpt2")


def _rows(texts, responses=None):
    return TextDataset(
        texts=list(texts),
        labels=np.zeros(len(texts)),
        label_names=("text",),
        source="test",
        **({"responses": list(responses)} if responses is not None else {}),
    )


# --- the causal-LM objective ---------------------------------------------------------------------


def test_prompt_tokens_are_not_learned_and_the_response_and_end_token_are(tokenizer):
    rows = lm_rows(tokenizer, ["what is it"], 64, responses=["a film"], template="Q: {prompt} A:")
    ids, labels = rows.input_ids[0], rows.labels[0]
    prompt = tokenizer("Q: what is it A:")["input_ids"][:-1]  # MiniLM's tokenizer closes a text with [SEP]
    answer = tokenizer("a film", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer + [tokenizer.sep_token_id]
    assert labels == [IGNORE] * len(prompt) + answer + [tokenizer.sep_token_id]
    assert rows.targets[0] == len(answer) + 1


def test_the_loss_ignores_what_the_prompt_tokens_predict():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 4, 5, 6]])
    loss, tokens, _ = token_sums(logits, labels)
    changed = logits.clone()
    changed[:, :2] += 100 * torch.randn(1, 2, 11)  # positions 0, 1 predict prompt tokens 1, 2
    assert tokens == 3
    assert torch.equal(token_sums(changed, labels)[0], loss)
    expected = F.cross_entropy(logits[0, 2:5], labels[0, 3:], reduction="sum")
    assert torch.allclose(loss, expected)


def test_plain_text_rows_end_with_the_end_token_unless_truncated(tokenizer):
    rows = lm_rows(tokenizer, ["short text", " ".join(["word"] * 50)], max_seq_len=16)
    assert rows.input_ids[0][-1] == tokenizer.sep_token_id and rows.labels[0] == rows.input_ids[0]
    assert len(rows.input_ids[1]) == 16 and tokenizer.sep_token_id not in rows.input_ids[1]
    assert rows.input_ids[1][0] == tokenizer.cls_token_id


def test_evaluation_sums_over_shards_add_up_to_the_whole_set_exactly(tokenizer):
    # A site's share of the validation loss is a sum over its tokens: the mean over shards of
    # different lengths is token-weighted, not a mean of the shards' means.
    cfg = _cfg()
    objective = CausalLM(tokenizer, cfg.max_seq_len)
    model = models.build_model(cfg, 0, tokenizer)
    texts = TEXTS + ["one", "two words"]
    whole = objective.evaluation_sums(
        model, objective.dataset(_rows(texts)), batch_size=3, precision="fp32", device=torch.device("cpu")
    )
    shards = [
        objective.evaluation_sums(
            model, objective.dataset(_rows(texts[k::3])), batch_size=2, precision="fp32", device=torch.device("cpu")
        )
        for k in range(3)
    ]
    summed = sum(shards)
    assert summed[1] == whole[1] and summed[2] == whole[2]
    assert math.isclose(float(summed[0]), float(whole[0]), rel_tol=1e-6)
    scores = objective.scores("validation", summed)
    assert math.isclose(scores["validation.perplexity"], math.exp(scores["validation.loss"]), rel_tol=1e-9)
    means = [float(s[0] / s[1]) for s in shards]
    assert not math.isclose(float(np.mean(means)), scores["validation.loss"], rel_tol=1e-6)


def _train(model, tokenizer, cfg, site=0, round_index=0, texts=TEXTS):
    objective = CausalLM(tokenizer, cfg.max_seq_len)
    dataset = objective.dataset(_rows(texts))
    return local.train_site_round(
        model, dataset, objective.collate, cfg, site, round_index, torch.device("cpu"), objective=objective
    )


def _without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_a_step_over_micro_batches_equals_one_big_batch_by_tokens(tokenizer):
    # grad_accum divides by the step's target tokens, so rows of different lengths weigh by their tokens.
    cfg = _cfg(batch_size=6, optimizer="sgd", learning_rate=0.5, max_grad_norm=None, local_steps=1)
    one = _without_dropout(models.build_model(cfg, 0, tokenizer))
    flat_one = flatten_model_(one)
    _train(one, tokenizer, cfg)
    accumulated = _without_dropout(models.build_model(cfg, 0, tokenizer))
    flat_acc = flatten_model_(accumulated)
    _train(accumulated, tokenizer, dataclasses.replace(cfg, batch_size=2, grad_accum_steps=3))
    assert torch.allclose(flat_one, flat_acc, atol=1e-6)


# --- LoRA ----------------------------------------------------------------------------------------


def test_lora_trains_and_exchanges_only_the_adapters_and_leaves_the_base_bitwise(tokenizer):
    cfg = _cfg(peft="lora", lora_r=4, learning_rate=1e-2)
    model = models.build_model(cfg, 0, tokenizer)
    flat = flatten_model_(model)
    names = trained_names(model)
    assert names and all(".lora_A." in name or ".lora_B." in name for name, _ in names)
    assert sum(numel for _, numel in names) == flat.numel()
    # GPT-2's c_attn (64 -> 192) in 2 layers: A is r x 64, B is 192 x r
    assert flat.numel() == 2 * (4 * 64 + 192 * 4)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    full = models.build_model(_cfg(), 0, tokenizer)
    assert flat.numel() * 4 < 0.02 * 4 * flatten_model_(full).numel()  # bytes on the wire per site
    before = flat.clone()
    _train(model, tokenizer, cfg)
    assert not torch.equal(flat, before)  # the adapters learned
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name


def test_a_half_precision_base_keeps_fp32_adapters(tokenizer):
    model = models.build_model(_cfg(peft="lora", base_precision="bf16"), 0, tokenizer)
    dtypes = {p.requires_grad: set() for p in model.parameters()}
    for p in model.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}
    assert flatten_model_(model).dtype == torch.float32


def test_ffa_lora_freezes_a_at_the_same_seeded_init_on_every_site(tokenizer):
    cfg = _cfg(peft="lora", lora_variant="ffa", learning_rate=1e-2)
    sites = [models.build_model(cfg, 0, tokenizer) for _ in range(2)]
    flats = [flatten_model_(model) for model in sites]
    assert all(".lora_B." in name for name, _ in trained_names(sites[0]))
    a_before = {n: p.detach().clone() for n, p in sites[0].named_parameters() if ".lora_A." in n}
    for site, model in enumerate(sites):
        _train(model, tokenizer, cfg, site=site)
    for model in sites:
        a_now = {n: p for n, p in model.named_parameters() if ".lora_A." in n}
        assert all(torch.equal(a_now[n], a_before[n]) for n in a_before)
    assert not torch.equal(flats[0], flats[1])  # B differs between the sites ...
    # ... and, A being shared, the mean of the sites' BA is exactly (mean B) A: FedAvg of B is exact.
    layer = "base_model.model.transformer.h.0.attn.c_attn"
    a = a_before[f"{layer}.lora_A.default.weight"]
    bs = [dict(m.named_parameters())[f"{layer}.lora_B.default.weight"].detach() for m in sites]
    assert torch.allclose((bs[0] @ a + bs[1] @ a) / 2, ((bs[0] + bs[1]) / 2) @ a, atol=1e-7)


def test_plain_lora_averaging_is_not_the_average_of_the_products():
    # Why FFA-LoRA exists: mean(B) mean(A) != mean(BA) when both factors train.
    torch.manual_seed(1)
    a1, a2, b1, b2 = torch.randn(2, 5), torch.randn(2, 5), torch.randn(4, 2), torch.randn(4, 2)
    assert not torch.allclose((b1 @ a1 + b2 @ a2) / 2, ((b1 + b2) / 2) @ ((a1 + a2) / 2))


def test_lora_on_a_classifier_trains_the_new_head_too(tokenizer):
    cfg = resolve(dict(model="tiny-bert", peft="lora", task_name="synthetic"))
    names = [name for name, _ in trained_names(models.build_model(cfg, 3, tokenizer))]
    assert any("classifier" in name for name in names)
    assert all(".lora_" in name or "classifier" in name for name in names)


# --- the final model and the samples -------------------------------------------------------------


def test_the_final_lora_folder_loads_with_peft_and_scores_as_the_run(tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(peft="lora", learning_rate=1e-2, save_final_model=True, merge_lora=True)
    model = models.build_model(cfg, 0, tokenizer)
    flatten_model_(model)
    _train(model, tokenizer, cfg)
    objective = CausalLM(tokenizer, cfg.max_seq_len)
    dataset = objective.dataset(_rows(TEXTS))

    def score(net):
        return objective.evaluation_sums(net, dataset, batch_size=4, precision="fp32", device=torch.device("cpu"))

    expected = score(model)
    folder = final.save_final_model(cfg, model, tokenizer, 0, str(tmp_path / "final"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{folder}/base"), folder)
    assert torch.allclose(score(loaded), expected, rtol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(f"{folder}/merged")
    assert torch.allclose(score(merged), expected, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "final").iterdir() if p.suffix == ".safetensors") == [
        "adapter_model.safetensors"
    ]


def test_the_final_full_model_loads_with_from_pretrained(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _cfg(save_final_model=True)
    model = models.build_model(cfg, 0, tokenizer)
    flatten_model_(model)
    folder = final.save_final_model(cfg, model, tokenizer, 0, str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tokenizer("a film")["input_ids"]])
    assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(folder)("a film")["input_ids"] == ids[0].tolist()


def test_samples_are_greedy_and_repeatable(tokenizer):
    model = models.build_model(_cfg(), 0, tokenizer)
    first = final.generate_samples(model, tokenizer, ["the film"], 5, torch.device("cpu"))
    again = final.generate_samples(model, tokenizer, ["the film"], 5, torch.device("cpu"))
    assert first == again and first[0]["prompt"] == "the film" and first[0]["completion"].strip()


# --- bad values, refused before any worker starts ------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(peft="lora", lora_r=0), "lora_r=0 is not allowed: an integer >= 1"),
        (dict(prompt_column="question"), "response_column=None is not allowed"),
        (dict(peft="lora", base_precision="fp16"), "base_precision='fp16' is not allowed: bf16 or fp32 on CPU"),
        (dict(base_precision="bf16"), "fp32 with peft=none"),
        (dict(objective="sequence_classification", sample_prompts=["hi"]), "None unless objective=causal_lm"),
        (dict(peft="lora", merge_lora=True), "merge_lora=True is not allowed"),
    ],
)
def test_bad_llm_values_are_one_line_errors(overrides, message):
    if "fp16" in str(overrides) and torch.cuda.is_available():
        pytest.skip("fp16 is allowed where CUDA is")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _cfg(**overrides)


def test_unknown_lora_target_modules_are_refused_with_the_models_names():
    with pytest.raises(models.ModelError, match=r"Target modules \{'q_proj'\} not found.*\['c_attn'\] for GPT-2"):
        models.check_model("tiny-gpt2", _cfg(peft="lora", lora_target_modules=["q_proj"]))
    models.check_model("tiny-gpt2", _cfg(peft="lora", lora_target_modules=["c_attn", "c_fc"]))


def test_a_bf16_base_trains_its_fp32_adapters_on_the_cpu(tokenizer):
    cfg = _cfg(peft="lora", base_precision="bf16", learning_rate=1e-2)
    model = models.build_model(cfg, 0, tokenizer)
    flat = flatten_model_(model)
    before = flat.clone()
    sums = _train(model, tokenizer, cfg)
    assert math.isfinite(sums.loss_sum) and sums.count > 0
    assert not torch.equal(flat, before) and torch.isfinite(flat).all()


def test_gradient_checkpointing_changes_memory_not_the_result(tokenizer):
    plain = _cfg(peft="lora", learning_rate=1e-2)
    results = []
    for cfg in (plain, dataclasses.replace(plain, gradient_checkpointing=True)):
        model = models.build_model(cfg, 0, tokenizer)
        base = model.get_base_model()
        assert getattr(base, "is_activation_checkpointing", None) is cfg.gradient_checkpointing
        flat = flatten_model_(model)
        _train(model, tokenizer, cfg)
        results.append(flat)
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_new_defining_keys_are_left_out_at_their_defaults():
    # Checkpoints written before the LLM keys existed keep their config hash.
    from scaling_fl.checkpoint import DEFINING_KEYS_IF_SET, defining_config
    from scaling_fl.config import DEFAULTS

    assert {key: DEFAULTS[key] for key in DEFINING_KEYS_IF_SET} == DEFINING_KEYS_IF_SET
    assert "peft" not in defining_config(resolve({}).as_dict(), 4)
    assert defining_config(_cfg(peft="lora", lora_r=4).as_dict(), 4)["lora_r"] == 4


def test_per_tensor_sparsity_sees_each_adapter_as_a_tensor(tokenizer):
    # sparsity_scope=tensor and sparse_average=fl4health choose top-k per tensor: on a LoRA model the
    # tensors are the adapters, tiling the flat vector in order.
    from scaling_fl.exchange import segments_from_model

    model = models.build_model(_cfg(peft="lora", lora_r=2), 0, tokenizer)
    flat = flatten_model_(model)
    sizes = [numel for _, numel in trained_names(model)]
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    assert segments_from_model(model, flat) == list(zip(offsets, sizes, strict=True))


def test_a_prompt_response_run_tokenizes_the_rows_responses(tokenizer):
    from scaling_fl.train.objectives import objective_from_config

    cfg = _cfg(task_name="csv", prompt_column="q", response_column="a", prompt_template="Q: {prompt} A:")
    objective = objective_from_config(cfg, tokenizer, 1)
    rows = TextDataset(["is it good"], np.zeros(1), ("text",), "test", responses=["very"])
    dataset = objective.dataset(rows)
    answer = tokenizer("very", add_special_tokens=False)["input_ids"]
    assert dataset.labels[0][-len(answer) - 1 :] == [*answer, tokenizer.sep_token_id]
    assert dataset.targets[0] == len(answer) + 1


@pytest.mark.slow  # converts a 135M-parameter GGUF once (~25 s), cached for later runs
def test_smollm2_is_a_pretrained_causal_lm_that_works_offline_with_lora(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_FL_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(model="smollm2", peft="lora", base_precision="bf16", learning_rate=1e-3)
    models.check_model("smollm2", cfg)  # the launcher makes the folder once ...
    folder = models.smollm2_path()  # ... and the workers find it
    assert (folder / "model.safetensors").exists() and folder.parent == tmp_path / "cache"
    smol = models.load_tokenizer("smollm2")
    model = models.build_model(cfg, 0, smol)
    objective = CausalLM(smol, 32)
    rows = objective.dataset(_rows(["The movie was long but the acting was superb.", "I loved every minute."]))
    sums = objective.evaluation_sums(model, rows, batch_size=2, precision="fp32", device=torch.device("cpu"))
    # A pretrained model: far below a uniform guess over its 49,152 tokens (perplexity 49,152).
    assert objective.scores("validation", sums)["validation.perplexity"] < 1000
    flat = flatten_model_(model)
    assert flat.numel() < 0.01 * sum(p.numel() for p in model.parameters())
