"""Helpers shared by the benchmark scripts: real cells resampled to N, timing, peak memory."""

from __future__ import annotations

import multiprocessing as mp
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def resampled_counts(name: str, n_cells: int, seed: int = 0) -> ad.AnnData:
    """Real cells of a shared dataset drawn with replacement up to ``n_cells`` (CSR counts, obs kept)."""
    src = ad.read_h5ad(SHARED / name)
    rows = np.random.default_rng(seed).integers(0, src.n_obs, n_cells)
    X = sp.csr_matrix(src.X, dtype=np.float32)[rows]
    obs = src.obs.iloc[rows].reset_index(drop=True)
    obs.index = obs.index.astype(str)
    return ad.AnnData(X=X, obs=obs, var=src.var[[]].copy())


def machine() -> str:
    """One line naming the CPU / GPU this ran on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}"


def _child(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], q: mp.Queue) -> None:
    try:
        start = time.perf_counter()
        out = fn(*args)
        out.setdefault("wall_s", time.perf_counter() - start)
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if torch.cuda.is_available():
            out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        q.put(out)
    except Exception as exc:  # reported by the parent
        q.put({"error": f"{type(exc).__name__}: {exc}"})


def isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh process so its peak memory is its own."""
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out = q.get()
    p.join()
    return out
