"""Loss functions shared by the models."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def hierarchical_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    reachability: torch.Tensor,
    weight: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hierarchical cross-entropy over an ontology (scTab-based HCE), with per-source label meaning.

    ``q_y`` = probability mass on the classes that satisfy the target ``y`` (``y`` and the
    descendants its row of the reachability matrix allows); loss ``= NLL(log q, target)`` with
    optional class weights (weighted mean, as ``F.nll_loss``). ``log q`` is a log-sum-exp of
    log-probabilities, so a target whose row holds only itself gives cross-entropy exactly.

    Parameters
    ----------
    logits
        ``(n, n_classes)`` scores.
    target
        ``(n,)`` class indices (may be internal nodes of the hierarchy).
    reachability
        ``(n_classes, n_classes)``, ``R[i, j] = 1`` when class ``j`` satisfies target ``i``; or
        ``(n_sources, n_classes, n_classes)``, one such matrix per source (see
        :func:`scatlas.ontology.source_reachability`).
    weight
        Per-class weights.
    source
        ``(n,)`` source index of each cell, for a per-source ``reachability`` (default: source 0).
    """
    R = reachability if reachability.dim() == 3 else reachability[None]
    src = source if source is not None else torch.zeros_like(target)
    satisfies = R[src, target] > 0
    log_p = F.log_softmax(logits, dim=1)
    log_q = torch.logsumexp(log_p.masked_fill(~satisfies, float("-inf")), dim=1)
    return F.nll_loss(log_p.scatter(1, target[:, None], log_q[:, None]), target, weight=weight)


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
