"""Clever-Hans audit: for every class, the channels that carry most of its relevance, flagged where they detect
an artifact or where no reliable label ties them to the class (the INVERT paper's sections 5.1-5.2).

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

* ``"artifact"`` where it *detects* an artifact concept: its activations rank the samples of the concept
  above the others with an AUC of at least ``min_artifact_auc`` (default :data:`MIN_ARTIFACT_AUC`) and a
  Benjamini-Hochberg q-value below ``alpha`` over the layer's channels - the statistics that
  :func:`crp_invert.find.find_channels` computes for the artifact concept. The channel's label does not
  decide: a label is the best of many formulas (``artifact AND blue AND ring`` may hold on three samples),
  the detection is measured on the artifact itself. Without ``concepts`` or activations the detection cannot
  be measured and the audit falls back to the labels (a reliable label asserting the artifact), and says so;
* ``"unrelated"`` where its reliable label asserts none of the class's concepts (no positive literal names
  one; e.g. ``large AND striped`` or ``NOT red`` for a ``green circle``);
* ``"unlabeled"`` where it has no reliable label (:meth:`crp_invert.LayerLabels.best` is None: the audit
  shows :data:`NO_RELIABLE_LABEL`).

:meth:`ClassAudit.flagged` counts only channels whose share is at least ``min_share`` (default
:data:`MIN_SHARE`): a channel carrying 2 % of a class's relevance is no Clever Hans, whatever it detects.
Every class gets one verdict line (:meth:`Audit.verdicts`). NaN or infinite relevances are refused (with the
layer, sample and channel of the first), never averaged away.

Examples
--------
>>> import numpy as np
>>> from crp_invert import ConceptLabels, Explanation, Formula, LayerLabels
>>> rng = np.random.default_rng(0)
>>> targets = np.arange(400) % 2                                  # classes "red" and "blue"
>>> mark = rng.random(400) < 0.3                                  # the artifact, on 30 % of the images
>>> concepts = ConceptLabels(np.stack([targets == 0, targets == 1, mark], 1), ["red", "blue", "mark"])
>>> acts = rng.random((400, 3))
>>> acts[:, 2] += 2 * mark                                        # channel 2 detects the mark
>>> relevances = rng.random((400, 3)) * 0.1
>>> relevances[(targets == 0) & mark, 2] += 3                     # and class "red" leans on it
>>> beams = [[Explanation(Formula.parse(name), 0.9, 0.5, 1, 1e-9)] for name in ("red", "blue", "mark")]
>>> result = audit(relevances, LayerLabels(beams, concepts.names, "conv"), "conv", ["red", "blue"],
...                targets=targets, artifacts=["mark"], concepts=concepts, activations=acts,
...                class_concepts={"red": ["red"], "blue": ["blue"]})
>>> first = result["red"].channels[0]
>>> first.channel, first.flag, first.artifact_auc > 0.9
(2, 'artifact', True)
>>> result.verdicts()[0].startswith("red: artifact suspect conv:2")
True
"""
from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from .core.concepts import ConceptLabels
from .core.formula import Formula
from .core.jsonio import json_record, read_json, write_json
from .core.labels import format_p_value
from .find import find_channels
from .storage.cache import ActivationCache

__all__ = ["audit", "Audit", "ClassAudit", "AuditChannel", "literals", "positive_literals", "class_concepts_from_data",
           "MIN_SHARE", "MIN_ARTIFACT_AUC", "FLAGS", "NO_RELIABLE_LABEL"]

logger = logging.getLogger(__name__)

