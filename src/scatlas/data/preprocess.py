"""Preprocessing with scanpy's conventions, fitted on training cells only.

Per-cell steps (library-size normalisation, log1p) cannot leak across splits; per-gene
steps (highly variable genes, scaling) are fitted on the training cells of a split and
applied unchanged to its validation and test cells.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

ScaleKind = Literal["none", "maxabs", "standard"]


def normalize_log1p(counts: sp.csr_matrix, target_sum: float = 1e4, copy: bool = True, chunk_size: int = 65_536,
                    totals: np.ndarray | None = None) -> sp.csr_matrix:
    """Library-size normalise each cell to ``target_sum`` and apply ``log1p``.

    Equivalent to ``sc.pp.normalize_total(target_sum=target_sum)`` followed by
    ``sc.pp.log1p``. Cells with zero counts stay zero.

    Parameters
    ----------
    counts
        Cells × genes CSR matrix of counts.
    target_sum
        Total each cell is scaled to.
    copy
        Work on a float32 copy (default); ``False``: in place when ``counts`` is already a float32
        CSR matrix the caller owns (no second matrix in memory).
    chunk_size
        Cells scaled at a time (the per-value factors are never one array the size of the matrix).
    totals
        Each cell's total (default: the row sums of ``counts``): the totals over every gene when
        ``counts`` holds some of them, so that only the genes kept are scaled (the same values).

    Returns
    -------
    A float32 CSR matrix.
    """
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=copy)
    totals = np.asarray(counts.sum(axis=1)).ravel() if totals is None else totals
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    for start in range(0, counts.shape[0], chunk_size):
        stop = min(start + chunk_size, counts.shape[0])
        counts.data[counts.indptr[start] : counts.indptr[stop]] *= np.repeat(scale[start:stop], np.diff(counts.indptr[start : stop + 1])).astype(np.float32)
    np.log1p(counts.data, out=counts.data)
    return counts


def row_blocks(X: Any, rows: np.ndarray | None, chunk_size: int) -> Iterator[sp.csr_matrix]:
    """The cells ``rows`` (sorted; default all) of a matrix or source as CSR blocks of at most ``chunk_size`` cells."""
    from scatlas.data.sources import as_source, read_rows

    source = as_source(X)
    rows = np.arange(source.shape[0]) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
    for start in range(0, len(rows), chunk_size):
        yield sp.csr_matrix(read_rows(source, rows[start : start + chunk_size]))


def map_rows(X: Any, width: int, fn: Callable[[sp.csr_matrix], Any], chunk_size: int = 65_536) -> np.ndarray:
    """``fn`` of every block of ``chunk_size`` cells of a matrix or on-disk source, written into one
    preallocated float32 array of ``width`` columns (so no list of blocks is held beside it)."""
    out, start = np.empty((X.shape[0], width), dtype=np.float32), 0
    for block in row_blocks(X, None, chunk_size):
        out[start : start + block.shape[0]] = fn(block)
        start += block.shape[0]
    return out


def gene_maxabs(X: Any, rows: np.ndarray | None = None, chunk_size: int = 65_536) -> np.ndarray:
    """Largest absolute value of each gene over the cells ``rows`` of a matrix or on-disk source, in one streamed pass
    (:func:`gene_moments`' reading); 0 for a gene never stored."""
    peak = np.zeros(X.shape[1], dtype=np.float64)
    for block in row_blocks(X, rows, chunk_size):
        np.maximum(peak, np.asarray(abs(block).max(axis=0).todense()).ravel(), out=peak)
    return peak


def gene_moments(X: Any, rows: np.ndarray | None = None, expm1: bool = False, chunk_size: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance over the cells ``rows`` of a matrix or on-disk source, in one streamed pass.

    Reads at most ``chunk_size`` of the cells at a time
    (:func:`~scatlas.data.sources.read_rows`), so host memory does not grow with the number of
    cells. Each chunk's moments are computed in float64 as scanpy's sparse mean / variance does
    (mean, then squared deviations of the stored values plus the zeros' share); chunks are merged
    by Chan et al.'s pairwise update, which is as accurate as one pass over all cells.

    Parameters
    ----------
    X
        Cells × genes CSR matrix, or a :class:`~scatlas.data.sources.CSRSource` (``.h5ad`` /
        ``.zarr`` / TileDB-SOMA on disk).
    rows
        Cells to use, in any order (default: all).
    expm1
        Moments of ``expm1(X)`` (what the Seurat dispersion is computed on) instead of ``X``.
    chunk_size
        Cells read per step.

    Returns
    -------
    ``(mean, var)``, float64 arrays over genes; ``var`` with ``n − 1`` in the denominator.
    """
    n_genes = X.shape[1]
    n, mean, m2 = 0, np.zeros(n_genes), np.zeros(n_genes)
    for block in row_blocks(X, rows, chunk_size):
        k = block.shape[0]
        block_mean, block_m2 = _block_moments(block, expm1)
        block_mean -= mean  # now the difference of the means; updated in place, so the merge allocates nothing that outlives the chunk
        total = n + k
        mean += block_mean * (k / total)
        m2 += block_m2
        m2 += block_mean**2 * (n * k / total)
        n = total
    return mean, m2 / max(n - 1, 1)


def _block_moments(block: sp.csr_matrix, expm1: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and sum of squared deviations of one CSR block (float64; zeros included)."""
    values = np.expm1(block.data) if expm1 else block.data
    k, n_genes = block.shape
    block_mean = np.bincount(block.indices, values.astype(np.float64), minlength=n_genes) / k
    deviations = values - block_mean[block.indices]
    stored = np.bincount(block.indices, minlength=n_genes)
    return block_mean, np.bincount(block.indices, deviations**2, minlength=n_genes) + (k - stored) * block_mean**2


def within_class_variance(X: sp.csr_matrix, codes: np.ndarray, chunk_size: int = 65_536) -> np.ndarray:
    """Each gene's variance within the classes ``codes`` of the rows of ``X``, pooled: the squared deviations from
    each class's mean, summed over classes, over ``n − k`` (``n`` cells, ``k`` classes present; 0 when ``n = k``).

    Two passes in float64 over the stored values of ``chunk_size`` cells at a time (so
    temporaries stay the size of a block), as :func:`gene_moments`' blocks: the class means,
    then the stored values' squared deviations from their class's mean plus the zeros' share,
    so no sum of squares cancels against a squared mean.
    """
    X = sp.csr_matrix(X)
    present, where = np.unique(codes, return_inverse=True)
    counts, n_genes = np.bincount(where), X.shape[1]
    size = len(present) * n_genes

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Each block's stored values, their genes, and their (class, gene) cells of a ``classes × genes`` array, flat."""
        for start in range(0, X.shape[0], chunk_size):
            rows = slice(start, min(start + chunk_size, X.shape[0]))
            values = slice(X.indptr[rows.start], X.indptr[rows.stop])
            genes = X.indices[values]
            yield X.data[values].astype(np.float64, copy=False), genes, np.repeat(where[rows], np.diff(X.indptr[rows.start : rows.stop + 1])) * n_genes + genes

    sums, stored = np.zeros(size), np.zeros(size)
    for values, _, cell in blocks():
        sums += np.bincount(cell, values, minlength=size)
        stored += np.bincount(cell, minlength=size)
    means = sums / np.repeat(counts, n_genes)
    within = ((np.repeat(counts, n_genes) - stored) * means**2).reshape(len(present), n_genes).sum(0)
    for values, genes, cell in blocks():
        within += np.bincount(genes, (values - means[cell]) ** 2, minlength=n_genes)
    return within / max(len(codes) - len(present), 1)


def seurat_dispersions(mean: np.ndarray, var: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Normalised dispersions of Seurat v2 (scanpy's ``flavor="seurat"``) from per-gene moments of ``expm1`` of log data.

    ``log(var / mean)`` standardised within ``n_bins`` equal-width bins of ``log1p(mean)``; a gene
    alone in its bin gets 1, a gene of zero dispersion NaN.
    """
    mean = np.where(mean == 0, 1e-12, mean)
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    bins = pd.cut(np.log1p(mean), bins=n_bins)
    stats = pd.Series(dispersion).groupby(bins, observed=True).agg(["mean", "std"])
    alone = stats["std"].isna()
    stats.loc[alone, "std"] = stats.loc[alone, "mean"]
    stats.loc[alone, "mean"] = 0.0
    per_gene = stats.reindex(bins)
    return (dispersion - per_gene["mean"].to_numpy()) / per_gene["std"].to_numpy()


def highly_variable_genes(lognorm: Any, train: np.ndarray, n_top_genes: int, chunk_size: int = 65_536) -> np.ndarray:
    """Indices of the ``n_top_genes`` most variable genes among the training cells.

    scanpy's ``highly_variable_genes`` (flavor ``"seurat"``, on log-normalised values) computed
    from the moments of one streamed pass over the rows ``train`` (:func:`gene_moments`), so
    ``lognorm`` may be an on-disk source that never fits in memory; on the same cells the genes
    equal scanpy's (tested). Genes of zero variance among those cells are left out first; when
    ``n_top_genes`` is at least the number of the others, all of those are kept. Ties at the
    cut-off are all kept, as in scanpy.

    Returns
    -------
    Sorted gene indices (columns of ``lognorm``).
    """
    mean, var = gene_moments(lognorm, train, expm1=True, chunk_size=chunk_size)
    variable = np.flatnonzero(var > 0)
    if n_top_genes >= variable.size:
        return variable
    normalised = seurat_dispersions(mean[variable], var[variable])
    ranked = np.sort(normalised[~np.isnan(normalised)])[::-1]
    cut = ranked[min(n_top_genes, ranked.size) - 1]
    return variable[np.nan_to_num(normalised, nan=-np.inf) >= cut]


@dataclass(frozen=True)
class GenePCA:
    """Principal components of cells × genes, fitted by :func:`fit_gene_pca`.

    Attributes
    ----------
    mean
        Per-gene mean of the fitted cells.
    components
        Components × genes, unit rows, by decreasing variance (signs as scikit-learn's ``svd_flip``:
        each row's largest-magnitude loading is positive).
    explained_variance
        Variance along each component (``n − 1`` in the denominator).
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    def transform(self, X: Any, chunk_size: int = 65_536) -> np.ndarray:
        """Coordinates of every cell of a matrix or on-disk source, read ``chunk_size`` cells at a time (float32)."""
        offset = self.mean @ self.components.T
        return map_rows(X, len(self.components), lambda block: np.asarray(block @ self.components.T) - offset, chunk_size)


def fit_gene_pca(X: Any, n_components: int, rows: np.ndarray | None = None, chunk_size: int = 65_536) -> GenePCA:
    """Exact PCA of the cells ``rows`` of a sparse matrix or on-disk source, from one streamed pass.

    The gene × gene scatter matrix is accumulated in float64 chunk by chunk (sparse products, so
    host memory holds one chunk and a genes² matrix, not the cells), centred, and its leading
    eigenvectors taken: the components of scikit-learn's ``PCA(svd_solver="full")`` on the dense
    centred matrix (tested), with no randomised approximation. Meant for up to a few thousand
    genes (e.g. the highly variable ones).

    Parameters
    ----------
    X
        Cells × genes CSR matrix or :class:`~scatlas.data.sources.CSRSource`.
    n_components
        Components kept (at most the number of genes and of cells − 1).
    rows
        Cells to fit on (default all).
    chunk_size
        Cells read per step.
    """
    n_genes = X.shape[1]
    scatter, total, n = np.zeros((n_genes, n_genes)), np.zeros(n_genes), 0
    for block in row_blocks(X, rows, chunk_size):
        block = block.astype(np.float64)
        scatter += (block.T @ block).toarray()
        total += np.asarray(block.sum(axis=0)).ravel()
        n += block.shape[0]
    k = min(n_components, n_genes, max(n - 1, 1))
    mean = total / max(n, 1)
    covariance = (scatter - n * np.outer(mean, mean)) / max(n - 1, 1)
    values, vectors = np.linalg.eigh(covariance)
    components = vectors[:, ::-1][:, :k].T.copy()
    largest = np.abs(components).argmax(axis=1)
    components *= np.sign(components[np.arange(k), largest])[:, None]
    return GenePCA(mean, components, np.clip(values[::-1][:k], 0, None))


@dataclass
class GeneScaler:
    """Per-gene scaling fitted on training cells.

    ``maxabs`` divides each gene by its largest absolute training value (for non-negative
    log data this is min-max scaling to [0, 1], as in scMEDAL, and keeps sparsity);
    ``standard`` centres and scales to unit variance and clips at ``clip`` (scanpy's
    ``sc.pp.scale``; the result is dense).
    """

    kind: ScaleKind = "none"
    clip: float = 10.0
    center_: np.ndarray | None = None
    scale_: np.ndarray | None = None

    def fit(self, X: sp.csr_matrix) -> GeneScaler:
        """Estimate per-gene statistics on the training matrix ``X``."""
        if self.kind == "maxabs":
            return self._set(None, gene_maxabs(X))
        if self.kind == "standard":
            mean = np.asarray(X.mean(axis=0)).ravel()
            var = np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean**2
            n = X.shape[0]
            return self._set(mean, np.sqrt(np.maximum(var * n / max(n - 1, 1), 0)))
        return self

    def fit_streamed(self, X: Any, rows: np.ndarray, chunk_size: int = 65_536) -> GeneScaler:
        """Estimate the same statistics on the cells ``rows`` of a matrix or on-disk source, ``chunk_size`` cells at a time.

        Equal to :meth:`fit` on those cells up to float rounding (moments merged in float64).
        """
        if self.kind == "maxabs":
            return self._set(None, gene_maxabs(X, rows, chunk_size))
        if self.kind == "standard":
            mean, var = gene_moments(X, rows, chunk_size=chunk_size)
            return self._set(mean, np.sqrt(var))
        return self

    def _set(self, center: np.ndarray | None, spread: np.ndarray) -> GeneScaler:
        """Store the centre and the per-gene divisor (a gene of zero spread is divided by 1)."""
        self.center_ = None if center is None else center.astype(np.float32)
        self.scale_ = np.where(spread > 0, spread, 1.0).astype(np.float32)
        return self

    def transform(self, X: sp.csr_matrix) -> sp.csr_matrix:
        """Apply the fitted scaling; returns CSR (dense data stored as CSR for ``standard``)."""
        if self.kind == "none":
            return X
        if self.kind == "maxabs":
            return sp.csr_matrix(X @ sp.diags(1.0 / self.scale_), dtype=np.float32)
        dense = (X.toarray() - self.center_) / self.scale_
        return sp.csr_matrix(np.clip(dense, -self.clip, self.clip).astype(np.float32))


@dataclass
class ScaledSource:
    """A source whose rows come out scaled by a fitted :class:`GeneScaler`, chunk by chunk (streamed model input)."""

    source: Any
    scaler: GeneScaler

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, genes) of the source."""
        return self.source.shape

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop``, scaled."""
        return self.scaler.transform(self.source.read(start, stop))


@dataclass
class Preprocessed:
    """One split's model input: log-normalised (and scaled) HVG matrix of all cells, or a source of it (streamed)."""

    X: Any
    genes: np.ndarray
    scaler: GeneScaler


def preprocess_split(
    lognorm: Any,
    var_names: np.ndarray,
    train: np.ndarray,
    n_top_genes: int | None,
    scale: ScaleKind = "none",
    columns: np.ndarray | None = None,
) -> Preprocessed:
    """Select HVGs and fit scaling on the training rows, then transform every cell.

    Parameters
    ----------
    lognorm
        Log-normalised cells × genes matrix (all cells of the dataset), or an on-disk source of
        it (:mod:`scatlas.data.sources`): then the genes and the scaling come from streamed
        passes over the training rows and the model input stays a source, each chunk subset and
        scaled as it is read.
    var_names
        Gene names of ``lognorm``'s columns.
    train
        Row indices of the training cells.
    n_top_genes
        Number of highly variable genes (``None`` keeps every gene).
    scale
        Per-gene scaling (see :class:`GeneScaler`).
    columns
        Columns of ``lognorm`` to keep, in this order, instead of choosing them (``n_top_genes`` is
        then not used): e.g. the genes of a model fitted again on more cells.
    """
    if columns is not None:
        genes = np.asarray(columns)
    else:
        genes = np.arange(lognorm.shape[1]) if n_top_genes is None else highly_variable_genes(lognorm, train, n_top_genes)
    if hasattr(lognorm, "read"):  # an on-disk source: streamed
        source = lognorm if len(genes) == lognorm.shape[1] else lognorm.with_genes(genes)
        scaler = GeneScaler(scale).fit_streamed(source, train)
        return Preprocessed(X=source if scale == "none" else ScaledSource(source, scaler), genes=np.asarray(var_names)[genes], scaler=scaler)
    X = lognorm if np.array_equal(genes, np.arange(lognorm.shape[1])) else lognorm[:, genes]  # every gene: no copy
    scaler = GeneScaler(scale) if scale == "none" else GeneScaler(scale).fit(X[train])
    return Preprocessed(X=scaler.transform(X), genes=np.asarray(var_names)[genes], scaler=scaler)

