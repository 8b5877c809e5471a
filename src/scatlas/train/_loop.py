"""The engine's in-process executor: a single-device fit of a plain plan without Lightning, equal to Lightning's to the bit.

Lightning costs a command about 2 s to import (most of it ``torch._dynamo``, which
``lightning.fabric`` loads) and about 1 ms per minibatch, which dominate fits of a few thousand
cells (a ``transfer`` or ``annotate train`` on a small reference). Where a fit needs nothing
Lightning adds (one device, no checkpoint on disk, no progress bar, the plain optimisation of
:class:`~scatlas.train.TrainingPlan`, ending with the last epoch's weights), this loop runs the
same steps in the same order: the seeds of ``seed_everything``, the loader's epoch, zero-grad →
``loss`` → backward → gradient-norm clip → optimiser step per minibatch, the epoch's validation in
inference mode, early stopping as Lightning's ``EarlyStopping`` (strict improvement, stop when not
finite), the learning-rate schedule per epoch. ``tests/test_models.py`` checks that weights and
history equal the Lightning trainer's to the bit. Unlike the Lightning path on a CPU, it does not
switch torch to its deterministic algorithms: that changes only CUDA kernels (the CPU ones these
models use are deterministic already), and ``torch.use_deterministic_algorithms`` imports
``torch._inductor`` (0.8 s).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from scatlas.data.loaders import Batch, with_dense_x
from scatlas.train._config import EpochSums, TrainConfig, optimizer_and_schedule, resolve_device

def runs_in_process(config: TrainConfig, checkpoint_dir: object | None) -> bool:
    """Whether a fit with ``config`` (writing checkpoints to ``checkpoint_dir``) needs nothing of Lightning's.

    That is: no checkpoint directory (so no resume), no progress bar, no best-epoch restore, the
    ``auto`` strategy on one node, at most one device (a CPU, or the only GPU), and no distributed
    launcher around the process.
    """
    one_device = config.devices in ("auto", 1, "1") and (resolve_device(config.accelerator) == "cpu" or torch.cuda.device_count() == 1)
    launched = "LOCAL_RANK" in os.environ or any(os.environ.get(name, "1") not in ("", "1") for name in ("WORLD_SIZE", "SLURM_NTASKS"))
    return (checkpoint_dir is None and not config.progress and not config.restore_best and config.strategy == "auto" and config.num_nodes == 1
            and one_device and not launched)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device) as ``lightning.seed_everything`` does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _epoch(module: nn.Module, batches: Iterable[Batch], sums: EpochSums, prefix: str, step: torch.optim.Optimizer | None,
           gradient_clip: float | None) -> None:
    """One pass of ``module.loss`` over ``batches``, its terms added to ``sums``; with ``step``, an optimisation step per minibatch."""
    params = [p for group in step.param_groups for p in group["params"]] if step is not None else []
    for raw in batches:
        batch = with_dense_x(raw)
        terms = module.loss(batch)
        sums.add(prefix, terms, batch["x"].shape[0])
        if step is None:
            continue
        step.zero_grad()
        terms["loss"].backward()
        if gradient_clip is not None:
            nn.utils.clip_grad_norm_(params, gradient_clip)
        step.step()


def fit_in_process(module: nn.Module, train: Iterable[Batch], val: Iterable[Batch] | None, config: TrainConfig) -> pd.DataFrame:
    """Train ``module`` as :func:`scatlas.train.fit` trains ``TrainingPlan(module, config.lr, config.weight_decay, config.lr_decay)``; end in eval mode.

    Parameters
    ----------
    module
        The model; ``module.loss(batch)`` returns ``{"loss": total, <term>: value, ...}``.
    train, val
        Minibatch loaders (``val`` may be ``None``: then no early stopping).
    config
        Trainer settings (:func:`runs_in_process` must hold), the optimiser's included
        (:func:`~scatlas.train._config.optimizer_and_schedule`).

    Returns
    -------
    One row per epoch: ``epoch``, the ``train_<term>`` and ``val_<term>`` means, ``epoch_time_s``.
    """
    seed_everything(config.seed)
    module.to(resolve_device(config.accelerator))
    optimizer, schedule = optimizer_and_schedule(module.parameters(), config.lr, config.weight_decay, config.lr_decay)
    sums, rows = EpochSums(), []
    sign = 1.0 if config.monitor_mode == "min" else -1.0
    best, wait = math.inf, 0
    monitor = config.monitor
    for epoch in range(config.max_epochs):
        start = time.perf_counter()
        module.train()
        if hasattr(train, "set_epoch"):
            train.set_epoch(epoch)
        _epoch(module, train, sums, "train", optimizer, config.gradient_clip)
        means = sums.means("train")
        stop = False
        if val is not None:
            module.eval()
            with torch.inference_mode():
                _epoch(module, val, sums, "val", None, None)
            means = {**sums.means("val"), **means}  # Lightning's order of the columns
            if config.patience > 0:
                current = float(means[monitor])
                if not math.isfinite(current):
                    stop = True
                elif sign * current < best:
                    best, wait = sign * current, 0
                else:
                    wait += 1
                    stop = wait >= config.patience
        if schedule is not None:
            schedule.step()
        rows.append({"epoch": float(epoch), **{key: float(value) for key, value in means.items()}, "epoch_time_s": time.perf_counter() - start})
        if stop:
            break
    module.eval()
    return pd.DataFrame(rows)
