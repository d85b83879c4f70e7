"""Evidence of a glocal part: how strongly the channel fires on this sample, and whether a label holds.

A channel's label is a claim about the labeling data. On one explained sample, :py:class:`ChannelEvidence`
says where the sample's activation lies among the channel's activations on the labeling data (its
percentile in the activation cache) and whether the shown label holds for the sample's concepts; a part
whose labels all fail while the channel barely fires is *unexplained*. :py:class:`Evidence` says where
:py:func:`crp_invert.decompose` finds the reference activations and the sample's concepts.
"""
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.checks import is_int
from ..storage.cache import ActivationCache

logger = logging.getLogger(__name__)

__all__ = ["LOW_PERCENTILE", "ChannelEvidence", "Evidence", "sample_concepts", "collect_evidence"]

LOW_PERCENTILE = 50.0
"""Default threshold of a low activation: below the channel's median over the labeling data."""


@dataclass(frozen=True)
class ChannelEvidence:
    """How one channel part of a glocal explanation relates to the channel's global label, on this sample.

    Attributes
    ----------
    channel : int
        The channel.
    activation : float
        This sample's activation of the channel, pooled as the reference was (e.g. the spatial mean).
    percentile : float
        Where ``activation`` lies among the channel's activations on the labeling data, 0 to 100:
        ``100 * (#below + #equal / 2) / n_reference`` (``scipy.stats.percentileofscore(kind="mean")``).
    n_reference : int
        Number of reference activations (non-finite values, e.g. unrecorded cache rows, are left out).
    label_holds : bool or None
        True: the part's shown label holds for this sample (:py:meth:`Formula.evaluate` on the sample's
        concept labels); False: none of the channel's reliable labels holds (the part shows
        "no reliable label holds here"); None where the channel has no reliable label or the sample's
        concepts are unknown.
    low_percentile : float
        The activation counts as low below this percentile (default 50: below the channel's median).
    n_reliable : int or None
        The channel's reliable labels that were checked on the sample (activation and relevance labels
        together); None in evidence written before this count existed.
    n_holding : int or None
        How many of them hold for the sample; None where the sample's concepts are unknown.
    """

    channel: int
    activation: float
    percentile: float
    n_reference: int
    label_holds: bool | None = None
    low_percentile: float = LOW_PERCENTILE
    n_reliable: int | None = None
    n_holding: int | None = None

    @property
    def low(self) -> bool:
        """The activation is below ``low_percentile`` of the channel's reference activations."""
        return self.percentile < self.low_percentile

    @property
    def unexplained(self) -> bool:
        """The label does not hold and the channel barely fires: its heatmap here is not what the label says."""
        return self.label_holds is False and self.low

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``unexplained`` included for readers; ignored by :meth:`from_dict`)."""
        return {"channel": self.channel, "activation": self.activation, "percentile": self.percentile,
                "n_reference": self.n_reference, "label_holds": self.label_holds,
                "low_percentile": self.low_percentile, "n_reliable": self.n_reliable,
                "n_holding": self.n_holding, "unexplained": self.unexplained}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ChannelEvidence":
        """Rebuild from :meth:`to_dict` output (evidence without the counts of reliable labels loads too)."""
        holds, n_reliable, n_holding = data.get("label_holds"), data.get("n_reliable"), data.get("n_holding")
        return cls(channel=int(data["channel"]), activation=float(data["activation"]),
                   percentile=float(data["percentile"]), n_reference=int(data["n_reference"]),
                   label_holds=None if holds is None else bool(holds),
                   low_percentile=float(data.get("low_percentile", LOW_PERCENTILE)),
                   n_reliable=None if n_reliable is None else int(n_reliable),
                   n_holding=None if n_holding is None else int(n_holding))


@dataclass(frozen=True)
class Evidence:
    """Where :py:func:`decompose` finds the evidence it attaches to every channel part.

    Parameters
    ----------
    reference : ActivationCache, torch.Tensor or numpy.ndarray
        The channel activations of the labeling data: a cache holding the layer (its pooled activations,
        the ones the labels were computed from), or an [N, C] matrix of them.
    concepts : ConceptLabels, optional
        Concept labels of the labeled dataset; with ``sample_index`` they give the sample's concepts.
    sample_index : int or sequence of int, optional
        The explained sample's index in the labeled dataset (one per sample for
        :py:func:`decompose_batch`). Also used to check the computed activation against the cache's row.
    concept_row : mapping or boolean vector, or a sequence of them, optional
        The sample's concepts when it is not in the labeled dataset: ``{"stripes": True, ...}``, a
        one-row :py:class:`ConceptLabels`, or a boolean vector [K] in the order of ``concepts.names``
        (for :py:func:`decompose_batch` one per sample, a [B, K] matrix or a B-row ConceptLabels).
    layer : str, optional
        The layer's name in ``reference`` (default: the decomposed layer).
    pooling : {"mean", "max", "sum"} or callable, optional
        How the sample's layer output is pooled to one value per channel: must be the pooling of the
        reference (default: the cache layer's ``pooling`` attribute, ``"mean"`` for a matrix).
    low_percentile : float
        An activation below this percentile of the channel's reference is low (default 50: the median).

    Notes
    -----
    The sample's activation is the layer output CRP records in the decomposition's class pass, after the
    composite's canonizers (e.g. a merged batch norm), as :py:class:`InvertFeatureVisualization` records
    it: record the reference with the same composite. Labels of ``mode="negative"`` searches describe low
    activations; the ``unexplained`` mark assumes positive labels.

    Examples
    --------
    >>> evidence = Evidence(ActivationCache("acts.h5"), concepts=concepts, sample_index=17)  # doctest: +SKIP
    >>> g = decompose(attribution, dataset[17][0][None], None, "layer4", composite, labels=labels,
    ...               evidence=evidence)                                                    # doctest: +SKIP
    >>> [(e.channel, round(e.percentile), e.label_holds, e.unexplained) for e in g.evidence]  # doctest: +SKIP
    [(12, 97, True, False), (40, 8, False, True), ...]
    """

    reference: Any
    concepts: Any = None
    sample_index: Any = None
    concept_row: Any = None
    layer: str | None = None
    pooling: Any = None
    low_percentile: float = LOW_PERCENTILE

    def __post_init__(self) -> None:
        if isinstance(self.reference, (str, os.PathLike)):
            # a path, like label_cache takes: opened read-only (closed with the Evidence's cache)
            object.__setattr__(self, "reference", ActivationCache(self.reference))
        if isinstance(self.low_percentile, bool) or not isinstance(self.low_percentile, (int, float)) or \
                not 0 <= self.low_percentile <= 100:
            raise ValueError(f"low_percentile must be a number in [0, 100], got {self.low_percentile!r}")
        if not (_is_cache(self.reference) or isinstance(self.reference, (torch.Tensor, np.ndarray))):
            raise TypeError(f"reference must be an ActivationCache or an [N, C] tensor or array, "
                            f"got {type(self.reference).__name__}")


def _is_cache(value: Any) -> bool:
    return callable(getattr(value, "activations", None)) and callable(getattr(value, "info", None))


def _per_sample(value: Any, n_samples: int, what: str, single) -> list[Any]:
    """``value`` as a list of one entry per sample (``single(value)``: whether it is one entry)."""
    if value is None:
        return [None] * n_samples
    if single(value):
        if n_samples != 1:
            raise ValueError(f"{what} is given for one sample but {n_samples} are decomposed: pass one per sample")
        return [value]
    values = list(value)
    if len(values) != n_samples:
        raise ValueError(f"{what} has {len(values)} entries for {n_samples} samples")
    return values


def _row_mapping(row: Any, names: Sequence[str] | None):
    """One sample's concepts as something :py:meth:`Formula.evaluate` reads (one-row ConceptLabels or a mapping)."""
    if row is None:
        return None
    if callable(getattr(row, "mask", None)):
        if getattr(row, "n_samples", 1) != 1:
            raise ValueError(f"concept_row must hold one sample, got ConceptLabels with {row.n_samples} rows")
        return row
    if isinstance(row, Mapping):
        return {str(name): torch.tensor([bool(value)]) for name, value in row.items()}
    vector = row.detach().cpu().numpy() if isinstance(row, torch.Tensor) else np.asarray(row)
    if vector.ndim != 1:
        raise ValueError(f"concept_row must be a boolean vector [K], got shape {vector.shape}")
    if names is None:
        raise ValueError("a boolean concept_row needs the concept names: pass concepts= (ConceptLabels) or "
                         "a mapping {name: bool}")
    if len(vector) != len(names):
        raise ValueError(f"concept_row has {len(vector)} entries for {len(names)} concepts")
    return {name: torch.tensor([bool(value)]) for name, value in zip(names, vector.tolist())}


def _sample_indices(evidence: Evidence, n_samples: int) -> list[int | None]:
    sample_index = evidence.sample_index
    if isinstance(sample_index, (torch.Tensor, np.ndarray)):
        sample_index = sample_index.tolist()
    indices = _per_sample(sample_index, n_samples, "sample_index", is_int)
    for index in indices:
        if index is not None and not is_int(index):
            raise TypeError(f"sample_index must be an int or a sequence of ints, got {index!r}")
    return [None if index is None else int(index) for index in indices]


def _one_row(value: Any) -> bool:
    """Whether ``concept_row`` is one sample's concepts (not one per sample)."""
    if isinstance(value, Mapping) or callable(getattr(value, "mask", None)):
        return True
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 1
    return all(isinstance(entry, (bool, int, float, np.bool_, np.number)) for entry in value)


def sample_concepts(evidence: Evidence, n_samples: int) -> tuple[list[Any], list[int | None]]:
    """Per sample: its concepts (a one-row ConceptLabels or a mapping, or None) and its index in the labeled
    dataset (or None)."""
    indices = _sample_indices(evidence, n_samples)
    names = getattr(evidence.concepts, "names", None)
    row_labels = evidence.concept_row
    if callable(getattr(row_labels, "subset", None)) and n_samples > 1 and row_labels.n_samples == n_samples:
        row_labels = [row_labels.subset([i]) for i in range(n_samples)]  # ConceptLabels, one row per sample
    if row_labels is not None:
        rows = [_row_mapping(row, names) for row in _per_sample(row_labels, n_samples, "concept_row", _one_row)]
    elif evidence.concepts is not None and evidence.sample_index is not None:
        if not callable(getattr(evidence.concepts, "subset", None)):
            raise TypeError(f"concepts must be a ConceptLabels, got {type(evidence.concepts).__name__}")
        rows = []
        for index in indices:
            if not 0 <= index < evidence.concepts.n_samples:
                raise ValueError(f"sample_index {index} is out of range: concepts hold "
                                 f"{evidence.concepts.n_samples} samples")
            rows.append(evidence.concepts.subset([int(index)]))
    else:
        rows = [None] * n_samples
    return rows, indices


def check_concept_names(rows: Sequence[Any], labels: Sequence[Any]) -> None:
    """KeyError naming the concepts the labels use but a sample's concepts lack (concepts of another concept
    set), whether or not a label that uses them would be shown."""
    needed: set[str] = set()
    for layer_labels in labels:
        needed.update(getattr(layer_labels, "concept_names", ()) or ())
    for row in rows:
        if row is None:
            continue
        known = set(row.names) if hasattr(row, "names") else set(row)
        missing = sorted(needed - known)
        if missing:
            raise KeyError(f"unknown concept(s) {missing[:5]} in the sample's concepts: the labels were made with "
                           f"other concepts ({len(needed)} names, e.g. {sorted(needed)[:3]})")


def _evidence_pooling(evidence: Evidence, reference_layer: str):
    """The pooling of the reference: the cache's (checked against ``evidence.pooling``) or the given one."""
    from .recorder import POOLINGS

    recorded = None
    if _is_cache(evidence.reference):
        recorded = evidence.reference.info(reference_layer).get("pooling")
    if evidence.pooling is not None:
        if not callable(evidence.pooling) and evidence.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} or a callable, got {evidence.pooling!r}")
        if recorded in POOLINGS and evidence.pooling != recorded:
            raise ValueError(f"pooling={evidence.pooling!r} but layer {reference_layer!r} of the cache was "
                             f"recorded with pooling {recorded!r}")
        return evidence.pooling
    if recorded is None:
        return "mean"
    if recorded not in POOLINGS:
        raise ValueError(f"layer {reference_layer!r} of the cache was recorded with pooling {recorded!r}: "
                         f"pass the same function as Evidence(pooling=...)")
    return recorded


