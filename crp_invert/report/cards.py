"""The figures of the report, as plain data: a card per chosen channel (density, CRP reference samples, samples of
its concept), the glocal decompositions and the circuits."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .collect import EvidenceRow, LabelView, anchor, collect_evidence, label_view
from .figures import READABLE_DPI, Picture, concept_samples, figure_picture, plain_text, reference_picture

__all__ = ["Card", "FigureSources", "collect_card", "layer_activations", "Glocal", "collect_glocals",
           "collect_circuits"]


@dataclass(frozen=True)
class FigureSources:
    """Where the figures of the cards come from (each None when not given)."""

    concepts: Any = None
    images: Any = None
    feature_visualization: Any = None
    composite: Any = None
    n_reference: int = 6
    dpi: int = 60
    source: str = "activation"  # what the density figures show: "activation" or "relevance"


@dataclass(frozen=True)
class Card:
    """A channel shown in detail."""

    channel: int
    anchor: str
    title: str
    label: LabelView
    density: Picture | None = None
    references: list[tuple[Picture, str]] = field(default_factory=list)
    samples: Picture | None = None


def layer_activations(store: Any, layer: str, chosen: Sequence[int], n_channels: int, source: str,
                      ) -> np.ndarray | None:
    """``[N, n_channels]`` float32 with the chosen channels' activations (or relevances) filled in; None without a
    cache or chosen channels."""
    if store is None or not chosen or layer not in store:
        return None
    values = store.activations(layer, list(chosen)) if source == "activation" else store.relevances(layer, list(chosen))
    activations = np.zeros((values.shape[0], n_channels), dtype=np.float32)
    activations[:, list(chosen)] = values.numpy()
    return activations


def _references(layer: str, channel: int, sources: FigureSources) -> list[tuple[Picture, str]]:
    if sources.feature_visualization is None:
        return []
    shown = []
    for mode, name in (("activation", "ActMax"), ("relevance", "RelMax")):
        picture = reference_picture(sources.feature_visualization, layer, channel, mode, sources.n_reference,
                                    sources.composite, f"{name} {layer} {channel}")
        if picture is not None:
            heatmaps = ", conditional heatmaps" if sources.composite else ""
            caption = f"CRP {name} (top {sources.n_reference}){heatmaps}"
            shown.append((picture, caption))
    return shown


def collect_card(layer: str, channel: int, layer_labels: Any, activations: np.ndarray | None,
                 sources: FigureSources) -> Card:
    """The card of one channel: its reliable label, its density figure, reference samples and concept samples."""
    from ..plot import plot_explanation

    label = label_view(layer_labels, channel)
    card = Card(channel, anchor(layer, channel) + "-card", f"{layer} : channel {channel}", label)
    if not label.shown:
        return card
    best, density, samples = label.explanation, None, None
    if activations is not None and sources.concepts is not None:
        with plain_text():
            figure = plot_explanation(activations[:, channel], sources.concepts, best, title=f"{layer}:{channel}",
                                      value_name=sources.source)
            density = figure_picture(figure, f"density {layer} {channel}", sources.dpi)
    if sources.images is not None and sources.concepts is not None:
        mask = best.formula.evaluate(sources.concepts)
        mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, dtype=bool)
        samples = concept_samples(sources.images, mask, sources.n_reference, channel, f"samples of {best.formula}")
    return Card(card.channel, card.anchor, card.title, label, density, _references(layer, channel, sources), samples)


@dataclass(frozen=True)
class Glocal:
    """One decomposed prediction: its figure, caption and per-part evidence."""

    picture: Picture
    caption: str
    evidence: list[EvidenceRow]


def collect_glocals(glocals: Sequence[Any], images: Sequence[Any] | None, class_names: Sequence[str] | None,
                    dpi: int) -> list[Glocal]:
    """The glocal figures, drawn at a readable resolution (at least :data:`READABLE_DPI`)."""
    from ..plot import plot_glocal

    shown = []
    for i, glocal in enumerate(glocals):
        image = images[i] if images is not None else None
        name = class_names[glocal.target] if class_names is not None else None
        caption = f"prediction {i}: class {name if name is not None else glocal.target}, layer {glocal.layer}"
        with plain_text():
            picture = figure_picture(plot_glocal(glocal, image=image, class_name=name), caption,
                                     max(dpi, READABLE_DPI))
        shown.append(Glocal(picture, caption, collect_evidence(glocal)))
    return shown


def collect_circuits(circuits: Sequence[Any], dpi: int) -> list[Picture]:
    """The circuit figures, drawn at a readable resolution (at least :data:`READABLE_DPI`)."""
    from ..plot import plot_circuit

    shown = []
    for circuit in circuits:
        with plain_text():
            shown.append(figure_picture(plot_circuit(circuit), "circuit", max(dpi, READABLE_DPI)))
    return shown
