"""AnnData-level tools (floor 2), scanpy style: AnnData in, results written under predictable keys.

=====================  ========================================================================
:func:`embed`          fit any embedding model on all cells → ``.obsm['X_<model>']`` (+ W in ``.varm``)
:func:`counterfactual` ``re`` reconstructions "as if from batch b" → a layer
:func:`annotate`       a trained classifier's calls → ``.obs`` / ``.obsm``
:func:`transfer`       reference → queries: calibrated calls, ``unknown`` flags → ``.obs`` / ``.obsm``
:func:`aggregate`      one profile per sample: learned set model vs mean / median, scored by mAP → AnnData
:func:`benchmark`      scib-metrics' metric set for ``.obsm`` embeddings → DataFrame
=====================  ========================================================================

The CLI (``scatlas embed / nmf / annotate / transfer / aggregate / benchmark``) and the experiment
runner call these functions; there is no second implementation of any step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from scatlas._lazy import lazy_attributes

if TYPE_CHECKING:
    from pathlib import Path

    import anndata as ad

    from scatlas.tl._aggregation import AggregateConfig
    from scatlas.tl._annotation import Annotator, annotate
    from scatlas.tl._benchmark import benchmark
    from scatlas.tl._embed import ScatlasModel, counterfactual, embed, load_model
    from scatlas.tl._transfer import ReferenceModel, transfer

#: Where each name lives; a submodule (and what it imports: Lightning, igraph, ...) loads on first use of one of its names.
_HOMES = {"AggregateConfig": "_aggregation", "Annotator": "_annotation", "annotate": "_annotation", "benchmark": "_benchmark",
          "ScatlasModel": "_embed", "counterfactual": "_embed", "embed": "_embed", "load_model": "_embed", "ReferenceModel": "_transfer",
          "transfer": "_transfer"}
__getattr__ = lazy_attributes(__name__, _HOMES)


def aggregate(adata: ad.AnnData, *, sample_key: str | Sequence[str], label_key: str, batch_key: str | None = None, features: str | None = None,
              checkpoint_dir: str | Path | None = None, resume: bool = False, log: Callable[[str], None] = print, **settings: Any) -> ad.AnnData:
    """Summarise each sample's cells in one profile with the set model; score it against mean / median profiles by mAP.

    Parameters
    ----------
    adata
        Cells with per-cell features in ``.X`` (or a layer, ``layer=``), an ``.obsm`` key or
        ``pca:<k>`` (``features``). A backed AnnData (``anndata.read_h5ad(path, backed="r")``) is
        read in chunks, its matrix never loaded (``pca:<k>``: streamed highly variable genes, then
        an exact PCA).
    sample_key
        Column naming each cell's sample (well, donor × condition, ...), or several columns whose
        combinations are the samples (``["donor_id", "cell_type"]``, as scanpy's ``get.aggregate(by=)``;
        named ``"a|b"`` in an ``obs`` column ``scatlas_sample``).
    label_key
        What a sample's replicates share (compound, cell type); retrieval queries by it.
    batch_key
        Plate / donor: positives must come from another batch, and whole batches are held out.
    features
        ``None`` (``.X``), an ``.obsm`` key, or ``pca:<k>``.
    checkpoint_dir
        Where each seed's set model keeps its training checkpoint (``seed_<s>/``; ``None``: none).
    resume
        Continue from the checkpoints in ``checkpoint_dir`` (same data and settings; on CPU the
        result equals an uninterrupted run's).
    log
        Receives one line per step (default ``print``; ``lambda _: None`` silences them).
    **settings
        Other :class:`~scatlas.tl._aggregation.AggregateConfig` fields (``seeds``, ``width``,
        ``layer``, ``input``: what the matrix of ``pca:<k>`` holds, ``"auto"`` by default as in
        :func:`embed`, ...).

    Returns
    -------
    One observation per sample, as ``scanpy.get.aggregate`` returns them: ``X`` the mean profiles
    and ``layers["median"]`` the median ones (of the features after their per-batch scaling,
    ``normalize``; ``var`` names the genes, ``PC1``… or ``f0``… of an ``.obsm`` key),
    ``obsm["X_learned"]`` the set model's profiles (its first seed's), ``obs`` each sample's
    label, batch and ``held_out`` (a test query), and ``uns["aggregate"]``: ``map`` (per retrieval
    task and method, mean ± 95% CI over seeds of the held-out mAP, copairs' definition),
    ``per_seed`` and ``settings``.

    Examples
    --------
    >>> profiles = sa.tl.aggregate(adata, sample_key=["donor_id", "cell_type"], label_key="donor_id", batch_key="cell_type")  # doctest: +SKIP
    >>> profiles.uns["aggregate"]["map"]                      # doctest: +SKIP
    >>> sc.pp.neighbors(profiles, use_rep="X_learned")         # doctest: +SKIP
    """
    from scatlas._errors import ConfigError
    from scatlas._io import checkpoint_path
    from scatlas.data.validate import check_obs_keys
    from scatlas.tl._aggregation import cells_from_anndata, joined_samples, load_aggregate_config, profiles_anndata, run_aggregation

    checkpoints = checkpoint_path(checkpoint_dir, resume)
    columns = [sample_key] if isinstance(sample_key, str) else list(sample_key)
    if not columns:
        raise ConfigError("sample_key: name the sample column, or several whose combinations are the samples; got none")
    joined = len(columns) > 1  # the samples are the columns' combinations, in a column made once the cells are read
    values = {"sample_key": "scatlas_sample" if joined else columns[0], "label_key": label_key, "batch_key": batch_key, "features": features, **settings}
    config = load_aggregate_config(values)
    if joined:
        check_obs_keys(adata, columns)
    cells = cells_from_anndata(adata, load_aggregate_config({**values, "sample_key": label_key}) if joined else config, log=log)
    if joined:
        cells.obs["scatlas_sample"] = joined_samples(cells.obs, columns)
    profiles = profiles_anndata(run_aggregation(cells, config, log=log, checkpoint_dir=checkpoints, resume=resume), cells, config)
    if joined:  # each column that makes the samples, as scanpy.get.aggregate(by=[...]) gives them, and the columns as the setting
        first = cells.obs.drop_duplicates("scatlas_sample").set_index("scatlas_sample")
        for column in columns:
            profiles.obs[column] = first.loc[profiles.obs_names, column].astype(str).to_numpy()
        profiles.uns["aggregate"]["settings"]["sample_key"] = columns
    return profiles


__all__ = ["AggregateConfig", "Annotator", "ReferenceModel", "ScatlasModel", "aggregate", "annotate", "benchmark", "counterfactual", "embed",
           "load_model", "transfer"]
