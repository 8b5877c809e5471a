"""Integration quality: scatlas embeddings against PCA, Harmony and scVI on every multi-batch shared dataset.

For each dataset, every method is fitted on **all cells** without labels:

* ``PCA`` (peer, the unintegrated reference): scanpy's recipe — ``normalize_total``, ``log1p``,
  2,000 ``seurat`` highly variable genes, 50-component PCA;
* ``Harmony`` (peer): ``harmonypy.run_harmony`` on those 50 PCs, its defaults (its time includes
  computing them, as each method's time covers all its preprocessing);
* ``scVI`` (peer): ``scvi.model.SCVI`` with its defaults on the raw counts of the same 2,000 genes,
  ``--scvi-epochs`` epochs (200, as in issue 18);
* every scatlas embedding model through ``scatlas.tl.embed`` with its defaults (2,000 HVGs,
  early stopping on 10% held-out cells), plus any ``--variant NAME=MODEL:JSON_OPTIONS``.

Each embedding is scored twice on the same ``.obsm``: by ``scatlas.tl.benchmark`` and by
scib-metrics' ``Benchmarker`` (its default metrics, its own pynndescent graph), both with the PCA
above as the pre-integration reference. The table gives Bio / Batch / Total of scatlas' scoring,
scib-metrics' Total beside it, and the fitting wall time (2 cores here: torch threads as printed).

Needs scvi-tools, harmonypy and scib-metrics in the same environment as scatlas::

    python benchmarks/integration_quality.py [--datasets symphony kang18_samples] [--scvi-epochs 200]
        [--models pca ae fe] [--variant "fe_db=fe:{\\"decoder_batch\\": true}"] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

import scatlas as sa
from _common import SHARED, machine
from scatlas.models.base import REGISTRY, LatentClassifier

DATASETS = {
    "symphony": ("symphony_pbmc_3tech.h5ad", "batch", "cell_type", None),
    "cellbench_5cl_plates": ("cellbench_5cl_celseq2_3plates.h5ad", "batch", "cell_line", ("demuxlet_cls", "SNG")),
    "cellbench_3cl_platforms": ("cellbench_3cl_celseq2_dropseq.h5ad", "batch", "cell_line", None),
    "kang18_samples": ("kang18_muscat_4samples.h5ad", "sample_id", "author_cell_type", None),
    "onek1k_donors": ("onek1k_4types_40donors.h5ad", "donor_id", "cell_type", None),
}
Fit = Callable[[ad.AnnData, str, int], np.ndarray]


def load(name: str) -> tuple[ad.AnnData, str, str]:
    """A shared dataset (raw counts in ``X``), its batch and label columns."""
    file, batch_key, label_key, keep = DATASETS[name]
    adata = ad.read_h5ad(SHARED / file)
    if keep:
        adata = adata[adata.obs[keep[0]] == keep[1]].copy()
    return adata, batch_key, label_key


def scanpy_hvg(adata: ad.AnnData) -> ad.AnnData:
    """Log-normalised copy restricted to 2,000 ``seurat`` HVGs, the raw counts kept in ``layers["counts"]``."""
    lognorm = adata.copy()
    lognorm.layers["counts"] = lognorm.X.copy()
    sc.pp.normalize_total(lognorm)
    sc.pp.log1p(lognorm)
    sc.pp.highly_variable_genes(lognorm, n_top_genes=min(2000, lognorm.n_vars), flavor="seurat")
    return lognorm[:, lognorm.var["highly_variable"]].copy()


def pca_fit(adata: ad.AnnData, batch_key: str, seed: int) -> np.ndarray:
    """scanpy's 50-component PCA of the log-normalised HVGs."""
    return sc.pp.pca(scanpy_hvg(adata).X, n_comps=50, random_state=seed)


def harmony_fit(adata: ad.AnnData, batch_key: str, seed: int) -> np.ndarray:
    """harmonypy on the 50 PCs, grouped by ``batch_key``."""
    import harmonypy

    pcs = pca_fit(adata, batch_key, seed)
    return np.asarray(harmonypy.run_harmony(pcs, adata.obs, [batch_key], random_state=seed, verbose=False).Z_corr)


