"""Non-negative factor models: non-negativity, learning, runner integration and `scatlas nmf`, on real cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from scatlas.cli import app
from scatlas.data import normalize_log1p
from scatlas.models import build_model
from scatlas.models.base import SplitData, parse_model_config
from scatlas.models.nmf import CondAENMFModule, linear_hsic, nonnegative_orthogonal_init
from scatlas.train import TrainConfig

runner = CliRunner()


def test_init_is_nonnegative_and_near_orthogonal():
    W = nonnegative_orthogonal_init(10, 500, torch.Generator().manual_seed(0))
    assert (W >= 0).all()
    gram = W @ W.T
    assert torch.allclose(gram.diagonal(), torch.ones(10), atol=1e-5)
    assert gram.fill_diagonal_(0).abs().max() < 0.1


def test_linear_hsic_detects_dependence():
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.one_hot(torch.randint(0, 3, (300,), generator=g), 3).float()
    independent = torch.rand(300, 5, generator=g)
    dependent = independent + 2 * c @ torch.rand(3, 5, generator=g)
    assert linear_hsic(dependent, c) > 10 * linear_hsic(independent, c)


@pytest.mark.parametrize("formulation", ["offset", "decoder"])
def test_cond_module_shapes(formulation):
    m = CondAENMFModule(30, 4, 3, formulation=formulation, warmup_epochs=0)
    batch = {"x": torch.rand(16, 30), "batch": torch.randint(0, 3, (16,)), "label": torch.randint(0, 2, (16,))}
    terms = m.loss(batch)
    assert {"recon", "ridge", "hsic", "invariance", "loss"} <= set(terms)
    assert m.reconstruct(batch).shape == (16, 30) and m.concat_latent(batch).shape == (16, 8)


def test_runner_nmf_models_nonnegative(tmp_path, symphony_path):
    cfg = {
        "dataset": {"name": "sym", "path": str(symphony_path), "batch_key": "batch", "label_key": "cell_type"},
        "preprocess": {"n_top_genes": 500},
        "split": {"kind": "kfold", "n_splits": 3},
        "training": {"max_epochs": 15, "batch_size": 64, "lr": 0.01, "patience": 0},
        "models": [{"type": "nmf", "rank": 8}, {"type": "aenmf", "rank": 8}, {"type": "cond_aenmf", "rank": 8, "warmup_epochs": 2}],
        "evaluation": {"figures": False, "parts": ["train", "test"]},
        "output": {"dir": str(tmp_path)},
    }
    path = tmp_path / "nmf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "sym_outputs" / "latent_space" / "kfold"
    for model in ("NMF", "AENMF", "COND_AENMF"):
        split = root / model / "run1" / "splits_1"
        H, W = np.load(split / "H_test.npy"), np.load(split / "W.npy")
        assert H.shape[1] == 8 and W.shape == (500, 8)
        assert (H >= 0).all() and (W >= 0).all()
        loadings = pd.read_csv(split / "gene_loadings.csv")
        assert loadings.groupby("factor")["weight"].apply(lambda w: w.is_monotonic_decreasing).all()
        if model != "NMF":
            history = pd.read_csv(split / "history.csv")
            assert history["train_recon"].iloc[-1] < history["train_recon"].iloc[0]


def test_nmf_cli_writes_results_only_anndata(tmp_path):
    from conftest import data_path

    out = tmp_path / "onek1k_cond.h5ad"
    result = runner.invoke(app, ["nmf", str(data_path("onek1k_4types_40donors.h5ad")), "--model", "cond_aenmf", "--rank", "10", "--batch-key", "donor_id",
                                 "--label-key", "cell_type", "--max-epochs", "5", "--benchmark-seeds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "benchmark of H by cell_type and donor_id: Leiden over 2 seeds" in result.output  # said before its longest step
    adata = ad.read_h5ad(out)
    assert adata.obsm["H_cond_aenmf_k10"].shape == (7811, 10) and adata.varm["W_cond_aenmf_k10"].shape[1] == 10
    assert (adata.obsm["H_cond_aenmf_k10"] >= 0).all() and (adata.varm["W_cond_aenmf_k10"] >= 0).all()
    source = ad.read_h5ad(data_path("onek1k_4types_40donors.h5ad"), backed="r")
    pd.testing.assert_frame_equal(adata.obs, source.obs.set_axis(source.obs_names.astype(str)))  # the input's obs, every column
    by_type = pd.read_csv(tmp_path / "onek1k_cond_benchmark_by_cell_type.csv").set_index("kind")
    by_donor = pd.read_csv(tmp_path / "onek1k_cond_benchmark_by_donor_id.csv").set_index("kind")
    assert {"logreg", "dummy"} <= set(by_donor.index)  # the donor read-out is written too
    assert {"leiden", "logreg", "knn", "rf", "dummy"} <= set(by_type.index)
    assert by_type.loc["logreg", "macro_f1"] > by_type.loc["dummy", "macro_f1"]
    assert (tmp_path / "onek1k_cond_loadings.csv").exists()
    # the printed tables: counts whole, a blank (not NaN) where a row has no value
    assert "nan" not in result.output.lower() and "7811.000" not in result.output
    assert by_type.loc["logreg", "n_cells"] == 7811 and "7811," in (tmp_path / "onek1k_cond_benchmark_by_cell_type.csv").read_text()


def test_nmf_cli_streams_scikit_learn_nmf_by_partial_fits(tmp_path):
    """`nmf --stream --model nmf` never loads X: MiniBatchNMF learns W by one partial fit per chunk (`--max-epochs` passes over
    the file), and H is solved chunk by chunk; the factors separate OneK1K's four cell types as the in-memory fit's do."""
    from conftest import data_path

    out = tmp_path / "streamed.h5ad"
    result = runner.invoke(app, ["nmf", str(data_path("onek1k_4types_40donors.h5ad")), "--model", "nmf", "--rank", "10", "--stream", "--chunk-size", "2000",
                                 "--max-epochs", "20", "--benchmark-seeds", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(out)
    H, labels = adata.obsm["H_nmf_k10"], adata.obs["cell_type"].astype(str).to_numpy()
    assert H.shape == (7811, 10) and (H >= 0).all() and (adata.varm["W_nmf_k10"] >= 0).all() and adata.uns["scatlas_factors"]["streamed"]
    centroids = {k: H[labels == k].mean(0) for k in np.unique(labels)}  # nearest cell-type centroid in the factor space
    nearest = np.array(list(centroids))[np.argmin([[np.linalg.norm(h - c) for c in centroids.values()] for h in H], axis=1)]
    assert (nearest == labels).mean() > 0.9


def test_standard_scaling_refused(tmp_path, symphony_path):
    cfg = {"dataset": {"name": "s", "path": str(symphony_path), "batch_key": "batch"}, "preprocess": {"scale": "standard", "n_top_genes": 100},
           "split": {"n_splits": 3}, "models": [{"type": "aenmf", "rank": 3}], "output": {"dir": str(tmp_path / "o")}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 2 and "non-negative input" in result.output
    assert not (tmp_path / "o" / "s_outputs" / "latent_space").exists() or not any((tmp_path / "o" / "s_outputs" / "latent_space").rglob("splits_*"))


def _onek1k_split() -> SplitData:
    from conftest import data_path

    adata = ad.read_h5ad(data_path("onek1k_4types_40donors.h5ad"))
    donors = adata.obs["donor_id"].astype("category")
    rows = np.random.default_rng(0).permutation(adata.n_obs)
    return SplitData(X=normalize_log1p(adata.X), train=np.sort(rows[:6000]), val=np.sort(rows[6000:]),
                     batch=donors.cat.codes.to_numpy().astype(np.int64), batch_names=list(donors.cat.categories.astype(str)))


def _heldout_error(model, data: SplitData) -> float:
    X = data.X[data.val].toarray()
    return float(np.linalg.norm(X - model.reconstruct(data, data.val)) / np.linalg.norm(X))


def test_ddp_two_cpu_processes_match_one(tmp_path):
    """Lightning DDP (2 spawned CPU processes, gloo), each rank streaming its own shard, against one process with the same global batch."""
    data = _onek1k_split()
    config = parse_model_config({"type": "aenmf", "rank": 10})
    common = {"max_epochs": 4, "lr": 1e-2, "patience": 0, "progress": False, "accelerator": "cpu"}
    single = build_model(config, TrainConfig(batch_size=256, devices=1, **common))
    single.fit(data, tmp_path / "single")
    ddp = build_model(config, TrainConfig(batch_size=128, devices=2, strategy="ddp_spawn", **common))
    history = ddp.fit(data, tmp_path / "ddp")
    assert len(history) == 4 and history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]  # history from rank 0
    start = build_model(config, TrainConfig(**common))
    start.module = start.build_module(data)
    err_single, err_ddp, err_init = (_heldout_error(m, data) for m in (single, ddp, start))
    assert err_ddp < err_init - 0.2
    assert abs(err_ddp - err_single) < 0.02 * err_single
    assert (ddp.loadings() >= 0).all()


def test_streamed_nmf_keeps_host_memory_flat(tmp_path):
    """`scatlas nmf --stream`: from 100k to 400k cells peak memory grows by well under the matrix it never loads.

    Loading the matrix would cost at least its size (plus a normalised copy); what grows here is
    per-cell metadata (obs, codes, H), about a fifth of it (the bound is half, so that the
    allocator's noise on a loaded machine does not fail the test).
    """
    from conftest import data_path, streamed_peak

    args = ["nmf", "{data}", "--out", "{out}.h5ad", "--stream", "--chunk-size", "20000", "--model", "aenmf", "--rank", "8", "--batch-key", "donor_id", "--label-key", "cell_type",
            "--max-epochs", "1", "--batch-size", "4096", "--n-top-genes", "300", "--benchmark-seeds", "0"]
    src = ad.read_h5ad(data_path("onek1k_4types_40donors.h5ad"))
    small_growth, small_gb, _ = streamed_peak(tmp_path, src, 100_000, args)
    large_growth, large_gb, out = streamed_peak(tmp_path, src, 400_000, args)
    assert large_growth - small_growth < 0.5 * (large_gb - small_gb), (small_growth, large_growth, small_gb, large_gb)
    result = ad.read_h5ad(f"{out}.h5ad")
    H = result.obsm["H_aenmf_k8"]
    assert H.shape == (400_000, 8) and (H >= 0).all() and result.uns["scatlas_factors"]["streamed"]
    assert result.varm["W_aenmf_k8"].shape == (300, 8)


def test_symphony_conditioning_removes_chemistry_and_keeps_cell_types(symphony_path):
    """Issue acceptance on Symphony (batch = chemistry): cond_aenmf's H_shared has lower batch NMI and
    batch ASW than aenmf's, and its cell-type ARI does not drop by more than 0.05."""
    from sklearn.metrics import silhouette_score

    from scatlas.data.dataset import DatasetConfig
    from scatlas.settings import TrainingConfig
    from scatlas.tl._factors import fit_factors
    from scatlas.metrics.clustering import leiden_agreement

    dataset = DatasetConfig(name="sym", path=symphony_path, batch_key="batch", label_key="cell_type")
    training = TrainingConfig(max_epochs=100, batch_size=64, lr=1e-2, patience=10)
    scores = {}
    for model in ("aenmf", "cond_aenmf"):
        adata, key = fit_factors(dataset, {"type": model, "rank": 20}, training, 2000)
        H = adata.obsm[f"H_{key}"]
        Z = (H - H.mean(0)) / (H.std(0) + 1e-8)
        cell_type, batch = adata.obs["cell_type"].to_numpy(), adata.obs["batch"].to_numpy()
        leiden = leiden_agreement(H, {"cell_type": cell_type, "batch": batch}, resolution=0.8, n_neighbors=25, seeds=range(3))
        mean = leiden.groupby("target")[["ari", "nmi"]].mean()
        scores[model] = {"ari": mean.loc["cell_type", "ari"], "batch_nmi": mean.loc["batch", "nmi"], "batch_asw": silhouette_score(Z, batch)}
    plain, cond = scores["aenmf"], scores["cond_aenmf"]
    assert cond["batch_nmi"] < plain["batch_nmi"] - 0.1, scores
    assert cond["batch_asw"] < plain["batch_asw"], scores
    assert cond["ari"] > plain["ari"] - 0.05, scores


@pytest.mark.parametrize("stream", [False, True])
def test_all_zero_cells_left_out_of_training_with_a_notice(tmp_path, stream):
    import scipy.sparse as sp
    from conftest import data_path

    adata = ad.read_h5ad(data_path("scmerge_mesc_2batches.h5ad"))
    X = adata.X.toarray()
    X[:5] = 0
    adata.X = sp.csr_matrix(X)
    adata.write_h5ad(tmp_path / "holes.h5ad")
    args = ["nmf", str(tmp_path / "holes.h5ad"), "--out", str(tmp_path / "f.h5ad"), "--rank", "5", "--max-epochs", "2", "--benchmark-seeds", "0"]
    result = CliRunner().invoke(app, args + (["--stream"] if stream else []))
    assert result.exit_code == 0, result.output
    assert "5 all-zero cells (of 200 cells × 1047 genes) are left out of training" in " ".join(result.output.split())
    assert ad.read_h5ad(tmp_path / "f.h5ad").obsm["H_aenmf_k5"].shape == (200, 5)  # every cell still gets its factors


def test_nmf_cli_max_epochs_is_scikit_learns_max_iter(tmp_path):
    """For scikit-learn's NMF, `--max-epochs` bounds its iterations (max_iter), and stopping there is one line, not a
    two-line ConvergenceWarning; the other epoch settings are named as not applying."""
    from conftest import data_path

    args = ["nmf", str(data_path("scmerge_mesc_2batches.h5ad")), "--out", str(tmp_path / "f.h5ad"), "--model", "nmf", "--rank", "5",
            "--max-epochs", "2", "--lr", "0.1", "--benchmark-seeds", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "nmf: scikit-learn stopped at max_iter 2 before its tolerance (tol 0.0001) was met" in output
    assert "nmf: lr does not apply (it is fitted by scikit-learn, not by epochs; max_iter bounds its iterations)" in output
    assert "ConvergenceWarning" not in output and "max_epochs does not apply" not in output
