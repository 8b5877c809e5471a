"""Data layer: read and validate AnnData, preprocess, split, and stream minibatches.

The minibatch loaders (torch) and the splits load on first use, so reading, validating and
normalising data (``scatlas validate``) imports neither; the splits import scikit-learn only for
k-fold and donor splits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scatlas._lazy import lazy_attributes
from scatlas.data.io import get_matrix, get_var, on_disk, read_anndata, to_csr, write_chunked_h5ad
from scatlas.data.preprocess import GenePCA, GeneScaler, Preprocessed, fit_gene_pca, gene_moments, highly_variable_genes, normalize_log1p, preprocess_split, seurat_dispersions
from scatlas.data.sources import AnnDataCSRSource, CSRSource, InMemoryCSR, SomaCSRSource
from scatlas.data.validate import validate

if TYPE_CHECKING:
    from scatlas.data.loaders import CSRLoader, densify
    from scatlas.data.splits import Split, assignment_table, group_splits, kfold_splits, study_splits

_ON_FIRST_USE = {
    "CSRLoader": "loaders", "densify": "loaders",
    "Split": "splits", "assignment_table": "splits", "group_splits": "splits", "kfold_splits": "splits", "study_splits": "splits",
}

__getattr__ = lazy_attributes(__name__, _ON_FIRST_USE)

__all__ = [
    "AnnDataCSRSource",
    "CSRLoader",
    "CSRSource",
    "GeneScaler",
    "Preprocessed",
    "SomaCSRSource",
    "Split",
    "assignment_table",
    "densify",
    "get_matrix",
    "get_var",
    "group_splits",
    "GenePCA",
    "fit_gene_pca",
    "gene_moments",
    "highly_variable_genes",
    "InMemoryCSR",
    "kfold_splits",
    "normalize_log1p",
    "on_disk",
    "preprocess_split",
    "read_anndata",
    "seurat_dispersions",
    "study_splits",
    "to_csr",
    "validate",
    "write_chunked_h5ad",
]
