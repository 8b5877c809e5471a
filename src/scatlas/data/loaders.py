"""Minibatch loading: row chunks streamed to the device, whole CSR minibatches gathered there.

The loader walks a :class:`~scatlas.data.sources.CSRSource` (a matrix in memory, or a backed
``.h5ad`` / ``.zarr`` on disk) in chunks of consecutive selected rows. A background thread
reads the next chunk (disk → host CSR → pinned memory) while the current one trains; each chunk
is copied to the training device once, and every minibatch is gathered from it there with a
handful of vectorised tensor operations: no per-cell ``__getitem__``, no host-to-device copy
and no device synchronisation per minibatch. Minibatches travel as CSR triplets
(``x_indptr``, ``x_indices``, ``x_data``) and are densified on the device (:func:`densify`).

A chunk is read as the contiguous window of stored rows that spans its selected rows (when that
window is at most twice their number). For a GPU it goes straight into pinned buffers, and the
source's library-size normalisation, ``log1p`` and gene subset are applied on the device, once per
chunk. On the CPU the source finishes its rows itself, and minibatches are cut and densified with
SciPy (one C++ loop each), which beats the tensor gather there.

Shuffling is by chunk and within chunk (seeded per epoch). Under ``torch.distributed`` (Lightning
DDP) each rank streams only its own contiguous, equally sized shard of the rows.
"""

from __future__ import annotations

import math
import queue
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scatlas._threads import start_daemon
from scatlas.data.sources import CSRSource, InMemoryCSR, as_source, read_rows

_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32}

Batch = dict[str, Any]


