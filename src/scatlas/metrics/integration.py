"""Integration metrics on one shared kNN graph, with scib-metrics' definitions.

* :func:`knn` — kNN (exact brute force in torch on a GPU; scikit-learn or pynndescent on a CPU),
  self included as the first neighbour; pass the same result to every graph metric (or your own
  precomputed one).
* :func:`lisi` — local inverse Simpson index per cell (Korsunsky et al. 2019): a Gaussian kernel
  on kNN distances calibrated per cell to ``perplexity`` (entropy matched to tol 1e-5 by Newton
  steps safeguarded by the reference's bisection, self excluded), then ``1 / Σ_label p_label²``. :func:`ilisi` / :func:`clisi`: the
  median, scaled as scib (``(m − 1)/(B − 1)`` and ``(L − m)/(L − 1)``).
* :func:`graph_connectivity` — mean over labels of the largest connected component's share.
* :func:`kbet` / :func:`kbet_per_label` — kBET acceptance rate (χ² test of each cell's neighbours'
  batch counts), per cell type on diffusion-map neighbourhoods of the label's UMAP
  connectivities (scib-metrics' ``KBET``; its default uses the 50 nearest neighbours).
* :func:`leiden_sweep` — Leiden NMI / ARI at the best-NMI resolution (scib-metrics' ``Leiden``).
* :func:`pcr_comparison` — ``(PCR_pre − PCR_post) / PCR_pre`` (clipped at 0), PCR = variance-weighted
  R² of the principal components regressed on the one-hot batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors

from scatlas.metrics._device import metric_device
from scatlas.metrics._forked import forked_map

if TYPE_CHECKING:
    import igraph


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
        device: str | torch.device | None = None, chunk_size: int | None = None) -> Neighbors:
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
        Query rows per matrix product in ``brute`` (default: about 256 MB of distances at a time).
    """
    k = min(k, len(X))
    dev = metric_device(device)
    if method == "auto":
        method = "brute" if dev.type == "cuda" else "sklearn" if len(X) <= 100_000 else "pynndescent"
    if method == "brute":
        return _brute_knn(X, k, dev, chunk_size or max(1, 2**26 // len(X)))
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


def _brute_knn(X: np.ndarray, k: int, device: torch.device, chunk_size: int, margin: int = 8, rows: np.ndarray | None = None) -> Neighbors:
    """Exact kNN by chunked ``‖a‖² − 2ab + ‖b‖²`` and ``topk`` (of the cells ``rows`` only, when given; self first).

    Candidates come from one float32 product per chunk on centred data (twice the throughput of
    float64), ranked by ``‖b‖² − 2a·b`` through augmented matrices ``[a, 1]·[−2b, ‖b‖²]ᵀ``;
    the ``k + margin`` best are re-ranked by their exact float64 distances, so float32 rounding
    cannot swap neighbours whose distances differ by more than ~1e-6 of their size.
    """
    X64 = torch.as_tensor(np.asarray(X, dtype=np.float64), device=device)
    X64 = X64 - X64.mean(0)
    Y = X64.float()
    # ‖b‖² − 2a·b ranks the neighbours of a (‖a‖² is constant per row): one product of augmented matrices
    queries = torch.cat([Y, torch.ones(len(Y), 1, device=device)], 1)
    keys = torch.cat([-2 * Y, Y.pow(2).sum(1, keepdim=True)], 1)
    width = min(k + margin, len(Y))
    row_t = torch.arange(len(Y), device=device) if rows is None else torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
    indices, distances = [], []
    for a in range(0, len(row_t), chunk_size):
        own = row_t[a : a + chunk_size]
        scores = queries[own] @ keys.T
        scores[torch.arange(len(own), device=device), own] = -torch.inf  # self first
        candidates = torch.topk(scores, width, dim=1, largest=False).indices
        exact = (X64[candidates] - X64[own, None]).pow(2).sum(2)
        exact[candidates == own[:, None]] = -1.0  # self first, also before exact duplicates
        best, order = torch.topk(exact, k, dim=1, largest=False)
        indices.append(candidates.gather(1, order).cpu())
        distances.append(best.clamp_min_(0).sqrt_().cpu())
    return Neighbors(torch.cat(indices).numpy().astype(np.int64), torch.cat(distances).numpy())


def _calibrated_probabilities(distances: np.ndarray, mask: np.ndarray, perplexity: float, tol: float = 1e-5, max_tries: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Per-row Gaussian kernel probabilities whose entropy matches ``log(perplexity)``.

    Solves ``H(β) = log(perplexity)`` per row by safeguarded Newton steps in ``log β``
    (``dH/dlog β = −β²·Var_P(d)``), started at ``β = 1 / sd(d)``, inside the bisection bracket of
    harmony / scib-metrics: a step that leaves the bracket is replaced by the bisection step, so
    convergence is never slower than bisection and usually takes three or four steps instead of
    ~10. Each step recomputes only the rows that have not converged yet (|H − target| <
    ``tol``, as the reference).
    """
    n = distances.shape[0]
    count = np.maximum(mask.sum(1), 1)  # the start only needs to be close: self (distance 0) is not masked out here
    mean = distances.sum(1) / count
    spread = np.sqrt(np.maximum(np.einsum("ij,ij->i", distances, distances) / count - mean**2, 0.0))
    beta = 1 / np.where(spread > 0, spread, 1.0)
    low, high = np.full(n, -np.inf), np.full(n, np.inf)
    target = np.log(perplexity)
    masked = np.where(mask, distances, np.inf)  # exp(−∞) = 0 drops excluded neighbours

    def entropy(rows: np.ndarray | slice, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = distances[rows]
        P = np.multiply(masked[rows], -b[:, None])
        np.exp(P, out=P)
        total = P.sum(1)
        safe = np.where(total > 0, total, 1.0)
        P /= safe[:, None]
        mean = np.einsum("ij,ij->i", d, P)
        H = np.where(total > 0, np.log(safe) + b * mean, 0.0)
        return H, P, np.einsum("ij,ij,ij->i", d, d, P) - mean**2

    H, P, var = entropy(slice(None), beta)
    active = np.flatnonzero(np.abs(H - target) >= tol)
    for _ in range(max_tries):
        if not len(active):
            break
        b, lo, hi, excess = beta[active], low[active], high[active], H[active] - target
        up = excess > 0
        lo, hi = np.where(up, b, lo), np.where(up, hi, b)
        bisect = np.where(up, np.where(hi == np.inf, b * 2, (b + hi) / 2), np.where(lo == -np.inf, b / 2, (b + lo) / 2))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            newton = b * np.exp(excess / (b * b * var[active]))
        inside = np.isfinite(newton) & (newton > np.maximum(lo, 0)) & (newton < hi)
        low[active], high[active], beta[active] = lo, hi, np.where(inside, newton, bisect)
        H[active], P[active], var[active] = entropy(active, beta[active])
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


def principal_component_regression(X: np.ndarray, batch: np.ndarray, n_components: int | None = None, categorical: bool = True) -> float:
    """Variance-weighted R² of the principal components of ``X`` regressed on the batch (or a continuous covariate).

    The R² of a regression on a one-hot batch is the between-batch share of the sum of squares,
    so Σ var_k R²_k / Σ var_k needs only batch means. With all components (the default, as
    scib-metrics) the rotation to principal axes drops out: the score is the between-batch
    share of ``X``'s total sum of squares — O(n·d), no SVD. With ``categorical=False`` the
    covariate is one numeric column (scib-metrics' function default; its Benchmarker passes
    ``categorical=True``, our default): the score is ``‖Xᵀc‖² / (‖c‖² ‖X‖²)`` for centred
    ``X`` and ``c``.
    """
    Xc = np.asarray(X, dtype=np.float64)
    Xc = Xc - Xc.mean(0)
    if n_components is not None and n_components < min(Xc.shape):
        U, S, _ = np.linalg.svd(Xc, full_matrices=False)
        Xc = U[:, :n_components] * S[:n_components]
    if not categorical:
        c = np.asarray(batch, dtype=np.float64).ravel()
        c = c - c.mean()
        return float(((Xc.T @ c) ** 2).sum() / ((c @ c) * (Xc**2).sum()))
    codes = pd.Categorical(batch).codes.astype(np.int64)
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(codes.max() + 1, len(codes)))
    sums = np.asarray(onehot @ Xc)  # per-batch sums of the centred coordinates
    between = ((sums**2) / np.bincount(codes)[:, None]).sum()
    return float(between / (Xc**2).sum())


def pcr_comparison(X_pre: np.ndarray, X_post: np.ndarray, batch: np.ndarray, n_components: int | None = None, categorical: bool = True) -> float:
    """``(PCR(pre) − PCR(post)) / PCR(pre)``, clipped at 0: the share of batch variance removed.

    ``categorical`` as in :func:`principal_component_regression` (``True``: one-hot batch, as
    scib-metrics' Benchmarker; ``False``: a numeric covariate, scib-metrics' function default).
    """
    pre = principal_component_regression(X_pre, batch, n_components, categorical)
    post = principal_component_regression(X_post, batch, n_components, categorical)
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


def _smooth_knn_scales(distances: np.ndarray, n_iter: int = 64, tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's per-cell ``(σ, ρ)`` (``smooth_knn_dist``, local connectivity 1), vectorised over cells.

    ``ρ`` is the distance to the nearest other cell; ``σ`` is bisected (from 1, doubling while
    unbounded) until ``Σ_j exp(−max(d_j − ρ, 0) / σ) = log₂ k`` over all but the first column,
    then floored at 1e-3 × the cell's (or, if ρ = 0, the global) mean distance.
    """
    n, k = distances.shape
    target = np.log2(k)
    positive = np.where(distances > 0, distances, np.inf).min(1)
    rho = np.where(np.isfinite(positive), positive, 0.0).astype(np.float32)
    excess = (distances[:, 1:] - rho[:, None]).astype(np.float64)
    excess[excess <= 0] = 0.0  # exp(−0) = 1: UMAP counts these neighbours fully
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    active = np.arange(n)
    for _ in range(n_iter):
        psum = np.exp(-excess[active] / mid[active, None]).sum(1)
        done = np.abs(psum - target) < tol
        over = psum > target
        hi[active] = np.where(over, mid[active], hi[active])
        lo[active] = np.where(over, lo[active], mid[active])
        step = np.where(np.isinf(hi[active]), mid[active] * 2, (lo[active] + hi[active]) / 2)
        mid[active] = np.where(done, mid[active], step)
        active = active[~done]
        if not len(active):
            break
    floor = 1e-3 * np.where(rho > 0, distances.mean(1), distances.mean())
    return np.maximum(mid.astype(np.float32), floor.astype(np.float32)), rho


def _connectivities(neighbors: Neighbors) -> sp.csr_matrix:
    """UMAP fuzzy-simplicial-set connectivities of a kNN graph (as scanpy and scib-metrics build them).

    ``w_ij = exp(−max(d_ij − ρ_i, 0) / σ_i)`` (self-loops dropped), symmetrised by the fuzzy union
    ``W + Wᵀ − W ∘ Wᵀ``; the same computation as ``umap.umap_.fuzzy_simplicial_set`` in NumPy,
    without its JIT compilation on first use.
    """
    n, k = neighbors.indices.shape
    distances = neighbors.distances.astype(np.float32)
    sigma, rho = _smooth_knn_scales(distances)
    excess = distances - rho[:, None]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        weights = np.where((excess <= 0) | (sigma[:, None] == 0), 1.0, np.exp(-excess / sigma[:, None])).astype(np.float32)
    rows = np.repeat(np.arange(n), k)
    weights[neighbors.indices == np.arange(n)[:, None]] = 0.0
    W = sp.csr_matrix((weights.ravel(), (rows, neighbors.indices.ravel())), shape=(n, n))
    W.eliminate_zeros()
    union = W + W.T - W.multiply(W.T)
    union.eliminate_zeros()
    return sp.csr_matrix(union)


def _diffusion_neighbors(connectivities: sp.csr_matrix, k: int, n_comps: int, rows: np.ndarray | None = None,
                         dtype: type[np.floating] = np.float32) -> Neighbors:
    """kNN in a multiscale diffusion-map embedding of a connectivity graph (Coifman density normalisation), of the cells ``rows`` (default all).

    The ``n_comps`` eigenpairs of largest magnitude of the symmetric transition matrix ``T`` come
    from ARPACK in ``dtype``. In float32 (half the memory traffic of the re-orthogonalisation that
    dominates the solve) ARPACK finds the largest eigenvalues of ``T²`` instead, the same
    eigenvectors (those of ``T``'s largest magnitudes, both ends of its spectrum) in about a third
    fewer Lanczos steps, since squaring widens the gaps near 1 relative to the spread. They are then
    refined by one float64 Rayleigh–Ritz step with ``T`` on the span of the float32 eigenvectors
    and the trivial eigenvector ``√degree`` (known exactly), which restores each eigenvalue's sign
    and makes the eigenvalues near 1, whose weights λ/(1 − λ) decide the neighbourhoods,
    float64-accurate.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    q = np.asarray(connectivities.sum(0)).ravel()
    K = sp.diags(1 / q) @ connectivities @ sp.diags(1 / q)
    z = np.sqrt(np.asarray(K.sum(0)).ravel())
    T = (sp.diags(1 / z) @ K @ sp.diags(1 / z)).astype(np.float64)
    n_comps = min(n_comps, T.shape[0] - 1)
    if dtype == np.float64:
        evals, evecs = eigsh(T, k=n_comps, which="LM", v0=np.ones(T.shape[0]))
    else:
        low = T.astype(dtype)
        squared = LinearOperator(T.shape, matvec=lambda x: low @ (low @ x), dtype=dtype)
        _, approx = eigsh(squared, k=n_comps, which="LA", v0=np.ones(T.shape[0], dtype=dtype))
        basis = np.linalg.qr(np.column_stack([z / np.linalg.norm(z), approx.astype(np.float64)]))[0]
        ritz, rotation = np.linalg.eigh(basis.T @ (T @ basis))
        top = np.sort(np.argsort(-np.abs(ritz), kind="stable")[:n_comps])
        evals, evecs = ritz[top], basis @ rotation[:, top]
    evals = evals.astype(np.float32) + np.float32(1e-8)  # float32 as scanpy: the trivial eigenvalue rounds to exactly 1
    scale = np.divide(evals, 1 - evals, out=evals.copy(), where=evals != 1)
    embedding = evecs.astype(np.float32) * scale
    return _brute_knn(embedding, min(k + 1, len(embedding)), metric_device(None), max(1, 2**26 // len(embedding)), rows=rows)


def kbet_per_label(neighbors: Neighbors, batch: np.ndarray, labels: np.ndarray, alpha: float = 0.05, diffusion_n_comps: int = 100,
                   sample_size: int | None = None, seed: int = 0, n_jobs: int | None = None,
                   diffusion_dtype: type[np.floating] = np.float64) -> float:
    """kBET per cell type on diffusion neighbourhoods, averaged over cell types (scib-metrics' ``KBET``).

    For each label: the UMAP connectivities restricted to its cells; labels with fewer than 10
    cells or one batch are skipped; k₀ = clip(⌊mean cells per batch / 4⌋, 10, 70); kBET on the
    k₀ nearest neighbours in a diffusion-map embedding of the label's graph (of its connected
    components of at least 3·k₀ cells, if they hold 75 % of the cells; otherwise 0). Differs from
    scib-metrics only in the neighbour search on the diffusion embedding (exact here,
    NN-descent there) and a fixed start vector for the eigensolver (deterministic).

    ``diffusion_dtype=np.float32`` runs each label's eigensolve in single precision on the squared
    transition matrix and refines its eigenpairs by a float64 Rayleigh–Ritz step: more than twice
    as fast at atlas scale, where the solve is bound by the memory traffic of ARPACK's
    re-orthogonalisation, and tested to give the float64 score within 1e-3. The default, ``np.float64``, is scib-metrics' computation.

    ``sample_size`` tests only a stratified random sample of cells of each label
    (:func:`~scatlas.metrics.sampling.sample_rows`; their neighbours are still searched among
    all of the label's cells), as the original kBET tests a random ``testSize`` share of cells:
    the acceptance rate is then an estimate, at a cost of ``quota × n_label`` instead of
    ``n_label²`` diffusion-space distances. ``None`` (default): every cell, exact.

    The labels run on ``n_jobs`` forked processes (default: every usable CPU), largest first, each
    worker with one BLAS thread; with ``n_jobs=1`` they run here on this process's BLAS threads, whose
    rounding can move the score slightly (4e-5 seen at 100,000 cells; equal on small data).
    """
    from scatlas.metrics.sampling import sample_rows

    labels = np.asarray(labels)
    state = _KbetInputs(_connectivities(neighbors), np.asarray(pd.Categorical(batch).codes), labels,
                        sample_rows(labels, sample_size, seed), alpha, diffusion_n_comps, diffusion_dtype)
    names, sizes = np.unique(labels, return_counts=True)
    order = np.argsort(-sizes, kind="stable")  # largest first: the longest eigensolves start at once
    by_label = dict(zip(names[order], forked_map(_kbet_of_label, list(names[order]), state, n_jobs), strict=True))
    scores = [by_label[name] for name in names if by_label[name] is not None]  # label order: the mean does not depend on the schedule
    return float(np.mean(scores)) if scores else float("nan")


@dataclass(frozen=True)
class _KbetInputs:
    """What every label's kBET reads: the whole graph's connectivities, batch codes, labels, sampled rows (or None), settings."""

    connectivities: sp.csr_matrix
    codes: np.ndarray
    labels: np.ndarray
    sampled: np.ndarray | None
    alpha: float
    n_comps: int
    dtype: type[np.floating]


def _kbet_of_label(inputs: _KbetInputs, label: object) -> float | None:
    """kBET acceptance rate of one label's cells (see :func:`kbet_per_label`); None when the label is skipped."""
    mask = inputs.labels == label
    sub, sub_batch = inputs.connectivities[mask][:, mask], inputs.codes[mask]
    if mask.sum() < 10 or len(np.unique(sub_batch)) == 1:
        return None
    counts = np.bincount(sub_batch)
    k0 = int(min(70, max(10, np.floor(np.mean(counts[counts > 0]) / 4))))
    n_comp, comp = connected_components(sub, connection="strong")
    keep = np.arange(mask.sum())
    if n_comp > 1:
        keep = np.flatnonzero(np.bincount(comp)[comp] >= 3 * k0)
        if len(keep) < 0.75 * len(comp):
            return 0.0
    sub_keep = sub[keep][:, keep]
    members = np.flatnonzero(mask)[keep]
    queries = None if inputs.sampled is None else np.flatnonzero(np.isin(members, inputs.sampled, assume_unique=True))
    try:
        diffusion = _diffusion_neighbors(sub_keep, k0, min(inputs.n_comps, sub_keep.shape[0] - 1), queries, inputs.dtype)
        return kbet(diffusion, sub_batch[keep], inputs.alpha)[0]
    except ValueError:
        return 0.0


def leiden_clusters(connectivities: sp.csr_matrix | igraph.Graph, resolution: float, seed: int = 42) -> np.ndarray:
    """igraph Leiden (modularity, weighted) on a connectivity graph, seeded as scib-metrics seeds it.

    ``connectivities`` may be the sparse matrix or the graph :func:`leiden_graph` built from it
    (build once when clustering at several resolutions).
    """
    import random

    import igraph

    graph = connectivities if isinstance(connectivities, igraph.Graph) else leiden_graph(connectivities)
    igraph.set_random_number_generator(random.Random(seed))
    return np.asarray(graph.community_leiden(objective_function="modularity", weights="weight", resolution=resolution).membership)


def leiden_graph(connectivities: sp.csr_matrix) -> igraph.Graph:
    """The weighted igraph graph scib-metrics clusters: the connectivities as a directed graph made undirected edge by edge."""
    import igraph

    graph = igraph.Graph.Weighted_Adjacency(connectivities, mode="directed")
    graph.to_undirected(mode="each")
    return graph


def _cluster_at(graph: igraph.Graph, resolution_seed: tuple[float, int]) -> np.ndarray:
    return leiden_clusters(graph, *resolution_seed)


def leiden_sweep(neighbors: Neighbors, labels: np.ndarray, resolutions: Sequence[float] = tuple(2 * i / 10 for i in range(1, 11)),
                 seed: int = 42, n_jobs: int | None = None) -> dict[str, float]:
    """Leiden NMI / ARI with the resolution chosen by best NMI over a sweep (scib-metrics' ``Leiden NMI`` / ``Leiden ARI``).

    The kNN graph's UMAP connectivities are clustered at each resolution (0.2, 0.4, ..., 2.0),
    the resolutions in parallel on ``n_jobs`` processes (default: every usable CPU; processes, as
    igraph holds the GIL). Each run is seeded on its own, so the result does not depend on ``n_jobs``.

    Returns
    -------
    ``{"leiden_nmi": ..., "leiden_ari": ..., "leiden_resolution": ...}``
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    graph = leiden_graph(_connectivities(neighbors))
    best = {"leiden_nmi": -1.0, "leiden_ari": float("nan"), "leiden_resolution": float("nan")}
    for resolution, clusters in zip(resolutions, forked_map(_cluster_at, [(r, seed) for r in resolutions], graph, n_jobs), strict=True):
        nmi = float(normalized_mutual_info_score(labels, clusters, average_method="arithmetic"))
        if nmi > best["leiden_nmi"]:
            best = {"leiden_nmi": nmi, "leiden_ari": float(adjusted_rand_score(labels, clusters)), "leiden_resolution": float(resolution)}
    return best
