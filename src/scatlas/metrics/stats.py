"""Aggregation of per-fold results: mean, SD, SEM and t-distribution confidence intervals."""

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
