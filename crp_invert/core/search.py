"""The INVERT beam search as a pure function on tensors, for many features at once.

Formulas are left-deep chains ``((p0 op1 p1) op2 p2) ...`` over *primitives*: the K concepts and
their K negations (codes ``0..K-1`` and ``K..2K-1``), joined by AND (0) or OR (1), each concept used
at most once (a repeated concept always reduces to a shorter formula).

Why it is fast: with the midranks ``r`` of one feature, the AUC of any sample mask ``m`` follows
from the rank sum ``R(m) = sum(r[m])`` and the count ``n(m)``. For every beam formula ``phi`` of
every feature, one sparse product ``labels^T @ [r * phi, phi]`` gives ``R`` and ``n`` of
``phi AND c`` for all concepts ``c``; inclusion-exclusion gives ``phi AND NOT c``, ``phi OR c`` and
``phi OR NOT c`` from the same numbers. Rank sums are float64 sums of half-integers, so they are
exact (below 2**53) and the AUCs are exact up to the final division.

Ties are broken deterministically: candidates are ordered by score, then by the old beam first
(so a shorter formula wins a tie), then by beam slot, operator (AND before OR) and primitive code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch

from .metrics import auc_from_rank_sums, mann_whitney_pvalue, rank_scores
from .params import MODES

__all__ = ["SearchResult", "BeamState", "PreparedLabels", "beam_search", "prepare_labels", "MODES", "AND", "OR"]

AND, OR = 0, 1


@dataclass
class BeamState:
    """The beam of every feature after one step (all tensors on the CPU).

    Attributes
    ----------
    primitives : torch.Tensor
        ``[F, B, L]`` int64 primitive codes of each formula, ``-1`` past its length.
    operators : torch.Tensor
        ``[F, B, L]`` int64, ``operators[..., i]`` joins primitive ``i`` to the formula before it
        (``AND`` = 0, ``OR`` = 1); ``-1`` at position 0 and past the length.
    length : torch.Tensor
        ``[F, B]`` int64 number of atoms; 0 marks an empty slot (fewer valid formulas than B).
    n_positive : torch.Tensor
        ``[F, B]`` int64 number of samples where the formula holds.
    auc : torch.Tensor
        ``[F, B]`` float64 AUC of the feature against the formula (NaN in empty slots).
    """

    primitives: torch.Tensor
    operators: torch.Tensor
    length: torch.Tensor
    n_positive: torch.Tensor
    auc: torch.Tensor


@dataclass
class SearchResult:
    """The final beams of a batch of features, best first, with their statistics.

    Attributes
    ----------
    beam : BeamState
        The final beam.
    p_value : torch.Tensor
        ``[F, B]`` Mann-Whitney p-values (one-sided in the direction of ``mode``).
    n_candidates : torch.Tensor
        ``[F]`` number of candidate formulas scored that satisfied the constraints.
    tie_term : torch.Tensor
        ``[F]`` the ties of each feature's scores (see :func:`crp_invert.metrics.rank_scores`).
    states : list of BeamState
        The beam after each length ``1..L`` when ``memorize_states`` was set, else empty.
    """

    beam: BeamState
    p_value: torch.Tensor
    n_candidates: torch.Tensor
    tie_term: torch.Tensor
    states: List[BeamState] = field(default_factory=list)


def beam_search(
    scores: torch.Tensor,
    labels_t: torch.Tensor,
    L: int = 3,
    B: int = 3,
    limit_search: Optional[int] = None,
    min_fraction: float = 0.0,
    max_fraction: float = 0.5,
    mode: str = "positive",
    memorize_states: bool = False,
) -> SearchResult:
    """Beam search for the best formula of every feature (column) of ``scores``.

    Arguments are not validated here (see :class:`crp_invert.ConceptLabeler`, which does).

    Parameters
    ----------
    scores : torch.Tensor
        ``[N, F]`` activations of F features over N samples, finite.
    labels_t : torch.Tensor or PreparedLabels
        ``[K, N]`` sparse CSR 0/1 labels, transposed, on the device of ``scores``
        (:meth:`crp_invert.ConceptLabels.torch_sparse_t`), or :func:`prepare_labels` of them (to
        prepare them once for many calls).
    L, B : int
        Maximal formula length and beam width.
    limit_search : int, optional
        Only the ``limit_search`` primitives with the largest ``|AUC - 0.5|`` of each feature.
    min_fraction, max_fraction : float
        A formula must hold for a fraction ``T`` of the samples with
        ``min_fraction <= T <= max_fraction`` and ``0 < T < 1``.
    mode : {"positive", "negative"}
        Maximize (positive) or minimize (negative) the AUC.
    memorize_states : bool
        Keep the beam after each length in ``SearchResult.states``.
    """
    device = scores.device
    n_samples, n_features = scores.shape
    prepared = labels_t if isinstance(labels_t, PreparedLabels) else prepare_labels(labels_t)
    rows, rank_labels_t = prepared.rows, prepared.matrix
    n_concepts = rank_labels_t.shape[0]
    count_labels_t = None if n_samples <= _MAX_PACKED_SAMPLES else rank_labels_t.to(torch.float32)
    n_prims = 2 * n_concepts
    ranked = rank_scores(scores)
    ranks = ranked.ranks.contiguous()  # [N, F] float64
    del scores
    weights = 2.0 * ranks + _packing_scale(n_samples) if count_labels_t is None else ranks
    total_rank_sum = n_samples * (n_samples + 1) / 2.0

    concept_counts = rows.counts.to(torch.float64)  # [K]
    concept_rank_sums = torch.sparse.mm(rank_labels_t, ranks)  # [K, F]
    prim_rank_sums = torch.cat([concept_rank_sums, total_rank_sum - concept_rank_sums]).T  # [F, 2K]
    prim_counts = torch.cat([concept_counts, n_samples - concept_counts])  # [2K]
    prim_auc = auc_from_rank_sums(prim_rank_sums, prim_counts[None, :], n_samples)
    sign = 1.0 if mode == "positive" else -1.0
    low, high = _count_bounds(n_samples, min_fraction, max_fraction)

    allowed = _allowed_primitives(prim_auc, limit_search)  # [F, 2K] bool
    valid = allowed & ((prim_counts >= low) & (prim_counts <= high))[None, :]
    n_candidates = valid.sum(dim=1)
    order, take = _select(sign * prim_auc, valid, B)  # [F, B]

    beam_length = torch.where(take, 1, 0)
    first_prims = torch.where(take, order, -1)
    primitives = torch.full((n_features, B, L), -1, dtype=torch.long, device=device)
    operators = torch.full((n_features, B, L), -1, dtype=torch.long, device=device)
    primitives[:, :, 0] = first_prims
    beam_rank_sum = torch.gather(prim_rank_sums, 1, order).masked_fill(~take, 0.0)
    beam_count = prim_counts[order].masked_fill(~take, 0.0)
    masks = _primitive_masks(rows, first_prims, n_concepts)  # [N, F, B]
    states = []
    if memorize_states:
        states.append(_state(primitives, operators, beam_length, beam_count, beam_rank_sum, n_samples))

    for _step in range(1, L):
        # rank sums and counts of (phi AND c) for every beam formula phi and concept c
        and_rank_sum, and_count = _and_statistics(rank_labels_t, count_labels_t, weights, masks)

        # every candidate's rank sum and count by inclusion-exclusion, written after the old beam
        # (which comes first, so that it wins ties against longer formulas)
        all_rank_sum = _candidates(beam_rank_sum, and_rank_sum, concept_rank_sums.T, total_rank_sum)
        all_count = _candidates(beam_count, and_count, concept_counts.expand(n_features, -1), n_samples)
        del and_rank_sum, and_count
        cand_count = all_count[:, B:].view(n_features, B, 2, n_prims)

        used = _used_concepts(primitives, n_concepts)  # [F, B, K]
        fresh = ~torch.cat([used, used], dim=2)  # [F, B, 2K]
        all_valid = torch.empty(n_features, all_count.shape[1], dtype=torch.bool, device=device)
        all_valid[:, :B] = beam_length > 0
        cand_valid = all_valid[:, B:].view(n_features, B, 2, n_prims)
        torch.logical_and((cand_count >= low) & (cand_count <= high),
                          (beam_length > 0)[:, :, None, None] & allowed[:, None, None, :] & fresh[:, :, None, :],
                          out=cand_valid)
        n_candidates += cand_valid.reshape(n_features, -1).sum(dim=1)
        all_auc = auc_from_rank_sums(all_rank_sum, all_count, n_samples)
        del cand_count, cand_valid

        # equivalent formulas (a AND b from beam a and from beam b) can occupy several of the top
        # entries: each distinct formula at most min(B, L) + 1 times, so this many always suffice
        n_take = min(all_auc.shape[1], B * (min(B, L) + 1))
        order, take = _select(sign * all_auc, all_valid, n_take)
        cand_prims, cand_ops, cand_length = _expand(primitives, operators, beam_length, order, B, n_prims)
        if n_take > 1:
            take &= ~_duplicates(cand_prims, cand_ops, cand_length, n_concepts)
        pick = _first_true(take, B)  # [F, B] positions into order, -1 where none
        has = pick >= 0
        pick = pick.clamp(min=0)
        chosen = torch.gather(order, 1, pick)

        new_prims = torch.gather(cand_prims, 1, pick[:, :, None].expand(-1, -1, L))
        new_ops = torch.gather(cand_ops, 1, pick[:, :, None].expand(-1, -1, L))
        new_length = torch.gather(cand_length, 1, pick)
        beam_rank_sum = torch.gather(all_rank_sum, 1, chosen).masked_fill(~has, 0.0)
        beam_count = torch.gather(all_count, 1, chosen).masked_fill(~has, 0.0)
        masks = _extend_masks(masks, rows, chosen, B, n_prims, n_concepts)
        primitives = new_prims.masked_fill(~has[:, :, None], -1)
        operators = new_ops.masked_fill(~has[:, :, None], -1)
        beam_length = new_length.masked_fill(~has, 0)
        masks &= has[None, :, :]
        if memorize_states:
            states.append(_state(primitives, operators, beam_length, beam_count, beam_rank_sum, n_samples))

    final = _state(primitives, operators, beam_length, beam_count, beam_rank_sum, n_samples)
    alternative = "greater" if mode == "positive" else "less"
    auc = auc_from_rank_sums(beam_rank_sum, beam_count, n_samples)
    p_value = mann_whitney_pvalue(auc, beam_count, n_samples, ranked.tie_term[:, None], alternative)
    p_value = p_value.masked_fill(beam_length == 0, float("nan"))
    return SearchResult(final, p_value.cpu(), n_candidates.cpu(), ranked.tie_term.cpu(), states)


def _count_bounds(n_samples: int, min_fraction: float, max_fraction: float) -> tuple:
    """The allowed range of positive counts: fraction in [min, max] and 0 < T < 1."""
    low = max(1.0, min_fraction * n_samples)
    high = min(n_samples - 1.0, max_fraction * n_samples)
    # counts are integers; tolerate the rounding of fraction * N
    eps = 1e-9 * n_samples
    return low - eps, high + eps


def _allowed_primitives(prim_auc: torch.Tensor, limit_search: Optional[int]) -> torch.Tensor:
    if limit_search is None or limit_search >= prim_auc.shape[1]:
        return torch.ones_like(prim_auc, dtype=torch.bool)
    strength = (prim_auc - 0.5).abs()
    order = torch.sort(strength, dim=1, descending=True, stable=True).indices[:, :limit_search]
    allowed = torch.zeros_like(prim_auc, dtype=torch.bool)
    return allowed.scatter_(1, order, True)


def _select(score: torch.Tensor, valid: torch.Tensor, k: int) -> tuple:
    """Indices of the k best valid entries per row (stable: earlier entries win ties)."""
    keyed = torch.where(valid, score, -torch.inf)
    wanted, k = k, min(k, keyed.shape[1])
    if k * 8 < keyed.shape[1]:
        # top-k by value, then re-sort the kept ones stably; equal values beyond the k-th are
        # included so that the earliest among ties is kept, as a full stable sort would
        threshold = torch.topk(keyed, k, dim=1, sorted=True).values[:, -1:]
        keep = keyed >= threshold
        n_keep = int(keep.sum(dim=1).max())
        candidates = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n_keep]
        sub = torch.gather(keyed, 1, candidates)
        sub_order = torch.sort(sub, dim=1, descending=True, stable=True).indices[:, :k]
        order = torch.gather(candidates, 1, sub_order)
    else:
        order = torch.sort(keyed, dim=1, descending=True, stable=True).indices[:, :k]
    take = torch.gather(valid, 1, order) & torch.isfinite(torch.gather(keyed, 1, order))
    if k < wanted:
        # fewer entries than asked for: pad with empty slots
        pad = wanted - k
        order = torch.cat([order, order.new_zeros(order.shape[0], pad)], dim=1)
        take = torch.cat([take, take.new_zeros(take.shape[0], pad)], dim=1)
    return order, take


def _candidates(beam_value, and_value, concept_value, total) -> torch.Tensor:
    """``[F, B + 4 B K]``: the beam's values, then those of phi AND c, phi AND NOT c, phi OR c and
    phi OR NOT c for every beam formula phi and concept c (rank sums or counts alike)."""
    n_features, width, n_concepts = and_value.shape
    out = torch.empty(n_features, width + 4 * width * n_concepts, dtype=and_value.dtype, device=and_value.device)
    out[:, :width] = beam_value
    combos = out[:, width:].view(n_features, width, 2, 2, n_concepts)
    phi = beam_value[:, :, None]
    concept = concept_value[:, None, :]
    combos[:, :, 0, 0] = and_value
    combos[:, :, 0, 1] = phi - and_value
    combos[:, :, 1, 0] = phi + concept - and_value
    combos[:, :, 1, 1] = (total - concept) + and_value
    return out


class PreparedLabels(NamedTuple):
    """Transposed labels in the forms the search uses: a coalesced float64 COO matrix ``[K, N]``
    (torch's COO product is 2-3x faster than its CSR product on CPU) and row access sharing its
    column indices."""

    matrix: torch.Tensor
    rows: "_SparseRows"


def prepare_labels(labels_t: torch.Tensor) -> PreparedLabels:
    """Prepare transposed sparse labels ``[K, N]`` (CSR or COO) once for many :func:`beam_search` calls."""
    matrix = labels_t.to_sparse_coo().coalesce().to(torch.float64)
    indices = matrix.indices()
    n_rows, n_columns = matrix.shape
    # coalesced COO is sorted row-major, so its column indices are the CSR column indices
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=indices.device)
    crow[1:] = torch.bincount(indices[0], minlength=n_rows).cumsum(0)
    return PreparedLabels(matrix, _SparseRows(crow, indices[1], n_columns))


# below this many samples, rank sum and count fit into one exact float64 (2 N**3 < 2**53)
_MAX_PACKED_SAMPLES = 160_000


def _packing_scale(n_samples: int) -> float:
    return 2.0 * n_samples * n_samples + 1.0


def _and_statistics(rank_labels_t, count_labels_t, weights, masks) -> tuple:
    """Rank sums and counts of ``mask AND concept`` for all masks ``[N, F, B]`` and concepts.

    Up to :data:`_MAX_PACKED_SAMPLES` samples both come from one product: each masked sample
    contributes ``weights = 2 r + S`` with ``S = 2 N**2 + 1`` larger than any sum of doubled
    ranks, so the float64 sum ``2 R + S n`` is an exact integer from which ``n`` and ``R`` are read
    off. Otherwise ``weights`` are the ranks and the counts come from a second product.
    """
    n_samples, n_features, width = masks.shape
    n_concepts = rank_labels_t.shape[0]
    if count_labels_t is None:
        scale = _packing_scale(n_samples)
        packed = torch.where(masks, weights[:, :, None], 0.0).view(n_samples, -1)
        total = torch.sparse.mm(rank_labels_t, packed)
        del packed
        count = torch.div(total, scale, rounding_mode="floor")
        remainder = total - count * scale
        # guard the floor against rounding of total / scale
        count += (remainder >= scale).to(count.dtype) - (remainder < 0).to(count.dtype)
        rank_sum = (total - count * scale) * 0.5
    else:
        masked_ranks = torch.mul(weights[:, :, None], masks).view(n_samples, -1)
        rank_sum = torch.sparse.mm(rank_labels_t, masked_ranks)
        del masked_ranks
        flat_masks = masks.reshape(n_samples, -1).to(count_labels_t.dtype)
        count = torch.sparse.mm(count_labels_t, flat_masks).to(torch.float64)
    shape = (n_features, width, n_concepts)
    return rank_sum.T.reshape(shape), count.T.reshape(shape)


class _SparseRows:
    """Dense boolean rows of a sparse ``[K, N]`` matrix, gathered without densifying it: ``col`` holds
    the column of every stored entry in row-major order, ``crow`` where each row starts."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, n_columns: int) -> None:
        self.crow = crow
        self.col = col
        self.n_columns = n_columns
        self.counts = self.crow[1:] - self.crow[:-1]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, *rows.shape]`` boolean: row ``rows[i]`` of the matrix as column ``i``."""
        flat = rows.reshape(-1)
        counts = self.counts[flat]
        starts = self.crow[flat]
        total = int(counts.sum())
        out = torch.zeros(self.n_columns, flat.numel(), dtype=torch.bool, device=rows.device)
        if total:
            owner = torch.repeat_interleave(torch.arange(flat.numel(), device=rows.device), counts)
            first = torch.repeat_interleave(starts - (counts.cumsum(0) - counts), counts)
            position = first + torch.arange(total, device=rows.device)
            out[self.col[position], owner] = True
        return out.reshape(self.n_columns, *rows.shape)


def _primitive_masks(rows: _SparseRows, prims: torch.Tensor, n_concepts: int) -> torch.Tensor:
    """``[N, F, B]`` masks of primitive codes ``prims`` ``[F, B]`` (``-1`` gives an empty mask)."""
    masks = rows.gather(prims.clamp(min=0) % n_concepts)
    negated = (prims >= n_concepts)[None, :, :]
    return (masks ^ negated) & (prims >= 0)[None, :, :]


def _used_concepts(primitives: torch.Tensor, n_concepts: int) -> torch.Tensor:
    n_features, width, _ = primitives.shape
    used = torch.zeros(n_features, width, n_concepts + 1, dtype=torch.bool, device=primitives.device)
    index = torch.where(primitives >= 0, primitives % n_concepts, n_concepts)
    used.scatter_(2, index, True)
    return used[:, :, :n_concepts]


def _decode_candidates(order: torch.Tensor, B: int, n_prims: int) -> tuple:
    """Beam slot, operator and primitive of each new-candidate index (old-beam entries: -1)."""
    is_new = order >= B
    flat = (order - B).clamp(min=0)
    slot = flat // (2 * n_prims)
    operator = (flat // n_prims) % 2
    prim = flat % n_prims
    return is_new, torch.where(is_new, slot, order), operator, prim


def _expand(primitives, operators, beam_length, order, B, n_prims) -> tuple:
    """Primitive / operator sequences and lengths of the selected candidates ``[F, k, L]``."""
    is_new, slot, operator, prim = _decode_candidates(order, B, n_prims)
    L = primitives.shape[2]
    index = slot[:, :, None].expand(-1, -1, L)
    prims = torch.gather(primitives, 1, index).clone()
    ops = torch.gather(operators, 1, index).clone()
    length = torch.gather(beam_length, 1, slot)
    position = length.clamp(max=L - 1)[:, :, None]
    new_prims = prims.scatter(2, position, prim[:, :, None])
    new_ops = ops.scatter(2, position, operator[:, :, None])
    prims = torch.where(is_new[:, :, None], new_prims, prims)
    ops = torch.where(is_new[:, :, None], new_ops, ops)
    return prims, ops, length + is_new.long()


def _signature(prims: torch.Tensor, ops: torch.Tensor, length: torch.Tensor, n_concepts: int) -> torch.Tensor:
    """A canonical code of left-deep formulas: equal exactly when the formulas are equal.

    Consecutive equal operators form a group whose operands commute (the first primitive belongs
    to the first group); the code is the first operator followed by the primitives sorted by
    (group, primitive).
    """
    L = prims.shape[-1]
    position = torch.arange(L, device=prims.device)
    # group index: number of operator changes up to each position (position 0 joins position 1)
    ops_filled = ops.clone()
    if L > 1:
        ops_filled[..., 0] = ops[..., 1]
    changes = torch.zeros_like(prims)
    if L > 1:
        changes[..., 1:] = (ops_filled[..., 1:] != ops_filled[..., :-1]).long()
    group = changes.cumsum(-1)
    n_prims = 2 * n_concepts
    inside = position[None, None, :] < length[..., None]
    key = torch.where(inside, group * n_prims + prims, torch.iinfo(torch.long).max)
    key = torch.sort(key, dim=-1).values
    first_op = torch.where(length > 1, ops[..., 1] if L > 1 else -1, -1)
    return torch.cat([first_op[..., None], key], dim=-1)


def _duplicates(prims, ops, length, n_concepts) -> torch.Tensor:
    """``[F, k]`` True where an earlier entry of the same row is the same formula."""
    signature = _signature(prims, ops, length, n_concepts)  # [F, k, L + 1]
    same = (signature[:, :, None, :] == signature[:, None, :, :]).all(-1)  # [F, k, k]
    earlier = torch.ones(same.shape[1], same.shape[1], dtype=torch.bool, device=same.device).tril(-1)
    return (same & earlier[None]).any(-1)


def _first_true(take: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the first k True entries of each row, -1 where a row has fewer."""
    rank = take.long().cumsum(1) - 1
    rank = torch.where(take, rank, k)
    result = torch.full((take.shape[0], k + 1), -1, dtype=torch.long, device=take.device)
    position = torch.arange(take.shape[1], device=take.device).expand_as(take)
    result.scatter_(1, rank.clamp(max=k), position)
    # scatter of non-taken entries all went to column k; entries < k are the first k taken
    result = result[:, :k]
    filled = torch.arange(k, device=take.device)[None, :] < take.sum(1, keepdim=True)
    return torch.where(filled, result, -1)


def _extend_masks(masks, rows, chosen, B, n_prims, n_concepts) -> torch.Tensor:
    """Masks of the chosen entries: an old-beam mask, or an old mask combined with a primitive."""
    is_new, slot, operator, prim = _decode_candidates(chosen, B, n_prims)
    n_samples = masks.shape[0]
    base = torch.gather(masks, 2, slot[None, :, :].expand(n_samples, -1, -1))
    prim_masks = _primitive_masks(rows, prim, n_concepts)
    combined = torch.where((operator == AND)[None, :, :], base & prim_masks, base | prim_masks)
    return torch.where(is_new[None, :, :], combined, base)


def _state(primitives, operators, length, count, rank_sum, n_samples) -> BeamState:
    auc = auc_from_rank_sums(rank_sum, count, n_samples).masked_fill(length == 0, float("nan"))
    return BeamState(
        primitives.cpu().clone(), operators.cpu().clone(), length.cpu().clone(),
        count.round().long().cpu(), auc.cpu(),
    )
