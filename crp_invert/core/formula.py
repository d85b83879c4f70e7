r"""Immutable logical formulas over named concepts: atoms, NOT, AND, OR.

A :class:`Formula` is canonical: AND and OR are flattened (associativity), their operands form a
set (commutativity, idempotence) and ``NOT NOT x`` is ``x``. Two formulas built in different orders
are therefore equal and hash alike, which the beam search relies on to keep each formula once.

Text form: concept names joined by ``AND``, ``OR``, ``NOT`` with parentheses around every compound
operand of AND and OR; names that are not plain words (spaces, parentheses, quotes, keywords, control
characters) are double-quoted with backslash escapes (``\\``, ``\"``, and ``\uXXXX`` for control
characters, so that the text is one line). :meth:`Formula.parse` reads it back, without recursion: any
number of parentheses or NOTs parse. A formula nests at most :data:`MAX_DEPTH` operators deep (INVERT's
formulas have a handful); deeper ones are refused with a ValueError.

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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = ["Formula", "FormulaParseError", "MAX_DEPTH"]

CONCEPT, NOT, AND, OR = "concept", "not", "and", "or"
_KIND_ORDER = {CONCEPT: 0, NOT: 1, AND: 2, OR: 3}
_KEYWORDS = ("AND", "OR", "NOT")
_BARE_NAME = re.compile(r'[^\s()"\\]+')
# characters written as \uXXXX inside quotes: C0 and C1 controls, line and paragraph separators
_ESCAPED = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

#: the deepest nesting of operators a formula may have (its methods recurse once per level)
MAX_DEPTH = 64


class FormulaParseError(ValueError):
    """Raised when a formula text cannot be parsed."""


class Formula:
    """An immutable, canonical boolean formula over concept names.

    Build formulas with :meth:`concept`, ``~`` (NOT), ``&`` (AND) and ``|`` (OR), or with
    :meth:`parse`. Do not call the constructor directly.

    Parameters
    ----------
    kind : str
        ``"concept"``, ``"not"``, ``"and"`` or ``"or"``.
    name : str or None
        The concept name of an atom, None otherwise.
    children : tuple of Formula
        The operands, already canonical.

    Attributes
    ----------
    kind : str
        ``"concept"``, ``"not"``, ``"and"`` or ``"or"``.
    name : str or None
        The concept name of an atom.
    children : tuple of Formula
        Operands in canonical order (empty for atoms).
    """

    __slots__ = ("kind", "name", "children", "_key", "_hash", "_depth")

    def __init__(self, kind: str, name: str | None, children: tuple) -> None:
        depth = 1 + max((child._depth for child in children), default=-1)
        if depth > MAX_DEPTH:
            raise ValueError(f"formula nests deeper than MAX_DEPTH = {MAX_DEPTH} levels of operators")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "children", children)
        if kind == CONCEPT:
            key: tuple = (0, name)
        else:
            key = (_KIND_ORDER[kind], tuple(child._key for child in children))
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))
        object.__setattr__(self, "_depth", depth)

    def __setattr__(self, attribute: str, value: Any) -> None:
        raise AttributeError("Formula is immutable")

    def __reduce__(self):
        return (Formula, (self.kind, self.name, self.children))

    # construction -------------------------------------------------------------------------------
    @classmethod
    def concept(cls, name: str) -> Formula:
        """The atom for the concept ``name``.

        Parameters
        ----------
        name : str
            A concept name (not empty).

        Returns
        -------
        Formula
            The atom.
        """
        if not isinstance(name, str):
            raise TypeError(f"a concept name must be a str, got {type(name).__name__}: {name!r}")
        if not name:
            raise ValueError("a concept name must not be empty")
        return cls(CONCEPT, name, ())

    @classmethod
    def not_(cls, operand: Formula) -> Formula:
        """``NOT operand``; ``NOT NOT x`` is ``x``.

        Parameters
        ----------
        operand : Formula
            The formula to negate.

        Returns
        -------
        Formula
            The negation.
        """
        _check_formula(operand)
        if operand.kind == NOT:
            return operand.children[0]
        return cls(NOT, None, (operand,))

    @classmethod
    def and_(cls, *operands: Formula) -> Formula:
        """Conjunction of the operands (flattened, deduplicated, canonical order).

        Parameters
        ----------
        *operands : Formula
            The formulas to join.

        Returns
        -------
        Formula
            ``a AND b AND ...``.
        """
        return cls._junction(AND, operands)

    @classmethod
    def or_(cls, *operands: Formula) -> Formula:
        """Disjunction of the operands (flattened, deduplicated, canonical order).

        Parameters
        ----------
        *operands : Formula
            The formulas to join.

        Returns
        -------
        Formula
            ``a OR b OR ...``.
        """
        return cls._junction(OR, operands)

    @classmethod
    def _junction(cls, kind: str, operands: Iterable[Formula]) -> Formula:
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

    def __invert__(self) -> Formula:
        return Formula.not_(self)

    def __and__(self, other: Formula) -> Formula:
        return Formula.and_(self, other)

    def __or__(self, other: Formula) -> Formula:
        return Formula.or_(self, other)

    # identity -----------------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Formula) and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __lt__(self, other: Formula) -> bool:
        return self._key < other._key

    # properties ---------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """The number of atoms (concept occurrences) in the formula."""
        if self.kind == CONCEPT:
            return 1
        return sum(child.length for child in self.children)

    @property
    def depth(self) -> int:
        """Nesting depth of the operators: 0 for an atom, 1 for ``NOT a`` or ``a AND b``, ..."""
        return self._depth

    @property
    def concepts(self) -> frozenset:
        """The names of all concepts the formula uses."""
        if self.kind == CONCEPT:
            return frozenset((self.name,))
        return frozenset().union(*(child.concepts for child in self.children))

    # evaluation ---------------------------------------------------------------------------------
    def evaluate(self, concepts: Mapping[str, torch.Tensor] | Any) -> torch.Tensor:
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

        Examples
        --------
        >>> red = torch.tensor([True, True, False, False])
        >>> circle = torch.tensor([True, False, True, False])
        >>> Formula.parse("red AND NOT circle").evaluate({"red": red, "circle": circle}).tolist()
        [False, True, False, False]
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
    def parse(cls, text: str, names: Iterable[str] | None = None) -> Formula:
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
            If the text is not a well-formed formula, or its formula nests deeper than :data:`MAX_DEPTH`.
        KeyError
            If ``names`` is given and the formula uses a name not in it.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        known = None
        if names is not None:
            known = set(names.names if hasattr(names, "names") else names)
        formula = _parse(_tokenize(text), text)
        if known is not None:
            unknown = sorted(formula.concepts - known)
            if unknown:
                from .concepts import unknown_names_message  # the closest names; concepts does not import formula

                ordered = names.names if hasattr(names, "names") else sorted(known)
                raise KeyError(unknown_names_message(unknown, ordered, f"formula {text!r}"))
        return formula

    # JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> Any:
        """A JSON-able nested structure: ``{"concept": name}``, ``{"not": x}``, ``{"and": [...]}``.

        Returns
        -------
        dict
            The nested structure; :meth:`from_json` reads it back.
        """
        if self.kind == CONCEPT:
            return {"concept": self.name}
        if self.kind == NOT:
            return {"not": self.children[0].to_json()}
        return {self.kind: [child.to_json() for child in self.children]}

    @classmethod
    def from_json(cls, data: Any) -> Formula:
        """Rebuild a formula from :meth:`to_json` output (a plain string is parsed as text).

        Chains of ``{"not": ...}`` of any length are read without recursion; AND / OR nesting deeper
        than :data:`MAX_DEPTH` is refused with a ValueError.

        Parameters
        ----------
        data : dict or str
            What :meth:`to_json` returned, or formula text.

        Returns
        -------
        Formula
            The formula.
        """
        return cls._from_json(data, 0)

    @classmethod
    def _from_json(cls, data: Any, depth: int) -> Formula:
        negations = 0
        while isinstance(data, Mapping) and len(data) == 1 and NOT in data:
            data = data[NOT]
            negations += 1
        if isinstance(data, str):
            formula = cls.parse(data)
        else:
            if not isinstance(data, Mapping) or len(data) != 1:
                raise ValueError(f"not a formula JSON object: {_preview(data)}")
            (kind, value), = data.items()
            if kind == CONCEPT:
                formula = cls.concept(value)
            elif kind in (AND, OR):
                if not isinstance(value, list) or not value:
                    raise ValueError(f"{kind!r} needs a non-empty list of operands, got {_preview(value)}")
                if depth + negations % 2 >= MAX_DEPTH:
                    raise ValueError(f"formula JSON nests deeper than MAX_DEPTH = {MAX_DEPTH} levels of operators")
                inner = depth + 1 + negations % 2
                formula = cls._junction(kind, [cls._from_json(item, inner) for item in value])
            else:
                raise ValueError(f"unknown formula node {_preview(kind)}; expected one of concept, not, and, or")
        return cls.not_(formula) if negations % 2 else formula


def _preview(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (without walking a deeply nested value)."""
    if isinstance(value, (Mapping, list)):
        return f"a JSON {'object' if isinstance(value, Mapping) else 'list'} of {len(value)} entries"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_formula(value: Any) -> None:
    if not isinstance(value, Formula):
        raise TypeError(f"expected a Formula, got {type(value).__name__}: {value!r}")


