"""``scatlas benchmark``: judge embeddings stored in ``.obsm`` with scib-metrics' metric set.

One kNN graph per embedding (k = 90; GPU brute force, or scikit-learn / pynndescent on a CPU)
is shared by the graph metrics (LISI uses all 90 neighbours, KBET the first 50, Leiden and Graph
connectivity the first 15, as scib-metrics' Benchmarker does).
Columns follow scib-metrics' Benchmarker names; ``Bio conservation`` and ``Batch correction``
average the available metrics of each group, ``Total = 0.6 · bio + 0.4 · batch``.
Bio: Isolated labels, KMeans NMI / ARI, Silhouette label, cLISI; batch: BRAS, iLISI, KBET, Graph
connectivity, PCR comparison (scib-metrics' defaults, with BRAS in place of Silhouette batch,
which is reported beside them but not aggregated). ``Leiden NMI`` / ``Leiden ARI`` (resolution
sweep, off by default in scib-metrics' Benchmarker) are reported with their chosen resolution,
not aggregated.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import anndata as ad
import numpy as np
import pandas as pd

from scatlas._describe import did_you_mean
from scatlas._errors import ConfigError, InputError
from scatlas._io import write_csv
from scatlas.data.io import INPUT_KEY, get_matrix, read_anndata, source_name, to_csr
from scatlas.data.preprocess import normalize_log1p
from scatlas.data.validate import InputKind, check_embeddings, check_obs_keys, one_batch_notice, resolve_input, validate, with_values
from scatlas.metrics.clustering import kmeans_ari_nmi
from scatlas.metrics.integration import Neighbors, neighbors_from_distances, clisi, graph_connectivity, ilisi, kbet_per_label, knn, leiden_sweep, pcr_comparison
from scatlas.metrics.sampling import group_weighted_mean, sample_rows
from scatlas.metrics.silhouette import bras, isolated_label_score, rescaled_width, silhouette_batch, silhouette_samples

BIO = ["Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI"]
BATCH = ["BRAS", "iLISI", "KBET", "Graph connectivity", "PCR comparison"]
Log = Callable[[str], None]
T = TypeVar("T")
EXACT_MAX_CELLS = 100_000
"""Above this many cells ``benchmark(exact=None)`` estimates the silhouettes and KBET from a cell sample."""
SAMPLE_SIZE = 50_000
"""Cells sampled (stratified by label) by the estimators."""


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def benchmark(adata: ad.AnnData, embeddings: str | Sequence[str], label_key: str, batch_key: str, pre_key: str | None = None, n_neighbors: int = 90,
              input: InputKind = "auto", layer: str | None = None, seed: int = 0, graphs: Mapping[str, str] | None = None, log: Log = _warn,
              exact: bool | None = None, sample_size: int = SAMPLE_SIZE, progress: Log | None = None) -> pd.DataFrame:
    """Score every ``.obsm`` embedding; one row per embedding.

    Parameters
    ----------
    adata
        Cells with the embeddings in ``.obsm``.
    embeddings
        ``.obsm`` keys (or one key).
    label_key, batch_key
        Cell type and batch columns. Cells without a label (a missing value) are left out of every
        score, with one notice; the batch column must be complete.
    pre_key
        ``.obsm`` key of the unintegrated reference for PCR comparison (default: a 50-component
        PCA of the log-normalised matrix, ``X`` or ``layer``).
    n_neighbors
        k of the shared kNN graph.
    input
        What the matrix of the default PCA holds: ``"counts"`` (normalised + log1p first),
        ``"lognorm"`` (used as it is), or ``"auto"`` (default): counts when its values are whole
        numbers, as the other ``tl`` functions decide, with a notice saying which.
    layer
        Layer holding that matrix (default ``X``; ``"raw"``: ``.raw``, as scanpy's ``use_raw``).
    seed
        k-means seed.
    graphs
        Precomputed kNN graphs: embedding key → ``.obsp`` key of a distance matrix (one row of
        neighbour distances per cell, self excluded, as ``scanpy.pp.neighbors`` stores it). The
        graph metrics of that embedding use it instead of a new search; it must hold at least
        ``n_neighbors − 1`` neighbours per cell.
    log
        Receives notices (default: a ``UserWarning``), e.g. that one batch leaves the batch scores
        and ``Total`` undefined (NaN), or that estimators are used.
    exact
        ``True``: every column exact, at ``O(n²)`` cost for the silhouettes and KBET's
        diffusion neighbourhoods. ``False``: those five columns (Silhouette label, Isolated
        labels, Silhouette batch, BRAS, KBET) are estimated from the exact values of a
        stratified sample of ``sample_size`` cells. ``None`` (default): exact up to
        :data:`EXACT_MAX_CELLS` (100,000) cells, estimated above. Measured error of the
        estimators at 100,000 cells: ≤ 0.0003 per column (``benchmarks/metrics_speed.py``).
    sample_size
        Cells the estimators sample, split equally over the labels (at least 1,000 each).
    progress
        Receives one line per metric with its wall time (e.g. ``print``).

    Returns
    -------
    One row per embedding: the columns of scib-metrics' ``Benchmarker`` (bio conservation,
    batch correction, their aggregates and ``Total``), as ``benchmark.csv``.

    Examples
    --------
    >>> sa.tl.embed(adata, "fe", batch_key="batch")                           # doctest: +SKIP
    >>> sa.tl.benchmark(adata, ["X_fe"], label_key="cell_type", batch_key="batch")  # doctest: +SKIP
    """
    embeddings = [embeddings] if isinstance(embeddings, str) else list(embeddings)  # one key, as scanpy's basis=
    repeated = sorted({key for key in embeddings if embeddings.count(key) > 1})
    embeddings = list(dict.fromkeys(embeddings))
    if not embeddings:
        raise ConfigError(f"embeddings: none given; name .obsm keys to score (this AnnData has {list(adata.obsm)})")
    if n_neighbors < 2:
        raise ConfigError(f"n_neighbors: {n_neighbors}; the kNN graph needs at least 2 (each cell is its own first neighbour)")
    check_obs_keys(adata, [label_key], missing_ok=True)
    unlabelled = int(adata.obs[label_key].isna().sum())
    if unlabelled and graphs:
        raise InputError(f"{source_name(adata)}: {unlabelled} cells have no label in obs column {label_key!r}, and the precomputed graphs "
                         f"{sorted(set(graphs.values()))} hold them as neighbours: leave them out before computing the graphs, or score without graphs")
    notices: list[str] = []  # said once every check passed, so that bad input gets its one line alone
    labelled = with_values(adata.obs[label_key], source_name(adata), label_key, "no label", "the benchmark (its scores need a label per cell)",
                           notices.append)
    if unlabelled:
        adata = adata[labelled]
    validate(adata, batch_key=batch_key, label_key=label_key, check_values=False)
    matrix = None if pre_key is not None else unintegrated_cells(adata, layer, notices)
    counts, decided = resolve_input(matrix, layer, input) if matrix is not None else (False, None)
    if matrix is not None:
        validate(matrix, batch_key=batch_key if matrix is adata else None, layer=layer, require_counts=counts, lognorm=not counts)
    strays = sorted(set(graphs or {}) - set(embeddings))
    if strays:
        raise InputError(f"graphs given for {strays}, which are not among the embeddings scored {embeddings}")
    absent = [g for g in (graphs or {}).values() if g not in adata.obsp]
    if absent:
        raise InputError(f"graphs {absent} not in .obsp; available: {list(adata.obsp)}")
    if pre_key is not None and pre_key not in adata.obsm:
        raise InputError(f"{source_name(adata)}: pre_key {pre_key!r} (the unintegrated reference of PCR comparison) not in .obsm"
                         f"{did_you_mean(pre_key, adata.obsm)}; available: {list(adata.obsm)}")
    check_embeddings(adata, [*embeddings, *([pre_key] if pre_key else [])])
    notices += [f"{decided} for the unintegrated PCA of PCR comparison"] if decided else []
    notice = one_batch_notice(adata, batch_key)
    notices += [f"{notice}; Batch correction and Total are NaN, compare Bio conservation"] if notice else []
    notices += [f"embeddings {repeated} named more than once: each scored once"] if repeated else []
    notices += [f"n_neighbors {n_neighbors} is more than the {adata.n_obs:,} cells: each cell's neighbours are all the cells"] if n_neighbors > adata.n_obs else []
    for line in notices:
        log(line)
    labels = adata.obs[label_key].astype(str).to_numpy()
    batch = adata.obs[batch_key].astype(str).to_numpy()
    estimate = adata.n_obs > EXACT_MAX_CELLS if exact is None else not exact
    if estimate and exact is None:
        log(f"{adata.n_obs:,} cells > {EXACT_MAX_CELLS:,}: silhouettes and KBET are estimated from {sample_size:,} sampled cells (exact=True for exact values)")
    if pre_key is not None:
        pre = np.asarray(adata.obsm[pre_key])
    else:
        from sklearn.decomposition import PCA

        X = to_csr(get_matrix(matrix, layer))  # sparse in, centred implicitly by ARPACK: never a dense cells × genes matrix
        pre = PCA(min(50, X.shape[1] - 1), svd_solver="arpack", random_state=0).fit_transform(normalize_log1p(X) if counts else X)
    rows = []
    for key in embeddings:
        Z = np.asarray(adata.obsm[key], dtype=np.float64)
        graph = neighbors_from_distances(adata.obsp[graphs[key]], n_neighbors, f".obsp[{graphs[key]!r}]") if key in (graphs or {}) else knn(Z, n_neighbors)
        if progress is not None:
            progress(f"{key}:")
        rows.append({"Embedding": key, **score_embedding(Z, graph, labels, batch, pre, seed, sample_size if estimate else None, progress)})
    return pd.DataFrame(rows)


def unintegrated_cells(adata: ad.AnnData, layer: str | None, notices: list[str]) -> ad.AnnData:
    """The cells whose matrix (``X`` or ``layer``) PCR comparison's unintegrated PCA starts from: ``adata``'s own, or for a
    results-only file (``scatlas embed`` / ``nmf``: no ``X``) the same cells of the file it names in ``.uns[INPUT_KEY]``,
    with a line in ``notices``."""
    recorded = adata.uns.get(INPUT_KEY, {}).get("path")
    if adata.X is not None or (recorded is None and layer is not None):  # a layer it lacks is named by validation
        return adata
    fix = ("name an unintegrated .obsm embedding as pre_key (CLI: --pre-key, e.g. the X_pca of `scatlas embed --model pca`), or benchmark the "
           "file that holds the counts")
    if recorded is None:
        raise InputError(f"{source_name(adata)}: no .X for the unintegrated PCA that PCR comparison starts from (a results-only file, as "
                         f"`scatlas embed` and `nmf` write, names no input file in .uns[{INPUT_KEY!r}]): {fix}")
    if not Path(recorded).exists():
        raise InputError(f"{source_name(adata)}: no .X, and {recorded}, the file it was made from (.uns[{INPUT_KEY!r}]), is not there for the "
                         f"unintegrated PCA of PCR comparison: {fix}")
    source = read_anndata(recorded)
    rows = source.obs_names.get_indexer(adata.obs_names)
    if (rows < 0).any():
        raise InputError(f"{source_name(adata)}: {int((rows < 0).sum())} of its cells are not in {recorded} (.uns[{INPUT_KEY!r}]), the file "
                         f"it names for the unintegrated PCA of PCR comparison: {fix}")
    notices.append(f"{source_name(adata)}: no .X; PCR comparison's unintegrated PCA reads the matrix of {recorded}, the file it was made from")
    return source if np.array_equal(rows, np.arange(source.n_obs)) else source[rows].copy()


def score_embedding(Z: np.ndarray, graph: Neighbors, labels: np.ndarray, batch: np.ndarray, pre: np.ndarray, seed: int = 0,
                    sample_size: int | None = None, progress: Log | None = None) -> dict[str, float]:
    """Every benchmark column for one embedding and its kNN graph (self first, ≥ 90 neighbours for the default set).

    One exact label-silhouette pass serves ``Silhouette label`` and ``Isolated labels``; KBET uses
    the graph's first 50 neighbours, Leiden and Graph connectivity its first 15, LISI all 90, as
    scib-metrics' Benchmarker.

    Parameters
    ----------
    Z
        ``(n_cells, n_dims)`` embedding.
    graph
        Its kNN graph.
    labels, batch
        Cell type and batch of each cell.
    pre
        Unintegrated reference embedding for ``PCR comparison``.
    seed
        k-means seed, and seed of the estimators' cell sample.
    sample_size
        ``None``: every column exact. Otherwise the silhouettes (label, batch, BRAS, isolated
        labels) and KBET are estimated from a stratified sample of about this many cells
        (:func:`~scatlas.metrics.sampling.sample_rows`): each sampled cell's value is exact,
        the mean is estimated; KBET's per-label eigensolve then also runs in single precision
        with a float64 refinement (``diffusion_dtype`` of :func:`~scatlas.metrics.integration.kbet_per_label`).
    progress
        Receives one line per metric with its wall time.
    """

    def step(name: str, compute: Callable[[], T]) -> T:
        start = time.perf_counter()
        out = compute()
        if progress is not None:
            progress(f"{name}: {time.perf_counter() - start:.1f} s")
        return out

    km = step("KMeans NMI/ARI", lambda: kmeans_ari_nmi(Z, labels, seed=seed))
    rows = sample_rows(labels, sample_size, seed)
    label_widths = step("Silhouette label, Isolated labels", lambda: silhouette_samples(Z, labels, rows=rows))
    row = {
        "Isolated labels": isolated_label_score(label_widths, labels, batch, rows=rows),
        "Silhouette label": rescaled_width(group_weighted_mean(label_widths, labels, rows)),
        "cLISI": step("cLISI", lambda: clisi(graph, labels)),
        "KMeans NMI": km["kmeans_nmi"],
        "KMeans ARI": km["kmeans_ari"],
        **step("Leiden NMI/ARI", lambda: leiden_columns(graph, labels)),
        "Silhouette batch": step("Silhouette batch", lambda: silhouette_batch(Z, labels, batch, sample_size=sample_size, seed=seed)),
        "BRAS": step("BRAS", lambda: bras(Z, labels, batch, sample_size=sample_size, seed=seed)),
        "iLISI": step("iLISI", lambda: ilisi(graph, batch)),
        "KBET": step("KBET", lambda: kbet_per_label(graph.first(50), batch, labels, sample_size=sample_size, seed=seed,
                                                    diffusion_dtype=np.float64 if sample_size is None else np.float32)),
        "Graph connectivity": step("Graph connectivity", lambda: graph_connectivity(graph.first(15), labels)),
        "PCR comparison": step("PCR comparison", lambda: pcr_comparison(pre, Z, batch)),
    }
    row["Bio conservation"] = float(np.mean([row[m] for m in BIO]))
    row["Batch correction"] = float(np.mean([row[m] for m in BATCH]))
    row["Total"] = 0.6 * row["Bio conservation"] + 0.4 * row["Batch correction"]
    return row


def leiden_columns(graph: Neighbors, labels: np.ndarray) -> dict[str, float]:
    """scib-metrics' ``Leiden NMI`` / ``Leiden ARI`` (best-NMI resolution of 0.2 … 2.0) on the graph's first 15 neighbours."""
    sweep = leiden_sweep(graph.first(15), labels)
    return {"Leiden NMI": sweep["leiden_nmi"], "Leiden ARI": sweep["leiden_ari"], "Leiden resolution": sweep["leiden_resolution"]}


def write_benchmark(table: pd.DataFrame, out: str | Path, title: str, notices: Sequence[str] = ()) -> Path:
    """``benchmark.csv``, ``benchmark.png`` (metric × embedding heat table) and ``report.html`` in ``out``; the report
    repeats the ``notices`` :func:`benchmark` logged (cells left out, one batch, estimated columns) above the scores."""
    import matplotlib.pyplot as plt

    from scatlas._io import save_figure
    from scatlas.report.html import Section, write_report

    out = Path(out)
    write_csv(table, out / "benchmark.csv")
    values = table.set_index("Embedding")[[*BIO, "Leiden NMI", "Leiden ARI", *BATCH, "Silhouette batch", "Bio conservation", "Batch correction", "Total"]]
    fig, ax = plt.subplots(figsize=(1.1 * values.shape[1] + 2, 0.6 * len(values) + 1.5))
    ax.imshow(values.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values.iat[i, j]:.2f}", ha="center", va="center", color="white" if values.iat[i, j] < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(values.shape[1]), values.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(values.shape[0]), values.index, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, out / "benchmark.png")
    write_report(out / "report.html", f"Benchmark: {title}", [Section("Scores (higher is better; Total = 0.6 bio + 0.4 batch)", [table], [out / "benchmark.png"],
                                                                      note=" ".join(notices))])
    return out / "benchmark.csv"
