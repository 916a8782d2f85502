"""Readers for the dataset files each task understands.

Everything goes through fsspec (configured by scaling_fl.storage), so local paths, s3:// and gs:// all work, and
through Python's csv module (or json, a line at a time, for task_name=csv's .jsonl files), so a bad row can be
reported with its line number.
Every problem becomes one DataError line: file, line, what is wrong, how to fix it.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from scaling_fl import storage
from scaling_fl.data.dataset import DataError, TextDataset

# Long reviews exceed csv's default 128 KiB field limit.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
YELP_LABELS = ("negative", "positive")
YELP_FULL_LABELS = ("1 star", "2 stars", "3 stars", "4 stars", "5 stars")
IMDB_LABELS = ("negative", "positive")
SPOOKY_LABELS = ("EAP", "HPL", "MWS")

# Headers of re-saved Crepe files, e.g. Kaggle's "Class Index,Title,Description".
_CREPE_HEADER_NAMES = {"class index", "class", "label", "stars", "rating", "polarity"}
_CREPE_ESCAPE = re.compile(r'\\(n|"|\\|u[0-9a-fA-F]{4})')
_BR_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)


# ---------------------------------------------------------------- text cleaning


def squash_spaces(text: str) -> str:
    """One space between words: cleaning leaves runs of spaces that mean nothing."""
    return " ".join(text.split())


def clean_agnews(text: str) -> str:
    """AG News marks line breaks with a bare backslash ("dwindling\\band"), and
    writes "\\$" for a dollar sign; both would otherwise reach the tokenizer."""
    text = text.replace("\\$", "$")
    return squash_spaces(text.replace("\\", " "))


def _unescape_crepe(match: re.Match) -> str:
    code = match.group(1)
    if code == "n":
        return " "
    if code.startswith("u"):
        return chr(int(code[1:], 16))
    return code  # \" -> "   and   \\ -> \


def clean_crepe(text: str) -> str:
    """Yelp's Crepe files write a newline as a literal backslash-n, a quote as
    backslash-quote and non-ASCII letters as \\uXXXX escapes."""
    return squash_spaces(_CREPE_ESCAPE.sub(_unescape_crepe, text))


def clean_imdb(text: str) -> str:
    """IMDB reviews keep the site's <br /> tags; they carry no sentiment."""
    return squash_spaces(_BR_TAG.sub(" ", text))


# ---------------------------------------------------------------- low-level access


