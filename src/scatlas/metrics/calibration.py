"""Calibration of predicted probabilities: expected calibration error and temperature scaling."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp


def expected_calibration_error(proba: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017; top-label, equal-width bins, L1).

    ``ECE = Σ_b (n_b / n) · |accuracy_b − mean confidence_b|`` over ``n_bins`` bins of the
    top-class probability on (0, 1]; equals ``torchmetrics``' multiclass calibration error.

    Parameters
    ----------
    proba
        ``(n, n_classes)`` probabilities.
    y
        ``(n,)`` true class indices, or an ``(n, n_classes)`` boolean matrix of the classes that
        satisfy each cell's label (a coarse label is satisfied by its finer classes): the top
        class is then right when it satisfies the label.
    n_bins
        Number of confidence bins.
    """
    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(1)
    top = proba.argmax(1)
    y = np.asarray(y)
    correct = (y[np.arange(len(top)), top] if y.ndim == 2 else top == y).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, y: np.ndarray, max_iter: int = 200) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on held-out cells (Guo et al. 2017).

    ``y``: true class indices, or an ``(n, n_classes)`` boolean matrix of the classes that satisfy
    each cell's label; the likelihood of a label is then the probability summed over those
    classes (as hierarchical cross-entropy trains). A one-dimensional search over ``log T``
    (bounded Brent, ``T`` in [0.01, 100]); ``T > 1`` softens over-confident models. NumPy and
    SciPy only, so a calibration imports no optimiser of torch's (whose first step imports
    ``torch._dynamo``, about 1.4 s).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y)
    outside = np.where(y, 0.0, -np.inf) if y.ndim == 2 else None

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        right = logsumexp(scaled + outside, axis=1) if outside is not None else scaled[np.arange(len(z)), y]
        return float((logsumexp(scaled, axis=1) - right).mean())

    result = minimize_scalar(nll, bounds=(np.log(0.01), np.log(100.0)), method="bounded", options={"xatol": 1e-7, "maxiter": max_iter})
    return float(np.exp(result.x))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
