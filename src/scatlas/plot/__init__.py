"""Figures: loss curves and embeddings coloured by label and batch."""

from scatlas.plot.figures import embedding_panels, loss_curves, umap_coordinates

__all__ = ["embedding_panels", "loss_curves", "umap_coordinates"]
