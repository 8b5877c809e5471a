"""Atlas-scale streaming: AE-NMF and donor-conditioned AE-NMF streamed from a backed .h5ad on disk.

Cells: OneK1K PBMCs (7,811 cells × 1,000 genes, 114 non-zeros per cell, 40 donors, 4 cell types,
``../shared/data``), log-normalised, resampled with replacement to each ``--sizes`` N and written
once to disk as an AnnData ``.h5ad`` with a CSR ``X`` (chunk by chunk: the file is never held in
memory). For each N, in its own process, scatlas trains ``aenmf`` and ``cond_aenmf`` (rank
``--rank``, batch = donor) for one epoch through its Lightning engine with
:class:`~scatlas.data.AnnDataCSRSource` + the chunked loader (``--chunk-size`` cells per chunk,
shuffled by chunk and within chunk, next chunk read by a prefetch thread). Reported: cells/s of
the epoch, GPU utilisation (mean of samples every 0.2 s), peak host RSS (flat in N is the goal).

Peers, same script:

* ``bare step``: a plain PyTorch loop of the same tied non-negative AE step (AdamW, clamp) fed
  contiguous minibatches from CSR chunks already in pinned host memory (no shuffling, no
  Lightning, no disk) — the issue's reference;
* ``scikit-learn NMF`` (rank ``--sk-rank``, nndsvda, coordinate descent, 100 iterations) on the
  first ``--sk-cells`` cells, against aenmf at the same rank on the same cells: wall time and
  relative reconstruction error ‖X − HW‖_F / ‖X‖_F.

With ``--loaders``, the loader alone (a shuffled pass, every minibatch densified on the device, no
model) on the log-normalised file and on a raw-count copy normalised + gene-subset on the way,
each median of ``--repeats`` fresh processes with the page cache dropped first, against:

* the same pass written with backed AnnData, scanpy and SciPy on the ``.h5ad`` (the peer);
* scverse's ``annbatch`` (with ``--annbatch-python``, the interpreter of an environment that has
  it: it needs Python >= 3.12; run by ``annbatch_peer.py``) on an AnnData ``.zarr`` copy of the
  same cells, which scatlas' loader also reads (annbatch 0.3 cannot read a CSR ``.h5ad``), at its
  default chunks and at a window like scatlas' chunk, and on its own preshuffled sharded zarr.

    python benchmarks/atlas_scale.py --sizes 1000000 10000000 --rank 256 --batch-size 16384 [--loaders]
    python benchmarks/atlas_scale.py --sizes 1000000 --loaders --skip-models --annbatch-python /tmp/annbatch-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import zarr

from _common import SHARED, isolated, machine
from scatlas.data import AnnDataCSRSource, normalize_log1p, write_chunked_h5ad
from scatlas.data.loaders import CSRLoader, densify
from scatlas.models import build_model
from scatlas.models.base import SplitData, parse_model_config
from scatlas.train import TrainConfig

DATASET = "onek1k_4types_40donors.h5ad"


def write_resampled(path: Path, n_cells: int, seed: int = 0, write_chunk: int = 1_000_000, counts: bool = False, donors: list[str] | None = None) -> None:
    """Write ``n_cells`` OneK1K cells (drawn with replacement, from the ``donors`` only when given; log-normalised,
    or raw ``counts``) as a CSR .h5ad, chunk by chunk."""
    src = ad.read_h5ad(SHARED / DATASET)
    X = sp.csr_matrix(src.X, dtype=np.float32)
    X = X if counts else normalize_log1p(X)
    pool = np.flatnonzero(src.obs["donor_id"].isin(donors)) if donors is not None else np.arange(src.n_obs)
    rows = pool[np.random.default_rng(seed).integers(0, len(pool), n_cells)]
    obs = pd.DataFrame({key: pd.Categorical.from_codes(src.obs[key].cat.codes.to_numpy()[rows], src.obs[key].cat.categories.astype(str).to_numpy(dtype=object))
                        for key in ("donor_id", "cell_type")}, index=np.arange(n_cells).astype(str))
    write_chunked_h5ad(path, (X[rows[a : a + write_chunk]] for a in range(0, n_cells, write_chunk)), obs, src.var[[]])


def write_zarr_copy(path: Path, write_chunk: int = 1_000_000) -> Path:
    """The cells of the ``.h5ad`` at ``path`` as an AnnData ``.zarr`` store beside it (AnnData's default chunks and
    compression), written chunk by chunk; returned as is when it already exists."""
    out = path.with_suffix(".zarr")
    if out.exists():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with h5py.File(path, "r") as f:
        ad.AnnData(obs=ad.io.read_elem(f["obs"]), var=ad.io.read_elem(f["var"])).write_zarr(partial)
    source = AnnDataCSRSource(path)
    n = source.shape[0]
    root = zarr.open_group(str(partial), mode="r+", use_consolidated=False)
    ad.io.write_elem(root, "X", source.read(0, min(write_chunk, n)))
    X = ad.io.sparse_dataset(root["X"])
    for a in range(write_chunk, n, write_chunk):
        X.append(source.read(a, min(a + write_chunk, n)))
    zarr.consolidate_metadata(str(partial))
    partial.rename(out)
    return out


class GpuSampler:
    """Mean GPU utilisation (%) sampled every ``interval`` seconds in a thread (``nan`` without a GPU)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.samples: list[float] = []
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(float(torch.cuda.utilization()))

    def __enter__(self) -> GpuSampler:
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


