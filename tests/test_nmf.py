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
from scatlas.models.nmf import CondAENMFModule, linear_hsic, nonnegative_orthogonal_init

runner = CliRunner()


def test_init_is_nonnegative_and_near_orthogonal():
    W = nonnegative_orthogonal_init(10, 500, torch.Generator().manual_seed(0))
    assert (W >= 0).all()
    gram = W @ W.T
    assert torch.allclose(gram.diagonal(), torch.ones(10), atol=1e-5)
    assert gram.fill_diagonal_(0).abs().max() < 0.9


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
    adata = ad.read_h5ad(out)
    assert adata.obsm["H_cond_aenmf_k10"].shape == (7811, 10) and adata.varm["W_cond_aenmf_k10"].shape[1] == 10
    assert (adata.obsm["H_cond_aenmf_k10"] >= 0).all() and (adata.varm["W_cond_aenmf_k10"] >= 0).all()
    assert list(adata.obs.columns) == ["cell_type", "donor_id"]
    by_type = pd.read_csv(tmp_path / "onek1k_cond_benchmark_by_cell_type.csv").set_index("kind")
    by_donor = pd.read_csv(tmp_path / "onek1k_cond_benchmark_by_donor_id.csv").set_index("kind")
    assert {"leiden", "logreg", "knn", "rf", "dummy"} <= set(by_type.index)
    assert by_type.loc["logreg", "macro_f1"] > by_type.loc["dummy", "macro_f1"]
    assert (tmp_path / "onek1k_cond_loadings.csv").exists()


def test_standard_scaling_refused(tmp_path, symphony_path):
    cfg = {"dataset": {"name": "s", "path": str(symphony_path), "batch_key": "batch"}, "preprocess": {"scale": "standard", "n_top_genes": 100},
           "split": {"n_splits": 3}, "models": [{"type": "aenmf", "rank": 3}], "output": {"dir": str(tmp_path / "o")}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 2 and "non-negative input" in result.output
    assert not (tmp_path / "o" / "s_outputs" / "latent_space").exists() or not any((tmp_path / "o" / "s_outputs" / "latent_space").rglob("splits_*"))
