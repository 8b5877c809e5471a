"""Row-chunk sources of a cells × genes CSR matrix: in memory, or streamed from a backed ``.h5ad`` / ``.zarr`` or TileDB-SOMA.

A source hands out contiguous row ranges (:meth:`CSRSource.read`) as small SciPy CSR matrices,
so a loader can walk a file far larger than memory one chunk at a time with flat host memory.
On-disk sources read the ``indptr`` / ``indices`` / ``data`` arrays of AnnData's CSR encoding
directly (h5py or zarr slices), never the whole matrix, and can normalise each chunk on the fly
(:func:`scatlas.data.normalize_log1p`) and
keep a subset of genes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from scatlas._errors import InputError
from scatlas.data.preprocess import normalize_log1p


@runtime_checkable
class CSRSource(Protocol):
    """Anything that reads contiguous row ranges of a CSR matrix."""

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, genes) after any gene subset."""
        ...

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as float32 CSR."""
        ...


class InMemoryCSR:
    """A SciPy CSR matrix held in memory, seen as a source.

    Parameters
    ----------
    X
        Cells × genes sparse (or dense) matrix; converted to float32 CSR once.
    """

    def __init__(self, X: Any) -> None:
        self.X = sp.csr_matrix(X, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, genes)."""
        return self.X.shape

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` (the matrix itself, not a copy, when all rows are asked for)."""
        return self.X if (start, stop) == (0, self.X.shape[0]) else self.X[start:stop]


class _OnDiskSource:
    """What the on-disk sources share: a lazily opened handle (dropped when pickled), the shape
    after the gene subset, and the per-chunk normalisation and gene subset."""

    _handle: Any = None
    _n_rows: int
    _n_genes_file: int
    normalize: bool
    genes: np.ndarray | None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, genes kept)."""
        return self._n_rows, self._n_genes_file if self.genes is None else len(self.genes)

    def _finish(self, X: sp.csr_matrix) -> sp.csr_matrix:
        """Normalise (when asked) and keep the chosen genes."""
        if self.normalize:
            X = normalize_log1p(X)
        return X if self.genes is None else X[:, self.genes]


class AnnDataCSRSource(_OnDiskSource):
    """Stream the CSR ``X`` (or a layer) of an ``.h5ad`` file or ``.zarr`` store without loading it.

    Parameters
    ----------
    path
        ``.h5ad`` file or ``.zarr`` directory written by AnnData with a CSR matrix.
    layer
        Read ``layers/<layer>`` instead of ``X``.
    normalize
        Apply ``normalize_total(target_sum=1e4)`` + ``log1p`` to every chunk (for raw counts).
    genes
        Column indices to keep (e.g. highly variable genes), in the order given.

    Notes
    -----
    The file is opened lazily in the process that reads (so the source can be pickled into
    DDP worker processes) and kept open for later reads.
    """

    def __init__(self, path: str | Path, layer: str | None = None, normalize: bool = False, genes: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.layer = layer
        self.normalize = normalize
        self.genes = None if genes is None else np.asarray(genes, dtype=np.int64)
        self._handle = None
        group = self._open()
        encoding = group.attrs.get("encoding-type", "") if hasattr(group, "attrs") else ""
        if encoding != "csr_matrix":
            where = f"layers/{layer}" if layer else "X"
            raise InputError(f"{self.path}: {where} is stored as {encoding or 'a dense array'}; streaming needs a CSR matrix (write it with X as scipy.sparse.csr_matrix)")
        n_rows, n_cols = (int(v) for v in group.attrs["shape"])
        self._n_rows, self._n_genes_file = n_rows, n_cols
        if self.genes is not None and (self.genes.min(initial=0) < 0 or self.genes.max(initial=-1) >= n_cols):
            raise InputError(f"{self.path}: gene indices outside 0..{n_cols - 1}")

    def _open(self) -> Any:
        if self._handle is not None:
            return self._handle
        if not self.path.exists():
            raise InputError(f"{self.path}: file not found")
        key = f"layers/{self.layer}" if self.layer else "X"
        if self.path.suffix == ".zarr" or self.path.is_dir():
            import zarr

            root = zarr.open_group(str(self.path), mode="r")
        else:
            import h5py

            root = h5py.File(self.path, "r")
        if key not in root:
            raise InputError(f"{self.path}: no {key!r} in the file")
        self._handle = root[key]
        return self._handle

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as float32 CSR (normalised and gene-subset when asked)."""
        group = self._open()
        indptr = np.asarray(group["indptr"][start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        indices = np.asarray(group["indices"][lo:hi])
        data = np.asarray(group["data"][lo:hi], dtype=np.float32)
        X = sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self._n_genes_file))
        return self._finish(X)


class SomaCSRSource(_OnDiskSource):
    """Stream a layer of a TileDB-SOMA experiment (e.g. a CELLxGENE Census export) in row chunks.

    Needs the optional extra ``scatlas[soma]`` (``tiledbsoma``). Rows are ``soma_joinid`` values
    0 .. n − 1 of ``obs`` (as written by ``tiledbsoma.io.from_anndata``), columns those of ``var``.

    Parameters
    ----------
    uri
        Experiment URI (local path or cloud URI).
    measurement
        Measurement name (``RNA``).
    layer
        ``X`` layer (``data``, ``raw``, ...).
    normalize, genes
        As for :class:`AnnDataCSRSource`.
    """

    def __init__(self, uri: str, measurement: str = "RNA", layer: str = "data", normalize: bool = False, genes: np.ndarray | None = None) -> None:
        try:
            import tiledbsoma
        except ImportError as exc:
            raise InputError("reading TileDB-SOMA needs the optional extra: pip install 'scatlas[soma]'") from exc
        self.uri, self.measurement, self.layer, self.normalize = uri, measurement, layer, normalize
        self.genes = None if genes is None else np.asarray(genes, dtype=np.int64)
        self._handle = None
        try:
            with tiledbsoma.Experiment.open(uri) as exp:
                if measurement not in exp.ms or layer not in exp.ms[measurement].X:
                    raise InputError(f"{uri}: no X layer {measurement}/{layer!r} in the experiment")
                self._n_rows, self._n_genes_file = int(exp.obs.count), int(exp.ms[measurement].var.count)
                self._array_uri = exp.ms[measurement].X[layer].uri
        except tiledbsoma.DoesNotExistError as exc:
            raise InputError(f"{uri}: not a TileDB-SOMA experiment") from exc

    def _open(self) -> Any:
        if self._handle is None:
            import tiledbsoma

            self._handle = tiledbsoma.SparseNDArray.open(self._array_uri)
        return self._handle

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` (joinids) as float32 CSR (normalised and gene-subset when asked)."""
        table = self._open().read(coords=(slice(start, stop - 1),)).tables().concat()
        rows = table.column("soma_dim_0").to_numpy() - start
        cols = table.column("soma_dim_1").to_numpy()
        data = table.column("soma_data").to_numpy().astype(np.float32)
        X = sp.csr_matrix((data, (rows, cols)), shape=(stop - start, self._n_genes_file))
        return self._finish(X)


def read_rows(source: CSRSource, rows: np.ndarray) -> sp.csr_matrix:
    """The CSR rows ``rows`` of ``source`` (in that order), reading windows of at most ``len(rows)`` consecutive rows.

    A sparse selection (e.g. a random 10 % validation set or a gene-selection sample) thus never
    reads a span of the file much larger than what it returns.
    """
    rows = np.asarray(rows, dtype=np.int64)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if hi - lo <= 2 * len(rows):
        X = source.read(lo, hi)
        local = rows - lo
        return X if len(local) == X.shape[0] and np.array_equal(local, np.arange(len(local))) else X[local]
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    parts = []
    for a in range(lo, hi, len(rows)):
        i, j = np.searchsorted(ordered, [a, a + len(rows)])
        if j > i:
            parts.append(source.read(a, min(a + len(rows), hi))[ordered[i:j] - a])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return sp.vstack(parts, format="csr")[inverse]


def as_source(X: Any) -> CSRSource:
    """``X`` if it already is a source, else an :class:`InMemoryCSR` of it."""
    return X if isinstance(X, CSRSource) and not sp.issparse(X) else InMemoryCSR(X)
