"""JSON documents of our result objects (labels, glocal explanations, circuits, audits, channel searches):
one way to write them as text or a file and to read them back from either."""
from __future__ import annotations

import json
import os
from typing import Any

from .checks import read_json as read_json_file
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
    """Parse JSON text (a str starting with ``{`` or ``[``) or the JSON file at a path.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Text or file that is not JSON, nested too deeply, unreadable (the message says which).
    """
    if isinstance(text_or_path, str) and text_or_path.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(text_or_path)
        except RecursionError:
            raise ValueError("the JSON text is nested too deeply") from None
        except ValueError as error:
            raise ValueError(f"the text is not JSON: {error}") from None
    return read_json_file(text_or_path)
