"""The examples in the docstrings of the core modules run and print what they say."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["core.metrics", "core.formula", "core.concepts", "core.labeling", "labeler",
                                  "find", "audit"])
def test_docstring_examples(name):
    module = importlib.import_module(f"crp_invert.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_import_does_no_work():
    import subprocess
    import sys

    code = "import sys, crp_invert; print('crp' in sys.modules, 'h5py' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
