"""The HTML report: every channel with its statistics, names escaped, self-contained, sorting in Chromium, the
package's templates and image utilities."""

import base64
import doctest
import html
import importlib
import io
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from report_page import CHROMIUM, EVIL, LAYERS, NAMES, N, judged, parse, pre, report_data, run_in_chromium, shown

from crp_invert import Formula, LayerLabels
from crp_invert.cli import main
from crp_invert.core.jsonio import read_json, read_json_file, read_json_text
from crp_invert.report import _to_uint8_image, load_labels, select_channels, write_report

NO_RELIABLE = "no reliable label"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A cache of two layers whose channels follow planted concepts, the concepts (one is EVIL), labels."""
    return report_data(tmp_path_factory.mktemp("report"))


def test_every_channel_with_its_statistics(setup, tmp_path):
    """Every channel is a row with its shown label's AUC, p, q, fraction and support; images are embedded."""
    out = write_report(
        tmp_path / "r.html",
        setup["labels"],
        cache=setup["cache"],
        concepts=setup["concepts"],
        images=setup["images"],
        max_channels=2,
        progress=False,
    )
    text = out.read_text()
    page = parse(text)
    assert set(page.tables) == set(LAYERS)
    for layer, layer_labels in setup["labels"].items():
        header, *rows = page.tables[layer]
        assert header[:3] == ["channel", "best explanation", "AUC"] and header[7] == "support"
        assert len(rows) == LAYERS[layer] == len(layer_labels)
        for channel, row in enumerate(rows):
            best = shown(layer_labels, channel)
            assert int(row[0]) == channel
            if best is None:
                assert row[1] == NO_RELIABLE and row[2:9] == [""] * 7
                continue
            assert row[1] == str(best.formula)  # the parser unescapes: the text is the formula itself
            assert float(row[2]) == pytest.approx(best.auc, abs=5e-5)
            assert float(row[3]) == pytest.approx(best.p_value, rel=1e-2)
            assert float(row[5]) == pytest.approx(best.p_value_bh, rel=1e-2)
            assert float(row[6]) == pytest.approx(best.fraction, abs=5e-4)
            support = int(best.formula.evaluate(setup["concepts"]).sum())
            assert int(row[7]) == support
    # self-contained: every image is embedded, nothing is loaded from elsewhere
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "<link" not in text and "@import" not in text
    # figures for max_channels channels per layer: density + concept samples
    assert text.count('class="card"') == 2 * len(LAYERS)
    # no FeatureVisualization given: no reference samples, and the page says so
    assert "<figcaption>CRP ActMax" not in text and "reference samples are skipped" in text


def test_names_are_escaped(setup, tmp_path):
    """Names from the data (formulas, layers, title, notes, summary, classes) are shown as text, never markup."""
    out = write_report(
        tmp_path / "r.html",
        setup["labels"],
        cache=setup["cache"],
        concepts=setup["concepts"],
        images=setup["images"],
        title=EVIL,
        notes=[EVIL],
        summary=[{"layer": EVIL}],
        class_names=[EVIL],
        max_channels=5,
        progress=False,
    )
    text = out.read_text()
    # channel 2 of every layer detects the concept EVIL, so it appears in formulas (tables and cards)
    assert any(EVIL in str(labels.best(2).formula) for labels in setup["labels"].values())
    assert EVIL not in text
    assert "<b>fc</b>" not in text
    assert html.escape(EVIL) in text
    assert parse(text).tags.count("script") == 1  # only the report's own script


HOSTILE = ['<script>alert("x")</script>', "it's \"quoted\"", "{{ 7 * 7 }}", "{% if 1 %}yes{% endif %}", "a&amp;b"]


def test_templates_escape_hostile_names(tmp_path):
    """Script tags, quotes and template syntax in concept, layer, class and note texts reach the page as text."""
    formulas = [Formula.concept(HOSTILE[0]) & ~Formula.concept(HOSTILE[1]), Formula.concept(HOSTILE[2]),
                Formula.concept(HOSTILE[3]) | Formula.concept(HOSTILE[4])]
    beams = [[judged(str(formula), 0.9, 30, 100, 3e-4)] for formula in formulas]
    labels = {layer: LayerLabels(beams, HOSTILE, layer) for layer in HOSTILE[2:]}
    text = write_report(tmp_path / "r.html", labels, title=HOSTILE[3], notes=HOSTILE, summary=[{h: h for h in HOSTILE}],
                        progress=False).read_text()
    body = text.split("<body>", 1)[1].split("<script>", 1)[0]
    for name in HOSTILE:
        assert html.escape(name) in body
    assert "<script" not in body and "49" not in body and ">yes<" not in body and 'alert("x")' not in body
    assert "it's" not in body and "a&amp;b" not in body.replace(html.escape("a&amp;b"), "")
    page = parse(text)
    assert page.tags.count("script") == 1
    for layer in labels:  # the browser's view of each cell is the formula text itself
        assert [row[1] for row in page.tables[layer][1:]] == [str(formula) for formula in formulas]
    search = re.search(r'<tr id="[^"]*" data-cases="([^"]*)"', text).group(1)
    assert json.loads(html.unescape(search)) == [[[HOSTILE[0].lower()], [HOSTILE[1].lower()]]]


