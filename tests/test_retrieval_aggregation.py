"""Retrieval metrics against copairs on real LINCS profiles; the learned set aggregator on a toy and on real cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests
from typer.testing import CliRunner

from scatlas import ConfigError, InputError
from scatlas.tl._aggregation import load_aggregate_config, make_samples, run_aggregation, toy_covariance, validation_samples
from scatlas.cli import app
from scatlas.metrics import retrieval

import copairs.map as copairs_map  # noqa: E402  (the reference implementation)
runner = CliRunner()


@pytest.fixture(scope="module")
def lincs():
    from conftest import data_path

    df = pd.read_csv(data_path("lincs_SQ00015054_well_profiles.csv.gz"))
    meta = df.filter(like="Metadata_")
    return meta, df.drop(columns=meta.columns).to_numpy()


TASKS = {
    # replicate retrieval: wells of the same compound (other doses) vs other compounds
    "replicate": ((["Metadata_broad_sample"], [], [], ["Metadata_broad_sample"]), ["Metadata_broad_sample"], None),
    # mechanism retrieval: other compounds of the same MoA vs other MoAs (wells with a MoA)
    "moa": ((["Metadata_moa"], ["Metadata_broad_sample"], [], ["Metadata_moa"]), ["Metadata_moa"], "moa"),
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_matches_copairs_on_lincs(lincs, task):
    meta, feats = lincs
    rules, sameby, subset = TASKS[task]
    if subset:
        keep = meta["Metadata_moa"].notna().to_numpy()
        meta, feats = meta[keep].reset_index(drop=True), feats[keep]
    ref = copairs_map.average_precision(meta, feats, *rules, progress_bar=False)
    ours = retrieval.average_precision(meta, feats, *rules)
    np.testing.assert_allclose(ours["average_precision"], ref["average_precision"], atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(ours["normalized_average_precision"], ref["normalized_average_precision"], atol=1e-9, equal_nan=True)
    assert (ours["n_pos_pairs"].to_numpy() == ref["n_pos_pairs"].to_numpy()).all()
    assert (ours["n_total_pairs"].to_numpy() == ref["n_total_pairs"].to_numpy()).all()
    ref_map = copairs_map.mean_average_precision(ref, sameby, null_size=2000, threshold=0.05, seed=3, progress_bar=False)
    our_map = retrieval.mean_average_precision(ours, sameby, null_size=2000, threshold=0.05, seed=3)
    merged = ref_map.merge(our_map, on=sameby, suffixes=("_ref", "_ours"))
    assert len(merged) == len(ref_map) == len(our_map) > 2
    for column in ("mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value"):
        np.testing.assert_allclose(merged[f"{column}_ours"], merged[f"{column}_ref"], atol=1e-9)
    assert (merged["below_corrected_p_ours"] == merged["below_corrected_p_ref"]).all()


def test_edge_cases_against_copairs(lincs):
    """copairs' behaviour where it is well defined, and our documented choice where it is not."""
    from copairs.matching import UnpairedException

    from scatlas import UnpairedError

    meta, feats = lincs
    # normalized AP is clipped to [-1, 1] as copairs does: two positives ranked below the one negative
    toy = pd.DataFrame({"g": ["a", "a", "a", "b"]})
    pts = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.05]])
    rules = (["g"], [], [], ["g"])
    ours = retrieval.average_precision(toy, pts, *rules)
    ref = copairs_map.average_precision(toy, pts, *rules, progress_bar=False)
    assert ours.loc[0, "normalized_average_precision"] == ref.loc[0, "normalized_average_precision"] == -1.0
    np.testing.assert_allclose(ours["average_precision"], ref["average_precision"], atol=1e-9)
    # no positive pair at all: both raise (ours is also a ValueError)
    unique = (["Metadata_Well"], [], [], ["Metadata_Well"])
    with pytest.raises(UnpairedException):
        copairs_map.average_precision(meta, feats, *unique, progress_bar=False)
    with pytest.raises(UnpairedError, match="no positive pairs") as caught:
        retrieval.average_precision(meta, feats, *unique)
    assert isinstance(caught.value, ValueError) and isinstance(InputError("x"), ValueError)
    # an all-zero profile: NaN scores of its own, similarity 0 as others' partner (copairs ranks NaN arbitrarily)
    rules = TASKS["replicate"][0]
    zeroed = feats.astype(np.float64).copy()
    zeroed[0] = 0
    ours = retrieval.average_precision(meta, zeroed, *rules)
    assert np.isnan(ours.loc[0, "average_precision"]) and ours["average_precision"].iloc[1:].notna().all()
    partner = np.flatnonzero(meta["Metadata_broad_sample"].to_numpy() == meta["Metadata_broad_sample"].iloc[0])[1]
    unit = zeroed / np.maximum(np.linalg.norm(zeroed, axis=1, keepdims=True), 1e-300)
    sims = (unit[partner] @ unit.T).astype(np.float32)
    assert sims[0] == 0 and ours.loc[partner, "n_pos_pairs"] >= 1
    # float32 input is ranked in float64 (copairs would rank in float32): same result as float64 input
    np.testing.assert_array_equal(retrieval.average_precision(meta, feats.astype(np.float32), *rules)["average_precision"],
                                  retrieval.average_precision(meta, feats.astype(np.float32).astype(np.float64), *rules)["average_precision"])


