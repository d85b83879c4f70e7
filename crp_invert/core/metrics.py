"""Exact AUROC and Mann-Whitney U statistics from ranks (functional, torch, any device).

Everything here works column-wise on ``[N, F]`` score matrices and accumulates in float64: ranks
are half-integers, so sums of ranks are exact integers (of doubled ranks) up to 2**53, and the AUC
``(R_pos - n(n+1)/2) / (n (N - n))`` is exact up to the final division. This is what makes the
AUC of a formula computable from one matrix product (see :mod:`crp_invert.search`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "RankedScores",
    "rank_scores",
    "midranks",
    "auc_from_rank_sums",
    "auroc",
    "mann_whitney_pvalue",
    "benjamini_hochberg",
    "ALTERNATIVES",
]

ALTERNATIVES = ("two-sided", "greater", "less")


class RankedScores(NamedTuple):
    """Midranks of a score matrix and what the Mann-Whitney test needs from its ties.

    Attributes
    ----------
    ranks : torch.Tensor
        ``[N, F]`` float64, 1-based ranks along dim 0, tied values get the mean of their ranks
        (a transposed view of ``[F, N]`` memory).
    tie_term : torch.Tensor
        ``[F]`` float64, ``sum(t**3 - t)`` over the groups of tied values of each column.
    """

    ranks: torch.Tensor
    tie_term: torch.Tensor


def _as_float_matrix(scores: torch.Tensor) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [N] or [N, F], got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.double()
    return scores


def rank_scores(scores: torch.Tensor) -> RankedScores:
    """Rank every column of ``scores`` with midranks for ties.

    Parameters
    ----------
    scores : torch.Tensor
        ``[N, F]`` (or ``[N]``) scores; each column is ranked independently.

    Returns
    -------
    RankedScores
        ``ranks`` ``[N, F]`` float64 and ``tie_term`` ``[F]`` float64.
    """
    scores = _as_float_matrix(scores)
    n_samples = scores.shape[0]
    # work on [F, N] rows: sorting and scanning contiguous memory is much faster than strided
    rows = scores.T.contiguous()
    sorted_scores, order = torch.sort(rows, dim=1, stable=True)
    del rows
    # positions in float64 (exact below 2**53) so that no integer tensor needs converting later
    position = torch.arange(n_samples, device=scores.device, dtype=torch.float64).expand_as(sorted_scores)

    # a tie group runs from its first to its last position in sorted order
    starts_group = torch.ones_like(sorted_scores, dtype=torch.bool)
    starts_group[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    del sorted_scores
    ends_group = torch.ones_like(starts_group)
    ends_group[:, :-1] = starts_group[:, 1:]
    first = torch.cummax(torch.where(starts_group, position, 0.0), dim=1).values
    last = torch.where(ends_group, position, float(n_samples)).flip(1).cummin(dim=1).values.flip(1)
    del starts_group, ends_group

    sorted_ranks = (first + last).mul_(0.5).add_(1.0)
    group_size = last.sub_(first).add_(1.0)
    # every member of a group of size t adds t**2 - 1, so the group adds t**3 - t
    tie_term = (group_size * group_size).sub_(1.0).sum(dim=1)
    del group_size, first, last

    ranks = torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)
    return RankedScores(ranks.T, tie_term)


def midranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks of every column of ``scores``, ties get the mean of their ranks (float64)."""
    return rank_scores(scores).ranks


def auc_from_rank_sums(
    rank_sum: torch.Tensor, n_positive: torch.Tensor, n_samples: int
) -> torch.Tensor:
    """AUROC from the sum of the ranks of the positive samples.

    ``AUC = (R - n (n + 1) / 2) / (n (N - n))``; where a mask has no positive or no negative
    sample the AUC is undefined and 0.5 is returned.

    Parameters
    ----------
    rank_sum : torch.Tensor
        Sum of the midranks of the positive samples (float64).
    n_positive : torch.Tensor
        Number of positive samples, broadcastable against ``rank_sum``.
    n_samples : int
        Number of samples ``N``.
    """
    n_positive = n_positive.to(torch.float64)
    n_negative = n_samples - n_positive
    u_statistic = rank_sum - n_positive * (n_positive + 1.0) * 0.5
    denominator = n_positive * n_negative
    safe = denominator > 0
    return torch.where(safe, u_statistic / torch.where(safe, denominator, 1.0), 0.5)


