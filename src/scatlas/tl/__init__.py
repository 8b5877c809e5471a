"""AnnData-level tools (floor 2), scanpy style: AnnData in, results written under predictable keys.

=====================  ========================================================================
:func:`embed`          fit any embedding model on all cells → ``.obsm['X_<model>']`` (+ W in ``.varm``)
:func:`counterfactual` ``re`` reconstructions "as if from batch b" → a layer
:func:`annotate`       a trained classifier's calls → ``.obs`` / ``.obsm``
:func:`transfer`       reference → queries: calibrated calls, ``unknown`` flags → ``.obs`` / ``.obsm``
:func:`aggregate`      learned set model vs mean profiles per sample, scored by mAP → DataFrame
:func:`benchmark`      scib-metrics' metric set for ``.obsm`` embeddings → DataFrame
=====================  ========================================================================

The CLI (``scatlas embed / nmf / annotate / transfer / aggregate / benchmark``) and the experiment
runner call these functions; there is no second implementation of any step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scatlas._lazy import lazy_attributes

if TYPE_CHECKING:
    from pathlib import Path

    import anndata as ad
    import pandas as pd

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


def aggregate(adata: ad.AnnData, *, sample_key: str, label_key: str, batch_key: str | None = None, features: str | None = None,
              checkpoint_dir: str | Path | None = None, resume: bool = False, **settings: Any) -> pd.DataFrame:
    """Learn sample profiles with the set model and score them against mean / median aggregation by mAP.

    Parameters
    ----------
    adata
        Cells with per-cell features in ``.X`` (or a layer, ``layer=``), an ``.obsm`` key or
        ``pca:<k>`` (``features``). A backed AnnData (``anndata.read_h5ad(path, backed="r")``) is
        read in chunks, its matrix never loaded (``pca:<k>``: streamed highly variable genes, then
        an exact PCA).
    sample_key
        Column naming each cell's sample (well, donor × condition, ...).
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
    **settings
        Other :class:`~scatlas.tl._aggregation.AggregateConfig` fields (``seeds``, ``width``,
        ``layer``, ``input``: what the matrix of ``pca:<k>`` holds, ``"auto"`` by default as in
        :func:`embed`, ...).

    Returns
    -------
    Per retrieval task and method: mean ± 95% CI over seeds of the held-out mAP (copairs' definition).

    Examples
    --------
    >>> sa.tl.aggregate(adata, sample_key="sample", label_key="cell_type", batch_key="donor_id")  # doctest: +SKIP
    """
    from scatlas._io import checkpoint_path
    from scatlas.tl._aggregation import cells_from_anndata, load_aggregate_config, run_aggregation

    checkpoints = checkpoint_path(checkpoint_dir, resume)
    config = load_aggregate_config({"sample_key": sample_key, "label_key": label_key, "batch_key": batch_key, "features": features, **settings})
    return run_aggregation(cells_from_anndata(adata, config), config, log=lambda _: None, checkpoint_dir=checkpoints, resume=resume)


__all__ = ["AggregateConfig", "Annotator", "ReferenceModel", "ScatlasModel", "aggregate", "annotate", "benchmark", "counterfactual", "embed",
           "load_model", "transfer"]
