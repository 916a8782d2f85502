"""Split Kaggle's Spooky Author train.csv into a labelled train and test file.

Kaggle's own test.csv has no author column, so a federated run needs its test
set carved out of train.csv. The split is stratified by author and seeded.

    python scripts/spooky_author/split_data.py --input train.csv --output-dir data/spooky
"""

from __future__ import annotations

import argparse
import csv
import sys

import fsspec
import numpy as np

from scaling_fl.data.dataset import DataError
from scaling_fl.data.readers import SPOOKY_LABELS, iter_columns

COLUMNS = ["id", "text", "author"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="Kaggle's train.csv (local, s3:// or gs://)")
    parser.add_argument("--output-dir", required=True, help="folder for train.csv and test.csv")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of each author's rows held out")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        parser.error(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    return args


def read_rows(path: str) -> list[list[str]]:
    """Rows as [id, text, author], text untouched, authors checked."""
    fix = "the input must be Kaggle's train.csv with columns id,text,author"
    rows = []
    for line, (row_id, text, author) in iter_columns(path, COLUMNS, fix):
        if author not in SPOOKY_LABELS:
            raise DataError(f"{path}:{line}: unknown author '{author}'; expected one of {', '.join(SPOOKY_LABELS)}")
        rows.append([row_id, text, author])
    return rows


def stratified_test_mask(authors: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """The same share of every author goes to test, so both files keep the class balance."""
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(authors), dtype=bool)
    for author in SPOOKY_LABELS:
        rows = np.flatnonzero(authors == author)
        num_test = int(round(len(rows) * test_fraction))
        is_test[rng.permutation(rows)[:num_test]] = True
    return is_test


def write_rows(path: str, rows: list[list[str]]) -> None:
    """Same layout as Kaggle's file: header, every field quoted, LF line ends."""
    with fsspec.open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows = read_rows(args.input)
        is_test = stratified_test_mask(np.array([r[2] for r in rows]), args.test_fraction, args.seed)
        fs, root = fsspec.core.url_to_fs(args.output_dir)
        fs.makedirs(root, exist_ok=True)
        out = args.output_dir.rstrip("/")
        write_rows(f"{out}/train.csv", [r for r, t in zip(rows, is_test) if not t])
        write_rows(f"{out}/test.csv", [r for r, t in zip(rows, is_test) if t])
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(rows) - is_test.sum()} train rows, {is_test.sum()} test rows -> {out}/{{train,test}}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
