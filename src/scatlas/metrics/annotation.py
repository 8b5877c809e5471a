"""Annotation metrics as scTab reports them, exact and hierarchy-aware.

A prediction is *hierarchically correct* when it equals the true label or is one of its
descendants in the Cell Ontology (predicting an ancestor is wrong). Hierarchically correct
predictions are replaced by the true label before scikit-learn's metrics are computed, so
macro/micro/weighted F1 and the per-class table give hierarchy-aware figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support


def hierarchical_correct(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], reachability: np.ndarray) -> np.ndarray:
    """Boolean per cell: prediction equals the true label or is one of its descendants.

    Parameters
    ----------
    y_true, y_pred
        Labels (elements of ``classes``).
    classes
        Class order of ``reachability``.
    reachability
        ``R[i, j] = 1`` when class ``j`` is class ``i`` or a descendant.
    """
    index = {c: i for i, c in enumerate(classes)}
    t = np.array([index[v] for v in y_true])
    p = np.array([index[v] for v in y_pred])
    return reachability[t, p] > 0


def corrected_predictions(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], reachability: np.ndarray) -> np.ndarray:
    """Predictions with every hierarchically correct one set to the true label (scTab)."""
    ok = hierarchical_correct(y_true, y_pred, classes, reachability)
    return np.where(ok, y_true, y_pred)


def overall_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Macro, micro and weighted F1, accuracy and balanced accuracy (over the labels present in ``y_true``)."""
    labels = np.unique(y_true)
    return {
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(y_true, y_pred, labels=labels, average="micro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "n_cells": float(len(y_true)),
    }


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 and support of every class in ``y_true`` or ``y_pred``."""
    labels = np.unique(np.concatenate([y_true, y_pred]))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return pd.DataFrame({"label": labels, "precision": p, "recall": r, "f1": f, "support": s})


def annotation_tables(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: Sequence[str] | None = None,
    reachability: np.ndarray | None = None,
    strata: pd.DataFrame | None = None,
) -> dict[str, pd.DataFrame]:
    """Every table of an annotation evaluation.

    Parameters
    ----------
    y_true, y_pred
        True and predicted labels.
    classes, reachability
        Class order and ontology reachability (enables the ``hierarchical`` rows).
    strata
        Per-cell columns (assay, dataset, disease, tissue, ...): one table per column.

    Returns
    -------
    ``overall`` (one row per ``evaluation`` ∈ {exact, hierarchical}), ``per_class`` (with an
    ``evaluation`` column) and ``per_<column>`` tables (overall metrics per stratum value).
    """
    y_true, y_pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    kinds = {"exact": y_pred}
    if reachability is not None and classes is not None:
        kinds["hierarchical"] = corrected_predictions(y_true, y_pred, classes, reachability)
    tables = {
        "overall": pd.DataFrame([{"evaluation": k, **overall_metrics(y_true, p)} for k, p in kinds.items()]),
        "per_class": pd.concat([per_class_metrics(y_true, p).assign(evaluation=k) for k, p in kinds.items()], ignore_index=True),
    }
    for column in [] if strata is None else strata.columns:
        values = strata[column].astype(str).to_numpy()
        rows = [
            {"evaluation": k, column: v, **overall_metrics(y_true[values == v], p[values == v])}
            for k, p in kinds.items()
            for v in pd.unique(values)
        ]
        tables[f"per_{column}"] = pd.DataFrame(rows)
    return tables
