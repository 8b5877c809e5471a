"""The AnnData-level layer (scatlas.tl / scatlas.pl / model objects) on real cells, and the CLI over it."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
import scanpy as sc
from sklearn.exceptions import ConvergenceWarning
from typer.testing import CliRunner

import scatlas as sa
from scatlas import InputError
from scatlas._errors import ConfigError
from scatlas.cli import app

runner = CliRunner()
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def symphony(symphony_path) -> ad.AnnData:
    return ad.read_h5ad(symphony_path)


@pytest.fixture(scope="module")
def fitted(symphony):
    """fe, re and cond_aenmf fitted on all Symphony cells through tl.embed (few epochs)."""
    adata = symphony.copy()
    models = {
        "fe": sa.tl.embed(adata, "fe", batch_key="batch", label_key="cell_type", max_epochs=3, batch_size=128),
        "re": sa.tl.embed(adata, "re", batch_key="batch", label_key="cell_type", max_epochs=3, batch_size=128),
        "cond_aenmf": sa.tl.embed(adata, "cond_aenmf", batch_key="batch", label_key="cell_type", max_epochs=3, rank=12, lr=1e-2),
    }
    return adata, models


def test_embed_writes_keys_and_scanpy_runs_on_them(fitted):
    adata, models = fitted
    for name, model in models.items():
        key = f"X_{name}"
        assert model.key == key and adata.obsm[key].shape[0] == adata.n_obs
        info = adata.uns["scatlas"][key]
        assert info["model"]["type"] == name and info["batch_key"] == "batch" and info["label_key"] == "cell_type"
        assert info["input"] == "counts"  # auto: symphony holds whole numbers
        assert len(info["genes"]) == len(model.prep.genes) <= 2000
        assert not model.history.empty and {"epoch", "train_loss", "val_loss"} <= set(model.history.columns)
        sc.pp.neighbors(adata, use_rep=key, key_added=f"nn_{name}")
        assert f"nn_{name}_connectivities" in adata.obsp
    assert adata.obsm["X_cond_aenmf"].min() >= 0
    W = adata.varm["W_cond_aenmf"]
    assert W.shape == (adata.n_vars, 12) and (W[~adata.var_names.isin(models["cond_aenmf"].prep.genes)] == 0).all()
    assert list(adata.layers) == [] and adata.X.max() > 1 and float(adata.X.max()).is_integer()  # X and layers untouched


def test_benchmark_scores_tl_embeddings(fitted):
    adata, _ = fitted
    table = sa.tl.benchmark(adata, ["X_fe", "X_re"], label_key="cell_type", batch_key="batch")
    assert list(table["Embedding"]) == ["X_fe", "X_re"]
    assert table[["Bio conservation", "Batch correction", "Total"]].notna().all().all()
    fig = sa.pl.benchmark_table(table)
    assert fig.axes
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one embedding: the score names and title still fit (tight_layout warned and cut them)
        names = [t.get_text() for t in sa.pl.benchmark_table(table.iloc[:1]).axes[0].get_xticklabels()]
    assert "Total" in names and "Leiden resolution" not in names  # scores only


def test_saved_model_reloads_to_the_same_bits(fitted, tmp_path):
    adata, models = fitted
    for name, model in models.items():
        model.save(tmp_path / name)
        again = sa.load_model(tmp_path / name)
        assert again.name == name and again.batch_names == model.batch_names
        np.testing.assert_array_equal(again.get_latent_representation(adata.copy()), adata.obsm[f"X_{name}"])
        pd.testing.assert_frame_equal(again.history, model.history, check_dtype=False)


def test_pca_and_nmf_reload_without_pickles(symphony, tmp_path):
    adata = symphony.copy()
    for name, options in (("pca", {"n_components": 20}), ("nmf", {"rank": 8, "max_iter": 50})):
        model = sa.tl.embed(adata, name, batch_key="batch", **options)
        model.save(tmp_path / name)
        assert not list((tmp_path / name).glob("*.pkl"))
        np.testing.assert_array_equal(sa.load_model(tmp_path / name).get_latent_representation(adata), adata.obsm[f"X_{name}"])


def test_query_with_a_third_of_the_genes_missing_reports_overlap_and_embeds(fitted, tmp_path):
    adata, models = fitted
    model = models["fe"]
    model.save(tmp_path / "fe")
    lines: list[str] = []
    reloaded = sa.load_model(tmp_path / "fe")
    reloaded.log = lines.append
    keep = np.ones(adata.n_vars, dtype=bool)
    keep[np.isin(adata.var_names, model.prep.genes[::3])] = False
    query = adata[:300, keep].copy()
    Z = reloaded.get_latent_representation(query)
    assert Z.shape == (300, adata.obsm["X_fe"].shape[1]) and np.isfinite(Z).all()
    assert len(lines) == 1 and "genes found" in lines[0] and "missing ones set to 0" in lines[0]
    with pytest.raises(InputError, match="below the minimum"):
        reloaded.get_latent_representation(adata[:, adata.var_names.isin(model.prep.genes[:100])].copy())
    renamed = query.copy()  # keyed by other ids, the model's names in a .var column (as CELLxGENE's feature_name)
    renamed.var["feature_name"] = renamed.var_names.to_numpy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    np.testing.assert_array_equal(reloaded.get_latent_representation(renamed, gene_key="feature_name"), Z)


def test_a_model_of_counts_embeds_a_query_of_log_cp10k_as_its_counts(fitted, tmp_path):
    """CellTypist-style query cells (scanpy's normalize_total(1e4) + log1p, no counts) get the latent of their counts
    through a model trained on counts, with a line; log1p of counts per million is refused before any line."""
    adata, models = fitted
    models["fe"].save(tmp_path / "fe")
    reloaded = sa.load_model(tmp_path / "fe")
    lines: list[str] = []
    reloaded.log = lines.append
    counts = adata[:400].copy()
    lognorm = counts.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    np.testing.assert_allclose(reloaded.get_latent_representation(lognorm), reloaded.get_latent_representation(counts), rtol=1e-4, atol=1e-5)
    assert lines == ["<AnnData>: .X holds log1p of counts per 10,000, as the model normalises counts: read as it is"]
    cpm = counts.copy()
    sc.pp.normalize_total(cpm, target_sum=1e6)
    sc.pp.log1p(cpm)
    with pytest.raises(InputError, match=r"non-integer values in 400 cells .*\(the model reads raw integer counts, or log1p of counts per 10,000 as it "
                                         r"makes them: put them in .X, which it reads as it was trained\)$"):
        reloaded.get_latent_representation(cpm)
    assert len(lines) == 1


def test_batch_models_refuse_unseen_batches_and_others_ignore_them(fitted):
    adata, models = fitted
    query = adata[:50].copy()
    query.obs["batch"] = "new chemistry"
    with pytest.raises(InputError, match="batches the re model was not trained on: \\['new chemistry'\\]"):
        models["re"].get_latent_representation(query)
    assert models["fe"].get_latent_representation(query).shape[0] == 50


def test_counterfactual_layer(fitted):
    adata, models = fitted
    name = sa.tl.counterfactual(adata, models["re"], "5p")
    assert name == "X_re_as_5p" and adata.layers[name].shape == adata.shape
    used = adata.var_names.isin(models["re"].prep.genes)
    assert np.abs(adata.layers[name][:, used]).sum() > 0 and (adata.layers[name][:, ~used] == 0).all()
    other = models["re"].get_counterfactual("3pv1", adata)
    assert not np.allclose(other, adata.layers[name][:, adata.var_names.get_indexer(models["re"].prep.genes)])
    renamed = adata.copy()  # keyed by other ids, the model's names in a .var column (as CELLxGENE's feature_name)
    renamed.var["feature_name"] = renamed.var_names.to_numpy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    assert sa.tl.counterfactual(renamed, models["re"], "5p", gene_key="feature_name") == name
    np.testing.assert_array_equal(renamed.layers[name], adata.layers[name])
    del adata.layers[name]
    with pytest.raises(InputError, match="not one the model was trained on"):
        models["re"].get_counterfactual("nope", adata)
    with pytest.raises(InputError, match="no gene column 'symbol' in .var"):
        sa.tl.counterfactual(renamed, models["re"], "5p", gene_key="symbol")


def test_tl_notices_are_printed_by_default(symphony, capsys):
    """A notebook user sees what was decided for them (the model, how the matrix was read, a query's missing genes) without asking."""
    adata = symphony[:300].copy()
    model = sa.tl.embed(adata, batch_key="batch", max_epochs=1)
    said = capsys.readouterr().out.splitlines()
    assert any(line.startswith("model: fe (the default with a batch key of several batches") for line in said)
    assert any(".X holds whole numbers: treated as raw counts" in line for line in said)
    model.get_latent_representation(adata[:50, :1200].copy())
    assert "of the model's" in capsys.readouterr().out
    sa.tl.embed(adata, "pca", log=lambda _: None)
    assert capsys.readouterr().out == ""


def test_embed_refuses_bad_requests_in_one_line(symphony):
    adata = symphony[:200].copy()
    with pytest.raises(sa.ConfigError, match="unknown model 'vae'"):
        sa.tl.embed(adata, "vae")
    with pytest.raises(sa.ConfigError, match="needs labels"):
        sa.tl.embed(adata, "aec", batch_key="batch")
    with pytest.raises(InputError, match="'donor'"):
        sa.tl.embed(adata, "ae", batch_key="donor")
    with pytest.raises(sa.ConfigError, match="latent_dimension"):
        sa.tl.embed(adata, "ae", batch_key="batch", latent_dimension=3)
    assert "X_ae" not in adata.obsm and "scatlas" not in adata.uns


def test_cli_embed_writes_the_latent_of_tl_embed(symphony_path, symphony, tmp_path):
    out = tmp_path / "sym_ae.h5ad"
    result = runner.invoke(app, ["embed", str(symphony_path), "--out", str(out), "--model", "ae", "--batch-key", "batch", "--label-key", "cell_type",
                                 "--max-epochs", "2", "--set", "batch_size=128", "--set", "latent_dim=16", "--quiet"])
    assert result.exit_code == 0, result.output
    written = ad.read_h5ad(out)
    adata = symphony.copy()
    sa.tl.embed(adata, "ae", batch_key="batch", label_key="cell_type", max_epochs=2, batch_size=128, latent_dim=16)
    np.testing.assert_array_equal(written.obsm["X_ae"], adata.obsm["X_ae"])
    # the command's own options may come through --set as well (it raised a TypeError: max_epochs given twice)
    alike = runner.invoke(app, ["embed", str(symphony_path), "--out", str(tmp_path / "alike.h5ad"), "--model", "ae", "--batch-key", "batch",
                                "--label-key", "cell_type", "--set", "max_epochs=2", "--set", "batch_size=128", "--set", "latent_dim=16", "--quiet"])
    assert alike.exit_code == 0, alike.output
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "alike.h5ad").obsm["X_ae"], adata.obsm["X_ae"])
    pd.testing.assert_frame_equal(written.obs, symphony.obs)  # every column, so the file can be scored or plotted by any
    assert written.n_vars == symphony.n_vars and written.X is None
    # scored as it is: without X, PCR comparison's unintegrated PCA reads the file the results came from (named in .uns)
    assert written.uns["scatlas_input"]["path"] == str(symphony_path.resolve())
    score = ["benchmark", str(out), "--embedding", "X_ae", "--label-key", "cell_type", "--batch-key", "batch", "--out", str(tmp_path / "bench")]
    scored = runner.invoke(app, score)
    assert scored.exit_code == 0 and f"PCR comparison's unintegrated PCA reads the matrix of {symphony_path.resolve()}" in scored.output, scored.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "bench" / "benchmark.csv"),
                                  sa.tl.benchmark(adata, ["X_ae"], label_key="cell_type", batch_key="batch", log=lambda _: None), rtol=1e-9)
    written.uns["scatlas_input"]["path"] = str(tmp_path / "moved.h5ad")  # the input moved: an unintegrated embedding must be named
    written.write_h5ad(out)
    score[-1] = str(tmp_path / "bench2")
    refused = runner.invoke(app, score)
    assert refused.exit_code == 2 and "moved.h5ad, the file it was made from" in refused.output and "--pre-key" in refused.output
    assert not (tmp_path / "bench2").exists()
    assert "pre_key 'X_nope' (the unintegrated reference of PCR comparison) not in .obsm" in runner.invoke(app, [*score, "--pre-key", "X_nope"]).output
    assert runner.invoke(app, [*score, "--pre-key", "X_ae"]).exit_code == 0 and (tmp_path / "bench2" / "benchmark.csv").exists()
    np.testing.assert_array_equal(sa.load_model(tmp_path / "sym_ae_model").get_latent_representation(symphony), adata.obsm["X_ae"])
    again = runner.invoke(app, ["embed", str(symphony_path), "--out", str(out), "--batch-key", "batch"])
    assert again.exit_code == 2 and "exists (pass --overwrite" in again.output


