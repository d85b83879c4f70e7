"""Rendering the collected :class:`~crp_invert.report.page.Page` with jinja2 templates (``templates/``).

Autoescaping is on: every value the templates show is escaped by :func:`html.escape` (also in attributes; a
value is never written as markup). The styles and scripts (``static/``) are package files, inlined into the page
when it is written, so the page stays one self-contained file.
"""
from __future__ import annotations

import functools
import html
import math
from importlib import resources
from typing import Any

__all__ = ["render_page", "render_fragment", "static_text"]

_PACKAGE = "crp_invert.report"


def static_text(name: str) -> str:
    """The text of a file in ``static/`` (a style sheet or a script)."""
    return resources.files(_PACKAGE).joinpath("static", name).read_text(encoding="utf-8")


def _escape(value: Any) -> Any:
    """Every shown value through :func:`html.escape` (quotes included); ``None`` shows as nothing."""
    from markupsafe import Markup

    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def _number(value: Any, spec: str) -> str:
    """A number for a table cell; "" for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, spec)


def _p_value(value: Any) -> str:
    from ..core.labels import format_p_value

    return format_p_value(value)


def _sort_value(value: Any) -> str:
    """The exact number a column sorts by (``data-value``); "" for None or NaN (sorted last)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def _script_json(value: Any) -> str:
    """JSON for a ``data-`` attribute (escaped there like any other value)."""
    import json

    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader(_PACKAGE, "templates"),
        autoescape=True,
        finalize=_escape,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters.update(number=_number, p_value=_p_value, sort_value=_sort_value, json=_script_json)
    environment.globals.update(static=static_text)
    return environment


def render_page(page: Any) -> str:
    """The whole HTML page of a collected :class:`~crp_invert.report.page.Page`."""
    return _environment().get_template("page.html").render(page=page)


def render_fragment(macro: str, *args: Any) -> str:
    """One part of the page (a macro of ``templates/parts.html``, e.g. ``"sources_table"``) on its own."""
    template = _environment().get_template("parts.html")
    return str(getattr(template.module, macro)(*args))
