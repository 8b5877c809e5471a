"""AnnData-level figures (floor 2), scanpy style: each takes an AnnData or a result and returns a matplotlib figure.

The CLI and the experiment runner draw the same figures through :mod:`scatlas.plot.figures`
and write them to disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from scatlas._describe import did_you_mean
from scatlas._errors import ConfigError, InputError
from scatlas.data.io import source_name
from scatlas.data.validate import check_obs_keys
from scatlas.plot import figures

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from scatlas.tl import ScatlasModel


def embedding(adata: ad.AnnData, basis: str, color: str | Sequence[str], *, title: str = "", seed: int = 0) -> Figure:
    """Side-by-side scatter panels of an ``.obsm`` embedding, one per ``obs`` column in ``color``, with legends.

    ``basis`` is an ``.obsm`` key; as in scanpy, ``"umap"`` names ``X_umap`` when ``.obsm`` has no
    ``umap``. An embedding of more than two dimensions is first laid out by UMAP (scanpy's neighbours + UMAP).
    As scanpy's ``color=``, categories keep a categorical's order, a numeric column of many values
    (e.g. ``<key>_pred_score``) is drawn on a colour scale, and missing values (e.g. the calls of
    cells without counts) in grey as ``NA``.

    Examples
    --------
    >>> sa.pl.embedding(adata, "X_fe", ["cell_type", "batch"])   # doctest: +SKIP
    """
    if basis not in adata.obsm and f"X_{basis}" in adata.obsm:
        basis = f"X_{basis}"
    if basis not in adata.obsm:
        raise InputError(f"obsm key {basis!r} not found{did_you_mean(basis, adata.obsm)}; available: {list(adata.obsm)}")
    columns = [color] if isinstance(color, str) else list(color)
    if not columns:
        raise ConfigError("color: name at least one obs column to colour the cells by")
    check_obs_keys(adata, columns, missing_ok=True)
    coords = np.asarray(adata.obsm[basis])
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise InputError(f"{source_name(adata)}: obsm key {basis!r} has {coords.shape[1] if coords.ndim == 2 else 1} dimension; a scatter needs at least 2")
    axis = basis.removeprefix("X_").upper()
    if coords.shape[1] > 2:
        coords, axis = figures.umap_coordinates(coords, seed=seed), "UMAP"
    return figures.embedding_panels(coords, {c: adata.obs[c] for c in columns}, None, title or basis, axis=axis)


def loss_curves(result: ScatlasModel | pd.DataFrame, *, title: str = "") -> Figure:
    """Training and validation loss terms per epoch of a fitted model (or of its ``history``).

    Examples
    --------
    >>> model = sa.tl.embed(adata, "ae", batch_key="batch")   # doctest: +SKIP
    >>> sa.pl.loss_curves(model).savefig("loss.png")          # doctest: +SKIP
    """
    history = result if isinstance(result, pd.DataFrame) else result.history
    if history.empty:
        raise InputError("this model has no epoch history (PCA and NMF are not trained by epochs)")
    return figures.loss_curves(history, None, title)


def confusion_matrix(adata: ad.AnnData, truth_key: str, pred_key: str, *, title: str = "") -> Figure:
    """Row-normalised confusion matrix of two ``obs`` columns (true × predicted); a missing value is the class ``NA``.

    Examples
    --------
    >>> sa.tl.transfer(reference, query, label_key="cell_type")                     # doctest: +SKIP
    >>> sa.pl.confusion_matrix(query, "cell_type", "cell_type_pred_label")           # doctest: +SKIP
    """
    check_obs_keys(adata, [truth_key, pred_key], missing_ok=True)
    truth, pred = (adata.obs[key].astype(object).where(adata.obs[key].notna(), "NA").astype(str).to_numpy() for key in (truth_key, pred_key))
    return figures.confusion_heatmap(truth, pred, None, title)


def benchmark_table(table: pd.DataFrame, *, title: str = "") -> Figure:
    """The table of :func:`scatlas.tl.benchmark` as a coloured score table, one row per embedding (its scores; not the Leiden resolution chosen).

    Examples
    --------
    >>> sa.pl.benchmark_table(sa.tl.benchmark(adata, ["X_pca", "X_fe"], label_key="cell_type", batch_key="batch"))  # doctest: +SKIP
    """
    if "Embedding" not in table.columns or table.empty:
        raise InputError(f"table: not a benchmark table (scatlas.tl.benchmark's, one row per embedding: columns 'Embedding', ...); "
                         f"got columns {list(table.columns)[:8]} and {len(table)} rows")
    return figures.score_table(table.drop(columns=["Leiden resolution"], errors="ignore"), None, title=title)


__all__ = ["benchmark_table", "confusion_matrix", "embedding", "loss_curves"]
