"""The HTML report: one self-contained page with the INVERT labels of every channel of every layer.

:func:`write_report` writes one ``.html`` file (all images embedded as base64 PNG, no external
resources) with

* an optional summary table (e.g. from :func:`crp_invert.demo.pipeline.run_demo`);
* per layer a sortable table of *every* channel: its best explanation (formula), AUC, p-value
  (one-sided Mann-Whitney), Bonferroni-corrected p-value, Benjamini-Hochberg q-value, fraction
  and length; a click on a column header sorts by it (a few lines of inline JavaScript);
* per layer, for at most ``max_channels`` channels (:data:`MAX_CHANNEL_FIGURES` = 12 by default;
  the channels whose best explanation has the highest AUC), a card with the density figure of
  :func:`crp_invert.plot.plot_explanation` (activations inside / outside the formula; needs the
  activation cache and the concepts), CRP's ActMax and RelMax reference samples
  (``FeatureVisualization.get_max_reference``; needs the ``FeatureVisualization`` that was run,
  i.e. a model) and random samples of the explaining concept (needs the images);
* the glocal figures (:func:`crp_invert.plot.plot_glocal`) and circuit figures
  (:func:`crp_invert.plot.plot_circuit`).

Parts whose inputs are missing are skipped and the page says so (e.g. a report made from files
alone, without a model, has no reference samples). Every name that comes from the data (layer
names, concept names, formulas, class names, titles) is escaped with :func:`html.escape`.

The ``crp-invert report CACHE.h5 LABELS.json ... --out report.html`` command
(:data:`report_command`) makes the report from files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

__all__ = ["write_report", "report_command", "load_labels", "select_channels", "MAX_CHANNEL_FIGURES", "search_box",
           "source_table", "audit_section", "differing_channels"]

logger = logging.getLogger(__name__)

#: default number of channels per layer that get figures (density, references, concept samples)
MAX_CHANNEL_FIGURES = 12

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; }
th { background: #f2f2f2; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-style: italic; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ccc; border-radius: 4px; padding: 6px; max-width: 560px; }
.card h4 { margin: 0 0 4px 0; font-size: 0.9em; }
.card img, .figure img { max-width: 100%; image-rendering: pixelated; }
.row { display: flex; gap: 8px; align-items: flex-start; flex-wrap: wrap; }
.row figure { margin: 0; } figcaption { font-size: 0.75em; color: #555; }
code { background: #f6f6f6; padding: 0 2px; }
"""

# sorts the rows of every table.sortable by the clicked column; numbers by data-value, empty last
_SCRIPT = """
(function () {
  "use strict";
  function key(cell, numeric) {
    var raw = cell.getAttribute("data-value");
    if (raw === null) { raw = cell.textContent; }
    if (!numeric) { return raw.toLowerCase(); }
    var value = parseFloat(raw);
    return isNaN(value) ? null : value;
  }
  function sortTable(table, column, th) {
    var body = table.tBodies[0];
    var numeric = th.getAttribute("data-type") === "number";
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[column], numeric), y = key(b.cells[column], numeric);
      if (x === y) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      var order = x < y ? -1 : 1;
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) {
      cell.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      th.addEventListener("click", function () { sortTable(table, column, th); });
    });
  });
})();
"""


