"""Integration metrics against scib-metrics on real PBMCs, and `scatlas benchmark`."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import scib_metrics
from scib_metrics.nearest_neighbors import NeighborsResults
from sklearn.decomposition import PCA
from typer.testing import CliRunner

from conftest import data_path

from scatlas.cli import app
from scatlas.data import normalize_log1p
from scatlas.metrics import integration as I
from scatlas.metrics.silhouette import silhouette_batch, silhouette_label


@pytest.fixture(scope="module")
def symphony(symphony_path):
    adata = ad.read_h5ad(symphony_path)
    X = normalize_log1p(adata.X).toarray()
    Z = PCA(30, random_state=0).fit_transform(X)
    return X, Z, adata.obs["cell_type"].astype(str).to_numpy(), adata.obs["batch"].astype(str).to_numpy()


def test_graph_metrics_match_scib_metrics(symphony):
    X, Z, labels, batch = symphony
    ours = I.knn(Z, 90)
    ref = NeighborsResults(indices=ours.indices, distances=ours.distances)
    assert ours.indices[0, 0] == 0  # self first
    np.testing.assert_allclose(I.lisi(ours, batch), scib_metrics.lisi_knn(ref, batch), rtol=1e-4)
    assert I.ilisi(ours, batch) == pytest.approx(float(scib_metrics.ilisi_knn(ref, batch)), abs=1e-5)
    assert I.clisi(ours, labels) == pytest.approx(float(scib_metrics.clisi_knn(ref, labels)), abs=1e-5)
    assert I.graph_connectivity(ours, labels) == pytest.approx(float(scib_metrics.graph_connectivity(ref, labels)), abs=1e-9)


def test_leiden_sweep_matches_scib_metrics(symphony):
    X, Z, labels, batch = symphony
    ours = I.knn(Z, 15)
    ref = NeighborsResults(indices=ours.indices, distances=ours.distances)
    sweep = I.leiden_sweep(ours, labels)
    expected = scib_metrics.nmi_ari_cluster_labels_leiden(ref, labels, optimize_resolution=True)
    assert sweep["leiden_nmi"] == pytest.approx(float(expected["nmi"]), abs=1e-9)
    assert sweep["leiden_ari"] == pytest.approx(float(expected["ari"]), abs=1e-9)
    assert I.leiden_sweep(ours, labels, n_jobs=1) == sweep  # forked workers or not, the same clusterings


@pytest.mark.parametrize("k", [15, 50])
def test_connectivities_match_umap(symphony, k):
    from umap.umap_ import fuzzy_simplicial_set

    graph = I.knn(symphony[1], k)
    ref = fuzzy_simplicial_set(sp.coo_matrix((len(graph.indices), 1)), n_neighbors=k, random_state=None, metric=None,
                               knn_indices=graph.indices, knn_dists=graph.distances)[0]
    ours = I._connectivities(graph)
    assert ours.nnz == ref.nnz
    assert abs(ours - sp.csr_matrix(ref)).max() < 1e-6


def test_score_embedding_matches_benchmarker(symphony):
    """The whole row against scib-metrics' Benchmarker (+ Leiden) given the same kNN graph."""
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    from scatlas.tl._benchmark import score_embedding

    X, Z, labels, batch = symphony
    pre = PCA(50, random_state=0).fit_transform(X)
    graph = I.knn(Z, 90)
    ours = score_embedding(Z, graph, labels, batch, pre)
    adata = ad.AnnData(obs=pd.DataFrame({"cell_type": labels, "batch": batch}, index=[str(i) for i in range(len(Z))]))
    adata.obsm["Z"], adata.obsm["pre"] = Z, pre
    bench = Benchmarker(adata, batch_key="batch", label_key="cell_type", embedding_obsm_keys=["Z"], pre_integrated_embedding_obsm_key="pre",
                        bio_conservation_metrics=BioConservation(nmi_ari_cluster_labels_leiden=True), batch_correction_metrics=BatchCorrection(),
                        progress_bar=False)
    bench.prepare(neighbor_computer=lambda _, k: NeighborsResults(indices=graph.indices[:, :k], distances=graph.distances[:, :k]))
    bench.benchmark()
    theirs = bench.get_results(min_max_scale=False).loc["Z"]
    # KMeans NMI / ARI are left out: scikit-learn's k-means (best of 10 inits) and scib-metrics' own JAX k-means
    # stop in different local optima; documented in the README.
    for column in ("Isolated labels", "Silhouette label", "cLISI", "Leiden NMI", "Leiden ARI", "BRAS", "iLISI", "Graph connectivity", "PCR comparison"):
        assert ours[column] == pytest.approx(float(theirs[column]), abs=1e-4), column
    assert ours["KBET"] == pytest.approx(float(theirs["KBET"]), abs=0.02)  # exact vs NN-descent neighbours on the diffusion map


