"""Clever-Hans audit: for every class, the channels that carry most of its relevance, flagged where their
labels point to an artifact or away from the class (the INVERT paper's sections 5.1-5.2).

The workflow (see ``tutorials/04_clever_hans_audit.py``): a user who suspects an artifact (a watermark, a
corner mark) adds a few dozen images that carry it to the labeled data as a new concept (records them into
the same cache, joins the concepts with :meth:`crp_invert.ConceptLabels.merge`), labels the channels again
and calls :func:`audit` with that concept among ``artifacts``. For every class, the channels of a layer are
ranked by their *share* of the class's relevance: the mean relevance of the channel over the samples of the
class (the relevances recorded in the cache are each sample's relevance for its own class), divided by the
sum of the absolute mean relevances of all channels of the layer, so that the absolute shares of a class sum
to 1. With ``by="weight"`` the share is the channel's weight to the class logit over the sum of the absolute
weights of that logit (the ranking of :func:`crp_invert.circuit_by_weight`).

A channel is flagged

* ``"artifact"`` where its best label asserts an artifact concept (a positive literal: ``artifact AND red``,
  not ``ring AND NOT artifact``);
* ``"unrelated"`` where its best label asserts none of the class's concepts (no positive literal names one;
  e.g. ``large AND striped`` or ``NOT red`` for a ``green circle``);
* ``"unlabeled"`` where it has no label.

:meth:`ClassAudit.flagged` counts only channels whose share is at least ``min_share`` (default
:data:`MIN_SHARE`): a channel carrying 2 % of a class's relevance is no Clever Hans, whatever its label.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .core.concepts import ConceptLabels
from .core.formula import Formula
from .core.jsonio import json_record, read_json, write_json
from .storage.cache import ActivationCache

__all__ = ["audit", "Audit", "ClassAudit", "AuditChannel", "literals", "positive_literals", "class_concepts_from_data",
           "MIN_SHARE", "FLAGS"]

logger = logging.getLogger(__name__)

#: default share of a class's relevance from which a flagged channel counts (see :meth:`ClassAudit.flagged`)
MIN_SHARE = 0.1
FLAGS = ("artifact", "unrelated", "unlabeled")
_FORMAT = "crp-invert.Audit"


def literals(formula: Formula) -> frozenset[tuple[str, bool]]:
    """The literals of a formula with NOT pushed to the atoms (De Morgan): ``(concept, positive)`` pairs.

    >>> sorted(literals(Formula.parse("artifact AND NOT (ring OR NOT red)")))
    [('artifact', True), ('red', True), ('ring', False)]
    """
    if not isinstance(formula, Formula):
        raise TypeError(f"expected a Formula, got {type(formula).__name__}")

    def walk(node: Formula, negated: bool) -> Iterable[tuple[str, bool]]:
        if node.kind == "concept":
            return ((node.name, not negated),)
        if node.kind == "not":
            return walk(node.children[0], not negated)
        return [literal for child in node.children for literal in walk(child, negated)]

    return frozenset(walk(formula, False))


def positive_literals(formula: Formula) -> frozenset[str]:
    """The concepts a formula asserts: atoms under an even number of NOTs.

    >>> sorted(positive_literals(Formula.parse("artifact AND NOT (ring OR NOT red)")))
    ['artifact', 'red']
    """
    return frozenset(name for name, positive in literals(formula) if positive)


@dataclass(frozen=True)
class AuditChannel:
    """One channel of a class's audit.

    Attributes
    ----------
    layer : str
    channel : int
    share : float
        The channel's share of the class's relevance (or weight), see the module docstring.
    value : float
        Its mean relevance over the class's samples (or its weight).
    label : str or None
        Its best label (formula text); None without one.
    label_auc : float or None
    flag : str or None
        ``"artifact"``, ``"unrelated"``, ``"unlabeled"`` or None.
    """

    layer: str
    channel: int
    share: float
    value: float
    label: str | None = None
    label_auc: float | None = None
    flag: str | None = None


@dataclass
class ClassAudit:
    """The channels carrying most of one class's relevance, largest share first.

    Attributes
    ----------
    target : int
        The class index (output neuron).
    name : str
    concepts : tuple of str
        The class's concepts (a label asserting none of them is ``"unrelated"``).
    n_samples : int
        Samples of the class averaged (0 with ``by="weight"``).
    channels : list of AuditChannel
    """

    target: int
    name: str
    concepts: tuple[str, ...]
    n_samples: int
    channels: list[AuditChannel] = field(default_factory=list)

    def flagged(self, min_share: float = MIN_SHARE) -> list[AuditChannel]:
        """The flagged channels whose share is at least ``min_share``."""
        return [c for c in self.channels if c.flag is not None and c.share >= min_share]


@dataclass
class Audit:
    """The audit of one layer: per class, the channels with the largest share of its relevance, flagged.

    Attributes
    ----------
    layer : str
    quantity : str
        ``"relevance"`` or ``"weight"``: what the shares are shares of.
    artifacts : tuple of str
        The concepts marked as artifacts.
    min_share : float
        The share from which flagged channels count (:meth:`flagged`).
    classes : list of ClassAudit
        In class order.
    """

    layer: str
    quantity: str
    artifacts: tuple[str, ...]
    min_share: float
    classes: list[ClassAudit] = field(default_factory=list)

    def __getitem__(self, key: int | str) -> ClassAudit:
        """A class's audit by class index or name."""
        for item in self.classes:
            if item.target == key or item.name == key:
                return item
        raise KeyError(f"no class {key!r} in the audit; classes: {[c.name for c in self.classes][:8]}")

    def flagged(self, min_share: float | None = None) -> dict[str, list[AuditChannel]]:
        """Class name -> its flagged channels with share >= ``min_share`` (default: :attr:`min_share`), for the
        classes that have any."""
        threshold = self.min_share if min_share is None else float(min_share)
        result = {item.name: item.flagged(threshold) for item in self.classes}
        return {name: channels for name, channels in result.items() if channels}

    def table(self, max_channels: int | None = None) -> str:
        """Plain text: per class its channels (share, flag, label)."""
        lines = [f"audit of layer {self.layer}: share of each class's {self.quantity} per channel; artifacts: "
                 f"{', '.join(self.artifacts) or '(none)'}; flags count from share {self.min_share:g}"]
        for item in self.classes:
            flagged = item.flagged(self.min_share)
            note = f"  <- {len(flagged)} flagged" if flagged else ""
            lines.append(f"{item.name} ({item.n_samples} samples){note}")
            for channel in item.channels[:max_channels]:
                mark = f"[{channel.flag}]" if channel.flag else ""
                lines.append(f"  {channel.layer}:{channel.channel:<4d} share {channel.share:6.3f}  {mark:<12s} "
                             f"{channel.label or '(no label)'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "format": _FORMAT, "layer": self.layer, "quantity": self.quantity, "artifacts": list(self.artifacts),
            "min_share": self.min_share,
            "flagged": {name: [c.channel for c in channels] for name, channels in self.flagged().items()},
            "classes": [{"target": c.target, "name": c.name, "concepts": list(c.concepts), "n_samples": c.n_samples,
                         "channels": [_json_row(asdict(channel)) for channel in c.channels]} for c in self.classes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Audit:
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} object (its 'format' must be {_FORMAT!r})")
        classes = [json_record(ClassAudit, {**_mapping(c, "class"), "channels": [
                       json_record(AuditChannel, row, nan_fields=("share", "value")) for row in _list(c, "channels")]})
                   for c in _list(data, "classes")]
        for item in classes:
            item.concepts = tuple(_strings(item.concepts, "concepts"))
        return cls(layer=json_record(_Text, {"text": data["layer"]}).text, quantity=str(data["quantity"]),
                   artifacts=tuple(_strings(data["artifacts"], "artifacts")),
                   min_share=json_record(_Number, {"value": data["min_share"]}).value, classes=classes)

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        """The audit as JSON text; also written to ``path`` when given."""
        return write_json(self.to_dict(), path, indent)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Audit:
        return cls.from_dict(read_json(text_or_path))

    def _repr_html_(self) -> str:
        from .core.html import html_table
        return html_table(["class", "channel", "share", "flag", "label"], ([c.name, f"{x.layer}:{x.channel}", x.share,
                          x.flag, x.label] for c in self.classes for x in c.channels), f"audit of {self.layer}", 50)


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Number:
    value: float


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"an audit's {what} must be a JSON object, got {type(value).__name__}")
    return value


