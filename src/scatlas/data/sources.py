"""Row-chunk sources of a cells × genes CSR matrix: in memory, or streamed from a backed ``.h5ad`` / ``.zarr`` or TileDB-SOMA.

A source hands out contiguous row ranges (:meth:`CSRSource.read`) as small SciPy CSR matrices,
so a loader can walk a file far larger than memory one chunk at a time with flat host memory.
On-disk sources read the ``indptr`` / ``indices`` / ``data`` arrays of AnnData's CSR encoding
directly (h5py or zarr slices), never the whole matrix, and can normalise each chunk on the fly
(:func:`scatlas.data.normalize_log1p`) and
keep a subset of genes.

For the loader, :meth:`read_window` hands out rows as stored (before normalisation and gene
subset, which the loader then applies on the training device) and can write them straight into
buffers the caller allocates (pinned memory for a GPU). From an uncompressed ``.h5ad`` it
bypasses h5py: the byte ranges of the stored arrays are read with ``os.preadv`` from several
threads, which release the GIL, so a prefetch thread does not stall the training loop.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from scatlas._errors import InputError
from scatlas._threads import Workers, usable_cpus
from scatlas.data.io import RAW, row_range
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


Empty = Callable[[str, int, np.dtype], np.ndarray]
"""``empty(name, n, dtype)``: a caller-owned 1-D buffer where a source may read the window's ``"indices"`` or ``"data"``."""