def test_precision_at_r_baseline_and_bh(lincs):
    meta, feats = lincs
    ap = retrieval.average_precision(meta, feats, ["Metadata_broad_sample"], [], [], ["Metadata_broad_sample"])
    row = ap[ap["n_pos_pairs"] > 0].iloc[0]
    assert 0 <= row["precision_at_r"] <= 1
    assert row["baseline_corrected_ap"] == pytest.approx(row["average_precision"] - row["n_pos_pairs"] / row["n_total_pairs"])
    p = np.random.default_rng(0).random(50) ** 2
    np.testing.assert_allclose(retrieval.benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1])


def test_retrieval_input_errors(lincs):
    meta, feats = lincs
    with pytest.raises(InputError, match="Metadata_moa"):
        retrieval.average_precision(meta, feats, ["Metadata_moa"], [], [], ["Metadata_moa"])  # NaN MoA for DMSO
    with pytest.raises(InputError, match="neither a metadata column"):
        retrieval.average_precision(meta, feats, ["compound"], [], [], ["compound"])
    filtered = retrieval.average_precision(meta, feats, ["Metadata_broad_sample", "Metadata_broad_sample != 'DMSO'"], [], [], ["Metadata_broad_sample"])
    assert (filtered["Metadata_broad_sample"] != "DMSO").all()


def test_toy_covariance_learned_beats_mean(tmp_path):
    cfg = load_aggregate_config({"sample_key": "sample", "label_key": "label", "batch_key": "replicate", "normalize": "none", "seeds": [0],
                                 "width": 256, "out_width": 256, "cells_mean": 400, "cells_sd": 100, "cells_min": 100,
                                 "max_epochs": 40, "patience": 10, "labels_per_batch": 10})
    summary = run_aggregation(toy_covariance(0), cfg, tmp_path / "out", log=lambda _: None).summary
    mAP = summary[summary["metric"] == "map"].set_index("method")["mean"]
    assert mAP["learned"] >= 0.8
    assert mAP["mean"] < 0.3  # chance: 3 positives among 39 candidates
    for name in ("metrics.csv", "metrics_95CI.csv", "profiles_learned.h5ad", "profiles_mean.parquet", "precision_recall.png", "model.pt", "report.html"):
        assert (tmp_path / "out" / name).exists()


def test_validation_samples_each_have_a_same_label_partner():
    labels = np.repeat(np.arange(25), [10, 10, 10, *[3] * 10, *[2] * 10, 1, 1])  # 3 large labels, 20 small, 2 single samples
    val = validation_samples(labels, 0.2, seed=0)
    per_label = pd.Series(val).groupby(labels).sum()
    assert (per_label[per_label > 0] >= 2).all()  # every validation sample can retrieve a partner
    assert per_label.loc[[0, 1, 2]].tolist() == [2, 2, 2]  # 20% of each large label, 8 of 10 left to train
    small = per_label.loc[3:22]
    assert (small > 0).sum() == 4 and ((small == 0) | (small == pd.Series(labels).value_counts().loc[3:22])).all()  # 20% of the small labels, whole
    assert per_label.loc[[23, 24]].tolist() == [0, 0]  # a label's only sample trains
    assert (validation_samples(labels, 0.2, seed=0) == val).all() and not (validation_samples(labels, 0.2, seed=1) == val).all()
    for few in ([0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]):  # holding labels out whole would leave one label to train on: a plain draw
        assert (validation_samples(np.array(few), 0.2, seed=0) == (np.random.default_rng(0).random(len(few)) < 0.2)).all()