def _list(data: Any, key: str) -> list[Any]:
    value = _mapping(data, "document")[key]
    if not isinstance(value, list):
        raise TypeError(f"an audit's {key!r} must be a list, got {type(value).__name__}")
    return value


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise TypeError(f"an audit's {what} must be a list of strings, got {value!r:.60}")
    return list(value)


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in row.items()}


def class_concepts_from_data(concepts: ConceptLabels, targets: Any, class_names: Sequence[str],
                             min_fraction: float = 0.9) -> dict[str, tuple[str, ...]]:
    """Class name -> the concepts that hold for at least ``min_fraction`` of the class's samples.

    For classes defined by attributes (the demo: ``red circle`` -> ``circle``, ``red``, ``round``, ``warm``)
    this recovers them from the labeled data; a class without samples gets no concept.
    """
    if not isinstance(concepts, ConceptLabels):
        raise TypeError(f"concepts must be a ConceptLabels, got {type(concepts).__name__}")
    if not 0.0 < float(min_fraction) <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
    targets = _targets(targets, concepts.n_samples)
    matrix = concepts.sparse().tocsr()
    result = {}
    for index, name in enumerate(class_names):
        rows = np.flatnonzero(targets == index)
        if rows.size == 0:
            result[name] = ()
            continue
        share = np.asarray(matrix[rows].sum(axis=0)).ravel() / rows.size
        result[name] = tuple(concepts.names[k] for k in np.flatnonzero(share >= min_fraction))
    return result


