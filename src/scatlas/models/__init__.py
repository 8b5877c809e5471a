"""Models: every entry of :data:`REGISTRY` can be named as ``type`` in an experiment config."""

from __future__ import annotations


from typing import TYPE_CHECKING

from scatlas._lazy import lazy_attributes
from scatlas.models.base import REGISTRY, EmbeddingModel, LatentClassifier, NeuralModel, SplitData, build_model, register

if TYPE_CHECKING:
    from scatlas.models.autoencoder import AE, AEC, AutoencoderModule
    from scatlas.models.classifiers import CellTypeClassifier, LinearClassifier, MLPClassifier, TabNetClassifier
    from scatlas.models.mec import MEC
    from scatlas.models.mixed_effects import FixedEffectsModule, RandomEffectsModule, ScMEDALFE, ScMEDALFEC, ScMEDALRE
    from scatlas.models.nmf import AENMF, NMF, CondAENMF
    from scatlas.models.pca import PCA

#: The model classes load on first use, each with its module (the mixed-effects and NMF modules import Lightning).
__getattr__ = lazy_attributes(__name__, {
    "AE": "autoencoder", "AEC": "autoencoder", "AutoencoderModule": "autoencoder",
    "CellTypeClassifier": "classifiers", "LinearClassifier": "classifiers", "MLPClassifier": "classifiers", "TabNetClassifier": "classifiers",
    "MEC": "mec", "FixedEffectsModule": "mixed_effects", "RandomEffectsModule": "mixed_effects", "ScMEDALFE": "mixed_effects",
    "ScMEDALFEC": "mixed_effects", "ScMEDALRE": "mixed_effects", "AENMF": "nmf", "NMF": "nmf", "CondAENMF": "nmf", "PCA": "pca",
})

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
