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

from scatlas._errors import InputError
from scatlas._io import atomic_path, write_csv
from scatlas.data import AnnDataCSRSource, highly_variable_genes, read_h5ad, validate
from scatlas.data.sources import read_rows
from scatlas.data.dataset import DatasetConfig, load_dataset
from scatlas.data.preprocess import preprocess_split
from scatlas.experiment.config import TrainingConfig
from scatlas.experiment.runner import ranked_loadings
from scatlas.metrics.classification import classify_embedding
from scatlas.metrics.clustering import leiden_agreement
from scatlas.models.base import SplitData, build_model, parse_model_config

Log = Callable[[str], None]


def _str_categorical(column: pd.Series) -> pd.Series:
    """``column`` as a categorical with string categories (without one string object per cell)."""
    column = column.astype("category")
    return column.cat.rename_categories([str(c) for c in column.cat.categories])


def _codes(obs: pd.DataFrame, key: str | None) -> tuple[np.ndarray, list[str]] | None:
    if not key:
        return None
    column = _str_categorical(obs[key])
    return column.cat.codes.to_numpy().astype(np.int64), list(column.cat.categories)


def _split_data(X: Any, obs: pd.DataFrame, dataset: DatasetConfig, genes: np.ndarray, seed: int) -> SplitData:
    """All cells of ``X`` with 10% held out (seeded) for early stopping; batch and label codes from ``obs``."""
    train, val = train_test_split(np.arange(len(obs)), test_size=0.1, random_state=seed)
    batch = _codes(obs, dataset.batch_key) or (np.zeros(len(obs), dtype=np.int64), ["all"])
    label = _codes(obs, dataset.label_key)
    return SplitData(X=X, train=np.sort(train), val=np.sort(val), batch=batch[0], batch_names=batch[1],
                     label=label[0] if label else None, label_names=label[1] if label else None, genes=genes)


def streamed_source(dataset: DatasetConfig, n_top_genes: int | None, seed: int, hvg_cells: int = 50_000) -> tuple[AnnDataCSRSource, pd.DataFrame, np.ndarray]:
    """A source streaming ``dataset`` from disk (normalised per chunk when it holds counts), its obs and genes.

    The file is validated in chunks; highly variable genes are chosen on ``hvg_cells`` random
    cells read in one pass over the file. Only ``obs`` is held in memory.
    """
    if dataset.filter:
        raise InputError(f"{dataset.path}: `filter` is not supported when streaming; subset the file first")
    adata = read_h5ad(dataset.path, backed=True)
    validate(adata, batch_key=dataset.batch_key, label_key=dataset.label_key, layer=dataset.layer, require_counts=dataset.input == "counts")
    obs, var_names = adata.obs.copy(), adata.var_names.to_numpy()
    adata.file.close()
    source = AnnDataCSRSource(dataset.path, layer=dataset.layer, normalize=dataset.input == "counts")
    n = len(obs)
    if not n_top_genes or n_top_genes >= source.shape[1]:
        return source, obs, var_names
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, hvg_cells), replace=False))
    sampled = read_rows(source, sample)
    genes = highly_variable_genes(sampled, np.arange(sampled.shape[0]), n_top_genes)
    return AnnDataCSRSource(dataset.path, layer=dataset.layer, normalize=dataset.input == "counts", genes=genes), obs, var_names[genes]


def fit_factors(dataset: DatasetConfig, model: dict[str, Any], training: TrainingConfig, n_top_genes: int | None = 2000, seed: int = 0,
                stream: bool = False) -> tuple[ad.AnnData, str]:
    """Fit a factor model on all cells (10% held out for early stopping); return the results-only AnnData and its key.

    With ``stream``, the matrix is never loaded: it is read from the file in chunks of
    ``training.chunk_size`` cells (default 100,000) for gene selection, training and embedding.
    """
    if stream:
        training = training.model_copy(update={"chunk_size": training.chunk_size or 100_000})
        X, obs, genes = streamed_source(dataset, n_top_genes, seed)
    else:
        data = load_dataset(dataset)
        obs = data.obs
        rows = np.arange(data.n_cells)
        train, _ = train_test_split(rows, test_size=0.1, random_state=seed)
        prep = preprocess_split(data.lognorm, data.var_names, np.sort(train), n_top_genes, "none")
        X, genes = prep.X, prep.genes
    sdata = _split_data(X, obs, dataset, genes, seed)
    entry = parse_model_config(model)
    fitted = build_model(entry, training.to_train_config(seed, progress=False))
    fitted.fit(sdata)
    key = f"{entry.type}_k{entry.rank}"  # type: ignore[attr-defined]
    out = ad.AnnData(obs=pd.DataFrame({c: _str_categorical(obs[c]).to_numpy() for c in (dataset.label_key, dataset.batch_key) if c}, index=obs.index),
                     var=pd.DataFrame(index=genes))
    out.obsm[f"H_{key}"] = fitted.embed(sdata, np.arange(len(obs)))
    out.varm[f"W_{key}"] = fitted.loadings()
    out.uns["scatlas_factors"] = {"model": entry.model_dump(mode="json"), "data": str(dataset.path), "streamed": stream}
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


def run_factors(dataset: DatasetConfig, model: dict[str, Any], training: TrainingConfig, out: str | Path, n_top_genes: int | None = 2000, benchmark_seeds: int = 10,
                log: Log = print, stream: bool = False) -> dict[str, pd.DataFrame]:
    """Fit, write ``out`` (.h5ad), ``<out>_loadings.csv`` and ``<out>_benchmark_by_<key>.csv``; return the benchmark tables."""
    out = Path(out)
    adata, key = fit_factors(dataset, model, training, n_top_genes, stream=stream)
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
