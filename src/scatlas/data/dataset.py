"""A validated dataset ready for splitting: what the runner and every model read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from scatlas._errors import InputError
from scatlas.data.io import file_path, get_matrix, get_var, on_disk, read_anndata, source_name, to_csr
from scatlas.data.preprocess import normalize_log1p
from scatlas.data.sources import AnnDataCSRSource, RowSubset
from scatlas.data.validate import CHUNK_ROWS, MatrixSummary, check_obs_keys, resolve_input, validate, with_values

Log = Callable[[str], None]


class DatasetConfig(BaseModel):
    """Where the data is and which ``obs`` columns mean what.

    Attributes
    ----------
    name
        Short name used in the output layout (``outputs/<name>_outputs``).
    path
        ``.h5ad`` file; a relative path is resolved against the working directory.
    layer
        Layer holding the matrix (default ``.X``; ``raw``: ``.raw`` unless a layer has that name).
    input
        ``counts`` (raw integer counts, normalised + log1p here), ``lognorm`` (already
        log-normalised, used as is) or ``auto`` (the default, as the CLI's ``--input``: counts if
        the matrix holds whole numbers, decided when the file is read, with a line).
    batch_key
        Batch / donor column (``None``: all cells form one batch).
    label_key
        Cell-type column (optional for unsupervised models).
    filter
        Keep only cells whose ``obs[column]`` is in the listed values, e.g.
        ``{demuxlet_cls: [SNG]}``.
    unlabelled
        Cells whose ``label_key`` value is missing: ``refuse`` the dataset (one line naming
        them), or ``leave_out`` those cells with a notice (what a classifier's training does:
        the reference is its labelled cells).
    backed
        Open the file in backed mode (the matrix is read in chunks, then held in memory).
    stream
        Never load the matrix: it stays on disk (a CSR ``X`` or layer), and highly variable
        genes, scaling, minibatches and predictions read it in chunks, so host memory stays
        flat as the number of cells grows (``obs`` and per-gene statistics are held).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: Path
    layer: str | None = None
    input: Literal["auto", "counts", "lognorm"] = "auto"
    batch_key: str | None = None
    label_key: str | None = None
    filter: dict[str, list[str]] = Field(default_factory=dict)
    unlabelled: Literal["refuse", "leave_out"] = "refuse"
    backed: bool = False
    stream: bool = False


@dataclass
class CellData:
    """Log-normalised expression of the kept cells with their batch and label codes.

    Attributes
    ----------
    name
        Dataset name.
    lognorm
        Cells × genes CSR, log-normalised; for a streamed dataset an on-disk source of it
        (:mod:`scatlas.data.sources`) that normalises each chunk as it is read.
    var_names
        Gene names.
    obs
        Cell metadata of the kept cells (index = cell ids).
    batch
        Categorical batch of each cell (categories in order of first appearance).
    label
        Categorical label of each cell, or ``None``.
    obsm
        The file's ``.obsm`` arrays (e.g. embeddings computed elsewhere), row-aligned.
    empty_cells
        Which kept cells are all zero (only kept with ``drop_empty_cells=False``; not trained on).
    counts
        Whether the file held raw counts (log-normalised here) rather than log-normalised values.
    """

    name: str
    lognorm: Any
    var_names: np.ndarray
    obs: pd.DataFrame
    batch: pd.Categorical
    label: pd.Categorical | None
    obsm: dict[str, np.ndarray] = field(default_factory=dict)
    empty_cells: np.ndarray | None = None
    counts: bool = True

    @property
    def input(self) -> Literal["counts", "lognorm"]:
        """What the file's matrix held, as a model's ``input``: ``counts`` or ``lognorm``."""
        return "counts" if self.counts else "lognorm"

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return self.lognorm.shape[0]

    @property
    def cell_ids(self) -> np.ndarray:
        """Cell identifiers (``obs_names``)."""
        return self.obs.index.to_numpy()

    def strata(self) -> np.ndarray:
        """``batch_label`` per cell (the scMEDAL stratification); with one batch, the label alone (the same folds: a common
        prefix keeps the strata's order)."""
        batch = np.asarray(self.batch, dtype=str)
        if self.label is None:
            return batch
        if len(pd.unique(batch)) == 1:
            return np.asarray(self.label, dtype=str)
        return np.char.add(np.char.add(batch, "_"), np.asarray(self.label, dtype=str))


def _categorical(values: pd.Series) -> pd.Categorical:
    values = values.astype(str)
    return pd.Categorical(values, categories=pd.unique(values))


def apply_filter(adata: ad.AnnData, filters: dict[str, list[str]]) -> ad.AnnData:
    """Keep the cells whose ``obs[column]`` is one of the given values, for every column."""
    keep = filter_mask(adata, filters)
    return adata[keep] if not keep.all() else adata