def test_kbet_matches_scib_metrics(symphony):
    X, Z, labels, batch = symphony
    ours = I.knn(Z, 50)
    ref = NeighborsResults(indices=ours.indices, distances=ours.distances)
    rate, stats, p_values = I.kbet(ours, batch)
    ref_rate, ref_stats, ref_p = scib_metrics.kbet(ref, batch)
    assert rate == pytest.approx(float(ref_rate), abs=1e-12)
    np.testing.assert_allclose(stats, ref_stats, rtol=1e-4)
    np.testing.assert_allclose(p_values, ref_p, rtol=1e-3, atol=1e-6)
    per_label = I.kbet_per_label(ours, batch, labels)
    assert per_label == pytest.approx(float(scib_metrics.kbet_per_label(ref, batch, labels)), abs=0.02)
    assert I.kbet_per_label(ours, batch, labels, n_jobs=1) == per_label  # forked workers or not, the same score
    shuffled = I.kbet_per_label(ours, np.random.default_rng(0).permutation(batch), labels)
    assert shuffled > per_label  # Symphony's chemistries separate; random batches mix


def _scaled(state: np.ndarray, item: int) -> float:
    if item == 5:
        raise ValueError(f"item {item} refused")
    if item == 6:
        import os

        os._exit(3)  # a worker killed mid-item (e.g. by the OOM killer)
    return float(state[item] * 2)


def test_forked_map_returns_in_order_and_reports_a_worker_error_or_death():
    """The workers' results in the items' order, as a loop here gives them; an item's error is re-raised with the
    worker's traceback as its cause, and a worker that dies is reported; neither leaves a worker behind."""
    import multiprocessing as mp

    from scatlas.metrics._forked import forked_map

    state = np.arange(10.0)
    assert forked_map(_scaled, [4, 3, 2, 1, 0], state, n_jobs=2) == forked_map(_scaled, [4, 3, 2, 1, 0], state, n_jobs=1) == [8, 6, 4, 2, 0]
    with pytest.raises(ValueError, match="item 5 refused") as raised:
        forked_map(_scaled, [0, 1, 5, 2, 3], state, n_jobs=2)
    assert "in a worker process" in str(raised.value.__cause__) and "_scaled" in str(raised.value.__cause__)
    with pytest.raises(RuntimeError, match=r"a worker process died \(exit code 3\)"):
        forked_map(_scaled, [0, 6, 1, 2], state, n_jobs=2)
    assert not mp.active_children()


def test_single_precision_diffusion_map_gives_the_double_precision_kbet():
    """KBET's default float32 eigensolve (refined by a float64 Rayleigh–Ritz step) against ARPACK in float64.

    On OneK1K as shipped, and resampled with replacement and thinned as the 100k / 1M benchmarks
    build it: repeated draws of one cell make near-disconnected clusters whose eigenvalues lie
    within 1e-4 of 1 and whose weights λ / (1 − λ) decide the neighbourhoods, where an unrefined
    float32 solve is far off.
    """
    adata = ad.read_h5ad(data_path("onek1k_4types_40donors.h5ad"))
    rng = np.random.default_rng(0)
    rows = rng.integers(0, adata.n_obs, 20_000)
    resampled = sp.csr_matrix(adata.X, dtype=np.float32)[rows]
    resampled.data = rng.binomial(resampled.data.astype(np.int64), 0.5).astype(np.float32)
    for X, obs in ((adata.X, adata.obs), (resampled, adata.obs.iloc[rows])):
        Z = PCA(30, random_state=0).fit_transform(normalize_log1p(sp.csr_matrix(X)).toarray())
        graph = I.knn(Z, 50)
        labels, batch = obs["cell_type"].astype(str).to_numpy(), obs["donor_id"].astype(str).to_numpy()
        single, double = (I.kbet_per_label(graph, batch, labels, diffusion_dtype=dtype) for dtype in (np.float32, np.float64))
        assert single == pytest.approx(double, abs=1e-3)
        assert 0.05 < double < 0.95  # a score that can move, not a bound


