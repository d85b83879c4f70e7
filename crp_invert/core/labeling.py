"""The pure labeling of an [N, F] array: feature batches through the beam search, decoded into
:class:`~crp_invert.core.labels.LayerLabels`, with the memory model that sizes the batches.

Examples
--------
>>> import torch
>>> from crp_invert import ConceptLabels, SearchParams
>>> from crp_invert.core.labeling import label_array
>>> generator = torch.Generator().manual_seed(0)
>>> labels = torch.rand(200, 3, generator=generator) < 0.3
>>> activations = labels[:, :1].float() + 0.1 * torch.rand(200, 2, generator=generator)
>>> result = label_array(activations, ConceptLabels(labels, ["red", "round", "big"]), SearchParams(L=2), progress=False)
>>> str(result[0][0].formula), round(result[0][0].auc, 3)
('red', 1.0)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .backend import check_backend
from .concepts import ConceptLabels
from .formula import Formula
from .labels import Explanation, LayerLabels, correct_p_values
from .metrics import CompactRanks, auc_from_rank_sums, compact_ranks, mann_whitney_pvalue
from .params import SearchParams
from .scratch import Scratch
from .search import (
    BeamState,
    PreparedLabels,
    SearchMemory,
    available_memory,
    beam_rank_sums,
    beam_search,
    default_memory_budget,
    memory_limit,
    prepare_labels,
)

__all__ = ["label_array", "planned_memory", "batch_plan", "default_feature_batch_size", "available_memory",
           "read_feature_columns", "check_finite"]

logger = logging.getLogger(__name__)


def default_feature_batch_size(n_samples: int, B: int, memory_bytes: int | None = None,
                               device: str | torch.device | None = None, *, L: int = 3, n_concepts: int = 0,
                               itemsize: int = 4) -> int:
    """A feature batch size whose memory fits ``memory_bytes`` (see :class:`~crp_invert.core.search.SearchMemory`).

    A batch of F features takes ``F * (N * (itemsize + 4) + 16 K)`` bytes (the scores as read, their int32
    doubled midranks, the concepts' rank sums) besides the search's working memory, a quarter of the
    budget (at least what one feature needs); everything else the search allocates is independent of F
    and fits the working memory. By default the budget is
    :func:`~crp_invert.core.search.default_memory_budget` of ``device``: a quarter of its free memory, at
    most 1 GiB on a CPU and 4 GiB on a GPU, at least 128 MiB.
    """
    budget = default_memory_budget(device) if memory_bytes is None else int(memory_bytes)
    return SearchMemory(int(n_samples), int(n_concepts), int(B), int(L)).feature_batch(budget, itemsize)


def batch_plan(plan: SearchMemory, n_features: int, budget: int, itemsize: int = 4, copies: int = 1,
               overlap: bool = True) -> tuple[int, bool, int]:
    """``(feature batch, prefetch, budget of one batch)`` of :func:`label_array` for a layer of ``n_features``.

    One batch if the layer fits the budget; else, where half of the budget holds the least working memory and a
    feature, two batches at a time with half of the budget each: the next one read and ranked in a thread while
    the current one is searched. Either way the batches in flight, their working memory included, fit ``budget``.
    ``overlap=False`` (activations already on the GPU: nothing to read, and one CUDA stream runs ranking and
    search one after the other) keeps one batch at a time.
    """
    batch = plan.feature_batch(budget, itemsize, copies)
    half_fits = budget // 2 >= plan.minimum_working_memory() + plan.feature_bytes(itemsize, copies)
    if overlap and batch < n_features and half_fits:
        return plan.feature_batch(budget // 2, itemsize, copies), True, budget // 2
    return batch, False, budget


def _align_to_chunks(feature_batch_size: int, activations: Any) -> int:
    """A batch size that reads whole chunk columns of a chunked (HDF5) dataset: a multiple of the chunk
    width, or a divisor of it, so that no chunk is read by two batches more often than needed."""
    chunks = getattr(activations, "chunks", None)
    if not isinstance(chunks, tuple) or len(chunks) != 2 or not chunks[1]:
        return feature_batch_size
    width = int(chunks[1])
    if feature_batch_size >= width:
        return feature_batch_size - feature_batch_size % width
    return max(d for d in range(1, feature_batch_size + 1) if width % d == 0)


def _itemsize(activations: Any) -> int:
    """Bytes per value of a column batch as read (integers are converted to float64)."""
    dtype = getattr(activations, "dtype", None)
    if isinstance(dtype, torch.dtype):
        # torch.dtype.itemsize needs torch >= 2.1; element_size() works on the declared floor 2.0
        return torch.empty((), dtype=dtype).element_size() if dtype.is_floating_point else 8
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return 8
    return dtype.itemsize if dtype.kind == "f" else 8


def label_array(
    activations: Any,
    concepts: ConceptLabels,
    params: SearchParams,
    *,
    device: str | torch.device = "cpu",
    validation: None | float | np.ndarray | torch.Tensor = None,
    layer: str | None = None,
    progress: bool = True,
    seed: int = 0,
    prepared: PreparedLabels | Callable[[], PreparedLabels] | None = None,
    memory_bytes: int | None = None,
    backend: str = "auto",
) -> LayerLabels:
    """Label every column of ``activations`` with INVERT explanations (see :meth:`ConceptLabeler.label`).

    ``prepared`` is ``prepare_labels(concepts.torch_sparse_t(device))``, or a function that returns them,
    passed by callers that label several arrays with the same concepts (a function is called while the first
    batch is read and ranked). ``memory_bytes`` is the memory budget of a feature
    batch (default :func:`~crp_invert.core.search.default_memory_budget`); a ValueError is raised before
    any column is read if one feature needs more than it (by default: more than
    :func:`~crp_invert.core.search.memory_limit`). ``backend`` chooses the kernels (``"auto"``: numpy / scipy
    on the CPU, torch elsewhere; ``"torch"``: torch on any device; see :mod:`crp_invert.core.backend`).
    """
    check_backend(backend)
    if not isinstance(concepts, ConceptLabels):
        raise TypeError(f"concepts must be a ConceptLabels, got {type(concepts).__name__}")
    if not isinstance(params, SearchParams):
        raise TypeError(f"params must be a SearchParams, got {type(params).__name__}")
    device = torch.device(device)
    split = _split_samples(activations, concepts, validation, seed)
    batches = _plan_batches(activations, concepts, split, params, device, memory_bytes)
    n_features = _shape_of(activations)[1]
    bar = tqdm(range(0, n_features, batches.feature_batch_size), desc=f"labeling {layer}" if layer else "labeling",
               unit="batch", disable=not progress or n_features <= batches.feature_batch_size, leave=False)
    # buffers kept from batch to batch (fresh memory costs a page fault per 4 KiB)
    scratch = Scratch()
    ranking = _Ranking(activations, device, batches.rank_chunk, split.search_rows, split.held_rows, backend,
                       scratch)
    found = _SearchedBeams(_Decoder(concepts.names), split.n_search, params)
    with ThreadPoolExecutor(max_workers=1) as preparing:
        # the concepts are prepared while the first batch is read and ranked
        labels_future = preparing.submit(_prepared_labels, concepts, split, device, backend, prepared)
        batches_found = _ranked_batches(ranking, bar, batches.feature_batch_size, n_features, batches.prefetch)
        for search_ranks, held_ranks in batches_found:
            labels_t, held_labels = labels_future.result()
            result = beam_search(search_ranks, labels_t, memory_bytes=batches.working_memory, backend=backend,
                                 scratch=scratch, **params.search_kwargs())
            scratch.give(search_ranks.doubled)
            del search_ranks
            held = None
            if held_ranks is not None:
                held = _held_out_statistics(held_ranks, held_labels, result.beam, params.mode,
                                            batches.working_memory)
                del held_ranks
            found.add(result, held)
            del result
            if batches.prefetch and device.type == "cpu":
                release_freed_memory()
    parameters = dict(params.to_dict(), n_samples=split.n_samples, n_search_samples=split.n_search,
                      validation=None if split.held_out is None else int(split.held_out.sum()))
    return LayerLabels(correct_p_values(found.explanations), concepts.names, layer, parameters, found.states)


class _Split(NamedTuple):
    """The samples the search sees and those held out for validation (all searched without validation)."""

    n_samples: int
    held_out: np.ndarray | None
    search_rows: torch.Tensor | None
    held_rows: torch.Tensor | None
    search_concepts: ConceptLabels

    @property
    def n_search(self) -> int:
        return self.search_concepts.n_samples


def _split_samples(activations: Any, concepts: ConceptLabels, validation: Any, seed: int) -> _Split:
    """Check that activations and concepts describe the same samples, and split off the validation samples."""
    n_samples = _shape_of(activations)[0]
    if n_samples != concepts.n_samples:
        raise ValueError(
            f"activations have N = {n_samples} samples but the concept labels have "
            f"N = {concepts.n_samples}; they must describe the same samples in the same order"
        )
    held_out = _validation_mask(validation, n_samples, seed)
    search_concepts = concepts if held_out is None else concepts.subset(~held_out)
    if search_concepts.n_samples < 2:
        raise ValueError("fewer than 2 samples are left for the search after the validation split")
    if held_out is None:
        return _Split(n_samples, None, None, None, concepts)
    return _Split(n_samples, held_out, torch.from_numpy(np.flatnonzero(~held_out)),
                  torch.from_numpy(np.flatnonzero(held_out)), search_concepts)


class _Batches(NamedTuple):
    """How the features are searched: batch size, whether the next batch is prefetched, the memory of a search
    and the columns ranked at once, and the memory of the batches in flight (the model's prediction)."""

    feature_batch_size: int
    prefetch: bool
    working_memory: int
    rank_chunk: int
    in_flight_bytes: int


def _plan_batches(activations: Any, concepts: ConceptLabels, split: _Split, params: SearchParams,
                  device: torch.device, memory_bytes: int | None) -> _Batches:
    """Refuse up front what cannot fit (ValueError before any column is read), then size the batches."""
    plan = SearchMemory(split.n_search, concepts.n_concepts, params.B, params.L)
    itemsize = _itemsize(activations)
    copies = 1 if split.held_out is None else 2  # the batch as read, and its rows for the search
    plan.check(memory_limit(device) if memory_bytes is None else int(memory_bytes), itemsize)
    budget = default_memory_budget(device) if memory_bytes is None else int(memory_bytes)
    feature_batch_size, prefetch = params.feature_batch_size, False
    if feature_batch_size is None:
        on_device = isinstance(activations, torch.Tensor) and activations.device.type != "cpu"
        feature_batch_size, prefetch, budget = batch_plan(plan, _shape_of(activations)[1], budget, itemsize,
                                                          copies, overlap=not on_device)
        feature_batch_size = _align_to_chunks(feature_batch_size, activations)
    working_memory = plan.working_memory(budget)
    batch = min(feature_batch_size, _shape_of(activations)[1])
    in_flight = (2 if prefetch else 1) * (batch * plan.feature_bytes(itemsize, copies) + working_memory)
    return _Batches(feature_batch_size, prefetch, working_memory, plan.chunks(working_memory)[0], in_flight)


def planned_memory(activations: Any, concepts: ConceptLabels, params: SearchParams, *,
                   device: str | torch.device = "cpu", validation: Any = None, seed: int = 0,
                   memory_bytes: int | None = None) -> dict[str, int | bool]:
    """How :func:`label_array` would search ``activations`` now (the budget depends on the free memory), as
    the memory model (:class:`~crp_invert.core.search.SearchMemory`) plans it.

    Returns
    -------
    dict
        ``feature_batch_size``, ``prefetch`` (two batches in flight), ``working_memory`` (bytes of each
        batch's search), ``in_flight_bytes``: the most memory the labeling holds at once besides the process,
        the concepts and the prepared labels (:attr:`~crp_invert.ConceptLabeler.prepared_nbytes`). An upper bound: a
        small layer (one batch of few features) uses less of its working memory (measured 0.8 of the
        prediction at 20,000 x 32 and 50,000 x 64).

    ``activations`` is what :func:`label_array` takes: an array, a tensor, or a dataset such as
    ``ActivationCache.dataset(layer, "activation")`` (with the cache kept open).

    Examples
    --------
    >>> import numpy as np
    >>> from crp_invert import ConceptLabels, SearchParams
    >>> from crp_invert.core.labeling import planned_memory
    >>> concepts = ConceptLabels(np.eye(4, dtype=bool)[np.arange(100) % 4], ["a", "b", "c", "d"])
    >>> plan = planned_memory(np.zeros((100, 8), dtype=np.float32), concepts, SearchParams())
    >>> plan["feature_batch_size"], plan["prefetch"]
    (8, False)
    """
    split = _split_samples(activations, concepts, validation, seed)
    batches = _plan_batches(activations, concepts, split, params, torch.device(device), memory_bytes)
    return {"feature_batch_size": min(batches.feature_batch_size, _shape_of(activations)[1]),
            "prefetch": batches.prefetch,
            "working_memory": batches.working_memory, "in_flight_bytes": batches.in_flight_bytes}


def _prepared_labels(concepts: ConceptLabels, split: _Split, device: torch.device, backend: str,
                     prepared: PreparedLabels | Callable[[], PreparedLabels] | None,
                     ) -> tuple[PreparedLabels, PreparedLabels | None]:
    """The concepts prepared for the search (the caller's where given), and those of the held-out samples."""
    if split.held_out is None and callable(prepared):
        return prepared(), None
    if split.held_out is None:
        return (prepare_labels(concepts.torch_sparse_t(device), backend) if prepared is None else prepared), None
    return (prepare_labels(split.search_concepts.torch_sparse_t(device), backend),
            prepare_labels(concepts.subset(split.held_out).torch_sparse_t(device), backend))


class _SearchedBeams:
    """The explanations of every searched feature batch, in feature order (and the beams after every length
    with ``memorize_states``)."""

    def __init__(self, decoder: _Decoder, n_search: int, params: SearchParams) -> None:
        self.decoder, self.n_search, self.mode = decoder, n_search, params.mode
        self.explanations: list[list[Explanation]] = []
        self.states: list[list[list[Explanation]]] | None = (
            [[] for _ in range(params.L)] if params.memorize_states else None)

    def add(self, result: Any, held: Any) -> None:
        self.explanations += self.decoder.explanations(result.beam, result.p_value, result.n_candidates,
                                                       self.n_search, held)
        if self.states is None:
            return
        alternative = "greater" if self.mode == "positive" else "less"
        for step, state in enumerate(result.states):
            p_value = mann_whitney_pvalue(state.auc.nan_to_num(0.5), state.n_positive, self.n_search,
                                          result.tie_term[:, None], alternative)
            self.states[step] += self.decoder.explanations(state, p_value, result.n_candidates, self.n_search, None)


# helpers -----------------------------------------------------------------------------------------
class _Ranking(NamedTuple):
    activations: Any
    device: torch.device
    rank_chunk: int
    search_rows: torch.Tensor | None
    held_rows: torch.Tensor | None
    backend: str
    scratch: Scratch

    def batch(self, start: int, stop: int) -> tuple[CompactRanks, CompactRanks | None]:
        """Columns ``[start, stop)`` read, checked and ranked: ``(search ranks, held-out ranks or None)``."""
        block = read_feature_columns(self.activations, start, stop, self.device)
        check_finite(block, start)
        # keep only the ranks: the scores of the batch are freed before the search
        held = (None if self.held_rows is None
                else compact_ranks(block[self.held_rows.to(block.device)], self.rank_chunk, self.backend))
        rows = block if self.search_rows is None else block[self.search_rows.to(block.device)]
        return compact_ranks(rows, self.rank_chunk, self.backend, self.scratch), held


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (loaded on first use, not at import)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return freed heap memory to the system: glibc keeps the freed blocks of every thread's arena (the ranking
    threads, the prefetch thread), so without this the resident memory of a long labeling run grows above what
    its batches hold at once."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _ranked_batches(ranking: _Ranking, starts: Any, batch: int, n_features: int, prefetch: bool) -> Iterator[tuple]:
    """The ranked feature batches in order; with ``prefetch`` the next batch is read and ranked in a thread while
    the caller searches the current one (both cores busy: reading and ranking are half of the work)."""
    if not prefetch:
        for start in starts:
            yield ranking.batch(start, min(start + batch, n_features))
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for start in starts:
            if pending is None:
                pending = pool.submit(ranking.batch, start, min(start + batch, n_features))
            current = pending.result()
            following = start + batch
            pending = (pool.submit(ranking.batch, following, min(following + batch, n_features))
                       if following < n_features else None)
            yield current


def _shape_of(activations: Any) -> tuple:
    shape = getattr(activations, "shape", None)
    if shape is None:
        raise TypeError(
            "activations must be a torch.Tensor, a numpy array or an array-like with .shape and "
            f"column slicing, got {type(activations).__name__}"
        )
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"activations must have shape [N, F], got {shape}")
    if shape[1] == 0:
        raise ValueError("activations have no feature (F = 0)")
    return shape