def test_learned_profiles_beat_the_mean_at_finding_a_donor_across_cell_types(tmp_path):
    """The README's real example: a donor's profiles of other cell types (OneK1K, 40 donors × 4 types; classical monocytes held out)."""
    from conftest import data_path

    result = runner.invoke(app, ["aggregate", str(data_path("onek1k_4types_40donors.h5ad")), "--sample-key", "donor_id,cell_type", "--label-key", "donor_id",
                                 "--batch-key", "cell_type", "--features", "pca:50", "--seeds", "6", "--out", str(tmp_path / "donors")])
    assert result.exit_code == 0, result.output
    mAP = pd.read_csv(tmp_path / "donors" / "metrics_95CI.csv").query("metric == 'map'").set_index("method")
    assert mAP.loc["learned", "ci_low"] > mAP.loc["mean", "mean"]  # beyond the spread over seeds (validating on random samples: it was not)
    assert mAP.loc["mean", "mean"] > mAP.loc["median", "mean"] > 0.1  # a random ranking scores about 0.05


def test_tl_aggregate_returns_one_observation_per_sample(tmp_path):
    """As scanpy's get.aggregate: samples × features (mean in X, median in a layer), the learned profiles in obsm, the scores in uns."""
    import anndata as ad
    import scatlas as sa
    from conftest import data_path

    adata = ad.read_h5ad(data_path("onek1k_4types_40donors.h5ad"))
    adata.obsm["X_some"] = np.log1p(adata.X[:, :12].toarray())
    settings = {"label_key": "donor_id", "batch_key": "cell_type", "seeds": [0], "max_epochs": 2, "width": 64, "head_width": 32, "out_width": 16}
    lines: list[str] = []
    profiles = sa.tl.aggregate(adata, sample_key=["donor_id", "cell_type"], features="X_some", normalize="none", log=lines.append, **settings)
    by = adata.obs["donor_id"].astype(str) + "|" + adata.obs["cell_type"].astype(str)
    assert profiles.shape == (by.nunique(), 12) == (159, 12) and list(profiles.var_names[:2]) == ["f0", "f1"] and lines  # 40 donors x 4 types, one missing
    assert profiles.obs_names[0] == profiles.obs["scatlas_sample"].iloc[0] == by.iloc[0]
    features = pd.DataFrame(adata.obsm["X_some"], index=by)
    np.testing.assert_allclose(profiles.X, features.groupby(level=0).mean().loc[profiles.obs_names], rtol=1e-5)
    np.testing.assert_allclose(profiles.layers["median"], features.groupby(level=0).median().loc[profiles.obs_names], rtol=1e-5)
    held_out = profiles.obs.loc[profiles.obs["held_out"], "cell_type"].unique()
    assert len(held_out) == 1 and profiles.obs["held_out"].sum() == (profiles.obs["cell_type"] == held_out[0]).sum() >= 39  # one cell type of four (30%), whole
    assert profiles.obsm["X_learned"].shape == (159, 16)
    scores = profiles.uns["aggregate"]["map"]
    assert set(scores["method"]) == {"learned", "mean", "median"} and len(profiles.uns["aggregate"]["per_seed"]) == 3  # mean, median, learned by seed 0
    profiles.write_h5ad(tmp_path / "profiles.h5ad")  # writable as it is
    written = ad.read_h5ad(tmp_path / "profiles.h5ad").uns["aggregate"]["settings"]
    assert written["seeds"].tolist() == [0] and written["sample_key"].tolist() == ["donor_id", "cell_type"]
    by_sex = sa.tl.aggregate(adata, sample_key=["donor_id", "cell_type"], label_key="sex", batch_key="cell_type", features="X_some", seeds=[0],
                             max_epochs=1, width=32, head_width=16, out_width=8, log=lambda _: None)
    assert (by_sex.obs_names == by_sex.obs["donor_id"] + "|" + by_sex.obs["cell_type"]).all()  # every column that makes the samples, as scanpy's
    genes = sa.tl.aggregate(adata, sample_key="donor_id", label_key="sex", batch_key=None, seeds=[0], max_epochs=1, width=32, head_width=16, out_width=8)
    assert genes.n_obs == 40 and list(genes.var_names) == list(adata.var_names)  # .X's features are its genes


