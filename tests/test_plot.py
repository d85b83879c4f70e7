"""Figures render with the Agg backend and carry the expected titles."""
import matplotlib

matplotlib.use("Agg")

import dataclasses  # noqa: E402
import textwrap  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import random_concepts  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from crp_invert import ChannelEvidence, ConceptLabeler, ConceptLabels, Explanation, Formula  # noqa: E402
from crp_invert.integration.circuits import Circuit, CircuitEdge, CircuitNode
from crp_invert.integration.glocal import GlocalExplanation  # noqa: E402
from crp_invert.plot import heatmap_image, plot_circuit, plot_explanation, plot_glocal  # noqa: E402


def _render(figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    assert isinstance(figure, Figure)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # Agg: actually rasterize
    pixels = np.asarray(canvas.buffer_rgba())
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


@pytest.fixture
def labeled():
    generator = torch.Generator().manual_seed(0)
    concepts = ConceptLabels(torch.rand(80, 3, generator=generator) > 0.6, ["stripes", "wheel", "fur"])
    activations = torch.randn(80, 4, generator=generator) + 2 * concepts.dense().float()[:, [0, 1, 2, 0]]
    labels = ConceptLabeler(concepts).label(activations, L=2, B=2, layer="conv2", progress=False)
    return concepts, activations, labels


def _glocal(labels, top_k=3, size=9):
    generator = torch.Generator().manual_seed(1)
    channel_heatmaps = torch.randn(top_k, size, size, generator=generator)
    rest = torch.randn(size, size, generator=generator)
    channel_relevance = torch.tensor([0.5, 0.3, -0.1, 0.2])
    channels = torch.tensor([0, 1, 3][:top_k])
    return GlocalExplanation(
        layer="conv2", target=2, heatmap=channel_heatmaps.sum(0) + rest, channels=channels,
        channel_heatmaps=channel_heatmaps, relevance=channel_relevance[channels],
        share=channel_relevance[channels] / channel_relevance.sum(),
        labels=tuple(labels[c][0] if labels is not None else None for c in channels.tolist()),
        rest_heatmap=rest, channel_relevance=channel_relevance, prediction=torch.zeros(4))


def _statistics(label):
    return f"AUC {label.auc:.2f} | q {label.p_value_bh:.1g}" + (
        f" | n {label.support}" if hasattr(label, "support") else "")


def test_glocal_figure_titles(labeled):
    """Panel titles: input, class, one per part (source, label, AUC, q, share), rest; no label said so."""
    _, _, labels = labeled
    g = _glocal(labels)
    image = torch.rand(1, 1, 9, 9)
    titles = _render(plot_glocal(g, image=image, class_name="Sneaker", max_label_chars=200))
    assert titles[0] == "input"
    assert titles[1] == "class Sneaker\nconv2: top 3"
    for title, channel, label, share in zip(titles[2:5], g.channels.tolist(), g.labels, g.share.tolist()):
        assert title == f"ch {channel} [act]: {label.formula}\n{_statistics(label)}\nR {share:+.0%}"
    assert titles[5] == "rest"
    assert len(titles) == 6
    # the share of channel 0 is 0.5 / 0.9
    assert titles[2].endswith("R +56%")
    # a color input [3, H, W] (CRP's imgify) and a batch of inputs (refused)
    figure = plot_glocal(g, image=torch.rand(3, 9, 9))
    assert _render(figure)[0] == "input" and figure.axes[0].images[0].get_array().shape == (9, 9, 3)
    with pytest.raises(ValueError, match="one sample"):
        plot_glocal(g, image=torch.rand(2, 1, 9, 9))
    # unlabeled, no input, no rest, a grid of 2 columns, one color scale
    titles = _render(plot_glocal(_glocal(None, top_k=2), show_rest=False, ncols=2, shared_scale=True))
    assert titles == ["class 2\nconv2: top 2", "ch 0: no reliable label\nR +56%", "ch 1: no reliable label\nR +33%"]
    # relevance labels are marked as such
    relevance = dataclasses.replace(g, label_sources=("rel", "act", "rel"))
    titles = _render(plot_glocal(relevance, max_label_chars=200))
    assert [title.split(":")[0] for title in titles[1:4]] == ["ch 0 [rel]", "ch 1 [act]", "ch 3 [rel]"]


def test_glocal_figure_shows_the_evidence(labeled):
    """Evidence lines (percentile, holds / fails / unknown / none of n) and the red mark of unexplained parts."""
    from matplotlib.colors import to_rgba

    from crp_invert import ChannelEvidence
    from crp_invert.plot import UNEXPLAINED_COLOR

    _, _, labels = labeled
    g = _glocal(labels)
    parts = (ChannelEvidence(0, 1.5, 91.2, 80, label_holds=True),
             ChannelEvidence(1, 0.1, 12.4, 80, label_holds=False),  # unexplained: fails and below the median
             ChannelEvidence(3, 2.0, 77.0, 80, label_holds=None))
    titles = _render(plot_glocal(dataclasses.replace(g, evidence=parts), max_label_chars=200))
    head = [_render(plot_glocal(g, max_label_chars=200))[i + 1] for i in range(3)]  # the titles without evidence
    assert titles[1:4] == [head[0] + "\nact p91 | label holds", head[1] + "\nact p12 | label fails !",
                           head[2] + "\nact p77 | label ?"]
    # with the counts: none of the channel's reliable labels holds, so none is shown; no reliable label at all
    counted = (ChannelEvidence(0, 0.1, 12.4, 80, label_holds=False, n_reliable=3, n_holding=0),
               ChannelEvidence(1, 0.1, 40.0, 80, label_holds=None, n_reliable=0),
               ChannelEvidence(3, 2.0, 77.0, 80, label_holds=True, n_reliable=2, n_holding=1))
    none = dataclasses.replace(g, labels=(None, None, g.labels[2]), evidence=counted)
    counted_titles = _render(plot_glocal(none, max_label_chars=200))
    assert counted_titles[1] == "ch 0: no reliable label holds here\nR +56%\nact p12 | 0 of 3 hold !"
    assert counted_titles[2] == "ch 1: no reliable label\nR +33%\nact p40"
    assert counted_titles[3] == head[2] + "\nact p77 | label holds"
    assert none.shown_texts() == ["no reliable label holds here", "no reliable label", str(g.labels[2].formula)]
    figure = plot_glocal(dataclasses.replace(g, evidence=parts))
    _render(figure)
    marked = [ax for ax in figure.axes if any(patch.get_gid() == "unexplained" for patch in ax.patches)]
    assert [ax.get_title() for ax in marked] == [titles[2]]
    assert marked[0].title.get_color() == UNEXPLAINED_COLOR
    others = [ax for ax in figure.axes if ax.get_title() and ax not in marked]
    assert all(to_rgba(ax.title.get_color()) != to_rgba(UNEXPLAINED_COLOR) for ax in others)
    # the same mark in the report's evidence table
    from html.parser import HTMLParser

    from crp_invert.report import _evidence_html

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.classes = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
                self.classes.append(dict(attrs).get("class"))

        def handle_data(self, data):
            if self.rows:
                self.rows[-1].append(data)

    parser = Rows()
    parser.feed(_evidence_html(dataclasses.replace(g, evidence=parts)))
    assert parser.rows[1][:1] == ["0"] and parser.rows[1][-1] == "holds"
    assert parser.rows[2][-2:] == ["fails", "not explained by the label"]
    assert parser.classes == [None, None, "unexplained", None]
    assert _evidence_html(g) == ""


def test_heatmap_image_uses_zennit_colormap():
    """heatmap_image equals zennit's imgify with its palette, symmetric around zero."""
    from zennit.image import imgify, palette

    heatmap = torch.tensor([[-2.0, 0.0], [1.0, 2.0]])
    rgb = heatmap_image(heatmap)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    # zennit's own normalization and palette, through PIL (re-set as bytes: Pillow 13 cannot read the numpy
    # palette that zennit 0.4.6 sets)
    image = imgify(heatmap.numpy().astype(np.float64), vmin=-2, vmax=2, cmap="bwr")
    image.putpalette(palette("bwr").tobytes())
    np.testing.assert_array_equal(rgb, np.asarray(image.convert("RGB")))
    np.testing.assert_array_equal(heatmap_image(heatmap, cmap="coldnhot", vmax=4.0),
                                  palette("coldnhot")[((heatmap.numpy() + 4) / 8 * 255).astype(np.uint8)])
    assert rgb[0, 1].min() >= 250  # zero is (nearly) white in bwr (index 127 of 256)
    assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[1, 1, 0] > rgb[1, 1, 2]  # negative blue, positive red
    with pytest.raises(ValueError, match="2-D"):
        heatmap_image(torch.zeros(3))


def test_explanation_figure(labeled):
    """The density figure's title and legend."""
    concepts, activations, labels = labeled
    explanation = labels[1][0]
    figure = plot_explanation(activations, concepts, explanation, feature=1)
    titles = _render(figure)
    assert titles == [f"feature 1: {explanation.formula}\nAUC {explanation.auc:.3f}, "
                      f"p = {explanation.p_value:.2g}, fraction {explanation.fraction:.1%}"]
    inside = int(explanation.formula.evaluate(concepts).sum())
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == [f"outside (n={80 - inside})", f"inside (n={inside})"]
    # a hand-made explanation on a 1-D activation vector; degenerate (constant) groups still draw
    handmade = Explanation(formula=Formula.parse("fur"), auc=0.5, fraction=0.25, length=1, p_value=0.5)
    titles = _render(plot_explanation(torch.ones(80), concepts, handmade))
    assert titles[0].startswith("fur\nAUC 0.500, p = 0.5, fraction 25.0%")
    with pytest.raises(ValueError, match="feature="):
        plot_explanation(activations, concepts, explanation)
    with pytest.raises(ValueError, match="samples"):
        plot_explanation(activations[:10, 0], concepts, explanation)


def test_circuit_figure(labeled):
    """Circuit nodes in layer columns with their labels, statistics and notes; one line per edge."""
    _, _, labels = labeled
    nodes = (CircuitNode("linear1", 3, label="stripes AND wheel", auc=0.91),
             CircuitNode("conv2", 0, label=str(labels[0][0].formula), auc=labels[0][0].auc),
             CircuitNode("conv2", 2), CircuitNode("conv1", 5, label="fur", auc=0.7))
    edges = (CircuitEdge("conv2:0", "linear1:3", 0.6), CircuitEdge("conv2:2", "linear1:3", -0.2),
             CircuitEdge("conv1:5", "conv2:0", 0.4))
    figure = plot_circuit(Circuit(nodes, edges, quantity="relevance"))
    assert _render(figure) == ["circuit (relevance)"]
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "conv2", "linear1"]
    texts = {t.get_text() for t in ax.texts}
    assert "linear1:3\nstripes AND wheel\nAUC 0.91" in texts
    assert "conv2:2" in texts
    assert f"conv2:0\n{labels[0][0].formula}\nAUC {labels[0][0].auc:.2f}" in texts
    assert len(ax.lines) == len(edges)
    with pytest.raises(ValueError, match="no nodes"):
        plot_circuit(Circuit((), ()))


