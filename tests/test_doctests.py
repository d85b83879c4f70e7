"""The examples in the docstrings run and print what they say (tiny random or hand-made data, CPU)."""
import doctest
import importlib

import pytest

# every module with Examples in its docstrings; a new one is added here
MODULES = ["core.metrics", "core.formula", "core.html", "core.concepts", "core.labeling", "core.search", "labeler",
           "find", "audit", "fuzzy", "storage.cache", "storage.flat", "integration.glocal", "parallel.group"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _docstrings_with_examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(f"crp_invert.{name}")
    return [test for test in doctest.DocTestFinder().find(module) if test.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    """Every docstring example of the module runs without a failure (in an empty folder: some write files)."""
    monkeypatch.chdir(tmp_path)
    tests = _docstrings_with_examples(name)
    assert tests, f"crp_invert.{name} has no docstring examples"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_at_least_15_docstrings_have_examples():
    """The docs promise runnable examples on the main entry points: at least 15 docstrings, all run above."""
    assert sum(len(_docstrings_with_examples(name)) for name in MODULES) >= 15


def test_import_does_no_work():
    """``import crp_invert`` imports neither CRP, h5py nor matplotlib."""
    import subprocess
    import sys

    code = "import sys, crp_invert; print('crp' in sys.modules, 'h5py' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
