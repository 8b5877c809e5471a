"""Label transfer on real PBMCs: held-out chemistries, query-independent reference, calibration, unknowns."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import confusion_matrix
from torchmetrics.functional.classification import multiclass_calibration_error
from typer.testing import CliRunner

from scatlas.cli import app
from scatlas.metrics import expected_calibration_error, fit_temperature
from scatlas.metrics.calibration import softmax
from scatlas.tl._annotation import METHODS, Annotator, unknown_reasons, unknown_said
from scatlas.tl._transfer import load_transfer_config, run_transfer

runner = CliRunner()


@pytest.fixture(scope="module")
def chemistries(symphony_path, tmp_path_factory):
    """Symphony PBMCs split by chemistry: reference without b, query = b."""
    tmp = tmp_path_factory.mktemp("sym")
    adata = ad.read_h5ad(symphony_path)
    files = {}
    for b in ("3pv1", "3pv2", "5p"):
        adata[adata.obs["batch"] != b].copy().write_h5ad(tmp / f"ref_no_{b}.h5ad")
        adata[adata.obs["batch"] == b].copy().write_h5ad(tmp / f"query_{b}.h5ad")
        files[b] = (tmp / f"ref_no_{b}.h5ad", tmp / f"query_{b}.h5ad")
    return files


def _config(reference: Path, queries: list[Path], **extra):
    values = {"reference": {"name": "r", "path": reference, "label_key": "author_cell_type"}, "queries": queries, "query_label_key": "author_cell_type"}
    values.update(extra)
    return load_transfer_config(values)


def test_centroids_and_distances_embed_bounded_blocks(monkeypatch):
    """A linear model's latent is its genes: centroids and distances embed a few thousand cells at a time, not a
    100,000-cell chunk (8 GB for 20,000 genes), with the results of one pass over all cells."""
    from types import SimpleNamespace

    from scatlas.tl import _transfer
    from scatlas.tl._transfer import centroid_distances, class_centroids, nearest_centroid_distance

    monkeypatch.setattr(_transfer, "LATENT_VALUES", 2**22)  # 1,024 cells of 4,000 genes at a time
    rng = np.random.default_rng(0)
    X = sp.random(5000, 4000, density=0.05, random_state=0, format="csr", dtype=np.float32)
    calls: list[int] = []

    def embed(_: object, rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return X[rows].toarray()

    model, sdata = SimpleNamespace(embed=embed), SimpleNamespace(X=X)
    rows, codes = np.arange(1, 5000, 2), rng.integers(0, 3, 2500)
    centroids = class_centroids(model, sdata, rows, codes)
    dense = X[rows].toarray().astype(np.float64)
    np.testing.assert_allclose(centroids, np.stack([dense[codes == k].mean(0) for k in range(3)]), rtol=1e-5)
    np.testing.assert_allclose(centroid_distances(model, sdata, rows, centroids), nearest_centroid_distance(dense, centroids), rtol=1e-6)
    assert calls == [1024, 1024, 452] * 2


def test_nearest_centroid_distance_steps_keep_the_bits_of_one_pass(monkeypatch):
    """The distances go a thousand cells at a time (fast: the float64 temporaries stay in cache), each cell's as in one
    pass over all cells (to BLAS's last bits, which may depend on a step's size), and equal SciPy's Euclidean distances."""
    from scipy.spatial.distance import cdist

    from scatlas.tl import _transfer

    rng = np.random.default_rng(0)
    embedding = sp.random(2500, 1000, density=0.3, random_state=0, format="csr", dtype=np.float32).toarray()
    centroids = rng.random((7, 1000)).astype(np.float32)
    stepped = _transfer.nearest_centroid_distance(embedding, centroids)
    monkeypatch.setattr(_transfer, "DISTANCE_ROWS", 10**6)
    np.testing.assert_allclose(stepped, _transfer.nearest_centroid_distance(embedding, centroids), rtol=1e-12)
    np.testing.assert_allclose(stepped, cdist(embedding.astype(np.float64), centroids.astype(np.float64)).min(1), rtol=1e-6)
    assert _transfer.nearest_centroid_distance(embedding[:0], centroids).shape == (0,)


def test_left_out_distances_equal_centroids_recomputed_without_each_cell():
    """Each cell's distance to the class centroids of the other cells (the linear model's unknown cut-off): its own
    class's centroid taken without it by the exact factor n / (n - 1) equals recomputing that centroid, and a class of
    one cell leaves no centroid of its own."""
    from types import SimpleNamespace

    from scipy.spatial.distance import cdist

    from scatlas.tl._transfer import left_out_distances

    X = np.random.default_rng(1).normal(size=(60, 5))
    codes, rows = np.r_[np.zeros(30, int), np.full(29, 4), [2]], np.arange(60)  # class 2: one cell
    centroids, distances = left_out_distances(SimpleNamespace(embed=lambda _, r: X[r]), SimpleNamespace(X=X), rows, codes)
    np.testing.assert_allclose(centroids, np.stack([X[codes == k].mean(0) for k in (0, 2, 4)]), rtol=1e-6)
    others = [rows != i for i in rows]
    expected = [cdist(X[i:i + 1], np.stack([X[o & (codes == k)].mean(0) for k in np.unique(codes[o])])).min() for i, o in zip(rows, others)]
    np.testing.assert_allclose(distances, expected, rtol=1e-6)