NAMES = ["a$^$", "$\\frac$", "_{x}", "$x$ and $y$", "100% $", "\\mathrm{z}"]


def _all_texts(figure):
    from matplotlib.text import Text

    return [text for text in figure.findobj(Text) if text.get_text()]


def test_plots_draw_any_name_as_written():
    """Math text is off in every text: names that are broken mathtext draw as written (titles, nodes, ticks,
    legends), and every text has parse_math and usetex off."""
    from crp_invert.core.formula import quote_name

    concepts = random_concepts(40, len(NAMES), share=0.5, seed=0, names=NAMES)
    formula = Formula.parse(" AND ".join(quote_name(name) for name in NAMES[:3]))
    explanation = Explanation(formula=formula, auc=0.7, fraction=0.2, length=3, p_value=0.01)
    titled = plot_explanation(torch.randn(40), concepts, explanation, title=NAMES[3])
    _render(titled)
    assert titled.axes[0].get_title().startswith(NAMES[3]) and not titled.axes[0].title.get_parse_math()
    figures = [plot_explanation(torch.randn(40), concepts, explanation)]
    g = dataclasses.replace(_glocal(None), labels=(explanation, None, explanation), layer=NAMES[0])
    figures.append(plot_glocal(g, class_name=NAMES[1], max_label_chars=500))
    nodes = tuple(CircuitNode(name, i, label=str(formula), auc=0.8) for i, name in enumerate(NAMES))
    edges = tuple(CircuitEdge(nodes[i].id, nodes[i + 1].id, 1.0) for i in range(len(NAMES) - 1))
    figures.append(plot_circuit(Circuit(nodes, edges), max_label_chars=500))
    for figure in figures:
        _render(figure)
        texts = _all_texts(figure)
        assert all(not text.get_parse_math() and not text.get_usetex() for text in texts)
        drawn = "\n".join(text.get_text() for text in texts)
        for name in NAMES[:3]:
            assert name in drawn.replace("\\\\", "\\")  # the formula's text escapes a backslash
    assert [t.get_text() for t in figures[2].axes[0].get_xticklabels()] == NAMES