def test_bras_and_isolated_labels_match_scib_metrics(symphony):
    from scatlas.metrics import bras, isolated_labels, silhouette_samples

    _, Z, labels, batch = symphony
    ref = scib_metrics.utils.silhouette_samples(Z, batch, metric="cosine", between_cluster_distances="mean_other")
    np.testing.assert_allclose(silhouette_samples(Z, batch, metric="cosine", between="mean_other"), ref, atol=1e-4)
    assert bras(Z, labels, batch) == pytest.approx(float(scib_metrics.bras(Z, labels, batch)), abs=1e-4)
    assert isolated_labels(Z, labels, batch) == pytest.approx(float(scib_metrics.isolated_labels(Z, labels, batch)), abs=1e-5)


def test_pcr_matches_scib_metrics(symphony):
    X, Z, _, batch = symphony
    ref = scib_metrics.utils.principal_component_regression(Z, batch, categorical=True)
    assert I.principal_component_regression(Z, batch) == pytest.approx(ref, rel=1e-5)
    centred = Z.copy()
    for b in np.unique(batch):  # remove per-batch means: less batch variance after "integration"
        centred[batch == b] -= Z[batch == b].mean(0)
    got = I.pcr_comparison(Z, centred, batch)
    assert got == pytest.approx(float(scib_metrics.pcr_comparison(Z, centred, batch, categorical=True)), rel=1e-4) and got > 0.9


def test_pcr_continuous_covariate_matches_scib_metrics_default(symphony_path, symphony):
    """scib-metrics' function default is ``categorical=False``; ours follows its Benchmarker (one-hot) unless asked."""
    X, Z, _, batch = symphony
    depth = np.log1p(np.asarray(ad.read_h5ad(symphony_path).X.sum(1)).ravel())  # a real continuous covariate: library size
    ref = scib_metrics.utils.principal_component_regression(Z, depth, categorical=False)
    assert I.principal_component_regression(Z, depth, categorical=False) == pytest.approx(ref, rel=1e-5)
    centred = depth - depth.mean()
    post = Z - np.outer(centred, Z.T @ centred / (centred @ centred)) * 0.7  # 70% of the depth signal regressed out
    ref_cmp = float(scib_metrics.pcr_comparison(Z, post, depth, categorical=False))
    assert I.pcr_comparison(Z, post, depth, categorical=False) == pytest.approx(ref_cmp, rel=1e-4) and ref_cmp > 0
    assert I.principal_component_regression(Z, batch) != pytest.approx(I.principal_component_regression(Z, pd.Categorical(batch).codes, categorical=False))


def test_silhouette_edge_cases_as_scib_metrics(symphony):
    X, Z, labels, batch = symphony
    for one_or_all in (np.zeros(len(Z), dtype=int), np.arange(len(Z))):
        assert silhouette_label(Z, one_or_all) == float(scib_metrics.silhouette_label(Z, one_or_all)) == 0.5
    with pytest.raises(ValueError):  # every batch holds one label: scib-metrics raises, we return NaN on purpose
        scib_metrics.silhouette_batch(Z, labels, labels)
    assert np.isnan(silhouette_batch(Z, labels, labels))


