"""Validation before any work (DESIGN §3): keys, values, batches and labels.

Every check raises :class:`~scatlas.InputError` with the file, the key and examples of
the offending values, so that a user can fix the input without a debugger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas._errors import InputError
from scatlas.data.io import get_matrix, get_var, matrix_name, row_range, source_name, string_categorical, uses_raw

#: Rows read at a time when scanning a matrix (keeps backed files out of memory).
CHUNK_ROWS = 50_000


def _examples(values: Iterable[object], n: int = 5) -> str:
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f", … ({len(values)} in all)" if len(values) > n else "")


def check_obs_keys(adata: ad.AnnData, keys: Sequence[str | None], missing_ok: bool = False) -> None:
    """Check that every non-``None`` key is a column of ``adata.obs`` without missing values (``missing_ok``: with at least one value)."""
    src = source_name(adata)
    for key in keys:
        if key is None:
            continue
        if key not in adata.obs.columns:
            raise InputError(f"{src}: obs column {key!r} not found; available columns: {list(adata.obs.columns)}")
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
        return (f"{self.source}: {n_cells} all-zero cells and {n_genes} all-zero genes (of {self.empty_cells.size} × "
                f"{self.empty_genes.size}) are left out of training")


def _scan_chunk(chunk: sp.spmatrix | np.ndarray, require_counts: bool) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Rows of one chunk with bad values (by kind), its all-zero rows and the columns it uses."""
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
    if require_counts:
        checks["non-integer"] = finite & (values != np.round(values))
    bad = {name: np.unique(row_of[mask]) if sp.issparse(chunk) else np.flatnonzero(mask.any(axis=1))
           for name, mask in checks.items() if mask.any()}
    return bad, empty, used


def check_matrix(
    adata: ad.AnnData,
    layer: str | None = None,
    require_counts: bool = False,
    batch_key: str | None = None,
) -> MatrixSummary:
    """Check the expression matrix for NaN/inf, negative and (for count models) non-integer values.

    The matrix is scanned in chunks of :data:`CHUNK_ROWS` rows, so backed files stay on disk.
    When ``batch_key`` is given, a failure names the batches that hold the bad values.

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
    for start in range(0, adata.n_obs, CHUNK_ROWS):
        chunk = row_range(matrix, start, start + CHUNK_ROWS)
        bad, empty, used = _scan_chunk(chunk, require_counts)
        empty_cells[start : start + chunk.shape[0]] = empty
        used_genes |= used
        for name, rows in bad.items():
            problems[name].extend((rows + start).tolist())
    for name, bad_rows in problems.items():
        if not bad_rows:
            continue
        cells = adata.obs_names[np.asarray(bad_rows)]
        detail = f"cells {_examples(cells)}"
        if batch_key is not None:
            batches = pd.unique(adata.obs[batch_key].astype(str).to_numpy()[np.asarray(bad_rows)])
            detail += f"; {batch_key} = {_examples(batches)}"
        hint = ""
        raw = adata.raw is not None and layer is None
        if name == "non-integer":
            others = [str(k) for k in adata.layers.keys() if k != layer]
            layers = f" (this file has layers {others})" if others else ""
            on_raw = "; the file has .raw, where CELLxGENE keeps counts: select it with layer 'raw', `--layer raw`" if raw else ""
            hint = f" (a count model needs raw integer counts: pass `layer`{layers} or `input: lognorm`{on_raw})"
        elif name == "negative" and raw:
            hint = " (scaled values? scanpy keeps the log-normalised genes in .raw: select it with layer 'raw', `--layer raw`)"
        raise InputError(f"{src}: {where} has {name} values in {len(bad_rows)} cells ({detail}){hint}")
    if empty_cells.all():
        raise InputError(f"{src}: {where} holds no non-zero value ({adata.n_obs} cells × {matrix.shape[1]} genes)")
    return MatrixSummary(src, empty_cells, ~used_genes)


def validate(
    adata: ad.AnnData,
    *,
    batch_key: str | None = None,
    label_key: str | None = None,
    extra_keys: Sequence[str | None] = (),
    layer: str | None = None,
    require_counts: bool = False,
    check_values: bool = True,
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

    Returns
    -------
    The all-zero cells and genes (callers leave them out of training and say so); ``None``
    without ``check_values``.

    Raises
    ------
    InputError
        On the first problem found, naming file, key and values: an empty matrix, repeated cell or
        gene names, a missing or incomplete column, too few classes, a batch of one cell, NaN /
        infinite / negative / (with ``require_counts``) non-integer values, or an all-zero matrix.
    """
    check_names(adata, layer)
    check_obs_keys(adata, [batch_key, label_key, *extra_keys])
    if batch_key is not None:
        check_groups(adata, batch_key, min_size=2, min_groups=1)
    if label_key is not None:
        check_groups(adata, label_key, min_size=1, min_groups=2)
    return check_matrix(adata, layer=layer, require_counts=require_counts, batch_key=batch_key) if check_values else None


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
