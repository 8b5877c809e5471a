"""The per-split score table of an embedding (the ``scores_<split>_samplesize-<n>.csv`` row)."""

from __future__ import annotations

import numpy as np

from scatlas.metrics.clustering import calinski_harabasz, davies_bouldin, kmeans_ari_nmi
from scatlas.metrics.silhouette import rescaled_width, silhouette_batch, silhouette_score


def _safe(fn, *args) -> float:  # type: ignore[no-untyped-def]
    try:
        return float(fn(*args))
    except ValueError:  # fewer than two groups in the sample
        return float("nan")


def embedding_scores(
    X: np.ndarray,
    labels: np.ndarray | None,
    batch: np.ndarray,
    sample_size: int = 10_000,
    seed: int = 0,
    kmeans: bool = True,
) -> dict[str, float]:
    """ASW, Davies–Bouldin and Calinski–Harabasz for label and batch on a random subsample.

    The scMEDAL scores (raw silhouette, 1/DB reported as DB, CH) plus scib's rescaled
    label ASW and within-label batch ASW, and k-means ARI/NMI against the labels.

    Parameters
    ----------
    X
        Embedding of the cells of one split.
    labels
        Cell type of each cell, or ``None`` (label scores are then omitted).
    batch
        Batch of each cell.
    sample_size
        Cells sampled (without replacement, seeded) before scoring; all when fewer.
    seed
        Sampling and k-means seed.

    Returns
    -------
    ``silhouette_label, silhouette_batch, davies_bouldin_label, davies_bouldin_batch,
    calinski_harabasz_label, calinski_harabasz_batch, silhouette_label_scib,
    silhouette_batch_scib, kmeans_ari, kmeans_nmi, n_cells``
    (NaN where a score is undefined, e.g. a single batch in the split).
    """
    X = np.asarray(X, dtype=np.float64)
    batch = np.asarray(batch).astype(str)
    idx = np.arange(len(X))
    if len(X) > sample_size:
        idx = np.sort(np.random.default_rng(seed).choice(len(X), sample_size, replace=False))
    X, batch = X[idx], batch[idx]
    scores: dict[str, float] = {}
    groups = {"batch": batch}
    if labels is not None:
        groups = {"label": np.asarray(labels).astype(str)[idx], **groups}
    for name, y in groups.items():
        scores[f"silhouette_{name}"] = _safe(silhouette_score, X, y)
        scores[f"davies_bouldin_{name}"] = _safe(davies_bouldin, X, y)
        scores[f"calinski_harabasz_{name}"] = _safe(calinski_harabasz, X, y)
    if labels is not None:
        y = groups["label"]
        scores["silhouette_label_scib"] = rescaled_width(scores["silhouette_label"])
        scores["silhouette_batch_scib"] = silhouette_batch(X, y, batch)
        if kmeans and len(np.unique(y)) > 1:
            scores.update(kmeans_ari_nmi(X, y, seed=seed))
    scores["n_cells"] = float(len(X))
    return scores
