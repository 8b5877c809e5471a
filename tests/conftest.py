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
