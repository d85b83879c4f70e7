"""Immutable logical formulas over named concepts: atoms, NOT, AND, OR.

A :class:`Formula` is canonical: AND and OR are flattened (associativity), their operands form a
set (commutativity, idempotence) and ``NOT NOT x`` is ``x``. Two formulas built in different orders
are therefore equal and hash alike, which the beam search relies on to keep each formula once.

Text form: concept names joined by ``AND``, ``OR``, ``NOT`` with parentheses around every compound
operand of AND and OR; names that are not plain words (spaces, parentheses, quotes, keywords) are
double-quoted with backslash escapes. :meth:`Formula.parse` reads it back.

Examples
--------
>>> a, b = Formula.concept("red"), Formula.concept("circle")
>>> str(a & ~b)
'red AND NOT circle'
>>> (a & b) == (b & a)
True
>>> Formula.parse('red AND NOT circle') == a & ~b
True
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

__all__ = ["Formula", "FormulaParseError"]

CONCEPT, NOT, AND, OR = "concept", "not", "and", "or"
_KIND_ORDER = {CONCEPT: 0, NOT: 1, AND: 2, OR: 3}
_KEYWORDS = ("AND", "OR", "NOT")
_BARE_NAME = re.compile(r'[^\s()"\\]+')


class FormulaParseError(ValueError):
    """Raised when a formula text cannot be parsed."""


class Formula:
    """An immutable, canonical boolean formula over concept names.

    Build formulas with :meth:`concept`, ``~`` (NOT), ``&`` (AND) and ``|`` (OR), or with
    :meth:`parse`. Do not call the constructor directly.

    Attributes
    ----------
    kind : str
        ``"concept"``, ``"not"``, ``"and"`` or ``"or"``.
    name : str or None
        The concept name of an atom.
    children : tuple of Formula
        Operands in canonical order (empty for atoms).
    """

    __slots__ = ("kind", "name", "children", "_key", "_hash")

    def __init__(self, kind: str, name: Optional[str], children: tuple) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "children", children)
        if kind == CONCEPT:
            key: tuple = (0, name)
        else:
            key = (_KIND_ORDER[kind], tuple(child._key for child in children))
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __setattr__(self, attribute: str, value: Any) -> None:
        raise AttributeError("Formula is immutable")

    def __reduce__(self):
        return (Formula, (self.kind, self.name, self.children))

    # construction -------------------------------------------------------------------------------
    @classmethod
    def concept(cls, name: str) -> "Formula":
        """The atom for the concept ``name``."""
        if not isinstance(name, str):
            raise TypeError(f"a concept name must be a str, got {type(name).__name__}: {name!r}")
        if not name:
            raise ValueError("a concept name must not be empty")
        return cls(CONCEPT, name, ())

    @classmethod
    def not_(cls, operand: "Formula") -> "Formula":
        """``NOT operand``; ``NOT NOT x`` is ``x``."""
        _check_formula(operand)
        if operand.kind == NOT:
            return operand.children[0]
        return cls(NOT, None, (operand,))

    @classmethod
    def and_(cls, *operands: "Formula") -> "Formula":
        """Conjunction of the operands (flattened, deduplicated, canonical order)."""
        return cls._junction(AND, operands)

    @classmethod
    def or_(cls, *operands: "Formula") -> "Formula":
        """Disjunction of the operands (flattened, deduplicated, canonical order)."""
        return cls._junction(OR, operands)

    @classmethod
    def _junction(cls, kind: str, operands: Iterable["Formula"]) -> "Formula":
        flat = {}
        for operand in operands:
            _check_formula(operand)
            for item in operand.children if operand.kind == kind else (operand,):
                flat[item._key] = item
        if not flat:
            raise ValueError(f"{kind.upper()} needs at least one operand")
        if len(flat) == 1:
            return next(iter(flat.values()))
        children = tuple(flat[key] for key in sorted(flat))
        return cls(kind, None, children)

    def __invert__(self) -> "Formula":
        return Formula.not_(self)

    def __and__(self, other: "Formula") -> "Formula":
        return Formula.and_(self, other)

    def __or__(self, other: "Formula") -> "Formula":
        return Formula.or_(self, other)

    # identity -----------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Formula) and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __lt__(self, other: "Formula") -> bool:
        return self._key < other._key

    # properties ---------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """The number of atoms (concept occurrences) in the formula."""
        if self.kind == CONCEPT:
            return 1
        return sum(child.length for child in self.children)

    @property
    def concepts(self) -> frozenset:
        """The names of all concepts the formula uses."""
        if self.kind == CONCEPT:
            return frozenset((self.name,))
        return frozenset().union(*(child.concepts for child in self.children))

    # evaluation ---------------------------------------------------------------------------------
    def evaluate(self, concepts: Union["Mapping[str, torch.Tensor]", Any]) -> torch.Tensor:
        """The boolean mask of the samples for which the formula holds.

        Parameters
        ----------
        concepts : ConceptLabels or mapping of str to torch.Tensor
            Where atoms are looked up: a :class:`~crp_invert.ConceptLabels` (its ``mask(name)``) or a
            mapping from concept name to a boolean tensor ``[N]``.

        Returns
        -------
        torch.Tensor
            Boolean ``[N]``.
        """
        if hasattr(concepts, "mask") and callable(concepts.mask):
            lookup: Callable[[str], torch.Tensor] = concepts.mask
        elif isinstance(concepts, Mapping):
            def lookup(name: str) -> torch.Tensor:
                if name not in concepts:
                    raise KeyError(f"unknown concept {name!r} in formula {str(self)!r}")
                return torch.as_tensor(concepts[name]).bool()
        else:
            raise TypeError(
                "concepts must be a ConceptLabels or a mapping of name -> boolean tensor, "
                f"got {type(concepts).__name__}"
            )
        return self._evaluate(lookup)

    def _evaluate(self, lookup: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if self.kind == CONCEPT:
            return lookup(self.name)
        if self.kind == NOT:
            return ~self.children[0]._evaluate(lookup)
        masks = [child._evaluate(lookup) for child in self.children]
        result = masks[0].clone()
        for mask in masks[1:]:
            if self.kind == AND:
                result &= mask
            else:
                result |= mask
        return result

    # text ---------------------------------------------------------------------------------------
    def __str__(self) -> str:
        if self.kind == CONCEPT:
            return quote_name(self.name)
        if self.kind == NOT:
            return "NOT " + self.children[0]._operand_str()
        joiner = " AND " if self.kind == AND else " OR "
        return joiner.join(child._operand_str() for child in self.children)

    def _operand_str(self) -> str:
        text = str(self)
        return f"({text})" if self.kind in (AND, OR) else text

    def __repr__(self) -> str:
        return f"Formula({str(self)!r})"

    @classmethod
    def parse(cls, text: str, names: Optional[Iterable[str]] = None) -> "Formula":
        """Read a formula from its text form (the inverse of ``str``).

        Parameters
        ----------
        text : str
            E.g. ``'red AND (circle OR "big square")'``. Keywords are upper case; ``NOT`` binds
            tighter than ``AND``, which binds tighter than ``OR``.
        names : iterable of str or ConceptLabels, optional
            The known concept names; an unknown name then raises a ``KeyError``.

        Raises
        ------
        FormulaParseError
            If the text is not a well-formed formula.
        KeyError
            If ``names`` is given and the formula uses a name not in it.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        known = None
        if names is not None:
            known = set(names.names if hasattr(names, "names") else names)
        parser = _Parser(_tokenize(text), text)
        formula = parser.parse()
        if known is not None:
            unknown = sorted(formula.concepts - known)
            if unknown:
                raise KeyError(
                    f"unknown concept name(s) {unknown} in formula {text!r}; "
                    f"expected one of the {len(known)} known concepts"
                )
        return formula

    # JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> Any:
        """A JSON-able nested structure: ``{"concept": name}``, ``{"not": x}``, ``{"and": [...]}``."""
        if self.kind == CONCEPT:
            return {"concept": self.name}
        if self.kind == NOT:
            return {"not": self.children[0].to_json()}
        return {self.kind: [child.to_json() for child in self.children]}

    @classmethod
    def from_json(cls, data: Any) -> "Formula":
        """Rebuild a formula from :meth:`to_json` output (a plain string is parsed as text)."""
        if isinstance(data, str):
            return cls.parse(data)
        if not isinstance(data, Mapping) or len(data) != 1:
            raise ValueError(f"not a formula JSON object: {data!r}")
        (kind, value), = data.items()
        if kind == CONCEPT:
            return cls.concept(value)
        if kind == NOT:
            return cls.not_(cls.from_json(value))
        if kind in (AND, OR):
            if not isinstance(value, list) or not value:
                raise ValueError(f"{kind!r} needs a non-empty list of operands, got {value!r}")
            return cls._junction(kind, [cls.from_json(item) for item in value])
        raise ValueError(f"unknown formula node {kind!r}; expected one of concept, not, and, or")


