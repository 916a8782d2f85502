"""The task registry: a task name plus paths in, (train, test) datasets out."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from scaling_fl import hub, storage
from scaling_fl.data import readers
from scaling_fl.data.dataset import DataError, TextDataset, relabeled
from scaling_fl.data.synthetic import synthetic_task

OBJECTIVES = ("sequence_classification", "causal_lm")  # as config.OBJECTIVES; tests/test_prompt_response_data.py checks
TASK_NAMES = ("agnews", "yelp", "yelp_full", "imdb", "spooky_author", "csv", "synthetic")

READERS: dict[str, Callable[[str], TextDataset]] = {
    "agnews": readers.read_agnews,
    "yelp": readers.read_yelp,
    "yelp_full": readers.read_yelp_full,
    "imdb": readers.read_imdb,
    "spooky_author": readers.read_spooky_author,
}

# Hub ids (text + ClassLabel "label" columns, same label order as ours) and the
# cleaning the local reader of the same task applies, so both sources agree.
HUB_DATASETS = {
    "agnews": ("fancyzhx/ag_news", readers.AGNEWS_LABELS, readers.clean_agnews),
    "yelp": ("fancyzhx/yelp_polarity", readers.YELP_LABELS, readers.clean_crepe),
    "yelp_full": ("Yelp/yelp_review_full", readers.YELP_FULL_LABELS, readers.clean_crepe),
    "imdb": ("stanfordnlp/imdb", readers.IMDB_LABELS, readers.clean_imdb),
}


def load_task(
    task_name: str,
    train_path: str | None,
    test_path: str | None,
    *,
    text_columns: list[str] | None = None,
    label_column: str | None = None,
    synthetic_train_size: int = 2000,
    synthetic_test_size: int = 500,
    data_seed: int = 42,
    objective: str = "sequence_classification",
    prompt_column: str | None = None,
    response_column: str | None = None,
) -> tuple[TextDataset, TextDataset]:
    """(train, test) with the same label_names; raises DataError with one line.

    task_name=csv reads a CSV, or JSON Lines for a path ending in .jsonl. With objective=causal_lm
    label_column is optional (without it every row has label 0 of ('text',)), and prompt_column plus
    response_column give prompt/response rows (TextDataset.responses) in place of text_columns.
    The other tasks are the same under either objective (causal_lm learns their texts)."""
    check_task_options(
        task_name, train_path, test_path, text_columns, label_column, objective, prompt_column, response_column
    )
    if task_name == "synthetic":
        return synthetic_task(synthetic_train_size, synthetic_test_size, data_seed)
    if task_name == "csv":
        columns = dict(prompt_column=prompt_column, response_column=response_column)
        train = readers.read_generic_csv(os.fspath(train_path), text_columns, label_column, **columns)
        test = readers.read_generic_csv(os.fspath(test_path), text_columns, label_column, train.label_names, **columns)
        return train, test
    if train_path is None:
        return load_from_hub(task_name)
    read = READERS[task_name]
    return read(os.fspath(train_path)), read(os.fspath(test_path))


def read_training_file(
    task_name: str,
    path: str,
    text_columns: list[str] | None = None,
    label_column: str | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
) -> TextDataset:
    """One site's own file, with its own label names (a cross-silo site before it knows the others')."""
    if task_name == "csv":
        columns = dict(prompt_column=prompt_column, response_column=response_column)
        return readers.read_generic_csv(os.fspath(path), text_columns, label_column, **columns)
    return READERS[task_name](os.fspath(path))


def shared_label_names(names: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The label names of files read apart: theirs when they all agree (a task's fixed order, e.g.
    AG News's World, Sports, Business, Sci/Tech), else the sorted union (a site may lack some labels)."""
    if len(set(names)) == 1:
        return names[0]
    return tuple(sorted(set().union(*names)))


def load_site_files(
    task_name: str,
    train_paths: tuple[str, ...],
    test_path: str,
    *,
    text_columns: list[str] | None = None,
    label_column: str | None = None,
    objective: str = "sequence_classification",
    prompt_column: str | None = None,
    response_column: str | None = None,
) -> tuple[TextDataset, TextDataset, list[int]]:
    """split=none, a natural partition: one training file per site, read as its own file. Returns every
    file's rows one after another, the test set and each file's row count. The label names are the
    files' shared names (shared_label_names); the test set must use only those."""
    check_task_options(
        task_name, train_paths[0], test_path, text_columns, label_column, objective, prompt_column, response_column
    )
    if task_name == "synthetic":
        raise DataError("split=none reads one training file per site; task_name=synthetic has no files")
    columns = dict(prompt_column=prompt_column, response_column=response_column)
    files = [read_training_file(task_name, path, text_columns, label_column, **columns) for path in train_paths]
    label_names = shared_label_names([dataset.label_names for dataset in files])
    fix = "the test set may only use labels that occur in the training files"
    files = [relabeled(dataset, label_names, fix) for dataset in files]
    train = TextDataset(
        texts=[text for dataset in files for text in dataset.texts],
        labels=np.concatenate([dataset.labels for dataset in files]) if files else np.empty(0, dtype=np.int64),
        label_names=label_names,
        source=" + ".join(dataset.source for dataset in files),
        responses=[r for dataset in files for r in dataset.responses] if files[0].responses is not None else None,
    )
    if task_name == "csv":
        test = readers.read_generic_csv(os.fspath(test_path), text_columns, label_column, label_names, **columns)
    else:
        test = relabeled(READERS[task_name](os.fspath(test_path)), label_names, fix)
    return train, test, [len(dataset.texts) for dataset in files]


