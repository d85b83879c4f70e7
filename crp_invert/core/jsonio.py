"""JSON documents of our result objects (labels, glocal explanations, circuits, audits, channel searches):
one way to write them as text or a file and to read them back from either."""
from __future__ import annotations

import json
import os
from typing import Any

from .files import write_text_atomically

__all__ = ["write_json", "read_json"]


def write_json(data: Any, path: str | os.PathLike | None = None, indent: int | None = None) -> str:
    """``data`` as JSON text, also written to ``path`` when given (atomically, with the permissions of an
    ordinary new file: see :mod:`crp_invert.core.files`)."""
    text = json.dumps(data, indent=indent)
    if path is not None:
        write_text_atomically(path, text)
    return text


def read_json(text_or_path: str | os.PathLike) -> Any:
    """Parse JSON text (starting with ``{``) or the JSON file at a path."""
    text = str(text_or_path)
    if not text.lstrip().startswith("{"):
        with open(text_or_path, encoding="utf-8") as handle:
            text = handle.read()
    return json.loads(text)
