"""The report: :func:`write_report` collects what the page shows (:func:`collect_page`, plain data) and renders
it (:func:`crp_invert.report.render.render_page`, jinja2 templates)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cards import Card, FigureSources, Glocal, collect_card, collect_circuits, collect_glocals, layer_activations
from .collect import (
    MAX_CHANNEL_FIGURES,
    AuditView,
    ChannelRow,
    Sources,
    anchor,
    channel_rows,
    collect_audit,
    collect_sources,
    select_channels,
    summary_table,
)
from .figures import Picture
from .search import MAX_QUERY_CONCEPTS, SEARCH_RULE, placeholder_query

__all__ = ["write_report", "collect_page", "Page", "PageOptions", "LayerSection", "SearchBox"]


@dataclass(frozen=True)
class SearchBox:
    """The search box: an example query that finds something on the page, and the rule (help line)."""

    placeholder: str
    rule: str = SEARCH_RULE
    max_concepts: int = MAX_QUERY_CONCEPTS


@dataclass(frozen=True)
class LayerSection:
    """One layer: every channel in a table, both labels side by side, the chosen channels in detail."""

    name: str
    anchor: str
    n_channels: int
    parameters: str
    rows: list[ChannelRow]
    sources: Sources | None = None
    cards: list[Card] = field(default_factory=list)


@dataclass(frozen=True)
class PageOptions:
    """What :func:`write_report` was asked to show besides the labels and the figures' sources."""

    title: str = "crp-invert report"
    notes: Sequence[str] = ()
    summary: Sequence[Mapping[str, Any]] | None = None
    glocals: Sequence[Any] = ()
    glocal_images: Sequence[Any] | None = None
    class_names: Sequence[str] | None = None
    circuits: Sequence[Any] = ()
    max_channels: int = MAX_CHANNEL_FIGURES
    source: str = "activation"
    progress: bool = True
    relevance_labels: Mapping[str, Any] | None = None
    audits: Sequence[Any] = ()


@dataclass(frozen=True)
class Page:
    """Everything the page shows."""

    title: str
    notes: list[str]
    missing: list[str]
    summary: tuple[list[str], list[list[str]]] | None
    search: SearchBox
    layers: list[LayerSection]
    glocals: list[Glocal]
    circuits: list[Picture]
    audits: list[AuditView]


def _missing(feature_visualization: Any, store: Any, concepts: Any, images: Any) -> list[str]:
    """The page's note on each part skipped for want of inputs."""
    missing = []
    if feature_visualization is None:
        missing.append("no model / FeatureVisualization given (a report from files alone): the CRP ActMax and "
                       "RelMax reference samples are skipped")
    if store is None or concepts is None:
        missing.append("no activation cache and concepts given: the density figures are skipped")
    if images is None:
        missing.append("no images given: the samples of the explaining concepts are skipped")
    return missing


def _layer_section(layer: str, layer_labels: Any, store: Any, sources: FigureSources, options: PageOptions,
                   ) -> LayerSection:
    parameters = getattr(layer_labels, "parameters", {}) or {}
    relevance = (options.relevance_labels or {}).get(layer)
    chosen = select_channels(layer_labels, options.max_channels)
    activations = None
    if sources.concepts is not None:
        activations = layer_activations(store, layer, chosen, len(layer_labels), options.source)
    return LayerSection(
        layer, anchor(layer), len(layer_labels), ", ".join(f"{key}={value}" for key, value in parameters.items()),
        channel_rows(layer, layer_labels),
        collect_sources(layer, layer_labels, relevance) if relevance is not None else None,
        [collect_card(layer, channel, layer_labels, activations, sources) for channel in chosen])


def collect_page(labels: Mapping[str, Any], store: Any, sources: FigureSources, options: PageOptions) -> Page:
    """What the page shows: every layer (tables and cards), the glocal and circuit figures, the audits."""
    from tqdm.auto import tqdm

    layers = [_layer_section(layer, layer_labels, store, sources, options)
              for layer, layer_labels in tqdm(list(labels.items()), desc="report", disable=not options.progress)]
    all_cases = [row.label.cases for section in layers for row in section.rows]
    return Page(
        options.title, [str(note) for note in options.notes],
        _missing(sources.feature_visualization, store, sources.concepts, sources.images),
        summary_table(options.summary) if options.summary else None,
        SearchBox(placeholder_query(all_cases)), layers,
        collect_glocals(options.glocals, options.glocal_images, options.class_names, sources.dpi),
        collect_circuits(options.circuits, sources.dpi),
        [collect_audit(item) for item in options.audits])


def _check_arguments(labels: Any, source: str, n_reference: Any) -> None:
    if source not in ("activation", "relevance"):
        raise ValueError(f"source must be 'activation' or 'relevance', got {source!r}")
    if isinstance(n_reference, bool) or not isinstance(n_reference, (int, np.integer)) or n_reference < 1:
        raise ValueError(f"n_reference must be an int >= 1, got {n_reference!r}")
    if not isinstance(labels, Mapping) or not labels:
        raise TypeError("labels must be a non-empty mapping of layer name to LayerLabels")


def _check_layer(layer: str, layer_labels: Any, store: Any) -> None:
    if layer not in store:
        raise KeyError(f"the labels of layer {layer!r} have no layer in the cache {str(store.path)!r} (its layers: "
                       f"{store.layers[:10]})")
    if store.n_channels(layer) != len(layer_labels):
        raise ValueError(f"the labels of layer {layer!r} have {len(layer_labels)} features but the cache's layer has "
                         f"{store.n_channels(layer)} channels; they belong to different layers or recordings")
    n_labeled = (getattr(layer_labels, "parameters", None) or {}).get("n_samples")
    if isinstance(n_labeled, int) and not isinstance(n_labeled, bool) and n_labeled != store.n_samples:
        raise ValueError(f"the labels of layer {layer!r} were computed on {n_labeled} samples but the cache has "
                         f"{store.n_samples}; they belong to another recording")


