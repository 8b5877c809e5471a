"""Learned set aggregation of a sample's cells into one profile (CytoSummaryNet architecture).

Per-cell encoder ``Linear(D → width) → LeakyReLU``, sum (or mean) pooling over the cells of a
sample, then ``Linear(width → 256) → LeakyReLU → Linear(256 → out) → LeakyReLU``; no batch norm,
no dropout. Trained with a supervised contrastive loss on cosine similarity (τ = 0.1) where
views of the same label are positives.
"""

from __future__ import annotations

import torch
from torch import nn

from scatlas.data.loaders import Batch
from scatlas.losses import supervised_contrastive


class SetAggregator(nn.Module):
    """Permutation-invariant set model: cells ``(n_sets, n_cells, D)`` → profiles ``(n_sets, out)``.

    Parameters
    ----------
    n_features
        Per-cell feature width ``D``.
    width
        Per-cell encoder width (published: 2048).
    head_width
        Bottleneck of the head (published: 256).
    out_width
        Profile width (published: 2048).
    pooling
        ``sum`` (published) or ``mean``.
    temperature
        Temperature of the supervised contrastive loss.
    """

    def __init__(self, n_features: int, width: int = 2048, head_width: int = 256, out_width: int = 2048, pooling: str = "sum", temperature: float = 0.1) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_features, width), nn.LeakyReLU())
        self.head = nn.Sequential(nn.Linear(width, head_width), nn.LeakyReLU(), nn.Linear(head_width, out_width), nn.LeakyReLU())
        self.out_width = out_width
        self.pooling = pooling
        self.temperature = temperature

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        """Profiles of a stack of equally sized cell sets."""
        h = self.encoder(cells)
        pooled = h.sum(dim=1) if self.pooling == "sum" else h.mean(dim=1)
        return self.head(pooled)

    @torch.no_grad()
    def profile(self, cells: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        """Profile ``(out,)`` of one set of any size ``(n_cells, D)``, for inference: the cells are encoded
        ``chunk_size`` at a time and pooled as they go, so a sample of many cells never holds all its
        encodings (``n_cells × width``); a set of at most ``chunk_size`` cells is :meth:`forward`'s."""
        if len(cells) <= chunk_size:
            return self(cells[None])[0]
        pooled = sum(self.encoder(cells[a : a + chunk_size]).sum(dim=0) for a in range(0, len(cells), chunk_size))
        return self.head((pooled if self.pooling == "sum" else pooled / len(cells))[None])[0]

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Supervised contrastive loss of the views in ``batch["x"]`` labelled ``batch["label"]``."""
        loss = supervised_contrastive(self(batch["x"]), batch["label"], self.temperature)
        return {"contrastive": loss, "loss": loss}