def test_benchmark_cli(symphony_path, symphony, tmp_path):
    X, Z, labels, batch = symphony
    adata = ad.read_h5ad(symphony_path)
    adata.obsm["X_pca"] = Z
    centred = Z.copy()
    for b in np.unique(batch):
        centred[batch == b] -= Z[batch == b].mean(0)
    adata.obsm["X_centred"] = centred
    sc.pp.neighbors(adata, n_neighbors=91, use_rep="X_pca", key_added="pca")  # exact for 1,200 cells: 90 stored neighbours
    adata.write_h5ad(tmp_path / "emb.h5ad")
    result = CliRunner().invoke(app, ["benchmark", str(tmp_path / "emb.h5ad"), "--embedding", "X_pca", "--embedding", "X_centred",
                                      "--label-key", "cell_type", "--batch-key", "batch", "--out", str(tmp_path / "bench")])
    assert result.exit_code == 0, result.output
    assert "KBET: " in result.output and "Silhouette label, Isolated labels: " in result.output  # progress per metric
    table = pd.read_csv(tmp_path / "bench" / "benchmark.csv").set_index("Embedding")
    for column in ("Isolated labels", "BRAS", "Silhouette label", "cLISI", "iLISI", "KBET", "Graph connectivity", "PCR comparison", "KMeans NMI",
                   "KMeans ARI", "Leiden NMI", "Leiden ARI", "Silhouette batch", "Total"):
        assert column in table.columns
    assert table.loc["X_pca", "Silhouette label"] == pytest.approx(scib_metrics.silhouette_label(Z, labels), abs=1e-5)
    assert table.loc["X_centred", "iLISI"] > table.loc["X_pca", "iLISI"]  # centring per batch mixes batches
    assert table.loc["X_pca", "Total"] == pytest.approx(0.6 * table.loc["X_pca", "Bio conservation"] + 0.4 * table.loc["X_pca", "Batch correction"])
    assert (tmp_path / "bench" / "benchmark.png").exists() and (tmp_path / "bench" / "report.html").exists()
    given = CliRunner().invoke(app, ["benchmark", str(tmp_path / "emb.h5ad"), "--embedding", "X_pca", "--graph", "X_pca=pca_distances",
                                     "--label-key", "cell_type", "--batch-key", "batch", "--out", str(tmp_path / "given")])
    assert given.exit_code == 0, given.output
    precomputed = pd.read_csv(tmp_path / "given" / "benchmark.csv").set_index("Embedding")
    for column in ("iLISI", "cLISI", "Graph connectivity"):  # the same neighbours (scanpy's float32 distances)
        assert precomputed.loc["X_pca", column] == pytest.approx(table.loc["X_pca", column], abs=1e-4), column
    assert 0 <= precomputed.loc["X_pca", "KBET"] <= 1 and 0 <= precomputed.loc["X_pca", "Leiden NMI"] <= 1  # connectivity-based: float32-sensitive
    stored = I.neighbors_from_distances(ad.read_h5ad(tmp_path / "emb.h5ad").obsp["pca_distances"], 90)
    exact = I.knn(Z, 90)
    assert np.array_equal(stored.indices[:, 0], np.arange(len(Z))) and (stored.indices == exact.indices).mean() > 0.99
    np.testing.assert_allclose(stored.distances, exact.distances, rtol=1e-4, atol=1e-4)
    short = CliRunner().invoke(app, ["benchmark", str(tmp_path / "emb.h5ad"), "--embedding", "X_pca", "--graph", "X_pca=pca_distances", "--n-neighbors", "120",
                                     "--label-key", "cell_type", "--batch-key", "batch", "--out", str(tmp_path / "b3")])
    assert short.exit_code == 2 and "fewer than 119 stored neighbours" in short.output
    bad = CliRunner().invoke(app, ["benchmark", str(tmp_path / "emb.h5ad"), "--embedding", "X_scVI", "--label-key", "cell_type", "--batch-key", "batch", "--out", str(tmp_path / "b2")])
    assert bad.exit_code == 2 and "X_scVI" in bad.output


@pytest.mark.parametrize("method", ["brute", "pynndescent"])
def test_knn_methods_agree_with_sklearn(method):
    adata = sc.datasets.pbmc68k_reduced()
    Z = adata.obsm["X_pca"][:, :20].astype(np.float64)
    exact = I.knn(Z, 15, method="sklearn")
    other = I.knn(Z, 15, method=method, device="cpu", chunk_size=100)
    assert np.array_equal(other.indices[:, 0], np.arange(len(Z)))  # self first
    if method == "brute":
        np.testing.assert_allclose(other.distances, exact.distances, atol=1e-6)
        assert (other.indices == exact.indices).mean() > 0.999  # ties may swap
    else:
        recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(other.indices, exact.indices)])
        assert recall > 0.95


