"""Exact silhouette widths computed in tiles with matrix products (never an n × n matrix).

For a tile of rows × columns, squared Euclidean distances come from ``‖x‖² + ‖y‖² − 2 x·yᵀ``
(one matrix product, on the GPU when present) and per-cluster distance sums from one more
product with the one-hot cluster matrix. Distances are float32 (the data centred first, which
keeps the expansion accurate), per-tile sums are accumulated in float64: the result agrees with
scikit-learn's float64 computation to ~1e-6. On a CPU the tiles are square and small enough to
stay in cache (1,024²), which makes the element-wise work (clamp, square root) cheap; on a GPU a
tile is a block of rows against all cells, about 128 MB.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from scatlas.metrics._device import metric_device
from scatlas.metrics.sampling import group_weighted_mean, sample_rows

_Width = TypeVar("_Width", float, np.ndarray)

_CHUNK_BYTES = 2**27
_CPU_TILE = 1024


def _cluster_distance_sums(x: torch.Tensor, onehot: torch.Tensor, metric: str, row_tile: int, col_tile: int, rows: torch.Tensor) -> torch.Tensor:
    """``(len(rows), k)`` float64 sums of the distances from each cell of ``rows`` to the members of each cluster (self excluded).

    ``x`` is centred (Euclidean) or has unit rows (cosine).
    """
    n = len(x)
    sq = (x * x).sum(1)
    one = torch.ones(1, 1, dtype=x.dtype, device=x.device)
    sums = torch.zeros(len(rows), onehot.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, len(rows), row_tile):
        own = rows[start : start + row_tile]
        queries = x[own]
        for first in range(0, n, col_tile):
            last = min(first + col_tile, n)
            if metric == "cosine":
                dist = torch.addmm(one, queries, x[first:last].T, alpha=-1.0).clamp_(0.0, 2.0)
            else:
                dist = torch.addmm(sq[None, first:last], queries, x[first:last].T, alpha=-2.0)
                dist = dist.add_(sq[own, None]).clamp_min_(0.0).sqrt_()
            inside = torch.nonzero((own >= first) & (own < last)).squeeze(1)
            dist[inside, own[inside] - first] = 0.0  # self-distances are 0 (float32 rounding leaves them slightly above)
            sums[start : start + len(own)] += (dist @ onehot[first:last]).double()
    return sums


def silhouette_samples(
    X: np.ndarray,
    labels: np.ndarray,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    metric: str = "euclidean",
    between: str = "nearest",
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Silhouette width of every sample (Euclidean), as :func:`sklearn.metrics.silhouette_samples`.

    ``s(i) = (b(i) − a(i)) / max(a(i), b(i))`` with ``a`` the mean distance to the other
    members of its cluster and ``b`` the smallest mean distance to another cluster;
    ``s = 0`` for members of singleton clusters (Rousseeuw 1987; scikit-learn convention).

    Parameters
    ----------
    X
        ``(n_cells, n_features)`` embedding.
    labels
        ``(n_cells,)`` cluster of each cell; needs 2 ≤ #clusters ≤ n − 1.
    chunk_size
        Tile size: rows × columns of distances at a time (default 1,024 × 1,024 on a CPU;
        about 128 MB of rows against all cells on a GPU).
    device
        Torch device (default: CUDA when available).
    metric
        ``euclidean`` or ``cosine`` (``1 − cos``, clipped to [0, 2]).
    between
        ``b(i)``: ``nearest`` other cluster (the standard silhouette), ``mean_other`` (mean
        distance to all cells of other clusters) or ``furthest`` cluster — the BRAS variants
        of scib-metrics.
    rows
        Indices of the cells whose widths to compute (default: all). Each width is exact: its
        distances to every cell are summed. The cost is ``len(rows) × n_cells`` distances, which
        is what lets :func:`~scatlas.metrics.sampling.sample_rows` estimate mean widths of millions of cells.

    Returns
    -------
    ``(n_cells,)`` (or ``(len(rows),)``) float64 array.
    """
    codes, uniques = pd.factorize(np.asarray(labels))
    n, k = len(codes), len(uniques)
    if not 2 <= k <= n - 1:
        raise ValueError(f"silhouette needs 2 <= number of labels <= n_samples - 1 (got {k} labels, {n} samples)")
    dev = metric_device(device)
    x = torch.as_tensor(np.asarray(X, dtype=np.float64), device=dev)
    code_t = torch.as_tensor(codes, dtype=torch.long, device=dev)
    onehot = torch.nn.functional.one_hot(code_t, k).to(torch.float32)
    if dev.type == "cuda":
        row_tile, col_tile = chunk_size or max(1, _CHUNK_BYTES // (4 * n)), n
    else:
        row_tile = col_tile = chunk_size or _CPU_TILE
    x = x / x.norm(dim=1, keepdim=True) if metric == "cosine" else x - x.mean(0)
    row_t = torch.arange(n, device=dev) if rows is None else torch.as_tensor(np.asarray(rows, dtype=np.int64), device=dev)
    sums = _cluster_distance_sums(x.float(), onehot, metric, row_tile, col_tile, row_t)
    code_t = code_t[row_t]
    sizes = onehot.double().sum(0)
    own_size = sizes[code_t]
    own_sum = sums.gather(1, code_t[:, None]).squeeze(1)
    a = own_sum / (own_size - 1).clamp_min(1)
    if between == "mean_other":
        b = (sums.sum(1) - own_sum) / (n - own_size)
    else:
        other = sums / sizes
        other.scatter_(1, code_t[:, None], float("inf") if between == "nearest" else float("-inf"))
        b = other.min(1).values if between == "nearest" else other.max(1).values
    s = (b - a) / torch.maximum(a, b)
    return torch.where(own_size > 1, torch.nan_to_num(s, nan=0.0), torch.zeros_like(s)).cpu().numpy()


def silhouette_score(X: np.ndarray, labels: np.ndarray, **kwargs: object) -> float:
    """Mean silhouette width (raw ASW in [−1, 1]); equals :func:`sklearn.metrics.silhouette_score`."""
    return float(np.mean(silhouette_samples(X, labels, **kwargs)))


def rescaled_width(width: _Width) -> _Width:
    """A silhouette width (or mean width) in [−1, 1] mapped to scib's [0, 1]: ``(width + 1) / 2``."""
    return (width + 1) / 2


def silhouette_label(X: np.ndarray, labels: np.ndarray, rescale: bool = True, sample_size: int | None = None, seed: int = 0, **kwargs: object) -> float:
    """Cell-type ASW as scib-metrics defines it: :func:`rescaled_width` of the ASW when ``rescale`` (higher = better).

    With one label, or as many labels as cells, the width is 0 (0.5 rescaled), as scib-metrics
    returns; scikit-learn's ``silhouette_score`` (and :func:`silhouette_samples`) raise there.
    ``sample_size`` estimates the ASW from the exact widths of a stratified sample of cells
    (:func:`sample_rows`; ``None``: every cell, exact).
    """
    n_labels = len(pd.unique(np.asarray(labels)))
    if n_labels in (1, len(labels)):
        asw = 0.0
    else:
        rows = sample_rows(labels, sample_size, seed)
        asw = group_weighted_mean(silhouette_samples(X, labels, rows=rows, **kwargs), labels, rows)
    return rescaled_width(asw) if rescale else asw


def silhouette_batch(
    X: np.ndarray, labels: np.ndarray, batch: np.ndarray, rescale: bool = True, sample_size: int | None = None, seed: int = 0, **kwargs: object
) -> float:
    """Batch ASW within labels, as scib-metrics' ``silhouette_batch``.

    For each label with at least two batches (and fewer batches than cells), the batch
    silhouette of its cells is computed; ``|s|`` (``1 − |s|`` when ``rescale``: 1 = well
    mixed) is averaged per label, then over labels. When no label has two batches (e.g. every
    batch holds one label) there is no mixing to measure and the result is NaN; scib-metrics
    raises there (``ValueError: No objects to concatenate``). NaN keeps a whole benchmark
    table, and says which column is undefined.

    Parameters
    ----------
    X
        Embedding.
    labels
        Cell type of each cell.
    batch
        Batch of each cell.
    rescale
        Return ``1 − |s|`` averages (scib convention) instead of ``|s|``.
    sample_size, seed
        Estimate each label's mean from the exact widths of a random sample of its cells
        (:func:`sample_rows`); ``None``: every cell, exact. The cost falls from ``Σ n_label²``
        to ``Σ quota · n_label`` distances.
    """
    labels, batch = np.asarray(labels), np.asarray(batch)
    X = np.asarray(X)
    rows = sample_rows(labels, sample_size, seed)
    per_label = []
    for group in np.unique(labels):
        mask = labels == group
        n_batches = len(np.unique(batch[mask]))
        if n_batches == 1 or n_batches == mask.sum():
            continue
        local = None if rows is None else np.searchsorted(np.flatnonzero(mask), rows[mask[rows]])
        s = np.abs(silhouette_samples(X[mask], batch[mask], rows=local, **kwargs))
        per_label.append(np.mean(1 - s if rescale else s))
    return float(np.mean(per_label)) if per_label else float("nan")


def bras(X: np.ndarray, labels: np.ndarray, batch: np.ndarray, **kwargs: object) -> float:
    """Batch removal adapted silhouette (Rautenstrauch et al. 2025), as scib-metrics' ``bras``.

    :func:`silhouette_batch` (rescaled) with cosine distance and the mean distance to all
    other batches as ``b(i)``; higher = better mixed. Keyword arguments (e.g. ``sample_size``)
    go to :func:`silhouette_batch`.
    """
    return silhouette_batch(X, labels, batch, rescale=True, metric="cosine", between="mean_other", **kwargs)


def isolated_labels(X: np.ndarray, labels: np.ndarray, batch: np.ndarray, rescale: bool = True, sample_size: int | None = None, seed: int = 0) -> float:
    """Isolated-label ASW score, as scib-metrics' ``isolated_labels``.

    Labels present in the fewest batches are *isolated*; the score is the mean over them of
    their cells' (rescaled) label silhouette. ``sample_size`` as in :func:`silhouette_label`.
    """
    rows = sample_rows(labels, sample_size, seed)
    return isolated_label_score(silhouette_samples(X, labels, rows=rows), labels, batch, rescale, rows)


def isolated_label_score(samples: np.ndarray, labels: np.ndarray, batch: np.ndarray, rescale: bool = True, rows: np.ndarray | None = None) -> float:
    """:func:`isolated_labels` from precomputed label silhouette widths (:func:`silhouette_samples` of ``labels``).

    Lets one silhouette pass serve both ``Silhouette label`` and ``Isolated labels``.
    ``samples`` are the widths of the cells ``rows`` (default: of every cell).
    """
    labels, batch = np.asarray(labels), np.asarray(batch)
    per_label = pd.DataFrame({"label": labels, "batch": batch}).drop_duplicates().groupby("label")["batch"].count()
    isolated = per_label[per_label <= per_label.min()].index
    s = rescaled_width(samples) if rescale else samples
    sampled = labels if rows is None else labels[rows]
    return float(np.mean([s[sampled == lab].mean() for lab in isolated]))