def test_aggregate_cli_on_cellbench_held_out_plate(tmp_path, cellbench5_path):
    result = runner.invoke(app, ["aggregate", str(cellbench5_path), "--cells-per-sample", "10", "--label-key", "cell_line", "--batch-key", "batch",
                                 "--features", "pca:30", "--width", "128", "--seeds", "2", "--max-epochs", "15", "--out", str(tmp_path / "cb"), "--stream"])
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "cb" / "metrics_95CI.csv")
    learned = metrics[(metrics["method"] == "learned") & (metrics["metric"] == "map")].iloc[0]
    assert learned["n"] == 2 and learned["ci_low"] <= learned["mean"] <= learned["ci_high"]
    assert learned["mean"] > 0.8
    assert set(metrics["method"]) == {"learned", "mean", "median"}
    from test_runner_cli import render_in_chromium

    dom, console_log = render_in_chromium(tmp_path / "cb" / "report.html")
    assert "Held-out queries" in dom and "data:image/png;base64" in dom and "Uncaught" not in console_log
    profiles = pd.read_parquet(tmp_path / "cb" / "profiles_mean.parquet")
    assert profiles["batch"].nunique() == 3


@pytest.mark.parametrize("features", ["pca:30", None, "obsm"])
def test_streamed_features_equal_loaded(tmp_path, cellbench5_path, features):
    """``read_cells(..., stream=True)`` never loads X and gives the loaded file's features: the same HVGs and exact PCA
    (bit-equal), ``.X`` densified chunk by chunk, an obsm key; a backed view is refused in one line."""
    import anndata as ad

    from scatlas.tl._aggregation import cells_from_anndata, read_cells

    path = cellbench5_path
    if features == "obsm":
        adata = ad.read_h5ad(path)
        adata.obsm["X_cells"] = np.random.default_rng(0).normal(size=(adata.n_obs, 7)).astype(np.float32)
        adata.write_h5ad(path := tmp_path / "with_obsm.h5ad")
        features = "X_cells"
    config = load_aggregate_config({"sample_key": "batch", "label_key": "cell_line", "features": features})
    loaded, streamed = read_cells(path, config), read_cells(path, config, stream=True)
    assert np.array_equal(loaded.X, streamed.X) and loaded.obs.equals(streamed.obs)
    if features is None:
        assert np.array_equal(loaded.X, ad.read_h5ad(path).X.toarray())
    backed = ad.read_h5ad(path, backed="r")
    if features != "X_cells":
        with pytest.raises(InputError, match="only a whole backed AnnData"):
            cells_from_anndata(backed[:10], config)


def test_features_from_a_layer_or_a_log_normalised_matrix(tmp_path, cellbench5_path):
    """scanpy's usual file (log-normalised X, counts in a layer): ``pca:<k>`` of ``layer="counts"`` and of the log-normalised
    ``.X`` (``input="auto"`` decides, a line says which) equal the PCA of counts in ``.X``, loaded and streamed; options
    that would not be read are refused in one line."""
    import anndata as ad

    from scatlas.data import normalize_log1p
    from scatlas.tl._aggregation import cells_from_anndata, read_cells

    counts = ad.read_h5ad(cellbench5_path)
    settings = {"sample_key": "batch", "label_key": "cell_line", "features": "pca:20"}
    expected = cells_from_anndata(counts, load_aggregate_config(settings), log=lambda _: None).X
    scanpy_file = counts.copy()
    scanpy_file.layers["counts"] = counts.X.copy()
    scanpy_file.X = normalize_log1p(counts.X)
    scanpy_file.write_h5ad(path := tmp_path / "lognorm_x.h5ad")
    lines: list[str] = []
    for layer, said in ((None, ".X holds non-integer values: treated as log-normalised for pca:20"),
                        ("counts", "layer 'counts' holds whole numbers: treated as raw counts (normalised + log1p) for pca:20")):
        config = load_aggregate_config({**settings, "layer": layer})
        for stream in (False, True):
            assert np.array_equal(read_cells(path, config, stream=stream, log=lines.append).X, expected)
            assert lines.pop() == f"{path}: {said}"
    with pytest.raises(InputError, match="non-integer values"):
        read_cells(path, load_aggregate_config({**settings, "input": "counts"}))
    with pytest.raises(InputError, match=r"layer 'counts' is not read: the features are \.obsm\['X_pca'\]"):
        read_cells(path, load_aggregate_config({**settings, "features": "X_pca", "layer": "counts"}))
    with pytest.raises(InputError, match="input 'lognorm' applies to pca:<k> features"):
        read_cells(path, load_aggregate_config({**settings, "features": None, "input": "lognorm"}))