def test_embed_streams_a_backed_anndata_with_the_in_memory_genes_and_scaling(symphony_path, symphony, tmp_path):
    """A backed AnnData is embedded from its file: same genes and scaling as in memory (streamed passes), a latent as good."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from scatlas.data import read_anndata

    models, knn = {}, {}
    for backed in (True, False):
        adata = read_anndata(symphony_path, backed=True) if backed else symphony.copy()
        models[backed] = sa.tl.embed(adata, "ae", batch_key="batch", n_top_genes=800, scale="standard", chunk_size=300, seed=1)
        latent = adata.obsm["X_ae"]
        assert latent.shape == (symphony.n_obs, 50) and np.isfinite(latent).all()
        knn[backed] = cross_val_score(KNeighborsClassifier(15), latent, symphony.obs["cell_type"].to_numpy(), cv=5).mean()
    streamed, loaded = models[True], models[False]
    np.testing.assert_array_equal(streamed.prep.genes, loaded.prep.genes)
    np.testing.assert_allclose(streamed.prep.scaler.center_, loaded.prep.scaler.center_, atol=1e-5)
    np.testing.assert_allclose(streamed.prep.scaler.scale_, loaded.prep.scaler.scale_, rtol=1e-4)
    assert knn[True] > knn[False] - 0.02 and knn[True] > 0.85, knn
    streamed.save(tmp_path / "model")  # reloads and embeds in-memory cells like any model
    assert sa.load_model(tmp_path / "model").get_latent_representation(symphony).shape == (symphony.n_obs, 50)
    with pytest.raises(ConfigError, match="'pca' needs the matrix in memory"):
        sa.tl.embed(read_anndata(symphony_path, backed=True), "pca")


def test_cli_embed_stream_keeps_host_memory_flat(tmp_path):
    """`scatlas embed --stream` (AE): from 100k to 400k cells peak memory grows by well under the matrix it never loads
    (what grows is obs, codes and the latent); the latent covers every cell."""
    from conftest import data_path, streamed_peak

    args = ["embed", "{data}", "--out", "{out}.h5ad", "--stream", "--chunk-size", "20000", "--model", "ae", "--batch-key", "donor_id", "--label-key", "cell_type",
            "--max-epochs", "1", "--n-top-genes", "300", "--set", "batch_size=4096", "--set", "latent_dim=8", "--quiet"]
    src = ad.read_h5ad(data_path("onek1k_4types_40donors.h5ad"))
    small_growth, small_gb, _ = streamed_peak(tmp_path, src, 100_000, args)
    large_growth, large_gb, out = streamed_peak(tmp_path, src, 400_000, args)
    assert large_growth - small_growth < 0.5 * (large_gb - small_gb), (small_growth, large_growth, small_gb, large_gb)
    result = ad.read_h5ad(f"{out}.h5ad")
    assert result.obsm["X_ae"].shape == (400_000, 8) and np.isfinite(result.obsm["X_ae"]).all()
    assert len(result.uns["scatlas"]["X_ae"]["genes"]) == 300


def test_transfer_and_annotate_write_calls_into_anndata(symphony, tmp_path):
    reference = symphony[symphony.obs["batch"] != "5p"].copy()
    query = symphony[symphony.obs["batch"] == "5p"].copy()
    model = sa.tl.transfer(reference, query, label_key="author_cell_type", method="mlp", log=lambda _: None, training={"max_epochs": 15, "batch_size": 64})
    for adata in (reference, query):
        for column in ("author_cell_type_pred", "author_cell_type_pred_label", "author_cell_type_pred_score", "author_cell_type_unknown",
                       "author_cell_type_unknown_reason", "author_cell_type_latent_distance"):
            assert column in adata.obs
        # why a cell is unknown, as predictions.csv's flags say it: a reason for every unknown cell and for no other
        assert (adata.obs["author_cell_type_unknown_reason"].notna() == adata.obs["author_cell_type_unknown"]).all()
        assert set(adata.obs["author_cell_type_unknown_reason"].dropna()) <= {"low confidence", "far from reference", "low confidence & far from reference"}
        assert adata.obsm["author_cell_type_proba"].shape == (adata.n_obs, len(adata.uns["author_cell_type_classes"]))
    accuracy = (query.obs["author_cell_type_pred_label"].astype(str) == query.obs["author_cell_type"].astype(str)).mean()
    assert accuracy > 0.8
    # saved, the reference model maps cells later with the transfer's calls, calibrated confidences and unknown flags
    lines: list[str] = []
    later = symphony[symphony.obs["batch"] == "5p"].copy()
    sa.tl.annotate(later, model.save(tmp_path / "reference_model"), log=lines.append)
    pd.testing.assert_frame_equal(later.obs, query.obs)
    for wrong, said in [({"chunk_size": 0}, "chunk_size: 0; cells read at a time, at least 1"), ({"min_overlap": 2}, "min_overlap: 2; a share")]:
        with pytest.raises(ConfigError, match=f"^{re.escape(said)}"):  # chunk_size 0 passed in memory, min_overlap 2 asked for 200% of the genes
            sa.tl.annotate(later.copy(), model, **wrong)
    np.testing.assert_array_equal(later.obsm["author_cell_type_proba"], query.obsm["author_cell_type_proba"])
    assert "1767 of the model's 1767 genes found" in lines[-2]
    unknown = int(query.obs["author_cell_type_unknown"].sum())  # and how many cells are unknown, and why
    assert lines[-1].startswith(f"query: {unknown} of 430 cells unknown (") and "far from reference" in lines[-1]
    from scatlas.data import read_anndata

    query.write_h5ad(tmp_path / "query.h5ad")
    backed = read_anndata(tmp_path / "query.h5ad", backed=True)  # mapped 100 cells at a time from the file
    sa.tl.transfer(reference.copy(), backed, label_key="author_cell_type", method="mlp", log=lambda _: None, query_chunk_size=100,
                   max_epochs=15, batch_size=64)  # training settings as keywords, as tl.embed takes them: the same fit
    pd.testing.assert_frame_equal(backed.obs, query.obs)
    # float32 matrix products over 100-cell chunks and over the whole query may round differently on some CPUs (seen: 1.2e-7)
    np.testing.assert_allclose(backed.obsm["author_cell_type_proba"], query.obsm["author_cell_type_proba"], rtol=1e-5, atol=1e-6)
    reference.write_h5ad(tmp_path / "reference.h5ad")  # a backed reference: trained from its file, never loaded
    streamed, streamed_query = read_anndata(tmp_path / "reference.h5ad", backed=True), query.copy()
    sa.tl.transfer(streamed, streamed_query, label_key="author_cell_type", method="mlp", log=lambda _: None, training={"max_epochs": 15, "batch_size": 64})
    pd.testing.assert_frame_equal(streamed.obs, reference.obs)
    pd.testing.assert_frame_equal(streamed_query.obs, query.obs)
    with pytest.raises(InputError, match="only a whole backed AnnData"):
        sa.tl.transfer(streamed[:100], query.copy(), label_key="author_cell_type", log=lambda _: None)
    alone = reference.copy()
    sa.tl.annotate(alone, model.annotator, log=lambda _: None)  # the frozen reference classifier, uncalibrated
    assert (alone.obs["author_cell_type_pred"].astype(str) == reference.obs["author_cell_type_pred"].astype(str)).all()  # argmax ignores the temperature


def test_transfer_names_its_inputs_and_models_print_a_summary(symphony, fitted, tmp_path):
    reference = symphony[symphony.obs["batch"] != "5p"].copy()
    query = symphony[symphony.obs["batch"] == "5p"].copy()
    lines: list[str] = []
    model = sa.tl.transfer(reference, [query, query[:, :1000].copy()], label_key="cell_type", ontology_key="cell_type_ontology_term_id",
                           log=lines.append)
    assert lines[0].startswith("reference: .X holds whole numbers") and not any("<AnnData>" in line for line in lines)
    assert any(line.startswith("query 2 (430 cells): 1000 of the model's 1767 genes found") for line in lines)
    with pytest.raises(InputError, match="^query 2: the matrix is empty"):
        sa.tl.transfer(reference.copy(), [query, query[:0]], label_key="cell_type", log=lambda _: None)
    lines.clear()  # a dict names its queries; no query gives the reference model alone
    alone = reference.copy()
    assert isinstance(sa.tl.transfer(alone, {"5p": query.copy()}, label_key="cell_type", log=lines.append), sa.tl.ReferenceModel)
    assert lines[-1].startswith("5p: ") and " of 430 cells unknown" in lines[-1]
    bare = sa.tl.transfer(reference.copy(), label_key="cell_type", ontology_key="cell_type_ontology_term_id", log=lambda _: None)
    assert (bare.temperature, bare.distance_threshold) == (model.temperature, model.distance_threshold)  # nothing depends on the queries
    with pytest.raises(ConfigError, match="^query: an AnnData, a list of them, a dict of them by name, or None; not str"):
        sa.tl.transfer(reference.copy(), "query.h5ad", label_key="cell_type")
    from scatlas.data.io import source_name

    assert source_name(reference) == "<AnnData>"  # the names hold for the call only
    # a summary in a few lines, as scvi-tools' and CellTypist's models print, not the arrays they hold
    text = repr(model)
    head, *rest = text.splitlines()
    assert head == "ReferenceModel linear: 9 classes x 1,767 genes (counts input)" and len(rest) == 5 and len(text) < 1200
    assert "classes: hematopoietic stem cell, B cell," in text and "(9 in all)" in text and "temperature" in text and "hierarchical calls over" in text
    assert repr(model.annotator).splitlines()[0].startswith("Annotator linear: 9 classes")
    loaded = sa.tl.ReferenceModel.load(model.save(tmp_path / "ref"))
    assert repr(loaded) == text
    with pytest.raises(InputError, match="not a saved scatlas model .*; it holds a cell-type classifier: scatlas.tl.annotate"):
        sa.load_model(tmp_path / "ref")  # the wrong loader names the right one
    _, models = fitted
    text = repr(models["fe"])
    assert text.splitlines()[0] == "ScatlasModel fe -> obsm['X_fe']" and "3 batches: 3pv1, 3pv2, 5p" in text and "3 epochs" in text
    assert "1,200 kept" in text and "latent_dim=" in text and len(text.splitlines()) == 5
    assert "loaded from disk" in repr(sa.load_model(models["fe"].save(tmp_path / "fe")))
    with pytest.raises(InputError, match="not a scatlas annotation model .*; it is an embedding model: scatlas.load_model"):
        sa.tl.annotate(query.copy(), tmp_path / "fe")


def test_pl_figures(fitted, tmp_path):
    adata, models = fitted
    fig = sa.pl.embedding(adata, "X_fe", ["cell_type", "batch"])
    assert len(fig.axes) == 2 and all(ax.get_legend() is not None for ax in fig.axes)
    assert sa.pl.loss_curves(models["fe"]).axes
    adata.obs["fake_pred"] = adata.obs["cell_type"]
    assert sa.pl.confusion_matrix(adata, "cell_type", "fake_pred").axes
    # as scanpy's color=: missing values in grey as NA, a many-valued score on a colour scale
    adata.obs["call"] = adata.obs["cell_type"].astype(object).where(np.arange(adata.n_obs) % 10 > 0)
    adata.obs["score"] = np.linspace(0, 1, adata.n_obs)
    fig = sa.pl.embedding(adata, "X_fe", ["call", "score"])
    calls, score, colourbar = fig.axes
    assert [t.get_text() for t in calls.get_legend().get_texts()] == ["NA", *sorted(adata.obs["cell_type"].astype(str).unique())]
    assert score.get_legend() is None and colourbar.get_ylim() == (0.0, 1.0)
    confusion = sa.pl.confusion_matrix(adata, "cell_type", "call").axes[0]
    assert "NA" in [t.get_text() for t in confusion.get_xticklabels()]
    from scatlas.plot import confusion_heatmap

    written = confusion_heatmap(adata.obs["cell_type"], adata.obs["fake_pred"], str(tmp_path / "confusion.png"))  # a str path, as users give it
    assert written == tmp_path / "confusion.png" and written.read_bytes().startswith(b"\x89PNG")
    # what cannot be drawn is refused in one line (these were a ValueError, an IndexError and a KeyError)
    with pytest.raises(ConfigError, match="^color: name at least one obs column"):
        sa.pl.embedding(adata, "X_fe", [])
    flat = adata.copy()
    flat.obsm["X_one"] = flat.obsm["X_fe"][:, :1]
    with pytest.raises(InputError, match="obsm key 'X_one' has 1 dimension; a scatter needs at least 2"):
        sa.pl.embedding(flat, "X_one", "cell_type")
    flat.obsm["X_two"] = flat.obsm["X_fe"][:, :2]  # as scanpy's basis: "two" names X_two
    assert sa.pl.embedding(flat, "two", "cell_type").axes[0].get_xlabel().startswith("TWO")
    with pytest.raises(InputError, match="^table: not a benchmark table"):
        sa.pl.benchmark_table(pd.DataFrame({"score": [0.5]}))


def test_help_is_fast_and_imports_no_heavy_library():
    code = ("import sys, time; t = time.perf_counter(); from scatlas.cli import app; import scatlas; "
            "heavy = [m for m in ('torch', 'lightning', 'scanpy', 'anndata', 'sklearn') if m in sys.modules]; "
            "print(heavy, time.perf_counter() - t)")
    heavy, seconds = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.rsplit(" ", 1)
    assert heavy == "[]"
    for args in (["--help"], ["embed", "--help"], ["run", "--help"], ["annotate", "train", "--help"], ["benchmark", "--help"]):
        done = subprocess.run([sys.executable, "-m", "scatlas", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    # generous margin over the 1.5 s target: a loaded 2-core CI machine must not fail this
    assert float(seconds) < 3.0


def test_validate_imports_neither_torch_nor_scikit_learn():
    """`scatlas validate` reads and checks a file without the training stack (the data layer loads it on first use)."""
    from conftest import data_path

    code = ("import sys; from scatlas.cli import app; "
            f"app(['validate', {str(data_path('kang18_muscat_4samples.h5ad'))!r}, '--label-key', 'cell_type'], standalone_mode=False); "
            "print('heavy:', [m for m in ('torch', 'lightning', 'sklearn') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("heavy: []"), done.stdout


def test_annotation_and_transfer_import_no_matplotlib_sklearn_or_scipy_stats():
    """Annotation and transfer start without matplotlib (0.25 s; loaded to draw a figure), scikit-learn (0.6 s; loaded for
    k-fold splits) or scipy.stats (0.5 s)."""
    code = ("import sys, scatlas.tl._annotation, scatlas.tl._transfer; "
            "print([m for m in ('matplotlib', 'sklearn', 'scipy.stats') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_readme_api_reference_names_exist():
    text = README.read_text()
    section = text[text.index("## API reference"):]
    section = section[: section.index("\n## ", 4)] if "\n## " in section[4:] else section
    names = sorted(set(re.findall(r"`(scatlas(?:\.\w+)+)", section)))
    assert len(names) >= 15
    for name in names:
        module, _, attr = name.rpartition(".")
        obj = __import__(module, fromlist=[attr])
        assert hasattr(obj, attr), name


def test_fe_defaults_and_the_published_configuration_is_one_option_away(cellbench3_path):
    adata = ad.read_h5ad(cellbench3_path)
    lines: list[str] = []
    default = sa.tl.embed(adata, "fe", batch_key="batch", max_epochs=2, key_added="X_default", log=lines.append)
    published = sa.tl.embed(adata, "fe", batch_key="batch", max_epochs=2, key_added="X_published", published=True)
    d, p = default.model.config, published.model.config
    assert (d.encoder_objective, d.adversary_input, d.adversary_weight, d.decoder_batch) == ("confusion", "latent", 10.0, True)
    assert (p.encoder_objective, p.adversary_input, p.adversary_weight, p.decoder_batch) == ("negative_ce", "all", 1.0, False)
    assert p.recon_weight == 2000.0 and d.recon_weight == 2000.0
    assert (d.latent_dim, p.latent_dim) == (20, 50)
    # 449 training cells are 3 minibatches an epoch: early stopping waits ceil(500 / 3) epochs; the user's max_epochs stays
    assert (default.model.train_config.patience, default.model.train_config.max_epochs) == (167, 2)
    assert [line for line in lines if "minibatches an epoch" in line] == ["fe: 449 training cells are 3 minibatches an epoch, so patience 167 (counted in minibatches; set patience / max_epochs to override)"]
    assert (published.model.train_config.patience, published.model.train_config.max_epochs) == (10, 2)
    # the measured minibatch default applies unless the user sets one; the published run keeps the global 256
    assert default.model.train_config.batch_size == 128 and published.model.train_config.batch_size == 256
    chosen = sa.tl.embed(adata, "fe", batch_key="batch", max_epochs=1, key_added="X_bs", batch_size=64)
    assert chosen.model.train_config.batch_size == 64
    # the published decoder is blind to the batch: its first layer reads the latent only
    assert published.model.module.decoder.linears[0].in_features == p.latent_dim
    assert default.model.module.decoder.linears[0].in_features == d.latent_dim + 2
    assert not np.array_equal(adata.obsm["X_default"], adata.obsm["X_published"])
    with pytest.raises(ConfigError, match="published"):
        sa.tl.embed(adata, "fe", batch_key="batch", max_epochs=1, published=True, adversary_input="latent")

def test_fe_saved_before_the_batch_aware_decoder_still_loads(cellbench3_path, tmp_path):
    adata = ad.read_h5ad(cellbench3_path)
    model = sa.tl.embed(adata, "fe", batch_key="batch", max_epochs=1, decoder_batch=False)
    model.save(tmp_path / "old_fe")
    meta_path = tmp_path / "old_fe" / "scatlas_model.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    del meta["model"]["decoder_batch"]  # as written by scatlas before the field existed
    meta_path.write_text(yaml.safe_dump(meta))
    reloaded = sa.load_model(tmp_path / "old_fe")
    assert reloaded.model.config.decoder_batch is False
    np.testing.assert_allclose(reloaded.get_latent_representation(adata), adata.obsm["X_fe"], rtol=1e-5, atol=1e-6)


def test_embed_on_raw_writes_the_loadings_of_the_genes_var_holds():
    """`layer="raw"` trains on .raw's genes (scanpy's bundled `pbmc68k_reduced`, .var cut to 300 of .raw's 765); `.varm`
    follows `.var`, so it holds the loadings of the model's genes that `.var` has, and zeros elsewhere."""
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()[:, :300].copy()
    model = sa.tl.embed(adata, "nmf", layer="raw", rank=6, max_iter=30, log=lambda _: None)
    genes = pd.Index(model.prep.genes)
    assert len(genes) > 300 and adata.uns["scatlas"]["X_nmf"]["layer"] == "raw"
    W, in_var = adata.varm["W_nmf"], adata.var_names.isin(genes)
    assert W.shape == (300, 6) and in_var.sum() > 0
    np.testing.assert_array_equal(W[in_var], model.loadings()[genes.get_indexer(adata.var_names[in_var])])
    assert (W[~in_var] == 0).all()
    np.testing.assert_array_equal(sa.tl.embed(adata, "nmf", layer="raw", rank=6, max_iter=30, log=lambda _: None).get_latent_representation(adata),
                                  adata.obsm["X_nmf"])


