"""Which explanation a view shows for a channel: a label is a claim, shown only where it is reliable.

Every view shows a channel's best *reliable* explanation or says :data:`NO_RELIABLE_LABEL`
(:py:meth:`crp_invert.LayerLabels.best`). A part of a glocal explanation (one channel's conditional heatmap
on one sample) says more: among the channel's reliable explanations it shows one that *holds on this
sample* (:py:meth:`Formula.evaluate` on the sample's concepts), or says that none does.

Where relevance labels were recorded too (labels searched on the channel's relevance instead of its
activation, ``source="relevance"``), both sources compete: a glocal part is the channel's *contribution*
(relevance) to the class, which a relevance label may describe better. :func:`choose_label` takes, per
source, the first reliable explanation of the beam that holds on the sample (or the first reliable one when
the sample's concepts are unknown) and shows the one whose formula separates the channel's recorded scores
better (higher AUC on the labeling data); a tie goes to the activation label. The title says which source
it shows: ``"act"`` or ``"rel"``.
"""
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["NO_RELIABLE_LABEL", "NONE_HOLDS", "SOURCES", "LabelChoice", "is_reliable", "checked_layer_labels",
           "reliable_explanations", "best_reliable", "formula_holds", "choose_label"]

try:  # the text every view shows (core.labels owns it once the reliability rule has landed)
    from ..core.labels import NO_RELIABLE_LABEL
except ImportError:  # pragma: no cover - older core
    NO_RELIABLE_LABEL = "no reliable label"

NONE_HOLDS = "no reliable label holds here"
"""What a glocal part shows when the channel has reliable explanations but none holds on the sample."""

SOURCES = ("act", "rel")
"""Label sources, in the order that breaks ties: activation labels, relevance labels."""


def is_reliable(explanation: Any) -> bool:
    """Whether an explanation is reliable by the documented rule (older objects without the flag: True)."""
    return bool(getattr(explanation, "reliable", True))


def labels_of_layer(labels: Any, layer: str):
    """The LayerLabels of ``layer`` from a LayerLabels or a mapping of layer name to LayerLabels (None stays
    None); KeyError for a layer the mapping lacks, ValueError for labels of another layer."""
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        if layer not in labels:
            raise KeyError(f"no labels for layer {layer!r}; labels are given for {sorted(labels)}")
        labels = labels[layer]
    label_layer = getattr(labels, "layer", None)
    if label_layer is not None and label_layer != layer:
        raise ValueError(f"labels are for layer {label_layer!r}, not for layer {layer!r}")
    return labels


def checked_layer_labels(labels: Any, layer: str, n_channels: int):
    """The LayerLabels of ``layer`` (or None), checked against the layer's name and channel count.

    ``labels`` is a LayerLabels, a mapping of layer name to LayerLabels, or None.
    """
    labels = labels_of_layer(labels, layer)
    if labels is None:
        return None
    if len(labels) != n_channels:
        raise ValueError(f"labels have {len(labels)} features but layer {layer!r} has {n_channels} channels; "
                         f"labels of another layer?")
    return labels


def reliable_explanations(labels: Any, channel: int) -> list[Any]:
    """The reliable explanations of ``channel``, best first (empty without labels)."""
    if labels is None:
        return []
    explanations = getattr(labels, "explanations", None)
    beam = explanations(int(channel)) if callable(explanations) else labels[int(channel)]
    return [explanation for explanation in beam if is_reliable(explanation)]


def best_reliable(labels: Any, channel: int):
    """The best reliable explanation of ``channel``, or None ("no reliable label")."""
    reliable = reliable_explanations(labels, channel)
    return reliable[0] if reliable else None


def formula_holds(explanation: Any, concepts_row: Any) -> bool:
    """Whether the explanation's formula holds for one sample (a one-row ConceptLabels or ``{name: [bool]}``)."""
    return bool(explanation.formula.evaluate(concepts_row).reshape(-1)[0])


def _holds(explanation: Any, concepts_row: Any, memo: dict | None) -> bool:
    """:func:`formula_holds`, remembered in ``memo`` by formula (equal formulas evaluate alike)."""
    if memo is None:
        return formula_holds(explanation, concepts_row)
    formula = explanation.formula
    if formula not in memo:
        memo[formula] = formula_holds(explanation, concepts_row)
    return memo[formula]


@dataclass(frozen=True)
class LabelChoice:
    """The explanation one glocal part shows, and how it was chosen.

    Attributes
    ----------
    explanation : Explanation or None
        The shown explanation; None when the channel has no reliable one, or none holds on the sample.
    source : {"act", "rel"} or None
        Which labels it comes from (None when nothing is shown).
    n_reliable : int
        Reliable explanations of the channel, over all sources.
    n_holding : int or None
        How many of them hold on the sample; None when the sample's concepts are unknown.
    """

    explanation: Any
    source: str | None
    n_reliable: int
    n_holding: int | None

    @property
    def holds(self) -> bool | None:
        """True: the shown label holds on the sample; False: no reliable label does; None: unknown."""
        if self.n_holding is None or self.n_reliable == 0:
            return None
        return self.n_holding > 0

    @property
    def text(self) -> str:
        """The shown formula, :data:`NONE_HOLDS` or :data:`NO_RELIABLE_LABEL`."""
        if self.explanation is not None:
            return str(self.explanation.formula)
        return NONE_HOLDS if self.holds is False else NO_RELIABLE_LABEL


def choose_label(candidates: Mapping[str, Sequence[Any]], concepts_row: Any = None,
                 holds_memo: dict | None = None) -> LabelChoice:
    """The explanation a glocal part shows, among reliable ``candidates`` per source (best first).

    With the sample's concepts (``concepts_row``) each source offers its first explanation that holds on the
    sample; without them, its first. Of the offers the one with the higher AUC is shown (ties: the source
    first in :data:`SOURCES`). ``holds_memo``, one dict per sample kept across the calls of that sample,
    remembers whether each formula holds, so that a formula shared by several channels is evaluated once.

    Examples
    --------
    >>> from crp_invert import Explanation, Formula
    >>> ring = Explanation(Formula.parse("ring"), auc=0.9, fraction=0.2, length=1, p_value=1e-9)
    >>> red = Explanation(Formula.parse("red"), auc=0.8, fraction=0.3, length=1, p_value=1e-9)
    >>> import torch
    >>> choice = choose_label({"act": [ring, red]}, {"ring": torch.tensor([False]), "red": torch.tensor([True])})
    >>> choice.text, choice.source, choice.n_holding
    ('red', 'act', 1)
    """
    offers, n_reliable, n_holding = [], 0, 0
    for rank, source in enumerate(SOURCES):
        explanations = list(candidates.get(source) or ())
        n_reliable += len(explanations)
        if concepts_row is not None:
            explanations = [e for e in explanations if _holds(e, concepts_row, holds_memo)]
            n_holding += len(explanations)
        if explanations:
            auc = float(explanations[0].auc)
            offers.append((-auc if auc == auc else float("inf"), rank, source, explanations[0]))  # NaN: last
    unknown = [source for source in candidates if source not in SOURCES]
    if unknown:
        raise ValueError(f"unknown label sources {unknown}; expected some of {SOURCES}")
    if not offers:
        return LabelChoice(None, None, n_reliable, None if concepts_row is None else n_holding)
    _, _, source, explanation = min(offers, key=lambda offer: offer[:2])
    return LabelChoice(explanation, source, n_reliable, None if concepts_row is None else n_holding)
