"""scverse's ``annbatch`` loader on the pass that ``atlas_scale.py --loaders`` times for scatlas.

annbatch needs Python >= 3.12 and scatlas' environment may be older, so this script runs on its
own, in an environment with ``annbatch`` (no scatlas, no torch), and prints one JSON object per
configuration. ``atlas_scale.py --loaders --annbatch-python PATH`` calls it with that
environment's interpreter; by hand::

    python3.12 -m venv /tmp/annbatch-venv && /tmp/annbatch-venv/bin/pip install annbatch
    /tmp/annbatch-venv/bin/python benchmarks/annbatch_peer.py FILE.h5ad [--counts] [--workdir DIR]

The pass: every cell once, shuffled, minibatches of ``--batch-size`` densified with SciPy and
summed (as scatlas' loader pass densifies each minibatch); with ``--counts`` each minibatch is
first normalised to 10,000 counts per cell, ``log1p``'d and cut to every other gene (the same
work scatlas' counts pass does per chunk). Configurations:

* ``annbatch, AnnData .zarr`` (``--mode backed``, ``path`` a ``.zarr`` store as AnnData writes
  it): ``Loader.add_dataset`` on its ``X`` (an ``anndata.abc.CSRDataset``), random chunks of
  ``--ab-chunk`` contiguous cells, ``--ab-preload`` of them fetched together. annbatch 0.3 does
  not read a CSR matrix from an ``.h5ad`` ("Cannot add CSRDataset backed by h5ad at the moment");
* ``annbatch, preshuffled zarr``: the layout annbatch recommends, written once by
  ``DatasetCollection.add_adatas`` (its conversion time reported apart), then the same pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
import zarr
from annbatch import DatasetCollection, Loader


def _peak_rss_gb() -> float:
    """Peak resident memory of this process so far (``VmHWM``), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _lognorm_subset(X: sp.csr_matrix) -> sp.csr_matrix:
    """Counts → ``log1p`` of 10,000 counts per cell, every other gene (scanpy's ``normalize_total`` + ``log1p``)."""
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    X = sp.csr_matrix((X.data * np.repeat(scale, np.diff(X.indptr)).astype(X.dtype), X.indices, X.indptr), shape=X.shape)
    np.log1p(X.data, out=X.data)
    return X[:, np.arange(0, X.shape[1], 2)]


def timed_pass(loader: Loader, counts: bool) -> dict[str, Any]:
    """One pass of ``loader``, every minibatch (normalised and) densified; cells/s and peak RSS."""
    total, n = 0.0, 0
    start = time.perf_counter()
    for batch in loader:
        X = batch["X"] if isinstance(batch, dict) else batch[0] if isinstance(batch, tuple) else batch
        X = sp.csr_matrix(X)
        if counts:
            X = _lognorm_subset(X)
        total += float(X.toarray().sum())
        n += X.shape[0]
    wall = time.perf_counter() - start
    return {"cells": n, "wall_s": wall, "cells_per_s": n / wall, "peak_rss_gb": _peak_rss_gb(), "checksum": total}


def _loader(args: argparse.Namespace) -> Loader:
    return Loader(batch_size=args.batch_size, chunk_size=args.ab_chunk, preload_nchunks=args.ab_preload, shuffle=True,
                  rng=np.random.default_rng(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="an AnnData .zarr store (mode backed) or .h5ad file (mode zarr: converted)")
    parser.add_argument("--counts", action="store_true", help="the file holds raw counts: normalise + log1p + every other gene per minibatch")
    parser.add_argument("--batch-size", type=int, default=16_384)
    parser.add_argument("--ab-chunk", type=int, default=512, help="annbatch chunk_size (its default)")
    parser.add_argument("--ab-preload", type=int, default=32, help="annbatch preload_nchunks (its default)")
    parser.add_argument("--mode", choices=["backed", "zarr"], default="backed")
    parser.add_argument("--workdir", type=Path, default=None, help="where the preshuffled zarr collection goes (mode zarr)")
    args = parser.parse_args()

    if args.mode == "backed":
        result = timed_pass(_loader(args).add_dataset(ad.io.sparse_dataset(zarr.open_group(args.path, mode="r")["X"])), args.counts)
        print(json.dumps({"what": "annbatch, AnnData .zarr", **result}))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="scatlas_annbatch_"))
    store = workdir / f"{args.path.stem}_annbatch.zarr"
    start = time.perf_counter()
    if not store.exists():
        DatasetCollection(store).add_adatas([args.path], load_adata=lambda p: ad.AnnData(X=ad.io.sparse_dataset(h5py.File(p, "r")["X"]).to_memory()))
    convert_s = time.perf_counter() - start
    result = timed_pass(_loader(args).use_collection(DatasetCollection(store, mode="r")), args.counts)
    print(json.dumps({"what": "annbatch, preshuffled zarr", "convert_s": convert_s, **result}))


if __name__ == "__main__":
    main()
