"""The in-memory text dataset every task returns, and the error every reader raises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scaling_fl.errors import UserError


class DataError(UserError, ValueError):
    """A problem with the data the user gave us.

    The message is one line that names the file (and line, when there is one)
    and says how to fix it, so the launcher can print it as is and exit.
    """


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with integer labels; small enough to hold in memory on every site.

    Prompt/response data (objective=causal_lm with prompt_column and response_column): `texts` are the
    prompts and `responses` their responses, one each; the labels are then all 0 (label_names
    ('text',)) unless a label_column gave them, and serve only to split the rows among the sites.

    eq=False: field-wise equality of lists and arrays is ambiguous, identity is enough.
    """

    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str
    responses: list[str] | None = None

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if len(self.texts) != len(labels):
            raise DataError(
                f"{self.source}: {len(self.texts)} texts but {len(labels)} labels; every text needs exactly one label"
            )
        if self.responses is not None:
            object.__setattr__(self, "responses", list(self.responses))
            if len(self.responses) != len(self.texts):
                raise DataError(
                    f"{self.source}: {len(self.texts)} prompts but {len(self.responses)} responses; "
                    "every prompt needs exactly one response"
                )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise DataError(
                f"{self.source}: labels must lie in 0..{len(self.label_names) - 1}, "
                f"found {labels.min()}..{labels.max()}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> TextDataset:
        """Rows of one site (or one sample) that share label names with the whole."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TextDataset(
            texts=[self.texts[i] for i in indices],
            labels=self.labels[indices],
            label_names=self.label_names,
            source=self.source,
            responses=None if self.responses is None else [self.responses[i] for i in indices],
        )


def relabeled(dataset: TextDataset, label_names: tuple[str, ...], fix: str) -> TextDataset:
    """The same rows with labels as indices into `label_names` (a superset of the dataset's, any order):
    files read apart must agree on what label index k means before they are trained or scored together."""
    if dataset.label_names == tuple(label_names):
        return dataset
    index = {name: i for i, name in enumerate(label_names)}
    unknown = [name for name in dataset.label_names if name not in index]
    if unknown:
        raise DataError(f"{dataset.source}: label {unknown[0]!r} is not one of {list(label_names)}; {fix}")
    mapping = np.asarray([index[name] for name in dataset.label_names], dtype=np.int64)
    return TextDataset(
        texts=dataset.texts,
        labels=mapping[dataset.labels] if len(dataset.labels) else dataset.labels,
        label_names=tuple(label_names),
        source=dataset.source,
        responses=dataset.responses,
    )