def quote_name(name: str) -> str:
    """The name as it appears in formula text: bare if it is a plain word, else double-quoted, with control
    characters as ``\\uXXXX`` (the text stays on one line)."""
    if _BARE_NAME.fullmatch(name) and name.upper() not in _KEYWORDS and not _ESCAPED.search(name):
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    escaped = _ESCAPED.sub(lambda match: f"\\u{ord(match.group()):04x}", escaped)
    return f'"{escaped}"'


def _unescape(match: re.Match) -> str:
    escape = match.group(1)
    return chr(int(escape[1:], 16)) if len(escape) == 5 else escape


_TOKEN = re.compile(
    r'\s+|(?P<lpar>\()|(?P<rpar>\))|"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<word>[^\s()"\\]+)', re.DOTALL
)
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)


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
            tokens.append(("name", _ESCAPE.sub(_unescape, match.group("quoted"))))
        elif match.group("word"):
            word = match.group("word")
            tokens.append((word, None) if word in _KEYWORDS else ("name", word))
    return tokens


_PRECEDENCE = {"OR": 1, "AND": 2, "NOT": 3}


def _parse(tokens: list, text: str) -> Formula:
    """Operator precedence parsing with explicit stacks (no recursion): NOT binds tighter than AND, which
    binds tighter than OR; parentheses group. Runs of one operator are collected and built once."""
    if not tokens:
        raise FormulaParseError("empty formula")
    shown = text if len(text) <= 200 else text[:197] + "..."
    operands: list = []  # Formula, or [kind, operands...] for a run of AND / OR not yet built
    operators: list = []  # "(", "NOT", "AND", "OR"

    def built(item: Any) -> Formula:
        if isinstance(item, Formula):
            return item
        return Formula.and_(*item[1:]) if item[0] == AND else Formula.or_(*item[1:])

    def apply(operator: str) -> None:
        if operator == "NOT":
            operands.append(Formula.not_(built(operands.pop())))
            return
        kind = AND if operator == "AND" else OR
        right, left = built(operands.pop()), operands.pop()
        if isinstance(left, list) and left[0] == kind:
            left.append(right)
            operands.append(left)
        else:
            operands.append([kind, built(left), right])

    def describe(token: tuple) -> str:
        return f"name {token[1]!r}" if token[0] == "name" else repr(token[0])

    try:
        expect_operand = True
        for token in tokens:
            kind = token[0]
            if expect_operand:
                if kind in ("NOT", "("):
                    operators.append(kind)
                elif kind == "name":
                    operands.append(Formula.concept(token[1]))
                    expect_operand = False
                else:
                    raise FormulaParseError(f"unexpected {describe(token)} in {shown!r}")
            elif kind in ("AND", "OR"):
                while operators and operators[-1] != "(" and _PRECEDENCE[operators[-1]] >= _PRECEDENCE[kind]:
                    apply(operators.pop())
                operators.append(kind)
                expect_operand = True
            elif kind == ")":
                while operators and operators[-1] != "(":
                    apply(operators.pop())
                if not operators:
                    raise FormulaParseError(f"unexpected ')' in {shown!r}")
                operators.pop()
            else:
                raise FormulaParseError(f"unexpected {describe(token)} in {shown!r}")
        if expect_operand:
            raise FormulaParseError(f"formula {shown!r} ends too early")
        while operators:
            operator = operators.pop()
            if operator == "(":
                raise FormulaParseError(f"missing ')' in {shown!r}")
            apply(operator)
    except FormulaParseError:
        raise
    except ValueError as error:  # e.g. deeper than MAX_DEPTH
        raise FormulaParseError(f"{error} in {shown!r}") from None
    return built(operands[0])
