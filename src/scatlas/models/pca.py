"""PCA baseline, run through the same path as every model so each table has a reference row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field
from sklearn.decomposition import PCA as SkPCA

from scatlas._errors import ConfigError
from scatlas.models.base import EmbeddingModel, ModelConfig, SklearnState, SplitData, register


class PCAConfig(ModelConfig):
    """PCA settings."""

    type: str = "pca"
    n_components: int = Field(50, ge=1)


@register("pca")
class PCA(SklearnState, EmbeddingModel):
    """scikit-learn PCA fitted on the training cells; reconstructions via ``inverse_transform``."""

    Config = PCAConfig
    latent_name = "pca"
    estimator_attr = "pca"

    def fit(self, data: SplitData, checkpoint_dir: Path | None = None, resume: bool = False) -> pd.DataFrame | None:
        """Fit PCA on the dense training matrix (no history)."""
        if not sp.issparse(data.X):
            raise ConfigError("model 'pca' needs the matrix in memory (it densifies the training cells); it cannot be streamed from a "
                              "backed file: load the file, or stream a trained model (ae, fe, aenmf, ...)")
        self.pca = SkPCA(n_components=self._components(len(data.train), data.n_genes), random_state=self.train_config.seed)
        self.pca.fit(data.X[data.train].toarray())
        return None

    def _components(self, n_train: int, n_genes: int) -> int:
        """Components fitted: ``n_components``, at most the training cells less one and the genes."""
        return min(self.config.n_components, n_train - 1, n_genes)  # type: ignore[attr-defined]

    def size_said(self, n_train: int, n_genes: int) -> str | None:
        """A line when fewer components than ``n_components`` can be fitted."""
        n, asked = self._components(n_train, n_genes), self.config.n_components  # type: ignore[attr-defined]
        return None if n == asked else (f"pca: {n} components, not n_components {asked}: at most the training cells less one ({n_train - 1:,}) "
                                        f"and the genes ({n_genes:,})")

    def embed(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """Principal-component coordinates."""
        return self.pca.transform(data.X[rows].toarray()).astype(np.float32)

    def reconstruct(self, data: SplitData, rows: np.ndarray) -> np.ndarray:
        """Projection back onto the genes."""
        return self.pca.inverse_transform(self.embed(data, rows)).astype(np.float32)
