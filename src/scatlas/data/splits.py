"""Train / validation / test splits (DESIGN §3).

* :func:`kfold_splits` — the scMEDAL scheme: ``StratifiedKFold`` over ``batch × label``;
  fold *k* tests on part *k*, validates on part *k+1* and trains on the rest.
* :func:`group_splits` — donor / patient split: whole groups are held out (in-distribution
  test on new donors), same rotation of parts.
* :func:`study_splits` — leave one study (dataset, batch) out: out-of-distribution test.

Every split is a :class:`Split` of row indices; :func:`assignment_table` turns a list of
them into the table saved with a run so any result can be reproduced.

:func:`holdout` draws exactly as scikit-learn's ``train_test_split`` (a test holds them equal)
without importing scikit-learn, which the k-fold splits import when first used: annotating and
transferring labels, which need only held-out cells, start about 0.6 s sooner.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from scatlas._errors import ConfigError, InputError

if TYPE_CHECKING:
    from scatlas.data.dataset import CellData
    from scatlas.settings import SplitConfig

SplitKind = Literal["kfold", "donor", "study"]
PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Row indices of one fold's train, validation and test cells (numbered from 1, as scMEDAL)."""

    number: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def part(self, name: str) -> np.ndarray:
        """Indices of ``'train'``, ``'val'`` or ``'test'``."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _rotate(parts: list[np.ndarray]) -> list[Split]:
    k = len(parts)
    splits = []
    for i in range(k):
        test, val = parts[i], parts[(i + 1) % k]
        train = np.concatenate([parts[j] for j in range(k) if j not in (i, (i + 1) % k)])
        splits.append(Split(i + 1, np.sort(train), np.sort(val), np.sort(test)))
    return splits


def kfold_splits(strata: np.ndarray, n_splits: int = 5, seed: int = 0, log: Callable[[str], None] | None = None) -> list[Split]:
    """Stratified k-fold over cells (scMEDAL): test = part k, val = part k+1, train = the rest.

    Parameters
    ----------
    strata
        One value per cell, usually ``batch + '_' + label``.
    n_splits
        Number of folds (≥ 3 so that train is never empty).
    seed
        Shuffling seed.
    log
        Hears one line when some strata hold fewer cells than folds (scikit-learn's two-line
        warning otherwise; ``None``: that line as a ``UserWarning``).
    """
    if n_splits < 3:
        raise InputError(f"kfold split needs n_splits >= 3 (got {n_splits})")
    from sklearn.model_selection import StratifiedKFold

    sizes = pd.Series(strata).value_counts()
    small = sizes[sizes < n_splits]
    if len(small):
        line = (f"{len(small)} of {len(sizes)} strata (batch × label) hold fewer cells than the {n_splits} folds (smallest: "
                f"{small.index[-1]!r}, {small.iloc[-1]} cell{'s' if small.iloc[-1] > 1 else ''}): their cells are tested in only some folds")
        if log is None:
            warnings.warn(line, UserWarning, stacklevel=2)
        else:
            log(line)
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # said above, in one line
        warnings.filterwarnings("ignore", message="The least populated class in y has only", category=UserWarning)
        parts = [test for _, test in skf.split(np.zeros(len(strata)), strata)]
    return _rotate(parts)


def group_splits(groups: np.ndarray, n_splits: int = 5, seed: int = 0) -> list[Split]:
    """Hold out whole groups (donors, patients): test and val groups never appear in train.

    Groups are shuffled with ``seed`` and dealt into ``n_splits`` parts of similar cell
    counts; the parts rotate as in :func:`kfold_splits`.
    """
    uniq = np.unique(groups)
    if len(uniq) < n_splits:
        raise InputError(f"donor split needs at least n_splits={n_splits} groups; found {len(uniq)}: {list(uniq)}")
    if n_splits < 3:
        raise InputError(f"donor split needs n_splits >= 3 (got {n_splits})")
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(seed)
    relabel = dict(zip(uniq, rng.permutation(len(uniq)), strict=True))
    shuffled = np.array([relabel[g] for g in groups])
    parts = [test for _, test in GroupKFold(n_splits=n_splits).split(np.zeros(len(groups)), groups=shuffled)]
    return _rotate(parts)


def study_splits(
    studies: np.ndarray, strata: np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> list[Split]:
    """Leave one study out: each study in turn is the test set; val is drawn from the others.

    Parameters
    ----------
    studies
        Study / dataset / batch of each cell.
    strata
        Stratification labels for the validation draw (usually the cell type).
    val_fraction
        Share of the remaining cells used for validation.
    """
    uniq = np.unique(studies)
    if len(uniq) < 2:
        raise InputError(f"study split needs at least 2 studies; found {list(uniq)}")
    splits = []
    for i, study in enumerate(uniq):
        test = np.flatnonzero(studies == study)
        rest = np.flatnonzero(studies != study)
        train, val = holdout(rest, val_fraction, seed, strata[rest])
        splits.append(Split(i + 1, np.sort(train), np.sort(val), test))
    return splits


def holdout(rows: np.ndarray, size: float | int, seed: int, labels: np.ndarray | None = None, min_count: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Draw a held-out part of ``rows``, stratified by label when the labels allow it.

    Parameters
    ----------
    rows
        The rows to divide.
    size
        The held-out part: a fraction of ``rows`` or a number of rows.
    seed
        Seed of the draw.
    labels
        One label per row. The draw keeps their proportions when every label has at least
        ``min_count`` rows and each part can hold one row of every label; otherwise (or without
        labels) it is a plain random draw.
    min_count
        Fewest rows of a label for a stratified draw.

    Returns
    -------
    The kept and the held-out rows, in :func:`~sklearn.model_selection.train_test_split`'s order.
    """
    rows = np.asarray(rows)
    n_held = int(size) if isinstance(size, (int, np.integer)) else int(np.ceil(size * len(rows)))
    rng = np.random.RandomState(seed)  # noqa: NPY002 (train_test_split's generator, so the draws are its draws)
    if labels is not None:
        codes, counts = np.unique(labels, return_inverse=True, return_counts=True)[1:]
        if counts.min() >= max(min_count, 2) and min(n_held, len(rows) - n_held) >= len(counts):
            members = np.split(np.argsort(codes, kind="stable"), np.cumsum(counts)[:-1])
            n_kept = _apportion(counts, len(rows) - n_held, rng)
            n_out = _apportion(counts - n_kept, n_held, rng)
            kept, held = [], []
            for cells, k, h in zip(members, n_kept, n_out, strict=True):
                drawn = cells[rng.permutation(len(cells))]
                kept.append(drawn[:k])
                held.append(drawn[k : k + h])
            return rows[rng.permutation(np.concatenate(kept))], rows[rng.permutation(np.concatenate(held))]
    order = rng.permutation(len(rows))
    return rows[order[n_held:]], rows[order[:n_held]]


