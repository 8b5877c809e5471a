"""Data layer: read and validate AnnData, preprocess, split, and stream minibatches."""

from scatlas.data.io import get_matrix, read_h5ad, to_csr
from scatlas.data.loaders import CSRLoader, densify, gather_rows
from scatlas.data.preprocess import GeneScaler, Preprocessed, highly_variable_genes, normalize_log1p, preprocess_split
from scatlas.data.splits import Split, assignment_table, group_splits, kfold_splits, study_splits
from scatlas.data.validate import validate

__all__ = [
    "CSRLoader",
    "GeneScaler",
    "Preprocessed",
    "Split",
    "assignment_table",
    "densify",
    "gather_rows",
    "get_matrix",
    "group_splits",
    "highly_variable_genes",
    "kfold_splits",
    "normalize_log1p",
    "preprocess_split",
    "read_h5ad",
    "study_splits",
    "to_csr",
    "validate",
]
