"""Argument checks shared by every entry point: one place that says "an int, not a bool"."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_int", "check_fraction"]


def check_int(value: Any, name: str, minimum: int | None = 1) -> int:
    """``value`` as an int, refusing bools, floats and values below ``minimum`` (TypeError / ValueError)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_fraction(value: Any, name: str) -> float:
    """``value`` as a float in [0, 1] (TypeError for non-numbers and bools, ValueError outside)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}: {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)
