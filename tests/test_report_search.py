"""The report's search box (typed into headless Chromium) against a slow Python reference of its rule, its
activation-vs-relevance tables and audit section."""

import html
import itertools
import json
import re

import pytest
import torch
from report_page import CHROMIUM, EVIL, parse, pre, report_data, run_in_chromium, shown

from crp_invert import ConceptLabeler, Formula
from crp_invert.audit import audit
from crp_invert.report import write_report
from crp_invert.report.collect import anchor
from crp_invert.report.search import label_cases, placeholder_query, query_matches

QUERIES = [
    "red", "NOT red", "round AND red", "  RED  and not ROUND ", f'"{EVIL}"', '"a & b" OR red', "red OR round",
    "NOT (red OR round)", 'Red Or "A & B"', '(red OR round) AND NOT "a & b"', "red AND (round OR NOT round)",
    "NOT NOT red", "round AND NOT round", "purple", "purple OR red", "",
]
BAD_QUERIES = ["red AND", "(red", "red)", 'red "open', "AND red"]

# after the report's script: type every query into the search box (an input event per query, as typing does) and
# write what is visible (channel rows, activation / relevance rows, cards, audit rows) into a <pre> element
_TYPE = """<script>
(function () {
  var queries = %s;
  var input = document.getElementById("channel-search");
  queries.push(input.getAttribute("placeholder").replace(/^e\\.g\\. /, ""));
  function visible(element) { return !element.hidden && getComputedStyle(element).display !== "none"; }
  var out = [];
  queries.forEach(function (text) {
    input.value = text;
    input.dispatchEvent(new Event("input", {bubbles: true}));
    var seen = {};
    document.querySelectorAll("table.channels, table.sources, table.audit").forEach(function (table) {
      var kind = table.classList.contains("sources") ? "sources:"
               : table.classList.contains("audit") ? "audit:" : "channels:";
      seen[kind + table.getAttribute("data-layer")] = Array.prototype.filter.call(table.tBodies[0].rows, visible)
        .map(function (row) {
          return kind === "audit:" ? row.cells[0].textContent + ":" + row.cells[2].textContent
                                   : +row.cells[0].getAttribute("data-value");
        });
    });
    seen.cards = Array.prototype.filter.call(document.querySelectorAll("div.card"), visible)
      .map(function (card) { return card.id; });
    seen.details = Array.prototype.filter.call(document.querySelectorAll("section.details"), visible).length;
    out.push({query: text, visible: seen, status: document.getElementById("channel-search-status").textContent});
  });
  var pre = document.createElement("pre");
  pre.id = "typed"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
  var errors = document.createElement("pre");
  errors.id = "errors"; errors.textContent = JSON.stringify(window.__errors);
  document.body.appendChild(errors);
})();
</script>"""

# ------------------------------------------------------------------------------------------------
# the rule, slowly: prime implicants by enumerating every AND of literals, implication by truth tables
# ------------------------------------------------------------------------------------------------


def holds(formula, values):
    """The formula's truth under ``values`` (lower-case name -> bool)."""
    if formula.kind == "concept":
        return values[formula.name.lower()]
    if formula.kind == "not":
        return not holds(formula.children[0], values)
    results = [holds(child, values) for child in formula.children]
    return all(results) if formula.kind == "and" else any(results)


def reference_cases(formula):
    """Every AND of literals over the label's concepts that implies the label and has no shorter such AND inside."""
    names = sorted({name.lower() for name in formula.concepts})
    rows = [dict(zip(names, values)) for values in itertools.product((False, True), repeat=len(names))]
    implicants = []
    for signs in itertools.product((None, True, False), repeat=len(names)):
        term = {name: sign for name, sign in zip(names, signs) if sign is not None}
        covered = [row for row in rows if all(row[name] == sign for name, sign in term.items())]
        if all(holds(formula, row) for row in covered):
            implicants.append(term)
    return [term for term in implicants
            if not any(other != term and other.items() <= term.items() for other in implicants)]


def implies(term, query):
    """Whether the query holds on every assignment of its concepts that agrees with the term."""
    names = sorted({name.lower() for name in query.concepts} - set(term))
    return all(holds(query, {**dict(zip(names, values)), **term})
               for values in itertools.product((False, True), repeat=len(names)))


