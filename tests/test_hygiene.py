"""Hygiene of the test suite itself: every test says what it checks, and no test module imports another.

``CHECKED`` is every Python file of ``tests/``: a new test module is checked from its first commit.
"""
import ast
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# every test module and every helper module of the suite
CHECKED = sorted(path.name for path in TESTS.glob("*.py") if path.name != "__init__.py")


def parse(name: str) -> ast.Module:
    """The syntax tree of a file of ``tests/``."""
    return ast.parse((TESTS / name).read_text(encoding="utf-8"), filename=name)


def imported_modules(tree: ast.AST) -> set[str]:
    """The top-level names of every module imported anywhere in the tree (also inside functions)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", CHECKED)
def test_every_test_function_has_a_docstring(name):
    """Every ``test_*`` function of the file has a docstring saying what it checks."""
    missing = [node.name for node in ast.walk(parse(name))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               and node.name.startswith("test_") and not ast.get_docstring(node)]
    assert missing == [], f"{name}: test functions without a docstring: {missing}"


@pytest.mark.parametrize("name", CHECKED)
def test_no_test_module_imports_another(name):
    """The file imports no test module (``test_*``); shared code lives in helpers.py, report_page.py, ..."""
    imported = sorted(m for m in imported_modules(parse(name)) if m.startswith("test_"))
    assert imported == [], f"{name} imports test modules {imported}"


def test_the_checks_see_a_missing_docstring_and_a_test_import(tmp_path, monkeypatch):
    """The two checks fail on a file with an undocumented test and an import of a test module."""
    (tmp_path / "test_bad.py").write_text("from test_other import x\n\ndef test_a():\n    pass\n")
    monkeypatch.setattr(sys.modules[__name__], "TESTS", tmp_path)
    with pytest.raises(AssertionError, match="test_a"):
        test_every_test_function_has_a_docstring("test_bad.py")
    with pytest.raises(AssertionError, match="test_other"):
        test_no_test_module_imports_another("test_bad.py")
