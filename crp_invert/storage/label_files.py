"""Label files on disk: ``LayerLabels`` JSON files and the ``index.json`` that ``crp-invert label --out DIR``
writes next to them (layer name -> file name), read into one dict of layer name -> labels.

Used by the ``report``, ``find`` and ``audit`` commands and by :func:`crp_invert.report.write_report`'s callers.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..core.jsonio import read_json_file
from ..core.labels import LayerLabels

__all__ = ["load_labels"]

_FORMAT = "crp-invert.LayerLabels"


def _labels_from_document(data: dict, path: Path) -> LayerLabels:
    try:
        return LayerLabels.from_dict(data)
    except (ValueError, TypeError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        raise type(error)(f"labels file {str(path)!r}: {message}") from None


def _is_index(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(value, str) for value in data.values())


def load_labels(paths: Iterable[str | os.PathLike]) -> dict[str, LayerLabels]:
    """Read ``LayerLabels`` JSON files (or an ``index.json`` written by ``crp-invert label --out DIR``).

    Every file is checked (see :meth:`LayerLabels.from_dict`); errors name the file.

    Parameters
    ----------
    paths : iterable of str or os.PathLike
        LayerLabels JSON files and index files, in any mix.

    Returns
    -------
    dict of str to LayerLabels
        Layer name (the labels' ``layer``, else the file stem or the index's key) -> labels, in the order given.

    Raises
    ------
    ValueError
        For unreadable or malformed files, and for two files with labels of the same layer.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from crp_invert import Explanation, Formula, LayerLabels
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> labels = LayerLabels([[Explanation(Formula.concept("red"), 0.9, 0.3, 1, 0.01)]], ["red"], "conv1")
    >>> labels.to_json(folder / "conv1.json")
    >>> list(load_labels([folder / "conv1.json"]))
    ['conv1']
    """
    result: dict[str, LayerLabels] = {}

    def add(name: str, labels: LayerLabels, source: Path) -> None:
        if name in result:
            raise ValueError(f"{source} holds labels of layer {name!r}, which an earlier file already gave")
        result[name] = labels

    for path in map(Path, paths):
        data = read_json_file(path, "labels file")
        if isinstance(data, dict) and data.get("format") == _FORMAT:
            labels = _labels_from_document(data, path)
            add(labels.layer or path.stem, labels, path)
        elif _is_index(data):
            for name, file_name in data.items():  # index.json: layer -> file next to it
                labels = LayerLabels.from_json(path.parent / file_name)
                add(labels.layer or name, labels, path.parent / file_name)
        else:
            raise ValueError(f"{path} is neither a LayerLabels JSON file nor an index.json of them")
    return result