#: default share of a class's relevance from which a flagged channel counts (see :meth:`ClassAudit.flagged`)
MIN_SHARE = 0.1
#: default AUC from which a channel detects an artifact concept (with q < alpha): it ranks an image with the
#: artifact above one without in at least 90 % of the pairs
MIN_ARTIFACT_AUC = 0.9
FLAGS = ("artifact", "unrelated", "unlabeled")
#: what the audit shows for a channel without a reliable label (``crp_invert.core.labels.NO_RELIABLE_LABEL``)
NO_RELIABLE_LABEL = "no reliable label"
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
        Its best reliable label (formula text); None without one (shown as :data:`NO_RELIABLE_LABEL`).
    label_auc : float or None
    label_support : int or None
        Samples where the label holds (None where the labels do not record it).
    label_q : float or None
        The label's Benjamini-Hochberg q-value.
    artifact : str or None
        The artifact concept the channel detects best (None when the detection was not measured).
    artifact_auc, artifact_q : float or None
        AUC and q-value (BH over the layer's channels) of the channel's activations for that concept.
    flag : str or None
        ``"artifact"``, ``"unrelated"``, ``"unlabeled"`` or None.
    """

    layer: str
    channel: int
    share: float
    value: float
    label: str | None = None
    label_auc: float | None = None
    label_support: int | None = None
    label_q: float | None = None
    artifact: str | None = None
    artifact_auc: float | None = None
    artifact_q: float | None = None
    flag: str | None = None

    @property
    def shown_label(self) -> str:
        """The label as every view shows it: the formula, or :data:`NO_RELIABLE_LABEL`."""
        return NO_RELIABLE_LABEL if self.label is None else self.label


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
    suspect : AuditChannel or None
        Among *all* channels of the layer (not only those listed), the artifact-flagged one with the largest
        share of the class's relevance.
    """

    target: int
    name: str
    concepts: tuple[str, ...]
    n_samples: int
    channels: list[AuditChannel] = field(default_factory=list)
    suspect: AuditChannel | None = None

    @property
    def suspect_share(self) -> float:
        """The share of :attr:`suspect` (0 without one)."""
        return 0.0 if self.suspect is None else self.suspect.share

    def flagged(self, min_share: float = MIN_SHARE) -> list[AuditChannel]:
        """The flagged channels whose share is at least ``min_share``."""
        return [c for c in self.channels if c.flag is not None and c.share >= min_share]

    def verdict(self, min_share: float = MIN_SHARE, quantity: str = "relevance") -> str:
        """One line: an artifact suspect (the detecting channel with the largest share >= ``min_share``), other
        flagged channels, or no finding."""
        if not self.channels:
            return f"{self.name}: not audited (no samples of the class)"
        suspect = self.suspect if self.suspect is not None and self.suspect.share >= min_share else None
        others = [c for c in self.flagged(min_share) if c.flag != "artifact"]
        rest = (f"; {len(others)} more channel(s) with share >= {min_share:g} without a reliable label naming the "
                f"class ({', '.join(f'{c.layer}:{c.channel} [{c.flag}]' for c in others)})") if others else ""
        if suspect is not None:
            if suspect.artifact_auc is None:
                evidence = f"its reliable label `{suspect.label}` asserts an artifact (detection not measured)"
            else:
                evidence = (f"it detects {suspect.artifact!r} (AUC {suspect.artifact_auc:.3f}, "
                            f"q {format_p_value(suspect.artifact_q)})")
            return (f"{self.name}: artifact suspect {suspect.layer}:{suspect.channel} carries {suspect.share:.3f} "
                    f"of the class's {quantity}; {evidence}{rest}")
        if others:
            return f"{self.name}: no artifact suspect{rest}"
        return f"{self.name}: ok (no flagged channel carries >= {min_share:g} of the class's {quantity})"


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
    min_artifact_auc, alpha : float
        A channel detects an artifact with an AUC >= ``min_artifact_auc`` and q < ``alpha``.
    detection : str
        ``"activations"`` (measured, see the module docstring), ``"labels"`` (the fallback without concepts
        or activations) or ``"none"`` (no artifacts).
    """

    layer: str
    quantity: str
    artifacts: tuple[str, ...]
    min_share: float
    classes: list[ClassAudit] = field(default_factory=list)
    min_artifact_auc: float = MIN_ARTIFACT_AUC
    alpha: float = 0.05
    detection: str = "none"

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

    def suspects(self, min_share: float | None = None) -> dict[str, AuditChannel]:
        """Class name -> its artifact suspect (:attr:`ClassAudit.suspect`), for the classes where it carries at least
        ``min_share`` (default: :attr:`min_share`): the Clever-Hans findings.
        """
        threshold = self.min_share if min_share is None else float(min_share)
        return {item.name: item.suspect for item in self.classes
                if item.suspect is not None and item.suspect.share >= threshold}

    def verdicts(self) -> list[str]:
        """One verdict line per class (:meth:`ClassAudit.verdict`)."""
        return [item.verdict(self.min_share, self.quantity) for item in self.classes]

    def table(self, max_channels: int | None = None) -> str:
        """Plain text: per class its channels (share, flag, artifact AUC and q, label with support and q), then
        one verdict line per class.
        """
        detection = {"activations": f"detects it with AUC >= {self.min_artifact_auc:g} and q < {self.alpha:g}",
                     "labels": "has a reliable label asserting it (detection not measured: no concepts)",
                     "none": "(no artifact given)"}[self.detection]
        lines = [f"audit of layer {self.layer}: share of each class's {self.quantity} per channel; artifacts: "
                 f"{', '.join(self.artifacts) or '(none)'}; [artifact]: the channel {detection}; flags count from "
                 f"share {self.min_share:g}",
                 f"  {'channel':<12s} {'share':>6s}  {'flag':<11s} {'art. AUC':>8s} {'art. q':>9s}  "
                 "label (support, q)"]
        for item in self.classes:
            flagged = item.flagged(self.min_share)
            note = f"  <- {len(flagged)} flagged" if flagged else ""
            lines.append(f"{item.name} ({item.n_samples} samples){note}")
            lines += [_table_row(channel) for channel in item.channels[:max_channels]]
        lines.append("verdicts:")
        lines += [f"  {line}" for line in self.verdicts()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (NaN as null)."""
        return {
            "format": _FORMAT, "layer": self.layer, "quantity": self.quantity, "artifacts": list(self.artifacts),
            "min_share": self.min_share, "min_artifact_auc": self.min_artifact_auc, "alpha": self.alpha,
            "detection": self.detection,
            "flagged": {name: [c.channel for c in channels] for name, channels in self.flagged().items()},
            "verdicts": self.verdicts(),
            "classes": [{"target": c.target, "name": c.name, "concepts": list(c.concepts), "n_samples": c.n_samples,
                         "channels": [_json_row(asdict(channel)) for channel in c.channels],
                         "suspect": None if c.suspect is None else _json_row(asdict(c.suspect))}
                        for c in self.classes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Audit:
        """Rebuild from :meth:`to_dict` (audits written before support, q and detection were stored load too)."""
        if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} object (its 'format' must be {_FORMAT!r})")
        classes = [_class_from_json(item) for item in _list(data, "classes")]
        return cls(layer=json_record(_Text, {"text": data["layer"]}).text, quantity=str(data["quantity"]),
                   artifacts=tuple(_strings(data["artifacts"], "artifacts")),
                   min_share=json_record(_Number, {"value": data["min_share"]}).value, classes=classes,
                   min_artifact_auc=json_record(_Number, {"value": data.get("min_artifact_auc",
                                                                            MIN_ARTIFACT_AUC)}).value,
                   alpha=json_record(_Number, {"value": data.get("alpha", 0.05)}).value,
                   detection=json_record(_Text, {"text": data.get("detection", "labels")}).text)

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        """The audit as JSON text; also written to ``path`` when given."""
        return write_json(self.to_dict(), path, indent)

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Audit:
        """Read an audit from JSON text or a file."""
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


def _table_row(channel: AuditChannel) -> str:
    mark = f"[{channel.flag}]" if channel.flag else ""
    auc = "" if channel.artifact_auc is None else f"{channel.artifact_auc:.3f}"
    label = channel.shown_label
    if channel.label is not None:
        support = "?" if channel.label_support is None else str(channel.label_support)
        label += f" ({support}, q {format_p_value(channel.label_q) or '?'})"
    return (f"  {channel.layer + ':' + str(channel.channel):<12s} {channel.share:6.3f}  {mark:<11s} {auc:>8s} "
            f"{format_p_value(channel.artifact_q):>9s}  {label}").rstrip()


_CHANNEL_FIELDS = frozenset(spec.name for spec in fields(AuditChannel))


def _channel(row: Any) -> AuditChannel:
    """One audit row from JSON, every field checked (keys this version does not know are ignored)."""
    values = {key: value for key, value in _mapping(row, "channel").items() if key in _CHANNEL_FIELDS}
    return json_record(AuditChannel, values, nan_fields=("share", "value"))


def _class_from_json(data: Any) -> ClassAudit:
    """One class of an audit from JSON, every field checked."""
    data = _mapping(data, "class")
    values = {key: data[key] for key in ("target", "name", "n_samples") if key in data}
    values["concepts"] = tuple(_strings(data.get("concepts"), "concepts"))
    values["channels"] = [_channel(row) for row in _list(data, "channels")]
    values["suspect"] = None if data.get("suspect") is None else _channel(data["suspect"])
    return json_record(ClassAudit, values)


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


@dataclass(frozen=True)
class _Rules:
    """What flags a channel (the audit's settings, passed on as one)."""

    artifacts: frozenset[str]
    min_artifact_auc: float
    alpha: float


def _check_settings(by: str, k: Any, min_share: Any, min_artifact_auc: Any, alpha: Any) -> None:
    if by not in ("relevance", "weight"):
        raise ValueError(f"by must be 'relevance' or 'weight', got {by!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    for name, value, low, high in (("min_share", min_share, 0.0, 1.0), ("min_artifact_auc", min_artifact_auc, 0.5, 1.0),
                                   ("alpha", alpha, 0.0, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not low <= value <= high:
            raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")


def _check_artifacts(artifacts: Sequence[str], concepts: ConceptLabels | None, layer_labels: Any) -> None:
    """KeyError for an artifact name that no concept (or, without concepts, no label) knows, with the close names."""
    if concepts is not None:
        known, where = list(concepts.names), "among the concepts"
    else:
        known, where = list(getattr(layer_labels, "concept_names", [])), "known to the labels (no concepts given)"
    for name in artifacts:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"close names: {close}" if close else f"known: {known[:10]}{' ...' if len(known) > 10 else ''}"
            raise KeyError(f"artifact concept {name!r} is not {where} ({hint}); add images that carry the artifact "
                           "as a concept first (ConceptLabels.merge) and label the channels again")


def _check_finite(matrix: np.ndarray, rows: np.ndarray, layer: str, what: str) -> None:
    """ValueError naming the first NaN or infinite value among ``rows`` (never averaged away)."""
    bad = ~np.isfinite(matrix) & rows[:, None]
    if bad.any():
        row, channel = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"the {what} of layer {layer!r} hold {int(bad.sum())} NaN or infinite value(s), the first "
                         f"at {'class' if what == 'weights' else 'sample'} {row}, channel {channel} "
                         f"({matrix[row, channel]}); the audit does not average them away: record the layer again or "
                         "leave those samples out (samples=)")


def _relevance_values(cache: Any, layer: str, n_classes: int, targets: Any,
                      samples: Any) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Per class the mean relevance of every channel over its (kept) samples: ``(values [K, C], counts, targets)``."""
    matrix = _relevance_matrix(cache, layer)
    if targets is None:
        raise ValueError("targets (the class of every row of the cache) are required with by='relevance'")
    targets = _targets(targets, matrix.shape[0])
    keep = _class_rows(targets, samples, matrix.shape[0])
    _check_finite(matrix, keep & (targets >= 0) & (targets < n_classes), layer, "relevances")
    values, counts = np.full((n_classes, matrix.shape[1]), np.nan), []
    for index in range(n_classes):
        rows = keep & (targets == index)
        counts.append(int(rows.sum()))
        if rows.any():
            values[index] = matrix[rows].mean(axis=0)
    return values, counts, targets


def _weight_values(weight: Any, layer: str, n_classes: int) -> tuple[np.ndarray, list[int]]:
    if weight is None:
        raise ValueError("by='weight' needs weight= (the [classes, C] weight of the layer fed by the channels)")
    values = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    values = values.astype(np.float64)
    if values.ndim != 2 or values.shape[0] != n_classes:
        raise ValueError(f"weight must be [classes, C] with {n_classes} classes, got {values.shape}")
    _check_finite(values, np.ones(n_classes, dtype=bool), layer, "weights")
    return values, [0] * n_classes


def _artifact_detection(artifacts: Sequence[str], cache: Any, activations: Any, concepts: ConceptLabels | None,
                        layer: str) -> dict[int, tuple[str, float, float]] | None:
    """Channel -> ``(artifact, AUC, q)`` of the artifact it detects best, by :func:`crp_invert.find.find_channels`
    over every row of the cache; None where it cannot be measured (no concepts, no activations)."""
    if not artifacts or concepts is None:
        return None
    if activations is not None:
        data = {layer: activations.detach().cpu() if isinstance(activations, torch.Tensor) else np.asarray(activations)}
    elif isinstance(cache, (ActivationCache, str, os.PathLike)):
        data = cache
    else:
        return None
    best: dict[int, tuple[str, float, float]] = {}
    for name in artifacts:
        for match in find_channels(Formula.concept(name), data, concepts, layers=[layer]):
            if match.channel not in best or match.auc > best[match.channel][1]:
                best[match.channel] = (name, float(match.auc), float(match.p_value_bh))
    return best


def _reliable_labels(layer_labels: Any, n_channels: int) -> list[Any]:
    """The reliable best explanation of every channel, or None (``getattr``: labels without the rule count)."""
    result = []
    for channel in range(n_channels):
        best = layer_labels.best(channel)
        result.append(best if best is not None and getattr(best, "reliable", True) else None)
    return result


def _flag(explanation: Any, detection: tuple[str, float, float] | None, measured: bool, rules: _Rules,
          own: frozenset[str]) -> str | None:
    asserted = frozenset() if explanation is None else positive_literals(explanation.formula)
    if measured:
        if detection is not None and detection[1] >= rules.min_artifact_auc and detection[2] < rules.alpha:
            return "artifact"
    elif asserted & rules.artifacts:  # the fallback without concepts: the reliable label asserts an artifact
        return "artifact"
    if explanation is None:
        return "unlabeled"
    return None if asserted & own else "unrelated"


def _finite_or_none(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _audit_channel(layer: str, channel: int, share: float, value: float, explanation: Any,
                   detection: tuple[str, float, float] | None, flag: str | None) -> AuditChannel:
    support = None if explanation is None else getattr(explanation, "support", None)
    return AuditChannel(
        layer=layer, channel=int(channel), share=float(share), value=float(value),
        label=None if explanation is None else str(explanation.formula),
        label_auc=None if explanation is None else float(explanation.auc),
        label_support=None if support is None else int(support),
        label_q=None if explanation is None else _finite_or_none(explanation.p_value_bh),
        artifact=None if detection is None else detection[0],
        artifact_auc=None if detection is None else detection[1],
        artifact_q=None if detection is None else detection[2], flag=flag)


def _class_audit(item: ClassAudit, layer: str, row: np.ndarray, k: int, explanations: list[Any],
                 detections: dict[int, tuple[str, float, float]] | None, rules: _Rules) -> ClassAudit:
    """Fill ``item`` with the ``k`` channels of the largest share of ``row`` and the class's artifact suspect."""
    total = np.abs(row).sum()
    share = row / total if total > 0 else np.zeros_like(row)
    own = frozenset(item.concepts)
    channels = []
    for channel in sorted(range(row.size), key=lambda c: (-share[c], c)):  # largest share first, then index
        detection = None if detections is None else detections.get(channel)
        flag = _flag(explanations[channel], detection, detections is not None, rules, own)
        channels.append(_audit_channel(layer, channel, share[channel], row[channel], explanations[channel],
                                       detection, flag))
    item.channels = channels[:k]
    item.suspect = next((c for c in channels if c.flag == "artifact"), None)
    return item


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
    activations: Any = None,
    min_artifact_auc: float = MIN_ARTIFACT_AUC,
    alpha: float = 0.05,
) -> Audit:
    """Audit one layer: per class the ``k`` channels with the largest share of its relevance, flagged.

    Parameters
    ----------
    cache : ActivationCache, str, os.PathLike or array
        The cache whose relevances of ``layer`` are read (each row: that sample's relevance for its own
        class, as CRP's FeatureVisualization records it) and whose activations measure the artifact detection,
        or an ``[N, C]`` relevance array. Not read with ``by="weight"`` unless artifacts are detected.
    labels : LayerLabels or mapping of str to LayerLabels
        The channels' labels; the audit shows each channel's reliable best label (``labels.best``).
    layer : str
    class_names : sequence of str
        Name of every class; class ``i`` is ``targets == i`` (or row ``i`` of ``weight``).
    targets : array-like of int, optional
        ``[N]`` class of every row of the cache (required with ``by="relevance"``).
    artifacts : iterable of str
        Concepts the user marks as artifacts. A name that no concept (without ``concepts``: no label) knows
        raises KeyError naming the close names.
    class_concepts : mapping of str to iterable of str, optional
        Class name -> its concepts. Default: from ``concepts`` and ``targets`` with
        :func:`class_concepts_from_data` (the concepts of at least 90 % of the class's samples).
    concepts : ConceptLabels, optional
        The concepts of every row of the cache (the artifact concept among them): the artifact detection is
        measured with them (without them the audit falls back to the labels).
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
        Rows of the cache to average (default: all), e.g. without the added artifact images. The artifact
        detection always uses every row.
    activations : array, optional
        ``[N, C]`` activations of the layer, for the artifact detection when ``cache`` is an array.
    min_artifact_auc, alpha : float
        A channel detects an artifact with AUC >= ``min_artifact_auc`` and q < ``alpha``.

    Returns
    -------
    Audit

    Raises
    ------
    KeyError
        An unknown artifact name, layer or class.
    ValueError
        NaN or infinite relevances (naming layer, sample and channel), shapes that do not fit.
    """
    _check_settings(by, k, min_share, min_artifact_auc, alpha)
    class_names = [str(name) for name in class_names]
    artifacts = tuple(str(name) for name in artifacts)
    layer_labels = labels.get(layer) if isinstance(labels, Mapping) else labels
    if layer_labels is None:
        raise KeyError(f"no labels for layer {layer!r}; labeled layers: {list(labels)[:8]}")
    _check_artifacts(artifacts, concepts, layer_labels)
    if by == "relevance":
        values, counts, targets = _relevance_values(cache, layer, len(class_names), targets, samples)
    else:
        values, counts = _weight_values(weight, layer, len(class_names))
    if len(layer_labels) != values.shape[1]:
        raise ValueError(f"the labels of layer {layer!r} have {len(layer_labels)} channels, the {by} {values.shape[1]}")
    if class_concepts is None:
        if concepts is None or targets is None:
            raise ValueError("give class_concepts, or concepts and targets to derive them")
        class_concepts = class_concepts_from_data(concepts, targets, class_names)
    missing = [name for name in class_names if name not in class_concepts]
    if missing:
        raise KeyError(f"no class concepts for the classes {missing[:5]}")

    detections = _artifact_detection(artifacts, cache, activations, concepts, layer)
    if artifacts and detections is None:
        logger.warning("audit of %s: the artifact detection is not measured (it needs concepts and activations); "
                       "flagging channels whose reliable label asserts an artifact", layer)
    rules = _Rules(frozenset(artifacts), float(min_artifact_auc), float(alpha))
    explanations = _reliable_labels(layer_labels, values.shape[1])
    result = Audit(layer=layer, quantity=by, artifacts=artifacts, min_share=float(min_share),
                   min_artifact_auc=rules.min_artifact_auc, alpha=rules.alpha,
                   detection="none" if not artifacts else "labels" if detections is None else "activations")
    for index, name in enumerate(class_names):
        item = ClassAudit(target=index, name=name, concepts=tuple(class_concepts[name]), n_samples=counts[index])
        if counts[index] or by == "weight":
            _class_audit(item, layer, values[index], k, explanations, detections, rules)
        result.classes.append(item)
    logger.info("audit of %s: %d classes, %d with flagged channels", layer, len(class_names), len(result.flagged()))
    return result
