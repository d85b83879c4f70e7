"""Matplotlib figures: glocal decompositions, explanations (activation densities) and circuits.

Every function returns a :py:class:`matplotlib.figure.Figure` and never calls ``plt.show()``.
Heatmaps are drawn with zennit's color maps (:py:func:`crp_invert.integration.colors.palette_rgb`, ``"bwr"``
by default, symmetric around zero, normalized as :py:func:`zennit.image.imgify` does), input images min-max
scaled by :func:`crp_invert.images.to_uint8_image`. matplotlib is imported
only when a figure is drawn.

Names are data, not markup: every text a figure draws (titles, node texts, tick labels, legends) is drawn
with matplotlib's math text and TeX off, so a concept named ``a$^$`` or ``_{x}`` shows as written. Long
labels are wrapped, never cut: a label is a claim, and half a formula is another one.
"""
import math
import textwrap

import numpy as np
import torch

from .images import to_uint8_image
from .integration.colors import palette_rgb
from .integration.shown_labels import NO_RELIABLE_LABEL, NONE_HOLDS

__all__ = ["heatmap_image", "plot_glocal", "evidence_line", "plot_explanation", "plot_circuit"]

CHAR_WIDTH = 0.6
"""Average character width of matplotlib's default font (DejaVu Sans) in font sizes, to wrap text to a panel."""


def _figure(figsize):
    from matplotlib.figure import Figure

    # a bare Figure (no pyplot state): nothing is shown, nothing leaks between calls
    return Figure(figsize=figsize, layout="constrained")


