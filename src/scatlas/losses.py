"""Loss functions shared by the models."""

from __future__ import annotations

import math

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
    return F.nll_loss(log_p.scatter(1, target[:, None], log_q[:, None]), target, weight=None if weight is None else weight.to(logits.dtype))


def one_vs_rest_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    reachability: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-vs-rest cross-entropy (a binary cross-entropy per class, summed), optionally hierarchical.

    Each class ``j`` has its own probability ``σ(z_j)``, as in scikit-learn's and CellTypist's
    one-vs-rest logistic regression. For a target ``y`` whose satisfying classes (its row of the
    reachability matrix) are ``P``, the cell's loss is ``-log(1 - Π_{j∈P} (1 - σ_j)) - Σ_{j∉P}
    log(1 - σ_j)``: some class of ``P`` is on, every other class is off. Without a reachability
    matrix, or for a target whose row holds only itself, it is the sum of the binary
    cross-entropies against the one-hot target (computed as such: equal to the bit). The mean over cells is weighted by ``weight[y]``
    (as ``F.nll_loss``).

    Parameters
    ----------
    logits
        ``(n, n_classes)`` scores ``z``.
    target
        ``(n,)`` class indices.
    reachability, source
        As for :func:`hierarchical_cross_entropy` (``None``: ordinary one-vs-rest).
    weight
        Per-class weights.
    """
    per_cell = F.softplus(logits).sum(1) - logits.gather(1, target[:, None])[:, 0]  # Σ_j -log(1 - σ_j), the target's term -log σ_y
    if reachability is not None:
        R = reachability if reachability.dim() == 3 else reachability[None]
        satisfies = R[source if source is not None else torch.zeros_like(target), target] > 0
        nested = satisfies.sum(1) > 1  # elsewhere only the target satisfies itself: exactly the one-hot loss
        if bool(nested.any()):
            log_off = F.logsigmoid(-logits)  # log(1 - σ)
            all_off = log_off.masked_fill(~satisfies, 0.0).sum(1)  # log Π_{P} (1 - σ_j) < 0
            per_cell = torch.where(nested, -_log1mexp(all_off) - log_off.masked_fill(satisfies, 0.0).sum(1), per_cell)
    w = torch.ones_like(per_cell) if weight is None else weight.to(per_cell.dtype)[target]
    return (w * per_cell).sum() / w.sum()


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, accurate at both ends (Mächler 2012); each branch sees only its own inputs."""
    cut = -math.log(2.0)
    near = torch.log(-torch.expm1(a.clamp(min=cut, max=-torch.finfo(a.dtype).tiny)))
    far = torch.log1p(-torch.exp(a.clamp(max=cut)))
    return torch.where(a > cut, near, far)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Ordinary (optionally class-weighted) cross-entropy."""
    return F.cross_entropy(logits, target, weight=None if weight is None else weight.to(logits.dtype))


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