def _as_bool_labels(labels: torch.Tensor, n_samples: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] != n_samples:
        raise ValueError(
            f"labels must have shape [N] or [N, K] with N = {n_samples}, got {tuple(labels.shape)}"
        )
    if labels.dtype != torch.bool:
        if ((labels != 0) & (labels != 1)).any():
            raise ValueError("labels must be boolean or 0/1")
        labels = labels != 0
    return labels


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact AUROC of every score column against every label column (ties count one half).

    Parameters
    ----------
    scores : torch.Tensor
        ``[N, F]`` (or ``[N]``) scores.
    labels : torch.Tensor
        ``[N, K]`` (or ``[N]``) boolean (or 0/1) labels.

    Returns
    -------
    torch.Tensor
        ``[F, K]`` float64 AUCs; 0.5 where a label column has no positive or no negative sample.

    Examples
    --------
    >>> auroc(torch.tensor([0.1, 0.4, 0.4, 0.9]), torch.tensor([False, True, False, True]))
    tensor([[0.8750]], dtype=torch.float64)
    """
    scores = _as_float_matrix(scores)
    labels = _as_bool_labels(labels, scores.shape[0])
    ranks = midranks(scores)
    positives = labels.to(torch.float64)
    rank_sums = ranks.T @ positives  # [F, K]
    return auc_from_rank_sums(rank_sums, positives.sum(0)[None, :], scores.shape[0])


def mann_whitney_pvalue(
    auc: torch.Tensor,
    n_positive: torch.Tensor,
    n_samples: int,
    tie_term: torch.Tensor,
    alternative: str = "two-sided",
    use_continuity: bool = True,
) -> torch.Tensor:
    """Asymptotic Mann-Whitney U p-value with tie correction, from an AUC.

    Matches ``scipy.stats.mannwhitneyu(x, y, alternative=..., method="asymptotic")`` where ``x``
    are the scores of the positive samples and ``y`` those of the negative samples. Degenerate
    cases (no positive or negative sample, or all scores tied) give ``p = 1``.

    Parameters
    ----------
    auc : torch.Tensor
        AUCs, ``U1 = auc * n1 * n2``.
    n_positive : torch.Tensor
        Number of positive samples ``n1``, broadcastable against ``auc``.
    n_samples : int
        ``N = n1 + n2``.
    tie_term : torch.Tensor
        ``sum(t**3 - t)`` over tie groups of the scores (see :func:`rank_scores`), broadcastable.
    alternative : {"two-sided", "greater", "less"}
        "greater": positives score higher than negatives.
    use_continuity : bool
        Apply the continuity correction of 0.5 (scipy's default).
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    auc = auc.to(torch.float64)
    n1 = torch.as_tensor(n_positive, device=auc.device).to(torch.float64)
    n2 = n_samples - n1
    n_pairs = n1 * n2
    u1 = auc * n_pairs
    u2 = n_pairs - u1
    if alternative == "greater":
        u_statistic = u1
    elif alternative == "less":
        u_statistic = u2
    else:
        u_statistic = torch.maximum(u1, u2)
    tie_term = torch.as_tensor(tie_term, device=auc.device).to(torch.float64)
    n = float(n_samples)
    variance = n_pairs / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0))) if n > 1 else n_pairs * 0.0
    numerator = u_statistic - n_pairs * 0.5
    if use_continuity:
        numerator = numerator - 0.5
    valid = variance > 0
    z_score = numerator / torch.sqrt(torch.where(valid, variance, 1.0))
    p_value = 0.5 * torch.special.erfc(z_score / math.sqrt(2.0))
    if alternative == "two-sided":
        p_value = 2.0 * p_value
    p_value = torch.where(valid, p_value, 1.0)
    return p_value.clamp(0.0, 1.0)


def benjamini_hochberg(p_values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values) along ``dim``.

    Equal to ``scipy.stats.false_discovery_control(p, method="bh")``; NaNs are not allowed.
    """
    p_values = torch.as_tensor(p_values, dtype=torch.float64)
    if p_values.numel() == 0:
        return p_values.clone()
    p_moved = p_values.movedim(dim, -1)
    m = p_moved.shape[-1]
    sorted_p, order = torch.sort(p_moved, dim=-1)
    rank = torch.arange(1, m + 1, dtype=torch.float64, device=p_values.device)
    scaled = sorted_p * m / rank
    # running minimum from the largest p-value down keeps the q-values monotone
    adjusted = scaled.flip(-1).cummin(dim=-1).values.flip(-1).clamp(max=1.0)
    result = torch.empty_like(adjusted).scatter_(-1, order, adjusted)
    return result.movedim(-1, dim)

