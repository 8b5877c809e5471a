"""Loss functions shared by the models."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def hierarchical_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    reachability: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Hierarchical cross-entropy over an ontology (scTab-based HCE).

    ``p = softmax(logits)``, ``q = p · Rᵀ`` (``q_y`` = probability mass on ``y`` and its
    descendants), loss ``= NLL(log(q + eps), target)`` with optional class weights
    (weighted mean, as ``F.nll_loss``). For a leaf label it equals cross-entropy up to ``eps``.

    Parameters
    ----------
    logits
        ``(n, n_classes)`` scores.
    target
        ``(n,)`` class indices (may be internal nodes of the hierarchy).
    reachability
        ``(n_classes, n_classes)`` matrix, ``R[i, j] = 1`` if class ``j`` is ``i`` or a descendant.
    weight
        Per-class weights.
    eps
        Added inside the log.
    """
    q = F.softmax(logits, dim=1) @ reachability.T
    return F.nll_loss(torch.log(q + eps), target, weight=weight)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Ordinary (optionally class-weighted) cross-entropy."""
    return F.cross_entropy(logits, target, weight=weight)


def supervised_contrastive(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) on cosine similarities.

    For each anchor ``i`` with positives ``P(i)`` (same label, ``j ≠ i``):
    ``−1/|P(i)| Σ_{p∈P(i)} log( exp(s_ip/τ) / Σ_{a≠i} exp(s_ia/τ) )``, averaged over anchors
    that have at least one positive.
    """
    z = torch.nn.functional.normalize(embeddings, dim=1)
    logits = z @ z.T / temperature
    n = z.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positive.sum(1)
    has = n_pos > 0
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1)[has] / n_pos[has])
    return per_anchor.mean()
