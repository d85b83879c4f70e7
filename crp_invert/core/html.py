"""Compact HTML tables for Jupyter (``_repr_html_`` of the result classes): one function, every cell escaped.

Examples
--------
>>> print(html_table(["name", "AUC"], [["<b>", 0.91234], ["c", None]], caption="two rows"))
<table class="crp-invert">
<caption>two rows</caption>
<thead><tr><th>name</th><th>AUC</th></tr></thead>
<tbody>
<tr><td>&lt;b&gt;</td><td>0.9123</td></tr>
<tr><td>c</td><td></td></tr>
</tbody>
</table>
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

__all__ = ["html_table", "format_cell", "MAX_HTML_ROWS"]

#: Rows shown in a notebook before the table says how many more there are (keeps stored notebooks small).
MAX_HTML_ROWS = 20


def format_cell(value: Any) -> str:
    """The text of one cell: floats with 4 decimals (p-values below 1e-3 in e-notation), None empty.

    Parameters
    ----------
    value : Any
        The cell's value.

    Returns
    -------
    str
        The text, not yet escaped.

    Examples
    --------
    >>> [format_cell(v) for v in (0.5, 2e-7, None, 3, float("nan"))]
    ['0.5000', '2.00e-07', '', '3', 'nan']
    """
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "",
               max_rows: int | None = MAX_HTML_ROWS) -> str:
    """An HTML table of ``rows`` under ``header``; every cell and the caption are escaped.

    Parameters
    ----------
    header : sequence of str
        The column names.
    rows : iterable of sequences
        One sequence of cell values per row (formatted by :func:`format_cell`).
    caption : str
        Shown above the table.
    max_rows : int, optional
        Rows shown; the table then says how many more there are (None: all).

    Returns
    -------
    str
        The ``<table>`` element.
    """
    rows = iter(rows)
    shown = list(rows if max_rows is None else islice(rows, max_rows))
    hidden = sum(1 for _ in rows)
    escape = html.escape
    lines = ['<table class="crp-invert">']
    if caption:
        lines.append(f"<caption>{escape(caption)}</caption>")
    lines.append("<thead><tr>" + "".join(f"<th>{escape(str(name))}</th>" for name in header) + "</tr></thead>")
    lines.append("<tbody>")
    lines += ["<tr>" + "".join(f"<td>{escape(format_cell(cell))}</td>" for cell in row) + "</tr>" for row in shown]
    if hidden:
        lines.append(f'<tr><td colspan="{len(header)}">... {hidden} more rows</td></tr>')
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)