def test_widths_of_chosen_rows_are_the_exact_widths(symphony):
    from scatlas.metrics.silhouette import silhouette_samples

    _, Z, labels, _ = symphony
    rows = np.random.default_rng(0).choice(len(Z), 300, replace=False)
    for kwargs in ({}, {"metric": "cosine", "between": "mean_other"}):
        np.testing.assert_allclose(silhouette_samples(Z, labels, rows=rows, chunk_size=97, **kwargs), silhouette_samples(Z, labels, **kwargs)[rows], atol=1e-6)


def test_sampled_estimators_are_close_to_the_exact_columns():
    """The opt-out estimators of `score_embedding` (a stratified cell sample) against every exact column, on OneK1K.

    A sample of 1,000 cells per label (of 689–3,606) is not the exact value, but within sampling
    error of it; the other columns do not change. (At 100,000 cells: `benchmarks/metrics_speed.py`.)
    """
    from scatlas.metrics.sampling import sample_rows
    from scatlas.tl._benchmark import score_embedding

    adata = ad.read_h5ad(data_path("onek1k_4types_40donors.h5ad"))
    Z = PCA(30, random_state=0).fit_transform(normalize_log1p(adata.X).toarray())
    labels, batch = adata.obs["cell_type"].astype(str).to_numpy(), adata.obs["donor_id"].astype(str).to_numpy()
    rows = sample_rows(labels, 4000)
    assert rows is not None and len(rows) == 3 * 1000 + 689 and set(labels[rows]) == set(labels)
    assert sample_rows(labels, 4 * 3606) is None  # a quota above every label's size: exact
    graph, pre = I.knn(Z, 90), Z[:, :10]
    exact = score_embedding(Z, graph, labels, batch, pre)
    estimated = score_embedding(Z, graph, labels, batch, pre, sample_size=4000)
    sampled = ["Silhouette label", "Isolated labels", "Silhouette batch", "BRAS", "KBET"]
    assert estimated["Silhouette label"] != exact["Silhouette label"] and estimated["KBET"] != exact["KBET"]  # sampled, not exact
    for key in exact:
        assert estimated[key] == pytest.approx(exact[key], abs=0.01 if key in (*sampled, "Bio conservation", "Batch correction", "Total") else 0), key


def test_benchmark_leaves_unlabelled_cells_out(symphony_path, symphony, tmp_path):
    """Cells without a label are left out of every score with one notice: the scores equal those of the labelled cells
    alone; precomputed graphs, which hold those cells as neighbours, are refused in one line instead."""
    import scatlas as sa
    from scatlas._errors import InputError

    _, Z, _, _ = symphony
    adata = ad.read_h5ad(symphony_path)
    adata.obsm["X_pca"] = Z
    unlabelled = np.zeros(adata.n_obs, dtype=bool)
    unlabelled[::7] = True
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object).where(~unlabelled, None)
    notes: list[str] = []
    table = sa.tl.benchmark(adata, ["X_pca"], label_key="cell_type", batch_key="batch", log=notes.append)
    assert notes == [f"<AnnData>: {unlabelled.sum()} of {adata.n_obs} cells have no label in obs column 'cell_type': "
                     "left out of the benchmark (its scores need a label per cell)",
                     "<AnnData>: .X holds whole numbers: treated as raw counts (normalised + log1p) for the unintegrated PCA of PCR comparison"]
    notes.clear()  # an embedding named twice is scored once, and says so
    alone = sa.tl.benchmark(adata[~unlabelled].copy(), ["X_pca", "X_pca"], label_key="cell_type", batch_key="batch", log=notes.append)
    pd.testing.assert_frame_equal(table, alone)
    assert notes[-1] == "embeddings ['X_pca'] named more than once: each scored once"
    with pytest.raises(sa.ConfigError, match="^n_neighbors: 1; the kNN graph needs at least 2"):  # 0 was a scikit-learn traceback
        sa.tl.benchmark(adata, ["X_pca"], label_key="cell_type", batch_key="batch", n_neighbors=1)
    with pytest.raises(sa.ConfigError, match=r"^embeddings: none given; name .obsm keys to score \(this AnnData has \['X_pca'"):  # it returned an empty table
        sa.tl.benchmark(adata, [], label_key="cell_type", batch_key="batch")
    adata.write_h5ad(tmp_path / "some_unlabelled.h5ad")  # the CLI keeps the notice in the report too
    result = CliRunner().invoke(app, ["benchmark", str(tmp_path / "some_unlabelled.h5ad"), "--embedding", "X_pca", "--label-key", "cell_type",
                                      "--batch-key", "batch", "--out", str(tmp_path / "bench")])
    assert result.exit_code == 0, result.output
    assert f"{unlabelled.sum()} of {adata.n_obs} cells have no label in obs column &#x27;cell_type&#x27;: left out" in (tmp_path / "bench" / "report.html").read_text()
    sc.pp.neighbors(adata, n_neighbors=91, use_rep="X_pca", key_added="pca")
    with pytest.raises(InputError, match="172 cells have no label in obs column 'cell_type'.*'pca_distances'"):
        sa.tl.benchmark(adata, ["X_pca"], label_key="cell_type", batch_key="batch", graphs={"X_pca": "pca_distances"})


