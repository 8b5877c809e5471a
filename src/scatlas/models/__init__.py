"""Models: every entry of :data:`REGISTRY` can be named as ``type`` in an experiment config."""

from scatlas.models import autoencoder, classifiers, mec, mixed_effects, nmf, pca  # noqa: F401  (registration)
from scatlas.models.autoencoder import AE, AEC, AutoencoderModule
from scatlas.models.classifiers import CellTypeClassifier, LinearClassifier, MLPClassifier, TabNetClassifier
from scatlas.models.base import REGISTRY, EmbeddingModel, LatentClassifier, NeuralModel, SplitData, build_model, register
from scatlas.models.mec import MEC
from scatlas.models.mixed_effects import FixedEffectsModule, RandomEffectsModule, ScMEDALFE, ScMEDALFEC, ScMEDALRE
from scatlas.models.nmf import AENMF, NMF, CondAENMF
from scatlas.models.pca import PCA

__all__ = [
    "AE",
    "AEC",
    "AENMF",
    "CondAENMF",
    "NMF",
    "MEC",
    "PCA",
    "REGISTRY",
    "AutoencoderModule",
    "CellTypeClassifier",
    "LinearClassifier",
    "MLPClassifier",
    "TabNetClassifier",
    "EmbeddingModel",
    "FixedEffectsModule",
    "LatentClassifier",
    "NeuralModel",
    "RandomEffectsModule",
    "ScMEDALFE",
    "ScMEDALFEC",
    "ScMEDALRE",
    "SplitData",
    "build_model",
    "register",
]