def _extents(figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    return renderer, [(ax, ax.title.get_window_extent(renderer)) for ax in figure.axes if ax.get_title()]


@pytest.mark.parametrize("top_k,ncols", [(3, None), (3, 2), (4, 7)])
def test_glocal_titles_do_not_run_into_each_other(top_k, ncols):
    """Long labels are wrapped: no two titles overlap, none overlaps another panel's image, all lie inside
    the figure; the figure grows with the number of parts."""
    long = Formula.parse(" AND ".join(f"concept_{i}_with_a_long_name" for i in range(4)) + " OR x" * 3)
    explanation = Explanation(formula=long, auc=0.9, fraction=0.2, length=7, p_value=1e-5)
    g = _glocal(None, top_k=top_k)
    g = dataclasses.replace(g, labels=(explanation,) * top_k)
    parts = tuple(ChannelEvidence(int(c), 1.0, 50.0, 10, label_holds=True) for c in g.channels.tolist())
    figure = plot_glocal(dataclasses.replace(g, evidence=parts), image=torch.rand(9, 9), ncols=ncols)
    renderer, titled = _extents(figure)
    inside = figure.bbox
    for ax, box in titled:
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
        for other, other_box in titled:
            if other is not ax:
                assert not box.overlaps(other_box) and not box.overlaps(other.get_window_extent(renderer))
    # the whole label is in the title, wrapped
    title = figure.axes[2].get_title()
    assert " ".join(title.split("\n")[:-3]).replace(" [act]", "").endswith(str(long)) or \
        str(long).replace(" ", "") in title.replace("\n", "").replace(" ", "")
    assert max(len(line) for line in title.split("\n")) < len(str(long))
    wide = plot_glocal(_glocal(None, top_k=3), ncols=5)
    assert wide.get_figwidth() > plot_glocal(_glocal(None, top_k=2), ncols=4).get_figwidth()


def test_circuit_figure_shows_whole_labels():
    """Circuit node texts carry the whole label, wrapped, with q and support where known; the figure grows."""
    label = " AND ".join(f"concept_{i}" for i in range(12))
    nodes = (CircuitNode("out", 0, label="class"), CircuitNode("hidden", 1, label=label, auc=0.9, support=42, q=3e-4),
             CircuitNode("hidden", 2, note="no reliable label"))
    edges = (CircuitEdge("hidden:1", "out:0", 1.0), CircuitEdge("hidden:2", "out:0", -0.5))
    figure = plot_circuit(Circuit(nodes, edges), max_label_chars=20)
    _render(figure)
    texts = {t.get_text() for t in figure.axes[0].texts}
    expected = "\n".join(["hidden:1"] + textwrap.wrap(label, 20) + textwrap.wrap("AUC 0.90 | q 0.0003 | n 42", 20))
    assert expected in texts and "hidden:2\nno reliable label" in texts
    short = plot_circuit(Circuit((nodes[0], CircuitNode("hidden", 1, label="a", auc=0.9)), edges[:1]))
    assert figure.get_figheight() > short.get_figheight()


def test_explanation_figure_names_its_values(labeled):
    """The density figure's x axis says what it shows: activation by default, relevance when asked."""
    concepts, activations, labels = labeled
    default = plot_explanation(activations, concepts, labels[1][0], feature=1)
    relevance = plot_explanation(activations, concepts, labels[1][0], feature=1, value_name="relevance")
    assert default.axes[0].get_xlabel() == "activation"
    assert relevance.axes[0].get_xlabel() == "relevance"
