"""What the report's page shows, as plain data: one :class:`Page` of dataclasses that the templates render.

Every label a view shows is the channel's best *reliable* explanation (``LayerLabels.best``), or
:data:`NO_RELIABLE_LABEL` with the reason the top of its beam is not shown; support and q (Benjamini-Hochberg)
stand next to each label. Nothing here writes HTML.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.formula import Formula, FormulaParseError
from .search import label_cases, merged_cases

__all__ = ["NO_RELIABLE_LABEL", "LabelView", "label_view", "ChannelRow", "channel_rows", "select_channels",
           "MAX_CHANNEL_FIGURES", "differing_channels", "SourceRow", "Sources", "collect_sources", "AuditRow",
           "AuditView", "collect_audit", "EvidenceRow", "collect_evidence", "summary_table", "anchor"]

#: default number of channels per layer that get figures (density, references, concept samples)
MAX_CHANNEL_FIGURES = 12

#: what every view shows where a channel has no reliable explanation (core.labels defines it once landed)
NO_RELIABLE_LABEL = "no reliable label"
_NO_FORMULA = "no explanation satisfied the search constraints"


def anchor(layer: str, channel: int | None = None) -> str:
    """A unique HTML id per layer (and channel): ASCII letters and digits stay, every other character
    becomes ``_<hex code>_``, so ``features.0``, ``features/0`` and ``features_0`` get different ids."""
    safe = "".join(ch if ch.isascii() and ch.isalnum() else f"_{ord(ch):x}_" for ch in layer)
    return f"layer-{safe}" + ("" if channel is None else f"-ch{channel}")


def _no_reliable_text() -> str:
    from ..core import labels

    return getattr(labels, "NO_RELIABLE_LABEL", NO_RELIABLE_LABEL)


# ------------------------------------------------------------------------------------------------
# one channel's label
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelView:
    """What a view shows of one channel's label.

    Attributes
    ----------
    text : str
        The formula, or :data:`NO_RELIABLE_LABEL`.
    explanation : Explanation or None
        The explanation shown (the best reliable one); None when there is none.
    reason : str
        Why there is none (the top of the beam's ``unreliable_reason``); "" when shown.
    support : int or None
        Samples where the formula holds.
    cases : list
        The label's cases for the search box (:func:`crp_invert.report.search.label_cases`).
    """

    text: str
    explanation: Any = None
    reason: str = ""
    support: int | None = None
    cases: list = field(default_factory=list)

    @property
    def shown(self) -> bool:
        return self.explanation is not None


def _reliable_best(layer_labels: Any, channel: int) -> Any:
    """``layer_labels.best(channel)`` if reliable (until every LayerLabels judges reliability, an explanation
    without the ``reliable`` property counts as reliable)."""
    best = layer_labels.best(channel)
    return best if best is not None and getattr(best, "reliable", True) else None


def _support(explanation: Any, n_samples: Any) -> int | None:
    support = getattr(explanation, "support", None)
    if support is None and isinstance(n_samples, int) and not isinstance(n_samples, bool):
        support = round(explanation.fraction * n_samples)  # fraction = support / n_samples
    return support


def label_view(layer_labels: Any, channel: int) -> LabelView:
    """The label a view shows for ``channel``: its best reliable explanation, or why there is none."""
    best = _reliable_best(layer_labels, channel)
    if best is None:
        beam = layer_labels[channel]
        reason = getattr(beam[0], "unreliable_reason", "") if beam else _NO_FORMULA
        return LabelView(_no_reliable_text(), reason=reason or "not reliable")
    parameters = getattr(layer_labels, "parameters", None) or {}
    n_samples = parameters.get("n_search_samples", parameters.get("n_samples"))  # fraction is of the searched ones
    return LabelView(str(best.formula), best, "", _support(best, n_samples), label_cases(best.formula))


# ------------------------------------------------------------------------------------------------
# the channel table and the channels with figures
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelRow:
    """One row of a layer's channel table."""

    channel: int
    anchor: str
    label: LabelView
    n_explanations: int


def channel_rows(layer: str, layer_labels: Any) -> list[ChannelRow]:
    """Every channel of the layer with the label it shows."""
    return [ChannelRow(channel, anchor(layer, channel), label_view(layer_labels, channel), len(layer_labels[channel]))
            for channel in range(len(layer_labels))]


def select_channels(layer_labels: Any, max_channels: int = MAX_CHANNEL_FIGURES) -> list[int]:
    """The channels that get figures: the ``max_channels`` whose best reliable explanation has the highest AUC.

    Ties are broken by the lower channel index; channels without a reliable explanation get none.

    Parameters
    ----------
    layer_labels : LayerLabels
    max_channels : int
        At most this many (0 for none).

    Returns
    -------
    list of int
        Channel indices, in ascending order.
    """
    if isinstance(max_channels, bool) or not isinstance(max_channels, (int, np.integer)) or max_channels < 0:
        raise ValueError(f"max_channels must be an int >= 0, got {max_channels!r}")
    keyed = []
    for channel in range(len(layer_labels)):
        best = _reliable_best(layer_labels, channel)
        if best is not None:
            keyed.append((-(best.auc if not math.isnan(best.auc) else -math.inf), channel))
    return sorted(channel for _, channel in sorted(keyed)[:max_channels])


# ------------------------------------------------------------------------------------------------
# activation vs relevance labels
# ------------------------------------------------------------------------------------------------


def differing_channels(activation_labels: Any, relevance_labels: Any) -> list[int]:
    """The channels whose best reliable activation label and relevance label are different formulas (or only one
    of them has one)."""
    if len(activation_labels) != len(relevance_labels):
        raise ValueError(f"{len(activation_labels)} activation labels but {len(relevance_labels)} relevance labels")

    def formula(labels: Any, channel: int) -> Any:
        best = _reliable_best(labels, channel)
        return None if best is None else best.formula

    return [channel for channel in range(len(activation_labels))
            if formula(activation_labels, channel) != formula(relevance_labels, channel)]


@dataclass(frozen=True)
class SourceRow:
    """One channel's activation and relevance labels."""

    channel: int
    activation: LabelView
    relevance: LabelView
    differ: bool
    cases: list


@dataclass(frozen=True)
class Sources:
    """The activation-vs-relevance table of one layer."""

    layer: str
    rows: list[SourceRow]
    n_differ: int


def collect_sources(layer: str, activation_labels: Any, relevance_labels: Any) -> Sources:
    """Both labels of every channel side by side, the channels whose labels differ marked."""
    differ = set(differing_channels(activation_labels, relevance_labels))
    rows = []
    for channel in range(len(activation_labels)):
        shown = label_view(activation_labels, channel), label_view(relevance_labels, channel)
        rows.append(SourceRow(channel, *shown, channel in differ, merged_cases(*(view.cases for view in shown))))
    return Sources(layer, rows, len(differ))


# ------------------------------------------------------------------------------------------------
# the audit and glocal evidence
# ------------------------------------------------------------------------------------------------


def _first(item: Any, names: Sequence[str]) -> Any:
    """The first of the attributes ``names`` that ``item`` has and that is not None."""
    for name in names:
        value = getattr(item, name, None)
        if value is not None:
            return value
    return None


def _text_cases(text: str | None) -> list:
    try:
        return label_cases(Formula.parse(text)) if text else []
    except (FormulaParseError, ValueError):
        return []


@dataclass(frozen=True)
class AuditRow:
    """One channel of one class in an audit table."""

    klass: str
    rank: int
    channel: int
    share: float
    flag: str
    counted: bool
    label: str
    auc: float | None
    support: int | None
    q: float | None
    artifact_auc: float | None
    cases: list


@dataclass(frozen=True)
class AuditView:
    """One layer's Clever-Hans audit."""

    layer: str
    quantity: str
    artifacts: str
    min_share: float
    flagged: str
    rows: list[AuditRow]
    verdicts: list[str]


def _audit_row(klass: Any, rank: int, channel: Any, min_share: float, flags: Sequence[str]) -> AuditRow:
    counted = channel.flag in flags and channel.share >= min_share
    label = channel.label or _no_reliable_text()
    return AuditRow(klass.name, rank, channel.channel, channel.share, channel.flag or "", counted, label,
                    _first(channel, ("label_auc",)), _first(channel, ("label_support", "support")),
                    _first(channel, ("label_q", "q", "p_value_bh")), _first(channel, ("artifact_auc",)),
                    _text_cases(channel.label))


def collect_audit(item: Any) -> AuditView:
    """An :class:`crp_invert.audit.Audit` as rows, with the flagged channels summed up."""
    from ..audit import FLAGS

    flagged = "; ".join(
        f"{name}: " + ", ".join(f"{c.layer}:{c.channel} [{c.flag}] {c.share:.2f}" for c in channels)
        for name, channels in item.flagged().items())
    rows = [_audit_row(klass, rank, channel, item.min_share, FLAGS)
            for klass in item.classes for rank, channel in enumerate(klass.channels, start=1)]
    return AuditView(item.layer, item.quantity, ", ".join(item.artifacts) or "none", item.min_share, flagged, rows,
                     _verdicts(item))


def _verdicts(item: Any) -> list[str]:
    """The audit's verdict lines, one per class, where the audit has them (a ``verdicts`` list, mapping or method)."""
    verdicts = getattr(item, "verdicts", None)
    if callable(verdicts):
        verdicts = verdicts()
    if isinstance(verdicts, Mapping):
        verdicts = verdicts.values()
    return [str(line) for line in verdicts or ()]


@dataclass(frozen=True)
class EvidenceRow:
    """One channel part of a glocal explanation: does its label hold on this sample."""

    channel: int
    label: str
    activation: float
    percentile: float
    holds: str
    unexplained: bool


def collect_evidence(glocal: Any) -> list[EvidenceRow]:
    """The evidence of each channel part of a glocal explanation ([] when it has none)."""
    if getattr(glocal, "evidence", None) is None:
        return []
    return [EvidenceRow(part.channel, str(label.formula) if label is not None else "", part.activation,
                        part.percentile, {True: "holds", False: "fails", None: "unknown"}[part.label_holds],
                        bool(part.unexplained))
            for part, label in zip(glocal.evidence, glocal.labels)]


def summary_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The summary rows as (columns, cells): every key of any row is a column; floats to 4 digits."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    return columns, [[cell(row.get(column, "")) for column in columns] for row in rows]
