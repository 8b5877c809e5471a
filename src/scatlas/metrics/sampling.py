"""Stratified cell samples for the estimators of the benchmark's O(n²) metrics at atlas scale.

Silhouettes and kBET are means over cells of a per-cell quantity. At millions of cells the exact
per-cell values cost ``n²`` distances (silhouettes) or ``n_label²`` diffusion-space distances
(kBET); computing the *exact* per-cell value of a stratified random sample of cells instead
gives an unbiased estimate of the mean whose standard error is about ``sd / sqrt(quota)`` per
cell type (measured against the exact values by ``benchmarks/metrics_speed.py``, which runs
the estimators beside the exact suite at every size up to 100,000 cells).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def sample_rows(groups: np.ndarray, sample_size: int | None, seed: int = 0, min_per_group: int = 1000) -> np.ndarray | None:
    """A stratified random sample of cells for estimated silhouettes: at most ``max(min_per_group, sample_size // n_groups)`` cells of each group.

    Parameters
    ----------
    groups
        Group (cell type) of each cell.
    sample_size
        Rows to draw in all (``None``: no sampling).
    seed
        Seed of the draw.
    min_per_group
        Floor of each group's quota, so that many small groups still get precise means.

    Returns
    -------
    Sorted cell indices, or ``None`` when the quota keeps every cell (then the estimate is the
    exact value).
    """
    if sample_size is None:
        return None
    codes, uniques = pd.factorize(np.asarray(groups))
    quota = max(min_per_group, sample_size // max(len(uniques), 1))
    sizes = np.bincount(codes, minlength=len(uniques))
    if sizes.max(initial=0) <= quota:
        return None
    rng = np.random.default_rng(seed)
    picked = [members if len(members) <= quota else rng.choice(members, quota, replace=False)
              for members in (np.flatnonzero(codes == c) for c in range(len(uniques)))]
    return np.sort(np.concatenate(picked))


def group_weighted_mean(values: np.ndarray, groups: np.ndarray, rows: np.ndarray | None) -> float:
    """Mean over all cells of a per-cell quantity known on ``rows`` of a :func:`sample_rows` draw.

    Each group's sample mean is weighted by the group's share of all cells (the stratified
    estimator; the plain mean when ``rows`` is ``None``).
    """
    if rows is None:
        return float(np.mean(values))
    groups = np.asarray(groups)
    names, sizes = np.unique(groups, return_counts=True)
    sampled = groups[rows]
    return float(sum(size * values[sampled == name].mean() for name, size in zip(names, sizes, strict=True)) / len(groups))
