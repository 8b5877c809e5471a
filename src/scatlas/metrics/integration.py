"""Integration metrics on one shared kNN graph, with scib-metrics' definitions.

* :func:`knn` — kNN (exact brute force in torch on a GPU; scikit-learn or pynndescent on a CPU),
  self included as the first neighbour; pass the same result to every graph metric (or your own
  precomputed one).
* :func:`lisi` — local inverse Simpson index per cell (Korsunsky et al. 2019): a Gaussian kernel
  on kNN distances calibrated per cell to ``perplexity`` (binary search on the entropy, 50 steps,
  tol 1e-5, self excluded), then ``1 / Σ_label p_label²``. :func:`ilisi` / :func:`clisi`: the
  median, scaled as scib (``(m − 1)/(B − 1)`` and ``(L − m)/(L − 1)``).
* :func:`graph_connectivity` — mean over labels of the largest connected component's share.
* :func:`kbet` / :func:`kbet_per_label` — kBET acceptance rate (χ² test of each cell's neighbours'
  batch counts), per cell type on diffusion-map neighbourhoods of the label's UMAP
  connectivities (scib-metrics' ``KBET``; its default uses the 50 nearest neighbours).
* :func:`pcr_comparison` — ``(PCR_pre − PCR_post) / PCR_pre`` (clipped at 0), PCR = variance-weighted
  R² of the principal components regressed on the one-hot batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors

from scatlas.metrics._device import metric_device


@dataclass(frozen=True)
class Neighbors:
    """kNN result: ``indices`` and ``distances`` of shape (n_cells, k), self first."""

    indices: np.ndarray
    distances: np.ndarray

    def first(self, k: int) -> Neighbors:
        """The ``k`` nearest neighbours only (self included), e.g. KBET's 50 of a 90-neighbour graph."""
        return Neighbors(self.indices[:, :k], self.distances[:, :k])

    def graph(self) -> sp.csr_matrix:
        """Sparse n × n matrix with the kNN distances."""
        n, k = self.indices.shape
        return sp.csr_matrix((self.distances.ravel(), self.indices.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))


def knn(X: np.ndarray, k: int = 90, method: Literal["auto", "brute", "sklearn", "pynndescent"] = "auto",
        device: str | torch.device | None = None, chunk_size: int = 4096) -> Neighbors:
    """Euclidean kNN of every cell, the cell itself as first neighbour.

    Parameters
    ----------
    X
        Cells × dims embedding.
    k
        Neighbours per cell (self included).
    method
        ``brute``: exact, chunked matrix products + top-k in torch (GPU when present);
        ``sklearn``: exact, scikit-learn ``NearestNeighbors``; ``pynndescent``: approximate
        (NN-descent), for large data on a CPU. ``auto``: ``brute`` on a GPU, else ``sklearn`` up
        to 100,000 cells and ``pynndescent`` above.
    device
        Torch device for ``brute`` (default: CUDA when available).
    chunk_size
        Query rows per matrix product in ``brute``.
    """
    k = min(k, len(X))
    dev = metric_device(device)
    if method == "auto":
        method = "brute" if dev.type == "cuda" else "sklearn" if len(X) <= 100_000 else "pynndescent"
    if method == "brute":
        return _brute_knn(X, k, dev, chunk_size)
    if method == "pynndescent":
        from pynndescent import NNDescent

        indices, distances = NNDescent(np.asarray(X, dtype=np.float32), n_neighbors=k, random_state=0).neighbor_graph
        return Neighbors(indices.astype(np.int64), distances.astype(np.float64))
    distances, indices = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return Neighbors(indices, distances)


def neighbors_from_distances(D: sp.spmatrix, k: int, name: str = "distance matrix") -> Neighbors:
    """A precomputed kNN distance matrix (self excluded, e.g. ``.obsp['distances']``) as :class:`Neighbors` with self first.

    Keeps each cell's ``k − 1`` nearest stored neighbours; raises when a row holds fewer.
    """
    from scatlas._errors import InputError

    D = sp.csr_matrix(D)
    counts = np.diff(D.indptr)
    if counts.min(initial=k) < k - 1:
        raise InputError(f"{name}: {int((counts < k - 1).sum())} cells have fewer than {k - 1} stored neighbours (need k − 1 = {k - 1})")
    n, width = D.shape[0], int(counts.max(initial=0))
    data = np.full((n, width), np.inf)  # ragged rows padded with +inf, sorted to the end
    cols = np.zeros((n, width), dtype=np.int64)
    slot = np.arange(D.nnz) - np.repeat(D.indptr[:-1], counts)
    rows = np.repeat(np.arange(n), counts)
    data[rows, slot], cols[rows, slot] = D.data, D.indices
    order = np.argsort(data, axis=1, kind="stable")[:, : k - 1]
    indices = np.hstack([np.arange(n)[:, None], np.take_along_axis(cols, order, 1)])
    distances = np.hstack([np.zeros((n, 1)), np.take_along_axis(data, order, 1)])
    return Neighbors(indices, distances)


