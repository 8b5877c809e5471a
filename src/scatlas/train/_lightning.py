"""The engine's Lightning executor: the plan, its callbacks and the trainer (see :mod:`scatlas.train`)."""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from torch import nn

from scatlas.data.loaders import Batch, CSRLoader, with_dense_x
from scatlas.train._config import EpochSums, TrainConfig, optimizer_and_schedule, resolve_device

for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*is an invalid value for `num_workers`.*")
warnings.filterwarnings("ignore", message=".*You defined a `validation_step` but have no `val_dataloader`.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# the epoch means are summed over ranks before they are logged (``_log_epoch``), so sync_dist would only repeat that
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


class TrainingPlan(L.LightningModule):
    """Train an ``nn.Module`` whose ``loss(batch)`` returns a dict of scalar tensors.

    Parameters
    ----------
    module
        The model. ``module.loss(batch)`` gets a batch with a dense ``"x"`` tensor and
        the loader's covariates; it returns ``{"loss": total, <term>: value, ...}``.
    lr
        Learning rate (Adam / AdamW).
    weight_decay
        Weight decay (AdamW when > 0).
    """

    def __init__(self, module: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, lr_decay: float | None = None) -> None:
        super().__init__()
        self.module = module
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_decay = lr_decay
        self.epoch_sums = EpochSums()

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Densify the CSR minibatch on the device it was moved to."""
        return with_dense_x(batch)

    def _log_terms(self, prefix: str, terms: dict[str, torch.Tensor], n: int) -> None:
        """Add a minibatch's terms (weighted by its ``n`` cells) to the epoch's sums; :meth:`_log_epoch` logs their means once."""
        self.epoch_sums.add(prefix, terms, n)

    def _log_epoch(self, prefix: str) -> None:
        """Log the epoch means of the ``prefix`` terms (summed over every rank under DDP) and start the next epoch's sums."""
        sums, cells = self.epoch_sums.pop(prefix)
        if cells is None:
            return
        if self.trainer.world_size > 1:
            cells = self.trainer.strategy.reduce(cells.to(self.device), reduce_op="sum")
            sums = {key: self.trainer.strategy.reduce(total, reduce_op="sum") for key, total in sums.items()}
        for key, total in sums.items():
            self.log(f"{prefix}_{key}", total / cells.to(total.device), on_step=False, on_epoch=True, batch_size=1, prog_bar=key == "loss")

    def on_train_epoch_start(self) -> None:
        """Start the epoch's sums afresh (a resumed run replays the epoch from its start)."""
        self.epoch_sums.pop("train")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the training terms' epoch means after the epoch's last minibatch (before any epoch-end callback reads them)."""
        if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._log_epoch("train")

    def on_validation_epoch_start(self) -> None:
        """Start the validation sums afresh."""
        self.epoch_sums.pop("val")

    def on_validation_epoch_end(self) -> None:
        """Log the validation terms' epoch means."""
        self._log_epoch("val")

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """One optimisation step on ``module.loss``."""
        terms = self.module.loss(batch)
        self._log_terms("train", terms, batch["x"].shape[0])
        return terms["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Log validation losses (inference mode: dropout off, BN running stats)."""
        self._log_terms("val", self.module.loss(batch), batch["x"].shape[0])

    def configure_optimizers(self) -> Any:
        """Adam, or AdamW when ``weight_decay > 0``; with ``lr_decay``, ``StepLR(1, lr_decay)`` per epoch."""
        optimizer, schedule = optimizer_and_schedule(self.module.parameters(), self.lr, self.weight_decay, self.lr_decay)
        return optimizer if schedule is None else {"optimizer": optimizer, "lr_scheduler": schedule}


class History(Callback):
    """Collect the epoch-level logged metrics (``train_*``, ``val_*``) and the epoch's wall time into a table."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's clock."""
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the metrics of the epoch that just ended (validation included)."""
        if trainer.sanity_checking:
            return
        row = {"epoch": float(trainer.current_epoch)}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train_", "val_"))})
        row["epoch_time_s"] = time.perf_counter() - self._start  # after float(): the device has finished the epoch
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints so that resumed runs keep their earlier epochs."""
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the epochs recorded before a checkpoint."""
        self.rows = list(state_dict["rows"])

    def to_frame(self) -> pd.DataFrame:
        """One row per epoch."""
        return pd.DataFrame(self.rows)


class ResumeState(Callback):
    """Save and restore the random states in every checkpoint; give the training loader its epoch.

    Restored right after the checkpoint is loaded, i.e. where the interrupted run was at the end
    of the checkpointed epoch, so dropout, sampling and shuffling continue exactly as without the
    interruption.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Set the training loader's epoch (its shuffling is seeded by ``seed + epoch``)."""
        loader = trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        """Torch (CPU and CUDA), NumPy and Python random states, as tensors and plain values (loadable with ``weights_only``)."""
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                                 "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Put the saved random states back."""
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class ReleaseProcessGroup(Callback):
    """In a worker that this fit's ``ddp_spawn`` started, destroy the process group when the fit ends.

    The worker exits right after; gloo's threads, left to the exit, can abort it ("terminate called
    without an active exception", SIGABRT: seen once in CI, a known PyTorch hazard of exiting without
    ``destroy_process_group``). A process that launched itself (torchrun, ``ddp``) keeps its group for
    later fits, and so does any other process: e.g. a worker of the user's own multiprocessing whose
    group a fit without ``ddp_spawn`` shares.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Destroy the process group of a worker that this fit's spawn launcher started."""
        import multiprocessing

        import torch.distributed as dist
        from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

        spawned = isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher) and multiprocessing.parent_process() is not None
        if spawned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class LastCheckpoint(Checkpoint):
    """Write ``last.ckpt`` at the end of an epoch, at most every ``interval_s`` seconds, and when training ends.

    A ``Checkpoint`` subclass, so Lightning runs it after every other callback of the epoch (early
    stopping, best checkpoint, history): the file holds the epoch's complete state. When early
    stopping ended training, an ``early_stopped`` marker is written beside it, so a resumed run
    does not train another epoch (a run that reached ``max_epochs`` resumes to a larger one).
    """

    def __init__(self, directory: str | os.PathLike[str], interval_s: float) -> None:
        self.path = Path(directory) / "last.ckpt"
        self.interval_s = interval_s
        self._saved_at: float | None = None

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_at = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save when ``interval_s`` has passed since the last save (always after the first epoch)."""
        if self._saved_at is None or time.monotonic() - self._saved_at >= self.interval_s:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final state; mark it when early stopping ended training."""
        self._save(trainer)
        if trainer.is_global_zero and any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in trainer.callbacks):
            (self.path.parent / "early_stopped").touch()


