"""Validation before any work (DESIGN §3): keys, values, batches and labels.

Every check raises :class:`~scatlas.InputError` with the file, the key and examples of
the offending values, so that a user can fix the input without a debugger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas._describe import did_you_mean, listed
from scatlas._errors import InputError
from scatlas.data.io import get_matrix, get_var, matrix_name, row_range, source_name, string_categorical, to_csr, uses_raw

#: Rows read at a time when scanning a matrix (keeps backed files out of memory).
CHUNK_ROWS = 50_000


def _examples(values: Iterable[object], n: int = 5) -> str:
    return listed([v.item() if isinstance(v, np.generic) else v for v in values], n, repr)


def check_obs_keys(adata: ad.AnnData, keys: Sequence[str | None], missing_ok: bool = False) -> None:
    """Check that every non-``None`` key is a column of ``adata.obs`` without missing values (``missing_ok``: with at least one value)."""
    src = source_name(adata)
    for key in keys:
        if key is None:
            continue
        if key not in adata.obs.columns:
            raise InputError(f"{src}: obs column {key!r} not found{did_you_mean(key, adata.obs.columns)}; available columns: {list(adata.obs.columns)}")
        missing = adata.obs[key].isna()
        if missing_ok and missing.all():
            raise InputError(f"{src}: obs column {key!r} holds no value (all {len(missing)} are missing)")
        if missing.any() and not missing_ok:
            raise InputError(
                f"{src}: obs column {key!r} has {int(missing.sum())} missing values "
                f"(cells {_examples(adata.obs_names[missing.to_numpy()])})"
            )


def check_embeddings(adata: ad.AnnData, keys: Sequence[str]) -> None:
    """Check that every key is an ``.obsm`` embedding of finite numbers, naming the first cells that are not."""
    src = source_name(adata)
    missing = [k for k in keys if k not in adata.obsm]
    if missing:
        raise InputError(f"{src}: embeddings {missing} not in .obsm; available: {list(adata.obsm)}")
    for key in keys:
        values = np.asarray(adata.obsm[key])
        try:  # numbers are checked as stored (no float64 copy of a large float32 embedding)
            values = (values if values.dtype.kind in "biuf" else values.astype(np.float64)).reshape(adata.n_obs, -1)
        except (TypeError, ValueError):
            raise InputError(f"{src}: .obsm[{key!r}] is not a numeric cells × dimensions array") from None
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            raise InputError(f"{src}: .obsm[{key!r}] has NaN or infinite values in {int(bad.sum())} cells "
                             f"(cells {_examples(adata.obs_names[bad])})")


def with_values(values: pd.Series, source: str, key: str, missing: str, left_out_of: str, log: Callable[[str], None]) -> np.ndarray:
    """Which cells have a value in the obs column ``values`` (named ``key``); one line says how many lack one
    (``missing``: what that means, e.g. "no label") and what they are left out of (``left_out_of``)."""
    present = values.notna().to_numpy()
    if not present.all():
        log(f"{source}: {int((~present).sum())} of {len(present)} cells have {missing} in obs column {key!r}: left out of {left_out_of}")
    return present


def check_groups(adata: ad.AnnData, key: str, min_size: int = 2, min_groups: int = 1) -> None:
    """Check that the groups of ``obs[key]`` are large enough and numerous enough.

    Parameters
    ----------
    key
        A batch, donor or label column.
    min_size
        Smallest allowed number of cells per group (empty and single-cell batches are errors).
    min_groups
        Smallest allowed number of distinct groups (a label column needs two classes).
    """
    src = source_name(adata)
    counts = pd.Series(string_categorical(adata.obs[key])).value_counts()
    if len(counts) < min_groups:
        raise InputError(
            f"{src}: obs column {key!r} has {len(counts)} distinct value(s) ({_examples(counts.index)}); "
            f"at least {min_groups} are needed"
        )
    small = counts[counts < min_size]
    if len(small):
        raise InputError(
            f"{src}: obs column {key!r} has groups with fewer than {min_size} cells: "
            + ", ".join(f"{k!r} ({v} cells)" for k, v in small.iloc[:5].items())
            + (f", … ({len(small)} in all)" if len(small) > 5 else "")
        )


def _chunk_values(chunk: sp.spmatrix | np.ndarray) -> np.ndarray:
    return chunk.data if sp.issparse(chunk) else np.asarray(chunk).ravel()


def check_names(adata: ad.AnnData, layer: str | None = None) -> None:
    """Refuse empty matrices and repeated cell or gene names (of ``layer``'s genes: ``.raw`` has its own), listing the first repeats."""
    src = source_name(adata)
    genes = get_var(adata, layer).index
    if adata.n_obs == 0 or len(genes) == 0:
        raise InputError(f"{src}: the matrix is empty ({adata.n_obs} cells × {len(genes)} genes)")
    fix_genes = "of .raw, e.g. raw = adata.raw.to_adata(); raw.var_names_make_unique(); adata.raw = raw" if uses_raw(adata, layer) \
        else "e.g. adata.var_names_make_unique()"
    for axis, names, fix in (("cell", adata.obs_names, "e.g. adata.obs_names_make_unique()"), ("gene", genes, fix_genes)):
        repeated = names[names.duplicated()]
        if len(repeated):
            raise InputError(f"{src}: {len(repeated)} {axis} names repeat ({_examples(pd.unique(repeated))}); make them unique first, {fix}")


@dataclass(frozen=True)
class MatrixSummary:
    """What a scan of the matrix found besides errors: cells and genes without a single non-zero value.

    Attributes
    ----------
    source
        File (or ``<AnnData>``) the matrix came from.
    empty_cells, empty_genes
        Boolean masks over cells / genes whose values are all zero.
    """

    source: str
    empty_cells: np.ndarray
    empty_genes: np.ndarray

    def notice(self) -> str | None:
        """One line naming the all-zero cells and genes and saying what happens to them (``None`` when there are none)."""
        n_cells, n_genes = int(self.empty_cells.sum()), int(self.empty_genes.sum())
        if not n_cells and not n_genes:
            return None
        found = " and ".join(f"{n} all-zero {what}" for n, what in ((n_cells, "cells"), (n_genes, "genes")) if n)
        return f"{self.source}: {found} (of {self.empty_cells.size} cells × {self.empty_genes.size} genes) are left out of training"


def _scan_chunk(chunk: sp.spmatrix | np.ndarray, whole: bool) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
    """Rows of one chunk with bad values (by kind; ``whole``: rows holding non-integer values too), its all-zero rows,
    the columns it uses and its largest value."""
    if sp.issparse(chunk):
        chunk = sp.csr_matrix(chunk)
        row_of = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
        values = chunk.data
        nonzero = values != 0
        empty = np.bincount(row_of[nonzero], minlength=chunk.shape[0]) == 0
        used = np.zeros(chunk.shape[1], dtype=bool)
        used[chunk.indices[nonzero]] = True
    else:
        values = np.asarray(chunk)
        nonzero = values != 0
        empty, used = ~nonzero.any(axis=1), nonzero.any(axis=0)
    finite = np.isfinite(values)
    checks = {"NaN or infinite": ~finite, "negative": finite & (values < 0)}
    if whole:
        checks["non-integer"] = finite & (values != np.round(values))
    bad = {name: _rows_with(mask, row_of, chunk.shape[0]) if sp.issparse(chunk) else np.flatnonzero(mask.any(axis=1))
           for name, mask in checks.items() if mask.any()}
    return bad, empty, used, float(values.max()) if values.size else 0.0  # NaN / inf: refused before the largest value is read


def _rows_with(mask: np.ndarray, row_of: np.ndarray, n_rows: int) -> np.ndarray:
    """The rows holding a stored value where ``mask`` is true, in order: a scatter, not a sort (a log-normalised chunk
    has a fractional value almost everywhere)."""
    flagged = np.zeros(n_rows, dtype=bool)
    flagged[row_of[mask]] = True
    return np.flatnonzero(flagged)


LOGNORM_MAX = 50.0
"""Largest value a log-normalised matrix may hold: log1p of counts per 10,000 stays below 9.3, of counts per million below 14."""


def _cells_said(adata: ad.AnnData, rows: Sequence[int] | np.ndarray, batch_key: str | None) -> str:
    """``cells 'a', 'b', …`` for these rows, and with ``batch_key`` the batches they are in."""
    rows = np.asarray(rows)
    detail = f"cells {_examples(adata.obs_names[rows])}"
    if batch_key is not None:
        detail += f"; {batch_key} = {_examples(pd.unique(adata.obs[batch_key].astype(str).to_numpy()[rows]))}"
    return detail


def check_matrix(
    adata: ad.AnnData,
    layer: str | None = None,
    require_counts: bool = False,
    batch_key: str | None = None,
    lognorm: bool = False,
    query_counts: str | None = None,
) -> MatrixSummary:
    """Check the expression matrix for NaN/inf, negative and (for count models) non-integer values.

    The matrix is scanned in chunks of :data:`CHUNK_ROWS` rows, so backed files stay on disk.
    When ``batch_key`` is given, a failure names the batches that hold the bad values. With
    ``lognorm`` (the matrix will be used as log-normalised values) a mix of raw-count cells and
    others, or a value above :data:`LOGNORM_MAX`, is refused too: either would be read as huge
    expression levels. ``query_counts``: the matrix is a query of a trained model of counts, and this
    says how its counts are chosen (e.g. "choose them with `query_layer` / `--query-layer`"): a
    refusal of non-integer values says it (and not ``input``, which the model fixed).

    Returns
    -------
    The all-zero cells and genes found on the way (an all-zero matrix is an error).
    """
    src = source_name(adata)
    where = matrix_name(adata, layer)
    matrix = get_matrix(adata, layer)  # an empty matrix was refused by check_names (validate runs it first)
    problems: dict[str, list[int]] = {"NaN or infinite": [], "negative": [], "non-integer": []}
    empty_cells = np.zeros(adata.n_obs, dtype=bool)
    used_genes = np.zeros(matrix.shape[1], dtype=bool)
    largest = 0.0
    for start in range(0, adata.n_obs, CHUNK_ROWS):
        chunk = row_range(matrix, start, start + CHUNK_ROWS)
        bad, empty, used, top = _scan_chunk(chunk, require_counts or lognorm)
        empty_cells[start : start + chunk.shape[0]] = empty
        used_genes |= used
        largest = max(largest, top)
        for name, rows in bad.items():
            problems[name].extend((rows + start).tolist())
    raw = adata.raw is not None and layer is None
    for name, bad_rows in problems.items():
        if not bad_rows or (name == "non-integer" and not require_counts):
            continue
        hint = ""
        if name == "non-integer":
            others = [str(k) for k in adata.layers.keys() if k != layer]
            layers = f" (this file has layers {others})" if others else ""
            if query_counts is None:
                on_raw = "; the file has .raw, where CELLxGENE keeps counts: select it with layer 'raw', `--layer raw`" if raw else ""
                hint = f" (a count model needs raw integer counts: pass `layer`{layers} or `input: lognorm`{on_raw})"
            else:
                on_raw = "; the file has .raw, where CELLxGENE keeps counts: layer 'raw'" if raw else ""
                hint = f" (the model reads raw integer counts, or log1p of counts per 10,000 as it makes them: {query_counts}{layers}{on_raw})"
        elif name == "negative" and raw:
            hint = " (scaled values? scanpy keeps the log-normalised genes in .raw: select it with layer 'raw', `--layer raw`)"
        raise InputError(f"{src}: {where} has {name} values in {len(bad_rows)} cells ({_cells_said(adata, bad_rows, batch_key)}){hint}")
    if empty_cells.all():
        raise InputError(f"{src}: {where} holds no non-zero value ({adata.n_obs} cells × {matrix.shape[1]} genes)")
    if lognorm:
        _check_log_normalised(adata, where, np.asarray(problems["non-integer"], dtype=np.int64), empty_cells, largest, batch_key)
    return MatrixSummary(src, empty_cells, ~used_genes)


def _check_log_normalised(adata: ad.AnnData, where: str, fractional: np.ndarray, empty_cells: np.ndarray, largest: float, batch_key: str | None) -> None:
    """Refuse a matrix to be read as log-normalised whose cells mix whole numbers (raw counts) and fractions, or whose
    values reach above :data:`LOGNORM_MAX` (counts, TPM)."""
    src = source_name(adata)
    whole = ~empty_cells
    whole[fractional] = False
    if whole.any() and fractional.size:
        raise InputError(f"{src}: {where} mixes kinds of values: {int(whole.sum())} cells hold only whole numbers, as raw counts do "
                         f"({_cells_said(adata, np.flatnonzero(whole), batch_key)}), {fractional.size} cells non-integer values "
                         f"({_cells_said(adata, fractional, batch_key)}): give every cell the same kind, raw counts (`layer`) or log-normalised values")
    if largest > LOGNORM_MAX:
        raise InputError(f"{src}: {where} holds values up to {largest:,.6g}, too large for log-normalised values (log1p of counts per "
                         f"10,000 stays below 9.3): pass raw counts (`layer`, `input: counts`) or log-normalise first (scanpy: "
                         "sc.pp.normalize_total, sc.pp.log1p)")


def validate(
    adata: ad.AnnData,
    *,
    batch_key: str | None = None,
    label_key: str | None = None,
    extra_keys: Sequence[str | None] = (),
    layer: str | None = None,
    require_counts: bool = False,
    check_values: bool = True,
    lognorm: bool = False,
    query_counts: str | None = None,
) -> MatrixSummary | None:
    """Run every check of DESIGN §3 that applies to one dataset: the one validation every command runs.

    Parameters
    ----------
    adata
        The data, in memory or backed.
    batch_key
        Batch or donor column: must exist, have no missing values, and no batch may hold fewer than two cells.
    label_key
        Cell-type column: must exist, have no missing values and at least two classes.
    extra_keys
        Other obs columns the run needs (strata, split groups).
    layer
        Layer holding the matrix (``None`` = ``.X``; ``"raw"``: ``.raw``, see :func:`~scatlas.data.io.get_matrix`).
    require_counts
        Demand integer values (raw counts).
    check_values
        Scan the matrix (``False`` for commands that read only ``.obsm``, e.g. a benchmark of
        stored embeddings).
    lognorm
        The matrix will be read as log-normalised values (not with ``require_counts``): refuse
        cells of raw counts beside others and values above :data:`LOGNORM_MAX`.
    query_counts
        For a query of a trained model of counts: how its counts are chosen, said when its values
        are refused (:func:`check_matrix`).

    Returns
    -------
    The all-zero cells and genes (callers leave them out of training and say so); ``None``
    without ``check_values``.

    Raises
    ------
    InputError
        On the first problem found, naming file, key and values: one column as batch and label, an empty matrix, repeated cell or
        gene names, a missing or incomplete column, too few classes, a batch of one cell, NaN /
        infinite / negative / (with ``require_counts``) non-integer values, an all-zero matrix, or
        (with ``lognorm``) values that are not log-normalised.
    """
    if batch_key is not None and batch_key == label_key:
        raise InputError(f"{source_name(adata)}: the batch and label columns are both {batch_key!r}: batch scores and batch removal would take "
                         "the cell types for batches; give the batch column (donor, sample, chemistry) as the batch key")
    check_names(adata, layer)
    check_obs_keys(adata, [batch_key, label_key, *extra_keys])
    if batch_key is not None:
        check_groups(adata, batch_key, min_size=2, min_groups=1)
    if label_key is not None:
        check_groups(adata, label_key, min_size=1, min_groups=2)
    return check_matrix(adata, layer=layer, require_counts=require_counts, batch_key=batch_key, lognorm=lognorm,
                        query_counts=query_counts) if check_values else None


def one_batch_notice(adata: ad.AnnData, batch_key: str | None) -> str | None:
    """A line saying that batch scores are undefined when ``obs[batch_key]`` holds a single batch (``None`` otherwise)."""
    if batch_key is None or adata.obs[batch_key].nunique() > 1:
        return None
    return (f"{source_name(adata)}: obs column {batch_key!r} holds one batch ({adata.obs[batch_key].iloc[0]!r}): "
            "batch-removal scores are undefined (NaN) and batch-aware models see no batch effect")


def is_count_matrix(adata: ad.AnnData, layer: str | None = None, n_cells: int = 10_000) -> bool:
    """Whether the first ``n_cells`` cells of the matrix hold only whole, non-negative numbers (raw counts)."""
    values = _chunk_values(row_range(get_matrix(adata, layer), 0, n_cells))
    finite = values[np.isfinite(values)]
    return bool(finite.size == 0 or ((finite >= 0) & (finite == np.round(finite))).all())


CP10K = 1e4
"""Counts per cell after normalisation (scanpy's ``normalize_total(target_sum=1e4)``, scatlas' and CellTypist's)."""


def holds_log_cp10k(adata: ad.AnnData, layer: str | None = None, n_cells: int = 1_000) -> bool:
    """Whether the matrix holds log1p of counts per 10,000 (:data:`CP10K`), as scatlas makes of counts: every non-empty
    cell among the first ``n_cells`` sums to 10,000 (within 1%) after expm1 (CellTypist's check of a query)."""
    rows = to_csr(row_range(get_matrix(adata, layer), 0, n_cells))
    totals = np.asarray(rows.astype(np.float64).expm1().sum(axis=1)).ravel()
    totals = totals[np.diff(rows.indptr) > 0]
    return bool(totals.size and np.all(np.abs(totals - CP10K) <= 0.01 * CP10K))


def query_counts(adata: ad.AnnData, layer: str | None, model_input: str) -> tuple[bool, str | None]:
    """Whether a query's matrix holds counts to log-normalise, for a model trained on ``model_input`` (``counts`` /
    ``lognorm``); and a line when a model of counts is given log1p of counts per 10,000, the values it makes of counts
    itself (:func:`holds_log_cp10k`), which it then reads as they are, as CellTypist reads a query.
    Any other non-integer matrix stays a counts query, which validation refuses by name."""
    if model_input != "counts" or is_count_matrix(adata, layer) or not holds_log_cp10k(adata, layer):
        return model_input == "counts", None
    return False, (f"{source_name(adata)}: {matrix_name(adata, layer)} holds log1p of counts per 10,000, as the model normalises counts: "
                   "read as it is")


InputKind = Literal["auto", "counts", "lognorm"]
"""What a matrix holds: raw counts (normalised + log1p by scatlas), log-normalised values, or ``auto`` (decided from the values)."""


def check_input_kind(input: str) -> InputKind:
    """``input`` if it names an :data:`InputKind`; else one line naming it and the choices."""
    if input not in get_args(InputKind):
        raise InputError(f"input {input!r}: choose one of {', '.join(get_args(InputKind))}")
    return input  # type: ignore[return-value]


def resolve_input(adata: ad.AnnData, layer: str | None, input: InputKind) -> tuple[bool, str | None]:
    """Whether the matrix holds counts: ``input`` as given, or for ``auto`` whether its values are whole numbers.

    Returns
    -------
    The answer, and for ``auto`` a line saying what was decided (to log once the data passed validation).

    Raises
    ------
    InputError
        When ``input`` is none of ``auto``, ``counts`` and ``lognorm``.
    """
    check_input_kind(input)
    if input != "auto":
        return input == "counts", None
    counts = is_count_matrix(adata, layer)
    return counts, (f"{source_name(adata)}: {matrix_name(adata, layer)} holds "
                    f"{'whole numbers: treated as raw counts (normalised + log1p)' if counts else 'non-integer values: treated as log-normalised'}")
