"""What both executors of the engine share: the settings, the optimiser and the per-epoch means of the loss terms (torch only)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TrainConfig:
    """Trainer settings shared by every neural model.

    Attributes
    ----------
    max_epochs
        Upper bound on epochs.
    batch_size
        Cells per minibatch.
    lr
        Learning rate.
    weight_decay
        Weight decay (AdamW when > 0).
    lr_decay
        Multiply the learning rate by this factor after every epoch (``None``: constant).
    gradient_clip
        Clip the gradient norm to this value (``None``: no clipping).
    patience
        Early-stopping patience in epochs (0 disables early stopping).
    monitor
        Metric for early stopping (and ``restore_best``); must be logged by the plan.
    monitor_mode
        ``min`` (losses) or ``max`` (e.g. a validation mAP).
    restore_best
        End with the weights of the epoch with the best ``monitor`` value instead of the last
        epoch's. Off by default, in every path (``scatlas run``, ``tl.embed``, ``annotate``,
        ``transfer``): measured on held-out data, the last epoch's weights were as good or better
        for the embedding models and the classifiers (``benchmarks/RESULTS.md``). The set model of
        ``aggregate`` turns it on (it selects its epoch by validation mAP).
    accelerator
        Lightning accelerator (``auto`` uses a GPU when present).
    devices
        Lightning devices (e.g. ``4`` GPUs; ``2`` CPU processes with ``strategy: ddp_spawn``).
    strategy
        Lightning strategy (``auto``, ``ddp``, ``ddp_spawn``, ...); under DDP every rank streams
        its own shard of the cells.
    num_nodes
        Machines for multi-node DDP.
    ddp_timeout_minutes
        How long a DDP rank waits in a collective (PyTorch's default is 30 min). Under ``scatlas
        run`` the other ranks wait while rank 0 writes a split's outputs, which for millions of
        cells with figures can take longer.
    chunk_size
        Cells per chunk streamed to the device (``None``: all cells of the split at once).
    checkpoint_interval_s
        Smallest time between two writes of ``last.ckpt`` (written at epoch ends; 0: every epoch).
    keep_checkpoints
        Keep ``best.ckpt`` / ``last.ckpt`` once a split is finished (``scatlas run`` otherwise keeps
        only the weights, ``module.pt``).
    seed
        Seed for weights, dropout and shuffling.
    progress
        Show a progress bar.
    explicit
        The fields the user set (``None``: all of them, as when this class is built directly); a
        model's own training defaults (:meth:`~scatlas.models.base.EmbeddingModel.training_defaults`)
        replace only the others.
    """

    max_epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_decay: float | None = None
    gradient_clip: float | None = None
    patience: int = 10
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    restore_best: bool = False
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    ddp_timeout_minutes: float = 180.0
    chunk_size: int | None = None
    checkpoint_interval_s: float = 60.0
    keep_checkpoints: bool = False
    seed: int = 0
    progress: bool = True
    explicit: frozenset[str] | None = None


def resolve_device(accelerator: str) -> str:
    """Where loaders should put the data for ``accelerator``: ``"cuda"`` when it means a present GPU, else ``"cpu"``."""
    return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"


def adam(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0, decoupled: bool = True) -> torch.optim.Optimizer:
    """Adam (L2 ``weight_decay``) or AdamW (``decoupled``); the fused CUDA kernel when every parameter is on a GPU.

    The fused implementation updates all parameters in a few kernel launches instead of
    several per parameter, which matters when small minibatches make training launch-bound.
    """
    fused = bool(params) and all(p.is_cuda for p in params)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def optimizer_and_schedule(params: Iterable[nn.Parameter], lr: float, weight_decay: float,
                           lr_decay: float | None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam, or AdamW when ``weight_decay > 0``; with ``lr_decay``, ``StepLR(1, lr_decay)`` stepped once per epoch."""
    optimizer = adam(list(params), lr, weight_decay, decoupled=weight_decay > 0)
    schedule = None if lr_decay is None else torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=lr_decay)
    return optimizer, schedule


class EpochSums:
    """Per prefix (``train`` / ``val``), the sums ``Σ term · n`` of every loss term over an epoch's minibatches and their cell count.

    The sums are Lightning's own epoch reduction (``Σ value · n`` in the value's dtype over an
    integer cell count), so :meth:`means` equals a per-step ``self.log(..., on_epoch=True)`` to
    the bit, without its per-step cost (about 1 ms a minibatch on a CPU).
    """

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.cells: dict[str, torch.Tensor] = {}

    def add(self, prefix: str, terms: dict[str, torch.Tensor], n: int) -> None:
        """Add a minibatch's terms, weighted by its ``n`` cells."""
        sums = self.sums.setdefault(prefix, {})
        for key, value in terms.items():
            weighted = value.detach() * n
            sums[key] = sums[key] + weighted if key in sums else torch.zeros((), dtype=weighted.dtype, device=weighted.device) + weighted
        self.cells[prefix] = self.cells.get(prefix, torch.zeros((), dtype=torch.int64)) + n

    def pop(self, prefix: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The ``prefix`` sums and cell count so far (``None``: no minibatch), forgetting them."""
        return self.sums.pop(prefix, {}), self.cells.pop(prefix, None)

    def means(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{"<prefix>_<term>": Σ term · n / Σ n}`` of the epoch so far, forgetting its sums."""
        sums, cells = self.pop(prefix)
        return {} if cells is None else {f"{prefix}_{key}": total / cells.to(total.device) for key, total in sums.items()}
