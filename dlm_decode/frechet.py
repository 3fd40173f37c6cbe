"""Pure tensor functions shared by the commit rules, tests, plots and plugins.

Notation (the [Commit rules](../concepts/rules.md) page): sort a row's masked confidences so that
``c(1) ≥ c(2) ≥ …``; ``n``
is a prefix size, ``n = 1 … m``.

* ``L_n = max(0, Σ_{j≤n} c(j) − (n − 1))`` — Fréchet lower bound on the joint correctness
  of the top ``n`` tokens;
* ``U_n = 1 − c(n)`` — upper bound on the best competitor;
* ``G_n = L_n − U_n`` — the Fréchet score; ``frechet`` commits the largest ``n`` with
  ``G_n > δ``;
* ``F_n = (n + 1) c(n) − n`` — the factor core (``factor`` commits while
  ``(n + 1)(1 − c(n)) < f``, i.e. ``F_n > 1 − f``);
* ``B_n = Σ_{j<n} (c(j) − c(n)) ≥ 0`` — the heterogeneity bonus.

Identity: ``G_n = max(F_n + B_n, c(n) − 1)``; the second term only matters where the
clamp in ``L_n`` is active, and there ``G_n ≤ 0`` so no rule with ``δ ≥ 0`` commits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "FrechetScores",
    "commit_best_if_none",
    "commit_top_n",
    "count_true_prefix",
    "frechet_gap",
    "frechet_scores",
    "masked_ranks",
    "sorted_profile",
]


class FrechetScores(NamedTuple):
    """The per-prefix scores of a sorted profile; every field is ``(..., L)``.

    Index ``n - 1`` holds the score of prefix size ``n``.
    """

    lower: torch.Tensor
    """``L_n``, the Fréchet lower bound on joint correctness."""
    upper: torch.Tensor
    """``U_n = 1 − c(n)``, the competitor's upper bound."""
    gap: torch.Tensor
    """``G_n = L_n − U_n``."""
    factor_core: torch.Tensor
    """``F_n = (n + 1) c(n) − n``."""
    bonus: torch.Tensor
    """``B_n = Σ_{j<n} (c(j) − c(n))``."""


def frechet_scores(sorted_conf: torch.Tensor) -> FrechetScores:
    """Compute ``L_n, U_n, G_n, F_n, B_n`` for every prefix of sorted profiles.

    Args:
        sorted_conf: ``(..., L)`` confidences sorted descending along the last axis.

    Returns:
        A [`FrechetScores`][dlm_decode.frechet.FrechetScores] of ``(..., L)`` tensors in the input's
        dtype.

    Examples:
        >>> import torch
        >>> s = frechet_scores(torch.tensor([0.99, 0.95, 0.82, 0.78, 0.74], dtype=torch.float64))
        >>> [round(g, 2) for g in s.gap.tolist()]
        [0.98, 0.89, 0.58, 0.32, 0.02]
    """
    c = sorted_conf
    n = torch.arange(1, c.shape[-1] + 1, device=c.device, dtype=c.dtype)  # (L,)
    csum = c.cumsum(-1)  # (..., L)
    lower = (csum - (n - 1)).clamp(min=0)
    upper = 1 - c
    gap = lower - upper
    factor_core = (n + 1) * c - n
    bonus = csum - n * c
    return FrechetScores(lower, upper, gap, factor_core, bonus)


def frechet_gap(sorted_conf: torch.Tensor) -> torch.Tensor:
    """Only ``G_n`` of [`frechet_scores`][dlm_decode.frechet.frechet_scores] (what the ``frechet``
    rule needs per step).

    Args:
        sorted_conf: ``(..., L)`` confidences sorted descending along the last axis.

    Returns:
        ``(..., L)`` ``G_n = max(0, Σ_{j≤n} c(j) − (n − 1)) − (1 − c(n))``.
    """
    c = sorted_conf
    n_minus_1 = torch.arange(c.shape[-1], device=c.device, dtype=c.dtype)  # (L,)
    return (c.cumsum(-1) - n_minus_1).clamp(min=0) - (1 - c)  # (..., L)