def filter_mask(adata: ad.AnnData, filters: dict[str, list[str]]) -> np.ndarray:
    """Which cells :func:`apply_filter` keeps."""
    check_obs_keys(adata, list(filters))
    keep = np.ones(adata.n_obs, dtype=bool)
    for column, allowed in filters.items():
        values = adata.obs[column].astype(str)
        unknown = sorted(set(allowed) - set(values.unique()))
        if unknown:
            raise InputError(
                f"{source_name(adata)}: filter on obs column {column!r}: values {unknown} do not occur "
                f"(present: {sorted(values.unique())[:20]})"
            )
        keep &= values.isin(allowed).to_numpy()
    return keep


def _lognorm_matrix(adata: ad.AnnData, layer: str | None, counts: bool) -> sp.csr_matrix:
    """A float32 CSR copy of the matrix, log-normalised in place when it holds ``counts``: one copy beside an in-memory
    matrix, read :data:`CHUNK_ROWS` cells at a time from a backed one."""
    matrix = get_matrix(adata, layer)
    if sp.issparse(matrix) or isinstance(matrix, np.ndarray):
        X = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    else:
        chunks = [to_csr(matrix[i : i + CHUNK_ROWS]) for i in range(0, adata.n_obs, CHUNK_ROWS)]
        X = sp.vstack(chunks, format="csr") if len(chunks) > 1 else chunks[0]
        del chunks
    return normalize_log1p(X, copy=False) if counts else X


def whole_backed(adata: ad.AnnData) -> Path:
    """The file of a whole AnnData whose matrix is on disk (:func:`~scatlas.data.io.on_disk`), the only kind that can be streamed.

    Raises
    ------
    InputError
        For an AnnData in memory or a subset (view) of one on disk.
    """
    if not on_disk(adata) or adata.is_view:
        raise InputError(f"{source_name(adata)}: only a whole backed AnnData (anndata.read_h5ad(path, backed='r'), or "
                         "scatlas.data.read_anndata(path, backed=True) for a .zarr store; not a subset of one) can be streamed")
    return file_path(adata)


def file_source(path: str | Path, layer: str | None = None, normalize: bool = False, rows: np.ndarray | None = None,
                genes: np.ndarray | None = None) -> Any:
    """A file's CSR matrix as a source read in chunks: log-normalised when ``normalize``, only the
    rows ``rows`` (increasing) and the columns ``genes`` when given."""
    source = AnnDataCSRSource(path, layer=layer, normalize=normalize)
    if genes is not None and len(genes) < source.shape[1]:
        source = source.with_genes(genes)
    return source if rows is None or len(rows) == source.shape[0] else RowSubset(source, rows)


def read_dataset(config: DatasetConfig, extra_keys: tuple[str | None, ...] = (), log: Log = print) -> tuple[ad.AnnData, MatrixSummary]:
    """Read and filter a dataset and run :func:`~scatlas.data.validate.validate` on it (what ``scatlas validate CONFIG`` runs).
    ``log`` gets the line about unlabelled cells left out (``config.unlabelled``).

    Returns
    -------
    The (possibly backed) AnnData and the all-zero cells and genes found.
    """
    adata, summary, _, _ = _read(config, extra_keys, log)
    return adata, summary


def labelled_cells(obs: pd.DataFrame, source: str, label_key: str | None, unlabelled: Literal["refuse", "leave_out"], log: Log) -> np.ndarray:
    """Which cells (rows of ``obs``) to keep for their label: all, or with ``unlabelled="leave_out"`` those whose ``label_key``
    value is not missing (one notice says how many are left out; a column with no label at all is refused)."""
    if unlabelled == "refuse" or label_key is None or label_key not in obs:
        return np.ones(len(obs), dtype=bool)  # validation refuses missing labels, naming the cells
    if obs[label_key].isna().all():
        raise InputError(f"{source}: obs column {label_key!r} holds no label (all {len(obs)} values are missing)")
    return with_values(obs[label_key], source, label_key, "no label", "training (map them as a query to call them)", log)


def _read(config: DatasetConfig, extra_keys: tuple[str | None, ...], log: Log = print) -> tuple[ad.AnnData, MatrixSummary, np.ndarray, bool]:
    """:func:`read_dataset`, the rows of the file its cells are, and whether the matrix holds counts (``config.input``;
    ``auto`` decided from its values, with a line once it passed validation)."""
    adata = read_anndata(config.path, backed=config.backed or config.stream)
    keep = filter_mask(adata, config.filter) if config.filter else np.ones(adata.n_obs, dtype=bool)
    keep[keep] = labelled_cells(adata.obs[keep], source_name(adata), config.label_key, config.unlabelled, log)  # among the cells the filter kept
    rows = np.flatnonzero(keep)
    if not keep.all():
        adata = adata[keep]  # one view: a backed AnnData cannot be indexed twice
    counts, decided = resolve_input(adata, config.layer, config.input)
    summary = validate(adata, batch_key=config.batch_key, label_key=config.label_key, extra_keys=extra_keys, layer=config.layer,
                       require_counts=counts, lognorm=not counts)
    if decided:
        log(decided)
    return adata, summary, rows, counts