# ------------------------------------------------------------------------------------------------
# small helpers (functional core)
# ------------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Escape any value for HTML text and attributes."""
    return html.escape(str(value), quote=True)


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(figure, dpi: int = 60) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _array_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_uint8_image(image: Any) -> np.ndarray:
    """[C, H, W] / [H, W, C] / [H, W] tensor or array -> uint8 [H, W, 3].

    Floats outside [0, 1] are min-max scaled.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    values = np.asarray(image)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim == 3 and values.shape[0] in (1, 3) and values.shape[-1] not in (1, 3):
        values = values.transpose(1, 2, 0)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim == 2:
        values = np.repeat(values[..., None], 3, axis=-1)
    if values.ndim != 3 or values.shape[-1] != 3:
        raise ValueError(
            f"an image must be [C, H, W], [H, W, C] or [H, W] with 1 or 3 colors, got {values.shape}"
        )
    if values.dtype == np.uint8:
        return values
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        values = (values - low) / (high - low if high > low else 1.0)
    return (values.clip(0, 1) * 255).round().astype(np.uint8)


def _mosaic(tiles: Sequence[np.ndarray], scale: int = 1, gap: int = 2) -> np.ndarray:
    """Tiles side by side (uint8 [H, W, 3], upscaled ``scale`` times by nearest neighbour) on white."""
    tiles = [
        np.kron(tile, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else tile for tile in tiles
    ]
    height = max(tile.shape[0] for tile in tiles)
    width = sum(tile.shape[1] for tile in tiles) + gap * (len(tiles) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for tile in tiles:
        canvas[: tile.shape[0], x : x + tile.shape[1]] = tile
        x += tile.shape[1] + gap
    return canvas


def _image_at(images: Any, index: int) -> Any:
    item = images[int(index)]
    if isinstance(item, (tuple, list)):
        item = item[0]
    return item


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def select_channels(layer_labels: Any, max_channels: int = MAX_CHANNEL_FIGURES) -> list[int]:
    """The channels that get figures: the ``max_channels`` with the highest AUC of their best explanation.

    Ties are broken by the lower channel index; channels without an explanation come last.

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
        best = layer_labels.best(channel)
        keyed.append((-(best.auc if best is not None and not math.isnan(best.auc) else -math.inf), channel))
    return sorted(channel for _, channel in sorted(keyed)[:max_channels])


def load_labels(paths: Iterable[str | os.PathLike]) -> dict:
    """Read ``LayerLabels`` JSON files (or an ``index.json`` written by ``crp-invert label --out DIR``).

    Every file is checked (see :meth:`LayerLabels.from_dict`); errors name the file.

    Returns
    -------
    dict of str to LayerLabels
        Layer name (the labels' ``layer``, else the file stem) -> labels, in the order given.

    Raises
    ------
    ValueError
        For unreadable or malformed files, and for two files with labels of the same layer.
    """
    from .core.checks import read_json
    from .core.labels import LayerLabels

    result: dict = {}

    def add(name: str, labels: Any, source: Path) -> None:
        if name in result:
            raise ValueError(f"{source} holds labels of layer {name!r}, which an earlier file already gave")
        result[name] = labels

    for path in paths:
        path = Path(path)
        data = read_json(path, "labels file")
        if isinstance(data, dict) and data.get("format") == "crp-invert.LayerLabels":
            try:
                labels = LayerLabels.from_dict(data)
            except (ValueError, TypeError, KeyError) as error:
                message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
                raise type(error)(f"labels file {str(path)!r}: {message}") from None
            add(labels.layer or path.stem, labels, path)
        elif isinstance(data, dict) and data and all(isinstance(v, str) for v in data.values()):
            for name, file_name in data.items():  # index.json: layer -> file next to it
                labels = LayerLabels.from_json(path.parent / file_name)
                add(labels.layer or name, labels, path.parent / file_name)
        else:
            raise ValueError(f"{path} is neither a LayerLabels JSON file nor an index.json of them")
    return result


# ------------------------------------------------------------------------------------------------
# HTML parts
# ------------------------------------------------------------------------------------------------

_COLUMNS = (
    ("channel", "number"),
    ("best explanation", "text"),
    ("AUC", "number"),
    ("p", "number"),
    ("p (Bonferroni)", "number"),
    ("q (BH)", "number"),
    ("fraction", "number"),
    ("length", "number"),
    ("explanations", "number"),
)