def test_unreliable_labels_are_never_shown(setup, tmp_path):
    """An explanation that is not reliable is shown as "no reliable label" (with its reason), gets no card and
    is not searchable; the reliable one of the same layer is shown with its support."""
    weak = judged("red AND round", 0.99, 1, N, 0.6, reliable=False, reason="holds on 1 samples (< 10)")
    strong = judged("round", 0.8, 36, N, 1e-8)
    labels = LayerLabels([[weak], [strong, weak], []], NAMES, "features.0", {"n_samples": N})
    text = write_report(tmp_path / "r.html", {"features.0": labels}, max_channels=3, progress=False).read_text()
    rows = parse(text).tables["features.0"][1:]
    assert [row[1] for row in rows] == [NO_RELIABLE, "round", NO_RELIABLE]
    assert rows[1][7] == "36" and "red AND round" not in text
    assert 'title="holds on 1 samples (&lt; 10)"' in text
    assert select_channels(labels, 3) == [1] and text.count('class="card"') == 1
    assert '"red"' not in html.unescape(re.search(r'id="layer-features_2e_0-ch0" data-cases="([^"]*)"', text)[1])


def test_select_channels_matches_sorting(setup):
    """The channels with figures are the k highest AUCs of the shown labels (ties: lower channel)."""
    for layer_labels in setup["labels"].values():
        aucs = {c: shown(layer_labels, c).auc for c in range(len(layer_labels)) if shown(layer_labels, c)}
        for k in range(len(layer_labels) + 2):
            expected = sorted(sorted(aucs, key=lambda c: (-aucs[c], c))[:k])
            assert select_channels(layer_labels, k) == expected
    with pytest.raises(ValueError, match="max_channels"):
        select_channels(next(iter(setup["labels"].values())), -1)


