"""Minibatch loading: whole CSR minibatches gathered with vectorised slicing, densified on the device.

A minibatch never goes through per-cell ``__getitem__``: the rows of a batch are gathered
from the CSR arrays in one vectorised step, shipped as three small arrays (``indptr``,
``indices``, ``data``), moved to the training device by Lightning and only there turned
into a dense tensor (:func:`densify`). A background thread prepares the next batches
while the current one trains, into pinned memory when a GPU is present.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

Batch = dict[str, Any]


def gather_rows(X: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays (indptr, indices, data) of ``X[rows]`` in one vectorised gather.

    Consecutive rows are contiguous slices of ``X.indices`` / ``X.data``; the gather
    index is built with ``np.repeat`` + ``arange`` instead of a Python loop.
    """
    starts = X.indptr[rows].astype(np.int64)
    lengths = X.indptr[rows + 1].astype(np.int64) - starts
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
    return indptr, X.indices[take].astype(np.int64), X.data[take].astype(np.float32, copy=False)


def densify(batch: Mapping[str, Any]) -> torch.Tensor:
    """Dense ``(n_cells, n_genes)`` tensor of a loader batch, built on the batch's device."""
    indptr, indices, data = batch["x_indptr"], batch["x_indices"], batch["x_data"]
    n_rows = indptr.shape[0] - 1
    out = torch.zeros(n_rows, int(batch["n_genes"]), dtype=data.dtype, device=data.device)
    rows = torch.repeat_interleave(torch.arange(n_rows, device=data.device), indptr.diff())
    out[rows, indices] = data
    return out


class CSRLoader:
    """Iterate over minibatches of the rows ``rows`` of a CSR matrix.

    Parameters
    ----------
    X
        Cells × genes CSR matrix (float32).
    rows
        Row indices this loader visits (e.g. a split's training cells).
    batch_size
        Cells per minibatch.
    shuffle
        Reshuffle ``rows`` every epoch (seeded: epoch ``e`` uses ``seed + e``).
    covariates
        Per-cell arrays (indexed like ``X``'s rows) added to each batch as int64 tensors,
        e.g. ``{"batch": codes, "label": codes}``.
    seed
        Seed of the shuffling.
    drop_last
        Drop a last incomplete batch (useful with batch norm and a single leftover cell).
    prefetch
        Batches prepared ahead by a background thread (0 = none).
    pin_memory
        Pin batch tensors for faster host-to-GPU copies (default: when CUDA is available).
    """

    def __init__(
        self,
        X: sp.csr_matrix,
        rows: np.ndarray,
        batch_size: int = 256,
        shuffle: bool = False,
        covariates: Mapping[str, np.ndarray] | None = None,
        seed: int = 0,
        drop_last: bool = False,
        prefetch: int = 2,
        pin_memory: bool | None = None,
    ) -> None:
        self.X = sp.csr_matrix(X, dtype=np.float32)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.covariates = {k: np.asarray(v, dtype=np.int64) for k, v in (covariates or {}).items()}
        self.seed = seed
        self.drop_last = drop_last and len(self.rows) > self.batch_size
        self.prefetch = prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._epoch = 0

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.rows
        rng = np.random.default_rng(self.seed + self._epoch)
        return self.rows[rng.permutation(len(self.rows))]

    def _make(self, rows: np.ndarray) -> Batch:
        indptr, indices, data = gather_rows(self.X, rows)
        batch: Batch = {
            "x_indptr": torch.from_numpy(indptr),
            "x_indices": torch.from_numpy(indices),
            "x_data": torch.from_numpy(np.ascontiguousarray(data)),
            "n_genes": self.X.shape[1],
            "row": torch.from_numpy(rows),
        }
        for key, values in self.covariates.items():
            batch[key] = torch.from_numpy(values[rows])
        if self.pin_memory:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def _batches(self) -> Iterator[Batch]:
        order = self._order()
        for i in range(len(self)):
            yield self._make(order[i * self.batch_size : (i + 1) * self.batch_size])

    def __iter__(self) -> Iterator[Batch]:
        batches = self._batches()
        self._epoch += 1
        if self.prefetch <= 0:
            yield from batches
            return
        yield from _prefetched(batches, self.prefetch)


def _prefetched(source: Iterator[Batch], depth: int) -> Iterator[Batch]:
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
