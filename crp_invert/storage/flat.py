"""The single-file format of the INVERT release: one HDF5 dataset ``Y`` of shape [N, D] float32,
written by appending rows and read one column batch at a time."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .h5 import FILE_CACHE_BYTES, MAX_WRITE_CACHE_BYTES, chunk_shape, first_nonfinite, h5py_module, open_h5
from .lock import FileLock

if TYPE_CHECKING:  # pragma: no cover
    import h5py

__all__ = ["FlatActivationWriter", "open_flat_dataset"]

logger = logging.getLogger(__name__)



class FlatActivationWriter:
    """Appendable writer of the INVERT release format: one dataset ``Y`` [N, D] float32, rows appended.

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 file. An existing file is appended to (its dataset must have the same D) unless
        ``overwrite=True``.
    dataset : str
        Dataset name (``"Y"`` in the release).
    overwrite : bool
        Discard an existing file.
    chunks : (int, int), optional
        Chunk shape (default :func:`chunk_shape` with unknown N).

    Examples
    --------
    >>> with FlatActivationWriter("acts.h5") as writer:   # doctest: +SKIP
    ...     for x, _ in loader:
    ...         writer.append(feature_extractor(x))         # any [B, ...], flattened to [B, D]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dataset: str = "Y",
        overwrite: bool = False,
        chunks: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(dataset, str) or not dataset or "/" in dataset or dataset in (".", ".."):
            raise ValueError(f"dataset must be a plain name without '/', got {dataset!r}")
        self.path = Path(path)
        self.dataset_name = dataset
        self._chunks = chunks
        exists = self.path.exists() and self.path.stat().st_size > 0
        self._lock = FileLock(self.path, exclusive=True)  # a second writer is refused, not interleaved
        try:
            self._file = open_h5(
                self.path,
                "w" if (overwrite or not exists) else "r+",
                rdcc_nbytes=MAX_WRITE_CACHE_BYTES,
                rdcc_nslots=10007,
            )
        except BaseException:
            self._lock.release()
            raise
        h5py = h5py_module()
        self._dataset = self._file.get(dataset)
        if self._dataset is not None and (
            not isinstance(self._dataset, h5py.Dataset) or self._dataset.ndim != 2
            or self._dataset.maxshape[0] is not None or self._dataset.dtype.kind != "f"
        ):
            found = self._dataset
            self.close()
            raise ValueError(
                f"{str(self.path)!r}: existing {dataset!r} is not an appendable [N, D] float dataset "
                f"({found!r})"
            )

    @property
    def n_rows(self) -> int:
        """Rows written so far."""
        return 0 if self._dataset is None else int(self._dataset.shape[0])

    @property
    def n_features(self) -> int | None:
        """D, or None before the first append."""
        return None if self._dataset is None else int(self._dataset.shape[1])

    def append(self, batch: np.ndarray | torch.Tensor) -> None:
        """Append a batch [B, ...] (torch or numpy), flattened to [B, D] float32, and flush.

        Parameters
        ----------
        batch : numpy.ndarray or torch.Tensor
            ``[B, ...]`` activations of the next B samples; every batch has the same D after flattening.
        """
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().float().numpy()
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim < 1:
            raise ValueError(f"batch must have a batch dimension [B, ...], got shape {batch.shape}")
        batch = batch.reshape(batch.shape[0], -1) if batch.ndim != 2 else batch
        if self._dataset is None:
            if batch.shape[1] == 0:
                raise ValueError(f"batch must have D >= 1 features, got shape {batch.shape}")
            # every append flushes, which writes each partly filled chunk of the band: keep chunks short
            chunks = self._chunks or chunk_shape(None, batch.shape[1], max_rows=1024)
            self._dataset = self._file.create_dataset(
                self.dataset_name,
                shape=(0, batch.shape[1]),
                maxshape=(None, batch.shape[1]),
                dtype="f4",
                chunks=chunks,
            )
        if batch.shape[1] != self._dataset.shape[1]:
            raise ValueError(
                f"batch has {batch.shape[1]} features per row after flattening, the file has "
                f"{self._dataset.shape[1]}"
            )
        start = self._dataset.shape[0]
        self._dataset.resize(start + batch.shape[0], axis=0)
        self._dataset[start:] = batch
        self._file.flush()

    def close(self) -> None:
        """Close the file and release its lock (idempotent)."""
        try:
            if self._file.id.valid:
                self._file.close()
        finally:
            self._lock.release()

    def __enter__(self) -> FlatActivationWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()



@contextlib.contextmanager
def open_flat_dataset(path: str | os.PathLike, dataset: str, n_samples: int) -> Iterator[h5py.Dataset]:
    """Open the ``[N, D]`` dataset of an INVERT-format HDF5 file for column reads, checking that it
    exists, is 2-D, real numbers, finite, and has ``n_samples`` rows; the file closes on exit. A file that
    another process is writing is refused ("in use by another process")."""
    lock = FileLock(path, exclusive=False) if Path(path).exists() else None
    try:
        with open_h5(path, "r", rdcc_nbytes=FILE_CACHE_BYTES, rdcc_nslots=10007) as file:
            data = _checked_flat_dataset(file, path, dataset, n_samples)
            found = first_nonfinite(data, desc=f"checking {dataset}")
            if found is not None:
                row, column, kind, _ = found
                raise ValueError(
                    f"{str(path)!r}: dataset {dataset!r} has {kind} in column {column} (row {row}); labels need "
                    "finite values"
                )
            yield data
    finally:
        if lock is not None:
            lock.release()


def _checked_flat_dataset(file: h5py.File, path: str | os.PathLike, dataset: str, n_samples: int) -> h5py.Dataset:
    h5py = h5py_module()
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a non-empty name, got {dataset!r}")
    try:
        data = file.get(dataset)
    except (KeyError, ValueError, OSError, RuntimeError, TypeError):
        data = None
    if not isinstance(data, h5py.Dataset):
        found = [k for k, v in file.items() if isinstance(v, h5py.Dataset)]
        raise KeyError(f"{str(path)!r} has no dataset {dataset!r}; datasets at the root: {found}")
    if data.ndim != 2:
        raise ValueError(f"{str(path)!r}: dataset {dataset!r} must be 2-D [N, D], got shape {data.shape}")
    if data.dtype.kind not in "fiu":
        raise TypeError(f"{str(path)!r}: dataset {dataset!r} must hold real numbers, got dtype {data.dtype}")
    if data.shape[0] != n_samples:
        raise ValueError(
            f"{str(path)!r}: dataset {dataset!r} has N={data.shape[0]} rows but the labeler's "
            f"concepts have N={n_samples} samples"
        )
    return data
