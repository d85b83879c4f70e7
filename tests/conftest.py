"""Test configuration: ``tests/`` is importable (``from helpers import ...``), matplotlib draws off screen."""
import os
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))
