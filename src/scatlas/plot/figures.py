"""Matplotlib figures (headless backend): each is written atomically to ``path``, or returned open when ``path`` is ``None``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scatlas._io import save_figure  # noqa: E402
from scatlas.metrics.annotation import confusion_counts  # noqa: E402


def _finish(fig: plt.Figure, path: str | Path | None) -> Any:
    """Save ``fig`` atomically to ``path`` and return the path; with ``path=None`` return the open figure."""
    return fig if path is None else save_figure(fig, path)


def loss_curves(history: pd.DataFrame, path: str | Path | None, title: str = "") -> Any:
    """Plot every ``train_*`` / ``val_*`` column of an epoch history against ``epoch``.

    One panel per loss term (``loss``, ``recon``, ...), train solid and validation dashed; an
    ensemble's history (a ``member`` column) gets one pair of curves per member.
    """
    terms = sorted({c.split("_", 1)[1] for c in history.columns if c.startswith(("train_", "val_"))})
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    groups = history.groupby("member") if "member" in history else [(None, history)]
    for ax, term in zip(axes[0], terms, strict=True):
        for member, part in groups:
            for prefix, style in (("train", "-"), ("val", "--")):
                column = f"{prefix}_{term}"
                if column in part:
                    ax.plot(part["epoch"], part[column], style, label=prefix if member is None else f"{prefix}, member {member}")
        ax.set_xlabel("epoch")
        ax.set_title(term)
        ax.legend(frameon=False)
    fig.suptitle(title)
    return _finish(fig, path)


def umap_coordinates(X: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.5) -> np.ndarray:
    """2-D UMAP of an embedding (scanpy ``neighbors`` + ``umap``, as scMEDAL)."""
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(np.asarray(X, dtype=np.float32))
    sc.pp.neighbors(tmp, n_neighbors=min(n_neighbors, len(X) - 1), use_rep="X", random_state=seed)
    sc.tl.umap(tmp, min_dist=min_dist, random_state=seed)
    return tmp.obsm["X_umap"]


#: Colour of cells whose value is missing (scanpy's ``na_color``), drawn first, under the others.
NA_COLOUR = "lightgray"

#: A numeric column with more distinct values than this is drawn on a colour scale, not as categories.
MAX_CATEGORIES = 25


def _sorted(values: np.ndarray) -> list[Any]:
    """``values`` sorted, by their text where they do not compare (a column mixing numbers and strings)."""
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def embedding_panels(
    coords: np.ndarray, colours: Mapping[str, Any], path: str | Path | None, title: str = "", axis: str = "UMAP"
) -> Any:
    """Scatter the 2-D ``coords`` once per entry of ``colours`` (e.g. label, batch), with legends.

    As scanpy draws ``color=``: categories in a categorical's order (else sorted), a numeric
    column of more than :data:`MAX_CATEGORIES` distinct values on a colour scale (e.g. a score),
    and missing values in :data:`NA_COLOUR` as ``NA``.
    """
    fig, axes = plt.subplots(1, len(colours), figsize=(7 * len(colours), 4.5), squeeze=False)
    for ax, (name, column) in zip(axes[0], colours.items(), strict=True):
        values = pd.Series(column)
        missing = values.isna().to_numpy()
        if missing.any():
            ax.scatter(coords[missing, 0], coords[missing, 1], s=6, color=NA_COLOUR, label="NA", linewidths=0)
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric and values.nunique() > MAX_CATEGORIES:
            points = ax.scatter(coords[~missing, 0], coords[~missing, 1], s=6, c=values[~missing].to_numpy(dtype=float), cmap="viridis", linewidths=0)
            fig.colorbar(points, ax=ax, fraction=0.04)
            cats: list[str] = []
        else:
            known = values[~missing]
            order = [c for c in known.cat.categories if c in set(known)] if isinstance(known.dtype, pd.CategoricalDtype) else _sorted(pd.unique(known))
            cats = [str(c) for c in order]
            text = values.astype(str).to_numpy()
            cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
            for i, cat in enumerate(cats):
                mask = ~missing & (text == cat)
                ax.scatter(coords[mask, 0], coords[mask, 1], s=6, color=cmap(i % cmap.N), label=cat, linewidths=0)
        ax.set_title(f"{title} — {name}" if title else name)
        ax.set_xlabel(f"{axis} 1")
        ax.set_ylabel(f"{axis} 2")
        ax.set_xticks([])
        ax.set_yticks([])
        if 0 < len(cats) + missing.any() <= MAX_CATEGORIES:
            ax.legend(markerscale=2.5, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return _finish(fig, path)


def confusion_heatmap(y_true: np.ndarray, y_pred: np.ndarray, path: str | Path | None, title: str = "", labels: list[str] | None = None) -> Any:
    """Row-normalised confusion matrix (true × predicted) with each cell's share and count annotated."""
    table = confusion_counts(y_true, y_pred, labels)
    rows, cols, counts = list(table.index), list(table.columns), table.to_numpy()
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.65 * len(cols), 1.0 + 0.55 * len(rows)))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if counts[i, j]:
                ax.text(j, i, f"{share[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", fontsize=6.5, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return _finish(fig, path)


def per_class_bars(table: pd.DataFrame, path: str | Path | None, value: str = "f1", title: str = "") -> Any:
    """Horizontal bars of ``table[value]`` per ``table['label']``, one colour per ``evaluation``."""
    kinds = list(pd.unique(table["evaluation"])) if "evaluation" in table else [None]
    labels = list(pd.unique(table["label"]))
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.35 * len(labels) * len(kinds)))
    height = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        sub = table if kind is None else table[table["evaluation"] == kind]
        values = sub.set_index("label").reindex(labels)[value].to_numpy()
        ax.barh(np.arange(len(labels)) + k * height, values, height=height, label=kind)
    ax.set_yticks(np.arange(len(labels)) + height * (len(kinds) - 1) / 2, labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel(value)
    ax.set_title(title or f"per-class {value}")
    if kinds != [None]:
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return _finish(fig, path)


def score_table(table: pd.DataFrame, path: str | Path | None, label: str = "Embedding", title: str = "") -> Any:
    """Scores as a coloured table: one row per ``table[label]``, one column per numeric score, colour scaled per column."""
    scores = table.set_index(label).select_dtypes("number")
    span = (scores.max() - scores.min()).replace(0, 1)
    shade = ((scores - scores.min()) / span).fillna(0).to_numpy()
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * scores.shape[1], 1.8 + 0.4 * scores.shape[0]))  # 1.8 in: the title and the slanted score names
    ax.imshow(shade, cmap="YlGnBu", vmin=0, vmax=1.6, aspect="auto")
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            value = scores.iat[i, j]
            ax.text(j, i, "n/a" if pd.isna(value) else f"{value:.3f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(scores.shape[1]), scores.columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(scores.shape[0]), scores.index, fontsize=8)
    ax.set_title(title or "benchmark (colour: rank within each column)")
    fig.tight_layout()
    return _finish(fig, path)