def test_genes_as_features_are_refused_when_they_would_not_fit_in_memory():
    from scatlas.tl._aggregation import check_dense_fits

    check_dense_fits((7_811, 1_000), "onek1k.h5ad", memory=24 * 10**9)  # 31 MB
    with pytest.raises(InputError, match=r"^atlas.h5ad: its 1,000,000 cells x 20,000 genes as dense features take 80.0 GB, over half of this machine's 24 GB; "
                                         r"aggregate fewer features, e.g. features 'pca:50'"):
        check_dense_fits((1_000_000, 20_000), "atlas.h5ad", memory=24 * 10**9)


def test_make_samples_groups():
    obs = pd.DataFrame({"label": ["a"] * 25 + ["b"] * 9, "batch": ["p1"] * 34})
    said: list[str] = []
    ids = make_samples(obs, ["label", "batch"], 10, said.append)
    sizes = pd.Series(ids).value_counts()
    assert sizes.sum() == 34 and sizes.min() >= 9 and all(i.startswith(("a|p1", "b|p1")) for i in sizes.index)
    assert said == ["1 of 2 label × batch groups hold fewer than 10 cells (smallest 9): each is one sample"]



@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_profiles_of_large_samples_are_pooled_in_chunks(pooling):
    """`SetAggregator.profile` encodes a large sample's cells a chunk at a time: the profile of all of them at once, to float rounding."""
    import torch

    from scatlas.models.aggregation import SetAggregator

    torch.manual_seed(0)
    model = SetAggregator(20, 64, 16, 32, pooling).eval()
    cells = torch.randn(10_000, 20)
    with torch.no_grad():
        whole = model(cells[None])[0]
    assert torch.equal(model.profile(cells[:1000], chunk_size=1000), model(cells[None, :1000])[0])  # one chunk: forward itself
    torch.testing.assert_close(model.profile(cells, chunk_size=999), whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))


def test_baseline_profiles_equal_pandas_groupby_without_copying_the_cells():
    from scatlas.tl._aggregation import baseline_profiles

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(5000, 6)) * 3 + 1).astype(np.float32)
    ids = rng.choice(["d1|B", "d1|T", "d2|B", "d2|T", "d3|NK"], len(X))
    samples = np.array(["d3|NK", "d1|B", "d2|T"])
    groups = pd.DataFrame(X).groupby(ids)
    median = baseline_profiles(X, ids, samples, "median")
    assert median.dtype == np.float32 and np.array_equal(median, groups.median().loc[samples].to_numpy())
    np.testing.assert_allclose(baseline_profiles(X, ids, samples, "mean"), groups.mean().loc[samples].to_numpy(), rtol=1e-6)


