"""Exact AUROC and Mann-Whitney U statistics from ranks (functional, torch, any device).

Everything here works column-wise on ``[N, F]`` score matrices and accumulates in float64: ranks
are half-integers, so sums of ranks are exact integers (of doubled ranks) up to 2**53, and the AUC
``(R_pos - n(n+1)/2) / (n (N - n))`` is exact up to the final division. This is what makes the
AUC of a formula computable from one matrix product (see :mod:`crp_invert.search`).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from .backend import device_kernels
from .scratch import Scratch

__all__ = [
    "RankedScores",
    "CompactRanks",
    "rank_scores",
    "compact_ranks",
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


class CompactRanks(NamedTuple):
    """Midranks in four bytes per value: what the beam search keeps of a score matrix.

    Attributes
    ----------
    doubled : torch.Tensor
        ``[F, N]`` int32, twice the 1-based midrank of every score (an integer in ``2..2N``: tied
        values share the mean of their ranks, a half-integer), feature-major.
    tie_term : torch.Tensor
        ``[F]`` float64, ``sum(t**3 - t)`` over the groups of tied values of each feature, summed
        exactly in int64 (rounded once to float64) while ``N < 2**21``.
    """

    doubled: torch.Tensor
    tie_term: torch.Tensor


# bytes per score that ranking one feature needs at most (its ranks, the thread's transposed scores, sort keys
# and order, group boundaries, the sorted ranks; 48.5 measured as peak RSS for float32 scores without ties at
# N = 1.28 M, see benchmarks/bench_memory.py): the working memory of a batch at N = 1.28 M (128 MiB with the
# CPU's default budget) then ranks two columns at once, one per core of a small machine
RANK_BYTES_PER_SAMPLE = 52


def compact_ranks(scores: torch.Tensor, features_per_chunk: int | None = None,
                  backend: str = "auto", scratch: Scratch | None = None) -> CompactRanks:
    """Doubled midranks ``[F, N]`` int32 and tie terms of every column of ``scores`` ``[N, F]``.

    Parameters
    ----------
    scores : torch.Tensor
        ``[N, F]`` (or ``[N]``) real scores, finite; each column is ranked independently.
    features_per_chunk : int, optional
        Rank this many columns at a time (default: all); the temporaries of a chunk take about
        :data:`RANK_BYTES_PER_SAMPLE` bytes per sample and column.
    backend : {"auto", "torch"}
        ``"auto"``: numpy radix sorts on the CPU, torch sorts elsewhere; ``"torch"``: torch sorts on any
        device (see :mod:`crp_invert.core.backend`). The ranks are the same.
    scratch : Scratch, optional
        Memory kept from batch to batch (:class:`~crp_invert.core.scratch.Scratch`) for the ranking's buffers
        and, on the CPU, the returned ranks: give ``doubled`` back to it when done with them.

    Examples
    --------
    >>> compact_ranks(torch.tensor([0.5, 0.1, 0.5, 0.9])).doubled
    tensor([[5, 2, 5, 8]], dtype=torch.int32)
    """
    scores = _as_float_matrix(scores)
    n_samples, n_features = scores.shape
    if 2 * n_samples >= 2 ** 31:
        raise ValueError(f"at most {2 ** 30 - 1} samples can be ranked, got N = {n_samples}")
    step = n_features if features_per_chunk is None else max(1, int(features_per_chunk))
    tie_term = torch.empty(n_features, dtype=torch.float64, device=scores.device)
    if not device_kernels(scores.device, backend):
        scratch = Scratch() if scratch is None else scratch
        doubled = scratch.take_tensor((n_features, n_samples), np.int32)
        _rank_columns_cpu(scores, doubled, tie_term, step, scratch)
        return CompactRanks(doubled, tie_term)
    doubled = torch.empty(n_features, n_samples, dtype=torch.int32, device=scores.device)
    for start in range(0, n_features, step):
        stop = min(start + step, n_features)
        _rank_rows(scores[:, start:stop].T, doubled[start:stop], tie_term[start:stop])
    return CompactRanks(doubled, tie_term)


def _radix_order(keys: np.ndarray) -> np.ndarray:
    """A sort order of unsigned integer keys: stable sorts of 16-bit digits, least significant first
    (numpy sorts 16-bit integers by radix)."""
    order = None
    for shift in range(0, 8 * keys.itemsize, 16):
        digit = ((keys >> keys.dtype.type(shift)) & keys.dtype.type(0xFFFF)).astype(np.uint16)
        if order is not None:
            digit = digit[order]
        step = np.argsort(digit, kind="stable")
        order = step if order is None else order[step]
    return order


# samples per block of the blocked transpose: the source rows of a block stay in the CPU's caches
_TRANSPOSE_ROWS = 16384


class _Workspace:
    """Buffers of one ranking thread, reused from column to column (and, from a caller's
    :class:`~crp_invert.core.scratch.Scratch`, from batch to batch).

    ``values`` holds up to ``width`` columns of scores, transposed (ranking destroys them); ``order`` and
    ``sorted_keys`` the outputs of the sort; ``starts`` the tie group boundaries.
    """

    def __init__(self, n_samples: int, width: int, dtype: np.dtype, scratch: Scratch) -> None:
        self.scratch = scratch
        self.values = scratch.take((width, n_samples), dtype)
        self.order = scratch.take_tensor((n_samples,), np.int64)
        self.starts = scratch.take((n_samples,), bool)
        self.sorted_keys: torch.Tensor | None = None

    def sort(self, keys: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Stable sort of non-negative integer keys (torch sorts them by radix): sorted keys and order."""
        if self.sorted_keys is None or self.sorted_keys.dtype != keys.dtype:
            if self.sorted_keys is not None:
                self.scratch.give(self.sorted_keys)
            self.sorted_keys = self.scratch.take_tensor((len(keys),), keys.numpy().dtype)
        torch.sort(keys, stable=True, out=(self.sorted_keys, self.order))
        return self.sorted_keys.numpy(), self.order.numpy()

    def transpose(self, columns: np.ndarray) -> np.ndarray:
        """``columns`` ``[N, w]`` copied into ``values[:w]`` as rows, one block of samples at a time (a strided
        column read alone would load a cache line per value)."""
        rows = self.values[:columns.shape[1]]
        for start in range(0, columns.shape[0], _TRANSPOSE_ROWS):
            rows[:, start:start + _TRANSPOSE_ROWS] = columns[start:start + _TRANSPOSE_ROWS].T
        return rows

    def release(self) -> None:
        """Give every buffer back to the scratch."""
        for buffer in (self.values, self.order, self.starts, self.sorted_keys):
            if buffer is not None:
                self.scratch.give(buffer)


