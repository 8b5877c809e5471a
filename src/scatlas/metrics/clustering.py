"""Cluster-separation scores of an embedding and agreement of unsupervised clusterings with labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, calinski_harabasz_score, davies_bouldin_score, normalized_mutual_info_score

if TYPE_CHECKING:
    import pandas as pd


def davies_bouldin(X: np.ndarray, labels: np.ndarray) -> float:
    """Davies–Bouldin index (lower = better separated); :func:`sklearn.metrics.davies_bouldin_score`."""
    return float(davies_bouldin_score(X, labels))


def calinski_harabasz(X: np.ndarray, labels: np.ndarray) -> float:
    """Calinski–Harabasz index (higher = better separated); :func:`sklearn.metrics.calinski_harabasz_score`."""
    return float(calinski_harabasz_score(X, labels))


def kmeans_ari_nmi(X: np.ndarray, labels: np.ndarray, seed: int = 0, n_init: int = 10) -> dict[str, float]:
    """ARI and NMI between labels and k-means clusters with k = number of labels (scib-metrics' KMeans NMI/ARI).

    Returns
    -------
    ``{"kmeans_ari": ..., "kmeans_nmi": ...}``
    """
    k = len(np.unique(labels))
    clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(np.asarray(X, dtype=np.float64))
    return {
        "kmeans_ari": float(adjusted_rand_score(labels, clusters)),
        "kmeans_nmi": float(normalized_mutual_info_score(labels, clusters, average_method="arithmetic")),
    }


def leiden_ari_nmi(
    X: np.ndarray,
    labels: np.ndarray,
    resolutions: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0),
    n_neighbors: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    """ARI and NMI of Leiden clusterings over a resolution sweep; the resolution with the best NMI wins (scib).

    An exact kNN graph (``n_neighbors``, UMAP connectivities) is built once and clustered by
    :func:`scatlas.metrics.integration.leiden_sweep` at each resolution.

    Returns
    -------
    ``{"leiden_ari": ..., "leiden_nmi": ..., "leiden_resolution": ...}``
    """
    from scatlas.metrics.integration import knn, leiden_sweep

    return leiden_sweep(knn(np.asarray(X, dtype=np.float64), n_neighbors), labels, resolutions, seed)


def leiden_agreement(
    X: np.ndarray,
    targets: dict[str, np.ndarray],
    resolution: float = 0.8,
    n_neighbors: int = 25,
    seeds: Sequence[int] = range(10),
    zscore: bool = True,
) -> pd.DataFrame:
    """ARI / NMI of Leiden clusterings (one per seed) against several label sets.

    The (optionally z-scored) embedding gets one kNN graph (scanpy, ``n_neighbors``); Leiden
    at ``resolution`` runs once per seed; each clustering is compared with every target
    (e.g. ``{"cell_type": ..., "donor": ...}``: biology high and donor low is good).

    Returns
    -------
    One row per seed and target: ``seed, target, ari, nmi, n_clusters``.
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    Z = np.asarray(X, dtype=np.float32)
    if zscore:
        sd = Z.std(0)
        Z = (Z - Z.mean(0)) / np.where(sd > 0, sd, 1)
    tmp = ad.AnnData(Z)
    sc.pp.neighbors(tmp, n_neighbors=n_neighbors, use_rep="X", random_state=0)
    rows = []
    for seed in seeds:
        sc.tl.leiden(tmp, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False, key_added="c")
        clusters = tmp.obs["c"].to_numpy()
        for name, y in targets.items():
            rows.append({"seed": seed, "target": name, "ari": float(adjusted_rand_score(y, clusters)),
                         "nmi": float(normalized_mutual_info_score(y, clusters)), "n_clusters": int(len(np.unique(clusters)))})
    return pd.DataFrame(rows)
