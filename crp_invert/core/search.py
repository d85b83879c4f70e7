"""The INVERT beam search as a pure function on tensors, for many features at once.

Formulas are left-deep chains ``((p0 op1 p1) op2 p2) ...`` over *primitives*: the K concepts and
their K negations (codes ``0..K-1`` and ``K..2K-1``), joined by AND (0) or OR (1), each concept used
at most once (a repeated concept always reduces to a shorter formula).

Why it is fast: with the midranks ``r`` of one feature, the AUC of any sample mask ``m`` follows
from the rank sum ``R(m) = sum(r[m])`` and the count ``n(m)``. One sparse product
``labels^T @ r`` gives ``R`` of every concept. For every beam formula ``phi`` of every feature, the
sorted list of the samples where ``phi`` holds (or, when that is shorter to get, where it does not)
is merged from the concepts' sample lists; each listed sample adds its rank to each of its concepts,
which gives ``R`` and ``n`` of ``phi AND c`` for all concepts ``c`` at a cost proportional to the
list, not to N. Inclusion-exclusion gives ``phi AND NOT c``, ``phi OR c`` and ``phi OR NOT c`` from
the same numbers. Ranks are kept as doubled midranks (int32), sums are exact integers (int64, or
float64 below 2**53), so the AUCs are exact up to the final division.

Memory: the search keeps 4 bytes per sample and feature (the ranks) plus a working memory
(``memory_bytes``) that does not grow with the number of features: features are ranked, summed and
searched in chunks that fit it (see :class:`SearchMemory`).

Ties are broken deterministically: candidates are ordered by score, then by the old beam first
(so a shorter formula wins a tie), then by beam slot, operator (AND before OR) and primitive code.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse
import torch

from .backend import device_kernels
from .metrics import RANK_BYTES_PER_SAMPLE, CompactRanks, auc_from_rank_sums, compact_ranks, mann_whitney_pvalue
from .params import MODES
from .scratch import Scratch

__all__ = ["SearchResult", "BeamState", "PreparedLabels", "SearchMemory", "beam_search", "prepare_labels",
           "beam_rank_sums", "available_memory", "default_memory_budget", "MODES", "AND", "OR"]

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
        ``[F]`` the ties of each feature's scores (see :func:`crp_invert.core.metrics.compact_ranks`).
    states : list of BeamState
        The beam after each length ``1..L`` when ``memorize_states`` was set, else empty.
    """

    beam: BeamState
    p_value: torch.Tensor
    n_candidates: torch.Tensor
    tie_term: torch.Tensor
    states: list[BeamState] = field(default_factory=list)


# memory model ------------------------------------------------------------------------------------
# Bytes of the search's temporaries, measured as peak RSS (glibc told to return freed blocks) and
# rounded up: see benchmarks/bench_memory.py and BENCHMARKS.md.
# per element of the sample lists of a group of formulas while they are merged (keys, membership,
# merge positions: 28-43 measured) or expanded into (sample, concept) pairs (list: 24-32 per element,
# pairs: about 47 each, at most half as many pairs as list elements at once)
_LIST_BYTES = 64
# per candidate formula of one feature in a beam step: rank sum, count, AUC, score key, validity and the
# selection of the best (60 measured)
_CANDIDATE_BYTES = 72
# per entry of the top candidates of one feature and per position of their formulas (expansion,
# signature, lexicographic sort of the duplicate check)
_TAKE_BYTES = 96
# per primitive of one feature for the first step (rank sums, AUCs, selection)
_PRIMITIVE_BYTES = 48
# per (beam formula, concept) of one feature: the statistics of phi AND c (int64 sums and counts, their
# float64 rank sums and counts)
_AND_BYTES = 48
# the largest feature batch the labeler chooses (more gains nothing)
MAX_FEATURE_BATCH = 4096
# label matrices of at most this many entries (N x K) are also kept dense: for them the statistics of
# phi AND c may come from dense products (see _prefer_dense)
DENSE_MAX_ELEMENTS = 1 << 22
# the cost model that picks dense products or sample lists: nanoseconds per multiply-add of a float64 product,
# and per element of a sample list for every concept of its sample (merging, expanding, summing; measured on
# the FashionMNIST and synthetic layers, 2-core machine)
_DENSE_NS_PER_PRODUCT = 0.5
_LIST_NS_PER_PAIR = 20.0


def _format_bytes(n_bytes: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} bytes"


