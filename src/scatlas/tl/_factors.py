"""``scatlas nmf``: non-negative factors of a whole dataset, a results-only AnnData and the published benchmarks.

Writes ``.obsm['H_<model>_k<K>']`` (cells × K), ``.varm['W_<model>_k<K>']`` (genes × K) and a
minimal ``.obs`` (cell type, donor), the genes of every factor ranked by weight, and two benchmark
tables — by cell type and by donor — as in "Non-negative autoencoding of 60 million
transcriptomes": Leiden agreement (z-scored H → kNN 25 → Leiden 0.8 over seeds → ARI/NMI) and
5-fold classification (logistic regression, kNN 15, random forest 200 → macro F1, accuracy,
AUROC; classes under 10 cells dropped) over seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scatlas._errors import ConfigError, InputError
from scatlas._io import atomic_path, check_output_file, checkpoints_beside, resumable_training, write_csv
from scatlas.data.io import on_disk, read_anndata, record_input
from scatlas.data.dataset import DatasetConfig, apply_filter
from scatlas.settings import TrainingConfig
from scatlas.metrics.classification import classify_embedding
from scatlas.metrics.clustering import leiden_agreement
from scatlas.models.base import parse_model_config
from scatlas.tl._embed import embed, results_obs

Log = Callable[[str], None]


def fit_factors(dataset: DatasetConfig, model: dict[str, Any], training: TrainingConfig, n_top_genes: int | None = 2000, seed: int = 0,
                stream: bool = False, log: Log = print, checkpoint_dir: Path | None = None, resume: bool = False) -> tuple[ad.AnnData, str]:
    """Fit a factor model on all cells (10% held out for early stopping); return the results-only AnnData and its key.

    This is :func:`scatlas.tl.embed` (``checkpoint_dir`` and ``resume`` as there); with ``stream``
    on the backed file, so the matrix is never loaded: it is read in chunks of
    ``training.chunk_size`` cells (default 100,000) for validation, gene selection, training and
    embedding.
    """
    entry = parse_model_config(model)
    key = f"{entry.type}_k{entry.rank}"  # type: ignore[attr-defined]
    if stream and dataset.filter:
        raise InputError(f"{dataset.path}: `filter` is not supported when streaming; subset the file first")
    adata = read_anndata(dataset.path, backed=stream or dataset.backed)
    if dataset.filter:
        adata = apply_filter(adata, dataset.filter)
    if on_disk(adata) and not stream:
        adata = adata.to_memory()
    options = {k: v for k, v in model.items() if k != "type"}
    result = embed(adata, entry.type, batch_key=dataset.batch_key, label_key=dataset.label_key, layer=dataset.layer, input=dataset.input,
                   key_added=f"H_{key}", n_top_genes=n_top_genes, seed=seed, log=log, checkpoint_dir=checkpoint_dir, resume=resume, **options,
                   **training.model_dump(exclude_unset=True))  # only what was set: embed says which settings a model does not use
    obs, genes, H, W = adata.obs, result.prep.genes, adata.obsm[f"H_{key}"], result.loadings()
    out = ad.AnnData(obs=results_obs(obs), var=pd.DataFrame(index=genes))
    out.obsm[f"H_{key}"] = H
    out.varm[f"W_{key}"] = W
    out.uns["scatlas_factors"] = {"model": entry.model_dump(mode="json"), "data": str(dataset.path), "streamed": stream}
    record_input(out, adata)
    return out, key


def ranked_loadings(W: np.ndarray, genes: np.ndarray | None, top: int = 50) -> pd.DataFrame:
    """The ``top`` genes of every factor of a genes × K loading matrix, by weight."""
    genes = np.asarray(genes) if genes is not None else np.arange(W.shape[0]).astype(str)
    rows = []
    for k in range(W.shape[1]):
        order = np.argsort(-W[:, k])[:top]
        rows += [{"factor": k, "rank": r + 1, "gene": genes[g], "weight": float(W[g, k])} for r, g in enumerate(order)]
    return pd.DataFrame(rows)


def classifier_seeds(seeds: int) -> int:
    """Seeds of :func:`factor_benchmark`'s cross-validated classifiers for ``seeds`` Leiden seeds (half, at least one)."""
    return max(1, seeds // 2)


def factor_benchmark(H: np.ndarray, targets: dict[str, np.ndarray], seeds: int = 10) -> dict[str, pd.DataFrame]:
    """Leiden agreement and classification of ``H`` for each target (e.g. cell type, donor), over seeds.

    Returns
    -------
    One table per target: rows ``kind`` ∈ {leiden, classifier names} with mean scores over seeds
    (``n_cells`` / ``n_classes`` of the classifiers as integers; a column a row has no value in is
    missing).
    """
    leiden = leiden_agreement(H, targets, resolution=0.8, n_neighbors=25, seeds=range(seeds))
    tables = {}
    for name, y in targets.items():
        rows = [{"kind": "leiden", **leiden[leiden["target"] == name][["ari", "nmi", "n_clusters"]].mean().to_dict()}]
        runs = pd.concat([classify_embedding(H, y, n_splits=5, seed=s, min_class_size=10) for s in range(classifier_seeds(seeds))])
        for clf, group in runs.groupby("classifier", sort=False):
            rows.append({"kind": clf, **group.drop(columns=["classifier"]).mean().to_dict()})
        tables[name] = pd.DataFrame(rows).astype({"n_cells": "Int64", "n_classes": "Int64"})
    return tables


def run_factors(dataset: DatasetConfig, model: dict[str, Any], training: TrainingConfig, out: str | Path, n_top_genes: int | None = 2000, benchmark_seeds: int = 10,
                log: Log = print, stream: bool = False, overwrite: bool = False, resume: bool = False) -> dict[str, pd.DataFrame]:
    """Fit, write ``out`` (.h5ad), ``<out>_loadings.csv`` and ``<out>_benchmark_by_<key>.csv``; return the benchmark tables.

    An existing ``out`` is refused unless ``overwrite``, and the input file always. The files are
    written once everything is computed, ``out`` last; a failure or interruption leaves none of
    them. An AE-NMF's training checkpoint is kept beside ``out`` until then
    (:func:`~scatlas._io.resumable_training`), and ``resume`` continues it.
    """
    if benchmark_seeds < 0:
        raise ConfigError(f"benchmark_seeds: {benchmark_seeds}; Leiden seeds of the benchmark, 0 for none")
    out = check_output_file(out, ".h5ad", overwrite, inputs=(dataset.path,))
    with resumable_training(checkpoints_beside(out), resume, overwrite, log) as checkpoints:
        adata, key = fit_factors(dataset, model, training, n_top_genes, stream=stream, log=log, checkpoint_dir=checkpoints, resume=resume)
        H, W = adata.obsm[f"H_{key}"], adata.varm[f"W_{key}"]
        log(f"{key}: H {H.shape} (min {H.min():.3g}), W {W.shape} (min {W.min():.3g})")
        tables: dict[str, pd.DataFrame] = {}
        targets = {k: adata.obs[k].to_numpy() for k in (dataset.label_key, dataset.batch_key) if k and adata.obs[k].nunique() > 1}
        if benchmark_seeds and targets:
            log(f"benchmark of H by {' and '.join(targets)}: Leiden over {benchmark_seeds} seeds, 5-fold logistic regression / kNN / random "
                f"forest over {classifier_seeds(benchmark_seeds)}; usually the longest step (--benchmark-seeds: fewer is faster, 0 skips it)")
            tables = factor_benchmark(H, targets, benchmark_seeds)
        files = {out.with_name(f"{out.stem}_benchmark_by_{name}.csv"): table for name, table in tables.items()}
        files[out.with_name(f"{out.stem}_loadings.csv")] = ranked_loadings(W, adata.var_names.to_numpy())
        written: list[Path] = []
        try:
            for path, table in files.items():
                written.append(write_csv(table, path))
            with atomic_path(out) as tmp:
                adata.write_h5ad(tmp)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
    return tables
