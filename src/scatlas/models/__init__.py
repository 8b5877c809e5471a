"""Models: every entry of :data:`REGISTRY` can be named as ``type`` in an experiment config."""

from scatlas.models import autoencoder, pca  # noqa: F401  (registration)
from scatlas.models.autoencoder import AE, AEC, AutoencoderModule
from scatlas.models.base import REGISTRY, EmbeddingModel, NeuralModel, SplitData, build_model, register
from scatlas.models.pca import PCA

__all__ = ["AE", "AEC", "PCA", "REGISTRY", "AutoencoderModule", "EmbeddingModel", "NeuralModel", "SplitData", "build_model", "register"]
