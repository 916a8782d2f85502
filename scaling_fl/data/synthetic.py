"""An offline four-topic text task for tests, demos and benchmarks.

Texts are ordinary lower-case English words (all whole words in BERT's uncased
vocabulary), so the real tokenizer and model see realistic input. The task is
learnable but not trivial: most words are shared filler, some are topic words
of other classes, and a fraction of texts is written about a different topic
than their label says, so a bag-of-words model tops out below 100 %
(a logistic regression on 2000 rows reaches about 82-86 % test accuracy).
"""

from __future__ import annotations

import numpy as np

from scaling_fl.data.dataset import TextDataset

SYNTHETIC_LABELS = ("sports", "science", "business", "politics")

TOPIC_WORDS = {
    "sports": (
        "game team player coach season match goal score win league ball field "
        "championship tournament race runner football soccer baseball basketball tennis "
        "golf hockey stadium fans injury victory defeat olympic medal sprint"
    ).split(),
    "science": (
        "research scientist study experiment data theory physics chemistry biology "
        "laboratory energy space planet star cell gene climate ocean species evidence "
        "discovery telescope molecule atom virus brain computer robot fossil"
    ).split(),
    "business": (
        "company market stock price profit sales investor bank trade economy revenue "
        "shares growth firm deal merger customer industry retail oil dollar loan "
        "earnings quarter budget tax debt startup brand export"
    ).split(),
    "politics": (
        "government election president minister vote party law senate congress policy "
        "campaign parliament court leader reform debate candidate citizens protest "
        "rights treaty military border mayor governor ministry democracy bill war"
    ).split(),
}

FILLER_WORDS = (
    "the a an of to in on for with at by from about after before over under "
    "new old big small first last next other same many more most some few "
    "said says told reported announced according week year day month today "
    "people group city country world time report news plan part number "
    "is was are were has had will would could may might can also just still "
    "very well only even again more less high low long short good bad "
    "this that these those it its they their he she his her we our"
).split()


def make_synthetic(
    num_rows: int,
    seed: int,
    *,
    min_words: int = 12,
    max_words: int = 24,
    topic_rate: float = 0.25,
    distractor_rate: float = 0.06,
    off_topic_rate: float = 0.10,
) -> TextDataset:
    """Balanced labels; each word is a topic word with probability topic_rate,
    a word of another topic with distractor_rate, filler otherwise. With
    probability off_topic_rate a text is about another topic than its label."""
    if num_rows < 1:
        raise ValueError(f"synthetic size must be >= 1, got {num_rows}")
    rng = np.random.default_rng(seed)
    num_labels = len(SYNTHETIC_LABELS)
    labels = rng.permutation(np.arange(num_rows) % num_labels)
    topics = _written_topics(labels, num_labels, off_topic_rate, rng)
    texts = [
        _make_text(int(topic), num_labels, rng, min_words, max_words, topic_rate, distractor_rate) for topic in topics
    ]
    return TextDataset(
        texts=texts,
        labels=labels.astype(np.int64),
        label_names=SYNTHETIC_LABELS,
        source=f"synthetic(rows={num_rows}, seed={seed})",
    )


def _written_topics(labels: np.ndarray, num_labels: int, rate: float, rng) -> np.ndarray:
    """Label noise on the text side, so the label counts stay exactly balanced."""
    shift = rng.integers(1, num_labels, size=len(labels))
    noisy = rng.random(len(labels)) < rate
    return np.where(noisy, (labels + shift) % num_labels, labels)


def _make_text(topic: int, num_labels: int, rng, min_words, max_words, topic_rate, distractor_rate) -> str:
    length = int(rng.integers(min_words, max_words + 1))
    kinds = rng.random(length)
    words = []
    for kind in kinds:
        if kind < topic_rate:
            words.append(_pick(TOPIC_WORDS[SYNTHETIC_LABELS[topic]], rng))
        elif kind < topic_rate + distractor_rate:
            other = (topic + int(rng.integers(1, num_labels))) % num_labels
            words.append(_pick(TOPIC_WORDS[SYNTHETIC_LABELS[other]], rng))
        else:
            words.append(_pick(FILLER_WORDS, rng))
    return " ".join(words)


def _pick(words: list[str], rng) -> str:
    return words[int(rng.integers(len(words)))]


def synthetic_task(train_size: int, test_size: int, data_seed: int) -> tuple[TextDataset, TextDataset]:
    """Train and test come from one distribution, with seeds derived from data_seed."""
    train_seed, test_seed = np.random.SeedSequence(data_seed).generate_state(2)
    return make_synthetic(train_size, int(train_seed)), make_synthetic(test_size, int(test_seed))
