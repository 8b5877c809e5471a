"""MEC: the mixed-effects classifier of scMEDAL.

Features = the standardised concatenation of a fixed-effects latent (scMEDAL-FE/FEC, PCA,
AE, or any ``.obsm`` key given as ``obsm:<key>``) and optionally the random-effects latent
(scMEDAL-RE). Classifiers: random forest (100 trees, seed 42; the published headline), RBF
SVM and a small feed-forward network; chance = a stratified dummy classifier. The scaler
and classifiers are fitted on the training cells of each split and scored on every part.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.base import ClassifierMixin
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from scatlas.metrics.classification import classification_scores
from scatlas.models.base import LatentClassifier, ModelConfig, register

Classifier = Literal["rf", "svm", "ffn"]


class MECConfig(ModelConfig):
    """MEC settings.

    Attributes
    ----------
    fixed
        Name of an earlier model of the experiment (e.g. ``FE``) or ``obsm:<key>``.
    random
        Name of the random-effects model (e.g. ``RE``), or ``None`` for fixed effects only.
    classifiers
        Classifiers besides the dummy baseline.
    n_estimators
        Trees of the random forest.
    """

    type: str = "mec"
    fixed: str
    random: str | None = None
    classifiers: list[Classifier] = Field(default_factory=lambda: ["rf", "svm", "ffn"])
    n_estimators: int = Field(100, ge=1)


@register("mec")
class MEC(LatentClassifier):
    """Mixed-effects classifier: RF / SVM / FFN on fixed (+ random) effects latents vs chance."""

    Config = MECConfig

    @staticmethod
    def sources(config: ModelConfig) -> list[str]:
        """The fixed-effects source, then the random-effects one if given."""
        cfg: MECConfig = config  # type: ignore[assignment]
        return [cfg.fixed] + ([cfg.random] if cfg.random else [])

    def _classifier(self, name: str) -> ClassifierMixin:
        cfg: MECConfig = self.config  # type: ignore[assignment]
        seed = self.train_config.seed
        return {
            "rf": lambda: RandomForestClassifier(n_estimators=cfg.n_estimators, random_state=42, n_jobs=-1),
            "svm": lambda: SVC(kernel="rbf", random_state=seed),
            "ffn": lambda: MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=500, early_stopping=True, random_state=seed),
            "dummy": lambda: DummyClassifier(strategy="stratified", random_state=seed),
        }[name]()

    def fit_predict(self, features: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
        """Fit every classifier on the train part; score and predict every part.

        Returns
        -------
        ``metrics`` (one row per part × classifier: accuracy, balanced accuracy, macro F1)
        and, per part, a table with the true label and one prediction column per classifier.
        """
        cfg: MECConfig = self.config  # type: ignore[assignment]
        scaler = StandardScaler().fit(features["train"])
        scaled = {part: scaler.transform(x) for part, x in features.items()}
        predictions = {part: pd.DataFrame({"y_true": labels[part]}) for part in features}
        rows = []
        for name in [*cfg.classifiers, "dummy"]:
            clf = self._classifier(name).fit(scaled["train"], labels["train"])
            for part, x in scaled.items():
                pred = clf.predict(x)
                predictions[part][name] = pred
                scores = classification_scores(labels[part], pred, None, np.unique(labels["train"]))
                rows.append({"part": part, "classifier": name, **scores})
        return pd.DataFrame(rows), predictions