def test_batch_scaling_equals_scikit_learn_per_batch_and_is_computed_on_demand():
    """`scale_per_batch` gives each batch's StandardScaler (or median / MAD) values for any rows asked for, holding no scaled copy;
    a feature constant within a batch is only centred; `zca_matrix` streams numpy.cov's covariance."""
    from scipy.stats import median_abs_deviation
    from sklearn.preprocessing import StandardScaler

    from scatlas.tl._aggregation import scale_per_batch, zca_matrix

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(3000, 5)) * [1, 2, 3, 4, 5] + 7).astype(np.float32)
    batch = rng.choice(["p1", "p2", "p3"], len(X))
    X[batch == "p2", 4] = 1.5
    scaled = scale_per_batch(X, batch, "standard")
    assert scaled.X is X and scaled.dtype == np.float32 and scaled.shape == X.shape
    for b in ("p1", "p2", "p3"):
        rows = np.flatnonzero(batch == b)
        np.testing.assert_allclose(scaled[rows], StandardScaler().fit_transform(X[rows]), atol=1e-5)
        robust = (X[rows] - np.median(X[rows], axis=0)) / median_abs_deviation(X[rows], axis=0, scale="normal")
        np.testing.assert_allclose(scale_per_batch(X, batch, "mad")[rows][:, :4], robust[:, :4], rtol=1e-4, atol=1e-4)
    assert np.all(scaled[np.flatnonzero(batch == "p2")][:, 4] == 0)
    views = rng.integers(0, len(X), (3, 40))
    assert np.array_equal(scaled[views], np.stack([scaled[v] for v in views]))
    assert np.array_equal(scale_per_batch(X, batch, "none")[views], X[views])
    train = np.flatnonzero(batch != "p3")
    mean, W = zca_matrix(scaled, train, 1e-2, chunk_size=700)
    dense = scaled[train].astype(np.float64)
    np.testing.assert_allclose(mean, dense.mean(0), atol=1e-6)
    vals, vecs = np.linalg.eigh(np.cov(dense - mean, rowvar=False))
    np.testing.assert_allclose(W, (vecs / np.sqrt(vals + 1e-2)) @ vecs.T, rtol=1e-6, atol=1e-9)


def test_cli_aggregate_stream_keeps_host_memory_flat(tmp_path):
    """`scatlas aggregate --stream` (pca:50): from 100k to 400k cells peak memory grows by well under the matrix it never loads.

    What grows is the cells' 50 features, obs and per-cell codes (measured 0.28× the matrix; the
    bound is 0.5×, as for `nmf` and `embed`). Before the features were scaled on demand and each
    sample's profile written into one array as it came, the growth was 1.6× the matrix.
    """
    import anndata as ad
    from conftest import data_path, streamed_peak

    args = ["aggregate", "{data}", "--out", "{out}", "--stream", "--chunk-size", "20000", "--sample-key", "donor_id,cell_type", "--label-key", "cell_type",
            "--batch-key", "donor_id", "--features", "pca:50", "--seeds", "1", "--max-epochs", "1", "--cells-per-view", "200"]
    src = ad.read_h5ad(data_path("onek1k_4types_40donors.h5ad"))
    small_growth, small_gb, _ = streamed_peak(tmp_path, src, 100_000, args)
    large_growth, large_gb, out = streamed_peak(tmp_path, src, 400_000, args)
    assert large_growth - small_growth < 0.5 * (large_gb - small_gb), (small_growth, large_growth, small_gb, large_gb)
    profiles = pd.read_parquet(out / "profiles_learned.parquet")
    assert len(profiles) == src.obs.groupby(["donor_id", "cell_type"], observed=True).ngroups and np.isfinite(profiles.filter(regex=r"^f\d+$").to_numpy()).all()


def test_seeds_are_a_list_or_their_number():
    """`seeds=3` means seeds 0, 1, 2, as the command's `--seeds 3` (it was refused as not a list); none, or one twice, is refused."""
    settings = {"sample_key": "sample", "label_key": "label"}
    assert load_aggregate_config({**settings, "seeds": 3}).seeds == [0, 1, 2]
    assert load_aggregate_config({**settings, "seeds": [4, 7]}).seeds == [4, 7]
    with pytest.raises(ConfigError, match=r"seeds: 0: train at least one seed"):
        load_aggregate_config({**settings, "seeds": 0})
    with pytest.raises(ConfigError, match=r"seeds: \[1, 1\]: each seed once"):
        load_aggregate_config({**settings, "seeds": [1, 1]})
    for name in ("seed", "random_state"):  # scikit-learn's name leads to ours
        with pytest.raises(ConfigError, match=f"^{name}: unknown setting; did you mean 'seeds'\\?$"):
            load_aggregate_config({**settings, name: 1})
