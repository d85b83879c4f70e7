// The search box (#channel-search): shows the channel rows, cards and audit rows (every element with data-cases)
// whose label implies the query in one of its cases, hides the others.
//
// data-cases holds the label's cases, computed in Python (crp_invert/report/search.py): a list of
// [[asserted names], [negated names]], names in lower case. This script reads only the typed query: the grammar
// of Formula.parse (names, "quoted names" with backslash escapes, AND, OR, NOT, parentheses; NOT binds tighter
// than AND, AND tighter than OR), keywords and names in any case. A case implies the query when the query holds
// for every value of the query's concepts that the case leaves open.
(function () {
  "use strict";
  var input = document.getElementById("channel-search");
  if (!input) { return; }
  var status = document.getElementById("channel-search-status");
  var maxConcepts = parseInt(input.getAttribute("data-max-concepts"), 10) || 12;
  var items = Array.prototype.map.call(document.querySelectorAll("[data-cases]"), function (element) {
    return {element: element, cases: JSON.parse(element.getAttribute("data-cases")),
            counted: element.closest("table.channels") !== null};
  });
  var known = new Set();
  items.forEach(function (item) {
    item.cases.forEach(function (kase) { kase[0].concat(kase[1]).forEach(function (name) { known.add(name); }); });
  });

  var KEYWORDS = {AND: true, OR: true, NOT: true};
  var TOKEN = /\s+|(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"\\]+)/y;
  function unescapeName(text) {
    return text.replace(/\\(u[0-9a-fA-F]{4}|[\s\S])/g, function (match, escape) {
      return escape.length === 5 ? String.fromCharCode(parseInt(escape.slice(1), 16)) : escape;
    });
  }
  function tokenize(text) {
    var tokens = [], position = 0, match;
    while (position < text.length) {
      TOKEN.lastIndex = position;
      match = TOKEN.exec(text);
      if (match === null) {
        throw new Error("unexpected character " + JSON.stringify(text[position]) + " at " + position);
      }
      position = TOKEN.lastIndex;
      if (match[1]) { tokens.push({kind: "("}); }
      else if (match[2]) { tokens.push({kind: ")"}); }
      else if (match[3] !== undefined) { tokens.push({kind: "name", name: unescapeName(match[3])}); }
      else if (match[4]) {
        var upper = match[4].toUpperCase();
        tokens.push(KEYWORDS[upper] === true ? {kind: upper} : {kind: "name", name: match[4]});
      }
    }
    return tokens;
  }
  function parse(tokens) {
    var position = 0;
    function next() { return position < tokens.length ? tokens[position].kind : null; }
    function junction(kind, operand) {
      var args = [operand()];
      while (next() === kind) { position += 1; args.push(operand()); }
      return args.length === 1 ? args[0] : {op: kind, args: args};
    }
    function orExpression() { return junction("OR", andExpression); }
    function andExpression() { return junction("AND", notExpression); }
    function notExpression() {
      if (next() === "NOT") { position += 1; return {op: "NOT", arg: notExpression()}; }
      var token = tokens[position];
      if (token === undefined) { throw new Error("the query ends too early"); }
      position += 1;
      if (token.kind === "name") { return {op: "name", name: token.name.toLowerCase()}; }
      if (token.kind === "(") {
        var inner = orExpression();
        if (next() !== ")") { throw new Error("missing ')'"); }
        position += 1;
        return inner;
      }
      throw new Error("unexpected '" + token.kind + "'");
    }
    var tree = orExpression();
    if (position < tokens.length) { throw new Error("unexpected '" + tokens[position].kind + "'"); }
    return tree;
  }
  function holds(node, values) {
    if (node.op === "name") { return values.get(node.name); }
    if (node.op === "NOT") { return !holds(node.arg, values); }
    if (node.op === "AND") { return node.args.every(function (arg) { return holds(arg, values); }); }
    return node.args.some(function (arg) { return holds(arg, values); });
  }
  function concepts(node, found) {
    if (node.op === "name") { found.add(node.name); }
    else if (node.op === "NOT") { concepts(node.arg, found); }
    else { node.args.forEach(function (arg) { concepts(arg, found); }); }
    return found;
  }
  function implies(kase, tree, names) {
    var fixed = new Map();
    kase[1].forEach(function (name) { fixed.set(name, false); });
    kase[0].forEach(function (name) { fixed.set(name, true); });
    var open = names.filter(function (name) { return !fixed.has(name); });
    for (var bits = 0; bits < (1 << open.length); bits += 1) {
      var values = new Map(fixed);
      open.forEach(function (name, i) { values.set(name, ((bits >> i) & 1) === 1); });
      if (!holds(tree, values)) { return false; }
    }
    return true;
  }
  function show(test) {
    var shown = 0, total = 0;
    items.forEach(function (item) {
      var visible = test(item);
      item.element.hidden = !visible;
      if (item.counted) { total += 1; shown += visible ? 1 : 0; }
    });
    // a layer's "in detail" heading goes with its cards
    document.querySelectorAll("section.details").forEach(function (section) {
      section.hidden = section.querySelector("div.card:not([hidden])") === null;
    });
    return shown + " of " + total + " channels match";
  }
  function report(text, error) {
    status.textContent = text;
    status.classList.toggle("error", error);
  }
  function apply() {
    var text = input.value;
    if (text.trim() === "") { show(function () { return true; }); report("", false); return; }
    var tree;
    try { tree = parse(tokenize(text)); } catch (error) {
      show(function () { return true; });
      report("cannot read the query: " + error.message, true);
      return;
    }
    var names = Array.from(concepts(tree, new Set()));
    if (names.length > maxConcepts) {
      show(function () { return true; });
      report("the query uses " + names.length + " concepts; at most " + maxConcepts, true);
      return;
    }
    var counts = show(function (item) {
      return item.cases.some(function (kase) { return implies(kase, tree, names); });
    });
    var unknown = names.filter(function (name) { return !known.has(name); });
    report(counts + (unknown.length ? "; no label uses " + unknown.join(", ") : ""), false);
  }
  input.addEventListener("input", apply);
  apply();
})();