def _reference_columns(evidence: Evidence, reference_layer: str, n_channels: int, columns: list[int]):
    """The reference activations [N, len(columns)] (float64 numpy) and the dataset index of row 0."""
    reference = evidence.reference
    cache = _is_cache(reference)
    if not cache and reference.ndim != 2:
        raise ValueError(f"reference must be an [N, C] matrix, got shape {tuple(reference.shape)}")
    stored = reference.n_channels(reference_layer) if cache else reference.shape[1]
    if stored != n_channels:
        raise ValueError(f"the reference of layer {reference_layer!r} has {stored} channels but the decomposed "
                         f"layer has {n_channels}: a reference of another layer?")
    if cache:
        start = int(reference.sample_range[0]) if hasattr(reference, "sample_range") else 0
        values = reference.activations(reference_layer, columns=columns)
    else:
        start, values = 0, reference[:, columns]
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy(), start
    return np.asarray(values, dtype=np.float64), start


def _check_reference_rows(evidence: Evidence, indices: list[int | None], start: int, n_rows: int) -> None:
    """ValueError if the concepts or a sample index do not belong to the reference's samples ``[start,
    start + n_rows)`` (concepts of another dataset would give another sample's concepts)."""
    n_concepts = getattr(evidence.concepts, "n_samples", None)
    allowed = {start + n_rows, int(getattr(evidence.reference, "dataset_length", start + n_rows))}
    if n_concepts is not None and n_concepts not in allowed:
        raise ValueError(f"concepts hold {n_concepts} samples but the reference holds {n_rows} (samples "
                         f"[{start}, {start + n_rows})): they must describe the same samples")
    for index in indices:
        if index is not None and not start <= index < start + n_rows:
            raise ValueError(f"sample_index {index} is not a sample of the reference (samples [{start}, "
                             f"{start + n_rows}))")