def load_dataset(config: DatasetConfig, extra_keys: tuple[str | None, ...] = (), log: Log = print) -> CellData:
    """Read, filter and validate a dataset, and log-normalise it; all-zero cells and genes are dropped with a notice.

    Parameters
    ----------
    config
        Where the file is and which columns to use.
    extra_keys
        Other obs columns that must exist (e.g. a donor column for a donor split).
    log
        Receives the notice about all-zero cells and genes.

    Raises
    ------
    InputError
        As :func:`~scatlas.data.validate.validate`: a missing file or key, NaN/inf/negative values,
        non-integer counts with ``input: counts``, repeated names, an all-zero matrix, empty or
        single-cell batches, or a label column with one class.
    """
    adata, summary, rows, counts = _read(config, extra_keys, log)
    return _cell_data(adata, summary, config.name, config.batch_key, config.label_key, config.layer, counts, True, log,
                      rows if config.stream else None)


def cell_data(
    adata: ad.AnnData,
    name: str = "data",
    *,
    batch_key: str | None = None,
    label_key: str | None = None,
    layer: str | None = None,
    counts: bool = True,
    extra_keys: tuple[str | None, ...] = (),
    drop_empty_cells: bool = True,
    stream: bool = False,
    unlabelled: Literal["refuse", "leave_out"] = "refuse",
    log: Log = print,
) -> CellData:
    """Validate an AnnData (in memory or backed) and log-normalise its matrix.

    Parameters
    ----------
    adata
        The cells; nothing in it is changed.
    name
        Dataset name for the output layout.
    batch_key, label_key
        Batch / donor and cell-type columns (``None``: one batch, no labels).
    layer
        Layer holding the matrix (``None`` = ``.X``; ``"raw"``: ``.raw``, see :func:`~scatlas.data.io.get_matrix`).
    counts
        The matrix holds raw integer counts (normalised + log1p here); else it is used as is.
    extra_keys
        Other obs columns that must exist.
    drop_empty_cells
        Leave all-zero cells out (else they stay, marked in :attr:`CellData.empty_cells`, for
        callers that output every cell but train without them). All-zero genes are always dropped.
    stream
        For a backed AnnData (not a view): leave its matrix on disk (see :attr:`DatasetConfig.stream`).
    unlabelled
        Cells without a ``label_key`` value: ``refuse``, or ``leave_out`` (see :attr:`DatasetConfig.unlabelled`).
    log
        Receives the notices about all-zero cells and genes and about cells left out for having no label.

    Raises
    ------
    InputError
        As :func:`~scatlas.data.validate.validate`.
    """
    if stream:
        whole_backed(adata)
    keep = labelled_cells(adata.obs, source_name(adata), label_key, unlabelled, log)
    rows = np.flatnonzero(keep)
    if not keep.all():
        adata = adata[keep]
    summary = validate(adata, batch_key=batch_key, label_key=label_key, extra_keys=extra_keys, layer=layer, require_counts=counts, lognorm=not counts)
    return _cell_data(adata, summary, name, batch_key, label_key, layer, counts, drop_empty_cells, log, rows if stream else None)


def _cell_data(adata: ad.AnnData, summary: MatrixSummary, name: str, batch_key: str | None, label_key: str | None, layer: str | None,
               counts: bool, drop_empty_cells: bool, log: Log, file_rows: np.ndarray | None = None) -> CellData:
    """The kept cells and genes as :class:`CellData`; streamed from the file when ``file_rows`` (the file's row of each cell) is given."""
    notice = summary.notice()
    if notice:
        log(notice)
    keep_cells = ~summary.empty_cells if drop_empty_cells else np.ones(adata.n_obs, dtype=bool)
    keep_genes = ~summary.empty_genes
    if file_rows is not None:
        X = file_source(file_path(adata), layer, counts, file_rows[keep_cells], np.flatnonzero(keep_genes))  # adata: the file's cells, or a filtered view of them
    else:
        X = _lognorm_matrix(adata, layer, counts=counts)
        if not keep_cells.all():
            X = X[keep_cells]
        if not keep_genes.all():
            X = X[:, keep_genes]
    obs = adata.obs[keep_cells].copy() if not keep_cells.all() else adata.obs.copy()
    obs.index = obs.index.astype(str)
    return CellData(
        name=name,
        lognorm=X,
        var_names=get_var(adata, layer).index.to_numpy().astype(str)[keep_genes],
        obs=obs,
        batch=_categorical(obs[batch_key] if batch_key else pd.Series("all", index=obs.index)),
        label=_categorical(obs[label_key]) if label_key else None,
        obsm={k: np.asarray(v)[keep_cells] for k, v in adata.obsm.items()},
        empty_cells=summary.empty_cells[keep_cells],
        counts=counts,
    )
