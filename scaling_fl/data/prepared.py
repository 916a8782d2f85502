"""Data read, checked and split once by the launcher, then memory-mapped by every site.

Reading in the launcher means a malformed row or an unreadable path fails before any
worker starts, and a remote file (s3://, gs://, the Hub) is fetched once per node,
not once per site. Arrow IPC files are memory-mapped, so sites share the pages.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from scaling_fl.data.dataset import DataError, TextDataset
from scaling_fl.data.splits import label_histograms, split_by_file, split_rows
from scaling_fl.data.tasks import load_site_files, load_task


@dataclass(frozen=True)
class PreparedData:
    train: TextDataset
    test: TextDataset
    parts: list[np.ndarray]  # row indices of train, one array per site (global rank)
    # row indices of train held out for validation.* (empty: validation_fraction=0)
    validation: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.train.label_names

    def site_sizes(self) -> list[int]:
        return [len(part) for part in self.parts]

    def histograms(self) -> np.ndarray:
        return label_histograms(self.train.labels, self.parts, len(self.label_names))


def prepare_data(cfg, num_sites: int) -> PreparedData:
    if cfg.split == "none":
        return _prepare_site_files(cfg, num_sites)
    train, test = load_task(
        cfg.task_name,
        cfg.train_path,
        cfg.test_path,
        synthetic_train_size=cfg.synthetic_train_size,
        synthetic_test_size=cfg.synthetic_test_size,
        data_seed=cfg.data_seed,
        **reader_columns(cfg),
    )
    parts, validation = split_rows(
        train.labels,
        num_sites,
        cfg.split,
        cfg.data_seed,
        dirichlet_beta=cfg.dirichlet_beta,
        sample_percentage=cfg.sample_percentage,
        validation_fraction=cfg.validation_fraction,
    )
    return PreparedData(train=train, test=test, parts=parts, validation=validation)


def _prepare_site_files(cfg, num_sites: int) -> PreparedData:
    """split=none: site k trains on the k-th train_path file, as a silo would on its own data."""
    paths = cfg.train_path if isinstance(cfg.train_path, tuple) else (cfg.train_path,)
    if len(paths) != num_sites:
        raise DataError(
            f"split=none gives site k the k-th train_path file: {len(paths)} file(s) for {num_sites} sites; "
            f"list one file per site (train_path=[a.csv,b.csv,...]) or set num_sites={len(paths)}"
        )
    train, test, file_rows = load_site_files(cfg.task_name, paths, cfg.test_path, **reader_columns(cfg))
    parts, validation = split_by_file(
        train.labels,
        file_rows,
        cfg.data_seed,
        sample_percentage=cfg.sample_percentage,
        validation_fraction=cfg.validation_fraction,
    )
    return PreparedData(train=train, test=test, parts=parts, validation=validation)


def reader_columns(cfg) -> dict:
    """What the readers take from the config: which columns hold the text, label, prompt and response."""
    return {
        "text_columns": list(cfg.text_columns) if cfg.text_columns else None,
        "label_column": cfg.label_column,
        "objective": cfg.objective,
        "prompt_column": cfg.prompt_column,
        "response_column": cfg.response_column,
    }


def _write_table(dataset: TextDataset, path: str) -> None:
    """Columns text and label, and response for prompt/response rows (texts are then the prompts)."""
    columns = {"text": pa.array(dataset.texts, pa.large_string()), "label": pa.array(dataset.labels, pa.int64())}
    if dataset.responses is not None:
        columns["response"] = pa.array(dataset.responses, pa.large_string())
    table = pa.table(columns)
    feather.write_feather(table, path, compression="uncompressed")


def save_prepared(prepared: PreparedData, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    _write_table(prepared.train, os.path.join(directory, "train.arrow"))
    _write_table(prepared.test, os.path.join(directory, "test.arrow"))
    meta = {
        "label_names": list(prepared.label_names),
        "parts": [part.tolist() for part in prepared.parts],
        "validation": prepared.validation.tolist(),
        "train_source": prepared.train.source,
        "test_source": prepared.test.source,
    }
    with open(os.path.join(directory, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle)


@dataclass(frozen=True)
class WorkerData:
    """What one worker needs: the training rows of each site it hosts, its shards of the validation
    and test sets and every site's size. Without a validation set (validation_fraction=0) the
    validation shard is the test shard itself, as the README says."""

    train: dict[int, TextDataset]  # site -> its rows
    validation_shard: TextDataset
    test_shard: TextDataset
    site_sizes: list[int]
    validation_full: TextDataset | None  # only when a site scores its own local model (per_site_metrics)


def _read_rows(path: str, rows: np.ndarray, label_names: tuple[str, ...], source: str) -> TextDataset:
    table = feather.read_table(path, memory_map=True).take(pa.array(rows, pa.int64()))
    return TextDataset(
        texts=table.column("text").to_pylist(),
        labels=table.column("label").to_numpy(),
        label_names=label_names,
        source=source,
        responses=table.column("response").to_pylist() if "response" in table.column_names else None,
    )


def load_worker_data(
    directory: str,
    sites: tuple[int, ...],
    worker: int,
    num_workers: int,
    full_validation: bool = False,
    validation_is_test: bool | None = None,
) -> WorkerData:
    """The rows of `sites`, and validation and test rows worker, worker + num_workers, ... (every row
    scored once). validation_is_test: whether the test set stands in for the validation set (None:
    when no rows were held out here; a cross-silo coordinator holds none but the sites do)."""
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    label_names = tuple(meta["label_names"])
    train_path, test_path = os.path.join(directory, "train.arrow"), os.path.join(directory, "test.arrow")
    num_test = feather.read_table(test_path, columns=["label"], memory_map=True).num_rows
    parts = [np.asarray(part, dtype=np.int64) for part in meta["parts"]]
    if any(site >= len(parts) for site in sites):
        raise RuntimeError(f"data was split for {len(parts)} sites but this worker hosts sites {list(sites)}")
    test_shard = _read_rows(test_path, np.arange(worker, num_test, num_workers), label_names, meta["test_source"])
    held_out = np.asarray(meta.get("validation", []), dtype=np.int64)
    if validation_is_test is None:
        validation_is_test = not len(held_out)
    if not validation_is_test:
        validation_shard = _read_rows(train_path, held_out[worker::num_workers], label_names, meta["train_source"])
        full = _read_rows(train_path, held_out, label_names, meta["train_source"]) if full_validation else None
    else:
        validation_shard = test_shard
        full = _read_rows(test_path, np.arange(num_test), label_names, meta["test_source"]) if full_validation else None
    return WorkerData(
        train={site: _read_rows(train_path, parts[site], label_names, meta["train_source"]) for site in sites},
        validation_shard=validation_shard,
        test_shard=test_shard,
        site_sizes=[len(part) for part in parts],
        validation_full=full,
    )
