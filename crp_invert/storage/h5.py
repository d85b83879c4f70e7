"""h5py access shared by the storage formats: lazy import, opening with clear errors, chunk shapes,
row and column selections."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import h5py

# HDF5 chunk cache per dataset: writers size theirs to two bands of chunks (at most MAX_WRITE_CACHE_BYTES);
# the file-level default stays small so that many layers do not add up
FILE_CACHE_BYTES = 4 << 20
MAX_WRITE_CACHE_BYTES = 64 << 20

__all__ = ["FILE_CACHE_BYTES", "MAX_WRITE_CACHE_BYTES", "h5py_module", "open_h5", "chunk_shape", "read_columns",
           "row_selection", "true_ranges", "first_nonfinite"]


def h5py_module():
    """The h5py module, imported on first use (``import crp_invert`` stays light)."""
    import h5py

    return h5py


def chunk_shape(
    n_rows: int | None,
    n_cols: int,
    itemsize: int = 4,
    chunk_bytes: int = 1 << 20,
    band_bytes: int = 32 << 20,
    max_rows: int = 16384,
) -> tuple[int, int]:
    """Chunk shape for a [n_rows, n_cols] matrix that is appended by rows and read by columns.

    A chunk holds ``rows x cols`` values with ``rows <= max_rows`` (fewer if one band of chunks,
    ``rows x n_cols``, would exceed ``band_bytes``) and ``cols`` chosen so that a chunk is about
    ``chunk_bytes``; rows and columns are then spread evenly over the chunks. Tall, narrow chunks keep
    column-batch reads cheap (a batch of ``feature_batch_size`` columns reads little more than those
    columns), while appends stay fast because the writer's chunk cache holds two bands (see
    ``benchmarks/bench_scale.py``: N = 1 M, F = 256 gives 16130 x 16 chunks).

    Parameters
    ----------
    n_rows : int or None
        Number of rows, or None if unknown (appendable datasets).
    n_cols : int
        Number of columns.
    itemsize : int
        Bytes per value.
    chunk_bytes : int
        Target size of one chunk.
    band_bytes : int
        Upper bound of ``rows * n_cols * itemsize``, the memory one append of ``rows`` rows touches.
    max_rows : int
        Upper bound of the chunk height. Writers that flush after every small append should use a small
        one (e.g. 1024): a flush writes every partly filled chunk of the current band.

    Returns
    -------
    tuple of int
        ``(rows, cols)``.
    """
    if n_cols < 1:
        raise ValueError(f"n_cols must be >= 1, got {n_cols}")
    rows = max(1, min(int(max_rows), band_bytes // (n_cols * itemsize)))
    if n_rows is not None:
        rows = max(1, min(rows, int(n_rows)))
    cols = int(max(1, min(n_cols, chunk_bytes // (rows * itemsize))))
    if n_rows is not None and cols == n_cols:
        # narrow layer: make chunks taller instead (fewer chunks, still about chunk_bytes)
        rows = int(max(1, min(n_rows, chunk_bytes // (n_cols * itemsize))))
    # spread rows and columns evenly over the chunks, so that the last chunk is not mostly padding
    if n_rows is not None:
        rows = -(-int(n_rows) // -(-int(n_rows) // rows))
    cols = -(-n_cols // -(-n_cols // cols))
    return int(rows), int(cols)



def true_ranges(mask: np.ndarray, offset: int = 0) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of True in a 1-D bool array, shifted by ``offset``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a) + offset, int(b) + offset) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def read_columns(dataset, columns) -> np.ndarray:
    """Read ``dataset[:, columns]`` for a slice, an int or a sequence of ints (any order, repeats allowed)."""
    n_cols = dataset.shape[1]
    if columns is None:
        return dataset[()]
    if isinstance(columns, slice):
        return dataset[:, columns]
    if isinstance(columns, (int, np.integer)):
        columns = [int(columns)]
    index = np.asarray(columns)
    if index.dtype == bool:
        if index.shape != (n_cols,):
            raise ValueError(f"a boolean column mask must have shape ({n_cols},), got {index.shape}")
        index = np.flatnonzero(index)
    if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
        raise TypeError(f"columns must be None, a slice, an int or a 1-D sequence of ints, got {columns!r}")
    index = np.where(index < 0, index + n_cols, index)
    if index.size and (index.min() < 0 or index.max() >= n_cols):
        raise IndexError(f"column index out of range for {n_cols} columns: {columns!r}")
    unique, inverse = np.unique(index, return_inverse=True)
    if unique.size == 0:
        return np.empty((dataset.shape[0], 0), dtype=dataset.dtype)
    return dataset[:, unique][:, inverse]


def first_nonfinite(dataset, rows: np.ndarray | None = None, desc: str = "checking",
                    progress: bool = False) -> tuple[int, int, str, int] | None:
    """The first NaN or infinite value of a 2-D dataset, read in bands of rows (its chunk height, or 32 MiB):
    ``(row, column, "NaN" or "an infinite value", number of columns affected in that band)``, or None.

    ``rows`` (bool [N]) limits the search to those rows (e.g. the complete ones).
    """
    from tqdm.auto import tqdm

    n_rows, n_cols = dataset.shape
    if dataset.dtype.kind != "f":
        return None  # integers are finite
    band = dataset.chunks[0] if dataset.chunks else max(1, (32 << 20) // (max(1, dataset.dtype.itemsize) * n_cols))
    for start in tqdm(range(0, n_rows, band), desc=desc, disable=not progress, leave=False):
        block = np.asarray(dataset[start:start + band])
        # a band whose column sums are finite has only finite values (NaN and inf propagate; an overflowing
        # sum is checked value by value): one pass without a temporary of the band's size
        if np.isfinite(np.add.reduce(block, axis=0)).all():
            continue
        bad = ~np.isfinite(block)
        if rows is not None:
            bad &= np.asarray(rows[start:start + band], dtype=bool)[:, None]
        if bad.any():
            row, column = (int(v) for v in np.argwhere(bad)[0])
            kind = "NaN" if np.isnan(block[row, column]) else "an infinite value"
            return start + row, column, kind, int(bad.any(axis=0).sum())
    return None


def row_selection(rows, n_rows: int) -> tuple[slice | np.ndarray, int]:
    """Rows (slice, ``(start, end)`` or increasing int array) as a slice or index array, and their count."""
    if isinstance(rows, slice) or (isinstance(rows, tuple) and len(rows) == 2):
        start, end = (rows.start, rows.stop) if isinstance(rows, slice) else rows
        start, end = int(start), int(end)
        if not 0 <= start <= end <= n_rows:
            raise IndexError(f"rows [{start}, {end}) out of range for {n_rows} rows")
        return slice(start, end), end - start
    index = np.asarray(rows, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= n_rows):
        raise IndexError(f"row index out of range for {n_rows} rows")
    if index.size > 1 and not (np.diff(index) > 0).all():
        raise ValueError("row indices must be strictly increasing")
    return index, int(index.size)


def open_h5(path: str | os.PathLike, mode: str, **kwargs) -> h5py.File:
    """Open an HDF5 file, turning h5py's OSError for unreadable files into clear one-line errors: missing
    (FileNotFoundError), not HDF5, locked by another process
    (:class:`~crp_invert.storage.lock.FileInUseError`), open in this process, damaged (ValueError)."""
    from .lock import FileInUseError

    h5py = h5py_module()
    path = Path(path)
    if mode == "r" and not path.exists():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not an HDF5 file")
    try:
        return h5py.File(path, mode, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        text = " ".join(str(err).split())
        if getattr(err, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in text:
            raise FileInUseError(
                f"{str(path)!r} is in use by another process (HDF5 could not lock it); wait for it to finish"
            ) from None
        if "already open" in text:
            raise ValueError(
                f"cannot open {str(path)!r} with mode {mode!r}: it is already open elsewhere (close the "
                f"other ActivationCache or h5py.File first): {text}"
            ) from None
        if isinstance(err, PermissionError) or "Permission denied" in text:
            raise ValueError(f"cannot open {str(path)!r} with mode {mode!r}: permission denied") from None
        if mode in ("w", "w-", "x"):
            raise OSError(getattr(err, "errno", None) or errno.EIO, f"cannot create {str(path)!r}: {text}") from None
        if path.exists() and path.stat().st_size == 0:
            raise ValueError(f"{str(path)!r} is empty (0 bytes), not an HDF5 file") from None
        if path.exists() and not h5py.is_hdf5(path):
            raise ValueError(f"{str(path)!r} is not an HDF5 file") from None
        raise ValueError(f"cannot open {str(path)!r} as HDF5 (truncated or damaged file?): {text}") from None