def _check_formula(value: Any) -> None:
    if not isinstance(value, Formula):
        raise TypeError(f"expected a Formula, got {type(value).__name__}: {value!r}")


def quote_name(name: str) -> str:
    """The name as it appears in formula text: bare if it is a plain word, else double-quoted."""
    if _BARE_NAME.fullmatch(name) and name.upper() not in _KEYWORDS:
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


_TOKEN = re.compile(r'\s+|(?P<lpar>\()|(?P<rpar>\))|"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<word>[^\s()"\\]+)')


def _tokenize(text: str) -> list:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise FormulaParseError(f"unexpected character {text[position]!r} at {position} in {text!r}")
        position = match.end()
        if match.group("lpar"):
            tokens.append(("(", None))
        elif match.group("rpar"):
            tokens.append((")", None))
        elif match.group("quoted") is not None:
            tokens.append(("name", re.sub(r"\\(.)", r"\1", match.group("quoted"))))
        elif match.group("word"):
            word = match.group("word")
            tokens.append((word, None) if word in _KEYWORDS else ("name", word))
    return tokens


class _Parser:
    """Recursive descent: or := and (OR and)*; and := not (AND not)*; not := NOT not | atom."""

    def __init__(self, tokens: list, text: str) -> None:
        self.tokens, self.text, self.index = tokens, text, 0

    def parse(self) -> Formula:
        if not self.tokens:
            raise FormulaParseError("empty formula")
        formula = self._or()
        if self.index != len(self.tokens):
            raise FormulaParseError(f"unexpected {self._describe()} in {self.text!r}")
        return formula

    def _peek(self) -> Optional[str]:
        return self.tokens[self.index][0] if self.index < len(self.tokens) else None

    def _describe(self) -> str:
        kind, value = self.tokens[self.index]
        return f"name {value!r}" if kind == "name" else f"{kind!r}"

    def _or(self) -> Formula:
        operands = [self._and()]
        while self._peek() == "OR":
            self.index += 1
            operands.append(self._and())
        return Formula.or_(*operands)

    def _and(self) -> Formula:
        operands = [self._not()]
        while self._peek() == "AND":
            self.index += 1
            operands.append(self._not())
        return Formula.and_(*operands)

    def _not(self) -> Formula:
        if self._peek() == "NOT":
            self.index += 1
            return Formula.not_(self._not())
        return self._atom()

    def _atom(self) -> Formula:
        kind = self._peek()
        if kind is None:
            raise FormulaParseError(f"formula {self.text!r} ends too early")
        if kind == "(":
            self.index += 1
            formula = self._or()
            if self._peek() != ")":
                raise FormulaParseError(f"missing ')' in {self.text!r}")
            self.index += 1
            return formula
        if kind == "name":
            name = self.tokens[self.index][1]
            self.index += 1
            return Formula.concept(name)
        raise FormulaParseError(f"unexpected {self._describe()} in {self.text!r}")
