"""Matplotlib figures: glocal decompositions, explanations (activation densities) and circuits.

Every function returns a :py:class:`matplotlib.figure.Figure` and never calls ``plt.show()``.
Heatmaps are drawn with zennit's color maps (:py:func:`zennit.image.palette`, ``"bwr"`` by default,
symmetric around zero, normalized as :py:func:`zennit.image.imgify` does), input images min-max scaled by
:func:`crp_invert.images.to_uint8_image`. matplotlib is imported only when a figure is drawn.
"""
import math

import numpy as np
import torch

from .images import to_uint8_image

__all__ = ["heatmap_image", "plot_glocal", "evidence_line", "plot_explanation", "plot_circuit"]


def _figure(figsize):
    from matplotlib.figure import Figure

    # a bare Figure (no pyplot state): nothing is shown, nothing leaks between calls
    return Figure(figsize=figsize, layout="constrained")


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _palette_rgb(values: np.ndarray, vmin: float, vmax: float, cmap: str, level: float = 1.0) -> np.ndarray:
    """RGB array of ``values`` in a zennit color map, normalized as :py:func:`zennit.image.imgify` does.

    zennit 0.4.6 builds palette ("P") images with a numpy palette, which Pillow 13 can neither convert
    nor read back (``ImagePalette.tobytes`` fails); we apply zennit's palette to the indices ourselves.
    """
    from zennit.image import palette

    span = vmax - vmin if vmax > vmin else 1.0
    indices = ((values - vmin) / span * 255).clip(0, 255).astype(np.uint8)
    return np.asarray(palette(cmap, level))[indices]


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


def _channel_title(channel: int, label, share: float, relevance: float) -> str:
    if label is None:
        name, auc = "(no label)", ""
    else:
        name, auc = str(label.formula), f"AUC {label.auc:.2f} | "
    return f"ch {channel}: {name}\n{auc}R {share:+.0%}"


def evidence_line(part) -> str:
    """The evidence line of a channel panel: ``"act p<percentile> | label holds|fails|?"``, ending in ``" !"``
    for an unexplained part (label fails, activation below its ``low_percentile``)."""
    state = {True: "holds", False: "fails", None: "?"}[part.label_holds]
    return f"act p{part.percentile:.0f} | label {state}" + (" !" if part.unexplained else "")