def test_linear_distance_cut_off_uses_every_reference_cell_and_no_seed():
    """The linear model's latent is the log-normalised genes, fitted to no cell, so the unknown distance cut-off is the
    conformal 0.99 cut-off over every reference cell, each left out of its class's centroid, and the same for any seed. It was the
    quantile of the ~150 seeded calibration cells: over 10 seeds on kang stim → ctrl it flagged 0.9% to 33% of the
    query as far from the reference (`benchmarks/RESULTS.md`)."""
    import scanpy as sc

    import scatlas as sa
    from conftest import data_path

    kang = ad.read_h5ad(data_path("kang18_muscat_4samples.h5ad"))
    reference = kang[kang.obs["group_id"] == "stim"].copy()
    models = [sa.tl.transfer(reference.copy(), kang[kang.obs["group_id"] == "ctrl"].copy(), label_key="author_cell_type", seed=seed,
                             log=lambda _: None) for seed in (0, 1)]
    assert models[0].temperature != models[1].temperature  # the seeds drew other calibration cells
    assert models[0].distance_threshold == models[1].distance_threshold
    lognorm = reference.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    X = lognorm[:, models[0].annotator.genes].X.toarray().astype(np.float64)
    labels = reference.obs["author_cell_type"].astype(str).to_numpy()
    sums = {k: X[labels == k].sum(0) for k in np.unique(labels)}
    sizes = {k: (labels == k).sum() for k in sums}
    left_out = [min(np.linalg.norm(x - (sums[k] - x * (k == own)) / (sizes[k] - (k == own))) for k in sums) for x, own in zip(X, labels)]
    k = int(np.ceil((len(left_out) + 1) * 0.99))  # the split-conformal cut-off: the k-th smallest
    assert models[0].distance_threshold == pytest.approx(np.sort(left_out)[k - 1], rel=1e-5)


def test_reference_held_out_row_is_scored_by_a_fit_that_never_saw_those_cells(chemistries):
    """The default linear model is refitted on every reference cell, the held-out ones too; the summary's "reference
    (held-out cells)" row must come from the first fit, on the training and validation cells alone (before, it
    scored the final model on cells it had trained on: accuracy 1.000 where held-out cells give 0.914 on zheng17)."""
    from scatlas.data.dataset import load_dataset
    from scatlas.data.io import string_values
    from scatlas.tl._annotation import fit_classifier
    from scatlas.tl._transfer import fit_reference

    reference, query = chemistries["3pv2"]
    config = _config(reference, [query])
    data = load_dataset(config.reference, log=lambda _: None)
    model, everyone, held_out, truth, _ = fit_reference(config, data, log=lambda _: None)
    role = everyone["reference_split"].to_numpy()
    train, val, calib = (np.flatnonzero(role == r) for r in ("train", "val", "calibration"))
    labels = model.annotator.labels
    assert model.annotator.model.full_batch and len(held_out) == len(calib) == len(truth)
    first, sdata, _ = fit_classifier(config.model, config.training, config.seed, None, data, labels,
                                     labels.codes(string_values(data.obs["author_cell_type"])), train, val)
    unseen = np.asarray(labels.names)[labels.finest(first.predict_logits(sdata, calib))]
    assert np.array_equal(held_out["predicted"].to_numpy().astype(str), unseen)
    seen = everyone["predicted"].to_numpy().astype(str)[calib]  # the final model's calls on cells it trained on
    assert (seen == truth).mean() > (unseen == truth).mean()


def test_ece_matches_torchmetrics_and_temperature_helps():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, 4)) * 4
    true_p = softmax(logits, 3.0)  # labels drawn at temperature 3: the raw scores are over-confident
    y = np.array([rng.choice(4, p=p) for p in true_p])
    proba = softmax(logits)
    ref = multiclass_calibration_error(torch.tensor(proba), torch.tensor(y), num_classes=4, n_bins=15, norm="l1")
    assert expected_calibration_error(proba, y) == pytest.approx(float(ref), abs=1e-6)
    t = fit_temperature(logits, y)
    assert 2.5 < t < 3.5
    nll = lambda T: -np.log(softmax(logits, T)[np.arange(len(y)), y]).mean()  # noqa: E731
    assert nll(t) <= min(nll(t * 0.999), nll(t * 1.001))  # the minimum, to a thousandth of T
    assert expected_calibration_error(softmax(logits, t), y) < expected_calibration_error(proba, y)


@pytest.mark.parametrize(("held_out", "scanvi"), [("3pv1", (0.914, 0.723)), ("5p", (0.956, 0.813))])
def test_held_out_chemistry_at_least_scanvi(chemistries, tmp_path, held_out, scanvi):
    reference, query = chemistries[held_out]
    figures = held_out == "5p"  # the PNGs only on request; the confusion tables always
    summary = run_transfer(_config(reference, [query]), tmp_path / "out", log=lambda _: None, figures=figures).set_index("dataset")
    row = summary.loc[f"query_{held_out}"]
    assert row["accuracy"] >= scanvi[0] and row["macro_f1"] >= scanvi[1]
    assert (tmp_path / "out" / "report.html").read_text().count("<table class='heatmap'>") == 2  # reference and query
    calibration = pd.read_csv(tmp_path / "out" / "calibration.csv").iloc[0]
    assert calibration["ece_after"] <= calibration["ece_before"]
    assert calibration["distance_cells"] > calibration["cells"] and np.isfinite(calibration["distance_threshold"])  # every cell, for the linear model
    qdir = tmp_path / "out" / f"query_{held_out}"
    for name in ("predictions.csv", "probabilities.parquet", "metrics.csv", "per_class_metrics.csv", "confusion_matrix.csv", "gene_overlap.csv"):
        assert (qdir / name).exists()
    assert (qdir / "confusion_matrix.png").exists() == figures and (tmp_path / "out" / "reference" / "confusion_matrix.png").exists() == figures
    pred = pd.read_csv(qdir / "predictions.csv")
    truth = ad.read_h5ad(query).obs["author_cell_type"].astype(str).to_numpy()
    confusion = pd.read_csv(qdir / "confusion_matrix.csv", index_col="true")
    labels = sorted(set(truth) | set(pred["predicted"]))
    expected = confusion_matrix(truth, pred["predicted"].astype(str), labels=labels)
    np.testing.assert_array_equal(confusion.to_numpy(), expected[[labels.index(t) for t in sorted(set(truth))]])
    assert list(confusion.columns) == labels
    assert list(pred.columns[:4]) == ["cell_id", "predicted", "confidence", "unknown"]
    proba = pd.read_parquet(qdir / "probabilities.parquet").drop(columns="cell_id")
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(proba.max(1), pred["confidence"], atol=1e-6)


