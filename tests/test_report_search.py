"""The report's search box (typed into headless Chromium), its activation-vs-relevance tables and audit section."""

import html
import json
import re

import pytest
from test_report import _CATCH, CHROMIUM, EVIL, parse, run_chromium, setup  # noqa: F401  (setup is a fixture)

from crp_invert import ConceptLabeler
from crp_invert.audit import audit, literals
from crp_invert.report import write_report

QUERIES = ["red", "NOT red", "round AND red", "  RED  and not ROUND ", f'"{EVIL}"', '"a & b" OR red', "purple", ""]

# after the report's script: type every query into the search box (an input event per query, as typing does) and
# write the visible rows of every channel table and every activation / relevance table into <pre> elements
_TYPE = """<script>
(function () {
  var queries = %s;
  var input = document.getElementById("channel-search");
  var out = [];
  queries.forEach(function (text) {
    input.value = text;
    input.dispatchEvent(new Event("input", {bubbles: true}));
    var visible = {};
    document.querySelectorAll("table.channels, table.sources").forEach(function (table) {
      var key = (table.classList.contains("sources") ? "sources:" : "channels:") + table.getAttribute("data-layer");
      visible[key] = Array.prototype.filter.call(table.tBodies[0].rows, function (row) {
        return !row.hidden && getComputedStyle(row).display !== "none";
      }).map(function (row) { return +row.cells[0].getAttribute("data-value"); });
    });
    out.push({visible: visible, status: document.getElementById("channel-search-status").textContent});
  });
  var pre = document.createElement("pre");
  pre.id = "typed"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
  var errors = document.createElement("pre");
  errors.id = "errors"; errors.textContent = JSON.stringify(window.__errors);
  document.body.appendChild(errors);
})();
</script>"""


def query_literals(text):
    """The literals of a query, as the page reads it (a slow reference in Python)."""
    found, negate = [], False
    for quoted, word in re.findall(r'"((?:[^"\\]|\\.)*)"|([^\s()"]+)', text):
        if word.upper() == "NOT":
            negate = not negate
            continue
        if word.upper() in ("AND", "OR"):
            continue
        found.append((re.sub(r"\\(.)", r"\1", quoted) if quoted else word).lower() + ("-" if negate else "+"))
        negate = False
    return found


def label_literals(layer_labels, channel):
    beam = layer_labels[channel]
    if not beam:
        return None
    return {name.lower() + ("+" if positive else "-") for name, positive in literals(beam[0].formula)}


def expected_rows(query, *label_sets):
    wanted = query_literals(query)
    rows = []
    for channel in range(len(label_sets[0])):
        sets = [label_literals(labels, channel) for labels in label_sets]
        if not wanted or any(s is not None and set(wanted) <= s for s in sets):
            rows.append(channel)
    return rows


@pytest.fixture(scope="module")
def report(setup, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("search")
    relevance = ConceptLabeler(setup["concepts"]).label_cache(str(setup["cache"]), L=2, B=2, source="relevance",
                                                               progress=False)
    targets = (setup["arrays"]["features.0"][:, 0] > 1.0).astype(int)
    audits = [audit(setup["cache"], setup["labels"], "features.0", ["off", "on"], targets=targets,
                    artifacts=[EVIL], concepts=setup["concepts"], k=3)]
    path = write_report(root / "report.html", setup["labels"], cache=setup["cache"], concepts=setup["concepts"],
                        max_channels=0, progress=False, relevance_labels=relevance, audits=audits)
    return dict(path=path, text=path.read_text(), relevance=relevance, audits=audits, setup=setup)


def test_both_labels_side_by_side_with_differences_marked(report):
    text, data = report["text"], report["setup"]
    for layer, labels in data["labels"].items():
        relevance = report["relevance"][layer]
        table = re.search(f'<table class="sortable sources searchable" data-layer="{re.escape(html.escape(layer))}">'
                          r"(.*?)</table>", text, re.S).group(1)
        rows = re.findall(r'<tr class="(differs|same)".*?</tr>', table, re.S)
        assert len(rows) == len(labels)
        for channel, mark in enumerate(rows):
            differ = labels.best(channel).formula != relevance.best(channel).formula
            assert mark == ("differs" if differ else "same"), (layer, channel)
    assert 'source="relevance"' in html.unescape(text) and 'source="activation"' in html.unescape(text)
    # the channel tables are unchanged: every channel once, as before
    assert {layer: len(rows) - 1 for layer, rows in parse(text).tables.items()} == {
        layer: len(labels) for layer, labels in data["labels"].items()}


def test_audit_section_lists_every_class(report):
    text = report["text"]
    assert 'id="audit"' in text and text.count('<table class="audit"') == 1
    for klass in report["audits"][0].classes:
        assert text.count(f"<td>{html.escape(klass.name)}</td>") == len(klass.channels)
    assert EVIL not in text.split("<body", 1)[1].split("<script>", 1)[0]


def test_literals_are_embedded_safely(report):
    search = re.search(r'<input type="search" id="channel-search"[^>]*data-literals="([^"]*)"', report["text"])
    data = json.loads(html.unescape(search.group(1)))
    assert "<" not in search.group(1) and EVIL not in report["text"]
    assert any("+" + EVIL.lower() in literal_set for layer in data.values() for sets in layer for literal_set in sets)
    assert parse(report["text"]).tags.count("script") == 1  # the page's own script only


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install -y chromium)"
)
def test_typing_a_concept_shows_the_matching_rows_in_chromium(report, tmp_path):
    text, data = report["text"], report["setup"]
    head, rest = text.split("<head>", 1)
    page = tmp_path / "typed.html"
    typing = _TYPE % json.dumps(QUERIES).replace("</", "<\\/")  # a query is EVIL: no </script> in the script
    page.write_text(head + "<head>" + _CATCH + rest.replace("</body>", typing + "</body>"))
    result = run_chromium(page, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert json.loads(html.unescape(re.search(r'<pre id="errors">(.*?)</pre>', dom, re.S).group(1))) == []
    typed = json.loads(html.unescape(re.search(r'<pre id="typed">(.*?)</pre>', dom, re.S).group(1)))
    assert len(typed) == len(QUERIES)
    total = sum(len(labels) for labels in data["labels"].values())
    for query, seen in zip(QUERIES, typed):
        shown = 0
        for layer, labels in data["labels"].items():
            expected = expected_rows(query, labels)
            assert seen["visible"][f"channels:{layer}"] == expected, (query, layer)
            both = expected_rows(query, labels, report["relevance"][layer])
            assert seen["visible"][f"sources:{layer}"] == both, (query, layer)
            shown += len(expected)
        if query.strip():
            assert seen["status"].startswith(f"{shown} of {total} channels match"), (query, seen["status"])
        else:
            assert seen["status"] == "" and shown == total
    assert "no label uses purple" in typed[QUERIES.index("purple")]["status"]
    assert sum(map(len, typed[0]["visible"].values())) > 0  # "red" matches something: the test can fail