_ALIGNMENT = 64  # bytes: where PyTorch's own CPU tensors start


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array whose data start on a 64-byte boundary, as PyTorch's own CPU tensors do.

    MKL's matrix product (PyTorch's on a CPU) can round differently depending on where an
    operand starts within its cache line. NumPy's buffers are only 16-byte aligned, at whatever
    phase the heap hands out, and that phase changes from run to run (other threads allocate
    too), so a product on a NumPy buffer could differ in its last bits between two runs of one
    seed. Every array that becomes a model's input starts here instead.
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    buffer = np.empty(size + _ALIGNMENT // dtype.itemsize, dtype=dtype)
    start = (-buffer.ctypes.data % _ALIGNMENT) // dtype.itemsize
    return buffer[start : start + size].reshape(shape)


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """``a`` as a CPU tensor that starts on a 64-byte boundary (:func:`aligned_empty`): shared when ``a`` already does, else copied."""
    a = np.ascontiguousarray(a)
    if a.ctypes.data % _ALIGNMENT:
        aligned = aligned_empty(a.shape, a.dtype)
        aligned[...] = a
        a = aligned
    return torch.from_numpy(a)


def densify(batch: Mapping[str, Any]) -> torch.Tensor:
    """Dense ``(n_cells, n_genes)`` tensor of a loader batch, built on the batch's device.

    On a CPU it starts on a 64-byte boundary (:func:`aligned_empty`), so the model's products
    on it are the same bits in every run. ``batch["x_nnz"]`` (a Python int), when present,
    spares a device synchronisation.
    """
    indptr, indices, data = batch["x_indptr"], batch["x_indices"], batch["x_data"]
    n_rows, n_genes = indptr.shape[0] - 1, int(batch["n_genes"])
    if data.device.type == "cpu":  # SciPy's one C++ loop beats a fill plus a scatter
        dense = aligned_empty((n_rows, n_genes), data.numpy().dtype)
        sp.csr_matrix((data.numpy(), indices.numpy(), indptr.numpy()), shape=(n_rows, n_genes)).toarray(out=dense)
        return torch.from_numpy(dense)
    return _scatter_dense(indptr, indices, data, n_genes, batch.get("x_nnz"))


def with_dense_x(batch: Batch) -> Batch:
    """``batch`` with its CSR minibatch densified as ``"x"`` (:func:`densify`); a batch without one is returned as is."""
    return {**batch, "x": densify(batch)} if "x_indptr" in batch else batch


def _scatter_dense(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, n_genes: int, nnz: int | None) -> torch.Tensor:
    """Dense rows of CSR tensors by one scatter on their device (the accelerator path of :func:`densify`)."""
    n_rows = indptr.shape[0] - 1
    rows = torch.repeat_interleave(torch.arange(n_rows, device=data.device), indptr.diff(), output_size=nnz)
    out = torch.zeros(n_rows * n_genes, dtype=data.dtype, device=data.device)
    out.index_put_((rows * n_genes + indices,), data)
    return out.view(n_rows, n_genes)


def finish_on_device(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, normalize: bool,
                     gene_map: torch.Tensor | None, target_sum: float = 1e4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~scatlas.data.normalize_log1p` and a gene subset applied to CSR arrays where they lie.

    Parameters
    ----------
    indptr, indices, data
        CSR arrays of stored rows (all stored genes, e.g. raw counts).
    normalize
        Scale each row to ``target_sum`` (over all stored genes) and apply ``log1p``.
    gene_map
        For each stored gene, its column in the output or −1 to drop it (``None``: keep all).

    Returns
    -------
    ``indptr``, ``indices``, ``data`` of the result (``indptr`` int64, ``data`` float32).
    """
    # 32-bit temporaries: a chunk holds far fewer than 2**31 entries, and its peak memory stays near its own size
    n_rows = indptr.shape[0] - 1
    rows = None
    if normalize:  # each cell's total over every stored gene, before the subset (as normalize_log1p(totals=))
        rows = torch.repeat_interleave(torch.arange(n_rows, dtype=torch.int32, device=data.device), indptr.diff(), output_size=data.shape[0])
        totals = torch.zeros(n_rows, dtype=data.dtype, device=data.device).index_add_(0, rows, data)
    if gene_map is not None:  # the subset first: only the kept values are scaled
        column = gene_map.to(torch.int32)[indices]
        keep = column >= 0
        kept_before = torch.zeros(data.shape[0] + 1, dtype=torch.int32, device=data.device)
        torch.cumsum(keep, 0, dtype=torch.int32, out=kept_before[1:])
        indptr, indices, data = kept_before[indptr].to(torch.int64), column[keep], data[keep]
        rows = None if rows is None else rows[keep]
        del column, keep, kept_before
    if rows is not None:
        scale = torch.where(totals > 0, target_sum / totals, torch.zeros_like(totals))
        data = scale[rows].mul_(data).log1p_()
    return indptr, indices, data


@dataclass
class _HostChunk:
    """One chunk on the host (pinned for a GPU): CSR arrays of the rows read, their ids and
    covariates, the positions of the selected rows among them, and whether the source's
    normalisation / gene subset is still to be applied."""

    indptr: torch.Tensor
    indices: torch.Tensor
    data: torch.Tensor
    rows: torch.Tensor
    covariates: dict[str, torch.Tensor]
    selected: np.ndarray
    stored: bool  # normalisation / gene subset still to be applied (on the device)


@dataclass
class _DeviceChunk:
    """A chunk on the training device (plus its ``indptr`` on the host, to size minibatches)."""

    host_indptr: np.ndarray
    indptr: torch.Tensor
    indices: torch.Tensor
    data: torch.Tensor
    rows: torch.Tensor
    covariates: dict[str, torch.Tensor]
    selected: np.ndarray


STREAM_CHUNK = 100_000
"""Cells per chunk when a source on disk is streamed (unless a ``chunk_size`` option says otherwise)."""


class CSRLoader:
    """Iterate over minibatches of the rows ``rows`` of a CSR matrix or source.

    Parameters
    ----------
    X
        Cells × genes CSR matrix, or a :class:`~scatlas.data.sources.CSRSource` (streamed).
    rows
        Row indices this loader visits (e.g. a split's training cells). Unshuffled loaders
        visit them in this order; for streaming from disk they should be sorted.
    batch_size
        Cells per minibatch.
    shuffle
        Shuffle chunk order and rows within each chunk every epoch (epoch ``e`` uses ``seed + e``).
    covariates
        Per-cell arrays (indexed like ``X``'s rows) added to each batch as int64 tensors,
        e.g. ``{"batch": codes, "label": codes}``.
    seed
        Seed of the shuffling.
    drop_last
        Drop the incomplete last minibatch of each chunk (when the chunk holds more than one).
    prefetch
        Chunks read ahead by a background thread (0 = read in the consuming thread).
    chunk_size
        Selected rows per chunk (``None``: for a matrix in memory all rows in one chunk, kept on
        the device across epochs; for a streamed source :data:`STREAM_CHUNK` rows). Host memory
        holds at most ``prefetch + 1`` chunks.
    device
        Where chunks live and minibatches are gathered: ``"cpu"``, ``"cuda"`` (the current CUDA
        device at iteration time, i.e. each DDP rank's own) or a :class:`torch.device`.
    pin_memory
        Pin host chunks before copying them to a GPU (default: when ``device`` is a GPU).
    shard
        Under torch.distributed, visit only this rank's share of ``rows`` (training); ``False``
        for inference, where every rank needs every requested row.
    """

    def __init__(
        self,
        X: Any,
        rows: np.ndarray,
        batch_size: int = 256,
        shuffle: bool = False,
        covariates: Mapping[str, np.ndarray] | None = None,
        seed: int = 0,
        drop_last: bool = False,
        prefetch: int = 1,
        chunk_size: int | None = None,
        device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        shard: bool = True,
    ) -> None:
        self.source: CSRSource = as_source(X)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.covariates = {k: np.asarray(v, dtype=np.int64) for k, v in (covariates or {}).items()}
        self.seed = seed
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.chunk_size = chunk_size or (None if isinstance(self.source, InMemoryCSR) else STREAM_CHUNK)
        self.device = device
        self.pin_memory = pin_memory
        self.shard = shard
        genes = getattr(self.source, "genes", None)
        self._normalize = bool(getattr(self.source, "normalize", False))
        self._needs_finish = self._normalize or genes is not None
        # Chunks are read as windows of stored rows: as they are, or finished on an accelerator. On the CPU the
        # source finishes its own rows (leaner in memory than tensor ops). A column map cannot repeat a gene.
        self._windowed = hasattr(self.source, "read_window") and (genes is None or len(np.unique(genes)) == len(genes))
        self._finish_on_device = torch.device(device).type != "cpu"
        self._scipy_gather = True  # minibatches of CPU-resident chunks by SciPy row indexing (tests switch it off)
        self._gene_map: torch.Tensor | None = None  # output column of each stored gene (−1: dropped)
        if self._windowed and genes is not None:
            self._gene_map = torch.full((self.source.stored_shape[1],), -1, dtype=torch.int32)
            self._gene_map[torch.from_numpy(np.asarray(genes, dtype=np.int64))] = torch.arange(len(genes), dtype=torch.int32)
        self._epoch = 0
        self._resident: _DeviceChunk | None = None  # the one chunk of a single-chunk loader, kept across epochs

    @property
    def n_genes(self) -> int:
        """Columns of the matrix."""
        return self.source.shape[1]

    def _shard(self) -> np.ndarray:
        """This process's rows: all of them, or its equal contiguous share under torch.distributed (when sharding)."""
        if self.shard and torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            share = len(self.rows) // world
            return self.rows[rank * share : (rank + 1) * share]
        return self.rows

    def _chunk_bounds(self, n: int) -> list[tuple[int, int]]:
        size = n if not self.chunk_size else max(1, int(self.chunk_size))
        return [(a, min(a + size, n)) for a in range(0, n, size)] if n else []

    def _batches_in(self, n: int) -> int:
        return n // self.batch_size if self.drop_last and n > self.batch_size else -(-n // self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches_in(b - a) for a, b in self._chunk_bounds(len(self._shard())))

    def _device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def _read(self, rows: np.ndarray, pin: bool) -> _HostChunk:
        """Read the chunk of ``rows``: as the window of stored rows that spans them when the source offers one, it is
        at most twice their number, and any normalisation / gene subset is to happen on the device; else finished rows."""

        def tensor(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.pin_memory() if pin else t

        lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
        if self._windowed and len(rows) and hi - lo <= 2 * len(rows) and (self._finish_on_device or not self._needs_finish):
            buffers: dict[str, torch.Tensor] = {}

            def empty(name: str, n: int, dtype: np.dtype) -> np.ndarray:
                buffers[name] = torch.empty(n, dtype=_TORCH_DTYPES[np.dtype(dtype)], pin_memory=True)
                return buffers[name].numpy()

            # pinned buffers for a GPU (reused by PyTorch's caching host allocator); else NumPy's (huge pages: fewer faults)
            window = self.source.read_window(lo, hi, empty if pin else None)
            indices = buffers["indices"] if "indices" in buffers else tensor(window.indices)
            data = buffers["data"] if "data" in buffers else tensor(window.data)
            return _HostChunk(tensor(window.indptr), indices, data, tensor(np.arange(lo, hi)), {k: tensor(v[lo:hi]) for k, v in self.covariates.items()},
                              rows - lo, self._needs_finish)
        X = read_rows(self.source, rows)
        return _HostChunk(tensor(X.indptr.astype(np.int64)), tensor(X.indices), tensor(X.data.astype(np.float32, copy=False)),
                          tensor(rows), {k: tensor(v[rows]) for k, v in self.covariates.items()}, np.arange(len(rows)), False)

    def _to_device(self, chunk: _HostChunk, device: torch.device) -> _DeviceChunk:
        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        indptr, indices, data = put(chunk.indptr), put(chunk.indices), put(chunk.data)
        host_indptr = chunk.indptr.numpy()
        if chunk.stored:
            gene_map = None if self._gene_map is None else put(self._gene_map)
            indptr, indices, data = finish_on_device(indptr, indices, data, self._normalize, gene_map)
            host_indptr = indptr.cpu().numpy() if gene_map is not None else host_indptr
        return _DeviceChunk(host_indptr, indptr, indices, data, put(chunk.rows), {k: put(v) for k, v in chunk.covariates.items()}, chunk.selected)

    def _batches(self, chunk: _DeviceChunk, order: np.ndarray) -> Iterator[Batch]:
        device = chunk.data.device
        order_d = torch.from_numpy(order).to(device, non_blocking=True)
        # CPU-resident chunks: SciPy's row indexing (one C++ loop) beats the tensor gather there
        host = (sp.csr_matrix((chunk.data.numpy(), chunk.indices.numpy(), chunk.host_indptr), shape=(len(chunk.host_indptr) - 1, self.n_genes))
                if device.type == "cpu" and self._scipy_gather else None)
        for i in range(self._batches_in(len(order))):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            local, local_d = order[sl], order_d[sl]
            if host is not None:
                sub = host[local]
                indptr, indices, data, nnz = torch.from_numpy(sub.indptr.astype(np.int64)), torch.from_numpy(sub.indices), torch.from_numpy(sub.data), sub.nnz
            else:
                nnz = int((chunk.host_indptr[local + 1] - chunk.host_indptr[local]).sum())
                starts = chunk.indptr[local_d]
                lengths = chunk.indptr[local_d + 1] - starts
                indptr = torch.zeros(len(local) + 1, dtype=torch.int64, device=device)
                torch.cumsum(lengths, 0, out=indptr[1:])
                take = torch.repeat_interleave(starts - indptr[:-1], lengths, output_size=nnz) + torch.arange(nnz, device=device)
                indices, data = chunk.indices[take], chunk.data[take]
            batch: Batch = {"x_indptr": indptr, "x_indices": indices, "x_data": data, "x_nnz": nnz, "n_genes": self.n_genes, "row": chunk.rows[local_d]}
            for key, values in chunk.covariates.items():
                batch[key] = values[local_d]
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next pass as epoch ``epoch`` (the trainer sets it, so a resumed run continues the same order)."""
        self._epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        shard = self._shard()
        bounds = self._chunk_bounds(len(shard))
        rng = np.random.default_rng(self.seed + self._epoch)
        self._epoch += 1
        if self.shuffle:
            bounds = [bounds[i] for i in rng.permutation(len(bounds))]
        pieces = [shard[a:b] for a, b in bounds]
        device = self._device()
        pin = device.type == "cuda" if self.pin_memory is None else self.pin_memory
        if len(pieces) == 1:  # one chunk: read and copied to the device once, for every epoch
            if self._resident is None:
                self._resident = self._to_device(self._read(pieces[0], pin), device)
            chunks: Iterator[_DeviceChunk] = iter([self._resident])
        else:
            host = (self._read(piece, pin) for piece in pieces)
            chunks = (self._to_device(h, device) for h in (_prefetched(host, self.prefetch) if self.prefetch > 0 else host))
        for piece, chunk in zip(pieces, chunks):
            order = chunk.selected[rng.permutation(len(piece))] if self.shuffle else chunk.selected
            yield from self._batches(chunk, order)


class _Alive:
    """What a prefetch worker watches through a weak reference: gone once the consumer's generator is."""

    __slots__ = ("__weakref__",)


def _prefetched(source: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``source`` in a daemon thread, at most ``depth`` items ahead of the consumer.

    Items and the consumer's credits for new ones pass through :class:`queue.SimpleQueue`, whose
    ``get`` / ``put`` are single C calls: a SIGINT / SIGTERM handler that raises in the consumer
    (the CLI's) cannot stop one halfway and leave a lock held, as it can inside
    :class:`queue.Queue`'s Python code, after which the clean-up deadlocked (seen as a CLI that
    never exited after a scheduler's SIGTERM). The worker only ever waits for a credit, so the
    clean-up ends it with one more and a join: within the read in progress. A signal that cuts the
    clean-up itself short cannot leave the worker waiting for ever either: it looks every half
    second whether the generator still exists.
    """
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    credits: queue.SimpleQueue[bool] = queue.SimpleQueue()
    for _ in range(depth):
        credits.put(True)
    done = object()
    stopped = [False]  # one store, so unlike threading.Event.set no lock a signal could leave held
    alive = _Alive()  # held by this generator's frame only

    def work(consumer: weakref.ref[_Alive]) -> None:
        try:
            while True:
                try:
                    go = credits.get(timeout=0.5)
                except queue.Empty:
                    if stopped[0] or consumer() is None:
                        return
                    continue
                if not go or stopped[0]:
                    return
                item = next(source, done)
                items.put(item)
                if item is done:
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            items.put(exc)

    thread = start_daemon(work, (weakref.ref(alive),))  # with signals blocked while it starts
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            credits.put(True)
            yield item
    finally:
        stopped[0] = True
        credits.put(False)
        thread.join()