def _targets(targets: Any, n_rows: int) -> np.ndarray:
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    targets = np.asarray(targets).reshape(-1)
    if targets.shape != (n_rows,) or (targets.size and not np.issubdtype(targets.dtype, np.integer)):
        raise ValueError(f"targets must be {n_rows} class indices (one per row of the cache), got dtype "
                         f"{targets.dtype} and shape {targets.shape}")
    return targets.astype(np.int64)


def _relevance_matrix(cache: Any, layer: str) -> np.ndarray:
    if isinstance(cache, (ActivationCache, str, os.PathLike)):
        own = not isinstance(cache, ActivationCache)
        store = ActivationCache(cache) if own else cache
        try:
            store.require_complete(layer)
            return store.relevances(layer).numpy().astype(np.float64)
        finally:
            if own:
                store.close()
    if isinstance(cache, torch.Tensor):
        cache = cache.detach().cpu().numpy()
    matrix = np.asarray(cache, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"relevances must be [N, C], got shape {matrix.shape}")
    return matrix


def _flag(label: Formula | None, artifacts: frozenset[str], own: frozenset[str]) -> str | None:
    if label is None:
        return "unlabeled"
    asserted = positive_literals(label)
    if asserted & artifacts:
        return "artifact"
    if not asserted & own:
        return "unrelated"
    return None


def _class_rows(targets: np.ndarray | None, samples: Any, n_rows: int) -> np.ndarray | None:
    if targets is None:
        return None
    keep = np.ones(n_rows, dtype=bool)
    if samples is not None:
        if isinstance(samples, torch.Tensor):
            samples = samples.detach().cpu().numpy()
        samples = np.asarray(samples)
        if samples.dtype == np.bool_:
            if samples.shape != (n_rows,):
                raise ValueError(f"a boolean samples mask must have shape ({n_rows},), got {samples.shape}")
            keep = samples
        else:
            keep = np.zeros(n_rows, dtype=bool)
            keep[samples.astype(np.int64)] = True
    return keep


