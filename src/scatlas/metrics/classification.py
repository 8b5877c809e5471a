"""Cross-validated classification of an embedding (how much label or batch information it holds)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def _classifier(name: str, seed: int) -> ClassifierMixin:
    factories = {
        "logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "knn": lambda: make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=15)),
        "rf": lambda: RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=-1),
        "dummy": lambda: DummyClassifier(strategy="stratified", random_state=seed),
    }
    if name not in factories:
        raise ValueError(f"unknown classifier {name!r}; choose from {sorted(factories)}")
    return factories[name]()


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None, classes: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1 and one-vs-rest macro AUROC.

    Parameters
    ----------
    y_true, y_pred
        True and predicted class of each cell.
    proba
        ``(n_cells, n_classes)`` class probabilities in the order of ``classes`` (for AUROC), or ``None``.
    classes
        Class order of ``proba``.
    """
    scores = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
    if proba is not None:
        if len(classes) == 2:
            scores["auroc"] = float(roc_auc_score(y_true == classes[1], proba[:, 1]))
        else:
            scores["auroc"] = float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=classes))
    return scores


def classify_embedding(
    X: np.ndarray,
    y: np.ndarray,
    classifiers: Sequence[str] = ("logreg", "knn", "rf"),
    n_splits: int = 5,
    seed: int = 0,
    min_class_size: int | None = None,
) -> pd.DataFrame:
    """Cross-validated prediction of ``y`` from the embedding ``X``, with a chance baseline.

    Classes with fewer than ``min_class_size`` cells (default ``n_splits``) are dropped.
    Predictions come from ``StratifiedKFold(n_splits, shuffle=True, random_state=seed)``;
    the stratified dummy classifier gives the chance level.

    Parameters
    ----------
    X
        Embedding, ``(n_cells, n_dims)``.
    y
        Target per cell (cell type, donor, batch).
    classifiers
        Any of ``logreg``, ``knn`` (k = 15), ``rf`` (200 trees); ``dummy`` is always added.
    n_splits
        Cross-validation folds.
    seed
        Seed of folds and classifiers.
    min_class_size
        Smallest class kept.

    Returns
    -------
    One row per classifier: ``classifier, accuracy, balanced_accuracy, macro_f1, auroc, n_cells, n_classes``.
    """
    X, y = np.asarray(X), np.asarray(y).astype(str)
    counts = pd.Series(y).value_counts()
    keep = np.isin(y, counts[counts >= (min_class_size or n_splits)].index)
    X, y = X[keep], y[keep]
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("classification needs at least two classes with enough cells")
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    rows = []
    for name in [*classifiers, "dummy"]:
        proba = cross_val_predict(_classifier(name, seed), X, y, cv=folds, method="predict_proba")
        pred = classes[proba.argmax(1)]
        rows.append({"classifier": name, **classification_scores(y, pred, proba, classes), "n_cells": len(y), "n_classes": len(classes)})
    return pd.DataFrame(rows)