def plot_glocal(glocal, image=None, class_name: str | None = None, show_rest: bool = True,
                cmap: str = "bwr", shared_scale: bool = False, ncols: int | None = None,
                panel_size: float = 2.2, max_label_chars: int = 40):
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
        Panels per row (default: all in one row up to 6).
    panel_size : float
        Inches per panel.
    max_label_chars : int
        Longer labels are shortened with an ellipsis.

    Returns
    -------
    matplotlib.figure.Figure
        Axes titles: ``"input"``, ``"class <name>"``, one ``"ch <c>: <label>\\nAUC <auc> | R <share>"`` per
        channel and ``"rest"``. With evidence (``decompose(..., evidence=...)``) each channel title gets a
        third line ``"act p<percentile> | label holds|fails|?"`` (:func:`evidence_line`); an unexplained part
        (its label does not hold for the sample and its activation is below the evidence's
        ``low_percentile``, by default the channel's median on the labeling data) gets a red title ending in
        ``" !"`` and a red frame: its heatmap is not explained by the label.
    """
    heatmap = _numpy(glocal.heatmap)
    if heatmap.ndim != 2:
        raise ValueError(f"plot_glocal draws 2-D heatmaps, got shape {heatmap.shape}")
    scale = float(np.abs(heatmap).max()) if shared_scale else None
    panels = []
    if image is not None:
        panels.append(("input", to_uint8_image(image, scale="minmax"), False))
    target = class_name if class_name is not None else str(glocal.target)
    class_title = f"class {target}\n{glocal.layer}: top {glocal.top_k}"
    panels.append((class_title, heatmap_image(heatmap, cmap, scale), False))
    evidence = getattr(glocal, "evidence", None)
    for i, channel in enumerate(glocal.channels.tolist()):
        label = glocal.labels[i] if glocal.labels else None
        title = _channel_title(channel, label, float(glocal.share[i]), float(glocal.relevance[i]))
        first, _, rest = title.partition("\n")
        if len(first) > max_label_chars:
            first = first[:max_label_chars - 1] + "\u2026"
        title = f"{first}\n{rest}"
        unexplained = False
        if evidence is not None:
            title += "\n" + evidence_line(evidence[i])
            unexplained = evidence[i].unexplained
        panels.append((title, heatmap_image(glocal.channel_heatmaps[i], cmap, scale), unexplained))
    if show_rest:
        panels.append(("rest", heatmap_image(glocal.rest_heatmap, cmap, scale), False))

    ncols = min(len(panels), 6) if ncols is None else max(1, int(ncols))
    nrows = math.ceil(len(panels) / ncols)
    title_space = 0.65 if evidence is not None else 0.5
    figure = _figure((panel_size * ncols, (panel_size + title_space) * nrows))
    axes = figure.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, picture, unexplained) in zip(axes.flat, panels):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=8, **({"color": UNEXPLAINED_COLOR} if unexplained else {}))
        if unexplained:
            from matplotlib.patches import Rectangle

            ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, clip_on=False,
                                   edgecolor=UNEXPLAINED_COLOR, linewidth=3, gid="unexplained"))
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
                     points: int = 200, title: str | None = None):
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

    Returns
    -------
    matplotlib.figure.Figure
        Title ``"<formula>\\nAUC <auc>, p = <p>, fraction <fraction>"``; legend entries
        ``"inside (n=...)"`` and ``"outside (n=...)"``.
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
    ax.set_title(f"{head}\nAUC {explanation.auc:.3f}, p = {explanation.p_value:.2g}, "
                 f"fraction {explanation.fraction:.1%}", fontsize=9)
    ax.set_xlabel("activation")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
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


def plot_circuit(circuit, ax=None, max_label_chars: int = 28, title: str | None = None):
    """The circuit figure: one column per layer (earliest left), labeled nodes, edges by value.

    Edge width follows ``|value|`` (relative to the largest), red for positive, blue for negative values.

    Parameters
    ----------
    circuit : Circuit
        From :py:func:`crp_invert.circuit_by_weight`, :py:func:`crp_invert.circuit_by_relevance` or
        :py:func:`crp_invert.concept_circuit`.
    ax : matplotlib.axes.Axes, optional
    max_label_chars : int
        Longer labels are shortened.
    title : str, optional
        Default: ``"circuit (<quantity>)"``.

    Returns
    -------
    matplotlib.figure.Figure
        Node texts ``"<layer>:<channel>\\n<label>\\nAUC <auc>"``.
    """
    if not circuit.nodes:
        raise ValueError("the circuit has no nodes")
    layers = _layer_order(circuit)
    columns = {layer: [node for node in circuit.nodes if node.layer == layer] for layer in layers}
    tallest = max(len(nodes) for nodes in columns.values())
    if ax is None:
        figure = _figure((2.8 * len(layers) + 1, 0.9 * tallest + 1.5))
        ax = figure.subplots()
    else:
        figure = ax.figure
    position = {}
    for x, layer in enumerate(layers):
        nodes = columns[layer]
        offsets = np.linspace(0, -(len(nodes) - 1), len(nodes)) + (len(nodes) - 1) / 2
        for node, y in zip(nodes, offsets):
            position[node.id] = (float(x), float(y))
    largest = max((abs(edge.value) for edge in circuit.edges), default=1.0) or 1.0
    for edge in circuit.edges:
        if edge.source not in position or edge.target not in position:
            continue
        (x0, y0), (x1, y1) = position[edge.source], position[edge.target]
        ax.plot([x0, x1], [y0, y1], color="tab:red" if edge.value >= 0 else "tab:blue",
                linewidth=0.5 + 3.5 * abs(edge.value) / largest, alpha=0.7, zorder=1)
    for node in circuit.nodes:
        x, y = position[node.id]
        text = f"{node.layer}:{node.channel}"
        if node.label:
            label = node.label
            if len(label) > max_label_chars:
                label = label[:max_label_chars - 1] + "\u2026"
            text += f"\n{label}"
        if node.auc is not None:
            text += f"\nAUC {node.auc:.2f}"
        ax.text(x, y, text, ha="center", va="center", fontsize=7, zorder=2,
                bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="0.4"))
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylim(-(tallest - 1) / 2 - 0.8, (tallest - 1) / 2 + 0.8)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title if title is not None else f"circuit ({circuit.quantity})", fontsize=9)
    return figure