def test_queries_are_read_from_the_layer_the_model_was_trained_on(symphony, tmp_path):
    """scanpy's usual layout (log-normalised X, counts in a layer): a query without `layer` is read from the training layer
    where it has it (as scvi-tools), with a line saying so; an explicit layer wins; a query without that layer reads .X."""
    layered = symphony.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = sc.pp.log1p(sc.pp.normalize_total(layered, target_sum=1e4, inplace=False)["X"])
    held = (layered.obs["batch"] == "5p").to_numpy()
    reference, query = layered[~held].copy(), layered[held].copy()
    training = {"max_epochs": 5, "batch_size": 64}
    lines: list[str] = []
    model = sa.tl.transfer(reference, query, label_key="author_cell_type", layer="counts", log=lines.append, training=training)
    assert any(line.endswith("reading layer 'counts', as the reference") for line in lines)
    explicit = query.copy()
    sa.tl.transfer(reference.copy(), explicit, label_key="author_cell_type", layer="counts", query_layer="counts", log=lambda _: None,
                   training=training)
    pd.testing.assert_frame_equal(explicit.obs, query.obs)
    model.annotator.save(tmp_path / "model")
    assert yaml.safe_load((tmp_path / "model" / "annotator.yaml").read_text())["layer"] == "counts"
    lines.clear()
    again = query.copy()
    sa.tl.annotate(again, tmp_path / "model", log=lines.append)
    assert lines[0].endswith("reading layer 'counts', as the model was trained")
    plain = ad.AnnData(query.layers["counts"].copy(), obs=query.obs[["author_cell_type"]].copy(), var=query.var.copy())  # counts in X
    sa.tl.annotate(plain, tmp_path / "model", log=lines.append)
    assert (again.obs["author_cell_type_pred"] == plain.obs["author_cell_type_pred"]).all()
    with pytest.raises(InputError, match="layer 'spliced' not found"):  # an explicit layer is read as given
        sa.tl.annotate(query.copy(), tmp_path / "model", layer="spliced", log=lambda _: None)
    broken = query.copy()
    broken.layers["counts"].data[0] = np.nan
    with pytest.raises(InputError, match="layer 'counts' has NaN or infinite values in 1 cells"):  # before any line
        sa.tl.annotate(broken, tmp_path / "model", log=pytest.fail)


