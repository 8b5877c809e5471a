"""Preprocessing with scanpy's conventions, fitted on training cells only.

Per-cell steps (library-size normalisation, log1p) cannot leak across splits; per-gene
steps (highly variable genes, scaling) are fitted on the training cells of a split and
applied unchanged to its validation and test cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

ScaleKind = Literal["none", "maxabs", "standard"]


def normalize_log1p(counts: sp.csr_matrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """Library-size normalise each cell to ``target_sum`` and apply ``log1p``.

    Equivalent to ``sc.pp.normalize_total(target_sum=target_sum)`` followed by
    ``sc.pp.log1p``. Cells with zero counts stay zero.

    Parameters
    ----------
    counts
        Cells × genes CSR matrix of counts.
    target_sum
        Total each cell is scaled to.

    Returns
    -------
    A new float32 CSR matrix.
    """
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    counts.data *= np.repeat(scale, np.diff(counts.indptr)).astype(np.float32)
    np.log1p(counts.data, out=counts.data)
    return counts


def highly_variable_genes(lognorm: sp.csr_matrix, train: np.ndarray, n_top_genes: int) -> np.ndarray:
    """Indices of the ``n_top_genes`` most variable genes among the training cells.

    Uses scanpy's ``highly_variable_genes`` (flavor ``"seurat"``, on log-normalised
    values) restricted to the rows ``train``. When ``n_top_genes`` is at least the number
    of genes with non-zero variance, all such genes are kept.

    Returns
    -------
    Sorted gene indices (columns of ``lognorm``).
    """
    sub = lognorm[train]
    mean = np.asarray(sub.mean(axis=0)).ravel()
    sq = np.asarray(sub.multiply(sub).mean(axis=0)).ravel()
    variable = np.flatnonzero(sq - mean**2 > 0)
    if n_top_genes >= variable.size:
        return variable
    tmp = ad.AnnData(sub[:, variable])
    sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat", subset=False)
    return variable[np.flatnonzero(tmp.var["highly_variable"].to_numpy())]


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
            peak = np.asarray(abs(X).max(axis=0).todense()).ravel()
            self.scale_ = np.where(peak > 0, peak, 1.0).astype(np.float32)
        elif self.kind == "standard":
            mean = np.asarray(X.mean(axis=0)).ravel()
            var = np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean**2
            n = X.shape[0]
            sd = np.sqrt(np.maximum(var * n / max(n - 1, 1), 0))
            self.center_ = mean.astype(np.float32)
            self.scale_ = np.where(sd > 0, sd, 1.0).astype(np.float32)
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
class Preprocessed:
    """One split's model input: log-normalised (and scaled) HVG matrix of all cells."""

    X: sp.csr_matrix
    genes: np.ndarray
    scaler: GeneScaler


def preprocess_split(
    lognorm: sp.csr_matrix,
    var_names: np.ndarray,
    train: np.ndarray,
    n_top_genes: int | None,
    scale: ScaleKind = "none",
) -> Preprocessed:
    """Select HVGs and fit scaling on the training rows, then transform every cell.

    Parameters
    ----------
    lognorm
        Log-normalised cells × genes matrix (all cells of the dataset).
    var_names
        Gene names of ``lognorm``'s columns.
    train
        Row indices of the training cells.
    n_top_genes
        Number of highly variable genes (``None`` keeps every gene).
    scale
        Per-gene scaling (see :class:`GeneScaler`).
    """
    genes = (
        np.arange(lognorm.shape[1]) if n_top_genes is None else highly_variable_genes(lognorm, train, n_top_genes)
    )
    X = lognorm[:, genes]
    scaler = GeneScaler(scale).fit(X[train])
    return Preprocessed(X=scaler.transform(X), genes=np.asarray(var_names)[genes], scaler=scaler)

