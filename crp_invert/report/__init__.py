"""The HTML report: one self-contained page with the INVERT labels of every channel of every layer.

:func:`write_report` writes one ``.html`` file (all images embedded as base64 PNG, styles and scripts inlined, no
external resources) with

* an optional summary table (e.g. from :func:`crp_invert.demo.pipeline.run_demo`);
* a search box that filters the channel tables, the cards and the audit by a formula query
  (:mod:`crp_invert.report.search` says exactly when a channel matches);
* per layer a sortable table of *every* channel: its best reliable explanation (or "no reliable label"), AUC,
  p-value (one-sided Mann-Whitney), Bonferroni-corrected p-value, Benjamini-Hochberg q-value, fraction, support
  and length; a click on a column header sorts by it;
* per layer, for at most ``max_channels`` channels (:data:`MAX_CHANNEL_FIGURES` = 12 by default; the channels
  whose best reliable explanation has the highest AUC), a card with the density figure of
  :func:`crp_invert.plot.plot_explanation` (needs the activation cache and the concepts), CRP's ActMax and RelMax
  reference samples (needs the ``FeatureVisualization`` that was run, i.e. a model) and random samples of the
  explaining concept (needs the images);
* the glocal figures (:func:`crp_invert.plot.plot_glocal`) with their evidence, circuit figures
  (:func:`crp_invert.plot.plot_circuit`), activation-vs-relevance labels and Clever-Hans audits.

Parts whose inputs are missing are skipped and the page says so (e.g. a report made from files alone, without a
model, has no reference samples). The ``crp-invert report`` command (:mod:`crp_invert.commands`) makes the
report from files.

Where things are: :mod:`~crp_invert.report.page` (``write_report``: collect, then render),
:mod:`~crp_invert.report.collect` and :mod:`~crp_invert.report.cards` (what the page shows, as dataclasses),
:mod:`~crp_invert.report.figures` (embedded PNGs), :mod:`~crp_invert.report.search` (the search rule and each
label's cases), :mod:`~crp_invert.report.render` (jinja2 with autoescaping), ``templates/`` (the markup) and
``static/`` (the style sheet and the scripts).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..images import to_uint8_image as _to_uint8_image  # noqa: F401  (kept for older imports)
from ..storage.label_files import load_labels
from .collect import (
    MAX_CHANNEL_FIGURES,
    collect_audit,
    collect_evidence,
    collect_sources,
    differing_channels,
    select_channels,
)
from .collect import anchor as _anchor  # noqa: F401  (kept for older imports)
from .page import write_report

__all__ = ["write_report", "load_labels", "select_channels", "MAX_CHANNEL_FIGURES", "search_box", "source_table",
           "audit_section", "differing_channels"]


def search_box(labels: Mapping[str, Any]) -> str:
    """The search box's HTML for these labels (the page's script makes it work; see
    :mod:`crp_invert.report.search` for when a channel matches)."""
    from .collect import label_view
    from .page import SearchBox
    from .render import render_fragment
    from .search import placeholder_query

    cases = [label_view(layer_labels, channel).cases
             for layer_labels in labels.values() for channel in range(len(layer_labels))]
    return render_fragment("search_box", SearchBox(placeholder_query(cases)))


def source_table(layer: str, activation_labels: Any, relevance_labels: Any) -> str:
    """Activation and relevance labels of every channel side by side (HTML); rows where they differ are marked.

    The AUC of the activation label is measured on the channel's activations (``source="activation"``), the
    AUC of the relevance label on its relevances (``source="relevance"``).
    """
    from .render import render_fragment

    return render_fragment("sources_table", collect_sources(layer, activation_labels, relevance_labels))


def audit_section(audits: Sequence[Any]) -> str:
    """The Clever-Hans audits (:class:`crp_invert.audit.Audit`) as HTML: per class its channels by share, flagged."""
    from .render import render_fragment

    return render_fragment("audit_section", [collect_audit(item) for item in audits])


def _evidence_html(glocal: Any) -> str:
    """The evidence table of a glocal explanation ("" when it has none); unexplained parts are marked."""
    from .render import render_fragment

    return render_fragment("evidence_table", collect_evidence(glocal))