@dataclass(frozen=True)
class SearchMemory:
    """The memory model of :func:`beam_search` for N samples, K concepts, beam width B and length L.

    A feature batch of F features takes ``F * feature_bytes(itemsize)`` (the scores as read, their
    int32 ranks and the concepts' rank sums: 8 bytes per sample for float32 scores) plus a *working
    memory* that does not grow with F: the features are ranked, summed and searched in chunks that fit
    it. The working memory holds at least one feature (:meth:`minimum_working_memory`): ranking its N
    scores (:data:`~crp_invert.core.metrics.RANK_BYTES_PER_SAMPLE` per sample), the sample lists of one
    formula (at most 1.5 N elements of 64 bytes), and its ``B (1 + 4 K)`` candidate formulas of a beam
    step (72 bytes each).

    Examples
    --------
    >>> memory = SearchMemory(n_samples=1_280_000, n_concepts=1481, B=3, L=3)
    >>> memory.feature_bytes(itemsize=4) // 1_280_000
    8
    >>> memory.feature_batch(512 << 20, itemsize=4)
    39
    """

    n_samples: int
    n_concepts: int
    B: int
    L: int

    @property
    def n_candidates(self) -> int:
        """Candidate formulas of one feature in one beam step: the beam and 4 K extensions of each."""
        return self.B * (1 + 4 * self.n_concepts)

    def candidate_bytes(self) -> int:
        """Working memory of one feature while its candidates are scored and selected (independent of N)."""
        n_take = min(self.n_candidates, self.B * (min(self.B, self.L) + 1))
        return (_CANDIDATE_BYTES * self.n_candidates + _TAKE_BYTES * n_take * (self.L + 1)
                + _PRIMITIVE_BYTES * 2 * self.n_concepts)

    def and_bytes(self) -> int:
        """Working memory of one feature for the statistics of ``phi AND c`` (independent of N)."""
        return _AND_BYTES * self.B * self.n_concepts

    def list_elements(self) -> int:
        """The most elements the sample lists of one formula take while merged: 1.5 N."""
        return (3 * self.n_samples + 1) // 2

    def minimum_working_memory(self) -> int:
        """The least working memory: one feature at a time."""
        ranking = RANK_BYTES_PER_SAMPLE * self.n_samples
        concept_sums = 8 * (self.n_samples + self.n_concepts)
        lists = _LIST_BYTES * self.list_elements() + self.and_bytes()
        return max(ranking, concept_sums, lists, self.candidate_bytes())

    def feature_bytes(self, itemsize: int = 4, copies: int = 1) -> int:
        """Memory per feature of a batch: ``copies`` columns of scores of ``itemsize`` bytes as read, their
        int32 ranks, and the rank sums of the concepts (float64)."""
        return self.n_samples * (copies * itemsize + 4) + 16 * self.n_concepts

    def working_memory(self, budget: int) -> int:
        """The working memory taken from a budget: a quarter of it, at least the minimum."""
        return max(self.minimum_working_memory(), int(budget) // 4)

    def feature_batch(self, budget: int, itemsize: int = 4, copies: int = 1) -> int:
        """The largest feature batch (1 to :data:`MAX_FEATURE_BATCH`) whose memory fits ``budget``."""
        free = int(budget) - self.working_memory(budget)
        return int(max(1, min(MAX_FEATURE_BATCH, free // self.feature_bytes(itemsize, copies))))

    def check(self, limit: int, itemsize: int = 4, features: int = 1) -> None:
        """Raise ValueError up front if the minimum working memory and ``features`` features (one, or 0 for
        the working memory alone) need more than ``limit`` bytes."""
        need = self.minimum_working_memory() + features * self.feature_bytes(itemsize)
        if need > limit:
            raise ValueError(
                f"the beam search with B = {self.B}, L = {self.L} over K = {self.n_concepts:,} concepts and "
                f"N = {self.n_samples:,} samples needs at least {_format_bytes(need)} for one feature "
                f"(scoring its {self.n_candidates:,} candidate formulas per step takes "
                f"{_format_bytes(self.candidate_bytes())}; ranking and the sample lists "
                f"{_format_bytes(max(RANK_BYTES_PER_SAMPLE * self.n_samples, _LIST_BYTES * self.list_elements()))}"
                f"), more than the memory limit of {_format_bytes(limit)}; use a smaller beam width B or "
                "fewer concepts"
            )

    def chunks(self, working_memory: int) -> tuple[int, int, int, int]:
        """Within ``working_memory``: features per chunk for ranking, for the concepts' rank sums and for
        the beam steps, and the sample-list elements handled at once.

        The statistics of ``phi AND c`` (with the sample lists) and the scoring of the candidates come one
        after the other in a beam step, so a chunk needs the larger of the two.
        """
        working_memory = max(int(working_memory), self.minimum_working_memory())
        rank = working_memory // (RANK_BYTES_PER_SAMPLE * self.n_samples)
        sums = working_memory // (8 * (self.n_samples + self.n_concepts))
        lists = _LIST_BYTES * self.list_elements()
        search = min((working_memory - lists) // self.and_bytes(), working_memory // self.candidate_bytes())
        search = max(1, search)
        list_elements = (working_memory - search * self.and_bytes()) // _LIST_BYTES
        return max(1, rank), max(1, sums), search, max(self.list_elements(), list_elements)


def available_memory(device: str | torch.device | None = None) -> int | None:
    """Free memory in bytes: of the GPU for a CUDA device, else the host's available RAM (None if
    unknown)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _free_memory_per_process(device: str | torch.device | None) -> int | None:
    free = available_memory(device)
    if free is not None:
        # processes that torchrun started on one node share its memory
        free //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return free


def default_memory_budget(device: str | torch.device | None = None) -> int:
    """The memory a feature batch may take by default: a quarter of the free memory of ``device`` (host
    RAM or GPU, shared by torchrun's processes on a node), at most 1 GiB on a CPU (at N = 1.28 M: batches
    of 64 features and a working memory that ranks 3 features at once; larger batches are no faster)
    and 4 GiB on a GPU, and at least 128 MiB."""
    free = _free_memory_per_process(device)
    on_gpu = device is not None and torch.device(device).type == "cuda"
    cap = (4 << 30) if on_gpu else (1 << 30)
    return cap if free is None else min(cap, max(128 << 20, free // 4))


def memory_limit(device: str | torch.device | None = None) -> int:
    """The most memory a search may take before it is refused: the default budget, or half of the free
    memory where that is more."""
    free = _free_memory_per_process(device)
    budget = default_memory_budget(device)
    return budget if free is None else max(budget, free // 2)


def beam_search(
    scores: torch.Tensor | CompactRanks,
    labels_t: torch.Tensor | PreparedLabels,
    L: int = 3,
    B: int = 3,
    limit_search: int | None = None,
    min_fraction: float = 0.0,
    max_fraction: float = 0.5,
    mode: str = "positive",
    memorize_states: bool = False,
    memory_bytes: int | None = None,
    backend: str = "auto",
    min_support: int = 0,
    scratch: Scratch | None = None,
) -> SearchResult:
    """Beam search for the best formula of every feature (column) of ``scores``.

    Arguments are not validated here (see :class:`crp_invert.ConceptLabeler`, which does).

    Parameters
    ----------
    scores : torch.Tensor or CompactRanks
        ``[N, F]`` activations of F features over N samples, finite; or their
        :func:`~crp_invert.core.metrics.compact_ranks` (then the scores need not be kept).
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
    memory_bytes : int, optional
        Working memory for the search's temporaries, besides the ``[F, N]`` int32 ranks it keeps
        (default: a quarter of :func:`default_memory_budget`). Features are processed in chunks that
        fit it; a ValueError is raised before any work if one feature needs more than
        ``memory_bytes`` (or, by default, more than :func:`memory_limit`).
    backend : {"auto", "torch"}
        The kernels of ranking and of the concepts' rank sums: numpy / scipy on the CPU and torch elsewhere
        (``"auto"``), or torch everywhere (see :mod:`crp_invert.core.backend`); the results are the same.
    min_support : int
        A formula must hold on at least ``min_support`` samples and fail on at least as many (count
        bounds applied with the fractions' at every length; 0: no bound besides ``0 < T < 1``).
    scratch : Scratch, optional
        Memory kept from call to call (:class:`~crp_invert.core.scratch.Scratch`), passed by callers that
        search many batches.
    """
    prepared = labels_t if isinstance(labels_t, PreparedLabels) else prepare_labels(labels_t, backend)
    n_samples, n_concepts = prepared.n_samples, prepared.n_concepts
    plan = SearchMemory(n_samples, n_concepts, B, L)
    if memory_bytes is None:
        device = scores.doubled.device if isinstance(scores, CompactRanks) else scores.device
        plan.check(memory_limit(device))
        memory_bytes = plan.working_memory(default_memory_budget(device))
    else:
        plan.check(int(memory_bytes), features=0)
    rank_chunk, sums_chunk, search_chunk, list_elements = plan.chunks(memory_bytes)
    ranked = scores if isinstance(scores, CompactRanks) else compact_ranks(scores, rank_chunk, backend)
    del scores
    doubled = ranked.doubled
    n_features = doubled.shape[0]
    if doubled.shape[1] != n_samples:
        raise ValueError(f"scores have N = {doubled.shape[1]} samples but the labels have N = {n_samples}")

    # rank sums of every concept: [F, K], exact (float64 sums of integers below 2**53)
    concept_rank_sums = _concept_rank_sums(doubled, prepared, sums_chunk, backend, scratch)

    settings = _Settings(L, B, limit_search, *_count_bounds(n_samples, min_fraction, max_fraction, min_support),
                         1.0 if mode == "positive" else -1.0, memorize_states, list_elements)
    # (a batch without features is searched as one empty chunk)
    parts = [
        _search_features(doubled[start:start + search_chunk], concept_rank_sums[start:start + search_chunk],
                         prepared, settings)
        for start in range(0, max(n_features, 1), search_chunk)
    ]
    beam_parts = [part[0] for part in parts]
    rank_sum = torch.cat([part[1] for part in parts])
    count = torch.cat([part[2] for part in parts])
    n_candidates = torch.cat([part[3] for part in parts])
    states = [_concatenate_states([part[4][step] for part in parts]) for step in range(len(parts[0][4]))]
    final = _concatenate_states(beam_parts)
    alternative = "greater" if mode == "positive" else "less"
    auc = auc_from_rank_sums(rank_sum, count, n_samples)
    p_value = mann_whitney_pvalue(auc, count, n_samples, ranked.tie_term[:, None], alternative)
    p_value = p_value.masked_fill(final.length.to(p_value.device) == 0, float("nan"))
    return SearchResult(final, p_value.cpu(), n_candidates.cpu(), ranked.tie_term.cpu(), states)


def _concept_rank_sums(doubled: torch.Tensor, prepared: PreparedLabels, chunk: int,
                       backend: str = "auto", scratch: Scratch | None = None) -> torch.Tensor:
    """``[F, K]`` float64 rank sums of every concept, exact (sums of integers below 2**53).

    On the CPU one feature at a time through the samples' concepts (each sample's doubled rank is added
    to its concepts: the ranks are read in order and the K sums stay in cache); elsewhere as a sparse
    product with ``chunk`` features at a time (float64 on both sides: CUDA has no integer sparse products;
    the sums of integers below 2**53 are exact in any order).
    """
    n_features, n_samples = doubled.shape
    out = torch.empty(n_features, prepared.n_concepts, dtype=torch.float64, device=doubled.device)
    if prepared.by_sample is not None and not device_kernels(doubled.device, backend):
        _concept_rank_sums_cpu(doubled.numpy(), prepared.by_sample, chunk, out.numpy(), scratch)
        return out.mul_(0.5)
    for start in range(0, n_features, chunk):
        stop = min(start + chunk, n_features)
        column = torch.empty(n_samples, stop - start, dtype=torch.float64, device=doubled.device)
        column.copy_(doubled[start:stop].T)
        out[start:stop] = torch.sparse.mm(prepared.matrix, column).T.mul_(0.5)
        del column
    return out


def _concept_rank_sums_cpu(doubled: np.ndarray, by_sample: Any, chunk: int, out: np.ndarray,
                           scratch: Scratch | None = None) -> None:
    """:func:`_concept_rank_sums` on the CPU: each thread multiplies the ``[K, N]`` labels with a group of
    features' ranks at once (one pass over the labels for up to 16 features: the product reads the labels,
    not the ranks), in a float64 buffer lent by ``scratch`` (the same memory from group to group and batch to
    batch); at most ``chunk`` features' buffers at once."""
    n_features, n_samples = doubled.shape
    n_workers = max(1, min(chunk, n_features, torch.get_num_threads()))
    width = max(1, min(16, chunk // n_workers, -(-n_features // n_workers)))
    scratch = Scratch() if scratch is None else scratch

    def group_sums(start: int) -> None:
        stop = min(start + width, n_features)
        columns = scratch.take((n_samples, stop - start), np.float64)
        try:
            np.copyto(columns, doubled[start:stop].T)
            out[start:stop] = (by_sample @ columns).T
        finally:
            scratch.give(columns)

    # scipy releases the GIL in the product: the threads sum in parallel
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        list(pool.map(group_sums, range(0, n_features, width)))


class _Settings(NamedTuple):
    L: int
    B: int
    limit_search: int | None
    low: float
    high: float
    sign: float
    memorize_states: bool
    list_elements: int


def _search_features(doubled: torch.Tensor, concept_rank_sums: torch.Tensor, prepared: PreparedLabels,
                     settings: _Settings) -> tuple:
    """The beam search of a chunk of features: ``(final BeamState, rank sums [F, B], counts [F, B],
    n_candidates [F], states)``."""
    L, B, low, high, sign = settings.L, settings.B, settings.low, settings.high, settings.sign
    device = doubled.device
    n_features, n_samples = doubled.shape
    n_concepts = prepared.n_concepts
    n_prims = 2 * n_concepts
    total_rank_sum = n_samples * (n_samples + 1) / 2.0

    concept_counts = prepared.counts  # [K] float64
    prim_rank_sums = torch.cat([concept_rank_sums, total_rank_sum - concept_rank_sums], dim=1)  # [F, 2K]
    prim_counts = torch.cat([concept_counts, n_samples - concept_counts])  # [2K]
    prim_auc = auc_from_rank_sums(prim_rank_sums, prim_counts[None, :], n_samples)

    allowed = _allowed_primitives(prim_auc, settings.limit_search)  # [F, 2K] bool
    valid = allowed & ((prim_counts >= low) & (prim_counts <= high))[None, :]
    n_candidates = valid.sum(dim=1)
    order, take = _select(sign * prim_auc, valid, B)  # [F, B]
    del prim_auc, valid

    beam_length = torch.where(take, 1, 0)
    primitives = torch.full((n_features, B, L), -1, dtype=torch.long, device=device)
    operators = torch.full((n_features, B, L), -1, dtype=torch.long, device=device)
    primitives[:, :, 0] = torch.where(take, order, -1)
    beam_rank_sum = torch.gather(prim_rank_sums, 1, order).masked_fill(~take, 0.0)
    beam_count = prim_counts[order].masked_fill(~take, 0.0)
    del prim_rank_sums
    states = []
    if settings.memorize_states:
        states.append(_state(primitives, operators, beam_length, beam_count, beam_rank_sum, n_samples))

    for _step in range(1, L):
        # rank sums and counts of (phi AND c) for every beam formula phi and concept c
        and_rank_sum, and_count = _and_statistics(doubled, prepared, primitives, operators, beam_length,
                                                  concept_rank_sums, settings.list_elements)

        # every candidate's rank sum and count by inclusion-exclusion, written after the old beam
        # (which comes first, so that it wins ties against longer formulas)
        all_rank_sum = _candidates(beam_rank_sum, and_rank_sum, concept_rank_sums, total_rank_sum)
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
        n_candidates += cand_valid.flatten(1).sum(dim=1)
        all_auc = auc_from_rank_sums(all_rank_sum, all_count, n_samples)
        del cand_count, cand_valid, used, fresh

        # equivalent formulas (a AND b from beam a and from beam b) can occupy several of the top
        # entries: each distinct formula at most min(B, L) + 1 times, so this many always suffice
        n_take = min(all_auc.shape[1], B * (min(B, L) + 1))
        order, take = _select(sign * all_auc, all_valid, n_take)
        del all_auc, all_valid
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
        del all_rank_sum, all_count
        primitives = new_prims.masked_fill(~has[:, :, None], -1)
        operators = new_ops.masked_fill(~has[:, :, None], -1)
        beam_length = new_length.masked_fill(~has, 0)
        if settings.memorize_states:
            states.append(_state(primitives, operators, beam_length, beam_count, beam_rank_sum, n_samples))

    final = _state(primitives, operators, beam_length, beam_count, beam_rank_sum, n_samples)
    return final, beam_rank_sum, beam_count, n_candidates, states


def _concatenate_states(states: list[BeamState]) -> BeamState:
    return BeamState(*(torch.cat([getattr(s, name) for s in states])
                       for name in ("primitives", "operators", "length", "n_positive", "auc")))


def _count_bounds(n_samples: int, min_fraction: float, max_fraction: float, min_support: int = 0) -> tuple:
    """The allowed range of positive counts: fraction in [min, max], 0 < T < 1, and at least ``min_support``
    samples where the formula holds and as many where it fails."""
    low = max(1.0, min_fraction * n_samples, float(min_support))
    high = min(n_samples - 1.0, max_fraction * n_samples, float(n_samples - min_support))
    # counts are integers; tolerate the rounding of fraction * N
    eps = 1e-9 * n_samples
    return low - eps, high + eps


def _allowed_primitives(prim_auc: torch.Tensor, limit_search: int | None) -> torch.Tensor:
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
        per_row = keep.sum(dim=1)
        n_keep = int(per_row.max())
        # the kept entries of every row in ascending order, padded with -inf scores (a padded row has at
        # least k kept entries, all finite: the padding never reaches its top k)
        rows, columns = torch.nonzero(keep, as_tuple=True)
        slot = torch.arange(len(rows), device=keyed.device) - (per_row.cumsum(0) - per_row)[rows]
        candidates = torch.zeros(keyed.shape[0], n_keep, dtype=torch.long, device=keyed.device)
        candidates[rows, slot] = columns
        sub = torch.full((keyed.shape[0], n_keep), -torch.inf, dtype=keyed.dtype, device=keyed.device)
        sub[rows, slot] = keyed[rows, columns]
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
    """Transposed labels ``[K, N]`` in the forms the search uses.

    Attributes
    ----------
    matrix : torch.Tensor
        Sparse CSR float64 ``[K, N]``: the concepts' rank sums are one product with it.
    rows : _SparseRows
        The samples of every concept (sorted), sharing the CSR's column indices.
    samples : _SparseRows
        The concepts of every sample (the transposed structure): a listed sample adds its rank to each.
    sides : _SparseRows
        The shorter side of every concept: its samples, or for a concept that holds for more than half
        of the samples, the samples where it does not hold (sorted).
    flipped : torch.Tensor
        ``[K]`` bool, True where ``sides`` lists the samples where the concept does not hold.
    counts : torch.Tensor
        ``[K]`` float64 number of samples of every concept.
    by_sample : scipy.sparse.csc_matrix or None
        On the CPU, the labels ``[K, N]`` as a float64 CSC matrix sharing the arrays of ``samples``: its
        product with a feature's ranks reads the ranks in order (None on other devices).
    dense_t : torch.Tensor or None
        ``[K, N]`` bool, for small label matrices (at most :data:`DENSE_MAX_ELEMENTS` entries): there the
        statistics of ``phi AND c`` come from dense products, faster than sample lists (None otherwise).
    """

    matrix: torch.Tensor
    rows: _SparseRows
    samples: _SparseRows
    sides: _SparseRows
    flipped: torch.Tensor
    counts: torch.Tensor
    by_sample: scipy.sparse.csc_matrix | None
    dense_t: torch.Tensor | None = None

    @property
    def n_samples(self) -> int:
        return self.rows.n_columns

    @property
    def n_concepts(self) -> int:
        return len(self.flipped)

    @property
    def nbytes(self) -> int:
        """Bytes held by the prepared labels (arrays shared between their forms counted once)."""
        arrays = [self.matrix.crow_indices(), self.matrix.col_indices(), self.matrix.values(), self.flipped,
                  self.counts, self.dense_t]
        for rows in (self.rows, self.samples, self.sides):
            arrays += [rows.crow, rows.col, rows.counts]
        if self.by_sample is not None:
            arrays += [torch.from_numpy(a) for a in (self.by_sample.data, self.by_sample.indices,
                                                     self.by_sample.indptr)]
        held = {a.data_ptr(): a.numel() * a.element_size() for a in arrays if a is not None}
        return sum(held.values())


def prepare_labels(labels_t: torch.Tensor, backend: str = "auto") -> PreparedLabels:
    """Prepare transposed sparse labels ``[K, N]`` (CSR or COO) once for many :func:`beam_search` calls.

    The structures are built on the CPU (scipy's compressed-matrix conversions) and moved to the device
    of ``labels_t``; duplicate entries count once. ``by_sample`` (the scipy matrix) is kept only where the
    numpy / scipy kernels run (``backend="auto"`` on the CPU, see :mod:`crp_invert.core.backend`).
    """
    device = labels_t.device
    if labels_t.layout != torch.sparse_csr:
        labels_t = labels_t.to_sparse_coo().coalesce().to_sparse_csr()
    n_concepts, n_samples = labels_t.shape
    ones = np.ones(labels_t.col_indices().numel())
    by_concept = scipy.sparse.csr_matrix(
        (ones, labels_t.col_indices().cpu().numpy(), labels_t.crow_indices().cpu().numpy()),
        shape=(n_concepts, n_samples))
    by_concept.sum_duplicates()  # sorts every row's samples
    ones = ones[:by_concept.nnz]
    by_sample = by_concept.tocsc()  # the concepts of every sample, sorted
    by_sample.data = ones  # all values are 1: the CSC matrix shares the CSR's values

    def tensor(array: np.ndarray) -> torch.Tensor:
        # scipy's index arrays as they are (int32 below 2**31 entries): on the CPU shared, not copied
        return torch.from_numpy(array).to(device)

    rows = _SparseRows(tensor(by_concept.indptr), tensor(by_concept.indices), n_samples)
    samples = _SparseRows(tensor(by_sample.indptr), tensor(by_sample.indices), n_concepts)
    values = torch.from_numpy(ones).to(device)
    matrix = torch.sparse_csr_tensor(rows.crow, rows.col, values, size=(n_concepts, n_samples),
                                     check_invariants=False)
    counts = np.diff(by_concept.indptr)
    flipped = 2 * counts > n_samples
    sides = rows if not flipped.any() else _shorter_sides(by_concept, flipped, device)
    dense_t = None
    if n_concepts * n_samples <= DENSE_MAX_ELEMENTS:
        dense_t = torch.from_numpy(by_concept.toarray() != 0).to(device)
    return PreparedLabels(matrix, rows, samples, sides, torch.from_numpy(flipped).to(device),
                          rows.counts.to(torch.float64), None if device_kernels(device, backend) else by_sample,
                          dense_t)


def _shorter_sides(by_concept: scipy.sparse.csr_matrix, flipped: np.ndarray, device: torch.device) -> _SparseRows:
    """The rows of ``by_concept`` (sorted), with the complement in place of every flipped row."""
    n_samples = by_concept.shape[1]
    parts = []
    holds = np.zeros(n_samples, dtype=bool)
    for concept, (start, stop) in enumerate(zip(by_concept.indptr[:-1], by_concept.indptr[1:])):
        samples = by_concept.indices[start:stop]
        if flipped[concept]:
            holds[samples] = True
            parts.append(np.flatnonzero(~holds))
            holds[samples] = False
        else:
            parts.append(samples)
    crow = np.zeros(len(parts) + 1, dtype=by_concept.indptr.dtype)
    crow[1:] = np.cumsum([len(part) for part in parts])
    col = np.concatenate(parts).astype(by_concept.indices.dtype, copy=False)
    return _SparseRows(torch.from_numpy(crow).to(device), torch.from_numpy(col).to(device), n_samples)


# rank sums and counts of phi AND c are packed into one int64 (count * S + doubled rank sum, with S larger
# than any doubled rank sum) up to this many samples: 2 N**3 < 2**63
_MAX_PACKED_SAMPLES = 1_600_000


def _and_statistics(doubled, prepared, primitives, operators, length, concept_rank_sums, list_elements) -> tuple:
    """Rank sums and counts ``[F, B, K]`` float64 of ``phi AND c`` for every beam formula and concept.

    Each formula's sample list (see :func:`_formula_lists`) is expanded into its samples' concepts; every
    (sample, concept) pair adds the sample's doubled rank to the pair (formula, concept). Where the list
    holds the samples outside ``phi``, the sums are subtracted from the concept's. Up to
    :data:`_MAX_PACKED_SAMPLES` samples each pair adds ``2 r + S`` (``S = 2 N**2 + 1`` exceeds every
    doubled rank sum) to one int64, from which count and rank sum are read off exactly.
    """
    if _prefer_dense(prepared, primitives.shape[2]):
        return _dense_and_statistics(doubled, prepared, primitives, operators, length, list_elements)
    n_features, width, _ = primitives.shape
    n_samples = doubled.shape[1]
    n_concepts = prepared.n_concepts
    n_beams = n_features * width
    packed = n_samples <= _MAX_PACKED_SAMPLES
    scale = 2 * n_samples * n_samples + 1
    total = torch.zeros(n_beams * n_concepts, dtype=torch.long, device=doubled.device)
    counts = None if packed else torch.zeros_like(total)
    flags = torch.zeros(n_beams, dtype=torch.bool, device=doubled.device)
    for sample, beam, values in _listed_ranks(doubled, prepared, primitives, operators, length, list_elements,
                                              flags):
        if packed:
            values += scale
        # pairs of one segment take about as much as half of the list elements
        for start, stop in _segments(prepared.samples.counts[sample], list_elements // 2):
            entry, index = prepared.samples.expand(sample[start:stop])
            key = beam[start:stop][entry] * n_concepts + prepared.samples.col[index]
            del index
            total.index_add_(0, key, values[start:stop][entry])
            if counts is not None:
                counts += torch.bincount(key, minlength=len(counts))
            del entry, key
    if packed:
        counts = torch.div(total, scale, rounding_mode="floor")
        total -= counts * scale
    shape = (n_features, width, n_concepts)
    rank_sum = total.view(shape).to(torch.float64).mul_(0.5)
    count = counts.view(shape).to(torch.float64)
    del total, counts
    outside = flags.view(n_features, width, 1)
    rank_sum = torch.where(outside, concept_rank_sums[:, None, :] - rank_sum, rank_sum)
    count = torch.where(outside, prepared.counts - count, count)
    return rank_sum, count


def _prefer_dense(prepared: PreparedLabels, max_length: int) -> bool:
    """Dense products where they cost less than the sample lists: ``N K`` multiply-adds per formula against about
    ``L`` lists of the mean side length, each element paired with its sample's concepts (plus merging)."""
    if prepared.dense_t is None:
        return False
    n_samples, n_concepts = prepared.n_samples, prepared.n_concepts
    mean_side = float(prepared.sides.counts.sum()) / max(n_concepts, 1)
    concepts_per_sample = float(prepared.samples.col.numel()) / max(n_samples, 1)
    list_cost = _LIST_NS_PER_PAIR * max_length * mean_side * (4.0 + concepts_per_sample)
    return _DENSE_NS_PER_PRODUCT * n_samples * n_concepts < list_cost


def _formula_masks(dense_t: torch.Tensor, prims: torch.Tensor, ops: torch.Tensor,
                   lengths: torch.Tensor) -> torch.Tensor:
    """``[g, N]`` bool: where each left-deep formula holds (all-False for an empty formula)."""
    n_concepts = dense_t.shape[0]

    def primitive(codes: torch.Tensor) -> torch.Tensor:
        return dense_t[codes.clamp(min=0) % n_concepts] ^ (codes >= n_concepts)[:, None]

    masks = primitive(prims[:, 0]) & (lengths > 0)[:, None]
    for position in range(1, prims.shape[1]):
        extend = lengths > position
        if not bool(extend.any()):
            break
        atom = primitive(prims[:, position])
        joined = torch.where((ops[:, position] == AND)[:, None], masks & atom, masks | atom)
        masks = torch.where(extend[:, None], joined, masks)
    return masks


def _dense_and_statistics(doubled, prepared, primitives, operators, length, list_elements) -> tuple:
    """:func:`_and_statistics` by dense products: the masks of the formulas ``[g, N]``, weighted by the doubled
    ranks, times the labels ``[N, K]`` (float64: sums of integers below 2**53 are exact in any order; CUDA has
    no integer matrix products). Formulas are taken in groups whose masks fit the list memory."""
    n_features, width, max_length = primitives.shape
    n_samples, n_concepts = doubled.shape[1], prepared.n_concepts
    n_beams = n_features * width
    labels = prepared.dense_t.T.to(torch.float64)  # [N, K]
    prims = primitives.reshape(n_beams, max_length).to(doubled.device)
    ops = operators.reshape(n_beams, max_length).to(doubled.device)
    lengths = length.reshape(n_beams).to(doubled.device)
    rank_sum = torch.empty(n_beams, n_concepts, dtype=torch.float64, device=doubled.device)
    count = torch.empty_like(rank_sum)
    # per formula of a group: its mask, its weighted mask and its counts as float64 (about 17 bytes per sample)
    group = max(1, list_elements * _LIST_BYTES // (17 * n_samples))
    for start in range(0, n_beams, group):
        stop = min(start + group, n_beams)
        masks = _formula_masks(prepared.dense_t, prims[start:stop], ops[start:stop], lengths[start:stop])
        weights = masks.to(torch.float64)
        count[start:stop] = weights @ labels
        features = torch.div(torch.arange(start, stop, device=doubled.device), width, rounding_mode="floor")
        weights.mul_(doubled[features])
        rank_sum[start:stop] = (weights @ labels).mul_(0.5)
        del masks, weights
    shape = (n_features, width, n_concepts)
    return rank_sum.view(shape), count.view(shape)


def beam_rank_sums(doubled: torch.Tensor, prepared: PreparedLabels, primitives: torch.Tensor,
                   operators: torch.Tensor, length: torch.Tensor,
                   memory_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank sums and counts ``[F, B]`` float64 of beam formulas on the samples of ``prepared``.

    Parameters
    ----------
    doubled : torch.Tensor
        ``[F, N]`` doubled midranks (:func:`~crp_invert.core.metrics.compact_ranks`).
    prepared : PreparedLabels
        The labels of the same N samples.
    primitives, operators, length : torch.Tensor
        The formulas, as in :class:`BeamState` (empty slots give 0 and 0).
    memory_bytes : int, optional
        Working memory for the formulas' sample lists (default 256 MiB, at least 1.5 N list elements).
    """
    n_features, width, _ = primitives.shape
    n_samples = prepared.n_samples
    device = doubled.device
    n_beams = n_features * width
    list_elements = max((3 * n_samples + 1) // 2,
                        (256 << 20 if memory_bytes is None else int(memory_bytes)) // _LIST_BYTES)
    total = torch.zeros(n_beams, dtype=torch.long, device=device)
    count = torch.zeros(n_beams, dtype=torch.long, device=device)
    flags = torch.zeros(n_beams, dtype=torch.bool, device=device)
    primitives, operators, length = primitives.to(device), operators.to(device), length.to(device)
    for _sample, beam, values in _listed_ranks(doubled, prepared, primitives, operators, length, list_elements,
                                               flags):
        total.index_add_(0, beam, values)
        count += torch.bincount(beam, minlength=n_beams)
    # a list of the samples outside the formula: the rest of all N (N + 1) doubled ranks
    total = torch.where(flags, n_samples * (n_samples + 1) - total, total)
    count = torch.where(flags, n_samples - count, count)
    active = length.reshape(n_beams) > 0
    rank_sum = total.masked_fill(~active, 0).to(torch.float64).mul_(0.5).view(n_features, width)
    return rank_sum, count.masked_fill(~active, 0).to(torch.float64).view(n_features, width)


def _listed_ranks(doubled, prepared, primitives, operators, length, list_elements, flags) -> Iterator[tuple]:
    """The sample lists of all formulas ``[F, B, L]``, group by group (see :func:`_formula_groups`): yields
    ``(sample, beam, doubled rank)`` of every listed sample, int64, with ``beam`` the formula's index into
    the flattened ``[F * B]``; sets ``flags[beam]`` (see :func:`_formula_lists`)."""
    n_features, width, max_length = primitives.shape
    n_samples = doubled.shape[1]
    n_beams = n_features * width
    prims = primitives.reshape(n_beams, max_length)
    ops = operators.reshape(n_beams, max_length)
    lengths = length.reshape(n_beams)
    flat_ranks = doubled.reshape(-1)
    for beams in _formula_groups(prepared, prims, lengths, list_elements):
        keys, flags[beams] = _formula_lists(prepared, prims[beams], ops[beams], lengths[beams])
        owner = torch.div(keys, n_samples, rounding_mode="floor")
        sample = keys - owner * n_samples
        del keys
        beam = beams[owner]
        del owner
        values = flat_ranks[torch.div(beam, width, rounding_mode="floor") * n_samples + sample].long()
        yield sample, beam, values


def _formula_groups(prepared: PreparedLabels, prims: torch.Tensor, lengths: torch.Tensor,
                    list_elements: int) -> Iterator[torch.Tensor]:
    """Indices of the formulas with a length, in groups whose sample lists fit ``list_elements``."""
    active = torch.nonzero(lengths > 0).view(-1)
    if len(active) == 0:
        return
    n_samples = prepared.n_samples
    # a merged list is at most the sum of its atoms' lists; merging holds at most N + N / 2 elements
    atoms = prims[active]
    sizes = prepared.sides.counts[(atoms.clamp(min=0) % prepared.n_concepts)]
    inside = torch.arange(prims.shape[1], device=prims.device)[None, :] < lengths[active][:, None]
    bound = (sizes * inside).sum(1).clamp(max=(3 * n_samples + 1) // 2).cpu()
    yield from (active[start:stop] for start, stop in _segments(bound, list_elements))


def _segments(sizes: torch.Tensor, limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges ``[start, stop)`` of items whose sizes sum to at most ``limit`` (one item at
    least)."""
    n_items = len(sizes)
    if n_items == 0:
        return
    ends = sizes.long().cumsum(0)
    if int(ends[-1]) <= limit:
        yield 0, n_items
        return
    start, base = 0, 0
    while start < n_items:
        stop = int(torch.searchsorted(ends, base + limit, right=True))
        stop = max(stop, start + 1)
        yield start, stop
        base = int(ends[stop - 1])
        start = stop


def _formula_lists(prepared: PreparedLabels, prims: torch.Tensor, ops: torch.Tensor,
                   lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted sample lists of ``g`` left-deep formulas (all of length >= 1).

    Returns ``keys`` (``formula * N + sample``, ascending) and ``flags`` ``[g]``: False where a
    formula's list holds the samples where it holds, True where it holds the samples where it does not.
    """
    n_samples = prepared.n_samples
    keys, flags = _primitive_lists(prepared, prims[:, 0])
    for position in range(1, prims.shape[1]):
        extend = lengths > position
        if not bool(extend.any()):
            break
        rows = torch.nonzero(extend).view(-1)
        other, other_flags = _primitive_lists(prepared, prims[rows, position])
        owner = torch.div(other, n_samples, rounding_mode="floor")
        other += (rows[owner] - owner) * n_samples
        del owner
        # formulas that end before this position are joined by OR with an empty list: unchanged
        y_flags = torch.zeros_like(flags)
        y_flags[rows] = other_flags
        op = torch.full_like(flags, OR, dtype=torch.long)
        op[rows] = ops[rows, position]
        keys, flags = _merge(keys, flags, other, y_flags, op, n_samples)
    return keys, flags


def _primitive_lists(prepared: PreparedLabels, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample lists (keys ``i * N + sample``) and flags of primitive ``codes[i]``, as in :func:`_formula_lists`."""
    n_concepts = prepared.n_concepts
    concept = codes % n_concepts
    owner, index = prepared.sides.expand(concept)
    keys = owner.mul_(prepared.n_samples).add_(prepared.sides.col[index])
    return keys, prepared.flipped[concept] ^ (codes >= n_concepts)


def _merge(x_keys, x_flags, y_keys, y_flags, op, n_samples) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists of ``X op Y`` for every formula, from sorted lists X and Y with flags (see
    :func:`_formula_lists`). Outside both lists the result is the same for all samples of a formula: its
    new flag. The new list holds the listed samples where the result differs from that."""
    in_y = _member(x_keys, y_keys)
    in_x = _member(y_keys, x_keys)
    is_and = op == AND
    outside = torch.where(is_and, x_flags & y_flags, x_flags | y_flags)
    # a sample of list X: the formula X holds there iff its flag is False
    x_owner = torch.div(x_keys, n_samples, rounding_mode="floor")
    first, second = ~x_flags[x_owner], in_y ^ y_flags[x_owner]
    value = torch.where(is_and[x_owner], first & second, first | second)
    keep_x = value != outside[x_owner]
    del x_owner, first, second, value, in_y
    y_owner = torch.div(y_keys, n_samples, rounding_mode="floor")
    first, second = x_flags[y_owner], ~y_flags[y_owner]
    value = torch.where(is_and[y_owner], first & second, first | second)
    keep_y = ~in_x & (value != outside[y_owner])
    del y_owner, first, second, value, in_x
    return _union_sorted(x_keys[keep_x], y_keys[keep_y]), outside


def _member(keys: torch.Tensor, sorted_keys: torch.Tensor) -> torch.Tensor:
    """``keys[i] in sorted_keys`` for every i."""
    if len(sorted_keys) == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    position = torch.searchsorted(sorted_keys, keys).clamp_(max=len(sorted_keys) - 1)
    return sorted_keys[position] == keys


def _union_sorted(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The sorted union of two sorted lists without common elements."""
    if len(second) == 0:
        return first
    if len(first) == 0:
        return second
    out = torch.empty(len(first) + len(second), dtype=first.dtype, device=first.device)
    out[torch.arange(len(first), device=first.device) + torch.searchsorted(second, first)] = first
    out[torch.arange(len(second), device=first.device) + torch.searchsorted(first, second)] = second
    return out


class _SparseRows:
    """Rows of a sparse matrix without values: ``col`` holds the column of every stored entry in
    row-major order, ``crow`` where each row starts."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, n_columns: int) -> None:
        self.crow = crow
        self.col = col
        self.n_columns = n_columns
        self.counts = self.crow[1:] - self.crow[:-1]

    def expand(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries of rows ``rows`` (1-d), concatenated: for each, the position of its row in
        ``rows`` and its index into ``col``."""
        counts = self.counts[rows].long()
        total = int(counts.sum()) if len(rows) else 0
        owner = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), counts, output_size=total)
        offset = self.crow[rows].long() - (counts.cumsum(0) - counts)
        return owner, torch.arange(total, device=rows.device) + offset[owner]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, *rows.shape]`` boolean: row ``rows[i]`` of the matrix as column ``i``."""
        flat = rows.reshape(-1)
        owner, index = self.expand(flat)
        out = torch.zeros(self.n_columns, flat.numel(), dtype=torch.bool, device=rows.device)
        out[self.col[index], owner] = True
        return out.reshape(self.n_columns, *rows.shape)


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
    """``[F, k]`` True where an earlier entry of the same row is the same formula.

    The signatures are sorted lexicographically and stably (one stable sort per position, last position
    first), so that equal formulas are adjacent with the earliest first: ``O(k log k)`` time and
    ``O(k L)`` memory per row.
    """
    signature = _signature(prims, ops, length, n_concepts)  # [F, k, L + 1]
    n_features, width, n_positions = signature.shape
    perm = torch.arange(width, device=signature.device).expand(n_features, width).contiguous()
    for position in reversed(range(n_positions)):
        column = torch.gather(signature[:, :, position], 1, perm)
        perm = torch.gather(perm, 1, torch.sort(column, dim=1, stable=True).indices)
    ordered = torch.gather(signature, 1, perm[:, :, None].expand(-1, -1, n_positions))
    repeated = torch.zeros(n_features, width, dtype=torch.bool, device=signature.device)
    repeated[:, 1:] = (ordered[:, 1:] == ordered[:, :-1]).all(-1)
    return torch.zeros_like(repeated).scatter_(1, perm, repeated)


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


def _state(primitives, operators, length, count, rank_sum, n_samples) -> BeamState:
    auc = auc_from_rank_sums(rank_sum, count, n_samples).masked_fill(length == 0, float("nan"))
    return BeamState(
        primitives.cpu().clone(), operators.cpu().clone(), length.cpu().clone(),
        count.round().long().cpu(), auc.cpu(),
    )