def test_reference_predictions_do_not_depend_on_queries(chemistries, tmp_path):
    reference, query_a = chemistries["3pv1"]
    _, query_b = chemistries["5p"]
    fast = {"training": {"max_epochs": 5, "batch_size": 64, "patience": 0}}
    run_transfer(_config(reference, [query_a], **fast), tmp_path / "a", log=lambda _: None)
    run_transfer(_config(reference, [query_b], **fast), tmp_path / "b", log=lambda _: None)
    run_transfer(_config(reference, [query_b, query_a], **fast), tmp_path / "ab", log=lambda _: None)
    ref = [(tmp_path / d / "reference" / "predictions.csv").read_bytes() for d in ("a", "b", "ab")]
    assert ref[0] == ref[1] == ref[2]
    weights = [(tmp_path / d / "reference" / "model" / "model.pt").read_bytes() for d in ("a", "b", "ab")]
    assert weights[0] == weights[1] == weights[2]  # the saved model too, byte for byte
    # same seed, same query predictions
    assert (tmp_path / "a" / "query_3pv1" / "predictions.csv").read_bytes() == (tmp_path / "ab" / "query_3pv1" / "predictions.csv").read_bytes()


def test_query_mapped_in_chunks_from_disk_equals_one_piece(chemistries, tmp_path):
    """A query read and mapped 37 cells at a time gives the same files as one piece (outputs are appended chunk by chunk)."""
    reference, query = chemistries["3pv1"]
    fast = {"training": {"max_epochs": 3, "batch_size": 64, "patience": 0}}
    one = run_transfer(_config(reference, [query], **fast), tmp_path / "one", log=lambda _: None)
    chunked = run_transfer(_config(reference, [query], query_chunk_size=37, **fast), tmp_path / "chunks", log=lambda _: None)
    pd.testing.assert_frame_equal(one, chunked)
    a, b = (pd.read_csv(tmp_path / d / "query_3pv1" / "predictions.csv") for d in ("one", "chunks"))
    assert len(a) == ad.read_h5ad(query).n_obs
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(*(pd.read_parquet(tmp_path / d / "query_3pv1" / "probabilities.parquet") for d in ("one", "chunks")))


def test_streamed_reference_gives_the_loaded_results(chemistries, tmp_path):
    """`stream: true` on the reference: it trains from its file (never loaded) and every output equals the loaded run's."""
    reference, query = chemistries["5p"]
    fast = {"training": {"max_epochs": 3, "batch_size": 64, "patience": 0}, "n_top_genes": 800, "query_chunk_size": 250, "model": METHODS["mlp"]}
    loaded = run_transfer(_config(reference, [query], **fast), tmp_path / "loaded", log=lambda _: None)
    config = _config(reference, [query], **fast)
    streamed = run_transfer(config.model_copy(update={"reference": config.reference.model_copy(update={"stream": True})}), tmp_path / "streamed", log=lambda _: None)
    pd.testing.assert_frame_equal(loaded, streamed)
    for d in ("reference", "query_5p"):
        pd.testing.assert_frame_equal(*(pd.read_csv(tmp_path / run / d / "predictions.csv") for run in ("loaded", "streamed")))
        pd.testing.assert_frame_equal(*(pd.read_parquet(tmp_path / run / d / "probabilities.parquet") for run in ("loaded", "streamed")))


