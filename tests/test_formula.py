"""Formula identity, rendering, parsing, JSON and evaluation."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crp_invert import ConceptLabels, Formula
from crp_invert.core.formula import FormulaParseError

a, b, c, d = (Formula.concept(n) for n in "abcd")


def test_and_or_are_commutative_and_associative():
    """AND and OR formulas compare and hash equal up to commutativity and associativity."""
    assert (a & b) == (b & a) and hash(a & b) == hash(b & a)
    assert ((a & b) & c) == (a & (b & c)) == ((c & a) & b)
    assert ((a | b) | c) == (c | (b | a))
    assert (a & b) != (a | b)
    assert ((a & b) | c) != (a & (b | c))
    assert len({a & b & c, c & b & a, b & (a & c)}) == 1


def test_idempotence_and_double_negation():
    """a AND a and a OR a are a, NOT NOT a is a, and De Morgan's forms are not merged."""
    assert (a & a) == a and (a | a) == a
    assert ~~a == a
    assert ~(a & b) != (~a & ~b)


def test_length_counts_atoms():
    """length counts the atoms (negation is free) and concepts lists them."""
    assert a.length == 1 and (~a).length == 1
    assert ((a & ~b) | c).length == 3
    assert ((a & ~b) | c).concepts == frozenset("abc")


def test_rendering():
    """str() writes canonical infix text and quotes keywords and names with spaces, commas, parentheses, quotes."""
    assert str(a & ~b) == "a AND NOT b"
    assert str((a & b) | c) == "c OR (a AND b)"  # canonical order: atoms first
    assert str(~(a | b)) == "NOT (a OR b)"
    spaced = Formula.concept("tench, Tinca tinca")
    assert str(spaced & a) in ('"tench, Tinca tinca" AND a', 'a AND "tench, Tinca tinca"')
    assert str(Formula.concept("AND")) == '"AND"'
    assert str(Formula.concept("or")) == '"or"'
    assert str(Formula.concept("f(x)")) == '"f(x)"'
    assert str(Formula.concept('say "hi"')) == '"say \\"hi\\""'


names = st.one_of(
    st.sampled_from(["a", "b", "red circle", "AND", "not", "x(y)", 'q"uote', "back\\slash", "ümlaut"]),
    st.text(min_size=1, max_size=6).filter(lambda s: s.strip()),
)


def formulas(depth=3):
    atom = names.map(Formula.concept)
    return st.recursive(
        atom,
        lambda inner: st.one_of(
            inner.map(lambda f: ~f),
            st.tuples(inner, inner).map(lambda t: t[0] & t[1]),
            st.tuples(inner, inner).map(lambda t: t[0] | t[1]),
        ),
        max_leaves=6,
    )


@settings(max_examples=200, deadline=None)
@given(formulas())
def test_parse_and_json_round_trip(formula):
    """parse(str(f)) and from_json(to_json(f)) give back the formula."""
    assert Formula.parse(str(formula)) == formula
    assert Formula.from_json(json.loads(json.dumps(formula.to_json()))) == formula


def test_parse_precedence_and_keywords():
    """parse binds NOT before AND before OR and reads quoted names."""
    assert Formula.parse("a AND b OR c") == (a & b) | c
    assert Formula.parse("a OR b AND c") == a | (b & c)
    assert Formula.parse("NOT a AND b") == ~a & b
    assert Formula.parse("NOT (a AND b)") == ~(a & b)
    assert Formula.parse('"red circle" AND a') == Formula.concept("red circle") & a


@pytest.mark.parametrize("text", ["", "a AND", "(a OR b", "a b", "AND a", "a )", 'a AND "open'])
def test_parse_errors(text):
    """Malformed formula text raises FormulaParseError."""
    with pytest.raises(FormulaParseError):
        Formula.parse(text)


def test_parse_unknown_concept_names_it():
    """parse with known names raises a KeyError naming an unknown concept."""
    with pytest.raises(KeyError, match="zebra"):
        Formula.parse("a AND zebra", ["a", "b"])
    concepts = ConceptLabels(torch.ones(2, 2, dtype=torch.bool), ["a", "b"])
    with pytest.raises(KeyError, match="zebra"):
        Formula.parse("zebra", concepts)
    assert Formula.parse("a AND NOT b", concepts) == a & ~b


def test_immutable_and_typed():
    """Formulas are immutable, combine only with formulas, and reject empty names and unknown JSON operators."""
    with pytest.raises(AttributeError):
        a.name = "z"
    with pytest.raises(TypeError):
        a & "b"
    with pytest.raises(ValueError):
        Formula.concept("")
    with pytest.raises(ValueError):
        Formula.from_json({"xor": [{"concept": "a"}]})


def test_evaluate_against_python_logic():
    """evaluate equals Python's boolean logic per sample, on ConceptLabels and on a dict of masks."""
    generator = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(64, generator=generator) < 0.5 for n in "abcd"}
    concepts = ConceptLabels(torch.stack([masks[n] for n in "abcd"], 1), list("abcd"))
    formula = ((a & ~b) | c) & ~d
    expected = [((masks["a"][i] and not masks["b"][i]) or masks["c"][i]) and not masks["d"][i] for i in range(64)]
    assert formula.evaluate(concepts).tolist() == [bool(v) for v in expected]
    assert torch.equal(formula.evaluate(masks), formula.evaluate(concepts))
    with pytest.raises(KeyError):
        Formula.concept("zebra").evaluate(concepts)
