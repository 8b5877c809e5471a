"""The one training engine every neural model goes through, with two executors of the same steps.

* :class:`TrainConfig` — the settings; :func:`optimizer_and_schedule` and :class:`EpochSums` —
  the optimiser and the per-epoch loss means both executors use (``_config``, torch only).
* Lightning (``_lightning``, imported on first use of one of its names):

  * :class:`TrainingPlan` — a ``LightningModule`` around any ``nn.Module`` that implements
    ``loss(batch) -> dict`` (with a ``"loss"`` entry); it densifies CSR minibatches on the
    device, logs every loss term as ``train_<term>`` / ``val_<term>`` and builds the optimiser.
    Models with several optimisers subclass it.
  * :class:`History` — a callback that keeps one row per epoch (saved in checkpoints so a
    resumed run keeps its past).
  * :class:`ResumeState` / :class:`LastCheckpoint` — what makes a resumed run equal an
    uninterrupted one: ``last.ckpt`` is written at the end of an epoch (at most every
    ``checkpoint_interval_s`` seconds, and when training ends) with the weights, optimisers,
    loops, callbacks and the torch / NumPy / Python random states; the training loader's position
    is its epoch, set from the trainer at the start of every epoch.
  * :func:`fit` — trainer construction: early stopping on a metric the plan really logs, seeds,
    ``accelerator="auto"``, DDP. A fit ends with the last epoch's weights in every path that calls
    it; ``TrainConfig.restore_best`` instead restores the best epoch's (from ``best.ckpt``,
    written only when the monitored value improves).

* :func:`fit_in_process` (``_loop``) — the same fit of a plain :class:`TrainingPlan` without
  Lightning, where nothing of Lightning's is needed (:func:`runs_in_process`: one device, no
  checkpoints, no progress bar); its weights and history equal Lightning's to the bit, and a
  command that trains only such fits (``transfer``, ``annotate``) never imports Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scatlas._lazy import lazy_attributes
from scatlas.train._config import EpochSums, TrainConfig, adam, optimizer_and_schedule, resolve_device
from scatlas.train._loop import fit_in_process, runs_in_process

if TYPE_CHECKING:
    from scatlas.train._lightning import FitResult, History, LastCheckpoint, ResumeState, TrainingPlan, fit, is_main_process, lightning_strategy

_LIGHTNING = ("FitResult", "History", "LastCheckpoint", "ResumeState", "TrainingPlan", "fit", "is_main_process", "lightning_strategy")
__getattr__ = lazy_attributes(__name__, dict.fromkeys(_LIGHTNING, "_lightning"))


__all__ = ["EpochSums", "TrainConfig", "adam", "fit_in_process", "optimizer_and_schedule", "resolve_device", "runs_in_process", *_LIGHTNING]
