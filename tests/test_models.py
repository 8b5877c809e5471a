"""AE / AEC and the training engine on real cells: learning, determinism, checkpoints, resume."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from scatlas.data.dataset import DatasetConfig, load_dataset
from scatlas.data.splits import kfold_splits
from scatlas.experiment.config import ExperimentConfig
from scatlas.experiment.runner import split_data
from scatlas.metrics import silhouette_score
from scatlas.models import AE, AEC, PCA, AutoencoderModule
from scatlas.models.autoencoder import AEConfig
from scatlas.models.pca import PCAConfig
from scatlas.train import TrainConfig


@pytest.fixture(scope="module")
def split(cellbench3_path):
    """CellBench 3 cell lines, CEL-seq2 vs Drop-seq: one k-fold split, 1,000 HVGs."""
    dataset = {"name": "cb3", "path": str(cellbench3_path), "batch_key": "batch", "label_key": "cell_line"}
    cfg = ExperimentConfig.model_validate({"dataset": dataset, "preprocess": {"n_top_genes": 1000}, "models": [{"type": "ae"}]})
    data = load_dataset(DatasetConfig(**dataset))
    s = kfold_splits(data.strata(), 3, seed=0)[0]
    return split_data(cfg, data, s), s, data


def _train(max_epochs=15, seed=0, patience=0):
    return TrainConfig(max_epochs=max_epochs, batch_size=64, lr=1e-3, patience=patience, seed=seed, progress=False, accelerator="cpu")


def test_ae_learns_and_separates_cell_lines(split):
    sdata, s, data = split
    model = AE(AEConfig(latent_dim=16), _train(max_epochs=20))
    history = model.fit(sdata)
    assert history["train_loss"].iloc[-1] < 0.7 * history["train_loss"].iloc[0]
    assert history["val_loss"].iloc[-1] < history["val_loss"].iloc[0]
    z = model.embed(sdata, s.test)
    assert z.shape == (len(s.test), 16)
    assert model.reconstruct(sdata, s.test).shape == (len(s.test), sdata.n_genes)
    assert silhouette_score(z, np.asarray(data.label)[s.test]) > 0.2


def test_aec_head_learns_cell_types(split):
    sdata, s, _ = split
    model = AEC(AEConfig(type="aec", latent_dim=16, class_weight=1.0), _train(max_epochs=15))
    history = model.fit(sdata)
    assert history["train_class"].iloc[-1] < 0.3 * history["train_class"].iloc[0]
    with torch.no_grad():
        logits = model.apply(sdata, s.test, "embed")
        pred = model.module.head(torch.as_tensor(logits)).argmax(1).numpy()
    assert (pred == sdata.label[s.test]).mean() > 0.9


def test_same_seed_same_latent_bit_for_bit(split):
    sdata, s, _ = split
    runs = [AE(AEConfig(latent_dim=8, dropout=0.1), _train(max_epochs=3, seed=7)) for _ in range(2)]
    for m in runs:
        m.fit(sdata)
    a, b = (m.embed(sdata, s.test) for m in runs)
    assert np.array_equal(a, b)
    other = AE(AEConfig(latent_dim=8, dropout=0.1), _train(max_epochs=3, seed=8))
    other.fit(sdata)
    assert not np.array_equal(a, other.embed(sdata, s.test))


def test_epoch_sums_log_what_per_step_logging_logs_to_the_bit(split, monkeypatch, tmp_path):
    """The engine sums each epoch's terms itself; Lightning's per-step ``self.log(on_epoch=True)`` gives the same means, bit for bit."""
    from scatlas.train import TrainingPlan

    sdata, _, _ = split
    ours = AE(AEConfig(latent_dim=8, dropout=0.1), _train(max_epochs=3, seed=3)).fit(sdata)

    def per_step(self, prefix, terms, n):
        for key, value in terms.items():
            self.log(f"{prefix}_{key}", value.detach(), on_step=False, on_epoch=True, batch_size=n)

    monkeypatch.setattr(TrainingPlan, "_log_terms", per_step)
    lightning = AE(AEConfig(latent_dim=8, dropout=0.1), _train(max_epochs=3, seed=3)).fit(sdata, checkpoint_dir=tmp_path)  # under Lightning
    columns = [c for c in ours.columns if c != "epoch_time_s"]
    assert set(columns) == {"epoch", "train_loss", "train_recon", "val_loss", "val_recon"}
    pd.testing.assert_frame_equal(ours[columns], lightning[sorted(columns, key=columns.index)], check_exact=True)


def test_checkpoints_and_resume(split, tmp_path):
    sdata, s, _ = split
    first = AE(AEConfig(latent_dim=8), _train(max_epochs=4))
    first.fit(sdata, checkpoint_dir=tmp_path)
    assert (tmp_path / "last.ckpt").exists() and not (tmp_path / "best.ckpt").exists()  # best.ckpt only with restore_best
    resumed = AE(AEConfig(latent_dim=8), _train(max_epochs=7))
    history = resumed.fit(sdata, checkpoint_dir=tmp_path, resume=True)
    assert list(history["epoch"]) == list(range(7))  # epochs 0-3 restored, 4-6 trained
    full = AE(AEConfig(latent_dim=8), _train(max_epochs=7))
    full_history = full.fit(sdata)
    np.testing.assert_allclose(history["train_loss"].iloc[:4], full_history["train_loss"].iloc[:4], rtol=1e-6)


def test_checkpoint_policy_best_on_improvement_last_by_interval(split, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from scatlas.train import LastCheckpoint

    sdata, s, _ = split
    saves: dict[str, int] = {"last": 0, "best": 0}
    real_last, real_best = LastCheckpoint._save, ModelCheckpoint._save_checkpoint

    def count_last(self, trainer):
        saves["last"] += 1
        real_last(self, trainer)

    def count_best(self, trainer, filepath):
        saves["best"] += 1
        real_best(self, trainer, filepath)

    monkeypatch.setattr(LastCheckpoint, "_save", count_last)
    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", count_best)
    config = TrainConfig(max_epochs=200, batch_size=64, lr=5e-2, patience=2, progress=False, accelerator="cpu", checkpoint_interval_s=1e9,
                         restore_best=True)
    model = AE(AEConfig(latent_dim=8), config)
    history = model.fit(sdata, checkpoint_dir=tmp_path)
    improved = int((history["val_loss"] < history["val_loss"].cummin().shift(fill_value=np.inf)).sum())
    assert len(history) < 200 and saves == {"last": 2, "best": improved}  # after epoch 0 and at the end; best only on improvement
    assert (tmp_path / "early_stopped").exists()
    latent = model.embed(sdata, s.test)
    again = AE(AEConfig(latent_dim=8), config)
    rehistory = again.fit(sdata, checkpoint_dir=tmp_path, resume=True)  # early stopping had ended it: reload, no training
    assert saves["last"] == 2
    pd.testing.assert_frame_equal(rehistory, history)
    np.testing.assert_array_equal(again.embed(sdata, s.test), latent)


def test_a_fit_ends_with_the_same_weights_whether_or_not_it_checkpoints(split, tmp_path):
    """`tl.embed` fits without checkpoints, `scatlas run` with them: both keep the last epoch, or both the best with restore_best."""
    sdata, s, _ = split
    config = TrainConfig(max_epochs=200, batch_size=64, lr=5e-2, patience=2, progress=False, accelerator="cpu")
    latents = {}
    for restore_best in (False, True):
        for where in (None, tmp_path / str(restore_best)):
            model = AE(AEConfig(latent_dim=8), replace(config, restore_best=restore_best))
            history = model.fit(sdata, checkpoint_dir=where)
            latents[restore_best, where is not None] = model.embed(sdata, s.test)
    assert len(history) < 200 and history["val_loss"].idxmin() < len(history) - 1  # early stopping: the last epoch is not the best
    np.testing.assert_array_equal(latents[False, False], latents[False, True])
    np.testing.assert_array_equal(latents[True, False], latents[True, True])
    assert not np.array_equal(latents[False, False], latents[True, False])


def test_in_process_fit_equals_lightnings_to_the_bit(split, tmp_path):
    """A fit that needs nothing of Lightning's runs in process (no Lightning import); weights and history equal the Lightning trainer's.

    The scTab MLP exercises every step: AdamW with weight decay, a per-epoch learning-rate decay,
    gradient-norm clipping, dropout, batch norm, class weights and early stopping.
    """
    from scatlas.models import MLPClassifier
    from scatlas.models.classifiers import MLPConfig
    from scatlas.train import runs_in_process

    sdata, s, _ = split
    config = TrainConfig(max_epochs=60, batch_size=64, lr=2e-3, weight_decay=0.05, lr_decay=0.9, gradient_clip=1.0, patience=2, progress=False,
                         accelerator="cpu")
    assert runs_in_process(config, None) and not runs_in_process(config, tmp_path) and not runs_in_process(replace(config, progress=True), None)
    fits = {}
    for where in (None, tmp_path):  # a checkpoint directory needs Lightning
        model = MLPClassifier(MLPConfig(hidden=[32, 32], dropout=0.2), config)
        fits[where is None] = model, model.fit(sdata, checkpoint_dir=where)
        assert (model.plan is None) == (where is None)
    (inproc, h_in), (light, h_light) = fits[True], fits[False]
    assert 2 < len(h_in) < 60  # early stopping ended it
    pd.testing.assert_frame_equal(h_in.drop(columns="epoch_time_s"), h_light.drop(columns="epoch_time_s"), check_exact=True)
    for (name, a), (_, b) in zip(inproc.module.state_dict().items(), light.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    np.testing.assert_array_equal(inproc.predict_proba(sdata, s.test), light.predict_proba(sdata, s.test))


def test_annotation_and_transfer_do_not_import_lightning():
    """Their fits run in process, so the CLI commands never pay Lightning's import (about 2 s, most of it torch._dynamo)."""
    code = ("import sys, scatlas.cli, scatlas.tl._annotation, scatlas.tl._transfer, scatlas.models, scatlas.train; "
            "scatlas.models.MLPClassifier; assert not [m for m in sys.modules if m.startswith('lightning')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_early_stopping_watches_logged_metric(split):
    sdata, _, _ = split
    model = AE(AEConfig(latent_dim=8), TrainConfig(max_epochs=200, batch_size=64, lr=5e-2, patience=2, progress=False, accelerator="cpu"))
    history = model.fit(sdata)
    assert len(history) < 200
    assert "val_loss" in history


def test_tied_decoder_shares_encoder_weights():
    module = AutoencoderModule(30, hidden=(16, 8), latent_dim=4, tied=True)
    untied = AutoencoderModule(30, hidden=(16, 8), latent_dim=4, tied=False)
    n_tied = sum(p.numel() for p in module.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_tied < n_untied
    batch = {"x": torch.rand(5, 30)}
    module.eval()
    out = module.reconstruct(batch)
    assert out.shape == (5, 30)
    module.loss({"x": torch.rand(5, 30)})["loss"].backward()
    assert module.encoder.linears[0].weight.grad is not None


def test_batch_aware_decoder_reads_the_batch_and_not_the_encoder():
    torch.manual_seed(0)
    module = AutoencoderModule(30, hidden=(16, 8), latent_dim=4, decoder_batches=3).eval()
    x = torch.rand(5, 30)
    as_batch = [module.reconstruct({"x": x, "batch": torch.full((5,), b)}) for b in range(3)]
    assert module.decoder.linears[0].in_features == 4 + 3
    assert not torch.allclose(as_batch[0], as_batch[1])  # the same latent decodes differently per batch
    # the latent itself does not depend on the batch
    assert torch.equal(module.embed({"x": x, "batch": torch.zeros(5, dtype=torch.long)}), module.embed({"x": x, "batch": torch.ones(5, dtype=torch.long)}))
    with pytest.raises(ValueError, match="decoder_batch"):
        AEConfig(tied=True, decoder_batch=True)


def test_pca_baseline_reconstructs(split):
    sdata, s, _ = split
    model = PCA(PCAConfig(n_components=20), _train())
    assert model.fit(sdata) is None
    recon = model.reconstruct(sdata, s.test)
    X = sdata.X[s.test].toarray()
    assert np.mean((recon - X) ** 2) < np.mean((X - X.mean(0)) ** 2)


def test_ddp_strategies_get_the_configured_timeout():
    """Registered DDP strategies are built with `ddp_timeout_minutes` (rank 0 may write outputs for long while the others wait); other names pass through."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from scatlas.settings import TrainingConfig
    from scatlas.train import lightning_strategy

    config = TrainingConfig(strategy="ddp_spawn", ddp_timeout_minutes=7).to_train_config(seed=0, progress=False)
    strategy = lightning_strategy(config)
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(minutes=7) and strategy._start_method == "spawn"
    assert lightning_strategy(TrainConfig(strategy="auto")) == "auto"


_OWN_GROUP_SCRIPT = """
import os, socket, sys
import torch.distributed as dist
import torch.multiprocessing as mp

def worker(rank, port, data):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    import anndata as ad, scatlas as sa
    sa.tl.embed(ad.read_h5ad(data), "ae", max_epochs=2, restore_best=True)  # restore_best: through the Lightning trainer
    print("group kept:", dist.is_initialized(), flush=True)

if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, sys.argv[1]), nprocs=1)
"""


def test_a_fit_in_a_users_own_worker_keeps_its_process_group(tmp_path):
    """Only a worker that the fit's own ddp_spawn started has its process group destroyed at the end (gloo's exit hazard);
    a user's multiprocessing worker running a one-process fit keeps the group it made."""
    from conftest import data_path

    script = tmp_path / "own_group.py"  # a file: spawned workers import the function from it
    script.write_text(_OWN_GROUP_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(data_path("scmerge_mesc_2batches.h5ad"))], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "group kept: True" in done.stdout
