"""Annotation metrics as scTab reports them, exact and hierarchy-aware.

A prediction is *hierarchically correct* when it equals the true label or is one of its
descendants in the Cell Ontology (predicting an ancestor is wrong). Hierarchically correct
predictions are replaced by the true label before the metrics are computed, so
macro/micro/weighted F1 and the per-class table give hierarchy-aware figures.

The metrics are scikit-learn's (``accuracy_score``, ``balanced_accuracy_score``, ``f1_score``,
``precision_recall_fscore_support`` with ``zero_division=0``), computed in NumPy from per-class
counts so that annotating and transferring labels do not import scikit-learn (about 0.6 s of a
command's start); a test holds them equal to scikit-learn's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


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


def _class_counts(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label of ``labels``: true positives, predictions and true cells (labels outside ``labels`` count for none)."""
    index = pd.Index(labels)
    t, p = index.get_indexer(y_true), index.get_indexer(y_pred)
    n = len(labels)
    hit = (t == p) & (t >= 0)
    return (np.bincount(t[hit], minlength=n), np.bincount(p[p >= 0], minlength=n), np.bincount(t[t >= 0], minlength=n))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, 0 where ``den`` is 0 (scikit-learn's ``zero_division=0``)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _f1(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> np.ndarray:
    """F1 as scikit-learn computes it: ``2 tp / (2 tp + fp + fn)``, 0 when there is no cell either way."""
    return _ratio(2 * tp, n_pred + n_true)


def overall_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | int]:
    """Macro, micro and weighted F1, accuracy and balanced accuracy (the F1s over the labels present in ``y_true``).

    Balanced accuracy is the mean recall of the labels in ``y_true``. Without cells every
    metric is NaN (scikit-learn refuses empty input).
    """
    y_true, y_pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    if not len(y_true):
        return {k: float("nan") for k in ("macro_f1", "micro_f1", "weighted_f1", "accuracy", "balanced_accuracy")} | {"n_cells": 0}
    tp, n_pred, n_true = _class_counts(y_true, y_pred, np.unique(y_true))
    f1 = _f1(tp, n_pred, n_true)
    return {
        "macro_f1": float(f1.mean()),
        "micro_f1": float(_f1(tp.sum(), n_pred.sum(), n_true.sum())),
        "weighted_f1": float(np.average(f1, weights=n_true)),
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(np.mean(tp / n_true)),
        "n_cells": len(y_true),
    }


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 and support of every class in ``y_true`` or ``y_pred``."""
    y_true, y_pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    labels = np.unique(np.concatenate([y_true, y_pred]))
    tp, n_pred, n_true = _class_counts(y_true, y_pred, labels)
    return pd.DataFrame({"label": labels, "precision": _ratio(tp, n_pred), "recall": _ratio(tp, n_true), "f1": _f1(tp, n_pred, n_true), "support": n_true})


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Cells of each true label (rows) called each label (columns).

    Parameters
    ----------
    y_true, y_pred
        True and predicted labels.
    labels
        Row and column order; default: the true labels sorted as rows, the true and predicted
        labels sorted as columns (a label only predicted gets a column, not a row).
    """
    y_true, y_pred = np.asarray(y_true, dtype=str), np.asarray(y_pred, dtype=str)
    rows = list(labels) if labels is not None else sorted(set(y_true))
    cols = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred))
    t, p = pd.Index(rows).get_indexer(y_true), pd.Index(cols).get_indexer(y_pred)
    keep = (t >= 0) & (p >= 0)
    counts = np.bincount(t[keep] * len(cols) + p[keep], minlength=len(rows) * len(cols)).reshape(len(rows), len(cols))
    return pd.DataFrame(counts, index=pd.Index(rows, name="true"), columns=pd.Index(cols, name="predicted"))


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
