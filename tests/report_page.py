"""Reading the report's page in tests: its channel tables (an HTML parser) and the page in headless Chromium."""
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# installed before everything else on the page: records errors into the DOM so that --dump-dom shows them
CATCH = """<script>
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message)); });
var __consoleError = console.error;
console.error = function () { window.__errors.push(Array.prototype.join.call(arguments, " ")); };
</script>"""


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
    """The page's channel tables, tags and images (a :class:`TableParser` fed with ``text``)."""
    parser = TableParser()
    parser.feed(text)
    return parser


def run_chromium(page: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Open ``page`` in headless Chromium and dump its DOM after the scripts ran."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0", "--dump-dom",
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def run_in_chromium(text: str, script: str, tmp_path: Path, name: str = "page.html") -> str:
    """The DOM of the report ``text`` after ``script`` (inserted before ``</body>``, after the page's own script)
    ran in Chromium; fails on any script error."""
    head, rest = text.split("<head>", 1)
    page = tmp_path / name
    page.write_text(head + "<head>" + CATCH + rest.replace("</body>", script + "</body>"))
    result = run_chromium(page, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    dom = result.stdout
    assert json.loads(pre(dom, "errors")) == []
    return dom


def pre(dom: str, element_id: str) -> str:
    """The text of the ``<pre id=element_id>`` a test script wrote into the DOM."""
    return html.unescape(re.search(f'<pre id="{element_id}">(.*?)</pre>', dom, re.S).group(1))


N = 120
EVIL = "<script>alert(1)</script>"
LAYERS = {"features.0": 5, "head<b>fc</b>": 3}
NAMES = ["red", "round", EVIL, "a & b"]


def report_data(root: Path) -> dict:
    """A cache of two layers whose channels follow planted concepts (channel c detects concept c % 4), the
    concepts (one is EVIL), their labels (L = 2, B = 2) and label files, random images."""
    import numpy as np
    import torch
    from helpers import write_cache

    from crp_invert import ConceptLabeler
    from crp_invert.core.concepts import ConceptLabels

    rng = np.random.default_rng(0)
    concepts_array = rng.random((N, len(NAMES))) < 0.3
    concepts = ConceptLabels(concepts_array, NAMES)
    arrays = {}
    for layer, channels in LAYERS.items():
        arrays[layer] = rng.normal(size=(N, channels)).astype(np.float32)
        arrays[layer] += 2.0 * concepts_array[:, np.arange(channels) % len(NAMES)]
    cache_path = write_cache(root / "cache.h5", {layer: (acts, acts * 0.5) for layer, acts in arrays.items()})
    labels = ConceptLabeler(concepts).label_cache(str(cache_path), L=2, B=2, progress=False)
    concepts.save(root / "concepts.npz")
    files = []
    for i, layer_labels in enumerate(labels.values()):
        files.append(root / f"layer{i}.json")
        layer_labels.to_json(files[-1])
    return dict(root=root, concepts=concepts, cache=cache_path, labels=labels, files=files, arrays=arrays,
                images=torch.rand(N, 3, 8, 8))


def shown(layer_labels, channel):
    """The explanation a view shows for ``channel`` by the contract: ``best()`` if reliable, else None."""
    best = layer_labels.best(channel)
    return best if best is not None and getattr(best, "reliable", True) else None


def _judged_class():
    import dataclasses

    from crp_invert import Explanation

    @dataclasses.dataclass(frozen=True)
    class Judged(Explanation):
        """An explanation that states its support and whether it is reliable, whichever version of Explanation
        (with or without these fields) the package has."""

        support: int | None = None
        n_samples: int | None = None
        reliable: bool = True
        unreliable_reason: str = ""

    return Judged


def judged(text, auc, support, n_samples, q, reliable=True, reason=""):
    """A hand-made explanation of the formula ``text`` with its support and q (3 candidates)."""
    from crp_invert import Formula

    formula = Formula.parse(text)
    return _judged_class()(formula, auc, support / n_samples, formula.length, q / 3, 3, q, q, support=support,
                           n_samples=n_samples, reliable=reliable, unreliable_reason=reason)
