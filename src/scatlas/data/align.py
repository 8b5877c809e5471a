"""Align a query's genes to a model's genes by name (overlap report, zero-fill, refusal below a threshold), and check a query for a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scatlas._errors import ConfigError, InputError
from scatlas.data.io import get_var, matrix_name, source_name, trained_layer, var_name
from scatlas.data.validate import query_counts, validate


@dataclass(frozen=True)
class GeneAlignment:
    """How a query's genes map onto the model's genes.

    Attributes
    ----------
    query_index
        For each model gene, its column in the query, or −1 when the query lacks it.
    n_model_genes, n_query_genes, n_shared
        Gene counts.
    missing
        Model genes absent from the query (zero-filled).
    gene_key
        The query's ``.var`` column the names came from (``None``: its index).
    """

    query_index: np.ndarray
    n_model_genes: int
    n_query_genes: int
    n_shared: int
    missing: list[str]
    gene_key: str | None = None

    @property
    def fraction(self) -> float:
        """Share of model genes found in the query."""
        return self.n_shared / max(self.n_model_genes, 1)

    @property
    def matched_by(self) -> str:
        """What the query's gene names were read from: ``var_names`` or ``var['<gene_key>']``."""
        return "var_names" if self.gene_key is None else f"var[{self.gene_key!r}]"

    def report(self) -> dict[str, object]:
        """Counts and up to 20 missing genes, for logs and ``gene_overlap.csv``."""
        return {
            "model_genes": self.n_model_genes,
            "query_genes": self.n_query_genes,
            "shared_genes": self.n_shared,
            "fraction_of_model_genes": round(self.fraction, 4),
            "missing_examples": ";".join(self.missing[:20]),
            "query_gene_names": self.matched_by,
        }

    def said(self, name: str, missing: str) -> str:
        """One log line: how many model genes ``name`` has, matched by what, and what its missing ones are set to (``missing``)."""
        found = f"{name}: {self.n_shared} of the model's {self.n_model_genes} genes found ({self.fraction:.1%}, by {self.matched_by})"
        return found + ("" if self.n_shared == self.n_model_genes else f"; missing ones {missing}")

    def apply(self, X: sp.csr_matrix) -> sp.csr_matrix:
        """Query matrix reordered to the model's genes, absent genes as zero columns."""
        found = np.flatnonzero(self.query_index >= 0)
        select = sp.csr_matrix(
            (np.ones(len(found), dtype=np.float32), (self.query_index[found], found)),
            shape=(X.shape[1], self.n_model_genes),
        )
        return sp.csr_matrix(X @ select, dtype=np.float32)

    def absent_at(self, values: np.ndarray) -> np.ndarray | None:
        """``values`` (one per model gene) at the genes the query lacks, 0 elsewhere; ``None`` when it lacks none.

        Added to the zero-filled rows of :meth:`apply`, it sets the absent genes to ``values``
        (as :class:`~scatlas.models.base.SplitData`'s ``offset``, one dense row at a time).
        """
        absent = self.query_index < 0
        return np.where(absent, values, 0).astype(np.float32) if absent.any() else None