def test_cli_zarr_stores_stream_like_h5ad_files(chemistries, tmp_path):
    """`.zarr` stores as reference and query are read in chunks as `.h5ad` files are: the same predictions, byte for byte."""
    files = {"h5ad": chemistries["5p"], "zarr": []}
    for path in files["h5ad"]:
        ad.read_h5ad(path).write_zarr(tmp_path / f"{path.stem}.zarr")
        files["zarr"].append(tmp_path / f"{path.stem}.zarr")
    for kind, (reference, query) in files.items():
        result = runner.invoke(app, ["transfer", "--reference", str(reference), "--query", str(query), "--label-key", "author_cell_type",
                                     "--out", str(tmp_path / kind), "--stream", "--max-epochs", "3", "--query-chunk-size", "250", "--figures"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / kind / "reference" / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
    for d in ("reference", "query_5p"):
        assert (tmp_path / "h5ad" / d / "predictions.csv").read_bytes() == (tmp_path / "zarr" / d / "predictions.csv").read_bytes()


def test_cli_transfer_stream_keeps_host_memory_flat_in_the_reference_size(tmp_path):
    """`scatlas transfer --stream`: from a 100k- to a 400k-cell reference, peak memory grows by less than the reference matrix.

    OneK1K has 114 non-zeros per cell (0.9 KB as CSR), so what the reference must hold per cell
    (obs, labels, splits, compact predictions: measured ~0.5 KB) is not small beside it here, and
    the bound is 0.8× the matrix (0.62× measured; loading it would cost more than 1×); on atlases
    with thousands of non-zeros per cell that share vanishes.
    """
    from conftest import data_path, streamed_peak

    name = "onek1k_4types_40donors.h5ad"
    args = ["transfer", "--reference", "{data}", "--label-key", "cell_type", "--query", str(data_path(name)), "--out", "{out}", "--stream",
            "--chunk-size", "20000", "--max-epochs", "1", "--query-chunk-size", "20000"]
    src = ad.read_h5ad(data_path(name))
    small_growth, small_gb, _ = streamed_peak(tmp_path, src, 100_000, args)
    large_growth, large_gb, out = streamed_peak(tmp_path, src, 400_000, args)
    assert large_growth - small_growth < 0.8 * (large_gb - small_gb), (small_growth, large_growth, small_gb, large_gb)
    pred = pd.read_csv(out / "reference" / "predictions.csv")
    assert len(pred) == 400_000 and set(pred["reference_split"]) == {"train", "val", "calibration"}
    summary = pd.read_csv(out / "summary.csv").set_index("dataset")
    assert summary.loc["onek1k_4types_40donors", "n_cells"] == src.n_obs


def test_cli_transfer_keeps_host_memory_flat_in_the_query_size(tmp_path):
    """`scatlas transfer`: from a 100k- to a 400k-cell query, peak memory grows by well under the query matrix it never loads."""
    from conftest import data_path, streamed_peak

    name = "onek1k_4types_40donors.h5ad"
    args = ["transfer", "--reference", str(data_path(name)), "--label-key", "cell_type", "--query", "{data}", "--out", "{out}",
            "--max-epochs", "2", "--query-chunk-size", "20000"]
    src = ad.read_h5ad(data_path(name))
    small_growth, small_gb, _ = streamed_peak(tmp_path, src, 100_000, args)
    large_growth, large_gb, out = streamed_peak(tmp_path, src, 400_000, args)
    assert large_growth - small_growth < 0.5 * (large_gb - small_gb), (small_growth, large_growth, small_gb, large_gb)
    pred = pd.read_csv(out / "cells_400000" / "predictions.csv")
    assert len(pred) == 400_000 and (pred["cell_id"].to_numpy() == np.arange(400_000)).all()
    assert len(pd.read_parquet(out / "cells_400000" / "probabilities.parquet")) == 400_000


def test_unseen_labels_reported_and_unknowns(chemistries, tmp_path):
    reference, query = chemistries["5p"]
    adata = ad.read_h5ad(query)
    adata.obs["author_cell_type"] = adata.obs["author_cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[:7], "author_cell_type"] = "Platelet"
    X = adata.X.tolil()
    X[[10, 11], :] = 0  # no counts at all: nothing to call them by (they used to get a confident call from the intercepts)
    adata.X = X.tocsr()
    adata.obs.loc[adata.obs_names[20:23], "author_cell_type"] = np.nan  # unlabelled query cells: mapped, left out of the scores
    adata.write_h5ad(tmp_path / "q.h5ad")
    lines: list[str] = []
    summary = run_transfer(_config(reference, [tmp_path / "q.h5ad"], training={"max_epochs": 5, "batch_size": 64, "patience": 0}), tmp_path / "out", log=lines.append)
    said = next(line for line in lines if line.startswith("q: ") and "cells unknown" in line)  # no counts: one reason among the others
    assert "2 no counts in the model's genes" in said and not any("have no counts" in line for line in lines)
    assert f"q: 3 of {adata.n_obs} cells have no true label in obs column 'author_cell_type': left out of the evaluation" in lines
    assert summary.set_index("dataset").loc["q", "n_cells_unlabelled"] == 3
    assert pd.read_csv(tmp_path / "out" / "q" / "metrics.csv")["n_cells"].item() == adata.n_obs - 3 - 7  # neither unlabelled nor unseen
    assert f"q: 7 of {adata.n_obs - 3} labelled cells have labels the reference lacks (e.g. 'Platelet'): not scored, listed in unseen_labels.csv" in lines
    unseen = pd.read_csv(tmp_path / "out" / "q" / "unseen_labels.csv")
    assert unseen.to_dict("records") == [{"label": "Platelet", "n_cells": 7}]
    assert summary.set_index("dataset").loc["q", "n_cells_unseen_label"] == 7
    pred = pd.read_csv(tmp_path / "out" / "q" / "predictions.csv")
    assert set(pred["predicted"]) <= set(ad.read_h5ad(reference).obs["author_cell_type"].astype(str))  # never a new label
    assert pred["unknown"].equals(pred["unknown_low_confidence"] | pred["unknown_far_from_reference"] | pred["unknown_no_counts"])
    assert list(np.flatnonzero(pred["unknown_no_counts"])) == [10, 11]
    assert summary.set_index("dataset").loc["q", "unknown_fraction"] == pytest.approx(pred["unknown"].mean())  # over every cell


def test_zheng17_reference_to_donor_query_cli(tmp_path):
    from conftest import data_path

    ref, query = data_path("zheng17_sorted_pbmc_reference.h5ad"), data_path("zheng17_frozen_pbmc_donorA_query.h5ad")
    result = runner.invoke(app, ["transfer", "--reference", str(ref), "--label-key", "cell_type", "--ontology-key", "cell_type_ontology_term_id",
                                 "--query", str(query), "--out", str(tmp_path / "out"), "--max-epochs", "8"])
    assert result.exit_code == 0, result.output
    # each log line stays one line (rich wrapped them at 80 columns when not on a terminal)
    assert ("zheng17_frozen_pbmc_donorA_query (2896 cells): 8845 of the model's 8863 genes found (99.8%, by var_names); "
            "missing ones set to their reference means") in result.output.splitlines()
    assert pd.read_csv(tmp_path / "out" / "summary.csv")["n_cells"].tolist() == [428, 2896]  # counts, not 428.0
    overlap = pd.read_csv(tmp_path / "out" / "zheng17_frozen_pbmc_donorA_query" / "gene_overlap.csv").iloc[0]
    assert overlap["model_genes"] == 8863 and overlap["shared_genes"] > 8800
    pred = pd.read_csv(tmp_path / "out" / "zheng17_frozen_pbmc_donorA_query" / "predictions.csv")
    assert len(pred) == 2896 and pred["predicted_id"].str.startswith("CL:").all()
    assert 0 < pred["unknown"].mean() < 0.6
    # nine flat labels: a cell between T-cell subsets is called by their common ancestor, a term no one labelled
    from scatlas.ontology import CellOntology

    ontology = CellOntology()
    labels = set(ad.read_h5ad(ref, backed="r").obs["cell_type_ontology_term_id"].astype(str))
    backed_off = pred[~pred["hierarchical_id"].isin(labels)]
    assert len(backed_off) and backed_off["hierarchical_id"].str.startswith("CL:").all()
    above = [call in ontology.ancestors(finest) for call, finest in zip(backed_off["hierarchical_id"], backed_off["predicted_id"], strict=True)]
    assert np.mean(above) > 0.9  # mostly an ancestor of the finest call (else the subsets' sum outweighs an unsure top class)


def test_gene_mismatch_refused(tmp_path):
    from conftest import data_path

    result = runner.invoke(app, ["transfer", "--reference", str(data_path("symphony_pbmc_3tech.h5ad")), "--label-key", "author_cell_type",
                                 "--query", str(data_path("onek1k_4types_40donors.h5ad")), "--out", str(tmp_path / "out"), "--max-epochs", "2"])
    assert result.exit_code == 2
    assert "symbols vs Ensembl" in result.output and "onek1k_4types_40donors.h5ad" in result.output
    assert not (tmp_path / "out").exists()


def test_query_lacking_the_chosen_genes_is_refused_before_the_reference_trains(chemistries, tmp_path):
    """With --n-top-genes the model keeps the reference's most variable genes: a query holding most of the reference's
    genes but few of those is refused before any fit (not after training, as a check against every gene would), naming
    the option, and nothing is written."""
    import scanpy as sc

    reference, query = chemistries["3pv1"]
    ref = ad.read_h5ad(reference)
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    variable = sc.pp.highly_variable_genes(ref, n_top_genes=200, inplace=False)["highly_variable"].to_numpy()
    q = ad.read_h5ad(query)
    q[:, ~variable].copy().write_h5ad(tmp_path / "no_variable_genes.h5ad")  # 89% of the reference's genes, none of its 200 HVGs
    args = ["transfer", "--reference", str(reference), "--label-key", "author_cell_type", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--query", str(tmp_path / "no_variable_genes.h5ad"), "--n-top-genes", "200"])
    assert result.exit_code == 2, result.output
    assert "no_variable_genes.h5ad: only" in result.output and "raise n_top_genes or leave it out" in result.output
    assert "calibration on" not in result.output and "refitted" not in result.output  # refused before anything was fitted
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_checkpoints").exists()
    assert runner.invoke(app, [*args, "--query", str(tmp_path / "no_variable_genes.h5ad")]).exit_code == 0  # every gene: it maps


def test_a_model_of_counts_reads_a_query_of_log_cp10k_as_it_is(tmp_path):
    """A CellTypist-style query (scanpy's normalize_total(target_sum=1e4) + log1p, no counts) through a reference of
    counts: read as it is, with a line, giving the calls of its counts (tl.transfer, the saved model through tl.annotate,
    the CLI); log1p of counts per million is refused by name."""
    import scanpy as sc

    import scatlas as sa
    from conftest import data_path
    from scatlas._errors import InputError

    kang = ad.read_h5ad(data_path("kang18_muscat_4samples.h5ad"))
    reference, counts = kang[kang.obs["group_id"] == "ctrl"].copy(), kang[kang.obs["group_id"] == "stim"].copy()
    lognorm, per_million = counts.copy(), counts.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.pp.normalize_total(per_million, target_sum=1e6)
    sc.pp.log1p(per_million)
    settings = {"label_key": "cell_type", "training": {"max_epochs": 5}}
    model = sa.tl.transfer(reference.copy(), counts, log=lambda _: None, **settings)
    lines: list[str] = []
    sa.tl.transfer(reference.copy(), lognorm, log=lines.append, **settings)
    assert "query: .X holds log1p of counts per 10,000, as the model normalises counts: read as it is" in lines
    assert (lognorm.obs["cell_type_pred"] == counts.obs["cell_type_pred"]).all()
    np.testing.assert_allclose(lognorm.obsm["cell_type_proba"], counts.obsm["cell_type_proba"], atol=1e-4)  # scanpy's float32 sums
    model.save(tmp_path / "model")
    again, start = lognorm.copy(), len(lines)
    sa.tl.annotate(again, tmp_path / "model", log=lines.append)
    assert lines[start].endswith("read as it is") and (again.obs["cell_type_pred"] == counts.obs["cell_type_pred"]).all()  # its first line
    for run, option in ((lambda: sa.tl.transfer(reference.copy(), per_million, log=pytest.fail, **settings), "`query_layer` / `--query-layer`"),
                        (lambda: sa.tl.annotate(per_million, tmp_path / "model", log=pytest.fail), "`layer` / `--layer`")):
        with pytest.raises(InputError, match="has non-integer values in 806 cells") as refused:  # the option that chooses the query's counts
            run()
        assert str(refused.value).endswith(f"(the model reads raw integer counts, or log1p of counts per 10,000 as it makes them: choose them with {option})")
    reference.write_h5ad(tmp_path / "reference.h5ad")
    lognorm.write_h5ad(tmp_path / "lognorm.h5ad")
    result = runner.invoke(app, ["transfer", "--reference", str(tmp_path / "reference.h5ad"), "--label-key", "cell_type", "--query",
                                 str(tmp_path / "lognorm.h5ad"), "--out", str(tmp_path / "tr")])
    assert result.exit_code == 0 and "lognorm.h5ad: .X holds log1p of counts per 10,000" in result.output, result.output


def test_query_gene_key_maps_ensembl_ids_to_the_same_bits(tmp_path):
    """A query keyed by Ensembl ids with symbols in a .var column (as CELLxGENE files) gets, through the gene column,
    the calls and probabilities its symbol-keyed twin gets; a column that is not there is refused by name."""
    import scatlas as sa
    from conftest import data_path
    from scatlas._errors import InputError

    kang = ad.read_h5ad(data_path("kang18_muscat_4samples.h5ad"))
    reference, query = kang[kang.obs["group_id"] == "ctrl"].copy(), kang[kang.obs["group_id"] == "stim"].copy()
    by_id = query.copy()
    by_id.var["feature_name"] = by_id.var_names.to_numpy()
    by_id.var_names = by_id.var["ENSEMBL"].astype(str).to_numpy()
    settings = {"label_key": "cell_type", "log": lambda _: None, "training": {"max_epochs": 5}}
    model = sa.tl.transfer(reference.copy(), query, **settings)
    sa.tl.transfer(reference.copy(), by_id, query_gene_key="feature_name", **settings)
    np.testing.assert_array_equal(by_id.obsm["cell_type_proba"], query.obsm["cell_type_proba"])
    pd.testing.assert_frame_equal(by_id.obs, query.obs)
    annotated = by_id.copy()
    lines: list[str] = []
    sa.tl.annotate(annotated, model.annotator, gene_key="feature_name", log=lines.append)
    assert (annotated.obs["cell_type_pred"] == query.obs["cell_type_pred"]).all()  # argmax ignores the temperature
    assert "by var['feature_name']" in lines[-1] and annotated.uns["scatlas_gene_overlap"]["missing_examples"] == ""
    with pytest.raises(InputError, match=r"no gene column 'symbol' in .var \(its columns: ENSEMBL, SYMBOL, feature_name\)"):
        sa.tl.annotate(by_id.copy(), model.annotator, gene_key="symbol", log=lambda _: None)
    from_raw = by_id.copy()
    from_raw.raw = from_raw  # the genes now read from .raw: messages name .raw.var, where the user must look
    with pytest.raises(InputError, match=r"no gene column 'symbol' in \.raw\.var \(its columns: ENSEMBL, SYMBOL, feature_name\)"):
        sa.tl.annotate(from_raw, model.annotator, layer="raw", gene_key="symbol", log=lambda _: None)
    del query.var["SYMBOL"]
    with pytest.raises(InputError, match="the var_names hold them: leave the gene column out"):
        sa.tl.annotate(query.copy(), model.annotator, gene_key="ENSEMBL", log=lambda _: None)  # the key given to the wrong file


def test_cli_onek1k_reference_keyed_by_ensembl_ids_maps_kang_by_its_ensembl_column(tmp_path):
    """Across studies: the onek1k reference's genes are Ensembl ids, kang's are symbols with the ids in .var['ENSEMBL']."""
    from conftest import data_path

    kang = data_path("kang18_muscat_4samples.h5ad")
    result = runner.invoke(app, ["transfer", "--reference", str(data_path("onek1k_4types_40donors.h5ad")), "--label-key", "cell_type",
                                 "--ontology-key", "cell_type_ontology_term_id", "--query", str(kang), "--query-gene-key", "ENSEMBL", "--min-overlap", "0.2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    overlap = pd.read_csv(tmp_path / "out" / "kang18_muscat_4samples" / "gene_overlap.csv").iloc[0]
    assert (overlap["model_genes"], overlap["shared_genes"], overlap["query_gene_names"]) == (1000, 262, "var['ENSEMBL']")
    pred = pd.read_csv(tmp_path / "out" / "kang18_muscat_4samples" / "predictions.csv")
    truth = ad.read_h5ad(kang, backed="r").obs["cell_type"].astype(str).to_numpy()
    called = pd.crosstab(truth, pred["predicted"].to_numpy(), normalize="index")
    assert called.loc["CD4-positive, alpha-beta T cell", "CD4-positive, alpha-beta T cell"] > 0.9
    # 74% of the model's genes are missing, set to their reference means (a linear model): 83% of CD16 monocytes are called
    # non-classical and 99% of B cells memory B cells (benchmarks/RESULTS.md, "The default classifier")
    assert called.loc["CD14-low, CD16-positive monocyte", "non-classical monocyte"] > 0.7
    assert called.loc["CD14-positive monocyte", "classical monocyte"] > 0.9 and called.loc["B cell", "memory B cell"] > 0.95
    assert "missing ones set to their reference means" in result.output
    # the transfer's saved reference model annotates the same query through `annotate predict --gene-key`: the transfer's
    # calls, calibrated confidences and unknown flags (the output folder is found from the transfer's folder)
    result = runner.invoke(app, ["annotate", "predict", str(tmp_path / "out"), str(kang), "--gene-key", "ENSEMBL",
                                 "--min-overlap", "0.2", "--out", str(tmp_path / "kang.h5ad")])
    assert result.exit_code == 0, result.output
    annotated = ad.read_h5ad(tmp_path / "kang.h5ad")
    np.testing.assert_array_equal(annotated.obs["cell_type_ontology_term_id_pred_label"].astype(str).to_numpy(), pred["predicted"].astype(str).to_numpy())
    np.testing.assert_allclose(annotated.obs["cell_type_ontology_term_id_pred_score"].to_numpy(), pred["confidence"].to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(annotated.obs["cell_type_ontology_term_id_unknown"].to_numpy(), pred["unknown"].to_numpy())
    np.testing.assert_allclose(annotated.obs["cell_type_ontology_term_id_latent_distance"].to_numpy(), pred["latent_distance"].to_numpy(), rtol=1e-6)
    far = annotated.obs["cell_type_ontology_term_id_unknown_reason"].astype(str).str.contains("far from reference").to_numpy()
    low = annotated.obs["cell_type_ontology_term_id_unknown_reason"].astype(str).str.contains("low confidence").to_numpy()
    np.testing.assert_array_equal(far, pred["unknown_far_from_reference"].to_numpy())
    np.testing.assert_array_equal(low, pred["unknown_low_confidence"].to_numpy())
    assert pred["unknown"].any() and not pred["unknown"].all()
    # the missing genes enter as an offset on each dense minibatch: the same as storing the means in the matrix, without its memory
    from scatlas.data.align import align_genes

    annotator = Annotator.load(tmp_path / "out" / "reference" / "model")
    query = ad.read_h5ad(kang)[:500]
    alignment = align_genes(query.var, annotator.genes, 0.2, "kang", "ENSEMBL")
    X = annotator.model_input(query, None, alignment)
    filled = X.toarray()
    filled[:, alignment.query_index < 0] = annotator.gene_means[alignment.query_index < 0]
    np.testing.assert_allclose(annotator.predict_proba(X, annotator.missing_offset(alignment)), annotator.predict_proba(sp.csr_matrix(filled)), atol=1e-6)


def test_ensemble_head_is_the_members_mean_probability():
    from scatlas.models.classifiers import Ensemble, MLPBackbone

    torch.manual_seed(0)
    members = [MLPBackbone(20, 5, [16, 8], 0.3).eval() for _ in range(3)]
    ensemble = Ensemble(members).eval()
    x = torch.randn(40, 20)
    h, _ = ensemble.encode(x)
    expected = torch.stack([torch.softmax(m.head(m.encode(x)[0]), dim=1) for m in members]).mean(0)
    torch.testing.assert_close(torch.softmax(ensemble.head(h), dim=1), expected, rtol=0, atol=1e-6)
    assert h.shape == (40, 24)


def test_ensemble_members_train_apart_and_predict_their_mean(chemistries, tmp_path):
    """`--ensemble 3`: member 0 is the single network of the same seed, to the bit; the others early-stop on their own
    held-out draws; the saved model predicts the members' mean probability, also after `annotate predict` reloads it."""


    reference, query = chemistries["5p"]
    fast = {"training": {"max_epochs": 4, "batch_size": 64, "patience": 0}}
    run_transfer(_config(reference, [query], model=METHODS["mlp"], **fast), tmp_path / "one", log=lambda _: None)
    summary = run_transfer(_config(reference, [query], model={**METHODS["mlp"], "ensemble": 3}, **fast),
                           tmp_path / "three", log=lambda _: None)
    assert summary.set_index("dataset").loc["query_5p", "accuracy"] > 0.9
    single = Annotator.load(tmp_path / "one" / "reference" / "model")
    ensemble = Annotator.load(tmp_path / "three" / "reference" / "model")
    assert ensemble.model.config.ensemble == 3
    members = ensemble.model.module.backbone.members
    for a, b in zip(single.model.module.backbone.state_dict().values(), members[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(members[0].head.weight, members[1].head.weight)
    X = sp.random(60, len(ensemble.genes), density=0.2, format="csr", dtype=np.float32, random_state=0)
    x = torch.as_tensor(X.toarray())
    with torch.no_grad():
        means = torch.stack([torch.softmax(m.eval().head(m.encode(x)[0]), dim=1) for m in members]).mean(0).numpy()
    np.testing.assert_allclose(ensemble.predict_proba(X), means, rtol=0, atol=1e-6)


def test_raw_selected_by_layer_raw_as_scanpy_keeps_it(tmp_path):
    """scanpy's bundled `pbmc68k_reduced` holds scaled values in X (refused, pointing at .raw) and log-normalised genes in
    .raw; `layer="raw"` trains and maps on .raw exactly as on an AnnData whose X is .raw, also when .var holds fewer genes
    than .raw, and the CLI streams .raw from the file (`--stream`) to the same predictions, byte for byte."""
    import scanpy as sc

    import scatlas as sa
    from scatlas._errors import InputError

    adata = sc.datasets.pbmc68k_reduced()[:, :300].copy()  # scanpy's usual state: .raw keeps all 765 genes, .var a subset
    reference, query = adata[: adata.n_obs // 2].copy(), adata[adata.n_obs // 2 :].copy()
    with pytest.raises(InputError, match=r"\.X has negative values .*scanpy keeps the log-normalised genes in \.raw: select it with layer 'raw'"):
        sa.tl.transfer(reference, query, label_key="bulk_labels", log=lambda _: None)
    model = sa.tl.transfer(reference, query, label_key="bulk_labels", layer="raw", query_layer="raw", seed=0, log=lambda _: None)
    assert len(model.annotator.genes) > 700  # .raw's genes (less any all-zero in the reference), not .var's 300
    plain = [ad.AnnData(a.raw.X.copy(), obs=a.obs.copy(), var=a.raw.var.copy()) for a in (reference, query)]
    sa.tl.transfer(plain[0], plain[1], label_key="bulk_labels", seed=0, log=lambda _: None)
    for raw, x in zip((reference, query), plain, strict=True):
        pd.testing.assert_frame_equal(raw.obs.filter(like="bulk_labels_"), x.obs.filter(like="bulk_labels_"))
    assert (query.obs["bulk_labels_pred"].astype(str) == query.obs["bulk_labels"].astype(str)).mean() > 0.75
    reference.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    for run in ("loaded", "streamed"):
        args = ["transfer", "--reference", str(tmp_path / "ref.h5ad"), "--query", str(tmp_path / "query.h5ad"), "--label-key", "bulk_labels",
                "--layer", "raw", "--query-layer", "raw", "--method", "mlp", "--max-epochs", "3", "--out", str(tmp_path / run)]
        result = runner.invoke(app, [*args, *(["--stream"] if run == "streamed" else [])])
        assert result.exit_code == 0, result.output
        assert "ref.h5ad: .raw holds non-integer values: treated as log-normalised" in result.output  # --input auto, as the API's
    for d in ("reference", "query"):
        assert (tmp_path / "loaded" / d / "predictions.csv").read_bytes() == (tmp_path / "streamed" / d / "predictions.csv").read_bytes()


def test_default_transfer_imports_no_torch_optimiser():
    """The default (full-batch linear) transfer and its calibration run without torch.optim, whose first step imports torch._dynamo (~1.4 s);
    minibatch settings given to it are named as not applying."""
    import subprocess
    import sys

    from conftest import data_path

    code = ("import sys, anndata as ad, scatlas as sa; k = ad.read_h5ad(sys.argv[1]); ref = k[k.obs['group_id'] == 'ctrl'].copy(); "
            "sa.tl.transfer(ref, k[k.obs['group_id'] != 'ctrl'].copy(), label_key='author_cell_type', training={'max_epochs': 3}); "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'")
    done = subprocess.run([sys.executable, "-c", code, str(data_path("kang18_muscat_4samples.h5ad"))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fitted full-batch to convergence: max_epochs does not apply" in done.stdout


def test_unknown_line_counts_each_reason_and_says_overlap_only_when_there_is_one():
    flags = pd.DataFrame({"unknown_low_confidence": [True, False, False, True], "unknown_far_from_reference": [False, True, False, False],
                          "unknown_no_counts": [False, False, False, False]})
    flags["unknown"] = flags.any(axis=1)
    assert unknown_said("q", flags) == "q: 3 of 4 cells unknown (2 low confidence, 1 far from reference)"
    flags.loc[0, ["unknown_far_from_reference", "unknown_no_counts"]] = True
    assert unknown_said("q", flags) == ("q: 3 of 4 cells unknown (2 low confidence, 2 far from reference, 1 no counts in the model's genes; "
                                        "a cell may have several reasons)")
    assert list(unknown_reasons(flags)) == ["low confidence & far from reference & no counts", "far from reference", None, "low confidence"]
    assert unknown_said("q", flags.iloc[[2]]) == "q: 0 of 1 cells unknown"


def test_tl_transfer_leaves_all_zero_and_unlabelled_reference_cells_without_a_call():
    """The fit leaves an all-zero reference cell out (with a notice); writing the reference's calls used to fail on the
    length (749 calls for 750 cells). That cell gets no call and counts as unknown; every other cell gets one. Cells
    without a label (refused before) are left out of training too, and called when the reference is also a query."""
    import scatlas as sa
    from conftest import data_path

    kang = ad.read_h5ad(data_path("kang18_muscat_4samples.h5ad"))
    reference, query = kang[kang.obs["group_id"] == "ctrl"].copy(), kang[kang.obs["group_id"] == "stim"].copy()
    X = reference.X.tolil()
    X[3, :] = 0
    reference.X = X.tocsr()
    unlabelled = reference.copy()
    unlabelled.obs["author_cell_type"] = unlabelled.obs["author_cell_type"].astype(object)
    unlabelled.obs.iloc[[7, 8], unlabelled.obs.columns.get_loc("author_cell_type")] = np.nan
    lines: list[str] = []
    model = sa.tl.transfer(reference, query, label_key="author_cell_type", log=lines.append)
    assert any("all-zero" in line for line in lines)
    obs, empty = reference.obs, reference.obs_names[3]
    assert pd.isna(obs.loc[empty, "author_cell_type_pred"]) and np.isnan(obs.loc[empty, "author_cell_type_pred_score"])
    assert obs.loc[empty, "author_cell_type_unknown"] and pd.isna(obs.loc[empty, "author_cell_type_reference_split"])
    assert obs.loc[empty, "author_cell_type_unknown_reason"] == "no call" and np.isnan(obs.loc[empty, "author_cell_type_latent_distance"])
    assert np.isnan(reference.obsm["author_cell_type_proba"][3]).all()
    others = obs.drop(index=empty)
    assert others["author_cell_type_pred"].notna().all() and others["author_cell_type_reference_split"].notna().all()
    assert (others["author_cell_type_pred"] == others["author_cell_type"]).mean() > 0.9
    lines.clear()
    sa.tl.annotate(reference, model, log=lines.append)  # the all-zero cell as a query: flagged unknown, said once
    assert reference.obs["author_cell_type_unknown"].iloc[3] and "1 no counts in the model's genes" in lines[-1]
    assert reference.obs["author_cell_type_unknown_reason"].iloc[3] == "no counts"
    sa.tl.annotate(reference, model.annotator, log=lines.append)  # without the reference model: no flags, but said
    assert lines[-1].endswith("their calls rest on the model's intercepts alone (a transfer's reference model flags them unknown)")
    lines.clear()
    sa.tl.transfer(unlabelled, query.copy(), label_key="author_cell_type", log=lines.append)
    assert "2 of 750 cells have no label in obs column 'author_cell_type': left out of training (map them as a query to call them)" in lines[1]
    assert lines[0] == "reference: .X holds whole numbers: treated as raw counts (normalised + log1p)"  # how the reference was read comes first
    assert unlabelled.obs["author_cell_type_pred"].isna().sum() == 3 and unlabelled.obs["author_cell_type_reference_split"].isna().sum() == 3
    sa.tl.transfer(unlabelled, [query.copy(), unlabelled], label_key="author_cell_type", log=lambda _: None)  # the reference as a query too
    assert unlabelled.obs["author_cell_type_pred"].iloc[[7, 8]].notna().all()
