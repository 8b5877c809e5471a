"""Read AnnData files and pull out the count / expression matrix, with errors that name the file."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
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


def string_categorical(values: pd.Series) -> pd.Categorical:
    """An obs column as a categorical of its values' strings (``values.astype(str).astype("category")``).

    A categorical column is converted through its categories, without a string per cell (which,
    for millions of cells, costs more memory than the matrix chunks a streamed command holds).
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        column = values.cat.remove_unused_categories()
        codes, names = column.cat.codes.to_numpy(), column.cat.categories.astype(str)
        if names.is_unique and (codes >= 0).all():
            return pd.Categorical.from_codes(codes, categories=names).reorder_categories(sorted(names))
    return pd.Categorical(values.astype(str))


def string_values(values: pd.Series) -> np.ndarray:
    """An obs column's values as an object array of strings; for a categorical column each cell points at its
    category's string (8 bytes per cell) instead of holding a string of its own (``astype(str)``)."""
    return np.asarray(string_categorical(values), dtype=object)


def cell_chunks(adata: ad.AnnData, chunk_size: int) -> Iterator[ad.AnnData]:
    """The cells of ``adata`` in order: ``chunk_size`` at a time loaded from the file of a backed AnnData (never
    all of them), else ``adata`` itself in one piece."""
    if not adata.isbacked:
        yield adata
        return
    for start in range(0, adata.n_obs, chunk_size):
        yield adata[start : start + chunk_size].to_memory()


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


def write_chunked_h5ad(path: str | os.PathLike[str], chunks: Iterable[sp.csr_matrix], obs: pd.DataFrame, var: pd.DataFrame) -> Path:
    """Write an ``.h5ad`` whose CSR ``X`` arrives in row chunks, never holding the whole matrix.

    The result is an ordinary AnnData file (readable by ``anndata.read_h5ad``, backed or not)
    and the streaming format of :class:`~scatlas.data.AnnDataCSRSource`. Written to a temporary
    file and renamed into place.

    Parameters
    ----------
    path
        Output ``.h5ad``.
    chunks
        Consecutive row blocks of X (CSR, same number of columns), ``len(obs)`` rows in total.
    obs, var
        Cell and gene tables (string indices).
    """
    import h5py

    from scatlas._io import atomic_path

    def plain(frame: pd.DataFrame) -> pd.DataFrame:  # object-dtype strings: readable by every anndata version
        out = frame.copy()
        out.index = pd.Index(frame.index.astype(str).to_numpy(dtype=object), dtype=object)
        return out

    with atomic_path(path) as tmp:
        ad.AnnData(obs=plain(obs), var=plain(var)).write_h5ad(tmp)
        with h5py.File(tmp, "a") as f:
            group = f.create_group("X")
            group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array([len(obs), len(var)])})
            data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
            indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
            indptr, rows = [np.zeros(1, dtype=np.int64)], 0
            for chunk in chunks:
                chunk = sp.csr_matrix(chunk, dtype=np.float32)
                if chunk.shape[1] != len(var):
                    raise InputError(f"{path}: a chunk has {chunk.shape[1]} columns, var has {len(var)}")
                lo = data.shape[0]
                data.resize((lo + chunk.nnz,))
                indices.resize((lo + chunk.nnz,))
                data[lo:], indices[lo:] = chunk.data, chunk.indices
                indptr.append(lo + chunk.indptr[1:].astype(np.int64))
                rows += chunk.shape[0]
            if rows != len(obs):
                raise InputError(f"{path}: the chunks hold {rows} rows, obs has {len(obs)}")
            group.create_dataset("indptr", data=np.concatenate(indptr))
    return Path(path)
