"""Notebook HTML of the result classes (``_repr_html_``): escaped cells, one row per item, truncated long tables."""

import html
import re

import torch

from crp_invert import ConceptLabeler, ConceptLabels, find_channels
from crp_invert.audit import audit
from crp_invert.core.html import format_cell, html_table
from crp_invert.integration.glocal import GlocalExplanation

EVIL = '<b>"red" & </td>'


def cells(table: str) -> list[list[str]]:
    """The unescaped text of every body cell, row by row (a parser independent of html_table)."""
    body = table.split("<tbody>")[1].split("</tbody>")[0]
    return [[html.unescape(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body)]


def _labels_and_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.rand(300, 3, generator=generator) < 0.3
    activations = labels[:, [0, 1, 2, 0]].float() + 0.3 * torch.rand(300, 4, generator=generator)
    concepts = ConceptLabels(labels, [EVIL, "round", "big square"])
    result = ConceptLabeler(concepts).label(activations, L=2, B=2, layer="conv<1>", progress=False)
    return concepts, activations, result


def test_html_table_escapes_and_truncates():
    """Every cell and the caption are escaped; rows past max_rows become one '... N more rows' row."""
    table = html_table(["a", "<b>"], [[EVIL, 1.5], [None, 1e-9], ["x", 2]], caption=EVIL, max_rows=2)
    assert EVIL not in table and html.escape(EVIL) in table
    assert cells(table) == [[EVIL, "1.5000"], ["", "1.00e-09"], ["... 1 more rows"]]
    assert [format_cell(v) for v in (0.0, -2e-5, "s")] == ["0.0000", "-2.00e-05", "s"]


def test_layer_labels_html_shows_the_best_explanation_of_every_feature():
    """LayerLabels: one row per feature with its best formula and AUC, as in its rows()."""
    _, _, result = _labels_and_data()
    rows = cells(result._repr_html_())
    assert [row[:3] for row in rows] == [[str(r["feature"]), r["formula"], f"{r['auc']:.4f}"] for r in result.rows()]
    assert any("<b>" in row[1] and "</td>" in row[1] for row in rows)  # the formula quotes the evil name


def test_channel_search_html_lists_the_matches_in_rank_order():
    """ChannelSearch: rank, layer, channel and AUC of every match."""
    concepts, activations, _ = _labels_and_data()
    search = find_channels("round", {"conv<1>": activations}, concepts)
    rows = cells(search._repr_html_())
    assert [row[:4] for row in rows] == [[str(i + 1), m.layer, str(m.channel), f"{m.auc:.4f}"]
                                        for i, m in enumerate(search.matches)]


def test_audit_html_has_one_row_per_class_channel():
    """Audit: one row per (class, channel) with its share, flag and label."""
    concepts, activations, result = _labels_and_data()
    targets = (activations[:, 1] > activations[:, 1].median()).long()
    report = audit(activations, result, "conv<1>", ["plain", "round one"], targets=targets, concepts=concepts,
                   class_concepts={"plain": [], "round one": ["round"]}, k=2)
    rows = cells(report._repr_html_())
    expected = [[c.name, f"{x.layer}:{x.channel}", format_cell(x.share), format_cell(x.flag), format_cell(x.label)]
                for c in report.classes for x in c.channels]
    assert rows == expected


def test_glocal_html_has_one_row_per_part():
    """GlocalExplanation: channel, share, relevance and label of every decomposed channel."""
    _, _, result = _labels_and_data()
    parts = GlocalExplanation(
        layer="conv<1>", target=3, heatmap=torch.zeros(4, 4), channels=torch.tensor([2, 0]),
        channel_heatmaps=torch.zeros(2, 4, 4), relevance=torch.tensor([0.5, 0.25]), share=torch.tensor([0.6, 0.3]),
        labels=(result[2][0], None), rest_heatmap=torch.zeros(4, 4), channel_relevance=torch.tensor([0.25, 0., 0.5]),
        prediction=torch.zeros(5))
    rows = cells(parts._repr_html_())
    assert [row[0] for row in rows] == ["2", "0"]
    assert rows[0][3] == str(result[2][0].formula) and rows[1][3] == ""
