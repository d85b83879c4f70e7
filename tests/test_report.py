"""The HTML report: every channel with its statistics, names escaped, self-contained, sorting in Chromium."""

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from crp_invert import ConceptLabeler
from crp_invert.cli import main
from crp_invert.core.concepts import ConceptLabels
from crp_invert.report import _to_uint8_image, load_labels, select_channels, write_report
from crp_invert.storage.cache import ActivationCache

N = 120
EVIL = "<script>alert(1)</script>"
LAYERS = {"features.0": 5, "head<b>fc</b>": 3}


class TableParser(HTMLParser):
    """Collects the channel tables (layer -> rows of cell texts) and every tag and attribute of the page."""

    def __init__(self):
        super().__init__()
        self.tables, self.tags, self.images = {}, [], []
        self._layer = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "table" and "channels" in (attrs.get("class") or ""):
            self._layer = attrs["data-layer"]
            self.tables[self._layer] = []
        elif tag == "tr" and self._layer is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._layer].append(self._row)
            self._row = None
        elif tag == "table":
            self._layer = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(text):
    parser = TableParser()
    parser.feed(text)
    return parser


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A cache of two layers whose channels follow planted concepts, the concepts (one is EVIL), labels."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    names = ["red", "round", EVIL, "a & b"]
    concepts_array = rng.random((N, len(names))) < 0.3
    concepts = ConceptLabels(concepts_array, names)
    cache_path = root / "cache.h5"
    arrays = {}
    with ActivationCache(cache_path, mode="a", overwrite=True) as cache:
        cache.initialize((0, N))
        for layer, channels in LAYERS.items():
            acts = rng.normal(size=(N, channels)).astype(np.float32)
            acts += (
                2.0 * concepts_array[:, np.arange(channels) % len(names)]
            )  # channel c detects concept c % K
            cache.add_layer(layer, channels, relevances=True, pooling="mean")
            cache.write(layer, (0, N), acts, acts * 0.5)
            arrays[layer] = acts
        cache.mark_complete((0, N))
    labeler = ConceptLabeler(concepts)
    labels = labeler.label_cache(str(cache_path), L=2, B=2, progress=False)
    concepts.save(root / "concepts.npz")
    files = []
    for i, layer_labels in enumerate(labels.values()):
        files.append(root / f"layer{i}.json")
        layer_labels.to_json(files[-1])
    images = torch.rand(N, 3, 8, 8)
    return dict(
        root=root,
        concepts=concepts,
        cache=cache_path,
        labels=labels,
        files=files,
        arrays=arrays,
        images=images,
    )


def test_every_channel_with_its_statistics(setup, tmp_path):
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
        assert header[:3] == ["channel", "best explanation", "AUC"]
        assert len(rows) == LAYERS[layer] == len(layer_labels)
        for channel, row in enumerate(rows):
            best = layer_labels.best(channel)
            assert int(row[0]) == channel
            assert row[1] == str(best.formula)  # the parser unescapes: the text is the formula itself
            assert float(row[2]) == pytest.approx(best.auc, abs=5e-5)
            assert float(row[3]) == pytest.approx(best.p_value, rel=1e-2)
            assert float(row[5]) == pytest.approx(best.p_value_bh, rel=1e-2)
            assert float(row[6]) == pytest.approx(best.fraction, abs=5e-4)
    # self-contained: every image is embedded, nothing is loaded from elsewhere
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    # figures for max_channels channels per layer: density + concept samples
    assert text.count('class="card"') == 2 * len(LAYERS)
    # no FeatureVisualization given: no reference samples, and the page says so
    assert "<figcaption>CRP ActMax" not in text and "reference samples are skipped" in text


def test_names_are_escaped(setup, tmp_path):
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
    assert parse(text).tags.count("script") == 1  # only the report's own sorting script


def test_select_channels_matches_sorting(setup):
    for layer_labels in setup["labels"].values():
        aucs = [layer_labels.best(c).auc for c in range(len(layer_labels))]
        for k in range(len(layer_labels) + 2):
            expected = sorted(sorted(range(len(aucs)), key=lambda c: (-aucs[c], c))[:k])
            assert select_channels(layer_labels, k) == expected
    with pytest.raises(ValueError, match="max_channels"):
        select_channels(next(iter(setup["labels"].values())), -1)


def test_report_command_from_files(setup, tmp_path):
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


def test_load_labels_index(setup, tmp_path):
    for layer, layer_labels in setup["labels"].items():
        layer_labels.to_json(tmp_path / f"{abs(hash(layer))}.json")
    (tmp_path / "index.json").write_text(
        json.dumps({layer: f"{abs(hash(layer))}.json" for layer in setup["labels"]})
    )
    loaded = load_labels([tmp_path / "index.json"])
    assert list(loaded) == list(setup["labels"])
    assert all(loaded[layer] == setup["labels"][layer] for layer in loaded)


def test_report_checks_inputs(setup, tmp_path):
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
    chw = torch.zeros(3, 2, 4)
    chw[0, 0, 0] = 1.0
    out = _to_uint8_image(chw)
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8 and out[0, 0, 0] == 255 and out.sum() == 255
    normalized = np.array([[-1.0, 1.0]])  # outside [0, 1]: min-max scaled
    assert _to_uint8_image(normalized)[0, :, 0].tolist() == [0, 255]
    with pytest.raises(ValueError, match="image"):
        _to_uint8_image(np.zeros((2, 2, 5)))


# ------------------------------------------------------------------------------------------------
# the page in a real browser
# ------------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# installed before everything else on the page: records errors into the DOM so that --dump-dom shows them
_CATCH = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
var __consoleError = console.error;
console.error = function () { window.__errors.push(Array.prototype.join.call(arguments, " ")); };
</script>"""

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


def run_chromium(page: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install -y chromium)"
)
def test_sorting_in_chromium(setup, tmp_path):
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
    text = report.read_text()
    head, rest = text.split("<head>", 1)
    page = tmp_path / "clicked.html"
    page.write_text(head + "<head>" + _CATCH + rest.replace("</body>", _CLICKS + "</body>"))
    result = run_chromium(page, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    errors = json.loads(html.unescape(re.search(r'<pre id="errors">(.*?)</pre>', dom, re.S).group(1)))
    assert errors == []
    orders = [
        [int(c) for c in html.unescape(re.search(f'<pre id="order{i}">(.*?)</pre>', dom).group(1)).split(",")]
        for i in range(4)
    ]
    layer_labels = setup["labels"]["features.0"]
    aucs = {c: layer_labels.best(c).auc for c in range(len(layer_labels))}
    formulas = {c: str(layer_labels.best(c).formula).lower() for c in aucs}
    assert orders[0] == list(range(len(aucs)))
    # the page sorts by the 4-digit AUC shown... in data-value the exact AUC: ascending, then descending
    assert [aucs[c] for c in orders[1]] == sorted(aucs.values())
    assert [aucs[c] for c in orders[2]] == sorted(aucs.values(), reverse=True)
    assert [formulas[c] for c in orders[3]] == sorted(formulas.values())
    # the escaped title is shown as text in the browser
    assert html.escape(EVIL) in dom and EVIL not in dom.split("<body", 1)[1].split('<pre id="order0">')[0]