def test_report_command_from_files(setup, tmp_path):
    """`crp-invert report` makes the page from files alone, says what it skipped and reports bad files."""
    out = tmp_path / "cli.html"
    result = CliRunner().invoke(
        main,
        [
            "report",
            str(setup["cache"]),
            *map(str, setup["files"]),
            "--concepts",
            str(setup["root"] / "concepts.npz"),
            "--out",
            str(out),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "without a model" in text or "files alone" in text
    page = parse(text)
    assert {layer: len(rows) - 1 for layer, rows in page.tables.items()} == LAYERS
    assert EVIL not in text
    # no concepts: still every channel, density figures skipped and said so
    result = CliRunner().invoke(
        main,
        ["report", str(setup["cache"]), str(setup["files"][0]), "--out", str(tmp_path / "bare.html"), "-q"],
    )
    assert result.exit_code == 0, result.output
    bare = (tmp_path / "bare.html").read_text()
    assert "density figures are skipped" in bare
    # errors are reported, not raised
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    result = CliRunner().invoke(
        main,
        ["report", str(setup["cache"]), str(tmp_path / "bad.json"), "-q", "--out", str(tmp_path / "x.html")],
    )
    assert result.exit_code != 0 and "LayerLabels" in result.output


def test_report_command_defaults_to_the_library_default():
    """The command's --max-channels default is MAX_CHANNEL_FIGURES and it lives with the other commands."""
    from crp_invert.cli import LAZY_COMMANDS
    from crp_invert.commands import report_command
    from crp_invert.report import MAX_CHANNEL_FIGURES

    option = next(p for p in report_command.params if p.name == "max_channels")
    assert option.default == MAX_CHANNEL_FIGURES
    assert LAZY_COMMANDS["report"] == "crp_invert.commands:report_command"


def test_load_labels_index(setup, tmp_path):
    """An index.json (layer -> file) loads every layer's labels in order."""
    for layer, layer_labels in setup["labels"].items():
        layer_labels.to_json(tmp_path / f"{abs(hash(layer))}.json")
    (tmp_path / "index.json").write_text(
        json.dumps({layer: f"{abs(hash(layer))}.json" for layer in setup["labels"]})
    )
    loaded = load_labels([tmp_path / "index.json"])
    assert list(loaded) == list(setup["labels"])
    assert all(loaded[layer] == setup["labels"][layer] for layer in loaded)


def test_report_checks_inputs(setup, tmp_path):
    """Concepts of other samples, no labels and an unknown source are refused."""
    concepts = setup["concepts"].subset(np.arange(N - 1))
    with pytest.raises(ValueError, match="samples"):
        write_report(
            tmp_path / "r.html", setup["labels"], cache=setup["cache"], concepts=concepts, progress=False
        )
    with pytest.raises(TypeError, match="mapping"):
        write_report(tmp_path / "r.html", {}, progress=False)
    with pytest.raises(ValueError, match="source"):
        write_report(tmp_path / "r.html", setup["labels"], source="gradient", progress=False)


def test_image_conversion():
    """Images of every layout become uint8 RGB; floats outside [0, 1] (or always, with "minmax") are scaled."""
    chw = torch.zeros(3, 2, 4)
    chw[0, 0, 0] = 1.0
    out = _to_uint8_image(chw)
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8 and out[0, 0, 0] == 255 and out.sum() == 255
    normalized = np.array([[-1.0, 1.0]])  # outside [0, 1]: min-max scaled
    assert _to_uint8_image(normalized)[0, :, 0].tolist() == [0, 255]
    with pytest.raises(ValueError, match="image"):
        _to_uint8_image(np.zeros((2, 2, 5)))
    from crp_invert.images import to_uint8_image

    values = np.random.default_rng(0).random((1, 3, 5, 6)) * 0.5 + 0.2
    stretched = to_uint8_image(values, scale="minmax")
    expected = np.round((values[0] - values.min()) / (values.max() - values.min()) * 255).transpose(1, 2, 0)
    np.testing.assert_array_equal(stretched, expected.astype(np.uint8))
    np.testing.assert_array_equal(to_uint8_image(values), np.round(values[0] * 255).transpose(1, 2, 0))
    with pytest.raises(ValueError, match="one sample"):
        to_uint8_image(np.zeros((2, 1, 3, 3)))
    with pytest.raises(ValueError, match="scale"):
        to_uint8_image(values, scale="gamma")


def test_read_json_of_a_file_and_of_text(tmp_path):
    """One reader for files and one for text, each naming what it could not read; read_json picks by the text."""
    (tmp_path / "a.json").write_text('{"a": 1}')
    (tmp_path / "bad.json").write_text("{a: 1")
    assert read_json_file(tmp_path / "a.json") == read_json_text('{"a": 1}') == {"a": 1}
    assert read_json(str(tmp_path / "a.json")) == read_json('  {"a": 1}') == {"a": 1}
    with pytest.raises(ValueError, match="labels file .*bad.json.* not valid JSON"):
        read_json_file(tmp_path / "bad.json", "labels file")
    with pytest.raises(ValueError, match="audit text is not valid JSON"):
        read_json_text("{a: 1", "audit text")
    with pytest.raises(FileNotFoundError):
        read_json_file(tmp_path / "gone.json")
    with pytest.raises(TypeError, match="str"):
        read_json_text(b"{}")


@pytest.mark.parametrize("name", ["images", "core.jsonio", "storage.label_files", "report.search", "report.page"])
def test_docstring_examples(name):
    """The examples in the docstrings of the report's modules run and print what they say."""
    module = importlib.import_module(f"crp_invert.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def _glocal(labels, layer="features.0"):
    from crp_invert.integration.glocal import GlocalExplanation

    generator = torch.Generator().manual_seed(1)
    heatmaps = torch.randn(3, 9, 9, generator=generator)
    rest = torch.randn(9, 9, generator=generator)
    relevance = torch.tensor([0.5, 0.3, 0.2, 0.1, 0.05])
    channels = torch.tensor([0, 1, 2])
    return GlocalExplanation(
        layer=layer, target=0, heatmap=heatmaps.sum(0) + rest, channels=channels, channel_heatmaps=heatmaps,
        relevance=relevance[channels], share=relevance[channels] / relevance.sum(),
        labels=tuple(labels.best(c) for c in channels.tolist()), rest_heatmap=rest, channel_relevance=relevance,
        prediction=torch.zeros(2))


def _png_width(src):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).width


def test_glocal_and_circuit_figures_are_readable(setup, tmp_path):
    """Glocal and circuit figures are drawn at >= 110 dpi and shown at their own width (8-point titles >= 12 px)."""
    from crp_invert.integration.circuits import Circuit, CircuitEdge, CircuitNode
    from crp_invert.plot import plot_circuit, plot_glocal

    labels = setup["labels"]["features.0"]
    glocal = _glocal(labels)
    circuit = Circuit((CircuitNode("features.0", 0, label=EVIL, auc=0.9), CircuitNode("out", 0)),
                      (CircuitEdge("features.0:0", "out:0", 0.5),))
    text = write_report(tmp_path / "r.html", {"features.0": labels}, glocals=[glocal], class_names=[EVIL, "b"],
                        glocal_images=[torch.rand(3, 9, 9)], circuits=[circuit], max_channels=0,
                        progress=False).read_text()
    figures = re.findall(r'<div class="figure wide"><img src="([^"]+)" alt="([^"]*)">', text)
    assert len(figures) == 2
    inches = [plot_glocal(glocal, image=torch.rand(3, 9, 9), class_name=EVIL).get_size_inches()[0],
              plot_circuit(circuit).get_size_inches()[0]]
    for (src, _), width in zip(figures, inches):
        assert _png_width(src) >= round(width * 110) - 1
    assert html.escape(f"prediction 0: class {EVIL}, layer features.0") in text and EVIL not in text
    assert ".figure.wide img { image-rendering: auto; height: auto; }" in text  # no width forced smaller


# ------------------------------------------------------------------------------------------------
# the page in a real browser
# ------------------------------------------------------------------------------------------------

# after the report's script: sort the first channel table by AUC (ascending, then descending) and write the
# channel order after each click into <pre> elements
_CLICKS = """<script>
(function () {
  var table = document.querySelector("table.channels");
  var th = table.tHead.rows[0].cells[2];
  function order() {
    var rows = table.tBodies[0].rows;
    return Array.prototype.map.call(rows, function (r) { return r.cells[0].textContent; }).join(",");
  }
  var results = [order()];
  th.click(); results.push(order());
  th.click(); results.push(order());
  var name = table.tHead.rows[0].cells[1]; name.click(); results.push(order());
  results.forEach(function (r, i) {
    var pre = document.createElement("pre");
    pre.id = "order" + i; pre.textContent = r; document.body.appendChild(pre);
  });
  var pre = document.createElement("pre");
  pre.id = "errors"; pre.textContent = JSON.stringify(window.__errors);
  document.body.appendChild(pre);
})();
</script>"""


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install -y chromium)"
)
def test_sorting_in_chromium(setup, tmp_path):
    """Clicking a header sorts by the exact value (AUC up, then down) or by text; the title stays text."""
    report = write_report(
        tmp_path / "r.html",
        setup["labels"],
        cache=setup["cache"],
        concepts=setup["concepts"],
        images=setup["images"],
        title=EVIL,
        max_channels=1,
        progress=False,
    )
    dom = run_in_chromium(report.read_text(), _CLICKS, tmp_path, "clicked.html")
    orders = [[int(c) for c in pre(dom, f"order{i}").split(",")] for i in range(4)]
    layer_labels = setup["labels"]["features.0"]
    aucs = {c: shown(layer_labels, c).auc if shown(layer_labels, c) else None for c in range(len(layer_labels))}
    formulas = {c: str(shown(layer_labels, c).formula).lower() if aucs[c] is not None else NO_RELIABLE
                for c in aucs}
    with_auc = sorted(value for value in aucs.values() if value is not None)
    assert orders[0] == list(range(len(aucs)))
    # the page sorts by the 4-digit AUC shown... in data-value the exact AUC: ascending, then descending
    assert [aucs[c] for c in orders[1]][:len(with_auc)] == with_auc
    assert [aucs[c] for c in orders[2]][:len(with_auc)] == with_auc[::-1]
    assert [formulas[c] for c in orders[3]] == sorted(formulas.values())
    # the escaped title is shown as text in the browser
    assert html.escape(EVIL) in dom and EVIL not in dom.split("<body", 1)[1].split('<pre id="order0">')[0]


@pytest.mark.parametrize("source", ["activation", "relevance"])
def test_card_density_names_the_source(setup, monkeypatch, source):
    """A card's density figure is labeled with the report's source (relevance labels once read 'activation')."""
    import crp_invert.plot
    from crp_invert.report.cards import FigureSources, collect_card

    seen = []
    original = crp_invert.plot.plot_explanation

    def recording(*args, **kwargs):
        seen.append(kwargs.get("value_name", "activation"))
        return original(*args, **kwargs)

    monkeypatch.setattr(crp_invert.plot, "plot_explanation", recording)
    layer, layer_labels = next(iter(setup["labels"].items()))
    channel = select_channels(layer_labels, 1)[0]
    values = np.random.default_rng(0).random((N, len(layer_labels)), dtype=np.float32)
    card = collect_card(layer, channel, layer_labels, values, FigureSources(setup["concepts"], source=source))
    assert card.density is not None and seen == [source]