def read_query(text):
    """The query as a Formula: the grammar of Formula.parse with keywords in any case."""
    words = re.split(r'("(?:[^"\\]|\\.)*"|[()\s])', text)
    return Formula.parse("".join(word.upper() if word.upper() in ("AND", "OR", "NOT") else word for word in words))


def reference_match(query, formula):
    return formula is not None and any(implies(term, query) for term in reference_cases(formula))


def expected_rows(query_text, *label_sets):
    """The channels a query shows in a table of these labels (all of them for an empty query)."""
    if not query_text.strip():
        return list(range(len(label_sets[0])))
    query = read_query(query_text)
    return [channel for channel in range(len(label_sets[0]))
            if any(reference_match(query, formula_of(labels, channel)) for labels in label_sets)]


def formula_of(labels, channel):
    explanation = shown(labels, channel)
    return None if explanation is None else explanation.formula


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A page with every channel carded (no figures), activation and relevance labels and an audit."""
    root = tmp_path_factory.mktemp("search")
    setup = report_data(root)
    relevance = ConceptLabeler(setup["concepts"]).label_cache(str(setup["cache"]), L=2, B=2, source="relevance",
                                                              progress=False)
    targets = (setup["arrays"]["features.0"][:, 0] > 1.0).astype(int)
    audits = [audit(setup["cache"], setup["labels"], "features.0", ["off", "on"], targets=targets,
                    artifacts=[EVIL], concepts=setup["concepts"], k=3)]
    path = write_report(root / "report.html", setup["labels"], cache=setup["cache"], max_channels=100,
                        progress=False, relevance_labels=relevance, audits=audits)
    return dict(path=path, text=path.read_text(), relevance=relevance, audits=audits, setup=setup)


def test_cases_are_the_prime_implicants():
    """label_cases equals the slow enumeration of prime implicants, on random formulas of up to 4 concepts."""
    generator = torch.Generator().manual_seed(0)
    atoms = [Formula.concept(name) for name in ("a", "b", "C", "d")]
    for _ in range(300):
        formula = atoms[int(torch.randint(4, (1,), generator=generator))]
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            other = atoms[int(torch.randint(4, (1,), generator=generator))]
            other = ~other if torch.rand(1, generator=generator) < 0.4 else other
            step = int(torch.randint(3, (1,), generator=generator))
            formula = formula & other if step == 0 else formula | other if step == 1 else ~(formula & other)
        expected = sorted([sorted(n for n, s in term.items() if s), sorted(n for n, s in term.items() if not s)]
                          for term in reference_cases(formula))
        assert label_cases(formula) == expected, str(formula)


def test_rule_examples():
    """The help line's examples: OR finds either concept, AND needs both in one case, NOT needs the label's NOT."""
    def finds(query, label):
        return query_matches(read_query(query), label_cases(Formula.parse(label)))

    assert finds("red OR blue", "red AND circle") and finds("red OR blue", "blue OR green")
    assert not finds("yellow AND ring", "blue OR yellow") and finds("yellow AND ring", "ring AND yellow AND large")
    assert finds("NOT large", "circle AND NOT large") and not finds("NOT large", "circle")
    assert finds("circle AND NOT large", "NOT (large OR red) AND circle")
    assert not finds("red", "NOT red") and finds("red OR NOT red", "blue")
    for query, label in (("red OR blue", "red AND circle"), ("yellow AND ring", "blue OR yellow"),
                         ("NOT large", "circle"), ("(a OR b) AND NOT c", "a AND NOT c OR b")):
        assert finds(query, label) == reference_match(read_query(query), Formula.parse(label))


def test_placeholder_finds_something():
    """The box's example query finds at least one label it was made from (and is a formula)."""
    for labels in (["red AND NOT ring", "blue", "blue AND large"], ["red", "blue"], ["NOT red"], []):
        cases = [label_cases(Formula.parse(text)) for text in labels]
        query = Formula.parse(placeholder_query(cases))
        assert not labels or any(query_matches(query, case) for case in cases), (labels, query)


