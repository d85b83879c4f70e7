"""JSON documents of our result objects (labels, glocal explanations, circuits, audits, channel searches):
one way to write them as text or a file, one way to read a file, one way to read text.

:func:`read_json_file` takes a path, :func:`read_json_text` takes JSON text; both raise ValueError naming what
could not be read. :func:`read_json` is kept for the ``from_json(text_or_path)`` methods that accept either.

Examples
--------
>>> read_json_text('{"a": [1, 2]}')
{'a': [1, 2]}
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import write_text_atomically

__all__ = ["write_json", "read_json_file", "read_json_text", "read_json", "json_record"]


def write_json(data: Any, path: str | os.PathLike | None = None, indent: int | None = None) -> str:
    """``data`` as JSON text, also written to ``path`` when given (atomically, with the permissions of an
    ordinary new file: see :mod:`crp_invert.core.files`)."""
    text = json.dumps(data, indent=indent)
    if path is not None:
        write_text_atomically(path, text)
    return text


def read_json_file(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse the JSON file at ``path``, with one clear error for every way it can be unreadable.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If it is a folder, unreadable, empty, not UTF-8, not JSON, or nested too deeply for Python's parser;
        the message names ``what`` and the file.
    """
    path = Path(path)
    shown = f"{what} {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{shown} does not exist")
    if path.is_dir():
        raise ValueError(f"{shown} is a folder, not a file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{shown} is not UTF-8 text: {error}") from None
    except OSError as error:
        raise ValueError(f"cannot read {shown}: {error.strerror or error}") from None
    if not text.strip():
        raise ValueError(f"{shown} is empty")
    return read_json_text(text, shown)


def read_json_text(text: str, what: str = "JSON text") -> Any:
    """Parse JSON text.

    Raises
    ------
    TypeError
        If ``text`` is not a str.
    ValueError
        If it is not JSON (or nested too deeply for Python's parser); the message names ``what``.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be read") from None


def read_json(text_or_path: str | os.PathLike) -> Any:
    """Parse JSON text (a str starting with ``{`` or ``[``) or else the JSON file at a path.

    For ``from_json(text_or_path)`` methods; code that knows what it holds calls :func:`read_json_file` or
    :func:`read_json_text`.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Text or file that is not JSON, nested too deeply, unreadable (the message says which).
    """
    if isinstance(text_or_path, str) and text_or_path.lstrip()[:1] in ("{", "["):
        return read_json_text(text_or_path)
    return read_json_file(text_or_path)


def json_record(cls: type, row: Any, nan_fields: tuple[str, ...] = ()) -> Any:
    """The dataclass ``cls`` from one JSON object, every field checked against its annotation (``str``, ``int``,
    ``float`` and ``X | None``; other annotations are taken as they are); ``null`` reads as NaN for
    ``nan_fields``. TypeError for a value of the wrong type or a missing field, ValueError for an unknown one."""
    if not isinstance(row, Mapping):
        raise TypeError(f"a {cls.__name__} must be a JSON object, got {type(row).__name__}: {row!r:.60}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in row if key not in fields)
    if unknown:
        raise ValueError(f"a {cls.__name__} has no field(s) {unknown[:5]}; expected {list(fields)}")
    missing = [name for name, field in fields.items() if name not in row
               and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if missing:
        raise KeyError(f"a {cls.__name__} needs the field(s) {missing}")
    values = {}
    for name, value in row.items():
        if value is None and name in nan_fields:
            value = math.nan
        values[name] = _typed(value, str(fields[name].type), f"{cls.__name__}.{name}")
    return cls(**values)


def _typed(value: Any, annotation: str, what: str) -> Any:
    """``value`` checked against a simple annotation (written as text, e.g. ``"float | None"``)."""
    parts = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in parts:
        return None
    base = [part for part in parts if part != "None"]
    if len(base) != 1 or base[0] not in ("str", "int", "float"):
        return value
    kind = base[0]
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{what} must be {annotation}, got {type(value).__name__}: {value!r:.60}")