class _Column:
    """One channel's reference values, sorted once: the percentile of each of many parts by binary search, not
    a pass over the column per part."""

    def __init__(self, column: np.ndarray) -> None:
        self.column = column
        self.finite = np.sort(column[np.isfinite(column)])
        if self.finite.size == 0:
            raise ValueError("the reference holds no recorded (finite) activation of this channel")
        self._largest: float | None = None

    def percentile(self, value: float) -> tuple[float, int]:
        """``scipy.stats.percentileofscore(kind="mean")`` of ``value`` over the finite reference values (a NaN
        value: 0), and their number."""
        if value != value:  # NaN: nothing is below or equal
            return 0.0, int(self.finite.size)
        below = int(np.searchsorted(self.finite, value, side="left"))
        equal = int(np.searchsorted(self.finite, value, side="right")) - below
        return float(100.0 * (below + 0.5 * equal) / self.finite.size), int(self.finite.size)

    def largest(self) -> float:
        """``nanmax(|column|)``, computed at the first call."""
        if self._largest is None:
            self._largest = float(np.nanmax(np.abs(self.column)))
        return self._largest


def _check_reference_row(column: _Column, row: int | None, value: float, where: str) -> None:
    """Warn when the cache's own row of the sample disagrees with the activation computed now."""
    values = column.column
    if row is None or not 0 <= row < len(values) or not np.isfinite(values[row]):
        return
    if abs(values[row] - value) > 1e-3 * abs(value) + 1e-5 * column.largest():
        logger.warning("%s: activation %.6g but the reference holds %.6g; recorded with another composite "
                       "or pooling?", where, value, values[row])


