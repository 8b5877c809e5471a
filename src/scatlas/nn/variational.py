"""Batch-specific Bayesian (variational) layers for random effects (scMEDAL-RE)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def normal_kl(mu: torch.Tensor, sd: torch.Tensor, prior_sd: float) -> torch.Tensor:
    """KL( N(mu, sd²) ‖ N(0, prior_sd²) ), summed over all elements (closed form).

    ``log(prior_sd / sd) + (sd² + mu²) / (2 prior_sd²) − 1/2`` per element.
    """
    return (math.log(prior_sd) - torch.log(sd) + (sd**2 + mu**2) / (2 * prior_sd**2) - 0.5).sum()


class VariationalLinear(nn.Module):
    """Bias-free linear map ``z ↦ z W`` with a mean-field Normal posterior over ``W``.

    Parameters
    ----------
    n_in, n_out
        Shape of ``W`` (``n_in`` = number of batches for a one-hot ``z``).
    prior_sd
        Standard deviation of the N(0, prior_sd²) prior.
    init_mean_sd
        Posterior means start as N(0, init_mean_sd²).
    init_sd
        Posterior standard deviation at initialisation (``1e-5 + softplus(rho)``).

    Notes
    -----
    In training mode each forward pass draws one sample of ``W`` (reparameterised);
    in evaluation mode it uses the posterior mean.
    """

    def __init__(self, n_in: int, n_out: int, prior_sd: float = 0.25, init_mean_sd: float = 0.1, init_sd: float = 0.01) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(n_in, n_out) * init_mean_sd)
        self.rho = nn.Parameter(torch.full((n_in, n_out), math.log(math.expm1(init_sd - 1e-5))))
        self.prior_sd = prior_sd

    @property
    def sd(self) -> torch.Tensor:
        """Posterior standard deviations."""
        return 1e-5 + F.softplus(self.rho)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z W`` with ``W`` sampled (training) or at its mean (evaluation)."""
        weight = self.mu + self.sd * torch.randn_like(self.mu) if self.training else self.mu
        return z @ weight

    def kl(self) -> torch.Tensor:
        """KL of the posterior from the prior."""
        return normal_kl(self.mu, self.sd, self.prior_sd)


class RandomEffectBlock(nn.Module):
    """``BN(h) · (1 + γ(z)) + β(z)`` with batch-specific variational ``γ = z W_γ`` and ``β = z W_β``.

    Parameters
    ----------
    n_features
        Width of ``h``.
    n_batches
        Width of the one-hot batch ``z``.
    prior_sd
        Prior standard deviation of ``W_γ`` and ``W_β``.
    """

    def __init__(self, n_features: int, n_batches: int, prior_sd: float = 0.25) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(n_features)
        self.gamma = VariationalLinear(n_batches, n_features, prior_sd)
        self.beta = VariationalLinear(n_batches, n_features, prior_sd)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Apply the batch-specific scale and shift to the normalised ``h``."""
        return self.norm(h) * (1 + self.gamma(z)) + self.beta(z)

    def kl(self) -> torch.Tensor:
        """KL of both variational weights."""
        return self.gamma.kl() + self.beta.kl()


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``−scale`` backward (Ganin & Lempitsky 2015)."""
    return _GradReverse.apply(x, scale)
