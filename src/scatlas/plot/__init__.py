"""Figures: loss curves and embeddings coloured by label and batch."""

from scatlas.plot.figures import confusion_heatmap, embedding_panels, loss_curves, per_class_bars, umap_coordinates

__all__ = ["confusion_heatmap", "embedding_panels", "loss_curves", "per_class_bars", "umap_coordinates"]
