"""scMEDAL family: RE block KL, adversarial step mechanics, counterfactuals, MEC, on real cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch.distributions import Normal, kl_divergence
from typer.testing import CliRunner

from scatlas.cli import app
from scatlas.data.dataset import DatasetConfig, load_dataset
from scatlas.data.splits import kfold_splits
from scatlas.experiment.config import ExperimentConfig
from scatlas.experiment.runner import split_data
from scatlas.models import RandomEffectsModule, ScMEDALFE, ScMEDALRE
from scatlas.models.mixed_effects import FEConfig, REConfig
from scatlas.nn import RandomEffectBlock, VariationalLinear, grad_reverse
from scatlas.settings import TrainingConfig
from scatlas.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split(cellbench3_path):
    dataset = {"name": "cb3", "path": str(cellbench3_path), "batch_key": "batch", "label_key": "cell_line"}
    cfg = ExperimentConfig.model_validate({"dataset": dataset, "preprocess": {"n_top_genes": 500, "scale": "maxabs"}, "models": [{"type": "ae"}]})
    data = load_dataset(DatasetConfig(**dataset))
    s = kfold_splits(data.strata(), 3, seed=0)[0]
    return split_data(cfg, data, s), s


def test_variational_kl_matches_closed_form():
    layer = VariationalLinear(3, 7, prior_sd=0.25)
    with torch.no_grad():
        layer.rho.normal_(0, 1)
    ref = kl_divergence(Normal(layer.mu, layer.sd), Normal(torch.zeros(3, 7), torch.full((3, 7), 0.25))).sum()
    assert layer.kl().item() == pytest.approx(ref.item(), rel=1e-6)
    block = RandomEffectBlock(5, 3)
    assert block.kl().item() == pytest.approx((block.gamma.kl() + block.beta.kl()).item())


def test_variational_sampling_train_vs_eval():
    layer = VariationalLinear(2, 4)
    z = torch.eye(2)
    layer.train()
    assert not torch.equal(layer(z), layer(z))  # one sample per pass
    layer.eval()
    assert torch.equal(layer(z), layer.mu)  # posterior mean
    assert layer.sd.mean().item() == pytest.approx(0.01, rel=1e-3)  # published initial scale


def test_grad_reverse():
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x, 2.0) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-2.0, -4.0, -6.0]))


def _train(**kw):
    return TrainConfig(**{"max_epochs": 1, "batch_size": 64, "patience": 0, "progress": False, "accelerator": "cpu", **kw})


def test_fe_counts_patience_and_epochs_in_minibatches():
    """FE's patience and epoch budget are counted in minibatches on small data; the user's values, large data and the published configuration keep theirs."""
    default = ScMEDALFE(FEConfig(), TrainingConfig().to_train_config(0, progress=False))
    assert default.train_config.batch_size == 128 and default.config.latent_dim == 20
    # 1,000 training cells in minibatches of 128: 7 steps an epoch, so ceil(500 / 7) and ceil(3,000 / 7) epochs
    assert default.sized_training(1_000) == {"patience": 72, "max_epochs": 429}
    assert default.sized_training(1_000_000) == {"patience": 10, "max_epochs": 100}
    chosen = ScMEDALFE(FEConfig(), TrainingConfig(patience=5, max_epochs=20).to_train_config(0, progress=False))
    assert chosen.unset(chosen.sized_training(1_000)) == {}
    published = ScMEDALFE(FEConfig(published=True), TrainingConfig().to_train_config(0, progress=False))
    assert published.sized_training(1_000) == {} and published.config.latent_dim == 50
    assert FEConfig(published=True, latent_dim=8).latent_dim == 8


def test_adversarial_steps_and_gradient_isolation(split):
    """Per minibatch: one adversary step (encoder frozen), one autoencoder step (adversary frozen)."""
    sdata, _ = split
    model = ScMEDALFE(FEConfig(latent_dim=8), _train())
    module = model.build_module(sdata)
    hits = {"adversary": 0, "encoder": 0}
    for p in module.adversary.parameters():
        p.register_hook(lambda g: hits.__setitem__("adversary", hits["adversary"] + 1))
    for p in module.encoder.parameters():
        p.register_hook(lambda g: hits.__setitem__("encoder", hits["encoder"] + 1))
    model.build_module = lambda data: module  # train exactly this instrumented module
    model.fit(sdata)
    n_batches = len(sdata.train) // 64
    opt_ae, opt_adv = model.plan.trainer.optimizers
    steps = {id(opt): max(int(s["step"]) for s in opt.state.values()) for opt in (opt_ae, opt_adv)}
    assert steps[id(opt_ae)] == n_batches and steps[id(opt_adv)] == n_batches
    # adversary grads only from step (a), encoder grads only from step (b): one hook per parameter per batch
    assert hits["adversary"] == n_batches * len(list(module.adversary.parameters()))
    assert hits["encoder"] == n_batches * len(list(module.encoder.parameters()))
    adv_ids = {id(p) for p in module.adversary.parameters()}
    assert not any(id(p) in adv_ids for group in opt_ae.param_groups for p in group["params"])


def test_reversal_mode_trains(split):
    sdata, _ = split
    model = ScMEDALFE(FEConfig(latent_dim=8, adversary="reversal", adversary_weight=5), _train(max_epochs=3))
    history = model.fit(sdata)
    assert {"train_adversary", "val_adversary", "val_loss"} <= set(history.columns)
    assert history["train_recon"].iloc[-1] < history["train_recon"].iloc[0]


def test_re_learns_and_counterfactuals_differ(split):
    sdata, s = split
    model = ScMEDALRE(REConfig(latent_dim=8), _train(max_epochs=8))
    history = model.fit(sdata)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["train_kl"].gt(0).all()
    cf = model.counterfactuals(sdata, s.test)
    assert list(cf) == sdata.batch_names
    a, b = cf.values()
    assert a.shape == b.shape == (len(s.test), sdata.n_genes)
    assert not np.allclose(a, b)
    # the counterfactual for a cell's own batch is its ordinary reconstruction
    own = model.reconstruct(sdata, s.test)
    first = sdata.batch[s.test] == 0
    np.testing.assert_allclose(a[first], own[first], rtol=1e-5, atol=1e-6)


def test_re_module_kl_sums_blocks():
    module = RandomEffectsModule(20, 3, hidden=(8, 4), latent_dim=2)
    blocks = [*module.enc_re, *module.dec_re]
    assert len(blocks) == 4
    assert module.kl().item() == pytest.approx(sum(b.kl().item() for b in blocks), rel=1e-6)


def test_mixed_run_layout_and_mec(tmp_path, cellbench3_path):
    cfg = yaml.safe_load((REPO / "examples" / "cellbench_3cl_platforms_mixed.yaml").read_text())
    cfg["dataset"]["path"] = str(cellbench3_path)
    cfg["preprocess"]["n_top_genes"] = 500
    cfg["training"].update(max_epochs=6, patience=0)
    cfg["models"] = [m for m in cfg["models"] if m["type"] in ("fe", "re", "mec")]
    cfg["evaluation"]["figures"] = False
    cfg["output"]["dir"] = str(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "cellbench_3cl_platforms_outputs" / "latent_space" / "kfold"
    split = root / "scMEDAL-RE" / "run1" / "splits_1"
    order = pd.read_csv(split / "counterfactual_batches_test.csv")
    assert list(order["batch"]) == ["CELseq2", "Dropseq"] or len(order) == 2
    recon = np.load(split / "recon_test.npy")
    for file in order["file"]:
        assert np.load(split / file).shape == recon.shape
    assert not (split.parent.parent.parent / "scMEDAL-FE" / "run1" / "splits_1" / "counterfactual_batches_test.csv").exists()
    for mec in ("MEC-FE", "MEC-FE+RE"):
        run = root / mec / "run1"
        metrics = pd.read_csv(run / "metrics_allfolds_95CI.csv")
        test = metrics[(metrics["part"] == "test") & (metrics["metric"] == "balanced_accuracy")].set_index("classifier")
        assert test.loc["rf", "mean"] > test.loc["dummy", "mean"] + 0.2
        assert {"ci_low", "ci_high"} <= set(test.columns)
        preds = pd.read_csv(run / "splits_1" / "y_pred_test.csv")
        assert list(preds.columns) == ["cell_id", "y_true", "rf", "svm", "ffn", "dummy"]
    # genomaps of inputs, reconstructions and RE counterfactuals in `scatlas compare`
    labels = sorted(set(pd.read_csv(split / "obs_test.csv")["label"].astype(str)))[:2]
    args = ["compare", str(tmp_path), "--no-umaps", "--genomaps", *sum((["--genomap-label", lab] for lab in labels), [])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    compared = tmp_path / "cellbench_3cl_platforms_outputs" / "compare_models" / "kfold" / "run1"
    layout = pd.read_csv(compared / "genomap_layout.csv")
    assert layout[["row", "col"]].drop_duplicates().shape[0] == len(layout)  # one gene per pixel
    assert (compared / "genomaps_scMEDAL-RE.png").exists() and (compared / "genomaps_scMEDAL-FE.png").exists()
    assert "genomaps_scMEDAL-RE" in (compared / "report.html").read_text()
    bad = CliRunner().invoke(app, ["compare", str(tmp_path), "--no-umaps", "--genomaps", "--genomap-label", "no such cell"])
    assert bad.exit_code == 2 and "no such cell" in bad.output


def test_mec_reference_must_come_first(tmp_path, cellbench3_path):
    cfg = {
        "dataset": {"name": "x", "path": str(cellbench3_path), "batch_key": "batch", "label_key": "cell_line"},
        "models": [{"type": "mec", "fixed": "FE"}, {"type": "fe"}],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "must be models listed before it" in result.output