def _group_width(features_in_flight: int, n_workers: int, itemsize: int) -> int:
    """Columns a ranking thread transposes at once: as many as the memory of ``features_in_flight`` columns
    (:data:`RANK_BYTES_PER_SAMPLE` each) allows beside every thread's other buffers, 1 to 16."""
    per_worker = features_in_flight * RANK_BYTES_PER_SAMPLE // n_workers
    return max(1, min(16, (per_worker - RANK_BYTES_PER_SAMPLE) // itemsize + 1))


def _rank_columns_cpu(scores: torch.Tensor, doubled: torch.Tensor, tie_term: torch.Tensor, step: int,
                      scratch: Scratch) -> None:
    """Doubled midranks and tie terms of every column of ``scores`` (CPU): groups of columns, one per thread,
    transposed into a :class:`_Workspace` lent by ``scratch`` and ranked there; at most ``step`` columns'
    memory."""
    if scores.dtype in (torch.bfloat16, torch.float16):
        scores = scores.float()
    values, out = scores.detach().numpy(), doubled.numpy()
    n_samples, n_features = values.shape
    n_workers = max(1, min(step, n_features, torch.get_num_threads()))
    width = max(1, min(_group_width(step, n_workers, values.itemsize), -(-n_features // n_workers)))

    def rank(start: int) -> list[float]:
        # the scratch lends the group's workspace: the next group (or batch) gets the same memory back
        workspace = _Workspace(n_samples, width, values.dtype, scratch)
        try:
            rows = workspace.transpose(values[:, start:start + width])
            return [_rank_column(row, out[start + i], workspace) for i, row in enumerate(rows)]
        finally:
            workspace.release()

    # the sorts and numpy's large operations release the GIL: the threads rank in parallel
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        ties = [tie for group in pool.map(rank, range(0, n_features, width)) for tie in group]
    tie_term.copy_(torch.tensor(ties, dtype=torch.float64))


def _order_keys(values: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Unsigned integers with the order of the floats ``values`` (-0.0 and 0.0 get the same key); with
    ``in_place`` they overwrite ``values``."""
    bits = 8 * values.itemsize
    # -0.0 + 0.0 = 0.0
    signed = np.add(values, values.dtype.type(0.0), out=values if in_place else None).view(f"i{values.itemsize}")
    # negative floats: flip the magnitude bits; then the sign bit, for unsigned order
    magnitude = np.array((1 << (bits - 1)) - 1, dtype=signed.dtype)
    signed ^= (signed >> (bits - 1)) & magnitude
    keys = signed.view(f"u{values.itemsize}")
    keys ^= np.array(1 << (bits - 1), dtype=keys.dtype)
    return keys


def _sortable_keys(keys: np.ndarray) -> torch.Tensor | None:
    """Unsigned order keys less their minimum as non-negative torch integers (what torch sorts by radix): int32
    where they fit, else int64; None where they need 64 bits (float64 spanning most of its range)."""
    keys -= keys.min()
    span = int(keys.max())
    if span < 2 ** 31:
        return torch.from_numpy(keys.view(np.int32) if keys.dtype == np.uint32 else keys.astype(np.int32))
    if span < 2 ** 63:
        return torch.from_numpy(keys.view(np.int64) if keys.dtype == np.uint64 else keys.astype(np.int64))
    return None


def _rank_column(values: np.ndarray, out: np.ndarray, workspace: _Workspace) -> float:
    """Doubled midranks of one column of float scores into ``out`` (int32), overwriting ``values`` (a row of
    ``workspace``); returns its tie term."""
    n_samples = len(values)
    keys = _order_keys(values, in_place=True)
    sortable = _sortable_keys(keys)
    if sortable is None:
        order = _radix_order(keys)
        sorted_keys = keys[order]
    else:
        sorted_keys, order = workspace.sort(sortable)
    del keys, sortable
    starts = workspace.starts
    starts[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=starts[1:])
    # a tie group at sorted positions first .. first + size - 1 has the doubled midrank 2 first + size + 1
    first = np.flatnonzero(starts)
    size = np.diff(first, append=n_samples)
    group_rank = np.multiply(first, 2, out=first)
    group_rank += size
    group_rank += 1
    out[order] = np.repeat(group_rank.astype(np.int32), size)
    del first, group_rank
    return _tie_term(size, n_samples)


def _tie_term(size: np.ndarray, n_samples: int) -> float:
    """``sum(t**3 - t)`` over the tie groups' sizes: exact in int64 while ``N < 2**21``; in blocks (no temporary
    as large as ``size``)."""
    total: int | float = 0
    for begin in range(0, len(size), _TRANSPOSE_ROWS):
        t = size[begin:begin + _TRANSPOSE_ROWS]
        if n_samples < 2 ** 21:
            total += int((t * (t * t - 1)).sum())
        else:
            total += float((t.astype(np.float64) * (t * t - 1).astype(np.float64)).sum())
    return float(total)


def _rank_rows(rows: torch.Tensor, out: torch.Tensor, tie_out: torch.Tensor) -> None:
    """Doubled midranks of every row of ``rows`` ``[c, N]`` into ``out`` and tie terms into ``tie_out``."""
    n_rows, n_samples = rows.shape
    # sorting contiguous rows is much faster than strided columns; ties need no stable order
    sorted_scores, order = torch.sort(rows.contiguous(), dim=1)
    starts = torch.ones(n_rows, n_samples, dtype=torch.bool, device=rows.device)
    torch.ne(sorted_scores[:, 1:], sorted_scores[:, :-1], out=starts[:, 1:])
    del sorted_scores
    # a tie group runs from its first to its last position in sorted order; rows start new groups
    first = torch.nonzero(starts.view(-1)).view(-1)
    del starts
    size = torch.empty_like(first)
    size[:-1] = first[1:] - first[:-1]
    size[-1] = n_rows * n_samples - first[-1]
    row = torch.div(first, n_samples, rounding_mode="floor")
    # doubled 1-based midrank of the group at positions first .. first + size - 1 of its row: 2 first + size + 1
    group_rank = first.mul_(2).add_(size).add_(1).sub_(row * (2 * n_samples)).to(torch.int32)
    del first
    sorted_ranks = torch.repeat_interleave(group_rank, size, output_size=n_rows * n_samples)
    del group_rank
    out.scatter_(1, order, sorted_ranks.view(n_rows, n_samples))
    del sorted_ranks, order
    # t**3 - t per group, exact in int64 while t < 2**21
    if n_samples < 2 ** 21:
        term = size * (size * size - 1)
    else:
        term = size.to(torch.float64) * (size * size - 1).to(torch.float64)
    sums = torch.zeros(n_rows, dtype=term.dtype, device=rows.device).index_add_(0, row, term)
    tie_out.copy_(sums)


def rank_scores(scores: torch.Tensor) -> RankedScores:
    """Rank every column of ``scores`` with midranks for ties.

    Parameters
    ----------
    scores : torch.Tensor
        ``[N, F]`` (or ``[N]``) scores; each column is ranked independently.

    Returns
    -------
    RankedScores
        ``ranks`` ``[N, F]`` float64 and ``tie_term`` ``[F]`` float64 (see :func:`compact_ranks`).
    """
    compact = compact_ranks(scores)
    return RankedScores(compact.doubled.to(torch.float64).mul_(0.5).T, compact.tie_term)


def midranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks of every column of ``scores``, ties get the mean of their ranks (float64).

    Examples
    --------
    >>> midranks(torch.tensor([0.5, 0.1, 0.5, 0.9])).flatten().tolist()
    [2.5, 1.0, 2.5, 4.0]
    """
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

    Returns
    -------
    torch.Tensor
        The AUCs, float64, shaped like the broadcast of ``rank_sum`` and ``n_positive``.

    Examples
    --------
    The positives hold midranks 2.5 and 4 of the scores ``[0.1, 0.4, 0.4, 0.9]``:

    >>> auc_from_rank_sums(torch.tensor([6.5], dtype=torch.float64), torch.tensor([2]), 4)
    tensor([0.8750], dtype=torch.float64)
    """
    n_positive = n_positive.to(torch.float64)
    # every step is exact (integers and half-integers below 2**53) but the final division; in place
    # where possible, as this runs over every candidate formula
    denominator = (n_samples - n_positive).mul_(n_positive)
    unsafe = denominator <= 0
    u_statistic = rank_sum - (n_positive + 1.0).mul_(n_positive).mul_(0.5)
    return u_statistic.div_(denominator.masked_fill_(unsafe, 1.0)).masked_fill_(unsafe, 0.5)


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

    Returns
    -------
    torch.Tensor
        The p-values, float64, in ``[0, 1]``.

    Examples
    --------
    The same p-value as scipy's for positives ``[3, 4, 5]`` against negatives ``[1, 2, 2]``:

    >>> from scipy.stats import mannwhitneyu
    >>> p = mann_whitney_pvalue(torch.tensor(1.0), 3, 6, torch.tensor(6.0), "greater")
    >>> expected = mannwhitneyu([3, 4, 5], [1, 2, 2], alternative="greater", method="asymptotic").pvalue
    >>> bool(abs(p.item() - expected) < 1e-12)
    True
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

    Parameters
    ----------
    p_values : torch.Tensor
        The p-values; each slice along ``dim`` is one family.
    dim : int
        The dimension of the family.

    Returns
    -------
    torch.Tensor
        The q-values, float64, shaped like ``p_values``.

    Examples
    --------
    Sorted, ``p * m / rank`` is ``0.04, 0.06, 0.0533, 0.5``; the running minimum from the top makes them monotone:

    >>> [round(q, 4) for q in benjamini_hochberg(torch.tensor([0.01, 0.04, 0.03, 0.5])).tolist()]
    [0.04, 0.0533, 0.0533, 0.5]
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