def test_both_labels_side_by_side_with_differences_marked(report):
    """Each channel's activation and relevance labels are one row, marked where they differ."""
    text, data = report["text"], report["setup"]
    for layer, labels in data["labels"].items():
        relevance = report["relevance"][layer]
        table = re.search(f'<table class="sortable sources searchable" data-layer="{re.escape(html.escape(layer))}">'
                          r"(.*?)</table>", text, re.S).group(1)
        rows = re.findall(r'<tr class="(differs|same)".*?</tr>', table, re.S)
        assert len(rows) == len(labels)
        for channel, mark in enumerate(rows):
            differ = formula_of(labels, channel) != formula_of(relevance, channel)
            assert mark == ("differs" if differ else "same"), (layer, channel)
    assert 'source="relevance"' in html.unescape(text) and 'source="activation"' in html.unescape(text)
    # the channel tables are unchanged: every channel once, as before
    assert {layer: len(rows) - 1 for layer, rows in parse(text).tables.items()} == {
        layer: len(labels) for layer, labels in data["labels"].items()}


def test_audit_section_lists_every_class(report):
    """Every class of the audit has one row per channel; names stay text."""
    text = report["text"]
    assert 'id="audit"' in text and text.count('<table class="audit"') == 1
    for klass in report["audits"][0].classes:
        assert text.count(f"<td>{html.escape(klass.name)}</td>") == len(klass.channels)
    assert EVIL not in text.split("<body", 1)[1].split("<script>", 1)[0]


def test_cases_are_embedded_safely(report):
    """The cases in data-cases attributes are escaped JSON; the EVIL concept is among them as plain text."""
    attributes = re.findall(r'data-cases="([^"]*)"', report["text"])
    assert attributes and all("<" not in value for value in attributes)
    cases = [json.loads(html.unescape(value)) for value in attributes]
    assert any(EVIL.lower() in case[0] for row in cases for case in row)
    assert EVIL not in report["text"]
    assert parse(report["text"]).tags.count("script") == 1  # the page's own script only


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install -y chromium)"
)
def test_typing_a_query_shows_the_matching_rows_cards_and_audit_rows_in_chromium(report, tmp_path):
    """Every query (OR, NOT, parentheses, quoted names, any case) shows exactly the channel rows, source rows,
    cards and audit rows of the Python reference; unreadable queries hide nothing and say why."""
    data = report["setup"]
    queries = QUERIES + BAD_QUERIES
    typing = _TYPE % json.dumps(queries).replace("</", "<\\/")  # a query is EVIL: no </script> in the script
    typed = json.loads(pre(run_in_chromium(report["text"], typing, tmp_path, "typed.html"), "typed"))
    assert len(typed) == len(queries) + 1
    total = sum(len(labels) for labels in data["labels"].values())
    matched = 0
    for seen in typed:
        query = seen["query"]
        if query in BAD_QUERIES:
            assert seen["status"].startswith("cannot read the query"), seen
            assert sum(len(v) for k, v in seen["visible"].items() if k.startswith("channels:")) == total
            continue
        shown_count, cards, details = 0, [], 0
        for layer, labels in data["labels"].items():
            expected = expected_rows(query, labels)
            assert seen["visible"][f"channels:{layer}"] == expected, (query, layer)
            both = expected_rows(query, labels, report["relevance"][layer])
            assert seen["visible"][f"sources:{layer}"] == both, (query, layer)
            layer_cards = [anchor(layer, c) + "-card" for c in expected if shown(labels, c) is not None]
            cards, details = cards + layer_cards, details + bool(layer_cards)
            shown_count += len(expected)
        assert seen["visible"]["cards"] == cards and seen["visible"]["details"] == details, query
        assert seen["visible"]["audit:features.0"] == expected_audit_rows(query, report["audits"][0]), query
        if query.strip():
            assert seen["status"].startswith(f"{shown_count} of {total} channels match"), (query, seen["status"])
            matched += shown_count > 0
        else:
            assert seen["status"] == "" and shown_count == total
    statuses = {seen["query"]: seen["status"] for seen in typed}
    assert "no label uses purple" in statuses["purple"] and "no label uses purple" in statuses["purple OR red"]
    assert typed[-1]["status"].split(" of ")[0] != "0"  # the placeholder example finds something
    assert matched >= 8  # most queries find something: the test can fail


def expected_audit_rows(query_text, item):
    rows = []
    for klass in item.classes:
        for channel in klass.channels:
            formula = Formula.parse(channel.label) if channel.label else None
            if not query_text.strip() or (formula is not None and reference_match(read_query(query_text), formula)):
                rows.append(f"{klass.name}:{channel.channel}")
    return rows
