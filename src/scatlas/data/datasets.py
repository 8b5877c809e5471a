"""Bundled demo data: real cells that ship with a dependency, so the demo needs no network."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

#: What the demo adds to the real cells, printed by ``scatlas demo`` and stated in the README.
DEMO_NOTE = (
    "demo data: scanpy's pbmc68k_reduced (700 real PBMCs, 765 genes, log-normalised, 10 `bulk_labels`). "
    "It has no batches, so the cells are split at random into batches 'A' and 'B' and a synthetic "
    "batch effect is added to 'B' (each gene's expression multiplied by a log-normal factor, sd 0.5)."
)


def demo_pbmc(seed: int = 0) -> ad.AnnData:
    """Real PBMCs from scanpy with a synthetic two-batch effect (see :data:`DEMO_NOTE`).

    Returns
    -------
    AnnData with log-normalised ``X`` (CSR), ``obs['cell_type']`` (the ``bulk_labels``)
    and ``obs['batch']`` (``A`` / ``B``).
    """
    pbmc = sc.datasets.pbmc68k_reduced()
    raw = pbmc.raw.to_adata()
    rng = np.random.default_rng(seed)
    batch = np.where(rng.random(raw.n_obs) < 0.5, "A", "B")
    expr = np.expm1(sp.csr_matrix(raw.X, dtype=np.float32).toarray())
    factors = rng.lognormal(mean=0.0, sigma=0.5, size=raw.n_vars).astype(np.float32)
    expr[batch == "B"] *= factors
    X = sp.csr_matrix(np.log1p(expr).astype(np.float32))
    out = ad.AnnData(X=X, obs=pbmc.obs[["bulk_labels"]].rename(columns={"bulk_labels": "cell_type"}).copy(), var=raw.var[[]].copy())
    out.obs["cell_type"] = out.obs["cell_type"].astype(str)
    out.obs["batch"] = batch
    out.uns["source"] = DEMO_NOTE
    return out