def check_task_options(
    task_name,
    train_path,
    test_path,
    text_columns,
    label_column,
    objective="sequence_classification",
    prompt_column=None,
    response_column=None,
) -> None:
    """Static checks, no I/O: the launcher runs them before any worker starts."""
    if task_name not in TASK_NAMES:
        raise DataError(f"unknown task_name '{task_name}'; choose one of {', '.join(TASK_NAMES)}")
    if objective not in OBJECTIVES:
        raise DataError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    _check_paths(task_name, train_path, test_path)
    if task_name == "csv":
        _check_csv_columns(text_columns, label_column, objective, prompt_column, response_column)
        return
    given = [
        name
        for name, value in (
            ("text_columns", text_columns),
            ("label_column", label_column),
            ("prompt_column", prompt_column),
            ("response_column", response_column),
        )
        if value is not None
    ]
    if given:
        verb, pronoun = ("applies", "it") if len(given) == 1 else ("apply", "them")
        raise DataError(f"{' and '.join(given)} {verb} only to task_name=csv, not {task_name}; drop {pronoun}")


def _check_paths(task_name, train_path, test_path) -> None:
    for name, value in (("train_path", train_path), ("test_path", test_path)):
        for path in value if isinstance(value, tuple) else (value,):  # split=none: one train file per site
            if path is not None and not os.fspath(path).strip():
                raise DataError(f"{name} is empty; give a file path or leave it unset")
    if task_name == "synthetic":
        if train_path is not None or test_path is not None:
            raise DataError("task_name=synthetic is generated, not read; drop train_path and test_path")
        return
    if task_name in ("csv", "spooky_author") and (train_path is None or test_path is None):
        hint = (
            "; split Kaggle's train.csv with scripts/spooky_author/split_data.py"
            if task_name == "spooky_author"
            else ""
        )
        raise DataError(f"task_name={task_name} needs train_path=... and test_path=...{hint}")
    if (train_path is None) != (test_path is None):
        raise DataError(
            f"task_name={task_name}: give both train_path and test_path, "
            "or neither to download the dataset from the Hugging Face Hub"
        )


def _check_csv_columns(text_columns, label_column, objective, prompt_column, response_column) -> None:
    causal = objective == "causal_lm"
    if prompt_column is not None or response_column is not None:
        used = _check_prompt_response(text_columns, causal, prompt_column, response_column)
        what = "the prompt or response column"
    else:
        if isinstance(text_columns, str) or not text_columns:
            if causal:
                raise DataError(
                    "task_name=csv with objective=causal_lm needs text_columns (plain-text SFT, e.g. ['text']) "
                    "or prompt_column and response_column (prompt/response SFT)"
                )
            raise DataError("task_name=csv needs text_columns, a list of column names such as ['title', 'body']")
        if not all(isinstance(c, str) and c for c in text_columns):
            raise DataError(f"text_columns must be non-empty column names, got {list(text_columns)}")
        used, what = list(text_columns), "in text_columns"
    if label_column is None and causal:
        return  # no labels: every row is label 0 of ('text',)
    if not isinstance(label_column, str) or not label_column:
        raise DataError("task_name=csv needs label_column, the name of the column holding the labels")
    if label_column in used:
        raise DataError(f"label_column '{label_column}' is also {what}; the label must not be in the text")


def _check_prompt_response(text_columns, causal, prompt_column, response_column) -> list[str]:
    if not causal:
        raise DataError(
            "prompt_column and response_column are for objective=causal_lm (prompt/response SFT); "
            "set objective=causal_lm or drop them"
        )
    for name, value, other in (
        ("prompt_column", prompt_column, "response_column"),
        ("response_column", response_column, "prompt_column"),
    ):
        if value is None:
            raise DataError(
                f"{other} is set but {name} is not; prompt/response SFT needs both, "
                f"e.g. prompt_column=prompt response_column=response"
            )
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{name} must be a column name, got {value!r}")
    if prompt_column == response_column:
        raise DataError(f"prompt_column and response_column are both '{prompt_column}'; name two different columns")
    if text_columns is not None:
        raise DataError(
            "give text_columns (plain-text SFT) or prompt_column and response_column (prompt/response SFT), "
            "not both; drop text_columns"
        )
    return [prompt_column, response_column]


# ---------------------------------------------------------------- Hugging Face Hub


def load_from_hub(task_name: str) -> tuple[TextDataset, TextDataset]:
    """Download a task from the Hub; offline, fail in seconds with one line
    (datasets itself retries for tens of seconds before giving up)."""
    hub_id, label_names, clean = HUB_DATASETS[task_name]
    if not hub.offline_mode():
        endpoint = hub.endpoint()
        if not hub.reachable(endpoint):
            raise DataError(
                f"task {task_name}: the Hugging Face Hub ({endpoint}) could not be reached to download "
                f"'{hub_id}'; pass train_path=... test_path=... (local, s3:// or gs:// files), "
                "or set HF_HUB_OFFLINE=1 to use a cached copy"
            )
    try:
        import datasets

        loaded = datasets.load_dataset(hub_id)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one line for the user
        raise DataError(
            f"task {task_name}: could not load '{hub_id}' from the Hugging Face Hub "
            f"({type(exc).__name__}: {storage.first_line(exc)}); pass train_path=... test_path=... instead"
        ) from None
    return tuple(
        hub_split_to_dataset(loaded[split], label_names, clean, f"hf://{hub_id}[{split}]")
        for split in ("train", "test")
    )


def hub_split_to_dataset(split, label_names, clean, source: str) -> TextDataset:
    texts = [clean(text) for text in split["text"]]
    labels = np.asarray(split["label"], dtype=np.int64)
    return TextDataset(texts=texts, labels=labels, label_names=label_names, source=source)
