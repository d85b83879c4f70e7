"""The folders are layers (core < storage < integration | parallel < labeler < report < demo < cli): the
import-linter contracts in pyproject.toml hold, so an import cycle or an upward import fails the tests."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """lint-imports reports no broken contract (the folders' layers hold)."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    run = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_contracts_can_fail(tmp_path):
    """A copy of the package with one upward import (core -> storage) breaks the layers contract."""
    copy = tmp_path / "crp_invert"
    shutil.copytree(ROOT / "crp_invert", copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    metrics = copy / "core" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom ..storage import cache  # noqa\n")
    exe = shutil.which("lint-imports")
    run = subprocess.run([exe], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert run.returncode != 0
    assert "crp_invert.core.metrics -> crp_invert.storage" in run.stdout


def test_core_imports_nothing_of_crp_zennit_or_h5py():
    """Importing crp_invert.core loads neither crp, zennit nor h5py."""
    code = ("import sys; import crp_invert.core.labeling, crp_invert.core.formula, crp_invert.core.concepts; "
            "print(sorted(m for m in ('crp', 'zennit', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
