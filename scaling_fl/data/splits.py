"""How the rows of one dataset are dealt out to the sites.

Every split is a seeded function of (labels, num_sites, seed), so every rank
computes the same partition on its own and a resumed run gets the same data.
"""

from __future__ import annotations

import numpy as np

from scaling_fl.data.dataset import DataError

SPLIT_METHODS = ("iid", "label_sorted", "dirichlet")
DIRICHLET_ATTEMPTS = 100


def split_indices(
    labels: np.ndarray,
    num_sites: int,
    method: str,
    seed: int,
    dirichlet_beta: float = 0.5,
    sample_percentage: float = 1.0,
) -> list[np.ndarray]:
    """Disjoint, sorted, non-empty index arrays, one per site."""
    return split_rows(labels, num_sites, method, seed, dirichlet_beta, sample_percentage)[0]


def split_rows(
    labels: np.ndarray,
    num_sites: int,
    method: str,
    seed: int,
    dirichlet_beta: float = 0.5,
    sample_percentage: float = 1.0,
    validation_fraction: float = 0.0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """(the sites' rows, the validation rows): the sample_percentage sample of the rows, the validation
    set carved out of it (carve_validation), the rest dealt to the sites. With validation_fraction 0
    the sites get exactly what split_indices always gave."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    _check_arguments(num_sites, method, dirichlet_beta, sample_percentage)
    rng = np.random.default_rng(seed)
    sampled = _sample(len(labels), sample_percentage, num_sites, rng)
    pool, validation = carve_validation(labels, validation_fraction, seed, rows=sampled)
    if method == "iid":
        parts = _split_iid(pool, num_sites, rng)
    elif method == "label_sorted":
        parts = _split_label_sorted(labels, pool, num_sites, rng)
    else:
        parts = _split_dirichlet(labels, pool, num_sites, dirichlet_beta, rng)
    return [np.sort(part).astype(np.int64) for part in parts], validation


def split_by_file(
    labels: np.ndarray,
    file_rows: list[int],
    seed: int,
    sample_percentage: float = 1.0,
    validation_fraction: float = 0.0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """split=none: site k trains on the rows of the k-th file (the files' rows one after another in
    `labels`). Each site's sample_percentage sample and validation rows (stratified within the site)
    are drawn from (seed, site), so a site's rows do not depend on the other sites' files."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if sum(file_rows) != len(labels):
        raise ValueError(f"the files hold {sum(file_rows)} rows, the labels {len(labels)}")
    if not 0.0 < sample_percentage <= 1.0:
        raise ValueError(f"sample_percentage must be in (0, 1], got {sample_percentage}")
    parts, held = [], []
    starts = np.concatenate([[0], np.cumsum(file_rows)]).astype(np.int64)
    for site, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
        rows = np.arange(start, end, dtype=np.int64)
        if sample_percentage < 1.0:
            rng = np.random.default_rng([seed, site])
            keep = max(1, int(round(len(rows) * sample_percentage))) if len(rows) else 0
            rows = np.sort(rng.choice(rows, size=keep, replace=False))
        train, validation = carve_validation(labels, validation_fraction, seed + site, rows=rows)
        parts.append(train)
        held.append(validation)
    return parts, np.sort(np.concatenate(held)).astype(np.int64) if held else np.empty(0, dtype=np.int64)


VALIDATION_STREAM = 0x7A1D  # the validation carve's seed stream, apart from the split's


def carve_validation(
    labels: np.ndarray, fraction: float, seed: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of `rows` (default: all), sorted and disjoint: of every label,
    round(fraction x its rows) rows drawn from (seed, a stream of their own) go to validation
    (stratified, so the validation set has the training rows' label mix). fraction 0: every row trains."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows, dtype=np.int64)
    if fraction <= 0 or not len(rows):  # (no rows: a site that is not this process's in a cross-silo run)
        return rows, np.empty(0, dtype=np.int64)
    rng = np.random.default_rng([seed, VALIDATION_STREAM])
    held = []
    for label in np.unique(labels[rows]):
        of_label = rows[labels[rows] == label]
        held.append(rng.choice(of_label, size=int(round(fraction * len(of_label))), replace=False))
    validation = np.sort(np.concatenate(held)).astype(np.int64)
    return np.setdiff1d(rows, validation).astype(np.int64), validation


def _check_arguments(num_sites, method, dirichlet_beta, sample_percentage) -> None:
    if method not in SPLIT_METHODS:
        raise ValueError(f"unknown split method '{method}'; choose one of {', '.join(SPLIT_METHODS)}")
    if int(num_sites) != num_sites or num_sites < 1:
        raise ValueError(f"num_sites must be a positive integer, got {num_sites}")
    if not 0.0 < sample_percentage <= 1.0:
        raise ValueError(f"sample_percentage must be in (0, 1], got {sample_percentage}")
    if method == "dirichlet" and not dirichlet_beta > 0:
        raise ValueError(f"dirichlet_beta must be > 0, got {dirichlet_beta}")


def _sample(num_rows: int, fraction: float, num_sites: int, rng) -> np.ndarray:
    """The seeded subset of rows the split works on (all rows for fraction 1)."""
    keep = num_rows if fraction == 1.0 else int(round(num_rows * fraction))
    if keep < num_sites:
        raise DataError(
            f"cannot give {num_sites} sites a row each from {keep} rows "
            f"({num_rows} rows, sample_percentage={fraction}); use fewer sites or more data"
        )
    if keep == num_rows:
        return np.arange(num_rows)
    return np.sort(rng.choice(num_rows, size=keep, replace=False))


def _split_iid(pool: np.ndarray, num_sites: int, rng) -> list[np.ndarray]:
    return np.array_split(rng.permutation(pool), num_sites)


def _split_label_sorted(labels, pool, num_sites, rng) -> list[np.ndarray]:
    """The original scaling_fl non-IID split: contiguous chunks of the label-sorted
    rows, so each site sees only one or two labels. The shuffle first makes the
    order within a label random."""
    shuffled = rng.permutation(pool)
    ordered = shuffled[np.argsort(labels[shuffled], kind="stable")]
    return np.array_split(ordered, num_sites)


def _split_dirichlet(labels, pool, num_sites, beta, rng) -> list[np.ndarray]:
    """Per label, site shares ~ Dirichlet(beta): small beta, few labels per site.
    A draw that leaves a site empty is redrawn a bounded number of times."""
    for _ in range(DIRICHLET_ATTEMPTS):
        parts = _dirichlet_draw(labels, pool, num_sites, beta, rng)
        if all(len(part) for part in parts):
            return parts
    raise DataError(
        f"dirichlet split left a site without rows in {DIRICHLET_ATTEMPTS} draws "
        f"({len(pool)} rows, {num_sites} sites, beta={beta}); raise dirichlet_beta or use fewer sites"
    )


def _dirichlet_draw(labels, pool, num_sites, beta, rng) -> list[np.ndarray]:
    per_site: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    pool_labels = labels[pool]
    for label in np.unique(pool_labels):
        rows = rng.permutation(pool[pool_labels == label])
        shares = rng.dirichlet(np.full(num_sites, beta))
        cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
        for site, chunk in enumerate(np.split(rows, cuts)):
            per_site[site].append(chunk)
    return [np.concatenate(chunks) for chunks in per_site]


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_labels: int) -> np.ndarray:
    """[num_sites, num_labels] row counts, for logs and for checking skew."""
    labels = np.asarray(labels, dtype=np.int64)
    if not parts:
        return np.zeros((0, num_labels), dtype=np.int64)
    return np.stack(
        [np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_labels) for part in parts]
    ).astype(np.int64)