def test_embed_without_a_model_removes_the_batch_it_is_given():
    """No model named: fe when the batch key holds several batches (the integration method measured best), ae otherwise, said
    in one line; a model that ignores the batch key says its latent keeps the batch effect."""
    from conftest import data_path

    mesc = ad.read_h5ad(data_path("scmerge_mesc_2batches.h5ad"))
    said: list[str] = []
    sa.tl.embed(adata := mesc.copy(), batch_key="batch", max_epochs=1, log=said.append)
    assert list(adata.obsm) == ["X_fe"] and said[0].startswith("model: fe (the default with a batch key of several batches")
    said.clear()
    sa.tl.embed(adata := mesc.copy(), max_epochs=1, log=said.append)
    assert list(adata.obsm) == ["X_ae"] and said[0].startswith("model: ae (the default without a batch key")
    one = mesc.copy()
    one.obs["run"] = "only"
    assert sa.tl.embed(one, batch_key="run", max_epochs=1).name == "ae"
    said.clear()
    sa.tl.embed(mesc.copy(), "pca", batch_key="batch", log=said.append)
    assert said[0] == "pca does not use the batch key 'batch': its latent keeps any batch effect (fe removes it; README \"Which model for integration\")"
    said.clear()
    sa.tl.embed(mesc.copy(), "fe", batch_key="batch", max_epochs=1, log=said.append)
    assert not any("does not use the batch" in line or "models the batch" in line or line.startswith("model:") for line in said)
    said.clear()  # a model of the batch given one batch trains, and says it has nothing to remove
    sa.tl.embed(one, "fe", batch_key="run", max_epochs=1, log=said.append)
    assert said[0] == ("fe models the batch, but obs column 'run' holds one batch: with one batch there is no batch effect to remove or model "
                       "(`batch_key` / --batch-key names the batch column)")
    sa.tl.embed(mesc.copy(), "re", max_epochs=1, log=said.append)
    assert said[-2].startswith("re models the batch, but no batch key was given")