@contextmanager
def open_text(path: str):
    """Open a UTF-8 text file on any fsspec filesystem, or fail with one line."""
    try:
        handle = storage.open_file(path, "r", encoding="utf-8", newline="").open()
    except storage.StorageError as exc:
        raise DataError(str(exc)) from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path (local, s3:// or gs://)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; pass the path of the CSV file itself") from None
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(
            f"{path}: cannot open ({type(exc).__name__}: {storage.first_line(exc)}); "
            "check the path and the storage credentials"
        ) from None
    try:
        yield handle
    finally:
        handle.close()


def iter_csv_rows(path: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line where the row starts, fields), skipping blank lines.

    csv's line_num counts physical lines read so far, so a row's first line is
    the previous row's line_num + 1 even when a quoted field spans lines.
    """
    found_row = False
    with open_text(path) as handle:
        reader = csv.reader(handle)
        row_end = 0
        try:
            for row in reader:
                row_start, row_end = row_end + 1, reader.line_num
                if not row:
                    continue
                found_row = True
                yield row_start, row
        except csv.Error as exc:
            raise DataError(
                f"{path}:{reader.line_num}: malformed CSV ({exc}); check quoting around that line"
            ) from None
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}:{reader.line_num + 1}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8"
            ) from None
        except OSError as exc:
            raise DataError(f"{path}: read failed ({storage.first_line(exc)}); check the storage") from None
    if not found_row:
        raise DataError(f"{path}: file is empty; point the task at a file with rows")


def _require_text(path: str, line: int, text: str) -> str:
    if not text:
        raise DataError(f"{path}:{line}: empty text; remove the row or fill in its text")
    return text


def _dataset(path: str, texts: list[str], labels: list[int], label_names, responses=None) -> TextDataset:
    return TextDataset(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=tuple(label_names),
        source=str(path),
        responses=responses,
    )


# ---------------------------------------------------------------- Crepe (no header)


def _parse_class_index(path: str, line: int, value: str, task: str, num_labels: int, fix: str) -> int:
    """Crepe labels are 1-based class indices; return the 0-based label."""
    try:
        index = int(value.strip())
    except ValueError:
        raise DataError(
            f"{path}:{line}: label '{value}' is not a number; the first column must be "
            f"the class index 1-{num_labels} for task {task}"
        ) from None
    if not 1 <= index <= num_labels:
        raise DataError(f"{path}:{line}: label {index} is outside 1-{num_labels} for task {task}; {fix}")
    return index - 1


def _is_crepe_header(row: list[str]) -> bool:
    return row[0].strip().lstrip("\ufeff").lower() in _CREPE_HEADER_NAMES


def read_crepe(
    path: str,
    *,
    task: str,
    label_names: tuple[str, ...],
    text_fields: tuple[str, ...],
    clean: Callable[[str], str],
    range_fix: str,
) -> TextDataset:
    """Read a Zhang et al. (Crepe) CSV: class index, then text fields; an
    optional header row (Kaggle re-saves) is skipped."""
    path = str(path)
    expected = 1 + len(text_fields)
    texts, labels = [], []
    for line, row in iter_csv_rows(path):
        if not texts and not labels and _is_crepe_header(row):
            continue
        if len(row) != expected:
            raise DataError(
                f"{path}:{line}: expected {expected} fields (class index, {', '.join(text_fields)}), "
                f"got {len(row)}; check the task and the quoting"
            )
        labels.append(_parse_class_index(path, line, row[0], task, len(label_names), range_fix))
        texts.append(_require_text(path, line, clean(" ".join(row[1:]))))
    if not texts:
        raise DataError(f"{path}: has a header but no rows; point the task at a file with rows")
    return _dataset(path, texts, labels, label_names)


def read_agnews(path: str) -> TextDataset:
    return read_crepe(
        path,
        task="agnews",
        label_names=AGNEWS_LABELS,
        text_fields=("title", "description"),
        clean=clean_agnews,
        range_fix="AG News class indices are 1-4 (World, Sports, Business, Sci/Tech)",
    )


def read_yelp(path: str) -> TextDataset:
    return read_crepe(
        path,
        task="yelp",
        label_names=YELP_LABELS,
        text_fields=("text",),
        clean=clean_crepe,
        range_fix="use task_name=yelp_full for 1-5 star files",
    )


def read_yelp_full(path: str) -> TextDataset:
    return read_crepe(
        path,
        task="yelp_full",
        label_names=YELP_FULL_LABELS,
        text_fields=("text",),
        clean=clean_crepe,
        range_fix="Yelp full files hold star ratings 1-5",
    )


# ---------------------------------------------------------------- CSV with a header


def _column_index(names: list[str], wanted: str) -> int | None:
    """Exact name first, then a unique case-insensitive match."""
    if wanted in names:
        return names.index(wanted)
    matches = [i for i, name in enumerate(names) if name.lower() == wanted.lower()]
    return matches[0] if len(matches) == 1 else None


def iter_columns(path: str, columns: list[str], missing_fix: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line, values of `columns`) from a headered CSV."""
    path = str(path)
    rows = iter_csv_rows(path)
    header_line, header = next(rows)
    names = [name.strip().lstrip("\ufeff").strip() for name in header]
    positions = []
    for column in columns:
        position = _column_index(names, column)
        if position is None:
            raise DataError(
                f"{path}:{header_line}: no column '{column}' in the header ({', '.join(names)}); {missing_fix}"
            )
        positions.append(position)
    found = False
    for line, row in rows:
        if len(row) != len(names):
            raise DataError(
                f"{path}:{line}: expected {len(names)} fields like the header, got {len(row)}; "
                "check the quoting of that row"
            )
        found = True
        yield line, [row[p] for p in positions]
    if not found:
        raise DataError(f"{path}: has a header but no rows; point the task at a file with rows")


def _parse_named_label(path: str, line: int, value: str, index: dict[str, int], what: str) -> int:
    key = value.strip()
    if key not in index:
        expected = ", ".join(f"'{name}'" for name in index)
        raise DataError(f"{path}:{line}: unknown {what} '{value}'; expected one of {expected}")
    return index[key]


def read_imdb_csv(path: str) -> TextDataset:
    """Kaggle's "IMDB Dataset of 50K Movie Reviews" layout: review,sentiment."""
    path = str(path)
    index = {name: i for i, name in enumerate(IMDB_LABELS)}
    fix = "an IMDB CSV needs the header review,sentiment (or pass an aclImdb split directory)"
    texts, labels = [], []
    for line, (review, sentiment) in iter_columns(path, ["review", "sentiment"], fix):
        labels.append(_parse_named_label(path, line, sentiment.lower(), index, "sentiment"))
        texts.append(_require_text(path, line, clean_imdb(review)))
    return _dataset(path, texts, labels, IMDB_LABELS)


def read_imdb_dir(path: str) -> TextDataset:
    """The Stanford aclImdb layout: <split>/neg/*.txt and <split>/pos/*.txt, one review each."""
    path = str(path)
    fs, root = storage.filesystem(path)
    root = root.rstrip("/")
    texts, labels = [], []
    for label, folder in enumerate(("neg", "pos")):
        files = sorted(fs.glob(f"{root}/{folder}/*.txt"))
        if not files:
            raise DataError(f"{path}: no {folder}/*.txt reviews; pass an aclImdb split directory such as aclImdb/train")
        contents = fs.cat(files)
        for file in files:
            texts.append(_decode_review(file, contents[file]))
            labels.append(label)
    return _dataset(path, texts, labels, IMDB_LABELS)


def _decode_review(file: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8") from None
    text = clean_imdb(text)
    if not text:
        raise DataError(f"{file}: empty review; remove the file")
    return text


def read_imdb(path: str) -> TextDataset:
    path = str(path)
    try:
        fs, root = storage.filesystem(path)
        is_dir = fs.isdir(root)
    except storage.StorageError as exc:
        raise DataError(str(exc)) from None
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(
            f"{path}: cannot open ({type(exc).__name__}: {storage.first_line(exc)}); "
            "check the path and the storage credentials"
        ) from None
    return read_imdb_dir(path) if is_dir else read_imdb_csv(path)


def read_spooky_author(path: str) -> TextDataset:
    """Kaggle's Spooky Author Identification train.csv layout: id,text,author."""
    path = str(path)
    index = {name: i for i, name in enumerate(SPOOKY_LABELS)}
    missing_fix = (
        "Kaggle's test.csv has no labels: split Kaggle's train.csv with "
        "scripts/spooky_author/split_data.py and pass its train.csv and test.csv"
    )
    texts, labels = [], []
    for line, (text, author) in iter_columns(path, ["text", "author"], missing_fix):
        labels.append(_parse_named_label(path, line, author.upper(), index, "author"))
        texts.append(_require_text(path, line, squash_spaces(text)))
    return _dataset(path, texts, labels, SPOOKY_LABELS)


# ---------------------------------------------------------------- JSON Lines


def is_jsonl(path: str) -> bool:
    """task_name=csv reads a file ending in .jsonl as JSON Lines (one object a line), any other as CSV."""
    return str(path).lower().endswith(".jsonl")


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number"
    )


def _json_text(path: str, line: int, key: str, value) -> str:
    """A field as text: strings as they are, numbers as written (a label may be 3), null as empty."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise DataError(
        f"{path}:{line}: key '{key}' holds {_json_type(value)}, not text; give it a string value or pick another key"
    )


def iter_jsonl_records(path: str, columns: list[str], missing_fix: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line, values of `columns`) from a JSON Lines file, skipping blank lines."""
    path = str(path)
    found = False
    with open_text(path) as handle:
        line = 0
        try:
            for line, raw in enumerate(handle, start=1):
                if line == 1:
                    raw = raw.lstrip("\ufeff")
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{line}: malformed JSON ({exc.msg} at column {exc.colno}); every line of a "
                        '.jsonl file must be one complete JSON object such as {"prompt": "...", "response": "..."}'
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}:{line}: expected a JSON object, got {_json_type(record)}; every line of a "
                        '.jsonl file must be one JSON object such as {"prompt": "...", "response": "..."}'
                    )
                keys = list(record)
                values = []
                for column in columns:
                    position = _column_index(keys, column)
                    if position is None:
                        raise DataError(
                            f"{path}:{line}: no key '{column}' in this object (keys: {', '.join(keys) or 'none'}); "
                            f"{missing_fix}"
                        )
                    values.append(_json_text(path, line, keys[position], record[keys[position]]))
                found = True
                yield line, values
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{line + 1}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8") from None
        except OSError as exc:
            raise DataError(f"{path}: read failed ({storage.first_line(exc)}); check the storage") from None
    if not found:
        raise DataError(f"{path}: file is empty; point the task at a file with one JSON object a line")


