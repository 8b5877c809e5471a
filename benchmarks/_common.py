"""Helpers shared by the benchmark scripts: real cells resampled to N, timing, peak memory."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from lightning.pytorch.callbacks import Callback

# ../shared/data beside the checkout; SCATLAS_SHARED_DATA names another copy (gpu_check.sh carries one to the device)
SHARED = Path(os.environ.get("SCATLAS_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def resampled_counts(name: str, n_cells: int, seed: int = 0, thin: float | None = None) -> ad.AnnData:
    """Real cells of a shared dataset drawn with replacement up to ``n_cells`` (CSR counts, obs kept).

    ``thin``: keep each count of a drawn cell with this probability (binomial thinning), so that
    repeated draws of one cell become distinct cells with real expression structure instead of
    exact duplicates (which would make every kNN graph a set of cliques of copies).
    """
    src = ad.read_h5ad(SHARED / name)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, src.n_obs, n_cells)
    X = sp.csr_matrix(src.X, dtype=np.float32)[rows]
    if thin is not None:
        X.data = rng.binomial(X.data.astype(np.int64), thin).astype(np.float32)
        X.eliminate_zeros()
    obs = src.obs.iloc[rows].reset_index(drop=True)
    obs.index = obs.index.astype(str)
    return ad.AnnData(X=X, obs=obs, var=src.var[[]].copy())


def machine() -> str:
    """One line naming the CPU / GPU this ran on."""
    gpu = "no GPU"
    if torch.cuda.is_available():  # nvidia-smi: names the GPU without creating a CUDA context here
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        gpu = query.stdout.strip() or "a CUDA GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}"


class EpochTimer(Callback):
    """Lightning callback keeping the wall time of every training epoch (given to peers such as scvi-tools)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Stop it once the GPU has finished the epoch's work."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def peak_rss_gb() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss``, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


PEAK_LINE = 'print("bench: peak_gb", next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2**20)'
# ``python -c CLI_PROGRAM ARGS...`` runs ``scatlas ARGS...`` and prints its peak RSS; its exit code is the command's
CLI_PROGRAM = f"""
import sys
from scatlas.cli import main
try:
    main(sys.argv[1:])  # the `scatlas` program (its garbage-collector settings too); exits with the command's code
finally:
    {PEAK_LINE}
"""


def fresh_process(program: str, args: list[str], python: str | None = None) -> dict[str, Any]:
    """Run ``python -c program *args`` in a fresh process: its wall time, its peak RSS (GB, from the
    ``bench: peak_gb VALUE`` line of :data:`PEAK_LINE`) and every other ``bench: NAME VALUE`` number
    it prints; ``{"error": last line}`` when it fails."""
    start = time.perf_counter()
    done = subprocess.run([python or sys.executable, "-c", program, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    numbers: dict[str, float] = {}
    for line in done.stdout.splitlines():
        if line.startswith("bench: "):
            name, value = line.split()[1:3]
            numbers[name] = float(value)
    if done.returncode or "peak_gb" not in numbers:
        return {"error": ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]}
    return {"wall_s": wall, "peak_rss_gb": numbers.pop("peak_gb"), **numbers}


def _child(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], q: mp.Queue) -> None:
    try:
        start = time.perf_counter()
        out = fn(*args)
        out.setdefault("wall_s", time.perf_counter() - start)
        out["peak_rss_gb"] = peak_rss_gb()
        if torch.cuda.is_available():
            out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        q.put(out)
    except Exception as exc:  # reported by the parent
        q.put({"error": f"{type(exc).__name__}: {exc}"})


def isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh (spawned) process so its peak memory is its own.

    Spawned, not forked: a fork after OpenMP / CUDA / numba threads started in the parent can hang.
    """
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out = q.get()
    p.join()
    return out