def _apportion(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Rows to draw from each label: the floor of its proportional share, one more for the largest remainders
    (ties broken at random) until ``n_draws`` are drawn (scikit-learn's approximate hypergeometric mode)."""
    share = counts / counts.sum() * n_draws
    taken = np.floor(share)
    missing = int(n_draws - taken.sum())
    remainder = share - taken
    for value in np.unique(remainder)[::-1]:
        if missing <= 0:
            break
        ties = np.flatnonzero(remainder == value)
        chosen = rng.choice(ties, size=min(len(ties), missing), replace=False)
        taken[chosen] += 1
        missing -= len(chosen)
    return taken.astype(int)


def assignment_table(splits: list[Split], cell_ids: np.ndarray) -> pd.DataFrame:
    """One row per cell, one column ``split_<n>`` per split holding train/val/test."""
    table = pd.DataFrame({"cell_id": cell_ids})
    for split in splits:
        column = np.full(len(cell_ids), "", dtype=object)
        for name in PARTS:
            column[split.part(name)] = name
        table[f"split_{split.number}"] = column
    return table


def make_splits(cfg: SplitConfig, group_key: str | None, data: CellData, log: Callable[[str], None] | None = None) -> list[Split]:
    """The splits ``cfg`` describes over ``data`` (``group_key``: donor / study column; ``log``: see :func:`kfold_splits`)."""
    if cfg.kind == "kfold":
        return kfold_splits(data.strata(), cfg.n_splits, cfg.seed, log)
    if group_key is None:
        raise ConfigError(f"split kind {cfg.kind!r} needs a group_key (donor / study column)")
    groups = data.obs[group_key].astype(str).to_numpy()
    if cfg.kind == "donor":
        return group_splits(groups, cfg.n_splits, cfg.seed)
    strata = np.asarray(data.label, dtype=str) if data.label is not None else groups
    return study_splits(groups, strata, cfg.val_fraction, cfg.seed)