def iter_records(path: str, columns: list[str], missing_fix: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line, values of `columns`) from a headered CSV or, for a .jsonl path, a JSON Lines file."""
    if is_jsonl(path):
        return iter_jsonl_records(path, columns, missing_fix)
    return iter_columns(path, columns, missing_fix)


# ---------------------------------------------------------------- generic CSV / JSON Lines

TEXT_ONLY_LABELS = ("text",)  # label_names of rows without a label (objective=causal_lm): all 0


def _require_field(path: str, line: int, value: str, column: str, what: str) -> str:
    if not value.strip():
        raise DataError(f"{path}:{line}: empty {what} in column '{column}'; fill it in or drop the row")
    return value


def read_generic_csv(
    path: str,
    text_columns: list[str] | None,
    label_column: str | None,
    label_names: tuple[str, ...] | None = None,
    *,
    prompt_column: str | None = None,
    response_column: str | None = None,
) -> TextDataset:
    """Any headered CSV, or a JSON Lines file (path ending in .jsonl) with the same column names as keys.

    The text is text_columns joined by spaces, or, for prompt/response SFT, the prompt_column with the
    response_column as the row's response (both kept as written: whitespace can matter to a completion).
    Without label_names (the train file) the labels are the sorted distinct values of label_column; with
    them (the test file) an unseen value is an error. Without label_column (objective=causal_lm) every
    row has label 0 of TEXT_ONLY_LABELS."""
    path = str(path)
    pairs = prompt_column is not None
    if pairs:
        columns = [prompt_column, response_column]
        fix = "set prompt_column and response_column to columns of this file"
    else:
        columns = list(text_columns)
        fix = "set text_columns to columns of this file"
    if label_column is not None:
        columns.append(label_column)
        fix = fix.replace(" to columns", " and label_column to columns")
    texts, responses, raw_labels, lines = [], [], [], []
    for line, values in iter_records(path, columns, fix):
        if label_column is not None:
            label = values.pop().strip()
            if not label:
                raise DataError(f"{path}:{line}: empty label in column '{label_column}'; fill it in or drop the row")
            raw_labels.append(label)
        if pairs:
            prompt, response = values
            texts.append(_require_field(path, line, prompt, prompt_column, "prompt"))
            responses.append(_require_field(path, line, response, response_column, "response"))
        else:
            texts.append(_require_text(path, line, squash_spaces(" ".join(values))))
        lines.append(line)
    if label_column is None:
        labels = [0] * len(texts)
        label_names = TEXT_ONLY_LABELS
    else:
        labels, label_names = _index_labels(path, raw_labels, lines, label_names)
    return _dataset(path, texts, labels, label_names, responses if pairs else None)


def _index_labels(path, raw_labels, lines, label_names) -> tuple[list[int], tuple[str, ...]]:
    if label_names is None:
        label_names = tuple(sorted(set(raw_labels)))
    index = {name: i for i, name in enumerate(label_names)}
    labels = []
    for line, value in zip(lines, raw_labels):
        if value not in index:
            raise DataError(
                f"{path}:{line}: label '{value}' does not occur in the train file "
                f"(labels: {', '.join(label_names)}); fix the value or add it to the train file"
            )
        labels.append(index[value])
    return labels, tuple(label_names)
