"""Read AnnData files (``.h5ad``, ``.zarr``) and pull out the count / expression matrix, with errors that name the file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.abc import CSRDataset

from scatlas._describe import did_you_mean
from scatlas._errors import ConfigError, InputError


def read_anndata(path: str | os.PathLike[str], backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file or an AnnData ``.zarr`` store.

    Parameters
    ----------
    path
        File (``.h5ad``) or directory (``.zarr``) to read.
    backed
        Leave the matrix on disk, for data larger than memory: an ``.h5ad`` opens in backed
        (read-only) mode; a ``.zarr`` store gets its ``obs`` / ``var`` / ``obsm`` read and its
        ``X``, layers and ``.raw`` opened as lazily read sparse datasets. Either way the validators and
        loaders then read the matrix in row chunks (see :func:`on_disk`).

    Returns
    -------
    The AnnData object, with ``uns['scatlas_source']`` set to the resolved path.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.suffix not in (".h5ad", ".zarr"):
        raise InputError(f"{path}: expected an .h5ad file or a .zarr store")
    if path.suffix == ".h5ad" and path.is_dir():
        raise InputError(f"{path}: is a directory, not an .h5ad file")
    try:
        if path.suffix == ".h5ad":
            adata = ad.read_h5ad(path, backed="r" if backed else None)
        else:
            adata = _lazy_zarr(path) if backed else ad.read_zarr(path)
    except InputError:
        raise
    except Exception as exc:  # h5py / zarr / anndata raise many types for corrupt files
        raise InputError(f"{path}: cannot be read as AnnData ({type(exc).__name__}: {exc})") from exc
    adata.uns["scatlas_source"] = str(path.resolve())
    return adata


def _lazy_zarr(path: Path) -> ad.AnnData:
    """An AnnData ``.zarr`` store with its annotations in memory and its CSR matrices left on disk."""
    import zarr

    root = zarr.open_group(str(path), mode="r")

    def matrix(group: Any) -> Any:
        if group.attrs.get("encoding-type", "") != "csr_matrix":
            raise InputError(f"{path}: {group.name.lstrip('/')} is not a CSR matrix; only CSR matrices of a .zarr store can stay on disk")
        return ad.io.sparse_dataset(group)

    layers = {name: matrix(root["layers"][name]) for name in root["layers"]} if "layers" in root else {}
    parts = {key: ad.io.read_elem(root[key]) for key in ("obs", "var", "obsm", "uns") if key in root}
    raw = {"X": matrix(root["raw"]["X"]), "var": ad.io.read_elem(root["raw"]["var"])} if "raw" in root and "X" in root["raw"] else None
    return ad.AnnData(X=matrix(root["X"]) if "X" in root else None, layers=layers, raw=raw, **parts)


INPUT_KEY = "scatlas_input"
"""``.uns`` key of a results-only file (``scatlas embed`` / ``nmf``) naming the file its cells came from (``path``), so that
``scatlas benchmark`` can compute PCR comparison's unintegrated PCA from that file's matrix."""


def record_input(out: ad.AnnData, adata: ad.AnnData) -> None:
    """Name in ``out.uns[INPUT_KEY]`` the file ``adata`` was read from (nothing for an AnnData made in memory)."""
    if "scatlas_source" in adata.uns:
        out.uns[INPUT_KEY] = {"path": str(adata.uns["scatlas_source"])}


def file_path(adata: ad.AnnData) -> Path:
    """The file or store ``adata`` (or the AnnData it is a view of) was read from: a backed AnnData's
    file, else the path :func:`read_anndata` recorded."""
    if adata.isbacked:
        return Path(adata.filename)
    if "scatlas_source" not in adata.uns:
        raise InputError("<AnnData>: not read from a file (read it with scatlas.data.read_anndata or anndata.read_h5ad(path, backed='r'))")
    return Path(adata.uns["scatlas_source"])


def on_disk(adata: ad.AnnData) -> bool:
    """Whether the matrix of ``adata`` is on disk, read in row chunks: a backed ``.h5ad`` or a ``.zarr`` store
    read by :func:`read_anndata` with ``backed=True``."""
    return adata.isbacked or isinstance(adata.X, CSRDataset)


#: Names that :func:`named` gives in-memory AnnData objects for the duration of one call (by ``id``).
_ROLES: ContextVar[dict[int, str]] = ContextVar("scatlas_roles", default={})


@contextmanager
def named(objects: Iterable[tuple[ad.AnnData, str]]) -> Iterator[None]:
    """Within the block, :func:`source_name` calls each of these AnnData objects by its role (``reference``, ``query 2``).

    For objects read from no file, so that a tool's log lines and errors say which of its inputs they are about.
    """
    token = _ROLES.set({**_ROLES.get(), **{id(adata): role for adata, role in objects}})
    try:
        yield
    finally:
        _ROLES.reset(token)


def source_name(adata: ad.AnnData) -> str:
    """The file an AnnData came from (for error messages), its role in the running tool (:func:`named`), or ``'<AnnData>'``."""
    if adata.isbacked:
        return str(adata.filename)
    return str(adata.uns.get("scatlas_source") or _ROLES.get().get(id(adata), "<AnnData>"))


def view_to_actual(adata: ad.AnnData, log: Callable[[str], None]) -> None:
    """Give a view of an AnnData (a subset of another) data of its own, in place, before a tool writes results into it, with one line to ``log``.

    As scanpy's functions do (anndata would do it at the first write, with a two-line warning
    per write). The AnnData it was taken from is left as it was. A view of a backed AnnData is
    left alone (its copy would need a file).
    """
    if adata.is_view and not adata.isbacked:
        log(f"{source_name(adata)}: a view of another AnnData: given data of its own, in place, to write the results into (as scanpy does)")
        adata._init_as_actual(adata.copy())


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


def check_chunk_size(chunk_size: int) -> None:
    """Refuse a number of cells per chunk under 1, in one line."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size: {chunk_size}; cells read at a time, at least 1")