def _brute_knn(X: np.ndarray, k: int, device: torch.device, chunk_size: int) -> Neighbors:
    """Exact kNN by chunked ``‖a‖² − 2ab + ‖b‖²`` and ``topk`` (float64 on CPU, float32 on a GPU)."""
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    Y = torch.as_tensor(np.asarray(X), dtype=dtype, device=device)
    sq = Y.pow(2).sum(1)
    indices, distances = [], []
    for a in range(0, len(Y), chunk_size):
        q = Y[a : a + chunk_size]
        d2 = torch.addmm(sq[None, :], q, Y.T, alpha=-2).add_(sq[a : a + chunk_size, None])
        d2[torch.arange(len(q), device=device), torch.arange(a, a + len(q), device=device)] = -1.0  # self first
        best, idx = torch.topk(d2, k, dim=1, largest=False)
        indices.append(idx.cpu())
        distances.append(best.clamp_min_(0).sqrt_().cpu())
    return Neighbors(torch.cat(indices).numpy().astype(np.int64), torch.cat(distances).double().numpy())


def _calibrated_probabilities(distances: np.ndarray, mask: np.ndarray, perplexity: float, tol: float = 1e-5, max_tries: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Per-row Gaussian kernel probabilities whose entropy matches ``log(perplexity)`` (vectorised bisection).

    Each bisection step recomputes only the rows that have not converged yet.
    """
    n = distances.shape[0]
    beta = np.ones(n)
    low, high = np.full(n, -np.inf), np.full(n, np.inf)
    target = np.log(perplexity)

    def entropy(rows: np.ndarray | slice, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = distances[rows]
        P = np.where(mask[rows], np.exp(-d * b[:, None]), 0.0)
        total = P.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            H = np.where(total == 0, 0.0, np.log(total) + b * (d * P).sum(1) / total)
            P = np.where(total[:, None] == 0, 0.0, P / total[:, None])
        return H, P

    H, P = entropy(slice(None), beta)
    active = np.flatnonzero(np.abs(H - target) >= tol)
    for _ in range(max_tries):
        if not len(active):
            break
        b, lo, hi = beta[active], low[active], high[active]
        up = H[active] - target > 0
        low[active] = np.where(up, b, lo)
        high[active] = np.where(up, hi, b)
        beta[active] = np.where(up, np.where(hi == np.inf, b * 2, (b + hi) / 2), np.where(lo == -np.inf, b / 2, (b + lo) / 2))
        H[active], P[active] = entropy(active, beta[active])
        active = active[np.abs(H[active] - target) >= tol]
    return H, P


def lisi(neighbors: Neighbors, labels: np.ndarray, perplexity: float | None = None) -> np.ndarray:
    """LISI of every cell for ``labels`` (1 = neighbourhood of one label; up to #labels)."""
    codes = pd.Categorical(labels).codes.astype(np.int64)
    idx, dist = neighbors.indices, neighbors.distances
    perplexity = perplexity or np.floor(idx.shape[1] / 3)
    mask = idx != np.arange(len(idx))[:, None]
    H, P = _calibrated_probabilities(dist, mask, perplexity)
    n_labels = codes.max() + 1
    cell = np.repeat(np.arange(len(idx)), idx.shape[1])
    sums = np.bincount(cell * n_labels + codes[idx].ravel(), weights=P.ravel(), minlength=len(idx) * n_labels).reshape(len(idx), n_labels)
    simpson = np.where(H == 0, -1.0, (sums**2).sum(1))
    return 1 / simpson


def ilisi(neighbors: Neighbors, batch: np.ndarray, perplexity: float | None = None) -> float:
    """Integration LISI, median scaled to [0, 1] (1 = batches fully mixed)."""
    m = np.nanmedian(lisi(neighbors, batch, perplexity))
    return float((m - 1) / (len(np.unique(batch)) - 1))


def clisi(neighbors: Neighbors, labels: np.ndarray, perplexity: float | None = None) -> float:
    """Cell-type LISI, median scaled to [0, 1] (1 = neighbourhoods of one cell type)."""
    m = np.nanmedian(lisi(neighbors, labels, perplexity))
    n = len(np.unique(labels))
    return float((n - m) / (n - 1))


def graph_connectivity(neighbors: Neighbors, labels: np.ndarray) -> float:
    """Mean over labels of (largest connected component of the label's kNN subgraph) / (label size)."""
    graph = neighbors.graph()
    labels = np.asarray(labels)
    shares = []
    for label in np.unique(labels):
        mask = labels == label
        _, comps = connected_components(graph[mask][:, mask], connection="strong")
        counts = np.bincount(comps)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def principal_component_regression(X: np.ndarray, batch: np.ndarray, n_components: int | None = None) -> float:
    """Variance-weighted R² of the principal components of ``X`` regressed on the one-hot batch.

    The R² of a regression on a one-hot batch is the between-batch share of the sum of squares,
    so Σ var_k R²_k / Σ var_k needs only batch means. With all components (the default, as
    scib-metrics) the rotation to principal axes drops out: the score is the between-batch
    share of ``X``'s total sum of squares — O(n·d), no SVD.
    """
    Xc = np.asarray(X, dtype=np.float64)
    Xc = Xc - Xc.mean(0)
    if n_components is not None and n_components < min(Xc.shape):
        U, S, _ = np.linalg.svd(Xc, full_matrices=False)
        Xc = U[:, :n_components] * S[:n_components]
    codes = pd.Categorical(batch).codes.astype(np.int64)
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(codes.max() + 1, len(codes)))
    sums = np.asarray(onehot @ Xc)  # per-batch sums of the centred coordinates
    between = ((sums**2) / np.bincount(codes)[:, None]).sum()
    return float(between / (Xc**2).sum())


def pcr_comparison(X_pre: np.ndarray, X_post: np.ndarray, batch: np.ndarray, n_components: int | None = None) -> float:
    """``(PCR(pre) − PCR(post)) / PCR(pre)``, clipped at 0: the share of batch variance removed."""
    pre = principal_component_regression(X_pre, batch, n_components)
    post = principal_component_regression(X_post, batch, n_components)
    return float(max((pre - post) / pre, 0.0))


def kbet(neighbors: Neighbors, batch: np.ndarray, alpha: float = 0.05) -> tuple[float, np.ndarray, np.ndarray]:
    """kBET (Büttner et al. 2019) as scib-metrics computes it: a χ² test per cell of its neighbours' batch counts.

    Returns
    -------
    The acceptance rate (share of cells with p ≥ ``alpha``), the χ² statistics and the p-values.
    """
    from scipy.special import gammaincc

    codes = pd.Categorical(batch).codes
    n_batches = int(codes.max()) + 1
    expected = np.bincount(codes, minlength=n_batches) / len(codes) * neighbors.indices.shape[1]
    neighbour_codes = codes[neighbors.indices]
    observed = np.stack([(neighbour_codes == b).sum(1) for b in range(n_batches)], axis=1)
    stats = ((observed - expected) ** 2 / expected).sum(1)
    p_values = gammaincc((n_batches - 1) / 2, stats / 2)
    return float((p_values >= alpha).mean()), stats, p_values


def _connectivities(neighbors: Neighbors) -> sp.csr_matrix:
    """UMAP fuzzy-simplicial-set connectivities of a kNN graph (as scanpy and scib-metrics build them)."""
    from umap.umap_ import fuzzy_simplicial_set

    n, k = neighbors.indices.shape
    graph = fuzzy_simplicial_set(sp.coo_matrix((n, 1)), n_neighbors=k, random_state=None, metric=None, knn_indices=neighbors.indices,
                                 knn_dists=neighbors.distances, set_op_mix_ratio=1.0, local_connectivity=1.0)[0]
    return sp.csr_matrix(graph)


def _diffusion_neighbors(connectivities: sp.csr_matrix, k: int, n_comps: int) -> Neighbors:
    """kNN in a multiscale diffusion-map embedding of a connectivity graph (Coifman density normalisation)."""
    from scipy.sparse.linalg import eigsh

    q = np.asarray(connectivities.sum(0)).ravel()
    K = sp.diags(1 / q) @ connectivities @ sp.diags(1 / q)
    z = np.sqrt(np.asarray(K.sum(0)).ravel())
    T = (sp.diags(1 / z) @ K @ sp.diags(1 / z)).astype(np.float64)
    n_comps = min(n_comps, T.shape[0] - 1)
    evals, evecs = eigsh(T, k=n_comps, which="LM", v0=np.ones(T.shape[0]))
    evals = evals.astype(np.float32) + np.float32(1e-8)  # float32 as scanpy: the trivial eigenvalue rounds to exactly 1
    scale = np.divide(evals, 1 - evals, out=evals.copy(), where=evals != 1)
    return knn(evecs.astype(np.float32) * scale, k + 1, method="brute")


def kbet_per_label(neighbors: Neighbors, batch: np.ndarray, labels: np.ndarray, alpha: float = 0.05, diffusion_n_comps: int = 100) -> float:
    """kBET per cell type on diffusion neighbourhoods, averaged over cell types (scib-metrics' ``KBET``).

    For each label: the UMAP connectivities restricted to its cells; labels with fewer than 10
    cells or one batch are skipped; k₀ = clip(⌊mean cells per batch / 4⌋, 10, 70); kBET on the
    k₀ nearest neighbours in a diffusion-map embedding of the label's graph (of its connected
    components of at least 3·k₀ cells, if they hold 75 % of the cells; otherwise 0). Differs from
    scib-metrics only in the neighbour search on the diffusion embedding (exact here,
    NN-descent there) and a fixed start vector for the eigensolver (deterministic).
    """
    codes = np.asarray(pd.Categorical(batch).codes)
    labels = np.asarray(labels)
    conn = _connectivities(neighbors)
    scores = []
    for label in np.unique(labels):
        mask = labels == label
        sub, sub_batch = conn[mask][:, mask], codes[mask]
        if mask.sum() < 10 or len(np.unique(sub_batch)) == 1:
            continue
        k0 = int(min(70, max(10, np.floor(np.mean(np.bincount(sub_batch)[np.bincount(sub_batch) > 0]) / 4))))
        n_comp, comp = connected_components(sub, connection="strong")
        keep = np.arange(mask.sum())
        if n_comp > 1:
            sizes = np.bincount(comp)
            keep = np.flatnonzero(sizes[comp] >= 3 * k0)
            if len(keep) < 0.75 * len(comp):
                scores.append(0.0)
                continue
        sub_keep = sub[keep][:, keep]
        try:
            diffusion = _diffusion_neighbors(sub_keep, k0, min(diffusion_n_comps, sub_keep.shape[0] - 1))
            scores.append(kbet(diffusion, sub_batch[keep], alpha)[0])
        except ValueError:
            scores.append(0.0)
    return float(np.mean(scores)) if scores else float("nan")


def leiden_clusters(connectivities: sp.csr_matrix, resolution: float, seed: int = 42) -> np.ndarray:
    """igraph Leiden (modularity, weighted) on a connectivity graph, seeded as scib-metrics seeds it."""
    import random

    import igraph

    igraph.set_random_number_generator(random.Random(seed))
    graph = igraph.Graph.Weighted_Adjacency(connectivities, mode="directed")
    graph.to_undirected(mode="each")
    return np.asarray(graph.community_leiden(objective_function="modularity", weights="weight", resolution=resolution).membership)


def leiden_sweep(neighbors: Neighbors, labels: np.ndarray, resolutions: Sequence[float] = tuple(0.2 * i for i in range(1, 11)),
                 seed: int = 42) -> dict[str, float]:
    """Leiden NMI / ARI with the resolution chosen by best NMI over a sweep (scib-metrics' ``Leiden NMI`` / ``Leiden ARI``).

    The kNN graph's UMAP connectivities are clustered at each resolution (0.2, 0.4, ..., 2.0).

    Returns
    -------
    ``{"leiden_nmi": ..., "leiden_ari": ..., "leiden_resolution": ...}``
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    conn = _connectivities(neighbors)
    best = {"leiden_nmi": -1.0, "leiden_ari": float("nan"), "leiden_resolution": float("nan")}
    for resolution in resolutions:
        clusters = leiden_clusters(conn, resolution, seed)
        nmi = float(normalized_mutual_info_score(labels, clusters, average_method="arithmetic"))
        if nmi > best["leiden_nmi"]:
            best = {"leiden_nmi": nmi, "leiden_ari": float(adjusted_rand_score(labels, clusters)), "leiden_resolution": float(resolution)}
    return best
