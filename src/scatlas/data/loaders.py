"""Minibatch loading: row chunks streamed to the device, whole CSR minibatches gathered there.

The loader walks a :class:`~scatlas.data.sources.CSRSource` (a matrix in memory, or a backed
``.h5ad`` / ``.zarr`` on disk) in chunks of consecutive selected rows. A background thread
reads the next chunk (disk → host CSR → pinned memory) while the current one trains; each chunk
is copied to the training device once, and every minibatch is gathered from it there with a
handful of vectorised tensor operations: no per-cell ``__getitem__``, no host-to-device copy
and no device synchronisation per minibatch. Minibatches travel as CSR triplets
(``x_indptr``, ``x_indices``, ``x_data``) and are densified on the device (:func:`densify`).

Shuffling is by chunk and within chunk (seeded per epoch). Under ``torch.distributed`` (Lightning
DDP) each rank streams only its own contiguous, equally sized shard of the rows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scatlas.data.sources import CSRSource, as_source, read_rows

Batch = dict[str, Any]


def densify(batch: Mapping[str, Any]) -> torch.Tensor:
    """Dense ``(n_cells, n_genes)`` tensor of a loader batch, built on the batch's device.

    ``batch["x_nnz"]`` (a Python int), when present, spares a device synchronisation.
    """
    indptr, indices, data = batch["x_indptr"], batch["x_indices"], batch["x_data"]
    n_rows, n_genes = indptr.shape[0] - 1, int(batch["n_genes"])
    rows = torch.repeat_interleave(torch.arange(n_rows, device=data.device), indptr.diff(), output_size=batch.get("x_nnz"))
    out = torch.zeros(n_rows * n_genes, dtype=data.dtype, device=data.device)
    out.index_put_((rows * n_genes + indices,), data)
    return out.view(n_rows, n_genes)


@dataclass
class _HostChunk:
    """Selected rows of one chunk on the host (pinned for a GPU): CSR arrays, row ids, covariates."""

    indptr: torch.Tensor
    indices: torch.Tensor
    data: torch.Tensor
    rows: torch.Tensor
    covariates: dict[str, torch.Tensor]


@dataclass
class _DeviceChunk:
    """A chunk on the training device (plus its ``indptr`` on the host, to size minibatches)."""

    host_indptr: np.ndarray
    indptr: torch.Tensor
    indices: torch.Tensor
    data: torch.Tensor
    rows: torch.Tensor
    covariates: dict[str, torch.Tensor]


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
        Selected rows per chunk (``None``: all rows in one chunk, kept on the device across
        epochs). Host memory holds at most ``prefetch + 1`` chunks.
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
        self.chunk_size = chunk_size
        self.device = device
        self.pin_memory = pin_memory
        self.shard = shard
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
        X = read_rows(self.source, rows)

        def tensor(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.pin_memory() if pin else t

        return _HostChunk(tensor(X.indptr.astype(np.int64)), tensor(X.indices), tensor(X.data.astype(np.float32, copy=False)),
                          tensor(rows), {k: tensor(v[rows]) for k, v in self.covariates.items()})

    @staticmethod
    def _to_device(chunk: _HostChunk, device: torch.device) -> _DeviceChunk:
        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return _DeviceChunk(chunk.indptr.numpy(), put(chunk.indptr), put(chunk.indices), put(chunk.data), put(chunk.rows),
                            {k: put(v) for k, v in chunk.covariates.items()})

    def _batches(self, chunk: _DeviceChunk, order: np.ndarray) -> Iterator[Batch]:
        device = chunk.data.device
        order_d = torch.from_numpy(order).to(device, non_blocking=True)
        n_batches = self._batches_in(len(order))
        for i in range(n_batches):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            local, local_d = order[sl], order_d[sl]
            nnz = int((chunk.host_indptr[local + 1] - chunk.host_indptr[local]).sum())
            starts = chunk.indptr[local_d]
            lengths = chunk.indptr[local_d + 1] - starts
            indptr = torch.zeros(len(local) + 1, dtype=torch.int64, device=device)
            torch.cumsum(lengths, 0, out=indptr[1:])
            take = torch.repeat_interleave(starts - indptr[:-1], lengths, output_size=nnz) + torch.arange(nnz, device=device)
            batch: Batch = {
                "x_indptr": indptr,
                "x_indices": chunk.indices[take],
                "x_data": chunk.data[take],
                "x_nnz": nnz,
                "n_genes": self.n_genes,
                "row": chunk.rows[local_d],
            }
            for key, values in chunk.covariates.items():
                batch[key] = values[local_d]
            yield batch

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
            order = rng.permutation(len(piece)) if self.shuffle else np.arange(len(piece))
            yield from self._batches(chunk, order)


def _prefetched(source: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``source`` in a daemon thread, ``depth`` items ahead of the consumer."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in source:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)
            return
        q.put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)
