"""What the report's search box knows of each label, computed here so that the page's script never reads a formula.

The rule (shown in the box's help line, :data:`SEARCH_RULE`): a channel matches a query when **one case of its
label implies the query**. The *cases* of a label are its prime implicants: the shortest ANDs of concepts and NOT
concepts under which the label holds (``red OR (blue AND NOT ring)`` has the cases ``red`` and
``blue AND NOT ring``); they do not depend on how the formula is written. A case implies the query when the query
holds for every value of the concepts the case does not fix. The query uses the grammar of
:meth:`crp_invert.Formula.parse` (AND, OR, NOT, parentheses, double-quoted names); keywords and names are matched
in any case. So ``red OR blue`` finds ``red AND circle`` and ``blue OR green``; ``NOT large`` finds labels that
say ``NOT large``; ``yellow AND ring`` does not find ``blue OR yellow``.

Python computes each label's cases once (:func:`label_cases`, JSON-able: ``[[positive names], [negated names]]``
per case, lower case); the page's script parses only the typed query and checks it against the cases.
:func:`query_matches` states the same rule in Python.

Examples
--------
>>> from crp_invert import Formula
>>> label_cases(Formula.parse("red OR (blue AND NOT ring)"))
[[['blue'], ['ring']], [['red'], []]]
>>> cases = label_cases(Formula.parse("blue OR yellow"))
>>> query_matches(Formula.parse("yellow"), cases), query_matches(Formula.parse("yellow AND ring"), cases)
(True, False)
"""
from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from ..core.formula import Formula, quote_name

__all__ = ["SEARCH_RULE", "MAX_QUERY_CONCEPTS", "label_cases", "merged_cases", "query_matches", "placeholder_query"]

#: the help line under the search box: when a channel matches (see the module docstring)
SEARCH_RULE = (
    "Shows a channel when one case of its label implies the query. The cases of a label are the shortest ANDs of "
    "concepts and NOT concepts under which it holds (red OR (blue AND NOT ring) has two: red; blue AND NOT ring); a "
    "case implies the query when the query holds whatever the values of the concepts the case leaves open. "
    "Queries: AND, OR, NOT, parentheses, \"quoted names\", any case. So red OR blue finds red AND circle and "
    "blue OR green; NOT large finds labels that say NOT large; yellow AND ring does not find blue OR yellow."
)

#: queries over more concepts than this are refused by the page (it tries every value of the open ones)
MAX_QUERY_CONCEPTS = 12

Term = frozenset  # of (name, positive) pairs: an AND of literals


def _terms(formula: Formula, negated: bool = False) -> set[Term]:
    """An OR of ANDs of literals equal to ``formula`` (NOT pushed to the atoms, AND distributed over OR); ANDs that
    hold nowhere (``x AND NOT x``) are dropped."""
    if formula.kind == "concept":
        return {Term({(formula.name, not negated)})}
    if formula.kind == "not":
        return _terms(formula.children[0], not negated)
    parts = [_terms(child, negated) for child in formula.children]
    if (formula.kind == "or") != negated:
        return set().union(*parts)
    product = {Term()}
    for part in parts:
        product = {left | right for left in product for right in part if _consistent(left | right)}
    return product


def _consistent(term: Term) -> bool:
    return not any((name, not positive) in term for name, positive in term)


def _consensus(left: Term, right: Term) -> Term | None:
    """The consensus of two ANDs that clash on exactly one concept (``x AND a``, ``NOT x AND b`` -> ``a AND b``)."""
    clashes = [(name, positive) for name, positive in left if (name, not positive) in right]
    if len(clashes) != 1:
        return None
    name, positive = clashes[0]
    return Term((left - {(name, positive)}) | (right - {(name, not positive)}))


def _prime_implicants(terms: Iterable[Term]) -> set[Term]:
    """Blake's canonical form by iterated consensus: every prime implicant, none absorbed by another."""
    primes = {term for term in terms if not any(other < term for other in terms)}
    changed = True
    while changed:
        changed = False
        for left, right in itertools.combinations(sorted(primes, key=sorted), 2):
            new = _consensus(left, right)
            if new is None or any(term <= new for term in primes):
                continue
            primes = {term for term in primes if not new <= term} | {new}
            changed = True
            break
    return primes


def label_cases(formula: Formula | None) -> list[list[list[str]]]:
    """The cases of a label (its prime implicants) as ``[[positive names], [negated names]]``, names in lower
    case, sorted; ``[]`` for no label (it matches no query)."""
    if formula is None:
        return []
    cases = []
    for term in _prime_implicants(_terms(formula)):
        positive = sorted({name.lower() for name, sign in term if sign})
        negated = sorted({name.lower() for name, sign in term if not sign})
        cases.append([positive, negated])
    return sorted(cases)


def merged_cases(*case_lists: Sequence[Any]) -> list[list[list[str]]]:
    """The cases of several labels of one row (e.g. its activation and relevance labels): the row matches when one
    of them does."""
    merged = {_case_key(case): case for cases in case_lists for case in cases}
    return [merged[key] for key in sorted(merged)]


def _case_key(case: Sequence[Sequence[str]]) -> tuple:
    return tuple(tuple(part) for part in case)


def _holds(query: Formula, values: dict[str, bool]) -> bool:
    if query.kind == "concept":
        return values[query.name.lower()]
    if query.kind == "not":
        return not _holds(query.children[0], values)
    results = (_holds(child, values) for child in query.children)
    return all(results) if query.kind == "and" else any(results)


def query_matches(query: Formula, cases: Sequence[Sequence[Sequence[str]]]) -> bool:
    """The rule in Python: one case fixes its concepts (asserted true, negated false) and the query holds for every
    value of the query's other concepts."""
    atoms = sorted({name.lower() for name in query.concepts})
    for positive, negated in cases:
        fixed = {name: False for name in negated} | {name: True for name in positive}
        free = [name for name in atoms if name not in fixed]
        if all(_holds(query, fixed | dict(zip(free, values)))
               for values in itertools.product((False, True), repeat=len(free))):
            return True
    return False


def placeholder_query(all_cases: Iterable[Sequence[Sequence[Sequence[str]]]]) -> str:
    """An example query for the box that finds something on this page: ``a OR (b AND NOT c)`` from a case with a
    NOT (``a`` the most frequent asserted concept), else the one or two most frequent asserted concepts, else
    ``NOT c`` from a case of NOTs only."""
    counts: Counter = Counter()
    with_not = only_not = None
    for cases in all_cases:
        for positive, negated in cases:
            counts.update(positive)
            if with_not is None and positive and negated:
                with_not = (positive[0], negated[0])
            if only_not is None and negated and not positive:
                only_not = negated[0]
    common = [name for name, _ in counts.most_common(3)]
    if with_not is not None:
        others = [name for name in common if name not in with_not]
        inner = f"{quote_name(with_not[0])} AND NOT {quote_name(with_not[1])}"
        return f"{quote_name(others[0])} OR ({inner})" if others else inner
    if common:
        return " OR ".join(quote_name(name) for name in common[:2])
    if only_not is not None:
        return f"NOT {quote_name(only_not)}"
    return "red OR (circle AND NOT large)"
