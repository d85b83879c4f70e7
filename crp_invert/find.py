"""Concept search: which channels detect a formula the user writes? (INVERT's question turned around.)

:func:`find_channels` scores every channel of the chosen layers against one formula, e.g.
``"dog AND NOT cat"``, by the exact AUROC of the channel's activations (or relevances) against the
formula's sample mask, with one-sided Mann-Whitney U p-values, and ranks the channels. The formula is any
formula over the concepts, not only one the beam search found.

How: the formula's mask is one boolean vector over the N samples, and the AUC of a channel follows from the
sum of the midranks of the samples where the formula holds. One mask needs no full rank matrix: each channel's
values are sorted (numpy's vectorized sort on the CPU), and the midrank of a positive sample is
``(left + right + 1) / 2`` from a binary search of its value in the sorted values (``left`` values are
smaller, ``right`` are smaller or equal), summed over the positive samples (or the negative ones, whichever
are fewer); the tie groups of the sorted values give the tie correction. The rank sums are exact (sums of
integers, halved), equal to :func:`crp_invert.core.metrics.rank_scores` times the mask (tested), and the AUC
and the p-value come from :func:`~crp_invert.core.metrics.auc_from_rank_sums` and
:func:`~crp_invert.core.metrics.mann_whitney_pvalue`. A cache is streamed in column batches aligned to its HDF5
chunks, as labeling does, so a layer larger than memory is searched with bounded memory.

Examples
--------
>>> import torch
>>> from crp_invert import ConceptLabels
>>> generator = torch.Generator().manual_seed(0)
>>> labels = torch.rand(300, 3, generator=generator) < 0.3
>>> concepts = ConceptLabels(labels, ["red", "round", "big"])
>>> acts = torch.rand(300, 4, generator=generator)
>>> acts[:, 2] += 2 * (labels[:, 0] & ~labels[:, 1])      # channel 2 detects red AND NOT round
>>> found = find_channels("red AND NOT round", {"conv": acts}, concepts)
>>> found[0].layer, found[0].channel, round(found[0].auc, 3)
('conv', 2, 1.0)
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .core.backend import check_backend, device_kernels
from .core.checks import check_int, is_int
from .core.concepts import ConceptLabels
from .core.formula import Formula
from .core.jsonio import json_record, read_json, write_json
from .core.labeling import check_finite, read_feature_columns
from .core.labels import NO_RELIABLE_LABEL, format_p_value
from .core.metrics import RankedScores, auc_from_rank_sums, benjamini_hochberg, mann_whitney_pvalue
from .core.params import MODES
from .storage.cache import ActivationCache, open_for_labeling

__all__ = ["find_channels", "ChannelMatch", "ChannelSearch", "ChannelLabel", "formula_mask", "default_search_batch",
           "best_labels", "labels_next_to", "open_layers", "mask_rank_sums"]

logger = logging.getLogger(__name__)

_FORMAT = "crp-invert.ChannelSearch"
#: elements (samples x channels) ranked at once by default: about 8 MiB of float64 per array
_BATCH_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class ChannelMatch:
    """One channel scored against the searched formula.

    Attributes
    ----------
    layer : str
    channel : int
    auc : float
        AUROC of the channel's values against the formula's mask (exact, ties count one half).
    p_value : float
        One-sided Mann-Whitney U p-value (``greater`` for ``mode="positive"``, ``less`` for ``"negative"``).
    p_value_bh : float
        Benjamini-Hochberg q-value of ``p_value`` over every channel searched.
    label : str or None
        The channel's own best reliable label (formula text) when labels were given, or
        :data:`~crp_invert.core.labels.NO_RELIABLE_LABEL` where it has none; None without labels.
    label_auc : float or None
        The AUC of that label.
    label_support : int or None
        The samples on which that label holds.
    label_q : float or None
        The label's q-value (``p_value_bh``).
    """

    layer: str
    channel: int
    auc: float
    p_value: float
    p_value_bh: float
    label: str | None = None
    label_auc: float | None = None
    label_support: int | None = None
    label_q: float | None = None

    def label_text(self) -> str:
        """The label column of :meth:`ChannelSearch.table`: ``"red AND ring (AUC 0.9812, n 120, q 1.20e-30)"``,
        :data:`~crp_invert.core.labels.NO_RELIABLE_LABEL`, or ``""`` without labels."""
        if self.label is None or self.label_auc is None:
            return self.label or ""
        support = "" if self.label_support is None else f", n {self.label_support}"
        return f"{self.label} (AUC {self.label_auc:.4f}{support}, q {format_p_value(self.label_q)})"


class ChannelLabel(NamedTuple):
    """A channel's own best reliable label as the concept search shows it (all None without labels)."""

    text: str | None = None
    auc: float | None = None
    support: int | None = None
    q_value: float | None = None


