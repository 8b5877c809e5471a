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
from sklearn.model_selection import train_test_split

from scatlas._io import atomic_path, write_csv
from scatlas.data.dataset import DatasetConfig, load_dataset
from scatlas.data.preprocess import preprocess_split
from scatlas.experiment.config import TrainingConfig
from scatlas.experiment.runner import ranked_loadings
from scatlas.metrics.classification import classify_embedding
from scatlas.metrics.clustering import leiden_agreement
from scatlas.models.base import SplitData, build_model, parse_model_config

Log = Callable[[str], None]


def fit_factors(dataset: DatasetConfig, model: dict[str, Any], training: TrainingConfig, n_top_genes: int | None = 2000, seed: int = 0) -> tuple[ad.AnnData, str]:
    """Fit a factor model on all cells (10% held out for early stopping); return the results-only AnnData and its key."""
    data = load_dataset(dataset)
    rows = np.arange(data.n_cells)
    train, val = train_test_split(rows, test_size=0.1, random_state=seed)
    train, val = np.sort(train), np.sort(val)
    prep = preprocess_split(data.lognorm, data.var_names, train, n_top_genes, "none")
    sdata = SplitData(X=prep.X, train=train, val=val, batch=np.asarray(data.batch.codes, dtype=np.int64), batch_names=[str(b) for b in data.batch.categories],
                      label=np.asarray(data.label.codes, dtype=np.int64) if data.label is not None else None,
                      label_names=[str(c) for c in data.label.categories] if data.label is not None else None, genes=prep.genes)
    entry = parse_model_config(model)
    fitted = build_model(entry, training.to_train_config(seed, progress=False))
    fitted.fit(sdata)
    key = f"{entry.type}_k{entry.rank}"  # type: ignore[attr-defined]
    obs = pd.DataFrame(index=data.obs.index)
    for column in (dataset.label_key, dataset.batch_key):
        if column:
            obs[column] = data.obs[column].astype(str).to_numpy()
    out = ad.AnnData(obs=obs, var=pd.DataFrame(index=prep.genes))
    out.obsm[f"H_{key}"] = fitted.embed(sdata, rows)
    out.varm[f"W_{key}"] = fitted.loadings()
    out.uns["scatlas_factors"] = {"model": entry.model_dump(mode="json"), "data": str(dataset.path)}
    return out, key


def factor_benchmark(H: np.ndarray, targets: dict[str, np.ndarray], seeds: int = 10) -> dict[str, pd.DataFrame]:
    """Leiden agreement and classification of ``H`` for each target (e.g. cell type, donor), over seeds.

    Returns
    -------
    One table per target: rows ``kind`` ∈ {leiden, classifier names} with mean scores over seeds.
    """
    leiden = leiden_agreement(H, targets, resolution=0.8, n_neighbors=25, seeds=range(seeds))
    tables = {}
    for name, y in targets.items():
        rows = [{"kind": "leiden", **leiden[leiden["target"] == name][["ari", "nmi", "n_clusters"]].mean().to_dict()}]
        runs = pd.concat([classify_embedding(H, y, n_splits=5, seed=s, min_class_size=10) for s in range(max(1, seeds // 2))])
        for clf, group in runs.groupby("classifier", sort=False):
            rows.append({"kind": clf, **group.drop(columns=["classifier"]).mean().to_dict()})
        tables[name] = pd.DataFrame(rows)
    return tables


def run_factors(dataset: DatasetConfig, model: dict[str, Any], training: TrainingConfig, out: str | Path, n_top_genes: int | None = 2000, benchmark_seeds: int = 10, log: Log = print) -> dict[str, pd.DataFrame]:
    """Fit, write ``out`` (.h5ad), ``<out>_loadings.csv`` and ``<out>_benchmark_by_<key>.csv``; return the benchmark tables."""
    out = Path(out)
    adata, key = fit_factors(dataset, model, training, n_top_genes)
    H, W = adata.obsm[f"H_{key}"], adata.varm[f"W_{key}"]
    log(f"{key}: H {H.shape} (min {H.min():.3g}), W {W.shape} (min {W.min():.3g})")
    tables: dict[str, pd.DataFrame] = {}
    targets = {k: adata.obs[k].to_numpy() for k in (dataset.label_key, dataset.batch_key) if k and adata.obs[k].nunique() > 1}
    if benchmark_seeds and targets:
        tables = factor_benchmark(H, targets, benchmark_seeds)
        for name, table in tables.items():
            write_csv(table, out.with_name(f"{out.stem}_benchmark_by_{name}.csv"))
    write_csv(ranked_loadings(W, adata.var_names.to_numpy()), out.with_name(f"{out.stem}_loadings.csv"))
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    return tables