def sorted_profile(
    confidence: torch.Tensor, masked: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort each row's masked confidences descending; unmasked entries go last as 0.

    Args:
        confidence: ``(B, L)`` float confidences.
        masked: ``(B, L)`` bool, true where the position is masked.

    Returns:
        ``sorted_conf`` ``(B, L)`` (0 past each row's masked count), ``valid`` ``(B, L)``
        bool (true for the first ``m_b`` entries of row ``b``) and ``order`` ``(B, L)``
        long, the original column of each sorted entry. Ties keep column order.
    """
    # Unmasked entries sort below every valid confidence (which lie in [0, 1]).
    keyed = torch.where(masked, confidence, torch.full_like(confidence, -1.0))
    sorted_keyed, order = torch.sort(keyed, dim=-1, descending=True, stable=True)
    m = masked.sum(-1, keepdim=True)  # (B, 1)
    ranks = torch.arange(confidence.shape[-1], device=confidence.device)  # (L,)
    valid = ranks < m  # (B, L)
    sorted_conf = torch.where(valid, sorted_keyed, torch.zeros_like(sorted_keyed))
    return sorted_conf, valid, order


def count_true_prefix(cond: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Count positions where ``cond & valid`` (rules whose condition is monotone in ``n``).

    For a condition that holds on a prefix of ``n`` (every built-in rule), this count is the
    largest ``n`` that satisfies it.

    Args:
        cond: ``(B, L)`` bool condition per prefix size.
        valid: ``(B, L)`` bool valid prefix sizes.

    Returns:
        ``(B,)`` long counts.
    """
    return (cond & valid).sum(-1)


def commit_top_n(n: torch.Tensor, masked: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Build the commit mask of the ``n_b`` most confident masked positions of each row.

    ``n`` is clamped to ``[1, m_b]`` (0 in rows with nothing masked).

    Args:
        n: ``(B,)`` counts.
        masked: ``(B, L)`` bool masked positions.
        order: ``(B, L)`` long, from [`sorted_profile`][dlm_decode.frechet.sorted_profile].

    Returns:
        ``(B, L)`` bool commit mask.
    """
    m = masked.sum(-1)  # (B,)
    n = torch.minimum(n.clamp(min=1), m)  # (B,)
    ranks = torch.arange(masked.shape[-1], device=masked.device)  # (L,)
    take_sorted = ranks < n.unsqueeze(-1)  # (B, L) in sorted order
    commit = torch.zeros_like(masked)
    commit.scatter_(-1, order, take_sorted)
    return commit & masked


def masked_ranks(
    score: torch.Tensor, masked: torch.Tensor, descending: bool = True
) -> torch.Tensor:
    """Each masked position's rank by ``score`` within its row (0 = best); unmasked
    positions rank after every masked one. Ties keep column order.

    Args:
        score: ``(B, L)`` float, any range.
        masked: ``(B, L)`` bool, the positions that take part.
        descending: rank the highest score first (else the lowest).

    Returns:
        ``(B, L)`` long ranks.
    """
    fill = float("-inf") if descending else float("inf")
    keyed = torch.where(masked, score.float(), torch.full_like(score, fill, dtype=torch.float32))
    order = torch.sort(keyed, dim=-1, descending=descending, stable=True).indices  # (B, L)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def commit_best_if_none(
    commit: torch.Tensor, score: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """``commit & masked``, plus the best-scoring masked position in every row that has a
    masked position but commits none (the "at least one" rule of the threshold family).

    Args:
        commit: ``(B, L)`` bool candidate commits.
        score: ``(B, L)`` float, higher is better.
        masked: ``(B, L)`` bool.

    Returns:
        ``(B, L)`` bool.
    """
    commit = commit & masked
    best = masked_ranks(score, masked) == 0  # (B, L), one per row
    empty = ~commit.any(-1, keepdim=True) & masked.any(-1, keepdim=True)  # (B, 1)
    return commit | (best & empty & masked)