class _Scored(NamedTuple):
    """One channel scored against the searched formula, before the ranking."""

    layer: str
    channel: int
    auc: float
    p_value: float
    label: ChannelLabel


@dataclass
class ChannelSearch:
    """The channels of the searched layers ranked by their AUC against one formula, best first.

    A sequence of :class:`ChannelMatch` (``len``, indexing, iteration) with the formula's statistics.

    Attributes
    ----------
    formula : Formula
    source : str
        ``"activation"`` or ``"relevance"``: what was ranked.
    mode : str
        ``"positive"`` (highest AUC first) or ``"negative"`` (lowest first).
    n_samples : int
    n_positive : int
        Samples for which the formula holds.
    layers : list of str
        The layers searched, in order.
    matches : list of ChannelMatch
        Best first (ties: layer order, then channel).
    """

    formula: Formula
    source: str
    mode: str
    n_samples: int
    n_positive: int
    layers: list[str]
    matches: list[ChannelMatch] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Share of the samples for which the formula holds."""
        return self.n_positive / self.n_samples if self.n_samples else math.nan

    def __len__(self) -> int:
        return len(self.matches)

    def __getitem__(self, index: int) -> ChannelMatch:
        return self.matches[index]

    def __iter__(self) -> Iterator[ChannelMatch]:
        return iter(self.matches)

    def top(self, k: int | None) -> ChannelSearch:
        """The ``k`` best matches (all for ``None``)."""
        if k is not None:
            check_int(k, "k", minimum=0)
        return replace(self, matches=list(self.matches[:k] if k is not None else self.matches))

    def of_layer(self, layer: str) -> ChannelSearch:
        """The matches of one layer, best first."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} was not searched; searched: {self.layers}")
        return replace(self, layers=[layer], matches=[m for m in self.matches if m.layer == layer])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per match (the columns of :meth:`table`)."""
        return [asdict(match) for match in self.matches]

    def table(self, max_rows: int | None = None) -> str:
        """A plain-text table: rank, layer, channel, AUC, p, q (BH) and, where labels were given, the channel's own
        label.
        """
        header = ["rank", "layer", "channel", "AUC", "p", "q (BH)", "channel's label (AUC, n = support, q)"]
        lines = []
        for rank, match in enumerate(self.matches[:max_rows], start=1):
            lines.append([str(rank), match.layer, str(match.channel), f"{match.auc:.4f}",
                          format_p_value(match.p_value), format_p_value(match.p_value_bh), match.label_text()])
        if not any(line[-1] for line in lines):  # searched without labels: no empty label column
            header, lines = header[:-1], [line[:-1] for line in lines]
        widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]
        out = [f"formula: {self.formula}  (fraction {self.fraction:.4f}: {self.n_positive} of {self.n_samples} "
               f"samples; source: {self.source}, mode: {self.mode})",
               "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
        if max_rows is not None and len(self.matches) > max_rows:
            out.append(f"... {len(self.matches) - max_rows} more")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (NaN as null)."""
        return {
            "format": _FORMAT, "formula": self.formula.to_json(), "text": str(self.formula), "source": self.source,
            "mode": self.mode, "n_samples": self.n_samples, "n_positive": self.n_positive,
            "fraction": self.fraction, "layers": list(self.layers),
            "matches": [{key: _json_float(value) for key, value in row.items()} for row in self.rows()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelSearch:
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} object (its 'format' must be {_FORMAT!r})")
        rows, layers = data["matches"], data["layers"]
        if not isinstance(rows, list) or not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise TypeError("a ChannelSearch's 'matches' must be a list and its 'layers' a list of names")
        matches = [json_record(ChannelMatch, row, nan_fields=("auc", "p_value", "p_value_bh")) for row in rows]
        return json_record(cls, {"formula": Formula.from_json(data["formula"]), "source": data["source"],
                                 "mode": data["mode"], "n_samples": data["n_samples"],
                                 "n_positive": data["n_positive"], "layers": layers, "matches": matches})

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        """The result as JSON text; also written to ``path`` when given."""
        return write_json(self.to_dict(), path, indent)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> ChannelSearch:
        """Read a result from JSON text or a file."""
        return cls.from_dict(read_json(text_or_path))

    def _repr_html_(self) -> str:
        from .core.html import html_table
        return html_table(["rank", "layer", "channel", "AUC", "p", "q (BH)", "label"], (
            [i + 1, m.layer, m.channel, m.auc, m.p_value, m.p_value_bh, m.label] for i, m in enumerate(self.matches)),
            caption=f"{self.formula} ({self.source}, {self.mode})")


def _json_float(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def formula_mask(formula: Formula | str, concepts: ConceptLabels) -> tuple[Formula, torch.Tensor]:
    """Parse ``formula`` against the concept names (if text) and evaluate it: ``(Formula, bool [N] mask)``."""
    if not isinstance(concepts, ConceptLabels):
        raise TypeError(f"concepts must be a ConceptLabels, got {type(concepts).__name__}")
    if isinstance(formula, str):
        formula = Formula.parse(formula, concepts)
    elif not isinstance(formula, Formula):
        raise TypeError(f"formula must be a Formula or its text, got {type(formula).__name__}")
    unknown = sorted(formula.concepts - set(concepts.names))
    if unknown:
        raise KeyError(f"unknown concept name(s) {unknown} in formula {str(formula)!r}")
    return formula, formula.evaluate(concepts).reshape(-1).cpu()


def default_search_batch(n_samples: int, n_channels: int, chunk_columns: int | None = None) -> int:
    """Channels ranked at once: about 2**20 values (small arrays stay in the CPU caches), at least 1, and a
    multiple of ``chunk_columns`` (the HDF5 chunk width) so that every chunk is read once."""
    batch = max(1, _BATCH_ELEMENTS // max(int(n_samples), 1))
    if chunk_columns:
        batch = max(1, round(batch / chunk_columns)) * int(chunk_columns)
    return int(min(n_channels, batch))


def mask_rank_sums(block: torch.Tensor, mask: torch.Tensor, backend: str = "auto") -> RankedScores:
    """The midrank sum over the samples where ``mask`` holds, and the tie term, of every column of ``block``.

    Equals ``rank_scores(block)`` reduced to one mask (``ranks.T @ mask`` and ``tie_term``), exactly, without the
    ``[N, F]`` rank matrix: each column is sorted once and the masked (or the unmasked, if fewer) values are found
    in it by binary search. On the CPU this runs in numpy (its vectorized sort is about 3 times torch's, and it
    does not contend for threads on a busy machine); elsewhere in torch.

    Parameters
    ----------
    block : torch.Tensor
        ``[N, F]`` finite real values.
    mask : torch.Tensor
        ``[N]`` bool, on the device of ``block``.
    backend : {"auto", "torch"}
        numpy on the CPU and torch elsewhere (``"auto"``), or torch on any device (``"torch"``, see
        :mod:`crp_invert.core.backend`); the sums are the same.

    Returns
    -------
    RankedScores
        ``ranks`` holds the ``[F]`` float64 rank sums (not a rank matrix), ``tie_term`` the ``[F]`` float64
        ``sum(t**3 - t)`` over the tie groups of every column.
    """
    if not device_kernels(block.device, backend):
        rank_sum, tie_term = _mask_rank_sums_numpy(block.numpy(), mask.numpy())
        return RankedScores(torch.from_numpy(rank_sum), torch.from_numpy(tie_term))
    return _mask_rank_sums_torch(block, mask)


def _searched_side(mask, n_samples: int) -> tuple[bool, int]:
    """Search the masked samples if they are at most half, else the others (fewer binary searches)."""
    n_positive = int(mask.sum())
    return n_positive <= n_samples - n_positive, n_positive


def _mask_rank_sums_numpy(block: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.ascontiguousarray(block.T)  # [F, N]: sorting and searching contiguous rows
    n_features, n_samples = rows.shape
    ordered = np.sort(rows, axis=1)
    search_positive, _ = _searched_side(mask, n_samples)
    index = np.flatnonzero(mask if search_positive else ~mask)
    twice = np.empty(n_features, dtype=np.int64)  # 2 x rank sum: midrank = (left + right + 1) / 2
    for feature in range(n_features):
        values = rows[feature, index]
        left = np.searchsorted(ordered[feature], values, side="left")
        right = np.searchsorted(ordered[feature], values, side="right")
        twice[feature] = int(left.sum()) + int(right.sum()) + index.size
    rank_sum = twice.astype(np.float64) * 0.5
    if not search_positive:  # the ranks of all samples sum to N (N + 1) / 2
        rank_sum = n_samples * (n_samples + 1) * 0.5 - rank_sum
    starts = np.ones(ordered.shape, dtype=bool)
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=starts[:, 1:])
    first = np.flatnonzero(starts)  # first position of every tie group, row after row
    size = np.diff(first, append=ordered.size).astype(np.float64)
    tie_term = np.bincount(first // n_samples, weights=size * size * size - size, minlength=n_features)
    return rank_sum, tie_term


def _mask_rank_sums_torch(block: torch.Tensor, mask: torch.Tensor) -> RankedScores:
    rows = block.T.contiguous()
    n_features, n_samples = rows.shape
    ordered = torch.sort(rows, dim=1).values
    search_positive, _ = _searched_side(mask, n_samples)
    index = torch.nonzero(mask if search_positive else ~mask).flatten()
    values = rows[:, index]
    twice = (torch.searchsorted(ordered, values) + torch.searchsorted(ordered, values, right=True)).sum(1)
    rank_sum = (twice + index.numel()).to(torch.float64) * 0.5
    if not search_positive:
        rank_sum = n_samples * (n_samples + 1) * 0.5 - rank_sum
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = torch.nonzero(starts.flatten()).flatten()
    size = torch.diff(first, append=torch.tensor([ordered.numel()], device=first.device)).to(torch.float64)
    tie_term = torch.zeros(n_features, dtype=torch.float64, device=rows.device)
    tie_term.index_add_(0, torch.div(first, n_samples, rounding_mode="floor"), size * size * size - size)
    return RankedScores(rank_sum, tie_term)


def best_labels(labels: Any, layer: str, n_channels: int, n_samples: int | None = None,
                concept_names: Sequence[str] | None = None) -> list[ChannelLabel]:
    """The best reliable label of every channel (:meth:`LayerLabels.best`), :data:`NO_RELIABLE_LABEL` where a
    channel has none, and empty :class:`ChannelLabel` s without labels.

    ``labels`` is ``None``, a ``LayerLabels`` or a mapping of layer name to ``LayerLabels`` (a layer it lacks
    has no labels). ValueError for labels that do not belong to the data: another layer, channel count, N, or
    concepts not in ``concept_names``.
    """
    if isinstance(labels, Mapping):
        labels = labels.get(layer)
    elif getattr(labels, "layer", None) not in (None, layer):
        raise ValueError(f"the labels are of layer {labels.layer!r}, not {layer!r}: pass {{layer: labels}}")
    if labels is None:
        return [ChannelLabel()] * n_channels
    if len(labels) != n_channels:
        raise ValueError(f"the labels of layer {layer!r} have {len(labels)} channels, the data {n_channels}")
    _check_labels_belong(labels, layer, n_samples, concept_names)
    result = []
    for channel in range(n_channels):
        best = labels.best(channel)
        result.append(ChannelLabel(NO_RELIABLE_LABEL) if best is None else
                      ChannelLabel(str(best.formula), float(best.auc), best.support, float(best.p_value_bh)))
    return result


def _check_labels_belong(labels: Any, layer: str, n_samples: int | None,
                         concept_names: Sequence[str] | None) -> None:
    """ValueError if labels were computed on another number of samples or with concepts not given."""
    labeled_n = getattr(labels, "parameters", {}).get("n_samples")
    if n_samples is not None and is_int(labeled_n) and int(labeled_n) != n_samples:
        raise ValueError(f"the labels of layer {layer!r} were computed on N={labeled_n} samples, the data has "
                         f"N={n_samples}: labels of another dataset?")
    unknown = sorted(set(getattr(labels, "concept_names", ())) - set(concept_names or ()))
    if concept_names is not None and unknown:
        raise ValueError(f"the labels of layer {layer!r} use concepts the concepts given do not have: "
                         f"{unknown[:5]}: labels of another concept set?")


def labels_next_to(cache: str | os.PathLike, source: str = "activation") -> Path | None:
    """The ``index.json`` of the labels written next to a cache (``crp-invert demo`` and ``crp-invert label
    --out DIR`` with DIR beside the cache): ``labels_relevance/`` for ``source="relevance"`` (else ``labels/``),
    then ``labels/``; None where there is none.

    Examples
    --------
    >>> labels_next_to("/nonexistent/activations.h5") is None
    True
    """
    folder = Path(cache).parent
    names = ["labels_relevance", "labels"] if source == "relevance" else ["labels"]
    for name in names:
        index = folder / name / "index.json"
        if index.is_file():
            return index
    return None


@contextlib.contextmanager
def open_layers(data: Any, layers: str | Sequence[str] | None, source: str,
                n_samples: int) -> Iterator[tuple[list[str], Callable[[str], Any]]]:
    """The [N, C] arrays to read by layer: ``(layer names, name -> array)``.

    ``data`` is an activation cache or its path (checked and streamed by
    :func:`crp_invert.storage.cache.open_for_labeling`; a path is closed on exit) or a mapping of layer name
    to in-memory ``[N, C]`` arrays.
    """
    if isinstance(data, (ActivationCache, str, os.PathLike)):
        with open_for_labeling(data, layers, source, n_samples) as (cache, names):
            yield names, lambda name: cache.dataset(name, source)
        return
    if not isinstance(data, Mapping):
        raise TypeError("cache must be an ActivationCache, a path to one, or a mapping of layer name to [N, C] "
                        f"arrays, got {type(data).__name__}")
    names = list(data) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    for name in names:
        if name not in data:
            raise KeyError(f"no layer {name!r}; layers: {list(data)}")
        shape = tuple(getattr(data[name], "shape", ()))
        if len(shape) != 2 or shape[0] != n_samples:
            raise ValueError(f"layer {name!r} must have shape [N, C] with N = {n_samples} (the concepts' samples), "
                             f"got {shape}")
    yield names, data.__getitem__


def find_channels(
    formula: Formula | str,
    cache: Any,
    concepts: ConceptLabels,
    layers: str | Sequence[str] | None = None,
    source: str = "activation",
    *,
    labels: Any = None,
    mode: str = "positive",
    feature_batch_size: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    backend: str = "auto",
) -> ChannelSearch:
    """Rank every channel of the chosen layers by the exact AUC of ``formula``.

    Parameters
    ----------
    formula : Formula or str
        Any formula over the concepts, e.g. ``"dog AND NOT cat"`` (text is parsed against the concept
        names; an unknown name raises ``KeyError``).
    cache : ActivationCache, str, os.PathLike or mapping of str to array
        An activation cache (a path is opened read-only and closed afterwards; columns are read in batches),
        or in-memory ``[N, C]`` arrays (torch, numpy, h5py datasets) by layer name.
    concepts : ConceptLabels
        The concepts of the same N samples, in the same order.
    layers : str or sequence of str, optional
        The layers to search (default: all, in cache order).
    source : {"activation", "relevance"}
        Rank what the channels' activations detect or what their relevances do (caches only).
    labels : LayerLabels or mapping of str to LayerLabels, optional
        The channels' own labels: each match then shows its channel's best reliable label, or
        :data:`~crp_invert.core.labels.NO_RELIABLE_LABEL` (``crp-invert find`` reads the labels next to the
        cache by default, see :func:`labels_next_to`).
    mode : {"positive", "negative"}
        Highest AUC first with ``greater`` p-values, or lowest first with ``less`` p-values (channels that
        are *off* where the formula holds).
    feature_batch_size : int, optional
        Channels ranked at once (default :func:`default_search_batch`: about 2**20 values, whole HDF5 chunks).
    device : str or torch.device
        Where the ranks are computed.
    progress : bool
        Show a progress bar over the layers.
    backend : {"auto", "torch"}
        The kernels: numpy on the CPU and torch elsewhere, or torch on any device (see
        :mod:`crp_invert.core.backend`); the results are the same.

    Returns
    -------
    ChannelSearch
        Every channel of every searched layer, best first, with AUC, p-value and BH q-value over all of them.

    Raises
    ------
    ValueError
        The formula holds for no sample or for all (its AUC is undefined), N differs, rows are incomplete.
    KeyError
        Unknown concept or layer.
    """
    _check_search_arguments(source, mode, backend, feature_batch_size)
    target = _FormulaTarget.of(formula, concepts, torch.device(device), mode)
    found: list[_Scored] = []
    with open_layers(cache, layers, source, target.n_samples) as (names, array_of):
        for name in tqdm(names, desc="find_channels", disable=not progress):
            data = array_of(name)
            scores = _score_layer(data, target, feature_batch_size, backend)
            own = best_labels(labels, name, len(scores.aucs), target.n_samples, concepts.names)
            found += [_Scored(name, channel, auc, p_value, own[channel])
                      for channel, (auc, p_value) in enumerate(zip(scores.aucs, scores.p_values))]
    matches = _rank(found, names, mode)
    logger.info("find_channels %r: %d channels in %d layers", str(target.formula), len(matches), len(names))
    return ChannelSearch(formula=target.formula, source=source, mode=mode, n_samples=target.n_samples,
                         n_positive=target.n_positive, layers=list(names), matches=matches)


def _check_search_arguments(source: str, mode: str, backend: str, feature_batch_size: int | None) -> None:
    """The arguments of :func:`find_channels` that need no data, checked before any is read."""
    if source not in ("activation", "relevance"):
        raise ValueError(f"source must be 'activation' or 'relevance', got {source!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_backend(backend)
    if feature_batch_size is not None:
        check_int(feature_batch_size, "feature_batch_size")


class _FormulaTarget(NamedTuple):
    """What every channel is scored against: the formula's mask on ``device`` and its counts."""

    formula: Formula
    mask: torch.Tensor
    n_samples: int
    n_positive: int
    #: the one-sided alternative of the p-values: ``greater`` for ``mode="positive"``
    alternative: str

    @classmethod
    def of(cls, formula: Formula | str, concepts: ConceptLabels, device: torch.device, mode: str) -> _FormulaTarget:
        formula, mask = formula_mask(formula, concepts)
        n_samples = concepts.n_samples
        n_positive = int(mask.sum())
        if not 0 < n_positive < n_samples:
            raise ValueError(f"formula {str(formula)!r} holds for {n_positive} of {n_samples} samples; its AUC is "
                             "undefined unless it holds for some but not all samples")
        alternative = "greater" if mode == "positive" else "less"
        return cls(formula, mask.to(device), n_samples, n_positive, alternative)


class _LayerScores(NamedTuple):
    """The AUC and p-value of every channel of one layer, in channel order."""

    aucs: list[float]
    p_values: list[float]


def _score_layer(data: Any, target: _FormulaTarget, feature_batch_size: int | None, backend: str) -> _LayerScores:
    """Score the [N, C] ``data`` of one layer against ``target``, streamed in column batches."""
    n_channels = int(data.shape[1])
    chunks = getattr(data, "chunks", None)
    batch = feature_batch_size or default_search_batch(target.n_samples, n_channels, chunks[1] if chunks else None)
    device = target.mask.device
    positives = torch.tensor(float(target.n_positive), device=device, dtype=torch.float64)
    aucs, p_values = [], []
    for start in range(0, n_channels, batch):
        block = read_feature_columns(data, start, min(start + batch, n_channels), device)
        finite = None if device_kernels(block.device, backend) else np.isfinite(block.numpy()).all()
        if not finite:  # the message names the feature
            check_finite(block, start)
        rank_sum, tie_term = mask_rank_sums(block, target.mask, backend)
        auc = auc_from_rank_sums(rank_sum, positives, target.n_samples)
        aucs.append(auc)
        p_values.append(mann_whitney_pvalue(auc, target.n_positive, target.n_samples, tie_term, target.alternative))
    if not aucs:
        return _LayerScores([], [])
    return _LayerScores(torch.cat(aucs).cpu().tolist(), torch.cat(p_values).cpu().tolist())


def _rank(found: list[_Scored], names: list[str], mode: str) -> list[ChannelMatch]:
    """The scored channels best first (ties in layer, then channel order), with BH q-values over all of them."""
    q_values = benjamini_hochberg(torch.tensor([row.p_value for row in found], dtype=torch.float64)).tolist()
    layer_order = {name: i for i, name in enumerate(names)}
    sign = -1.0 if mode == "positive" else 1.0
    order = sorted(range(len(found)),
                   key=lambda i: (sign * found[i].auc, layer_order[found[i].layer], found[i].channel))
    return [_match(found[i], q_values[i]) for i in order]


def _match(scored: _Scored, q_value: float) -> ChannelMatch:
    label = scored.label
    return ChannelMatch(layer=scored.layer, channel=scored.channel, auc=scored.auc, p_value=scored.p_value,
                        p_value_bh=q_value, label=label.text, label_auc=label.auc, label_support=label.support,
                        label_q=label.q_value)