def scvi_fit(epochs: int) -> Fit:
    """scvi-tools SCVI (defaults: 10-d latent, gene dispersion, ZINB) on the raw counts of the HVGs, ``epochs`` epochs."""

    def fit(adata: ad.AnnData, batch_key: str, seed: int) -> np.ndarray:
        import scvi

        scvi.settings.seed = seed
        hvg = scanpy_hvg(adata)
        scvi.model.SCVI.setup_anndata(hvg, layer="counts", batch_key=batch_key)
        model = scvi.model.SCVI(hvg)
        model.train(max_epochs=epochs, enable_progress_bar=False)
        return model.get_latent_representation()

    return fit


def scatlas_fit(model: str, options: dict) -> Fit:
    """``scatlas.tl.embed`` with its defaults and ``options``."""

    def fit(adata: ad.AnnData, batch_key: str, seed: int) -> np.ndarray:
        work = adata.copy()
        sa.tl.embed(work, model, batch_key=batch_key, key_added="Z", seed=seed, log=lambda _: None, **options)
        return work.obsm["Z"]

    return fit


def scib_totals(adata: ad.AnnData, keys: list[str], batch_key: str, label_key: str) -> pd.Series:
    """scib-metrics' Benchmarker Total per embedding (raw scores, its default metrics)."""
    from scib_metrics.benchmark import Benchmarker

    bench = Benchmarker(adata, batch_key=batch_key, label_key=label_key, embedding_obsm_keys=keys, pre_integrated_embedding_obsm_key="PCA",
                        progress_bar=False)
    bench.benchmark()
    return bench.get_results(min_max_scale=False).drop(index="Metric Type")["Total"].astype(float)


def methods(args: argparse.Namespace) -> dict[str, Fit]:
    """Peers first, then the scatlas models and variants asked for."""
    chosen: dict[str, Fit] = {"PCA": pca_fit, "Harmony": harmony_fit, "scVI": scvi_fit(args.scvi_epochs)}
    for model in args.models:
        chosen[f"scatlas {model}"] = scatlas_fit(model, {})
    for variant in args.variant:
        name, spec = variant.split("=", 1)
        model, _, options = spec.partition(":")
        chosen[f"scatlas {name}"] = scatlas_fit(model, json.loads(options or "{}"))
    return chosen


def main() -> None:
    unsupervised = [m for m, cls in REGISTRY.items() if not cls.needs_labels and not issubclass(cls, LatentClassifier)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--models", nargs="*", default=unsupervised, choices=unsupervised)
    parser.add_argument("--variant", action="append", default=[], help='NAME=MODEL:{"option": value}')
    parser.add_argument("--scvi-epochs", type=int, default=200)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--no-scib", action="store_true", help="skip the scib-metrics cross-check")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(machine(), flush=True)
    fits, rows = methods(args), []
    for name in args.datasets:
        adata, batch_key, label_key = load(name)
        for seed in args.seeds:
            timing: dict[str, float] = {}
            for method, fit in fits.items():  # PCA first: the pre-integration reference of both scorings
                start = time.perf_counter()
                adata.obsm[method] = fit(adata, batch_key, seed)
                timing[method] = time.perf_counter() - start
            keys = list(fits)
            ours = sa.tl.benchmark(adata, keys, label_key=label_key, batch_key=batch_key, pre_key="PCA", seed=seed, log=lambda _: None)
            ours = ours.set_index("Embedding")
            theirs = pd.Series(np.nan, index=keys) if args.no_scib else scib_totals(adata, keys, batch_key, label_key)
            for method in keys:
                rows.append({"dataset": name, "seed": seed, "method": method, "fit_s": timing[method], "Bio": ours.loc[method, "Bio conservation"],
                             "Batch": ours.loc[method, "Batch correction"], "Total": ours.loc[method, "Total"], "scib Total": theirs[method]})
            print(pd.DataFrame([r for r in rows if r["dataset"] == name and r["seed"] == seed]).to_string(index=False, float_format="{:.3f}".format), flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby(["dataset", "method"], sort=False)[["fit_s", "Bio", "Batch", "Total", "scib Total"]].mean()
    print("\nmean over seeds:\n" + summary.to_string(float_format="{:.3f}".format))
    print("\nmean over datasets:\n" + summary.groupby("method", sort=False).mean().to_string(float_format="{:.3f}".format))
    print(f"\nlargest |scatlas − scib-metrics| Total: {(table['Total'] - table['scib Total']).abs().max():.4f}")


if __name__ == "__main__":
    main()