def _channel_table(layer: str, layer_labels: Any) -> str:
    from .core.labels import format_p_value

    head = "".join(f'<th data-type="{kind}">{_e(name)}</th>' for name, kind in _COLUMNS)
    rows = []
    for channel in range(len(layer_labels)):
        beam = layer_labels[channel]
        best = beam[0] if beam else None
        cells = [f'<td class="num" data-value="{channel}">{channel}</td>']
        if best is None:
            cells.append('<td class="note">(no formula)</td>')
            cells += ['<td class="num"></td>'] * 6
        else:
            cells.append(f"<td>{_e(best.formula)}</td>")
            for value, spec in (
                (best.auc, ".4f"),
                (best.p_value, "p"),
                (best.p_value_bonferroni, "p"),
                (best.p_value_bh, "p"),
                (best.fraction, ".3f"),
            ):
                text = format_p_value(value) if spec == "p" else _fmt(value, spec)
                cells.append(
                    f'<td class="num" data-value="{_e(repr(float(value)) if text else "")}">{_e(text)}</td>'
                )
            cells.append(f'<td class="num" data-value="{best.length}">{best.length}</td>')
        cells.append(f'<td class="num" data-value="{len(beam)}">{len(beam)}</td>')
        rows.append(f'<tr id="{_e(_anchor(layer, channel))}">{"".join(cells)}</tr>')
    return (
        f'<table class="sortable channels" data-layer="{_e(layer)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _anchor(layer: str, channel: int | None = None) -> str:
    """A unique HTML id per layer (and channel): ASCII letters and digits stay, every other character
    becomes ``_<hex code>_``, so ``features.0``, ``features/0`` and ``features_0`` get different ids."""
    safe = "".join(ch if ch.isascii() and ch.isalnum() else f"_{ord(ch):x}_" for ch in layer)
    return f"layer-{safe}" + ("" if channel is None else f"-ch{channel}")


def _plain_text():
    """matplotlib settings under which text is drawn as it is: names with ``$``, ``_`` or ``^`` are not
    parsed as mathtext (which fails on unbalanced ``$``)."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False, "text.usetex": False})


def _img(png: bytes, alt: str, zoom: int = 1) -> str:
    width = ""
    if zoom != 1:  # small pixel images are stored at their size and enlarged by the browser (pixelated)
        from PIL import Image

        width = f' width="{Image.open(io.BytesIO(png)).width * zoom}"'
    return f'<img src="{_png_data_uri(png)}" alt="{_e(alt)}"{width}>'


def _references(
    feature_visualization: Any, layer: str, channel: int, mode: str, n_reference: int, composite: Any
) -> bytes | None:
    """CRP reference samples (and conditional heatmaps with a composite) of one channel as a PNG mosaic."""
    from .plot import heatmap_image

    reference = feature_visualization.get_max_reference(
        [channel], layer, mode=mode, r_range=(0, n_reference), composite=composite, plot_fn=None
    )[channel]
    if isinstance(reference, tuple):
        data, heatmaps = reference
        tiles = [_to_uint8_image(image) for image in data]
        heat = [heatmap_image(h if h.dim() == 2 else h.sum(0)) for h in heatmaps]
        top = _mosaic(tiles)
        bottom = _mosaic(heat)
        return _array_png(np.concatenate([top, np.full((2, top.shape[1], 3), 255, np.uint8), bottom], axis=0))
    return _array_png(_mosaic([_to_uint8_image(image) for image in reference]))


def _concept_samples(images: Any, mask: np.ndarray, n: int, seed: int) -> bytes | None:
    indices = np.flatnonzero(mask)
    if indices.size == 0:
        return None
    chosen = np.sort(np.random.default_rng(seed).choice(indices, size=min(n, indices.size), replace=False))
    return _array_png(_mosaic([_to_uint8_image(_image_at(images, i)) for i in chosen]))


def _channel_card(
    layer: str,
    channel: int,
    layer_labels: Any,
    activations: np.ndarray | None,
    concepts: Any,
    images: Any,
    feature_visualization: Any,
    composite: Any,
    n_reference: int,
    dpi: int,
) -> str:
    from .core.labels import format_p_value
    from .plot import plot_explanation

    best = layer_labels.best(channel)
    title = f"{layer} : channel {channel}"
    parts = [f'<div class="card" id="{_e(_anchor(layer, channel) + "-card")}"><h4>{_e(title)}</h4>']
    if best is None:
        parts.append('<p class="note">no explanation satisfied the search constraints</p></div>')
        return "".join(parts)
    parts.append(
        f"<p><code>{_e(best.formula)}</code> &middot; AUC {best.auc:.3f} &middot; "
        f"p {_e(format_p_value(best.p_value))} &middot; q (BH) {_e(format_p_value(best.p_value_bh))}</p>"
    )
    mask = None
    if concepts is not None:
        mask = best.formula.evaluate(concepts)
        mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, dtype=bool)
    if activations is not None and concepts is not None:
        with _plain_text():
            figure = plot_explanation(activations[:, channel], concepts, best, title=f"{layer}:{channel}")
            png = _figure_png(figure, dpi)
        parts.append(f'<div class="figure">{_img(png, f"density {layer} {channel}")}</div>')
    row = []
    if feature_visualization is not None:
        for mode, name in (("activation", "ActMax"), ("relevance", "RelMax")):
            try:
                png = _references(feature_visualization, layer, channel, mode, n_reference, composite)
            except (FileNotFoundError, OSError, KeyError, IndexError) as error:
                logger.warning("no %s reference samples for %s:%d: %s", name, layer, channel, error)
                png = None
            if png is not None:
                caption = f"CRP {name} (top {n_reference})" + (", conditional heatmaps" if composite else "")
                row.append(
                    f"<figure>{_img(png, f'{name} {layer} {channel}', zoom=2)}<figcaption>{_e(caption)}"
                    f"</figcaption></figure>"
                )
    if images is not None and mask is not None:
        png = _concept_samples(images, mask, n_reference, seed=channel)
        if png is not None:
            row.append(
                f"<figure>{_img(png, f'samples of {best.formula}', zoom=2)}<figcaption>random samples of "
                f"<code>{_e(best.formula)}</code></figcaption></figure>"
            )
    if row:
        parts.append(f'<div class="row">{"".join(row)}</div>')
    parts.append("</div>")
    return "".join(parts)


def _evidence_html(glocal: Any) -> str:
    """The evidence of each channel part of a glocal explanation as a table ("" when it has none); an
    unexplained part (label fails, low activation) is marked in red."""
    if getattr(glocal, "evidence", None) is None:
        return ""
    rows = []
    for part, label in zip(glocal.evidence, glocal.labels):
        holds = {True: "holds", False: "fails", None: "unknown"}[part.label_holds]
        style = ' class="unexplained" style="color:#c00;font-weight:bold"' if part.unexplained else ""
        note = "not explained by the label" if part.unexplained else ""
        rows.append(
            f"<tr{style}><td>{part.channel}</td><td>{_e(label.formula) if label is not None else ''}</td>"
            f"<td>{part.activation:.4g}</td><td>{part.percentile:.0f}</td><td>{holds}</td><td>{note}</td></tr>"
        )
    return (
        '<table class="evidence"><tr><th>channel</th><th>label</th><th>activation</th><th>percentile</th>'
        "<th>label on this sample</th><th></th></tr>" + "".join(rows) + "</table>"
    )


def _summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{_e(column)}</th>" for column in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            if isinstance(value, float):
                value = "" if math.isnan(value) else f"{value:.4g}"
            cells.append(f"<td>{_e(value)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


# ------------------------------------------------------------------------------------------------
# search box, activation vs relevance labels, audit (issue 14)
# ------------------------------------------------------------------------------------------------

_SECTION_STYLE = """
.search { margin: 1em 0; padding: 6px; background: #f7f7fb; border: 1px solid #ddd; }
.search input { width: 28em; font-size: 1em; }
tr.differs td { background: #fff4e0; }
tr.flag-artifact td { background: #fde2e2; } tr.flag-unrelated td, tr.flag-unlabeled td { background: #fff4e0; }
td.flag { font-weight: bold; }
"""

# filters the rows of table.channels (literals by layer and channel from the input's data-literals) and table.searchable
# (literals in each row's data-literals) by the literals of the query typed into #channel-search
_SEARCH_SCRIPT = r"""
(function () {
  "use strict";
  var input = document.getElementById("channel-search");
  if (!input) { return; }
  var status = document.getElementById("channel-search-status");
  var byLayer = JSON.parse(input.getAttribute("data-literals"));
  var rows = document.querySelectorAll("table.channels tbody tr, table.searchable tbody tr");
  var known = {};
  rows.forEach(function (row) {
    rowSets(row).forEach(function (set) { set.forEach(function (lit) { known[lit.slice(1)] = true; }); });
  });
  var pattern = /"((?:[^"\\]|\\.)*)"|([^\s()"]+)/g;
  function query(text) {
    var literals = [], negate = false, match;
    pattern.lastIndex = 0;
    while ((match = pattern.exec(text)) !== null) {
      var word = match[2], name = match[1] !== undefined ? match[1].replace(/\\(.)/g, "$1") : word;
      var upper = word === undefined ? "" : word.toUpperCase();
      if (upper === "NOT") { negate = !negate; continue; }
      if (upper === "AND" || upper === "OR") { continue; }
      literals.push((negate ? "-" : "+") + name.toLowerCase());
      negate = false;
    }
    return literals;
  }
  function rowSets(row) {
    var own = row.getAttribute("data-literals");
    if (own !== null) { return JSON.parse(own); }
    var table = row.closest("table"), layer = table.getAttribute("data-layer");
    var channel = row.cells[0].getAttribute("data-value");
    var sets = byLayer[layer];
    return sets && channel !== null && sets[+channel] ? sets[+channel] : [];
  }
  function matches(sets, literals) {
    return sets.some(function (set) {
      return literals.every(function (lit) { return set.indexOf(lit) >= 0; });
    });
  }
  function apply() {
    var literals = query(input.value), shown = 0, total = 0;
    rows.forEach(function (row) {
      var visible = literals.length === 0 || matches(rowSets(row), literals);
      row.hidden = !visible;
      if (row.closest("table").classList.contains("channels")) { total += 1; shown += visible ? 1 : 0; }
    });
    var unknown = literals.filter(function (lit) { return !known[lit.slice(1)]; });
    var text = literals.length ? shown + " of " + total + " channels match" : "";
    if (unknown.length) {
      text += "; no label uses " + unknown.map(function (lit) { return lit.slice(1); }).join(", ");
    }
    status.textContent = text;
  }
  input.addEventListener("input", apply);
  apply();
})();
"""


def _literal_strings(formula: Any) -> list:
    """The literals of a formula as lower-case ``"+name"`` / ``"-name"`` strings (what the search box matches)."""
    from .audit import literals

    return sorted({("+" if positive else "-") + name.lower() for name, positive in literals(formula)})


def _row_literals(*beams: Any) -> list:
    return [_literal_strings(beam[0].formula) for beam in beams if beam]


def search_box(labels: Mapping[str, Any]) -> str:
    """The search box that filters the channel tables by concept or formula text (plain JavaScript, no server).

    A channel is shown when its best label (in the activation / relevance table: either label) has every literal
    of the query: ``red`` (the label asserts red),
    ``NOT circle`` (the label has NOT circle); AND, OR and parentheses are ignored, keywords and names are
    matched in any case, names with spaces are quoted (``"big square"``). The literals of every channel's label
    (NOT pushed to the atoms) are embedded as JSON in the input's ``data-literals`` attribute.
    """
    data = {layer: [_row_literals(layer_labels[channel]) for channel in range(len(layer_labels))]
            for layer, layer_labels in labels.items()}
    return (
        '<div class="search"><label for="channel-search">Find channels by concept or formula: </label>'
        '<input type="search" id="channel-search" autocomplete="off" '
        f'placeholder="e.g. red, or circle AND NOT large" data-literals="{_e(json.dumps(data))}"> '
        '<span id="channel-search-status" class="note"></span>'
        '<p class="note">Shows the channels whose label has every concept of the query (NOT x: the label says '
        "NOT x; AND, OR and parentheses are ignored; any case; quote names with spaces). For the exact AUC of "
        "any formula for every channel use <code>crp-invert find</code>.</p></div>"
    )


def differing_channels(activation_labels: Any, relevance_labels: Any) -> list:
    """The channels whose best activation label and best relevance label are different formulas (or only one
    of them has a label)."""
    if len(activation_labels) != len(relevance_labels):
        raise ValueError(f"{len(activation_labels)} activation labels but {len(relevance_labels)} relevance labels")

    def best(labels: Any, channel: int) -> Any:
        explanation = labels.best(channel)
        return None if explanation is None else explanation.formula

    return [channel for channel in range(len(activation_labels))
            if best(activation_labels, channel) != best(relevance_labels, channel)]


def source_table(layer: str, activation_labels: Any, relevance_labels: Any) -> str:
    """Activation and relevance labels of every channel side by side; rows where the formulas differ are marked.

    The AUC of the activation label is measured on the channel's activations (``source="activation"``), the
    AUC of the relevance label on its relevances (``source="relevance"``).
    """
    differ_set = set(differing_channels(activation_labels, relevance_labels))
    head = "".join(f'<th data-type="{kind}">{_e(name)}</th>' for name, kind in (
        ("channel", "number"), ("activation label", "text"), ("AUC (activations)", "number"),
        ("relevance label", "text"), ("AUC (relevances)", "number"), ("labels", "text")))
    rows, n_differ = [], 0
    for channel in range(len(activation_labels)):
        beams = activation_labels[channel], relevance_labels[channel]
        best = [beam[0] if beam else None for beam in beams]
        differ = channel in differ_set
        n_differ += differ
        cells = [f'<td class="num" data-value="{channel}">{channel}</td>']
        for explanation in best:
            if explanation is None:
                cells += ['<td class="note">(no formula)</td>', '<td class="num"></td>']
            else:
                cells += [f"<td>{_e(explanation.formula)}</td>",
                          f'<td class="num" data-value="{explanation.auc!r}">{explanation.auc:.4f}</td>']
        cells.append(f'<td>{"differ" if differ else "same"}</td>')
        rows.append(f'<tr class="{"differs" if differ else "same"}" '
                    f"data-literals=\"{_e(json.dumps(_row_literals(*beams)))}\">{''.join(cells)}</tr>")
    return (
        f"<h3>Activation and relevance labels of {_e(layer)}</h3>"
        f'<p class="note">Left: the best label of each channel\'s activations (source="activation", AUC on the '
        f'activations); right: of its relevances (source="relevance", AUC on the relevances). {n_differ} of '
        f"{len(activation_labels)} channels have different labels (marked).</p>"
        f'<table class="sortable sources searchable" data-layer="{_e(layer)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def audit_section(audits: Sequence[Any]) -> str:
    """The Clever-Hans audits (:class:`crp_invert.audit.Audit`): per class its channels by share, flagged."""
    from .audit import FLAGS

    parts = ["<h2 id=\"audit\">Clever-Hans audit</h2>"]
    for item in audits:
        flagged = item.flagged()
        parts.append(
            f'<p class="note">Layer {_e(item.layer)}: for every class the channels with the largest share of its '
            f"{_e(item.quantity)} (mean over the class's samples, divided by the sum of the absolute means of all "
            f"channels). Flags: artifact = the label asserts a concept marked as an artifact "
            f"({_e(', '.join(item.artifacts) or 'none')}); unrelated = it asserts none of the class's concepts; "
            f"unlabeled = no label. Flags count from a share of {item.min_share:g}.</p>"
        )
        if flagged:
            summary = "; ".join(
                f"{name}: " + ", ".join(f"{c.layer}:{c.channel} [{c.flag}] {c.share:.2f}" for c in channels)
                for name, channels in flagged.items())
            parts.append(f"<p><strong>Flagged (share &ge; {item.min_share:g}):</strong> {_e(summary)}</p>")
        else:
            parts.append(f"<p>No channel with a share &ge; {item.min_share:g} is flagged.</p>")
        head = "".join(f"<th>{name}</th>" for name in ("class", "rank", "channel", "share", "flag", "label", "AUC"))
        rows = []
        for klass in item.classes:
            for rank, channel in enumerate(klass.channels, start=1):
                counted = channel.flag in FLAGS and channel.share >= item.min_share
                css = f' class="flag-{channel.flag}"' if counted else ""
                rows.append(
                    f"<tr{css}><td>{_e(klass.name)}</td><td class=\"num\">{rank}</td>"
                    f'<td class="num">{channel.channel}</td><td class="num">{channel.share:.3f}</td>'
                    f'<td class="flag">{_e(channel.flag or "")}</td><td>{_e(channel.label or "(no label)")}</td>'
                    f'<td class="num">{_fmt(channel.label_auc, ".3f")}</td></tr>'
                )
        parts.append(f'<table class="audit" data-layer="{_e(item.layer)}"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{''.join(rows)}</tbody></table>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


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
        Layer name -> labels; every channel of every layer is listed.
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
        Paragraphs shown under the title (escaped).
    title : str
    max_channels : int
        Channels per layer that get figures (see :func:`select_channels`); the table always lists all.
    n_reference : int
        Reference samples (and concept samples) per channel.
    source : {"activation", "relevance"}
        What the labels describe; the density figures use the cache's matching dataset.
    dpi : int
        Resolution of the matplotlib figures.
    progress : bool
        Show a tqdm bar over the layers.
    relevance_labels : mapping of str to LayerLabels, optional
        Labels of the same channels from their relevances (``source="relevance"``), shown next to ``labels``
        (from activations) with the channels whose labels differ marked (:func:`source_table`).
    audits : sequence of Audit
        Clever-Hans audits (:func:`crp_invert.audit.audit`), shown in their own section (:func:`audit_section`).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from tqdm.auto import tqdm

    from .core.labels import write_text_atomically
    from .storage.cache import ActivationCache

    if source not in ("activation", "relevance"):
        raise ValueError(f"source must be 'activation' or 'relevance', got {source!r}")
    if isinstance(n_reference, bool) or not isinstance(n_reference, (int, np.integer)) or n_reference < 1:
        raise ValueError(f"n_reference must be an int >= 1, got {n_reference!r}")
    if not isinstance(labels, Mapping) or not labels:
        raise TypeError("labels must be a non-empty mapping of layer name to LayerLabels")
    path = Path(path)
    own_cache = cache is not None and not isinstance(cache, ActivationCache)
    store = ActivationCache(cache) if own_cache else cache
    try:
        if store is not None and concepts is not None and store.n_samples != concepts.n_samples:
            raise ValueError(
                f"the cache has {store.n_samples} samples but the concepts {concepts.n_samples}; "
                "they must describe the same samples"
            )
        _check_labels_match(labels, store, concepts)
        page = [
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}{_SECTION_STYLE}</style></head><body><h1>{_e(title)}</h1>"
        ]
        for note in notes:
            page.append(f"<p>{_e(note)}</p>")
        missing = []
        if feature_visualization is None:
            missing.append(
                "no model / FeatureVisualization given (a report from files alone): the CRP ActMax and "
                "RelMax reference samples are skipped"
            )
        if store is None or concepts is None:
            missing.append("no activation cache and concepts given: the density figures are skipped")
        if images is None:
            missing.append("no images given: the samples of the explaining concepts are skipped")
        for line in missing:
            page.append(f'<p class="note">{_e(line)}</p>')
        if summary:
            page.append("<h2>Summary</h2>" + _summary_table(summary))

        page.append(search_box(labels))
        page.append("<h2>Layers</h2><ul>")
        for layer, layer_labels in labels.items():
            page.append(
                f'<li><a href="#{_e(_anchor(layer))}">{_e(layer)}</a> ({len(layer_labels)} channels)</li>'
            )
        page.append("</ul>")
        for layer, layer_labels in tqdm(list(labels.items()), desc="report", disable=not progress):
            page.append(f'<h2 id="{_e(_anchor(layer))}">Layer {_e(layer)}</h2>')
            parameters = getattr(layer_labels, "parameters", {}) or {}
            if parameters:
                shown = ", ".join(f"{key}={value}" for key, value in parameters.items())
                page.append(f'<p class="note">search: {_e(shown)}; click a column header to sort</p>')
            page.append(_channel_table(layer, layer_labels))
            if relevance_labels and layer in relevance_labels:
                page.append(source_table(layer, layer_labels, relevance_labels[layer]))
            chosen = select_channels(layer_labels, max_channels)
            if not chosen:
                continue
            activations = None
            if store is not None and concepts is not None and layer in store:
                values = (
                    store.activations(layer, chosen)
                    if source == "activation"
                    else store.relevances(layer, chosen)
                )
                activations = np.zeros((values.shape[0], len(layer_labels)), dtype=np.float32)
                activations[:, chosen] = values.numpy()
            page.append(
                f"<h3>{len(chosen)} of {len(layer_labels)} channels in detail (highest AUC)</h3>"
                '<div class="cards">'
            )
            for channel in chosen:
                page.append(
                    _channel_card(
                        layer,
                        channel,
                        layer_labels,
                        activations,
                        concepts,
                        images,
                        feature_visualization,
                        composite,
                        n_reference,
                        dpi,
                    )
                )
            page.append("</div>")

        if glocals:
            from .plot import plot_glocal

            page.append("<h2>Glocal explanations</h2>")
            for i, glocal in enumerate(glocals):
                image = glocal_images[i] if glocal_images is not None else None
                name = class_names[glocal.target] if class_names is not None else None
                with _plain_text():
                    png = _figure_png(plot_glocal(glocal, image=image, class_name=name), dpi)
                shown = name if name is not None else glocal.target
                caption = f"prediction {i}: class {shown}, layer {glocal.layer}"
                page.append(
                    f'<div class="figure">{_img(png, caption)}<p>{_e(caption)}</p>{_evidence_html(glocal)}</div>'
                )
        if circuits:
            from .plot import plot_circuit

            page.append("<h2>Circuits</h2>")
            for circuit in circuits:
                with _plain_text():
                    png = _figure_png(plot_circuit(circuit), dpi)
                page.append(f'<div class="figure">{_img(png, "circuit")}</div>')
        if audits:
            page.append(audit_section(audits))
        page.append(f"<script>{_SCRIPT}{_SEARCH_SCRIPT}</script></body></html>")
    finally:
        if own_cache:
            store.close()
    write_text_atomically(path, "".join(page))
    return path


def _check_labels_match(labels: Mapping[str, Any], store: Any, concepts: Any) -> None:
    """Refuse labels that do not belong to the cache or the concepts: a layer the cache lacks, another number
    of channels or samples, formulas over concepts that are not given."""
    for layer, layer_labels in labels.items():
        if store is not None:
            if layer not in store:
                raise KeyError(
                    f"the labels of layer {layer!r} have no layer in the cache {str(store.path)!r} (its layers: "
                    f"{store.layers[:10]})"
                )
            if store.n_channels(layer) != len(layer_labels):
                raise ValueError(
                    f"the labels of layer {layer!r} have {len(layer_labels)} features but the cache's layer has "
                    f"{store.n_channels(layer)} channels; they belong to different layers or recordings"
                )
            n_labeled = (getattr(layer_labels, "parameters", None) or {}).get("n_samples")
            if isinstance(n_labeled, int) and not isinstance(n_labeled, bool) and n_labeled != store.n_samples:
                raise ValueError(
                    f"the labels of layer {layer!r} were computed on {n_labeled} samples but the cache has "
                    f"{store.n_samples}; they belong to another recording"
                )
        if concepts is not None:
            missing = sorted(set(getattr(layer_labels, "concept_names", ())) - set(concepts.names))
            if missing:
                raise ValueError(
                    f"the labels of layer {layer!r} use concepts that the given concepts lack: {missing[:5]}"
                )


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


@click.command("report")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.argument("labels", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--concepts",
    "concepts_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Concept labels (.npz, as for `crp-invert label`) of the cache's samples: adds the density figures.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False),
    default="report.html",
    show_default=True,
    help="The HTML file to write.",
)
@click.option(
    "--max-channels",
    type=click.IntRange(min=0),
    default=MAX_CHANNEL_FIGURES,
    show_default=True,
    help="Channels per layer with figures (the highest AUC); the tables list all channels.",
)
@click.option(
    "--source", type=click.Choice(["activation", "relevance"]), default="activation", show_default=True
)
@click.option("--title", default="crp-invert report", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def report_command(
    cache: str,
    labels: tuple,
    concepts_path: str | None,
    out: str,
    max_channels: int,
    source: str,
    title: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Write an HTML report of the labels in LABELS (LayerLabels JSON files or an index.json) for CACHE.

    Made from files alone, without a model: CRP's reference samples are not shown. An existing --out file
    is kept unless --overwrite is given.
    """
    from .core.checks import check_output
    from .core.concepts import ConceptLabels

    try:
        check_output(out, overwrite=overwrite)
        layer_labels = load_labels(labels)
        concepts = ConceptLabels.load(concepts_path) if concepts_path else None
        written = write_report(
            out,
            layer_labels,
            cache=cache,
            concepts=concepts,
            source=source,
            title=title,
            max_channels=max_channels,
            progress=not quiet,
        )
    except (KeyError, ValueError, TypeError, OSError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise click.ClickException(" ".join(str(message).split())) from None
    click.echo(f"wrote {written}", err=True)