def _plain_text(artist) -> None:
    """Turn math text and TeX off for every text of ``artist`` (a figure or an axes): titles, texts, tick
    labels, legends."""
    from matplotlib.text import Text

    for text in artist.findobj(Text):
        text.set_parse_math(False)
        text.set_usetex(False)


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces (inside a long word where needed)."""
    lines = []
    for paragraph in str(text).split("\n"):
        lines.extend(textwrap.wrap(paragraph, width=max(int(width), 4), break_on_hyphens=False) or [""])
    return lines


def _chars_per_line(inches: float, fontsize: float) -> int:
    """How many average characters of ``fontsize`` points fit into ``inches``."""
    return max(8, int(inches * 72 / (fontsize * CHAR_WIDTH)) - 1)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _palette_rgb(values: np.ndarray, vmin: float, vmax: float, cmap: str, level: float = 1.0) -> np.ndarray:
    """RGB array of ``values`` in a zennit color map (:py:func:`crp_invert.integration.colors.palette_rgb`)."""
    return palette_rgb(values, vmin, vmax, cmap, level)


def heatmap_image(heatmap, cmap: str = "bwr", vmax: float | None = None, level: float = 1.0) -> np.ndarray:
    """RGB array of a 2-D heatmap in a zennit color map, symmetric around zero.

    Parameters
    ----------
    heatmap : torch.Tensor or numpy.ndarray
        [H, W] relevance.
    cmap : str
        A zennit color map name (``"bwr"``, ``"coldnhot"``, ...) or color map code.
    vmax : float, optional
        Absolute value mapped to the ends of the color map (default: the heatmap's maximum absolute value).
    level : float
        zennit's color map level.

    Returns
    -------
    numpy.ndarray
        [H, W, 3] uint8.
    """
    values = _numpy(heatmap)
    if values.ndim != 2:
        raise ValueError(f"a heatmap must be 2-D [H, W], got shape {values.shape}")
    scale = float(np.abs(values).max()) if vmax is None else float(vmax)
    if scale <= 0:
        scale = 1.0
    return _palette_rgb(values, -scale, scale, cmap, level)


UNEXPLAINED_COLOR = "tab:red"


def _q_text(q: float) -> str:
    """``"q 2e-04"``; a q-value that underflowed to zero is ``"q < 1e-300"``, not a claim of certainty."""
    return f"q {q:.1g}" if q > 0 else "q < 1e-300"


def _statistics(label) -> str:
    """``"AUC 0.91 | q 2e-04 | n 120"``: the label's AUC, and its q-value and support where known."""
    parts = [f"AUC {float(label.auc):.2f}"]
    q = getattr(label, "p_value_bh", None)
    if q is not None and math.isfinite(float(q)):
        parts.append(_q_text(float(q)))
    support = getattr(label, "support", None)
    if support is not None:
        parts.append(f"n {int(support)}")
    return " | ".join(parts)


def _channel_title(channel: int, label, share: float, source: str | None, part, width: int) -> str:
    """A channel panel's title: the shown label (wrapped), its source and statistics, the share, the evidence."""
    if label is None:
        text = NONE_HOLDS if getattr(part, "label_holds", None) is False else NO_RELIABLE_LABEL
        head = f"ch {channel}: {text}"
    else:
        head = f"ch {channel} [{source or 'act'}]: {label.formula}"
    lines = _wrap(head, width)
    if label is not None:
        lines += _wrap(_statistics(label), width)
    lines.append(f"R {share:+.0%}")
    if part is not None:
        lines += _wrap(evidence_line(part), width)
    return "\n".join(lines)


def evidence_line(part) -> str:
    """The evidence line of a channel panel: the sample's activation percentile among the labeling data and
    whether a reliable label holds on it, ending in ``" !"`` for an unexplained part (no reliable label
    holds, activation below its ``low_percentile``).

    ``"act p91 | label holds"``, ``"act p12 | 0 of 3 hold !"`` (none of the channel's 3 reliable labels
    holds), ``"act p77 | label ?"`` (the sample's concepts are unknown), ``"act p40"`` (no reliable label);
    evidence without the counts of reliable labels says ``"label fails"``.
    """
    head = f"act p{part.percentile:.0f}"
    n_reliable = getattr(part, "n_reliable", None)
    if n_reliable == 0:
        return head
    if part.label_holds is False and n_reliable is not None:
        state = f"0 of {n_reliable} hold"
    else:
        state = "label " + {True: "holds", False: "fails", None: "?"}[part.label_holds]
    return f"{head} | {state}" + (" !" if part.unexplained else "")


def _glocal_panels(glocal, image, class_name, show_rest: bool, cmap: str, scale, width: int) -> list[tuple]:
    """``(title, RGB picture, unexplained)`` per panel of the glocal figure."""
    heatmap = _numpy(glocal.heatmap)
    panels = []
    if image is not None:
        panels.append(("input", to_uint8_image(image, scale="minmax"), False))
    target = class_name if class_name is not None else str(glocal.target)
    class_title = "\n".join(_wrap(f"class {target}", width) + _wrap(f"{glocal.layer}: top {glocal.top_k}", width))
    panels.append((class_title, heatmap_image(heatmap, cmap, scale), False))
    evidence = getattr(glocal, "evidence", None)
    sources = glocal.sources() if hasattr(glocal, "sources") else [None] * glocal.top_k
    for i, channel in enumerate(glocal.channels.tolist()):
        label = glocal.labels[i] if glocal.labels else None
        part = evidence[i] if evidence is not None else None
        title = _channel_title(channel, label, float(glocal.share[i]), sources[i], part, width)
        panels.append((title, heatmap_image(glocal.channel_heatmaps[i], cmap, scale), bool(part and part.unexplained)))
    if show_rest:
        panels.append(("rest", heatmap_image(glocal.rest_heatmap, cmap, scale), False))
    return panels


PANEL_GAP = 0.12
"""Inches between two panels of the glocal figure."""


def _panel_grid(titles: list[str], ncols: int, panel_size: float, fontsize: float):
    """A figure with one square axes per title, ``ncols`` per row, each row as tall as its panels and its
    tallest title (matplotlib's 1.2 line spacing and 6 pt title pad), so titles never run into each other."""
    from matplotlib.figure import Figure

    rows = [titles[start:start + ncols] for start in range(0, len(titles), ncols)]
    title_inches = [(max(t.count("\n") + 1 for t in row) * 1.2 * fontsize + 6 + 4) / 72 for row in rows]
    heights = [panel_size + title for title in title_inches]
    width, height = panel_size * ncols, sum(heights)
    figure = Figure(figsize=(width, height))
    axes, top = [], height
    for row, row_titles in enumerate(rows):
        bottom = top - heights[row] + PANEL_GAP / 2
        for column in range(len(row_titles)):
            left = column * panel_size + PANEL_GAP / 2
            side = panel_size - PANEL_GAP
            ax = figure.add_axes((left / width, bottom / height, side / width, side / height))
            ax.axis("off")
            axes.append(ax)
        top -= heights[row]
    return figure, axes


def plot_glocal(glocal, image=None, class_name: str | None = None, show_rest: bool = True,
                cmap: str = "bwr", shared_scale: bool = False, ncols: int | None = None,
                panel_size: float = 2.2, max_label_chars: int | None = None, fontsize: float = 8.0):
    """The glocal figure: input, class heatmap and the labeled top-k channel heatmaps.

    Parameters
    ----------
    glocal : GlocalExplanation
        From :py:func:`crp_invert.decompose`.
    image : torch.Tensor or numpy.ndarray, optional
        The input ([1, C, H, W], [C, H, W] or [H, W]), drawn first when given.
    class_name : str, optional
        Shown in the class heatmap's title (default: the target index).
    show_rest : bool
        Also draw the rest heatmap (all other channels and the relevance that bypasses the layer).
    cmap : str
        zennit color map for heatmaps.
    shared_scale : bool
        One color scale for all heatmaps (the class heatmap's maximum), so channel heatmaps show their
        share; by default each heatmap is scaled to its own maximum.
    ncols : int, optional
        Panels per row (default: rows of at most 6 panels, as even as can be: 7 panels in rows of 4 and 3).
    panel_size : float
        Inches per panel; the figure is ``ncols`` panels wide and as tall as its rows and their titles.
    max_label_chars : int, optional
        Title lines are wrapped at this many characters (default: what fits the panel width), never cut.
    fontsize : float
        Title font size in points.

    Returns
    -------
    matplotlib.figure.Figure
        Axes titles: ``"input"``, ``"class <name>\\n<layer>: top <k>"``, one per channel part and ``"rest"``.
        A part's title is ``"ch <c> [<source>]: <label>"`` (wrapped; source ``act`` for activation labels,
        ``rel`` for relevance labels), ``"AUC <auc> | q <q> | n <support>"`` and ``"R <share>"``; a part
        without a reliable label says ``"ch <c>: no reliable label"``, and with evidence one whose reliable
        labels all fail on the sample ``"ch <c>: no reliable label holds here"``. With evidence
        (``decompose(..., evidence=...)``) a last line gives the sample's activation percentile and whether
        a label holds (:func:`evidence_line`); an unexplained part (no reliable label holds, activation below
        the evidence's ``low_percentile``, by default the channel's median on the labeling data) gets a red
        title ending in ``" !"`` and a red frame. Math text is off: names show as written.
    """
    heatmap = _numpy(glocal.heatmap)
    if heatmap.ndim != 2:
        raise ValueError(f"plot_glocal draws 2-D heatmaps, got shape {heatmap.shape}")
    width = _chars_per_line(panel_size - PANEL_GAP, fontsize) if max_label_chars is None else int(max_label_chars)
    scale = float(np.abs(heatmap).max()) if shared_scale else None
    panels = _glocal_panels(glocal, image, class_name, show_rest, cmap, scale, width)
    if ncols is None:  # balanced rows of at most 6 panels
        ncols = math.ceil(len(panels) / math.ceil(len(panels) / 6))
    ncols = max(1, int(ncols))
    figure, axes = _panel_grid([title for title, _, _ in panels], ncols, panel_size, fontsize)
    for ax, (title, picture, unexplained) in zip(axes, panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=fontsize, **({"color": UNEXPLAINED_COLOR} if unexplained else {}))
        if unexplained:
            from matplotlib.patches import Rectangle

            ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, clip_on=False,
                                   edgecolor=UNEXPLAINED_COLOR, linewidth=3, gid="unexplained"))
    _plain_text(figure)
    return figure