def _check_labels_match(labels: Mapping[str, Any], store: Any, concepts: Any) -> None:
    """Refuse labels that do not belong to the cache or the concepts: a layer the cache lacks, another number
    of channels or samples, formulas over concepts that are not given."""
    if store is not None and concepts is not None and store.n_samples != concepts.n_samples:
        raise ValueError(f"the cache has {store.n_samples} samples but the concepts {concepts.n_samples}; "
                         "they must describe the same samples")
    for layer, layer_labels in labels.items():
        if store is not None:
            _check_layer(layer, layer_labels, store)
        if concepts is not None:
            missing = sorted(set(getattr(layer_labels, "concept_names", ())) - set(concepts.names))
            if missing:
                raise ValueError(f"the labels of layer {layer!r} use concepts that the given concepts lack: "
                                 f"{missing[:5]}")


@contextlib.contextmanager
def _opened(cache: Any) -> Iterator[Any]:
    """The cache as an ActivationCache: opened here (and closed after) when a path is given."""
    from ..storage.cache import ActivationCache

    if cache is None or isinstance(cache, ActivationCache):
        yield cache
        return
    with ActivationCache(cache) as store:
        yield store


def write_report(
    path: str | os.PathLike,
    labels: Mapping[str, Any],
    cache: Any = None,
    concepts: Any = None,
    images: Any = None,
    feature_visualization: Any = None,
    composite: Any = None,
    glocals: Sequence[Any] = (),
    glocal_images: Sequence[Any] | None = None,
    class_names: Sequence[str] | None = None,
    circuits: Sequence[Any] = (),
    summary: Sequence[Mapping[str, Any]] | None = None,
    notes: Sequence[str] = (),
    title: str = "crp-invert report",
    max_channels: int = MAX_CHANNEL_FIGURES,
    n_reference: int = 6,
    source: str = "activation",
    dpi: int = 60,
    progress: bool = True,
    relevance_labels: Mapping[str, Any] | None = None,
    audits: Sequence[Any] = (),
) -> Path:
    """Write the self-contained HTML report.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.html`` file to write (its folder must exist).
    labels : mapping of str to LayerLabels
        Layer name -> labels; every channel of every layer is listed with its best reliable explanation (or
        "no reliable label"), its support and q-value.
    cache : ActivationCache, str or os.PathLike, optional
        The activation cache the labels were computed from (for the density figures).
    concepts : ConceptLabels, optional
        The concepts of the cache's samples (same order); needed for the density figures and the
        concept samples.
    images : indexable, optional
        ``images[i]`` is sample ``i`` (a [C, H, W] / [H, W, C] image, or a ``(image, target)`` tuple as
        a torch Dataset yields): shows random samples of each explaining concept.
    feature_visualization : crp.visualization.FeatureVisualization, optional
        The FeatureVisualization that was run (e.g. :class:`crp_invert.InvertFeatureVisualization`):
        its ActMax and RelMax reference samples are shown. Without it (a report from files alone) they
        are skipped and the page says so.
    composite : zennit Composite, optional
        With ``feature_visualization``: also draw CRP's conditional heatmaps of the reference samples.
    glocals : sequence of GlocalExplanation
        Decomposed predictions (:func:`crp_invert.decompose`), drawn with :func:`crp_invert.plot.plot_glocal`.
    glocal_images : sequence, optional
        The input of each glocal explanation.
    class_names : sequence of str, optional
        Names of the model outputs (titles of glocal figures).
    circuits : sequence of Circuit
        Drawn with :func:`crp_invert.plot.plot_circuit`.
    summary : sequence of dict, optional
        Rows of a summary table shown first (keys are the columns).
    notes : sequence of str
        Paragraphs shown under the title.
    title : str
    max_channels : int
        Channels per layer that get figures (see :func:`select_channels`); the table always lists all.
    n_reference : int
        Reference samples (and concept samples) per channel.
    source : {"activation", "relevance"}
        What the labels describe; the density figures use the cache's matching dataset.
    dpi : int
        Resolution of the density figures (glocal and circuit figures use at least 110, to be readable).
    progress : bool
        Show a tqdm bar over the layers.
    relevance_labels : mapping of str to LayerLabels, optional
        Labels of the same channels from their relevances (``source="relevance"``), shown next to ``labels``
        (from activations) with the channels whose labels differ marked.
    audits : sequence of Audit
        Clever-Hans audits (:func:`crp_invert.audit.audit`), shown in their own section.

    Returns
    -------
    pathlib.Path
        The written file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from crp_invert import Explanation, Formula, LayerLabels, write_report
    >>> labels = LayerLabels([[Explanation(Formula.concept("red"), 0.9, 0.3, 1, 0.01, 3, 0.03, 0.03)]], ["red"])
    >>> page = write_report(pathlib.Path(tempfile.mkdtemp()) / "r.html", {"conv1": labels}, progress=False)
    >>> "conv1" in page.read_text()
    True
    """
    from ..core.labels import write_text_atomically
    from .render import render_page

    _check_arguments(labels, source, n_reference)
    sources = FigureSources(concepts, images, feature_visualization, composite, int(n_reference), dpi, source)
    with _opened(cache) as store:
        _check_labels_match(labels, store, concepts)
        options = PageOptions(title, notes, summary, glocals, glocal_images, class_names, circuits, max_channels,
                              source, progress, relevance_labels, audits)
        page = collect_page(labels, store, sources, options)
    path = Path(path)
    write_text_atomically(path, render_page(page))
    return path