def collect_evidence(evidence: Evidence, layer: str, activation: torch.Tensor, orders: torch.Tensor,
                     choices: Sequence[Sequence[Any]], indices: Sequence[int | None]
                     ) -> list[tuple[ChannelEvidence, ...]]:
    """The evidence of each sample's top channels.

    ``activation`` is the layer output [B, C, ...], ``orders`` [B, k] the channels of each sample's parts,
    ``choices`` the :py:class:`~crp_invert.integration.shown_labels.LabelChoice` of each part and
    ``indices`` each sample's index in the labeled dataset (or None), from :func:`sample_concepts`.
    """
    from .recorder import pool

    n_samples, n_channels = activation.shape[0], activation.shape[1]
    reference_layer = evidence.layer or layer
    pooled = pool(activation.detach(), _evidence_pooling(evidence, reference_layer)).double().cpu()
    columns = sorted(set(orders.reshape(-1).tolist()))
    reference, start = _reference_columns(evidence, reference_layer, n_channels, columns)
    _check_reference_rows(evidence, indices, start, reference.shape[0])
    position = {channel: i for i, channel in enumerate(columns)}
    sorted_columns: dict[int, _Column] = {}
    results = []
    for i in range(n_samples):
        parts = []
        for channel, choice in zip(orders[i].tolist(), choices[i]):
            value = float(pooled[i, channel])
            if channel not in sorted_columns:
                sorted_columns[channel] = _Column(reference[:, position[channel]])
            column = sorted_columns[channel]
            percentile, n_reference = column.percentile(value)
            _check_reference_row(column, None if indices[i] is None else indices[i] - start, value,
                                 f"sample {indices[i]}, channel {channel} of layer {reference_layer!r}")
            parts.append(ChannelEvidence(channel=int(channel), activation=value, percentile=percentile,
                                         n_reference=n_reference, label_holds=choice.holds,
                                         low_percentile=float(evidence.low_percentile),
                                         n_reliable=choice.n_reliable, n_holding=choice.n_holding))
        results.append(tuple(parts))
    return results