def _categorical(path: Path, column: str) -> tuple[np.ndarray, list[str]]:
    """Codes and categories of a categorical ``obs`` column, read with h5py (the obs index is never loaded)."""
    with h5py.File(path, "r") as f:
        group = f["obs"][column]
        return group["codes"][:].astype(np.int64), [c.decode() if isinstance(c, bytes) else str(c) for c in group["categories"][:]]


def _split_data(path: Path) -> SplitData:
    donors, donor_names = _categorical(path, "donor_id")
    types, type_names = _categorical(path, "cell_type")
    return SplitData(X=AnnDataCSRSource(path), train=np.arange(len(donors)), val=np.arange(0), batch=donors, batch_names=donor_names,
                     label=types, label_names=type_names)


def stream_run(path: str, kind: str, rank: int, batch_size: int, chunk_size: int) -> dict[str, Any]:
    """One epoch of ``kind`` streamed from ``path`` (after a short warm-up fit on the first chunk)."""
    path = Path(path)
    data = _split_data(path)
    config = parse_model_config({"type": kind, "rank": rank, "warmup_epochs": 0} if kind == "cond_aenmf" else {"type": kind, "rank": rank})
    train = TrainConfig(max_epochs=1, batch_size=batch_size, patience=0, progress=False, chunk_size=chunk_size)
    warm = SplitData(**{**data.__dict__, "train": np.arange(min(chunk_size, len(data.train)))})
    build_model(config, train).fit(warm)
    model = build_model(config, train)
    with GpuSampler() as gpu:
        history = model.fit(data)
    wall = float(history["epoch_time_s"].iloc[-1])
    n = len(data.train)
    return {"cells": n, "wall_s": wall, "cells_per_s": n / wall, "gpu_util": gpu.mean, "loss": float(history["train_loss"].iloc[-1])}


def _gene_subset(source: AnnDataCSRSource) -> np.ndarray:
    """Every other gene: stands in for a highly-variable-gene subset of a raw-count file."""
    return np.arange(0, source.shape[1], 2)