def lightning_strategy(config: TrainConfig) -> str | Strategy:
    """``config.strategy`` for the Trainer: a registered DDP strategy is built with ``config.ddp_timeout_minutes``."""
    entry = StrategyRegistry[config.strategy] if config.strategy in StrategyRegistry else None
    if entry is not None and issubclass(entry["strategy"], DDPStrategy):
        return entry["strategy"](**entry["init_params"], timeout=timedelta(minutes=config.ddp_timeout_minutes))
    return config.strategy


@dataclass
class FitResult:
    """What :func:`fit` returns: the epoch history and the best checkpoint's path."""

    history: pd.DataFrame
    best_checkpoint: Path | None


def is_main_process() -> bool:
    """Whether this process writes outputs: rank 0 of a distributed launch (torchrun, SLURM), or the only process.

    Read from the launcher's environment (as Lightning does), so it is known before any trainer
    starts. Under ``ddp_spawn`` the calling process is the main one.
    """
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _progress_bar() -> Callback:
    try:
        import rich  # noqa: F401

        return RichProgressBar(leave=False)
    except ImportError:  # pragma: no cover - rich is a dependency
        return TQDMProgressBar()


def fit(
    plan: TrainingPlan,
    train: CSRLoader,
    val: CSRLoader | None,
    config: TrainConfig,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> FitResult:
    """Train ``plan`` with early stopping, checkpoints and history; end with the last epoch's weights, or the best epoch's (``config.restore_best``).

    Parameters
    ----------
    plan
        The training plan.
    train, val
        Minibatch loaders (``val`` may be ``None``: then no early stopping).
    config
        Trainer settings.
    checkpoint_dir
        Where ``last.ckpt`` (and, with ``config.restore_best``, ``best.ckpt``) go (``None``: no
        checkpoints on disk; ``best.ckpt`` then goes to a temporary directory).
    resume
        Continue from ``checkpoint_dir/last.ckpt`` if it exists (on CPU the result equals an
        uninterrupted run's to the bit); when early stopping had ended training, only reload.

    Returns
    -------
    The history (one row per epoch) and the best checkpoint's path (``None`` without ``restore_best``).
    """
    if config.restore_best and checkpoint_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return replace(_fit(plan, train, val, config, None, tmp, resume), best_checkpoint=None)  # the temporary file is gone
    return _fit(plan, train, val, config, checkpoint_dir, checkpoint_dir if config.restore_best else None, resume)


def _fit(plan: TrainingPlan, train: CSRLoader, val: CSRLoader | None, config: TrainConfig, checkpoint_dir: str | os.PathLike[str] | None,
         best_dir: str | os.PathLike[str] | None, resume: bool) -> FitResult:
    L.seed_everything(config.seed, workers=True, verbose=False)
    history = History()
    callbacks: list[Callback] = [history, ResumeState(), ReleaseProcessGroup()]
    monitor = config.monitor if val is not None else config.monitor.replace("val_", "train_")
    checkpoint: ModelCheckpoint | None = None
    if best_dir is not None:
        checkpoint = ModelCheckpoint(dirpath=best_dir, filename="best", monitor=monitor, mode=config.monitor_mode, save_top_k=1)
        callbacks.append(checkpoint)
    if checkpoint_dir is not None:
        callbacks.append(LastCheckpoint(checkpoint_dir, config.checkpoint_interval_s))
    if config.patience > 0 and val is not None:
        callbacks.append(EarlyStopping(monitor=monitor, patience=config.patience, mode=config.monitor_mode))
    if config.progress:
        callbacks.append(_progress_bar())
    trainer = L.Trainer(
        max_epochs=config.max_epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=lightning_strategy(config),
        num_nodes=config.num_nodes,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        deterministic="warn" if resolve_device(config.accelerator) == "cpu" else False,
        gradient_clip_val=config.gradient_clip,
        num_sanity_val_steps=0,
    )
    last = Path(checkpoint_dir) / "last.ckpt" if checkpoint_dir is not None else None
    if last is not None and not resume:
        (last.parent / "early_stopped").unlink(missing_ok=True)
    finished = resume and last is not None and last.exists() and (last.parent / "early_stopped").exists()
    if not finished:
        ckpt_path = str(last) if resume and last is not None and last.exists() else None
        trainer.fit(plan, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    if (finished or not history.rows) and last is not None and last.exists():  # training done earlier, or in spawned DDP workers
        saved = torch.load(last, map_location="cpu", weights_only=False)
        history.load_state_dict(saved["callbacks"].get("History", {"rows": []}))
        if checkpoint is not None:
            checkpoint.best_model_path = next((v["best_model_path"] for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint")), "")
        else:
            plan.load_state_dict(saved["state_dict"])  # the last epoch's weights
    best = Path(checkpoint.best_model_path) if checkpoint is not None and checkpoint.best_model_path else None
    if best is not None and best.exists():
        state = torch.load(best, map_location=plan.device, weights_only=False)["state_dict"]
        plan.load_state_dict(state)
    plan.eval()
    return FitResult(history=history.to_frame(), best_checkpoint=best)
