"""Genomaps: gene expression laid out as images, genes placed by Gromov–Wasserstein transport.

A genomap (Islam & Xing, 2023) arranges genes on a square grid so that co-expressed genes sit
close together: the gene–gene correlation distance matrix is matched to the grid's Euclidean
distance matrix by Gromov–Wasserstein optimal transport (POT), and the transport plan is turned
into a one-to-one gene → pixel assignment (Hungarian algorithm). Any expression profile over the
same genes — a cell type's mean input, its reconstruction, its counterfactual reconstruction "as
if from batch b" — then becomes an image with the same layout, so images can be compared pixel
by pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class GenomapLayout:
    """Where each gene sits on a ``side × side`` grid.

    Attributes
    ----------
    genes
        Column indices (into the expression matrix) of the genes shown.
    pixel
        Flat grid position (``row * side + col``) of each gene in ``genes``.
    side
        Grid width and height.
    """

    genes: np.ndarray
    pixel: np.ndarray
    side: int

    def image(self, profile: np.ndarray) -> np.ndarray:
        """``side × side`` image of an expression profile over all columns (empty pixels: NaN)."""
        out = np.full(self.side * self.side, np.nan)
        out[self.pixel] = np.asarray(profile, dtype=float)[self.genes]
        return out.reshape(self.side, self.side)


def genomap_layout(X: np.ndarray, n_genes: int = 400, seed: int = 0) -> GenomapLayout:
    """Place the ``n_genes`` most variable columns of ``X`` (cells × genes) on a grid by Gromov–Wasserstein.

    Parameters
    ----------
    X
        Expression of the cells the gene correlations are measured on.
    n_genes
        Genes shown (the most variable; GW is cubic in the number of genes).
    seed
        Seed of the tie-breaking jitter.
    """
    import ot

    X = np.asarray(X, dtype=np.float64)
    variance = X.var(0)
    genes = np.sort(np.argsort(-variance)[: min(n_genes, int((variance > 0).sum()))])
    side = int(np.ceil(np.sqrt(len(genes))))
    corr = np.nan_to_num(np.corrcoef(X[:, genes].T))
    C1 = 1.0 - corr
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2).astype(float)
    C2 = np.sqrt(((grid[:, None] - grid[None]) ** 2).sum(-1))
    C1, C2 = C1 / max(C1.max(), 1e-12), C2 / C2.max()
    plan = ot.gromov.gromov_wasserstein(C1, C2, ot.unif(len(genes)), ot.unif(side * side), "square_loss")
    jitter = np.random.default_rng(seed).random(plan.shape) * 1e-12
    _, pixel = linear_sum_assignment(-(plan + jitter))
    return GenomapLayout(genes=genes, pixel=pixel, side=side)


def genomap_figure(panels: dict[str, dict[str, np.ndarray]], layout: GenomapLayout, path: str | Path, title: str = "") -> Path:
    """Grid of genomaps: one row per group (e.g. cell type), one column per profile (input, reconstruction, ...).

    Parameters
    ----------
    panels
        ``{row name: {column name: profile over all genes}}``; every row has the same columns.
    layout
        The shared gene layout.
    path
        PNG to write (atomically).
    """
    import matplotlib.pyplot as plt

    from scatlas._io import save_figure

    rows = list(panels)
    columns = list(panels[rows[0]])
    images = {(r, c): layout.image(panels[r][c]) for r in rows for c in columns}
    vmax = np.nanpercentile(np.concatenate([im[np.isfinite(im)] for im in images.values()]), 99)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.2 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(images[(r, c)], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(c, fontsize=7)
            if j == 0:
                ax.set_ylabel(r, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