def align_genes(var: pd.DataFrame, model_genes: np.ndarray, min_overlap: float = 0.5, source: str = "query",
                gene_key: str | None = None, var_label: str = ".var") -> GeneAlignment:
    """Match genes by name.

    Parameters
    ----------
    var
        The query's gene annotations, one row per column of its matrix; the index (or the
        ``gene_key`` column) holds the gene names (first occurrence wins for duplicates). On a
        refusal, a column that holds the model's genes (e.g. symbols beside Ensembl ids, as
        CELLxGENE files keep them) is named.
    model_genes
        Genes the model was trained on, in its column order.
    min_overlap
        Smallest accepted share of model genes present in the query.
    source
        Name of the query (file) for messages.
    gene_key
        Column of ``var`` holding the gene names the model uses (as scanpy's ``gene_symbols``);
        default: ``var``'s index.
    var_label
        How messages name ``var``: ``.var``, or ``.raw.var`` when the query is read from ``.raw``
        (:func:`~scatlas.data.io.var_name`).

    Raises
    ------
    InputError
        When ``gene_key`` is not a column of ``var``, or fewer than ``min_overlap`` of the
        model's genes are in the query.
    ConfigError
        When ``min_overlap`` is not a share between 0 and 1.
    """
    if not 0 <= min_overlap <= 1:
        raise ConfigError(f"min_overlap: {min_overlap}; a share of the model's genes, from 0 to 1 (default 0.5)")
    query_genes = gene_names(var, gene_key, source, var_label)
    position = pd.Series(np.arange(len(query_genes)), index=pd.Index(np.asarray(query_genes, dtype=str)))
    position = position[~position.index.duplicated()]
    index = position.reindex(np.asarray(model_genes, dtype=str)).fillna(-1).to_numpy(dtype=np.int64)
    missing = [str(g) for g, i in zip(model_genes, index, strict=True) if i < 0]
    alignment = GeneAlignment(index, len(model_genes), len(query_genes), int((index >= 0).sum()), missing, gene_key)
    if alignment.fraction < min_overlap:
        column = _column_with_genes(var.drop(columns=[gene_key]) if gene_key else var, model_genes, min_overlap)
        if column:
            hint = (f"; {var_label}[{column!r}] holds them: name it as the gene column (gene_key={column!r}; "
                    f"CLI: --gene-key {column}, --query-gene-key {column} in `transfer`)")
        elif gene_key and _share_found(model_genes, var.index) >= min_overlap:
            hint = "; the var_names hold them: leave the gene column out"
        else:
            hint = " (do the gene identifiers match: symbols vs Ensembl ids?)"
        raise InputError(
            f"{source}: only {alignment.n_shared} of the model's {alignment.n_model_genes} genes "
            f"({alignment.fraction:.1%}) are in the query, below the minimum {min_overlap:.0%}; "
            f"missing e.g. {missing[:5]}{hint}"
        )
    return alignment


def gene_names(var: pd.DataFrame, gene_key: str | None = None, source: str = "query", var_label: str = ".var") -> pd.Index:
    """The gene names of ``var``'s rows: its index, or its ``gene_key`` column as text (``var_label``: how messages name ``var``).

    Raises
    ------
    InputError
        When ``gene_key`` is not a column of ``var`` (the message lists its columns).
    """
    if gene_key is None:
        return var.index
    if gene_key not in var.columns:
        raise InputError(f"{source}: no gene column {gene_key!r} in {var_label} (its columns: {', '.join(map(str, var.columns)) or 'none'})")
    return pd.Index(var[gene_key].astype(str).to_numpy(), name=gene_key)


def _column_with_genes(var: pd.DataFrame, model_genes: np.ndarray, min_overlap: float) -> str | None:
    """The first text column of ``var`` whose values hold at least ``min_overlap`` of ``model_genes`` (``None`` if none does)."""
    for column in var.columns:
        values = var[column]
        if (pd.api.types.is_string_dtype(values) or isinstance(values.dtype, pd.CategoricalDtype)) and _share_found(model_genes, values) >= min_overlap:
            return str(column)
    return None


def _share_found(model_genes: np.ndarray, names: pd.Index | pd.Series) -> float:
    """Share of ``model_genes`` among ``names`` (compared as text)."""
    return float(pd.Index(np.asarray(model_genes, dtype=str)).isin(names.astype(str)).mean())


def checked_query(adata: ad.AnnData, layer: str | None, model_layer: str | None, model_input: str, genes: Sequence[str], min_overlap: float,
                  gene_key: str | None, trained_as: str, choose_counts: str) -> tuple[str | None, bool, GeneAlignment, list[str]]:
    """Check a query for a model: the matrix it is read from (``layer`` if given, else the model's layer where the query
    has it, else ``.X``: :func:`~scatlas.data.io.trained_layer`) and what it holds
    (:func:`~scatlas.data.validate.query_counts`), its values (:func:`~scatlas.data.validate.validate`; a refusal of
    a count model's query says ``choose_counts``, how its counts are chosen) and its genes against ``genes``.

    Returns
    -------
    The layer, whether it holds counts to log-normalise, the gene alignment, and the lines to log once every check
    passed: that the model's layer was chosen (``trained_as``: e.g. "the reference"), or log1p counts read as they are.
    """
    chosen = trained_layer(adata, layer, model_layer)
    counts, read_as = query_counts(adata, chosen, model_input)
    validate(adata, layer=chosen, require_counts=counts, lognorm=not counts, query_counts=choose_counts)
    alignment = align_genes(get_var(adata, chosen), genes, min_overlap, source_name(adata), gene_key, var_name(adata, chosen))
    said = [f"{source_name(adata)}: reading {matrix_name(adata, chosen)}, as {trained_as}"] if chosen != layer else []
    return chosen, counts, alignment, said + ([read_as] if read_as else [])