def loader_run(path: str, counts: bool, batch_size: int, chunk_size: int) -> dict[str, Any]:
    """One shuffled pass of scatlas' loader over ``path``, every minibatch densified on the device (no model).

    With ``counts``: raw counts, normalised + log1p'd and subset to :func:`_gene_subset` on the way.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = AnnDataCSRSource(Path(path))
    if counts:
        source = AnnDataCSRSource(Path(path), normalize=True, genes=_gene_subset(source))
    loader = CSRLoader(source, np.arange(source.shape[0]), batch_size, shuffle=True, chunk_size=chunk_size, device=device)
    total = torch.zeros((), device=device)
    start = time.perf_counter()
    for batch in loader:
        total += densify(batch).sum()
    float(total)
    wall = time.perf_counter() - start
    return {"cells": source.shape[0], "wall_s": wall, "cells_per_s": source.shape[0] / wall}


def backed_anndata_run(path: str, counts: bool, batch_size: int, chunk_size: int) -> dict[str, Any]:
    """The same pass as a scanpy user writes it: backed AnnData row chunks, scanpy normalisation, SciPy row slicing."""
    import scanpy as sc

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adata = ad.read_h5ad(path, backed="r")
    n = adata.n_obs
    genes = np.arange(0, adata.n_vars, 2)
    rng = np.random.default_rng(0)
    total = torch.zeros((), device=device)
    start = time.perf_counter()
    for a in rng.permutation(np.arange(0, n, chunk_size)):
        b = min(a + chunk_size, n)
        X = adata.X[a:b]
        if counts:
            chunk = ad.AnnData(X)
            sc.pp.normalize_total(chunk, target_sum=1e4)
            sc.pp.log1p(chunk)
            X = chunk.X[:, genes]
        order = rng.permutation(b - a)
        for i in range(0, b - a, batch_size):
            total += torch.from_numpy(X[order[i : i + batch_size]].toarray()).to(device, non_blocking=True).sum()
    float(total)
    wall = time.perf_counter() - start
    return {"cells": n, "wall_s": wall, "cells_per_s": n / wall}


def annbatch_run(python: str, path: Path, counts: bool, batch_size: int, chunk: int, preload: int, mode: str, workdir: Path) -> dict[str, Any]:
    """One pass of annbatch's loader (``annbatch_peer.py`` under the interpreter ``python``), its JSON result."""
    command = [python, str(Path(__file__).with_name("annbatch_peer.py")), str(path), "--batch-size", str(batch_size), "--ab-chunk", str(chunk),
               "--ab-preload", str(preload), "--mode", mode, "--workdir", str(workdir)] + (["--counts"] if counts else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_run(repeats: int, fn: Any, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` ``repeats`` times, each in a fresh process after dropping the page cache; the run of median cells/s."""
    runs = []
    for _ in range(repeats):
        drop_page_cache()
        runs.append(fn(*args) if fn is annbatch_run else isolated(fn, *args))
        if "error" in runs[-1]:
            return runs[-1]
    median = sorted(runs, key=lambda r: r["cells_per_s"])[len(runs) // 2]
    return {**median, "convert_s": max(r["convert_s"] for r in runs)} if "convert_s" in median else median


def bare_run(path: str, rank: int, batch_size: int, chunk_size: int) -> dict[str, Any]:
    """The tied non-negative AE step in plain PyTorch on CSR chunks pre-loaded into pinned host memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = AnnDataCSRSource(Path(path))
    n, genes = source.shape
    chunks = []
    for a in range(0, n, chunk_size):
        X = source.read(a, min(a + chunk_size, n))
        chunks.append([torch.from_numpy(v).pin_memory() if device.type == "cuda" else torch.from_numpy(v)
                       for v in (X.indptr.astype(np.int64), X.indices.astype(np.int64), X.data)])
    W = torch.rand(rank, genes, device=device).div_(genes**0.5).requires_grad_()
    opt = torch.optim.AdamW([W], lr=1e-3, weight_decay=1e-4)

    def epoch() -> None:
        for indptr, indices, data in chunks:
            for a in range(0, len(indptr) - 1, batch_size):
                b = min(a + batch_size, len(indptr) - 1)
                lo, hi = int(indptr[a]), int(indptr[b])
                ip = (indptr[a : b + 1] - lo).to(device, non_blocking=True)
                x = torch.sparse_csr_tensor(ip, indices[lo:hi].to(device, non_blocking=True), data[lo:hi].to(device, non_blocking=True),
                                            size=(b - a, genes)).to_dense()
                loss = torch.nn.functional.mse_loss((x @ W.T) @ W, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    W.clamp_(min=0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    epoch()
    start = time.perf_counter()
    epoch()
    wall = time.perf_counter() - start
    return {"cells": n, "wall_s": wall, "cells_per_s": n / wall}


def sklearn_vs_aenmf(path: str, rank: int, n_cells: int, epochs: int) -> dict[str, Any]:
    """scikit-learn NMF vs aenmf on the first ``n_cells`` cells: wall time and relative reconstruction error."""
    from sklearn.decomposition import NMF

    source = AnnDataCSRSource(Path(path))
    X = source.read(0, n_cells)
    norm = sp.linalg.norm(X)
    start = time.perf_counter()
    nmf = NMF(rank, init="nndsvda", solver="cd", max_iter=100, random_state=0)
    H = nmf.fit_transform(X)
    sk_wall = time.perf_counter() - start
    sk_err = float(np.sqrt(max(norm**2 - 2 * (X.multiply(H @ nmf.components_)).sum() + np.linalg.norm(H @ nmf.components_) ** 2, 0)) / norm)
    rows = np.arange(n_cells)
    data = SplitData(X=X, train=rows, val=np.arange(0), batch=np.zeros(n_cells, dtype=np.int64), batch_names=["all"])
    model = build_model(parse_model_config({"type": "aenmf", "rank": rank}),
                        TrainConfig(max_epochs=epochs, batch_size=1024, lr=1e-2, patience=0, progress=False))
    start = time.perf_counter()
    model.fit(data)
    ours_wall = time.perf_counter() - start
    recon = model.reconstruct(data, rows)
    ours_err = float(np.linalg.norm(X.toarray() - recon) / norm)
    return {"cells": n_cells, "sklearn_s": sk_wall, "sklearn_rel_err": sk_err, "aenmf_s": ours_wall, "aenmf_rel_err": ours_err}


def drop_page_cache() -> bool:
    """Ask the kernel to drop its page cache (root only) so that reads come from the disk."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16_384)
    parser.add_argument("--chunk-size", type=int, default=1_000_000)
    parser.add_argument("--models", nargs="+", default=["aenmf", "cond_aenmf"])
    parser.add_argument("--loaders", action="store_true", help="also time the loader alone (log-normalised and raw-count files) against backed AnnData")
    parser.add_argument("--skip-models", action="store_true", help="no streamed models, bare step or scikit-learn NMF (with --loaders: the loaders alone)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per loader configuration (median reported)")
    parser.add_argument("--annbatch-python", default=None, help="interpreter of an environment with annbatch (Python >= 3.12): adds annbatch to --loaders")
    parser.add_argument("--sk-cells", type=int, default=50_000)
    parser.add_argument("--sk-rank", type=int, default=80)
    parser.add_argument("--sk-epochs", type=int, default=20)
    parser.add_argument("--workdir", default=None, help="where the .h5ad files go (default: a temporary directory)")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scatlas_atlas_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        path = workdir / f"onek1k_{n}.h5ad"
        start = time.perf_counter()
        if not path.exists():
            write_resampled(path, n)
        size_gb = path.stat().st_size / 2**30
        print(f"N={n:,}: {path} ({size_gb:.1f} GB) ready in {time.perf_counter() - start:.0f} s; page cache dropped: {drop_page_cache()}", flush=True)
        for kind in [] if args.skip_models else args.models:
            rows.append((f"scatlas {kind} (streamed)", n, isolated(stream_run, str(path), kind, args.rank, args.batch_size, args.chunk_size)))
            print(rows[-1], flush=True)
        if args.loaders:
            counts_path = workdir / f"onek1k_{n}_counts.h5ad"
            if not counts_path.exists():
                write_resampled(counts_path, n, counts=True)
            for what, file, counts in (("log-normalised", path, False), ("counts → lognorm, 500 genes", counts_path, True)):
                zarr_file = write_zarr_copy(file)
                runs: list[tuple[str, Any, tuple[Any, ...]]] = [
                    ("scatlas loader, .h5ad", loader_run, (str(file), counts, args.batch_size, args.chunk_size)),
                    ("backed AnnData + scanpy (peer), .h5ad", backed_anndata_run, (str(file), counts, args.batch_size, args.chunk_size)),
                    ("scatlas loader, .zarr", loader_run, (str(zarr_file), counts, args.batch_size, args.chunk_size))]
                if args.annbatch_python:
                    # a fetch of about --chunk-size cells in chunks of a quarter minibatch (annbatch needs whole minibatches per fetch)
                    chunk = max(1, args.batch_size // 4)
                    preload = 4 * max(1, round(args.chunk_size / chunk / 4))
                    runs += [("annbatch (512 × 32, its default), .zarr", annbatch_run, (args.annbatch_python, zarr_file, counts, args.batch_size, 512, 32, "backed", workdir)),
                             (f"annbatch ({chunk} × {preload}), .zarr", annbatch_run, (args.annbatch_python, zarr_file, counts, args.batch_size, chunk, preload, "backed", workdir))]
                    if not counts:
                        runs.append((f"annbatch ({chunk} × {preload}), its preshuffled zarr", annbatch_run,
                                     (args.annbatch_python, file, counts, args.batch_size, chunk, preload, "zarr", workdir)))
                for name, fn, fn_args in runs:
                    rows.append((f"{name}, {what}", n, median_run(args.repeats, fn, *fn_args)))
                    print(rows[-1], flush=True)
        if n == args.sizes[0] and not args.skip_models:
            rows.append(("bare PyTorch step (pinned host)", n, isolated(bare_run, str(path), args.rank, args.batch_size, args.chunk_size)))
            print(rows[-1], flush=True)
            sk = isolated(sklearn_vs_aenmf, str(path), args.sk_rank, args.sk_cells, args.sk_epochs)
            print(f"scikit-learn NMF vs aenmf (rank {args.sk_rank}, {args.sk_cells:,} cells): {sk}", flush=True)
    print(f"\nrank {args.rank}, batch {args.batch_size:,}, chunk {args.chunk_size:,} cells, {os.cpu_count()} CPUs")
    print(f"{'what':76s} {'cells':>12s} {'wall s':>8s} {'cells/s':>12s} {'GPU %':>6s} {'peak RSS GB':>12s} {'peak GPU GB':>12s}")
    for name, n, r in rows:
        if "error" in r:
            print(f"{name:76s} {n:12,d} error: {r['error']}")
        else:
            print(f"{name:76s} {n:12,d} {r['wall_s']:8.1f} {r['cells_per_s']:12,.0f} {r.get('gpu_util', float('nan')):6.0f} "
                  f"{r['peak_rss_gb']:12.2f} {r.get('peak_gpu_gb', float('nan')):12.2f}")


if __name__ == "__main__":
    main()