def _density(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    from scipy.stats import gaussian_kde

    if len(values) < 2 or np.ptp(values) == 0:
        density = np.zeros_like(grid)
        if len(values):
            density[np.argmin(np.abs(grid - values[0]))] = 1.0 / max(grid[1] - grid[0], 1e-12)
        return density
    return gaussian_kde(values)(grid)


def plot_explanation(activations, concepts, explanation, feature: int | None = None, ax=None,
                     points: int = 200, title: str | None = None, value_name: str = "activation"):
    """The explanation figure (paper figures 1-2): activation densities inside and outside the formula.

    Parameters
    ----------
    activations : torch.Tensor or numpy.ndarray
        [N] activations of one feature (or [N, F] together with ``feature``).
    concepts : ConceptLabels or mapping of name to bool [N]
        Where the explanation's formula is evaluated.
    explanation : Explanation
        Its ``formula``, ``auc``, ``p_value`` and ``fraction`` are shown.
    feature : int, optional
        Column of ``activations`` when it is 2-D (also shown in the title).
    ax : matplotlib.axes.Axes, optional
        Draw into this axes (its figure is returned).
    points : int
        Grid points of the density estimate (Gaussian KDE).
    title : str, optional
        Replaces the first title line (default: ``"feature <f>: <formula>"``).
    value_name : str
        The x-axis label: what the values are (``"relevance"`` for relevance labels).

    Returns
    -------
    matplotlib.figure.Figure
        Title ``"<formula>\\nAUC <auc>, p = <p>, fraction <fraction>"`` (a long formula wrapped to the axes
        width); legend entries ``"inside (n=...)"`` and ``"outside (n=...)"``. Math text is off: concept
        names show as written.
    """
    values = _numpy(activations)
    if values.ndim == 2:
        if feature is None:
            raise ValueError("activations are [N, F]: pass feature= to pick a column")
        values = values[:, int(feature)]
    if values.ndim != 1:
        raise ValueError(f"activations must be [N] or [N, F], got shape {values.shape}")
    inside = explanation.formula.evaluate(concepts)
    inside = inside.cpu().numpy() if isinstance(inside, torch.Tensor) else np.asarray(inside, dtype=bool)
    if inside.shape != values.shape:
        raise ValueError(f"concepts have {inside.shape[0]} samples, activations {values.shape[0]}")

    if ax is None:
        figure = _figure((5.0, 3.2))
        ax = figure.subplots()
    else:
        figure = ax.figure
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * (high - low) if high > low else 1.0
    grid = np.linspace(low - pad, high + pad, points)
    for mask, name, color in ((~inside, "outside", "tab:gray"), (inside, "inside", "tab:red")):
        density = _density(values[mask], grid)
        ax.fill_between(grid, density, alpha=0.35, color=color, label=f"{name} (n={int(mask.sum())})")
        ax.plot(grid, density, color=color, linewidth=1)
    head = title if title is not None else (
        f"feature {feature}: {explanation.formula}" if feature is not None else str(explanation.formula))
    width = _chars_per_line(ax.get_position().width * figure.get_figwidth(), 9)
    ax.set_title("\n".join(_wrap(head, width)) + f"\nAUC {explanation.auc:.3f}, p = {explanation.p_value:.2g}, "
                 f"fraction {explanation.fraction:.1%}", fontsize=9)
    ax.set_xlabel(value_name)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    _plain_text(ax)
    return figure


def _layer_order(circuit) -> list:
    """Layers from earliest (left) to latest (right): edges point forward; else reverse first appearance."""
    layers = circuit.layers
    depth = {layer: 0 for layer in layers}
    layer_of = {node.id: node.layer for node in circuit.nodes}
    for _ in range(len(layers)):
        changed = False
        for edge in circuit.edges:
            source, target = layer_of.get(edge.source), layer_of.get(edge.target)
            if source is None or target is None or source == target:
                continue
            if depth[target] <= depth[source]:
                depth[target] = depth[source] + 1
                changed = True
        if not changed:
            break
    position = {layer: i for i, layer in enumerate(reversed(layers))}
    return sorted(layers, key=lambda layer: (depth[layer], position[layer]))


def _node_text(node, width: int) -> str:
    """``"<layer>:<channel>"``, the node's label or note (wrapped, whole) and its statistics."""
    lines = _wrap(f"{node.layer}:{node.channel}", width)
    shown = node.shown_label if hasattr(node, "shown_label") else node.label
    if shown:
        lines += _wrap(shown, width)
    if node.auc is not None:
        statistics = [f"AUC {node.auc:.2f}"]
        if getattr(node, "q", None) is not None and math.isfinite(node.q):
            statistics.append(_q_text(node.q))
        if getattr(node, "support", None) is not None:
            statistics.append(f"n {node.support}")
        lines += _wrap(" | ".join(statistics), width)
    return "\n".join(lines)


def _node_positions(layers: list, columns: dict, texts: dict) -> tuple[dict, float]:
    """Node centers (column, height in text lines): each column stacked from the top, centered on zero; and
    the height of the tallest column in lines."""
    gap = 1.2  # lines between two node boxes
    heights = {layer: sum(texts[node.id].count("\n") + 1 for node in columns[layer])
               + gap * (len(columns[layer]) - 1) for layer in layers}
    tallest = max(heights.values())
    position = {}
    for x, layer in enumerate(layers):
        top = heights[layer] / 2
        for node in columns[layer]:
            lines = texts[node.id].count("\n") + 1
            position[node.id] = (float(x), top - lines / 2)
            top -= lines + gap
    return position, tallest


def plot_circuit(circuit, ax=None, max_label_chars: int = 28, title: str | None = None, fontsize: float = 7.0):
    """The circuit figure: one column per layer (earliest left), labeled nodes, edges by value.

    Edge width follows ``|value|`` (relative to the largest), red for positive, blue for negative values.

    Parameters
    ----------
    circuit : Circuit
        From :py:func:`crp_invert.circuit_by_weight`, :py:func:`crp_invert.circuit_by_relevance` or
        :py:func:`crp_invert.concept_circuit`.
    ax : matplotlib.axes.Axes, optional
    max_label_chars : int
        Longer labels are wrapped to lines of this many characters (never cut); the figure grows with them.
    title : str, optional
        Default: ``"circuit (<quantity>)"``.
    fontsize : float
        Node text size in points.

    Returns
    -------
    matplotlib.figure.Figure
        Node texts ``"<layer>:<channel>\\n<label>\\nAUC <auc>"`` (plus ``" | q <q> | n <support>"`` where the
        circuit knows them; ``"no reliable label"`` for a labeled layer's channel without a reliable label).
        Math text is off: names show as written.
    """
    if not circuit.nodes:
        raise ValueError("the circuit has no nodes")
    layers = _layer_order(circuit)
    columns = {layer: [node for node in circuit.nodes if node.layer == layer] for layer in layers}
    texts = {node.id: _node_text(node, max_label_chars) for node in circuit.nodes}
    position, tallest = _node_positions(layers, columns, texts)
    line_inches = fontsize * 1.35 / 72
    if ax is None:
        longest = max(len(line) for text in texts.values() for line in text.split("\n"))
        column_inches = longest * fontsize * CHAR_WIDTH / 72
        figure = _figure((len(layers) * (column_inches + 0.8) + 0.6, (tallest + 1.6) * line_inches * 1.3 + 1.0))
        ax = figure.subplots()
    else:
        figure = ax.figure
    _draw_edges(ax, circuit, position)
    for node in circuit.nodes:
        x, y = position[node.id]
        ax.text(x, y, texts[node.id], ha="center", va="center", fontsize=fontsize, zorder=2,
                bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="0.4"))
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylim(-tallest / 2 - 0.8, tallest / 2 + 0.8)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title if title is not None else f"circuit ({circuit.quantity})", fontsize=9)
    _plain_text(ax)
    return figure


def _draw_edges(ax, circuit, position: dict) -> None:
    """One line per edge between node centers: width by ``|value|``, red positive, blue negative."""
    largest = max((abs(edge.value) for edge in circuit.edges), default=1.0) or 1.0
    for edge in circuit.edges:
        if edge.source not in position or edge.target not in position:
            continue
        (x0, y0), (x1, y1) = position[edge.source], position[edge.target]
        ax.plot([x0, x1], [y0, y1], color="tab:red" if edge.value >= 0 else "tab:blue",
                linewidth=0.5 + 3.5 * abs(edge.value) / largest, alpha=0.7, zorder=1)
