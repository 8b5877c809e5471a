"""Read AnnData files and pull out the count / expression matrix, with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from scatlas._errors import InputError


def read_h5ad(path: str | os.PathLike[str], backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file.

    Parameters
    ----------
    path
        File to read.
    backed
        Open in backed (read-only, on-disk) mode for files larger than memory; the
        matrix is then read in row chunks by the validators and loaders.

    Returns
    -------
    The AnnData object, with ``uns['scatlas_source']`` set to the resolved path.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.suffix != ".h5ad":
        raise InputError(f"{path}: expected an .h5ad file")
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types for corrupt files
        raise InputError(f"{path}: cannot be read as AnnData ({type(exc).__name__}: {exc})") from exc
    adata.uns["scatlas_source"] = str(path.resolve())
    return adata


def source_name(adata: ad.AnnData) -> str:
    """The file an AnnData came from (for error messages), or ``'<AnnData>'``."""
    return str(adata.uns.get("scatlas_source", "<AnnData>")) if not adata.isbacked else str(adata.filename)


def get_matrix(adata: ad.AnnData, layer: str | None = None) -> sp.csr_matrix | np.ndarray:
    """Return ``adata.X`` or ``adata.layers[layer]`` (as stored: sparse or dense).

    Raises
    ------
    InputError
        If the layer does not exist; the message lists the layers that do.
    """
    if layer is None:
        if adata.X is None:
            raise InputError(f"{source_name(adata)}: .X is empty; pass a layer with the counts")
        return adata.X
    if layer not in adata.layers:
        raise InputError(
            f"{source_name(adata)}: layer {layer!r} not found; available layers: {sorted(adata.layers)}"
        )
    return adata.layers[layer]


def to_csr(matrix: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """Return a float32 CSR copy of an in-memory matrix (dense, CSR, CSC, backed slices)."""
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix, dtype=np.float32)
    return sp.csr_matrix(np.asarray(matrix, dtype=np.float32))
