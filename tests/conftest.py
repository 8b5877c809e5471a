"""Shared fixtures: the real datasets under ../shared/data (required, never skipped)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _ctrl_c_stops_the_tests():
    """A command invoked in-process turns Ctrl-C into exit 130 (as it must for users); re-raise it here so pytest stops."""
    yield
    cli = sys.modules.get("scatlas.cli")
    if cli is not None and cli.last_interrupt == signal.SIGINT:
        cli.last_interrupt = None
        raise KeyboardInterrupt


def data_path(name: str) -> Path:
    """Path of a shared dataset; fails loudly when the folder is missing."""
    path = DATA / name
    if not path.exists():
        pytest.fail(f"real test data missing: {path} (the repository expects ../shared/data beside it)")
    return path


@pytest.fixture(scope="session")
def cellbench5_path() -> Path:
    return data_path("cellbench_5cl_celseq2_3plates.h5ad")


@pytest.fixture(scope="session")
def cellbench3_path() -> Path:
    return data_path("cellbench_3cl_celseq2_dropseq.h5ad")


@pytest.fixture(scope="session")
def symphony_path() -> Path:
    return data_path("symphony_pbmc_3tech.h5ad")


@pytest.fixture(scope="session")
def cepo_path() -> Path:
    return data_path("cepo_pancreas_3batches_beta_ductal.h5ad")


@pytest.fixture(scope="session")
def symphony_pca(symphony_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """30-d PCA of log-normalised Symphony PBMCs with cell types and chemistries (real cells)."""
    from sklearn.decomposition import PCA

    from scatlas.data import normalize_log1p

    adata = ad.read_h5ad(symphony_path)
    X = normalize_log1p(sp.csr_matrix(adata.X)).toarray()
    pcs = PCA(30, random_state=0).fit_transform(X)
    return pcs, adata.obs["cell_type"].astype(str).to_numpy(), adata.obs["batch"].astype(str).to_numpy()


_PEAK_SCRIPT = """
import sys
from pathlib import Path
from scatlas.cli import main

def rss(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field)) / 2**20

import scatlas.tl._factors, scatlas.models, lightning  # everything the command imports, before the baseline
print("baseline", rss("VmRSS:"))
try:
    main(sys.argv[1:])  # the program as users run it (its garbage-collector settings too); exits with the command's code
finally:
    print("peak", rss("VmHWM:"))
"""


def streamed_peak(tmp_path: Path, src: ad.AnnData, n: int, args: list[str]) -> tuple[float, float, Path]:
    """Write ``n`` cells resampled from ``src`` (raw counts) as a CSR .h5ad; run ``scatlas ARGS`` in a fresh process, with
    ``{data}`` in ARGS replaced by that file and ``{out}`` by an output path; return its memory growth over the imports (GB),
    the size of the matrix it must not load (GB) and the output path."""
    import subprocess

    from scatlas.data import write_chunked_h5ad

    rows = np.random.default_rng(0).integers(0, src.n_obs, n)
    counts = src.X.tocsr()
    obs = src.obs[["donor_id", "cell_type"]].iloc[rows].reset_index(drop=True)
    path = tmp_path / f"cells_{n}.h5ad"
    write_chunked_h5ad(path, (counts[rows[a : a + 50_000]] for a in range(0, n, 50_000)), obs.set_index(np.arange(n).astype(str)), src.var[[]])
    out = tmp_path / f"{args[0]}_{n}"
    command = [a.replace("{data}", str(path)).replace("{out}", str(out)) for a in args]
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, *command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    numbers = dict(line.split() for line in done.stdout.splitlines() if line.startswith(("baseline", "peak")))
    return float(numbers["peak"]) - float(numbers["baseline"]), counts[rows].nnz * 8 / 2**30, out
