"""Retrieval metrics of profiles (mean average precision), with copairs' definitions and API.

Pairs follow copairs (Kalinin et al.): a *positive* pair shares every ``pos_sameby`` column
and differs in every ``pos_diffby`` column; a *negative* pair likewise with ``neg_sameby`` /
``neg_diffby``; pairs fitting neither are ignored (a pair fitting both counts in both lists).
Each profile ranks its positive and negative partners by cosine similarity (computed here in
float64 and rounded to float32, as copairs stores them; ties: positives first) and gets an
average precision. ``mean_average_precision`` averages AP per ``sameby`` group and tests it
against a null of random rankings with the same numbers of positives and pairs — generated
exactly as copairs does, so p-values agree for the same seed — then applies
Benjamini–Hochberg.

Unlike copairs (SQL pair joins, per-pair similarity loops) everything here is computed in
row blocks with matrix products and one vectorised sort per block.

Where this module differs from copairs on purpose:

* Cosine similarities are computed in float64 whatever the input dtype (then rounded to
  float32). copairs computes them in the input dtype, so float32 profiles that are nearly
  parallel get similarities whose ranking is rounding noise (e.g. mean AP 0.49 where the
  float64 ranking gives 1.0); with float64 input both agree.
* An all-zero profile has no direction: its similarity to any profile is 0 (scikit-learn's
  convention) and its own scores are NaN. copairs propagates NaN similarities, whose rank
  order is arbitrary (its AP for such a profile can be anything from 0 to 1).

As copairs, ``normalized_average_precision`` is clipped to [−1, 1], and a rule set that yields
no positive or no negative pair at all raises (:class:`~scatlas.UnpairedError`, copairs'
``UnpairedException``); single profiles without positives get NaN scores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from scatlas._errors import InputError, UnpairedError

_BLOCK_ENTRIES = 2**24


def _columns_and_filters(meta: pd.DataFrame, groups: Sequence[Sequence[str]]) -> tuple[pd.DataFrame, list[list[str]]]:
    """An entry that is not a column but a query on one (e.g. ``"Metadata_moa != 'DMSO'"``) only filters rows."""
    queries, parsed = [], []
    for group in groups:
        cols = []
        for entry in group:
            if entry in meta.columns:
                cols.append(entry)
                continue
            match = re.match(r"^\s*`?([A-Za-z_][\w.]*)`?", entry)
            if not match or match.group(1) not in meta.columns:
                raise InputError(f"retrieval: {entry!r} is neither a metadata column nor a query on one; columns: {list(meta.columns)}")
            queries.append(entry)
        parsed.append(cols)
    if queries:
        meta = meta.query(" & ".join(f"({q})" for q in queries))
    return meta, parsed


def _codes(meta: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    return np.stack([pd.factorize(meta[c])[0] for c in columns], axis=1) if columns else np.zeros((len(meta), 0), dtype=np.int64)


def _pair_mask(codes_same: np.ndarray, codes_diff: np.ndarray, rows: slice) -> np.ndarray:
    n = codes_same.shape[0]
    block = np.ones((rows.stop - rows.start, n), dtype=bool)
    for c in range(codes_same.shape[1]):
        block &= codes_same[rows, c][:, None] == codes_same[None, :, c]
    for c in range(codes_diff.shape[1]):
        block &= codes_diff[rows, c][:, None] != codes_diff[None, :, c]
    block[np.arange(block.shape[0]), np.arange(rows.start, rows.stop)] = False
    return block


def _ranked_precision(sim: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, ...]:
    """AP, precision@R, #positives and #pairs of a block of query rows."""
    key = (np.float32(1) - sim).astype(np.float32)
    keys = np.concatenate([np.where(pos, key, np.inf), np.where(neg, key, np.inf)], axis=1)
    rel = np.concatenate([pos, np.zeros_like(neg)], axis=1)
    order = np.argsort(keys, axis=1, kind="stable")
    rel = np.take_along_axis(rel, order, axis=1)
    n_pos = pos.sum(1)
    n_total = n_pos + neg.sum(1)
    tp = rel.cumsum(1)
    k = np.arange(1, rel.shape[1] + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = (tp / k * rel).sum(1) / n_pos
        r = np.maximum(n_pos, 1) - 1
        precision_r = np.where(n_pos > 0, tp[np.arange(len(r)), r] / np.maximum(n_pos, 1), np.nan)
    ap = np.where(n_pos > 0, ap, np.nan)
    return ap, precision_r, n_pos, n_total


def expected_average_precision(n_pos: np.ndarray, n_total: np.ndarray) -> np.ndarray:
    """Expected AP of a random ranking with ``M`` positives among ``L`` items.

    ``E[AP] = (1/L) · [(M − 1)/(L − 1) · (L − H_L) + H_L]`` with ``H_L`` the L-th harmonic number.
    """
    M = np.asarray(n_pos, dtype=np.float64)
    L = np.asarray(n_total, dtype=np.float64)
    harmonic = np.array([np.sum(1.0 / np.arange(1, int(x) + 1)) if x > 0 else 0.0 for x in L])
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = (1.0 / L) * (((M - 1.0) / (L - 1.0)) * (L - harmonic) + harmonic)
    mu = np.where(L == 1, np.where(M == 1, 1.0, 0.0), mu)
    mu = np.where(M == 0, 0.0, mu)
    return np.where(M == L, 1.0, mu)


def average_precision(
    meta: pd.DataFrame,
    feats: np.ndarray,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str],
    neg_sameby: Sequence[str],
    neg_diffby: Sequence[str],
) -> pd.DataFrame:
    """Average precision of every profile at retrieving its positives (cosine similarity).

    Parameters
    ----------
    meta
        One row per profile; columns used by the pair rules (entries that are queries such
        as ``"Metadata_moa != 'DMSO'"`` filter the rows first, as in copairs).
    feats
        ``(n_profiles, n_features)`` profiles.
    pos_sameby, pos_diffby, neg_sameby, neg_diffby
        Pair rules (see the module docstring).

    Returns
    -------
    ``meta`` (filtered, index reset) with ``average_precision``, ``normalized_average_precision``
    (``(AP − E[AP]) / (1 − E[AP])``), ``baseline_corrected_ap`` (``AP − n_pos/n_total``),
    ``precision_at_r`` (R = number of positives), ``n_pos_pairs`` and ``n_total_pairs``.
    Profiles without positives, and all-zero profiles, get NaN scores.

    Raises
    ------
    UnpairedError
        When the rules give no positive pair, or no negative pair, at all (as copairs).
    """
    feats = np.asarray(feats, dtype=np.float64)
    if len(meta) != len(feats):
        raise InputError(f"retrieval: {len(meta)} metadata rows but {len(feats)} profiles")
    keep, (ps, pd_, ns, nd) = _columns_and_filters(meta.reset_index(drop=True), [pos_sameby, pos_diffby, neg_sameby, neg_diffby])
    used = sorted(set(ps + pd_ + ns + nd))
    if not used:
        raise InputError("retrieval: give at least one pair rule column")
    if keep[used].isna().any(axis=None):
        bad = [c for c in used if keep[c].isna().any()]
        raise InputError(f"retrieval: metadata columns {bad} have missing values; drop or fill those rows")
    feats = feats[keep.index.to_numpy()]
    if np.isnan(feats).any():
        raise InputError("retrieval: profiles contain NaN")
    result = keep.reset_index(drop=True)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    unit = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)
    codes = [_codes(result, cols) for cols in (ps, pd_, ns, nd)]
    n = len(result)
    out = {k: np.empty(n) for k in ("ap", "pr", "np", "nt")}
    step = max(1, _BLOCK_ENTRIES // max(2 * n, 1))
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        pos = _pair_mask(codes[0], codes[1], rows)
        neg = _pair_mask(codes[2], codes[3], rows)
        sim = (unit[rows] @ unit.T).astype(np.float32)
        for key, value in zip(("ap", "pr", "np", "nt"), _ranked_precision(sim, pos, neg), strict=True):
            out[key][rows] = value
    n_pos, n_total = out["np"].astype(np.int64), out["nt"].astype(np.int64)
    if not n_pos.any():
        raise UnpairedError(f"retrieval: no positive pairs under pos_sameby={list(pos_sameby)}, pos_diffby={list(pos_diffby)} ({n} profiles)")
    if not (n_total - n_pos).any():
        raise UnpairedError(f"retrieval: no negative pairs under neg_sameby={list(neg_sameby)}, neg_diffby={list(neg_diffby)} ({n} profiles)")
    out["ap"][zero] = out["pr"][zero] = np.nan
    mu = expected_average_precision(n_pos, n_total)
    result["average_precision"] = out["ap"]
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = np.where(n_pos > 0, (out["ap"] - mu) / np.maximum(1 - mu, 1e-10), np.nan)
        result["normalized_average_precision"] = np.clip(normalized, -1.0, 1.0)
        result["baseline_corrected_ap"] = out["ap"] - n_pos / np.where(n_total > 0, n_total, np.nan)
    result["precision_at_r"] = out["pr"]
    result["n_pos_pairs"] = n_pos
    result["n_total_pairs"] = n_total
    return result


def null_average_precision(n_pos: int, n_total: int, null_size: int, seed: int) -> np.ndarray:
    """AP of ``null_size`` random rankings with ``n_pos`` positives among ``n_total`` (float32).

    Each ranking is a seeded random permutation of the ``n_total`` ranks whose first
    ``n_pos`` entries are the positives — the same random stream as copairs' null.
    """
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if n_total < 2**16 else np.uint32
    ranks = np.tile(np.arange(n_total, dtype=dtype), (null_size, 1))
    rng.permuted(ranks, axis=1, out=ranks)
    positives = np.sort(ranks[:, :n_pos], axis=1)
    precision = np.arange(1, n_pos + 1, dtype=np.float32) / (positives + 1)
    return (precision.sum(axis=1) / n_pos).astype(np.float32)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (statsmodels' ``fdr_bh``)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty_like(adjusted)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def mean_average_precision(ap_scores: pd.DataFrame, sameby: Sequence[str], null_size: int, threshold: float, seed: int) -> pd.DataFrame:
    """Mean AP per ``sameby`` group with permutation p-values and Benjamini–Hochberg correction.

    Parameters
    ----------
    ap_scores
        Output of :func:`average_precision`.
    sameby
        Grouping columns (e.g. the compound, or the mechanism of action).
    null_size
        Random rankings in each null distribution.
    threshold
        Significance level of ``below_p`` / ``below_corrected_p``.
    seed
        Seed of the null distributions.

    Returns
    -------
    One row per group: ``*sameby, mean_average_precision, mean_normalized_average_precision,
    p_value, corrected_p_value, below_p, below_corrected_p``. ``p = (#{null > mAP} + 1) /
    (null_size + 1)``, the null of a group being the mean of its members' nulls.
    """
    sameby = list(sameby)
    scores = ap_scores[ap_scores["average_precision"].notna() & (ap_scores["n_pos_pairs"] > 0)].reset_index(drop=True)
    confs, inverse = np.unique(scores[["n_pos_pairs", "n_total_pairs"]].to_numpy(), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    seeds = np.random.default_rng(seed).integers(8096, size=len(confs))
    nulls = np.stack([null_average_precision(int(k), int(m), null_size, int(s)) for (k, m), s in zip(confs, seeds, strict=True)]) if len(confs) else np.zeros((0, null_size), np.float32)
    groups = scores.groupby(sameby, observed=True, sort=True)
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        mean_ap = group["average_precision"].mean()
        null = nulls[inverse[group.index.to_numpy()]].mean(axis=0)
        p = ((null > mean_ap).sum() + 1) / (null_size + 1)
        rows.append({**dict(zip(sameby, key, strict=True)), "mean_average_precision": mean_ap,
                     "mean_normalized_average_precision": group["normalized_average_precision"].mean(), "p_value": p})
    table = pd.DataFrame(rows)
    table["corrected_p_value"] = benjamini_hochberg(table["p_value"].to_numpy())
    table["below_p"] = table["p_value"] < threshold
    table["below_corrected_p"] = table["corrected_p_value"] < threshold
    return table


def fraction_retrieved(map_scores: pd.DataFrame) -> float:
    """Share of groups whose corrected p-value is below the threshold (``below_corrected_p``)."""
    return float(map_scores["below_corrected_p"].mean())
