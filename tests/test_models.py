"""Models: the packaged pretrained MiniLM, a local model directory, and a decoder-only model's padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scaling_fl import models
from scaling_fl.data import TextDataset
from scaling_fl.data.prepared import PreparedData, load_worker_data, save_prepared
from scaling_fl.data.tokenize import padding_collator, tokenize


def test_minilm_is_the_pretrained_encoder_with_a_new_seeded_head():
    net = models.load_model("minilm", num_labels=4, seed=7)
    packaged = load_file(str(models.minilm_path() / "model.safetensors"))
    name = next(key for key in packaged if key.endswith("encoder.layer.0.attention.self.query.weight"))
    ours = dict(net.named_parameters())["bert." + name.removeprefix("bert.")]
    assert torch.equal(ours, packaged[name])  # pretrained weights, not a random init
    assert net.classifier.weight.shape == (4, 384)
    again = models.load_model("minilm", num_labels=4, seed=7)
    assert torch.equal(net.classifier.weight, again.classifier.weight)  # same seed, same head on every site
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(22.7e6, rel=0.01)


def test_a_local_model_directory_loads_and_is_checked(tmp_path):
    net = models.load_model("tiny-bert", num_labels=3, seed=0)
    net.save_pretrained(tmp_path / "model")
    models.load_tokenizer("tiny-bert").save_pretrained(tmp_path / "model")
    models.check_model(str(tmp_path / "model"))
    loaded = models.load_model(str(tmp_path / "model"), num_labels=3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(models.ModelError, match="local directory"):
        models.check_model(str(tmp_path / "missing"))


def test_a_decoder_only_model_without_pad_token_pads_with_eos(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<eos>", "<unk>", "good", "bad", "film", "very"])}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(vocab), n_positions=16, n_embd=16, n_layer=1, n_head=2, eos_token_id=0, bos_token_id=0
        )
    ).save_pretrained(tmp_path)

    tokenizer = models.load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "<eos>"
    net = models.load_model(str(tmp_path), num_labels=2, seed=0, pad_token_id=tokenizer.pad_token_id)
    assert net.config.pad_token_id == tokenizer.pad_token_id
    batch = padding_collator(tokenizer)(
        [tokenize(["very good film", "bad"], np.array([1, 0]), tokenizer, 8)[i] for i in range(2)]
    )
    batch.pop("labels")
    assert net(**batch).logits.shape == (2, 2)  # GPT-2 refuses batches > 1 without a pad token


def test_test_shards_score_every_row_exactly_once_with_uneven_sizes(tmp_path):
    def dataset(n):
        return TextDataset(
            texts=[f"row {i}" for i in range(n)], labels=np.arange(n) % 2, label_names=("a", "b"), source="memory"
        )

    prepared = PreparedData(
        train=dataset(9), test=dataset(7), parts=[np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7, 8])]
    )
    save_prepared(prepared, str(tmp_path))
    shards = [load_worker_data(str(tmp_path), (rank,), rank, 3).test_shard.texts for rank in range(3)]
    assert sorted(sum(shards, [])) == sorted(f"row {i}" for i in range(7))
    assert [len(s) for s in shards] == [3, 2, 2]
    assert load_worker_data(str(tmp_path), (1,), 1, 3).site_sizes == [3, 2, 4]
    packed = load_worker_data(str(tmp_path), (0, 2), 0, 2)  # one worker hosting two sites
    assert {site: rows.texts for site, rows in packed.train.items()} == {
        0: ["row 0", "row 1", "row 2"],
        2: ["row 5", "row 6", "row 7", "row 8"],
    }