@dataclass
class CSRWindow:
    """Rows ``start:stop`` of a source as stored: not normalised, every stored gene.

    ``indptr`` (int64) starts at 0; ``data`` is float32; ``indices`` keeps the stored integer type.
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


def _window(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> CSRWindow:
    """CSR arrays (``indptr`` from 0) as a window."""
    return CSRWindow(indptr.astype(np.int64, copy=False), indices, data.astype(np.float32, copy=False))


class InMemoryCSR:
    """A SciPy CSR matrix held in memory, seen as a source.

    Parameters
    ----------
    X
        Cells × genes sparse (or dense) matrix; converted to float32 CSR once.
    """

    normalize = False  # rows are used as they are: no per-chunk normalisation
    genes = None  # a gene subset is applied once, by with_genes

    def __init__(self, X: Any) -> None:
        self.X = sp.csr_matrix(X, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, genes)."""
        return self.X.shape

    @property
    def stored_shape(self) -> tuple[int, int]:
        """(cells, genes) as stored (no gene subset)."""
        return self.X.shape

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` (the matrix itself, not a copy, when all rows are asked for)."""
        return self.X if (start, stop) == (0, self.X.shape[0]) else row_range(self.X, start, stop)

    def with_genes(self, genes: np.ndarray) -> InMemoryCSR:
        """A copy keeping only the columns ``genes`` (as the on-disk sources' ``with_genes``)."""
        return InMemoryCSR(self.X[:, np.asarray(genes, dtype=np.int64)])

    def read_window(self, start: int, stop: int, empty: Empty | None = None) -> CSRWindow:
        """Rows ``start:stop`` as a :class:`CSRWindow` of views of the matrix (``empty`` is not used)."""
        indptr = self.X.indptr[start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        return _window(indptr - lo, self.X.indices[lo:hi], self.X.data[lo:hi])


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

    @property
    def stored_shape(self) -> tuple[int, int]:
        """(cells, genes) as stored (before the gene subset)."""
        return self._n_rows, self._n_genes_file

    def _read_stored(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as stored (float32 CSR, all genes, not normalised), in arrays of its own (the caller may change them)."""
        raise NotImplementedError

    def with_genes(self, genes: np.ndarray) -> _OnDiskSource:
        """The same file keeping only the columns ``genes`` of what this source reads (composed with its own subset)."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__getstate__())
        genes = np.asarray(genes, dtype=np.int64)
        copy.genes = genes if self.genes is None else self.genes[genes]
        return copy

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as float32 CSR (normalised and gene-subset when asked)."""
        X = self._read_stored(start, stop)  # a fresh matrix: normalised in place
        totals = np.asarray(X.sum(axis=1)).ravel() if self.normalize else None  # over every stored gene
        if self.genes is not None:
            X = X[:, self.genes]  # first: only the genes kept are scaled
        return normalize_log1p(X, copy=False, totals=totals) if self.normalize else X

    def read_window(self, start: int, stop: int, empty: Empty | None = None) -> CSRWindow:
        """Rows ``start:stop`` as stored (see :class:`CSRWindow`; ``empty`` is not used here)."""
        X = self._read_stored(start, stop)
        return _window(X.indptr, X.indices, X.data)


class AnnDataCSRSource(_OnDiskSource):
    """Stream the CSR ``X`` (or a layer) of an ``.h5ad`` file or ``.zarr`` store without loading it.

    Parameters
    ----------
    path
        ``.h5ad`` file or ``.zarr`` directory written by AnnData with a CSR matrix.
    layer
        Read ``layers/<layer>`` instead of ``X``; ``"raw"`` reads ``raw/X`` when the file has no
        layer of that name (as :func:`~scatlas.data.io.get_matrix`).
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
        self._extents: dict[str, _Extents] | None = None
        group = self._open()
        encoding = group.attrs.get("encoding-type", "") if hasattr(group, "attrs") else ""
        if encoding != "csr_matrix":
            where = group.name.lstrip("/")
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
        if self.path.suffix == ".zarr" or self.path.is_dir():
            import zarr

            root = zarr.open_group(str(self.path), mode="r")
        else:
            import h5py

            root = h5py.File(self.path, "r")
        key = f"layers/{self.layer}" if self.layer else "X"
        if self.layer == RAW and key not in root and "raw/X" in root:
            key = "raw/X"
        if key not in root:
            raise InputError(f"{self.path}: no {key!r} in the file")
        self._handle = root[key]
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_extents"] = None
        return state

    def _read_stored(self, start: int, stop: int) -> sp.csr_matrix:
        window = self.read_window(start, stop)
        return sp.csr_matrix((window.data, window.indices, window.indptr), shape=(stop - start, self._n_genes_file))

    def _raw_arrays(self) -> dict[str, _Extents] | None:
        """Byte extents of ``indices`` and ``data`` when both can be read around h5py (else ``None``)."""
        if self._extents is None:
            group = self._open()
            found = {name: _Extents.of(group[name], self.path) for name in ("indices", "data")} if hasattr(group, "id") else {}
            usable = found and all(found.values()) and found["indices"].dtype in (np.int32, np.int64)
            self._extents = found if usable else {}
        return self._extents or None

    def read_window(self, start: int, stop: int, empty: Empty | None = None) -> CSRWindow:
        """Rows ``start:stop`` as stored (see :class:`CSRWindow`).

        From an uncompressed HDF5 file the ``indices`` and ``data`` bytes are read directly into
        ``empty``'s buffers (when given), in parallel and without holding the GIL; otherwise
        through h5py / zarr.
        """
        group = self._open()
        indptr = np.asarray(group["indptr"][start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        raw = self._raw_arrays()
        if raw is None:
            return _window(indptr - lo, np.asarray(group["indices"][lo:hi]), np.asarray(group["data"][lo:hi], dtype=np.float32))
        alloc = empty or (lambda name, n, dtype: np.empty(n, dtype))
        indices = raw["indices"].read(lo, hi, alloc("indices", hi - lo, raw["indices"].dtype))
        data = alloc("data", hi - lo, np.dtype(np.float32))
        if raw["data"].dtype == np.float32:
            raw["data"].read(lo, hi, data)
        else:
            data[...] = raw["data"].read(lo, hi, np.empty(hi - lo, raw["data"].dtype))
        return CSRWindow(indptr - lo, indices, data)


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

    def _read_stored(self, start: int, stop: int) -> sp.csr_matrix:
        table = self._open().read(coords=(slice(start, stop - 1),)).tables().concat()
        rows = table.column("soma_dim_0").to_numpy() - start
        cols = table.column("soma_dim_1").to_numpy()
        data = table.column("soma_data").to_numpy().astype(np.float32)
        return sp.csr_matrix((data, (rows, cols)), shape=(stop - start, self._n_genes_file))


class _Extents:
    """Where the elements of an uncompressed HDF5 dataset lie in its file, for reads around h5py.

    ``starts[i]`` is the first element of the i-th stored run and ``offsets[i]`` its byte offset
    (one run for a contiguous dataset, one per chunk for a chunked one). Reads go through
    ``os.preadv`` into the caller's buffer, split over a few daemon threads (:class:`~scatlas._threads.Workers`).
    """

    _piece = 1 << 25  # bytes per parallel read

    def __init__(self, path: Path, dtype: np.dtype, starts: np.ndarray, offsets: np.ndarray, size: int) -> None:
        self.path, self.dtype, self.starts, self.offsets, self.size = path, dtype, starts, offsets, size
        self._reader: tuple[int, Workers] | None = None  # file descriptor and reader threads: set in one step

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    @classmethod
    def of(cls, dataset: Any, path: Path) -> _Extents | None:
        """Extents of an h5py ``dataset``, or ``None`` when it is filtered, external, partly unwritten or not native-endian."""
        import h5py

        plist, size = dataset.id.get_create_plist(), int(dataset.shape[0])
        if plist.get_nfilters() or plist.get_external_count() or not dataset.dtype.isnative or dataset.ndim != 1:
            return None
        base = dataset.file.userblock_size
        if plist.get_layout() == h5py.h5d.CONTIGUOUS:
            offset = dataset.id.get_offset()
            return None if offset is None and size else cls(path, dataset.dtype, np.zeros(1, np.int64), np.array([base + (offset or 0)]), size)
        if plist.get_layout() != h5py.h5d.CHUNKED:
            return None
        chunk = int(dataset.chunks[0])
        infos: list[Any] = []
        try:
            dataset.id.chunk_iter(infos.append)  # one pass over the chunk index (HDF5 >= 1.14)
        except (AttributeError, NotImplementedError, RuntimeError):
            infos = [dataset.id.get_chunk_info(i) for i in range(dataset.id.get_num_chunks())]
        if len(infos) != -(-size // chunk) or any(info.filter_mask or info.byte_offset is None for info in infos):
            return None
        infos.sort(key=lambda info: info.chunk_offset[0])
        starts = np.array([info.chunk_offset[0] for info in infos], dtype=np.int64)
        if not np.array_equal(starts, np.arange(len(infos), dtype=np.int64) * chunk):
            return None
        return cls(path, dataset.dtype, starts, base + np.array([info.byte_offset for info in infos], dtype=np.int64), size)

    def _pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(first element, end element, byte offset) runs covering ``lo:hi``, adjacent runs merged, cut to ``_piece`` bytes."""
        item = self.dtype.itemsize
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        runs: list[list[int]] = []
        for i in range(first, len(self.starts)):
            a, b = max(lo, int(self.starts[i])), min(hi, int(self.starts[i + 1]) if i + 1 < len(self.starts) else self.size)
            if a >= b:
                break
            offset = int(self.offsets[i]) + (a - int(self.starts[i])) * item
            if runs and runs[-1][1] == a and runs[-1][2] + (a - runs[-1][0]) * item == offset:
                runs[-1][1] = b
            else:
                runs.append([a, b, offset])
        step = max(1, self._piece // item)
        return [(a, min(a + step, b), off + (a - a0) * item) for a0, b, off in runs for a in range(a0, b, step)]

    def _read_piece(self, out: memoryview, offset: int) -> None:
        assert self._reader is not None
        while len(out):
            got = os.preadv(self._reader[0], [out], offset)
            if got <= 0:
                raise InputError(f"{self.path}: file ended {len(out)} bytes early at byte {offset}")
            out, offset = out[got:], offset + got

    def read(self, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Elements ``lo:hi`` into ``out`` (length ``hi − lo``, this dataset's dtype); returns ``out``.

        Once this returns or raises (a signal included), no reader writes into ``out`` any more.
        """
        if self._reader is None:
            self._reader = (os.open(self.path, os.O_RDONLY), Workers(_N_READERS, "scatlas-read"))
            weakref.finalize(self, _close, *self._reader)
        view = memoryview(out.view(np.uint8))
        item = self.dtype.itemsize
        pieces = self._pieces(lo, hi)
        if len(pieces) == 1:
            a, b, offset = pieces[0]
            self._read_piece(view[(a - lo) * item : (b - lo) * item], offset)
            return out
        self._reader[1].run([partial(self._read_piece, view[(a - lo) * item : (b - lo) * item], offset) for a, b, offset in pieces])
        return out


_N_READERS = min(8, usable_cpus())


def _close(fd: int, readers: Workers) -> None:
    readers.close()
    os.close(fd)


@dataclass
class RowSubset:
    """The rows ``rows`` (increasing) of an on-disk source, seen as a source: a filtered dataset, or one without
    its all-zero cells, that stays on disk."""

    source: Any
    rows: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(cells kept, genes)."""
        return len(self.rows), self.source.shape[1]

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Kept rows ``start:stop``."""
        return read_rows(self.source, self.rows[start:stop]) if stop > start else sp.csr_matrix((0, self.shape[1]), dtype=np.float32)

    def with_genes(self, genes: np.ndarray) -> RowSubset:
        """The same rows keeping only the columns ``genes``."""
        return RowSubset(self.source.with_genes(genes), self.rows)


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