def cell_chunks(adata: ad.AnnData, chunk_size: int) -> Iterator[ad.AnnData]:
    """The cells of ``adata`` in order: ``chunk_size`` at a time loaded from disk when its matrix is there
    (:func:`on_disk`; never all of them), else ``adata`` itself in one piece."""
    check_chunk_size(chunk_size)
    if not on_disk(adata):
        yield adata
        return
    for start in range(0, adata.n_obs, chunk_size):
        chunk = adata[start : start + chunk_size]
        yield chunk.to_memory() if adata.isbacked else chunk.copy()  # a lazily read .zarr: the copy reads the rows


#: The ``layer`` name that selects ``adata.raw`` (scanpy's ``use_raw``) when no layer has that name.
RAW = "raw"


def uses_raw(adata: ad.AnnData, layer: str | None) -> bool:
    """Whether ``layer`` selects ``adata.raw``: it is :data:`RAW`, the AnnData has ``.raw`` and no layer of that name."""
    return layer == RAW and RAW not in adata.layers and adata.raw is not None


def trained_layer(adata: ad.AnnData, layer: str | None, trained: str | None) -> str | None:
    """The matrix a model reads from ``adata``: ``layer`` if given, else the layer the model was trained on
    (``trained``) when ``adata`` has it (a layer of that name, or ``.raw`` for ``"raw"``), else ``.X``.

    As scvi-tools reads a query from the layer its reference was registered with.
    """
    if layer is not None or trained is None:
        return layer
    return trained if trained in adata.layers or uses_raw(adata, trained) else None


def get_matrix(adata: ad.AnnData, layer: str | None = None) -> sp.csr_matrix | np.ndarray:
    """Return ``adata.X``, ``adata.layers[layer]`` or, for ``layer="raw"``, ``adata.raw.X`` (as stored: sparse or dense).

    ``"raw"`` means ``.raw`` (where scanpy keeps the log-normalised genes before subsetting and
    scaling ``.X``, and CELLxGENE keeps the counts) unless a layer has that name; its genes are
    then ``adata.raw.var_names`` (:func:`get_var`).

    Raises
    ------
    InputError
        If the layer does not exist; the message lists the layers that do.
    """
    if layer is None:
        if adata.X is None:
            raise InputError(f"{source_name(adata)}: .X is empty; pass a layer with the counts")
        return adata.X
    if uses_raw(adata, layer):
        return adata.raw.X
    if layer not in adata.layers:
        raw = " and there is no .raw" if layer == RAW else " ('raw' selects .raw)" if adata.raw is not None else ""
        raise InputError(
            f"{source_name(adata)}: layer {layer!r} not found{raw}{did_you_mean(layer, adata.layers)}; available layers: {sorted(adata.layers)}"
        )
    return adata.layers[layer]


def get_var(adata: ad.AnnData, layer: str | None = None) -> pd.DataFrame:
    """The genes (``var``, index = gene names) of the matrix :func:`get_matrix` returns: ``adata.raw.var`` for ``.raw``, else ``adata.var``."""
    return adata.raw.var if uses_raw(adata, layer) else adata.var


def var_name(adata: ad.AnnData, layer: str | None = None) -> str:
    """How messages name the genes of that matrix: ``.raw.var`` for ``.raw``, else ``.var``."""
    return ".raw.var" if uses_raw(adata, layer) else ".var"


def matrix_name(adata: ad.AnnData, layer: str | None) -> str:
    """How messages name the matrix: ``.X``, ``.raw`` or ``layer 'name'``."""
    return ".X" if layer is None else ".raw" if uses_raw(adata, layer) else f"layer {layer!r}"


def to_csr(matrix: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """Return a float32 CSR copy of an in-memory matrix (dense, CSR, CSC, backed slices)."""
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix, dtype=np.float32)
    return sp.csr_matrix(np.asarray(matrix, dtype=np.float32))


def row_range(matrix: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a matrix; of an in-memory CSR matrix built from slices of its arrays (SciPy's
    ``X[start:stop]`` checks every stored value's column: about 40× slower, 0.2 s per 6M values)."""
    if not (sp.issparse(matrix) and matrix.format == "csr"):
        return matrix[start:stop]
    stop = min(stop, matrix.shape[0])
    lo, hi = matrix.indptr[start], matrix.indptr[stop]
    return sp.csr_matrix((matrix.data[lo:hi], matrix.indices[lo:hi], matrix.indptr[start : stop + 1] - lo), shape=(stop - start, matrix.shape[1]))


def row_view(X: sp.csr_matrix, start: int, stop: int, transposed: bool = False) -> sp.csr_matrix | sp.csc_matrix:
    """Rows ``start:stop`` of a CSR matrix (``transposed``: their transpose, a CSC matrix) on ``X``'s own arrays, with a
    new ``indptr`` only: for reading, never for changing in place. :func:`row_range` goes through SciPy's constructor,
    which (as ``.T``) copies slices under half their array's size (its ``prune``); eight blocks made that way held a
    second copy of a 1M-cell matrix."""
    lo, hi = X.indptr[start], X.indptr[stop]
    shape = (X.shape[1], stop - start) if transposed else (stop - start, X.shape[1])
    view = (sp.csc_matrix if transposed else sp.csr_matrix)(shape, dtype=X.dtype)
    view.data, view.indices, view.indptr = X.data[lo:hi], X.indices[lo:hi], (X.indptr[start : stop + 1] - lo).astype(X.indices.dtype)
    return view


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
