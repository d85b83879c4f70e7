"""Test configuration: ``tests/`` is importable (``from helpers import ...``), matplotlib draws off screen, and
the shared fixtures."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import write_cache  # noqa: E402  (needs the path above)


@pytest.fixture
def make_cache(tmp_path):
    """Write a complete activation cache under the test's folder: ``make_cache(layers, name="cache.h5", **kw)``
    takes :func:`helpers.write_cache`'s arguments and returns the file's path."""

    def make(layers, name: str = "cache.h5", **kwargs) -> Path:
        return write_cache(tmp_path / name, layers, **kwargs)

    return make
