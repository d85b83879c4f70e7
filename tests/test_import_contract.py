"""crp and zennit are imported only inside crp_invert.integration: the import-linter contract in pyproject.toml
catches a direct import anywhere else, new modules included, and allows it inside integration."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_direct_crp_or_zennit_imports_outside_integration_break_the_contract(tmp_path):
    """A copy of the package importing zennit in images.py and crp in a new module fails; zennit in an
    integration module does not."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    copy = tmp_path / "crp_invert"
    shutil.copytree(ROOT / "crp_invert", copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    images = copy / "images.py"
    images.write_text(images.read_text() + "\nimport zennit  # noqa\n")
    (copy / "new_command.py").write_text("import crp  # noqa\n")
    guard = copy / "integration" / "guard.py"
    guard.write_text(guard.read_text() + "\nimport zennit  # noqa\n")
    run = subprocess.run([exe], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert run.returncode != 0, run.stdout[-3000:]
    assert "crp_invert.images -> zennit" in run.stdout
    assert "crp_invert.new_command -> crp" in run.stdout
    assert "crp_invert.integration.guard" not in run.stdout
