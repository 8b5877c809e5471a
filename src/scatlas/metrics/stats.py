"""Aggregation of per-fold results (mean, SD, SEM and t-distribution confidence intervals) and conformal cut-offs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.special import stdtrit  # the t quantile scipy.stats.t.ppf computes, without importing scipy.stats (0.5 s)


def confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of the ``level`` t-interval: ``mean ± t(1 − α/2, n − 1) · SEM``.

    With one value (or all NaN) the ends are NaN.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stdtrit(x.size - 1, 0.5 + level / 2) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


def fold_summary(table: pd.DataFrame, by: Sequence[str] = (), level: float = 0.95) -> pd.DataFrame:
    """Summarise every numeric column of a per-fold table.

    Parameters
    ----------
    table
        One row per fold (and per group in ``by``).
    by
        Grouping columns (e.g. ``model``, ``classifier``).
    level
        Confidence level of the interval.

    Returns
    -------
    Long table: ``*by, metric, mean, sd, sem, ci_low, ci_high, n``.
    """
    groups = table.groupby(list(by), sort=False) if by else [((), table)]
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        numeric = group.drop(columns=list(by)).select_dtypes("number")
        for metric in numeric.columns:
            x = numeric[metric].dropna().to_numpy(dtype=float)
            if metric in ("split", "fold", "epoch"):
                continue
            mean, low, high = confidence_interval(x, level)
            rows.append(
                {
                    **dict(zip(by, key, strict=True)),
                    "metric": metric,
                    "mean": mean,
                    "sd": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
                    "sem": float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan"),
                    "ci_low": low,
                    "ci_high": high,
                    "n": int(x.size),
                }
            )
    return pd.DataFrame(rows)


def conformal_cutoff(scores: np.ndarray, level: float) -> float:
    """The split-conformal cut-off of ``scores`` at ``level``: their ⌈(n + 1) · level⌉-th smallest.

    A new score exchangeable with the ``n`` scores (a cell like those they were measured on)
    exceeds it with probability at most ``1 − level``, whatever their distribution (Vovk et al.
    2005; Angelopoulos & Bates 2021, "A gentle introduction to conformal prediction"), and at
    least ``1 − level − 1/(n + 1)`` when the scores have no ties. When ``(n + 1) · level``
    exceeds ``n`` no score is high enough: the cut-off is infinite. ``np.quantile``'s default
    (linear interpolation) gives no such bound and sits low on few scores: at level 0.99 over
    150 scores, a new one exceeds it with probability about 1.6%.

    Parameters
    ----------
    scores
        ``(n,)`` scores of cells held out from what made them (e.g. distances to centroids the
        cells did not set).
    level
        In (0, 1]: the share of new cells like these that the cut-off keeps below it, at least.
    """
    x = np.asarray(scores, dtype=np.float64)
    k = int(np.ceil((x.size + 1) * level - 1e-9))  # the tolerance keeps e.g. 100 × 0.99 at 99
    return float("inf") if k > x.size else float(np.partition(x, k - 1)[k - 1])
