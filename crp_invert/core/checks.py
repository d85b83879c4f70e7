"""Checks shared by every entry point: one place that says "an int, not a bool", reads JSON from files
that other people made, checks names, and turns numbers into floats that order exactly like them."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .jsonio import read_json_file as read_json  # noqa: F401  (one reader of JSON files, kept here for its callers)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["check_int", "check_fraction", "check_name", "read_json", "check_output", "exact_float_columns",
           "fits_in_memory"]

#: the largest integer magnitude below which every integer is a float64
_EXACT_FLOAT64 = 2**53


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or numpy integer and not a bool (``True`` is an int to Python, not to us)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(value: Any, name: str, minimum: int | None = 1) -> int:
    """``value`` as an int, refusing bools, floats and values below ``minimum`` (TypeError / ValueError)."""
    if not is_int(value):
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


def check_name(name: Any, what: str) -> str:
    """A name that every file format of ours stores faithfully: a non-blank str without NUL characters and
    without lone surrogates (TypeError / ValueError naming ``what``)."""
    if isinstance(name, np.str_):
        name = str(name)
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}: {name!r}")
    if not name.strip():
        raise ValueError(f"{what} must not be empty or blank, got {name!r}")
    if "\0" in name:
        raise ValueError(f"{what} {name!r} contains a NUL character, which files cannot store faithfully")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {name!r} is not valid Unicode (a lone surrogate)") from None
    return name


def check_output(path: str | os.PathLike, overwrite: bool = False, folder: bool = False,
                 option: str = "--out") -> Path:
    """Check, before any work, that an output can be written at ``path``.

    A file: no folder there, and no existing file unless ``overwrite``. A folder: no file there. In both
    cases the nearest existing folder must accept a new file (tried with a probe file, which also catches
    read-only file systems). Errors are ValueError naming ``option`` and the path.
    """
    path = Path(path)
    shown = f"{option} {str(path)!r}"
    if folder:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{shown} is a file; expected a folder for several layers")
    else:
        if path.is_dir():
            raise ValueError(f"{shown} is a folder; give a file name")
        if path.exists() and not overwrite:
            raise ValueError(f"{shown} exists; pass --overwrite to replace it")
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{shown} cannot be written: {str(ancestor)!r} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".crp-invert-probe-", dir=ancestor)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{shown} cannot be written: {str(ancestor)!r} is not writable ({error.strerror})") from None
    return path


def fits_in_memory(n_bytes: int, what: str) -> None:
    """Refuse (ValueError) to allocate ``n_bytes`` when they exceed the machine's physical memory, e.g. for
    an array whose size comes from a file's header."""
    try:
        total = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return
    if n_bytes > total:
        raise ValueError(f"{what} would need {n_bytes} bytes, more than this machine's memory ({total} bytes)")


def _dense_ranks(array: np.ndarray) -> np.ndarray:
    """Per column, 1 for the smallest value, 2 for the next distinct one, ...: float64 ``[N, F]`` that orders
    and ties exactly like ``array``."""
    order = np.argsort(array, axis=0, kind="stable")
    ordered = np.take_along_axis(array, order, axis=0)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    ranks = np.empty(array.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, np.cumsum(starts, axis=0, dtype=np.float64), axis=0)
    return ranks


def exact_float_columns(block: Any) -> torch.Tensor:
    """A real ``[N, F]`` block (numpy or torch) as a floating tensor whose columns order and tie exactly like
    the input.

    Floating tensors and arrays are returned as they are. Integers are converted to float64, which is exact
    below 2**53; integers beyond (int64 or uint64 near 2**60 would tie after the conversion) and numpy's
    long double are replaced by their dense ranks per column, which every rank statistic (AUROC,
    Mann-Whitney U) treats exactly like the values.

    Raises
    ------
    TypeError
        For bool, complex, string or object data.
    """
    import torch  # here: the checks are imported by the command line, which must start fast

    if isinstance(block, torch.Tensor):
        if block.dtype == torch.bool or block.is_complex():
            raise TypeError(f"activations must be real numbers, got dtype {block.dtype}")
        if block.is_floating_point():
            return block
        values = block.detach().cpu().numpy()
        device = block.device
    else:
        values = np.asarray(block)
        device = torch.device("cpu")
    kind = values.dtype.kind
    if kind not in "iuf":
        raise TypeError(f"activations must be real numbers, got dtype {values.dtype}")
    if kind == "f" and values.dtype.itemsize <= 8:
        return torch.from_numpy(np.ascontiguousarray(values))
    if values.size == 0:
        return torch.from_numpy(values.astype(np.float64)).to(device)
    if kind == "f":  # long double: exact as float64 if every value is one (and NaN/inf stay what they are)
        converted = values.astype(np.float64)
        if not np.isfinite(values).all() or np.array_equal(converted, values):
            return torch.from_numpy(converted).to(device)
    elif -_EXACT_FLOAT64 <= int(values.min()) and int(values.max()) <= _EXACT_FLOAT64:
        return torch.from_numpy(values.astype(np.float64)).to(device)
    return torch.from_numpy(_dense_ranks(values)).to(device)
