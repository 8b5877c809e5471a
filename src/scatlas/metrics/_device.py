"""Where metric computations run: the GPU when present, else the CPU."""

from __future__ import annotations

import torch


def metric_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