def test_factor_and_component_counts_are_checked_against_the_data(symphony):
    """A rank above the genes (or, for scikit-learn's NMF, the training cells) is refused in one line; PCA fits fewer
    components than asked only with a line saying why."""
    adata, said = symphony[:300].copy(), []
    for model in ("nmf", "aenmf", "cond_aenmf"):
        with pytest.raises(sa.ConfigError, match=f"^{model}: rank 400 is above the 300 genes the model reads"):
            sa.tl.embed(adata, model, batch_key="batch", n_top_genes=300, rank=400, max_epochs=1)
    with pytest.raises(sa.ConfigError, match="^nmf: rank 280 is above the 270 training cells"):
        sa.tl.embed(adata, "nmf", n_top_genes=None, rank=280)
    assert not any(key.startswith("X_") for key in adata.obsm)
    sa.tl.embed(adata, "pca", n_components=500, log=said.append)
    assert said[-1].startswith("pca: 269 components, not n_components 500: at most the training cells less one (269) and the genes (")
    assert adata.obsm["X_pca"].shape == (300, 269)
    said.clear()  # settings a model does not use are named, not dropped silently
    sa.tl.embed(adata, "nmf", rank=3, max_epochs=50, lr=0.1, chunk_size=100, log=said.append)
    assert "nmf: lr, max_epochs do not apply (it is fitted by scikit-learn, not by epochs; max_iter bounds its iterations)" in said
    assert "nmf: chunk_size does not apply (the matrix is in memory, not streamed: --stream, or a backed AnnData)" in said
    said.clear()  # scikit-learn's two-line ConvergenceWarning is one line of the log
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        sa.tl.embed(adata, "nmf", rank=3, max_iter=2, log=said.append)
    assert re.fullmatch(r"nmf: scikit-learn stopped at max_iter 2 before its tolerance \(tol 0.0001\) was met, reconstruction error [0-9.]+ "
                        r"\(to iterate longer, raise max_iter; in `scatlas nmf`, --max-epochs\)", said[-1]), said
    said.clear()
    sa.tl.embed(adata, "aenmf", rank=3, max_epochs=1, log=said.append)
    assert not any("not apply" in line for line in said)
    said.clear()  # the classifiers alike
    sa.tl.transfer(adata, label_key="cell_type", chunk_size=100, patience=3, log=said.append)
    assert "linear: chunk_size does not apply (the matrix is in memory, not streamed: --stream, or a backed AnnData)" in said
    assert "the linear model is fitted full-batch to convergence: patience does not apply (minibatch training: the mlp method)" in said
    said.clear()  # nothing is said of the settings a user left alone
    sa.tl.transfer(adata, label_key="cell_type", log=said.append)
    assert not any("not apply" in line for line in said)


def test_tools_write_into_a_view_as_scanpy_does(symphony):
    """A view (a subset of another AnnData) gets data of its own before a tool writes into it, with one line, not anndata's
    two-line warning at every write; the AnnData it came from is left as it was."""
    from anndata import ImplicitModificationWarning

    parent = symphony.copy()
    columns = list(parent.obs.columns)
    reference, query = parent[parent.obs["batch"] != "5p"], parent[parent.obs["batch"] == "5p"]
    said: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitModificationWarning)
        sa.tl.embed(reference, "pca", log=said.append)
        model = sa.tl.transfer(reference, query, label_key="cell_type", log=said.append)
        subset = parent[:50]
        sa.tl.annotate(subset, model, log=said.append)
    line = "a view of another AnnData: given data of its own, in place, to write the results into (as scanpy does)"
    assert [s for s in said if line in s] == [f"<AnnData>: {line}", f"query: {line}", f"query: {line}"]  # the reference was no view any more
    assert not reference.is_view and "X_pca" in reference.obsm and "cell_type_pred" in reference.obs and "cell_type_pred" in subset.obs
    assert not query.is_view and query.obs["cell_type_pred"].notna().all()
    assert list(parent.obs.columns) == columns and "X_pca" not in parent.obsm