def audit(
    cache: Any,
    labels: Any,
    layer: str,
    class_names: Sequence[str],
    *,
    targets: Any = None,
    artifacts: Iterable[str] = (),
    class_concepts: Mapping[str, Iterable[str]] | None = None,
    concepts: ConceptLabels | None = None,
    by: str = "relevance",
    weight: Any = None,
    k: int = 5,
    min_share: float = MIN_SHARE,
    samples: Any = None,
) -> Audit:
    """Audit one layer: per class the ``k`` channels with the largest share of its relevance, flagged.

    Parameters
    ----------
    cache : ActivationCache, str, os.PathLike or array
        The cache whose relevances of ``layer`` are read (each row: that sample's relevance for its own
        class, as CRP's FeatureVisualization records it), or an ``[N, C]`` relevance array.
        Not read with ``by="weight"`` (pass None).
    labels : LayerLabels or mapping of str to LayerLabels
        The channels' labels (over concepts that include the artifact concepts).
    layer : str
    class_names : sequence of str
        Name of every class; class ``i`` is ``targets == i`` (or row ``i`` of ``weight``).
    targets : array-like of int, optional
        ``[N]`` class of every row of the cache (required with ``by="relevance"``).
    artifacts : iterable of str
        Concepts the user marks as artifacts.
    class_concepts : mapping of str to iterable of str, optional
        Class name -> its concepts. Default: from ``concepts`` and ``targets`` with
        :func:`class_concepts_from_data` (the concepts of at least 90 % of the class's samples).
    concepts : ConceptLabels, optional
        The concepts of the cache's samples, for the default ``class_concepts``; also checks that the
        artifact concepts exist.
    by : {"relevance", "weight"}
        Shares of the recorded relevances, or of the weights ``weight`` [classes, C] (e.g. the last linear
        layer's ``weight`` when ``layer`` feeds it).
    weight : torch.Tensor or array, optional
        With ``by="weight"``.
    k : int
        Channels listed per class.
    min_share : float
        Flags count from this share (:meth:`ClassAudit.flagged`).
    samples : boolean mask or indices, optional
        Rows of the cache to average (default: all), e.g. without the added artifact images.

    Returns
    -------
    Audit
    """
    if by not in ("relevance", "weight"):
        raise ValueError(f"by must be 'relevance' or 'weight', got {by!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not 0.0 <= float(min_share) <= 1.0:
        raise ValueError(f"min_share must be in [0, 1], got {min_share!r}")
    class_names = [str(name) for name in class_names]
    artifacts = tuple(str(name) for name in artifacts)
    if concepts is not None:
        unknown = [name for name in artifacts if name not in concepts]
        if unknown:
            raise KeyError(f"artifact concept(s) {unknown} are not among the concepts; add the artifact images "
                           "as a concept first (ConceptLabels.merge)")
    layer_labels = labels.get(layer) if isinstance(labels, Mapping) else labels
    if layer_labels is None:
        raise KeyError(f"no labels for layer {layer!r}")

    if by == "relevance":
        matrix = _relevance_matrix(cache, layer)
        if targets is None:
            raise ValueError("targets (the class of every row of the cache) are required with by='relevance'")
        targets = _targets(targets, matrix.shape[0])
        keep = _class_rows(targets, samples, matrix.shape[0])
        values, counts = [], []
        for index in range(len(class_names)):
            rows = keep & (targets == index)
            counts.append(int(rows.sum()))
            values.append(matrix[rows].mean(axis=0) if rows.any() else np.full(matrix.shape[1], np.nan))
        values = np.stack(values) if values else np.zeros((0, matrix.shape[1]))
    else:
        if weight is None:
            raise ValueError("by='weight' needs weight= (the [classes, C] weight of the layer fed by the channels)")
        values = (weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight))
        values = values.astype(np.float64)
        if values.ndim != 2 or values.shape[0] != len(class_names):
            raise ValueError(f"weight must be [classes, C] with {len(class_names)} classes, got {values.shape}")
        counts = [0] * len(class_names)
    n_channels = values.shape[1]
    if len(layer_labels) != n_channels:
        raise ValueError(f"the labels of layer {layer!r} have {len(layer_labels)} channels, the {by} {n_channels}")

    if class_concepts is None:
        if concepts is None or targets is None:
            raise ValueError("give class_concepts, or concepts and targets to derive them")
        class_concepts = class_concepts_from_data(concepts, targets, class_names)
    missing = [name for name in class_names if name not in class_concepts]
    if missing:
        raise KeyError(f"no class concepts for the classes {missing[:5]}")

    best = [layer_labels.best(channel) for channel in range(n_channels)]
    artifact_set = frozenset(artifacts)
    result = Audit(layer=layer, quantity=by, artifacts=artifacts, min_share=float(min_share))
    for index, name in enumerate(class_names):
        own = tuple(class_concepts[name])
        row = values[index]
        total = np.abs(row).sum()
        item = ClassAudit(target=index, name=name, concepts=own, n_samples=counts[index])
        if counts[index] or by == "weight":
            share = row / total if total > 0 else np.zeros_like(row)
            order = sorted(range(n_channels), key=lambda c: (-share[c], c))[:k]
            for channel in order:
                explanation = best[channel]
                item.channels.append(AuditChannel(
                    layer=layer, channel=int(channel), share=float(share[channel]), value=float(row[channel]),
                    label=None if explanation is None else str(explanation.formula),
                    label_auc=None if explanation is None else float(explanation.auc),
                    flag=_flag(None if explanation is None else explanation.formula, artifact_set, frozenset(own)),
                ))
        result.classes.append(item)
    logger.info("audit of %s: %d classes, %d with flagged channels", layer, len(class_names), len(result.flagged()))
    return result
