"""TabNet (Arik & Pfister 2021) as scTab configures it: attentive feature selection with entmax masks.

Our own compact implementation so that it trains with scatlas' engine and loaders:
ghost batch norm (virtual batches), GLU feature transformers (shared + step-specific),
attentive transformers with a relaxation prior ``γ``, sparsemax or 1.5-entmax masks and
the entropy sparsity regulariser.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _threshold_shape(z: torch.Tensor, dim: int) -> torch.Tensor:
    rho = torch.arange(1, z.shape[dim] + 1, device=z.device, dtype=z.dtype)
    shape = [1] * z.dim()
    shape[dim] = -1
    return rho.view(shape)


class _Sparsemax(torch.autograd.Function):
    """Sparsemax forward (sort-based threshold) with its closed-form backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:  # type: ignore[override]
        z = x - x.max(dim=dim, keepdim=True).values
        srt = torch.sort(z, dim=dim, descending=True).values
        k = _threshold_shape(z, dim)
        cumsum = srt.cumsum(dim) - 1
        support = (k * srt > cumsum).sum(dim=dim, keepdim=True).clamp(min=1)
        tau = cumsum.gather(dim, support - 1) / support.to(z.dtype)
        y = torch.clamp(z - tau, min=0)
        ctx.dim = dim
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        on = y > 0
        g = grad * on
        mean = g.sum(ctx.dim, keepdim=True) / on.sum(ctx.dim, keepdim=True).clamp(min=1)
        return (g - mean) * on, None


class _Entmax15(torch.autograd.Function):
    """1.5-entmax forward (exact sort-based threshold) with its closed-form backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:  # type: ignore[override]
        z = (x - x.max(dim=dim, keepdim=True).values) / 2
        srt = torch.sort(z, dim=dim, descending=True).values
        rho = _threshold_shape(z, dim)
        mean = srt.cumsum(dim) / rho
        mean_sq = (srt**2).cumsum(dim) / rho
        delta = (1 - rho * (mean_sq - mean**2)) / rho
        tau = mean - torch.sqrt(torch.clamp(delta, min=0))
        support = (tau <= srt).sum(dim=dim, keepdim=True).clamp(min=1)
        y = torch.clamp(z - tau.gather(dim, support - 1), min=0) ** 2
        ctx.dim = dim
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        root = y.sqrt()
        g = grad * root
        q = g.sum(ctx.dim, keepdim=True) / root.sum(ctx.dim, keepdim=True)
        return g - q * root, None


def sparsemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo 2016): Euclidean projection onto the simplex."""
    return _Sparsemax.apply(x, dim)


def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax (Peters et al. 2019): sparse like sparsemax, smoother like softmax."""
    return _Entmax15.apply(x, dim)


class GhostBatchNorm(nn.Module):
    """Batch norm over virtual batches of ``virtual_batch_size`` cells (Hoffer et al. 2017)."""

    def __init__(self, n_features: int, virtual_batch_size: int = 256, momentum: float = 0.02) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(n_features, momentum=momentum)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each virtual batch (training) or with running statistics (evaluation)."""
        if not self.training or x.shape[0] <= self.virtual_batch_size:
            return self.bn(x)
        chunks = x.split(self.virtual_batch_size, dim=0)
        if chunks[-1].shape[0] == 1:  # BN cannot normalise one cell
            chunks = (*chunks[:-2], torch.cat(chunks[-2:]))
        return torch.cat([self.bn(c) for c in chunks], dim=0)


class GLULayer(nn.Module):
    """Linear → ghost BN → GLU."""

    def __init__(self, n_in: int, n_out: int, fc: nn.Linear | None, virtual_batch_size: int) -> None:
        super().__init__()
        self.fc = fc if fc is not None else nn.Linear(n_in, 2 * n_out, bias=False)
        self.bn = GhostBatchNorm(2 * n_out, virtual_batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """GLU of the normalised projection."""
        return F.glu(self.bn(self.fc(x)), dim=-1)


class FeatureTransformer(nn.Module):
    """Shared then step-specific GLU layers with √0.5-scaled residuals."""

    def __init__(self, n_in: int, n_out: int, shared: nn.ModuleList, n_independent: int, virtual_batch_size: int) -> None:
        super().__init__()
        layers = []
        for i, fc in enumerate(shared):
            layers.append(GLULayer(n_in if i == 0 else n_out, n_out, fc, virtual_batch_size))
        for i in range(n_independent):
            first = not layers and i == 0
            layers.append(GLULayer(n_in if first else n_out, n_out, None, virtual_batch_size))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the GLU stack."""
        scale = math.sqrt(0.5)
        x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = (x + layer(x)) * scale
        return x


class TabNet(nn.Module):
    """TabNet encoder and classification head.

    Parameters
    ----------
    n_features, n_classes
        Input and output widths.
    n_d, n_a
        Widths of the decision and attention parts.
    n_steps
        Decision steps (scTab: 1).
    gamma
        Relaxation of the feature-reuse prior.
    n_shared, n_independent
        GLU layers shared across steps / specific to each step.
    virtual_batch_size
        Ghost batch-norm size.
    mask
        ``entmax`` (1.5-entmax, scTab) or ``sparsemax``.
    """

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        n_d: int = 128,
        n_a: int = 64,
        n_steps: int = 1,
        gamma: float = 1.3,
        n_shared: int = 2,
        n_independent: int = 2,
        virtual_batch_size: int = 256,
        mask: str = "entmax",
    ) -> None:
        super().__init__()
        self.n_d, self.gamma = n_d, gamma
        self.input_bn = nn.BatchNorm1d(n_features, momentum=0.01)
        width = n_d + n_a
        shared = nn.ModuleList(nn.Linear(n_features if i == 0 else width, 2 * width, bias=False) for i in range(n_shared))
        self.initial = FeatureTransformer(n_features, width, shared, n_independent, virtual_batch_size)
        self.steps = nn.ModuleList(FeatureTransformer(n_features, width, shared, n_independent, virtual_batch_size) for _ in range(n_steps))
        self.attention = nn.ModuleList(
            nn.Sequential(nn.Linear(n_a, n_features, bias=False), GhostBatchNorm(n_features, virtual_batch_size)) for _ in range(n_steps)
        )
        self.mask_fn = entmax15 if mask == "entmax" else sparsemax
        self.head = nn.Linear(n_d, n_classes)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregated decision output ``(n, n_d)`` and the mask-entropy sparsity loss."""
        x = self.input_bn(x)
        prior = torch.ones_like(x)
        a = self.initial(x)[:, self.n_d :]
        out = torch.zeros(x.shape[0], self.n_d, device=x.device, dtype=x.dtype)
        sparsity = x.new_zeros(())
        for transformer, attention in zip(self.steps, self.attention, strict=True):
            mask = self.mask_fn(attention(a) * prior, dim=-1)
            prior = prior * (self.gamma - mask)
            sparsity = sparsity + (-mask * torch.log(mask + 1e-10)).sum(dim=1).mean() / len(self.steps)
            h = transformer(mask * x)
            out = out + F.relu(h[:, : self.n_d])
            a = h[:, self.n_d :]
        return out, sparsity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.encode(x)[0])