def read_feature_columns(activations: Any, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Columns ``[start, stop)`` of an [N, F] array-like as a real tensor on ``device`` (shared by labeling and
    concept search)."""
    # integers beyond 2**53 (e.g. int64 near 2**60) would tie as float64: they become exact dense ranks
    from .checks import exact_float_columns

    return exact_float_columns(activations[:, start:stop]).detach().to(device)


def check_finite(block: torch.Tensor, offset: int) -> None:
    """ValueError naming the first feature (``offset`` + column) of ``block`` with NaN or inf."""
    # one pass without a temporary as large as the block: a column whose sum is finite has only finite
    # values (NaN and inf propagate); only columns whose sum is not (NaN, inf, or an overflow) are checked
    # value by value
    suspects = (~torch.isfinite(block.sum(dim=0))).nonzero().flatten().tolist()
    bad_features = [column for column in suspects if not bool(torch.isfinite(block[:, column]).all())]
    if not bad_features:
        return
    column = block[:, bad_features[0]]
    kind = "NaN" if bool(torch.isnan(column).any()) else "inf"
    more = f" (and {len(bad_features) - 1} more features in this batch)" if len(bad_features) > 1 else ""
    raise ValueError(f"activations of feature {offset + bad_features[0]} contain {kind}{more}")


def _validation_mask(validation: Any, n_samples: int, seed: int) -> np.ndarray | None:
    if validation is None:
        return None
    if isinstance(validation, (float, int)) and not isinstance(validation, bool):
        if not 0.0 < float(validation) < 1.0:
            raise ValueError(f"a validation share must be in (0, 1), got {validation}")
        n_held = int(round(float(validation) * n_samples))
        generator = np.random.default_rng(seed)
        mask = np.zeros(n_samples, dtype=bool)
        mask[generator.permutation(n_samples)[:n_held]] = True
    else:
        if isinstance(validation, torch.Tensor):
            validation = validation.detach().cpu().numpy()
        mask = np.asarray(validation)
        if mask.dtype != np.bool_ or mask.shape != (n_samples,):
            raise ValueError(
                f"validation must be a share in (0, 1) or a boolean mask of shape ({n_samples},), "
                f"got dtype {mask.dtype} and shape {mask.shape}"
            )
    if mask.all() or not mask.any():
        raise ValueError("validation must hold out some but not all samples")
    return mask


def _held_out_statistics(ranks: CompactRanks, held_labels: PreparedLabels, beam: BeamState, mode: str,
                         memory_bytes: int) -> dict[str, torch.Tensor]:
    """AUC, p-value and fraction of the final beam formulas on held-out samples."""
    n_held = ranks.doubled.shape[1]
    rank_sums, counts = beam_rank_sums(ranks.doubled, held_labels, beam.primitives, beam.operators, beam.length,
                                       memory_bytes)
    auc = auc_from_rank_sums(rank_sums, counts, n_held)
    alternative = "greater" if mode == "positive" else "less"
    p_value = mann_whitney_pvalue(auc, counts, n_held, ranks.tie_term[:, None], alternative)
    return {"auc": auc.cpu(), "p_value": p_value.cpu(), "fraction": (counts / n_held).cpu()}


class _Decoder:
    """Turns primitive / operator codes into (cached) Formula objects and Explanations."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.n_concepts = len(names)
        self._cache: dict[tuple, Formula] = {}

    def formula(self, prims: Sequence[int], ops: Sequence[int]) -> Formula:
        key = (tuple(prims), tuple(ops))
        formula = self._cache.get(key)
        if formula is None:
            formula = self._primitive(prims[0])
            for op, prim in zip(ops[1:], prims[1:]):
                formula = formula & self._primitive(prim) if op == 0 else formula | self._primitive(prim)
            self._cache[key] = formula
        return formula

    def _primitive(self, code: int) -> Formula:
        atom = Formula.concept(self.names[code % self.n_concepts])
        return ~atom if code >= self.n_concepts else atom

    def explanations(self, beam: BeamState, p_value, n_candidates, n_samples, held) -> list[list[Explanation]]:
        prims, ops, lengths = beam.primitives.tolist(), beam.operators.tolist(), beam.length.tolist()
        aucs, counts, p_values = beam.auc.tolist(), beam.n_positive.tolist(), p_value.tolist()
        candidates = n_candidates.tolist()
        held_lists = {key: value.tolist() for key, value in held.items()} if held else None
        result = []
        for f, feature_lengths in enumerate(lengths):
            beam_list = []
            for b, length in enumerate(feature_lengths):
                if length == 0:
                    continue
                extra = {}
                if held_lists is not None:
                    extra = dict(
                        validation_auc=held_lists["auc"][f][b], validation_p_value=held_lists["p_value"][f][b],
                        validation_fraction=held_lists["fraction"][f][b],
                    )
                beam_list.append(Explanation(
                    formula=self.formula(prims[f][b][:length], ops[f][b][:length]),
                    auc=aucs[f][b], fraction=counts[f][b] / n_samples, length=length,
                    p_value=p_values[f][b], n_candidates=int(candidates[f]), **extra,
                    support=int(counts[f][b]), n_samples=int(n_samples),
                ))
            result.append(beam_list)
        return result