def test_benchmark_reads_what_scanpy_leaves_in_x(symphony_path, symphony, tmp_path):
    """`.X` log-normalised by scanpy (the usual state after `sc.pp.log1p`) is used as it is for the default PCA, counts in a
    layer are normalised first, and both give the scores of the counts in `.X`: `input="auto"` decides as the other `tl`
    functions do and says so; the CLI takes `--layer` / `--input` alike."""
    import scatlas as sa
    from scatlas._errors import InputError

    counts = ad.read_h5ad(symphony_path)
    counts.obsm["X_pca"] = symphony[1]
    expected = sa.tl.benchmark(counts, ["X_pca"], label_key="cell_type", batch_key="batch", log=lambda _: None)
    scanpy_state = counts.copy()
    scanpy_state.layers["counts"] = counts.X.copy()
    sc.pp.normalize_total(scanpy_state, target_sum=1e4)
    sc.pp.log1p(scanpy_state)
    notes: list[str] = []
    lognorm = sa.tl.benchmark(scanpy_state, ["X_pca"], label_key="cell_type", batch_key="batch", log=notes.append)
    assert notes == ["<AnnData>: .X holds non-integer values: treated as log-normalised for the unintegrated PCA of PCR comparison"]
    layer = sa.tl.benchmark(scanpy_state, ["X_pca"], label_key="cell_type", batch_key="batch", layer="counts", log=notes.append)
    assert notes[-1] == "<AnnData>: layer 'counts' holds whole numbers: treated as raw counts (normalised + log1p) for the unintegrated PCA of PCR comparison"
    for table in (lognorm, layer):
        pd.testing.assert_frame_equal(table, expected, check_exact=False, rtol=1e-6)
    with pytest.raises(InputError, match="non-integer values"):
        sa.tl.benchmark(scanpy_state, ["X_pca"], label_key="cell_type", batch_key="batch", input="counts")
    with pytest.raises(InputError, match="input 'raw': choose one of auto, counts, lognorm"):
        sa.tl.benchmark(scanpy_state, ["X_pca"], label_key="cell_type", batch_key="batch", input="raw")
    scanpy_state.write_h5ad(tmp_path / "lognorm.h5ad")
    result = CliRunner().invoke(app, ["benchmark", str(tmp_path / "lognorm.h5ad"), "--embedding", "X_pca", "--label-key", "cell_type",
                                      "--batch-key", "batch", "--layer", "counts", "--out", str(tmp_path / "bench")])
    assert result.exit_code == 0, result.output
    assert "layer 'counts' holds whole numbers" in result.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "bench" / "benchmark.csv"), expected, check_exact=False, rtol=1e-6)
