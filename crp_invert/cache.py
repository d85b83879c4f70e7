"""HDF5 storage of per-sample, per-concept activations and relevances, and labeling straight from it.

Two formats live here:

:class:`ActivationCache`
    The cache written while recording (see :mod:`crp_invert.recording`). One HDF5 file, one group per
    layer, every fact needed to trust the numbers stored as attributes, not file names.
:class:`FlatActivationWriter`
    The single-file format of the INVERT HDF5 release: one dataset ``Y`` of shape [N, D] float32.

Layout of an activation cache (format version 1)::

    /                                 attrs: format, format_version, n_samples, sample_start, sample_end,
    |                                        dataset_length, layer_index (JSON {layer name: group key})
    +-- layers/
        +-- 0/                        attrs: name, n_samples, n_channels, sample_start, sample_end,
        |   |                                dataset_length, pooling, concept, relevance, composite,
        |   |                                model_hash, fingerprint, format_version
        |   +-- activations           float32 [N, C], NaN until written
        |   +-- relevances            float32 [N, C] (only if recorded)
        |   +-- complete              uint8 [N]: 1 where the row's data of this layer is on disk
        +-- 1/ ...

Row ``i`` of every dataset belongs to dataset sample ``sample_start + i``. A *shard* (several processes
recording disjoint ranges of one dataset) is a cache whose ``[sample_start, sample_end)`` is a part of
``[0, dataset_length)``; shards of one run share every layer's ``fingerprint`` (which hashes the model,
layer, dataset length, pooling and relevance setup, but not the sample range), so they can be checked
against each other and stitched together row-wise (e.g. with h5py virtual datasets of the same layout).

Layer names are used as given (``features.40``, ``layer4.1.conv2``) but never as HDF5 paths: groups are
numbered and the name lives in an attribute, so a name cannot create nested groups or escape ``layers/``.

Crash safety: datasets have a fixed shape and are allocated when the layer is created, so writing rows
never changes HDF5 metadata. Rows are marked in ``complete`` only after their data were flushed to disk,
so a process stopped at any point (exception, Ctrl-C, ``kill -9``) leaves a file that opens and whose
``complete`` rows are trustworthy; the rest is recorded again by a resumed run.

Chunking: chunks are blocks of ``rows x columns`` (about 1 MiB, see :func:`chunk_shape`), so that
appending a batch of rows touches one band of chunks, and reading a batch of columns (as the labeler
does) reads whole chunks sequentially without loading the layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import h5py

    from .labeler import ConceptLabeler, LayerLabels

logger = logging.getLogger(__name__)

FORMAT = "crp-invert-activation-cache"
FORMAT_VERSION = 1
SOURCES = ("activation", "relevance")
_DATASET_NAMES = {"activation": "activations", "relevance": "relevances"}

# HDF5 chunk cache per dataset. Datasets written by the cache get one sized to two bands of chunks
# (see ActivationCache._writer); the file-level default stays small so that many layers do not add up.
_FILE_CACHE_BYTES = 4 << 20
_MAX_WRITE_CACHE_BYTES = 64 << 20


def _h5py():
    import h5py

    return h5py


# ------------------------------------------------------------------------------------------------------------
# functional helpers
# ------------------------------------------------------------------------------------------------------------


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


def model_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's ``state_dict`` (names, dtypes, shapes and bytes of parameters and buffers).

    Parameters
    ----------
    model : torch.nn.Module
        The model, as given by the user (before canonizers are applied).

    Returns
    -------
    str
        Hex digest.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def fingerprint(
    model_hash: str,
    layer: str,
    dataset_length: int,
    pooling: str,
    concept: str = "ChannelConcept",
    composite: str = "",
    relevance: str = "",
) -> str:
    """Fingerprint of what produced a layer's data in a cache.

    Covers the model (via :func:`model_hash`), the layer name, the dataset length, the pooling, the CRP
    concept class, the composite (its canonizers change activations, e.g. merged BatchNorms) and a description
    of how relevances were computed, but *not* the sample range, so that shards of one recording share it.

    Returns
    -------
    str
        Hex digest (SHA-256 of the canonical JSON of the arguments).
    """
    payload = json.dumps(
        {
            "model": str(model_hash),
            "layer": str(layer),
            "dataset_length": int(dataset_length),
            "pooling": str(pooling),
            "concept": str(concept),
            "composite": str(composite),
            "relevance": str(relevance),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _ranges(mask: np.ndarray, offset: int = 0) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of True in a 1-D bool array, shifted by ``offset``."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a) + offset, int(b) + offset) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _read_columns(dataset, columns) -> np.ndarray:
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


def _row_selection(rows, n_rows: int) -> tuple[slice | np.ndarray, int]:
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


def _open_h5(path: str | os.PathLike, mode: str, **kwargs) -> "h5py.File":
    """Open an HDF5 file, turning h5py's OSError for unreadable files into clear errors."""
    h5py = _h5py()
    path = Path(path)
    if mode == "r" and not path.exists():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as err:
        if path.exists() and not h5py.is_hdf5(path):
            raise ValueError(f"{str(path)!r} is not an HDF5 file") from err
        if "already open" in str(err):
            raise ValueError(
                f"cannot open {str(path)!r} with mode {mode!r}: it is already open elsewhere (close the "
                f"other ActivationCache or h5py.File first): {err}"
            ) from err
        raise ValueError(f"cannot open {str(path)!r} as HDF5 (truncated or damaged file?): {err}") from err


# ------------------------------------------------------------------------------------------------------------
# the cache
# ------------------------------------------------------------------------------------------------------------


class ActivationCache:
    """Per-sample pooled activations (and relevances) of the concepts of several layers, in one HDF5 file.

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 file.
    mode : {"r", "a"}
        ``"r"`` opens an existing cache read-only. ``"a"`` opens it for recording, creating the file if it
        does not exist (its size is set by :meth:`initialize`).
    overwrite : bool
        With ``mode="a"``: discard an existing file instead of continuing it. Without it an existing file is
        never overwritten.

    Examples
    --------
    >>> cache = ActivationCache("acts.h5")             # doctest: +SKIP
    >>> cache.layers                                    # doctest: +SKIP
    ['conv1', 'conv2']
    >>> cache.activations("conv2", columns=slice(0, 8)) # doctest: +SKIP

    Notes
    -----
    The object keeps the file open until :meth:`close` (or the end of a ``with`` block). HDF5 refuses to
    open a file for reading while it is open for writing, also in the same process.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r", overwrite: bool = False) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if overwrite and mode == "r":
            raise ValueError("overwrite=True needs mode='a'")
        self.path = Path(path)
        self.mode = mode
        self._writers: dict[tuple[str, str], Any] = {}
        self._groups: dict[str, Any] = {}
        self._index_memo: dict[str, str] | None = None
        self._root: dict[str, Any] | None = None
        if mode == "a":
            exists = self.path.exists() and self.path.stat().st_size > 0
            h5mode = "w" if (overwrite or not exists) else "r+"
            self._file = _open_h5(self.path, h5mode, rdcc_nbytes=_FILE_CACHE_BYTES, rdcc_nslots=10007)
        else:
            self._file = _open_h5(self.path, "r", rdcc_nbytes=_FILE_CACHE_BYTES, rdcc_nslots=10007)
        try:
            if len(self._file.attrs) or len(self._file):
                self._check_format()
        except BaseException:
            self._file.close()
            raise

    # -- file-level ------------------------------------------------------------------------------------------

    def _check_format(self) -> None:
        attrs = self._file.attrs
        if attrs.get("format") != FORMAT:
            raise ValueError(
                f"{str(self.path)!r} is an HDF5 file but not a crp-invert activation cache (no format "
                f"attribute {FORMAT!r}; objects at the root: {sorted(self._file.keys())}); for a single "
                "dataset such as "
                "'Y' of the INVERT release use label_h5"
            )
        version = int(attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{str(self.path)!r} has cache format version {version}, this code reads <= {FORMAT_VERSION}"
            )
        for key in ("n_samples", "sample_start", "sample_end", "dataset_length", "layer_index"):
            if key not in attrs:
                raise ValueError(f"{str(self.path)!r} is missing the root attribute {key!r} (damaged cache?)")

    @property
    def initialized(self) -> bool:
        """Whether the file already holds a cache (rows and sample range are fixed)."""
        return self._root_attrs() is not None

    def _root_attrs(self) -> dict[str, Any] | None:
        # root attributes are written once (initialize); read them once
        if self._root is None and self._file.attrs.get("format") == FORMAT:
            self._root = {
                key: int(self._file.attrs[key])
                for key in ("n_samples", "sample_start", "sample_end", "dataset_length")
            }
        return self._root

    def initialize(self, sample_range: tuple[int, int], dataset_length: int | None = None) -> None:
        """Fix the rows of a new cache, or check that an existing cache has the same ones.

        Parameters
        ----------
        sample_range : (int, int)
            ``[start, end)`` of the dataset samples whose rows this file holds.
        dataset_length : int, optional
            Length of the whole dataset (default: ``end``). Differs from ``end - start`` for shards.
        """
        start, end = (int(v) for v in sample_range)
        dataset_length = end if dataset_length is None else int(dataset_length)
        if not 0 <= start < end <= dataset_length:
            raise ValueError(
                f"sample_range must satisfy 0 <= start < end <= dataset_length, got {sample_range!r} "
                f"with dataset_length={dataset_length}"
            )
        if self.initialized:
            have = (self.sample_range, self.dataset_length)
            if have != ((start, end), dataset_length):
                raise ValueError(
                    f"cache {str(self.path)!r} holds samples [{have[0][0]}, {have[0][1]}) of a dataset of "
                    f"length {have[1]}, not [{start}, {end}) of length {dataset_length}; use another file or "
                    "overwrite=True"
                )
            return
        self._writable()
        attrs = self._file.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["n_samples"] = end - start
        attrs["sample_start"] = start
        attrs["sample_end"] = end
        attrs["dataset_length"] = dataset_length
        attrs["layer_index"] = "{}"
        self._file.require_group("layers")
        self._file.flush()

    def _writable(self) -> None:
        if self.mode != "a":
            raise ValueError(f"cache {str(self.path)!r} is open read-only; open it with mode='a' to record")

    def _need_init(self) -> None:
        if not self.initialized:
            raise ValueError(f"cache {str(self.path)!r} is empty (call initialize first)")

    @property
    def n_samples(self) -> int:
        """Number of rows N."""
        self._need_init()
        return self._root_attrs()["n_samples"]

    @property
    def sample_range(self) -> tuple[int, int]:
        """``(start, end)``: row ``i`` belongs to dataset sample ``start + i``."""
        self._need_init()
        root = self._root_attrs()
        return root["sample_start"], root["sample_end"]

    @property
    def dataset_length(self) -> int:
        """Length of the dataset the rows were taken from."""
        self._need_init()
        return self._root_attrs()["dataset_length"]

    def _index(self) -> dict[str, str]:
        # the layer index only changes through add_layer, which resets this memo
        if self._index_memo is None:
            self._index_memo = json.loads(self._file.attrs["layer_index"]) if self.initialized else {}
        return dict(self._index_memo)

    @property
    def layers(self) -> list[str]:
        """Layer names, in the order they were added."""
        return list(self._index())

    def __contains__(self, layer: str) -> bool:
        return layer in self._index()

    def _group(self, layer: str) -> "h5py.Group":
        index = self._index()
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a str, got {type(layer).__name__}")
        if layer not in index:
            raise KeyError(f"layer {layer!r} is not in cache {str(self.path)!r}; layers: {list(index)}")
        group = self._groups.get(layer)
        if group is None:
            group = self._file["layers"][index[layer]]
            if group.attrs.get("name") != layer:
                raise ValueError(
                    f"cache {str(self.path)!r} is damaged: group of layer {layer!r} is named "
                    f"{group.attrs.get('name')!r}"
                )
            self._groups[layer] = group
        return group

    # -- layers ----------------------------------------------------------------------------------------------

    def add_layer(
        self,
        layer: str,
        n_channels: int,
        relevances: bool = False,
        chunks: tuple[int, int] | None = None,
        **meta: Any,
    ) -> None:
        """Create a layer's datasets, or check that an existing layer was made the same way.

        Parameters
        ----------
        layer : str
            Layer name as given (any characters).
        n_channels : int
            Number of concepts C.
        relevances : bool
            Also create the ``relevances`` dataset.
        chunks : (int, int), optional
            Chunk shape; default :func:`chunk_shape`.
        **meta
            Attributes describing the layer's data (``pooling``, ``concept``, ``relevance``, ``composite``,
            ``model_hash``, ``fingerprint``, ...). For an existing layer, every given value must equal the
            stored one, otherwise ValueError names the differences (this is what refuses resuming with another
            model or pooling).
        """
        self._writable()
        self._need_init()
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be a non-empty str, got {layer!r}")
        n_channels = int(n_channels)
        if n_channels < 1:
            raise ValueError(f"layer {layer!r}: n_channels must be >= 1, got {n_channels}")
        index = self._index()
        if layer in index:
            group = self._group(layer)
            diffs = []
            if int(group.attrs["n_channels"]) != n_channels:
                diffs.append(f"n_channels: stored {int(group.attrs['n_channels'])}, now {n_channels}")
            if relevances and "relevances" not in group:
                diffs.append("relevances: stored without, now with")
            for key, value in meta.items():
                stored = group.attrs.get(key)
                stored = stored.item() if isinstance(stored, np.generic) else stored
                if stored != value:
                    diffs.append(f"{key}: stored {stored!r}, now {value!r}")
            if diffs:
                raise ValueError(
                    f"cache {str(self.path)!r} layer {layer!r} was recorded differently; refusing to mix "
                    "results "
                    "(use another file or overwrite=True): " + "; ".join(diffs)
                )
            return
        h5py = _h5py()
        n_rows = self.n_samples
        chunks = chunk_shape(n_rows, n_channels) if chunks is None else tuple(int(c) for c in chunks)
        key = str(len(self._file["layers"]))
        while key in self._file["layers"]:
            key = str(int(key) + 1)
        group = self._file["layers"].create_group(key)
        for name in ["activations"] + (["relevances"] if relevances else []):
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            group.create_dataset(
                name,
                shape=(n_rows, n_channels),
                dtype="f4",
                chunks=chunks,
                fillvalue=np.nan,
                dcpl=dcpl,
            )
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        group.create_dataset("complete", shape=(n_rows,), dtype="u1", fillvalue=0, dcpl=dcpl)
        start, end = self.sample_range
        attrs = {
            "name": layer,
            "n_samples": n_rows,
            "n_channels": n_channels,
            "sample_start": start,
            "sample_end": end,
            "dataset_length": self.dataset_length,
            "format_version": FORMAT_VERSION,
        }
        attrs.update(meta)
        for attr_key, value in attrs.items():
            group.attrs[attr_key] = value
        index[layer] = key
        self._file.attrs["layer_index"] = json.dumps(index)
        self._index_memo = None
        self._file.flush()

    def info(self, layer: str) -> dict[str, Any]:
        """All attributes of a layer (pooling, concept, fingerprint, ...) as a dict of Python values."""
        group = self._group(layer)
        info = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in group.attrs.items()}
        info["relevances"] = "relevances" in group
        info["chunks"] = group["activations"].chunks
        return info

    def n_channels(self, layer: str) -> int:
        """Number of concepts C of a layer."""
        return int(self._group(layer).attrs["n_channels"])

    def fingerprint(self, layer: str) -> str | None:
        """The stored fingerprint of a layer (see :func:`fingerprint`), or None if none was recorded."""
        value = self._group(layer).attrs.get("fingerprint")
        return None if value is None else str(value)

    # -- rows ------------------------------------------------------------------------------------------------

    def write(
        self,
        layer: str,
        rows: slice | tuple[int, int],
        activations: np.ndarray | torch.Tensor,
        relevances: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Write rows of one layer (not yet marked complete; see :meth:`mark_complete`).

        Parameters
        ----------
        layer : str
        rows : slice, (int, int) or increasing sequence of int
            Rows in the file (dataset sample minus ``sample_range[0]``).
        activations, relevances : array [n_rows, C]
        """
        self._writable()
        group = self._group(layer)
        n_channels = int(group.attrs["n_channels"])
        selection, count = _row_selection(rows, self.n_samples)
        for name, values in (("activations", activations), ("relevances", relevances)):
            if values is None:
                continue
            if name not in group:
                raise ValueError(
                    f"layer {layer!r} of cache {str(self.path)!r} was created without relevances"
                )
            if isinstance(values, torch.Tensor):
                values = values.detach().cpu().numpy()
            values = np.asarray(values, dtype=np.float32)
            if values.shape != (count, n_channels):
                raise ValueError(
                    f"layer {layer!r}: {name} for {count} rows must have shape "
                    f"{(count, n_channels)}, got {values.shape}"
                )
            if count:
                self._writer(group, name)[selection] = values

    def mark_complete(self, rows: slice | tuple[int, int], layers: Iterable[str] | None = None) -> None:
        """Flush written data to disk, then mark rows complete for ``layers`` (default: all).

        ``rows`` is a slice, ``(start, end)`` or an increasing index array.
        """
        self._writable()
        selection, count = _row_selection(rows, self.n_samples)
        layers = self.layers if layers is None else list(layers)
        groups = [self._group(layer) for layer in layers]
        self._file.flush()
        if count:
            for group in groups:
                self._writer(group, "complete")[selection] = 1
        self._file.flush()

    def _writer(self, group: "h5py.Group", name: str) -> "h5py.Dataset":
        """The dataset, opened with a chunk cache of two bands of chunks (appends stay in memory)."""
        key = (group.name, name)
        dataset = self._writers.get(key)
        if dataset is None:
            h5py = _h5py()
            plain = group[name]
            band = (plain.chunks[0] if plain.chunks else 1) * int(np.prod(plain.shape[1:], dtype=np.int64))
            nbytes = int(min(_MAX_WRITE_CACHE_BYTES, max(1 << 20, 2 * band * plain.dtype.itemsize)))
            # close it first: HDF5 shares one chunk cache among the open handles of a dataset, sized by the
            # first open, so reopening while `plain` is alive would silently keep the small file default
            del plain
            dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
            dapl.set_chunk_cache(10007, nbytes, 0.75)
            dataset = h5py.Dataset(h5py.h5d.open(group.id, name.encode(), dapl=dapl))
            self._writers[key] = dataset
        return dataset

    def complete(self, layer: str | None = None) -> np.ndarray:
        """Bool [N]: rows whose data are on disk, for one layer or (default) for all layers."""
        self._need_init()
        layers = self.layers if layer is None else [layer]
        mask = np.ones(self.n_samples, dtype=bool) if layers else np.zeros(self.n_samples, dtype=bool)
        for name in layers:
            mask &= self._group(name)["complete"][()].astype(bool)
        return mask

    def missing_ranges(self, layer: str | None = None) -> list[tuple[int, int]]:
        """Ranges ``[start, end)`` of *dataset* sample indices whose rows are not complete."""
        return _ranges(~self.complete(layer), offset=self.sample_range[0])

    def is_complete(self, layer: str | None = None) -> bool:
        """Whether every row (of one layer, or of all layers) is complete."""
        return bool(self.complete(layer).all()) and (layer is not None or bool(self.layers))

    def require_complete(self, layer: str | None = None) -> None:
        """Raise ValueError naming the missing sample ranges if some rows are not complete."""
        self._need_init()
        missing = self.missing_ranges(layer)
        if missing:
            shown = ", ".join(f"[{a}, {b})" for a, b in missing[:5]) + (" ..." if len(missing) > 5 else "")
            n_missing = sum(b - a for a, b in missing)
            what = f"layer {layer!r}" if layer is not None else "the layers"
            raise ValueError(
                f"cache {str(self.path)!r}: {n_missing} of {self.n_samples} rows of {what} are incomplete "
                f"(dataset samples {shown}); finish the recording first (run only these ranges, or resume)"
            )

    # -- reading ---------------------------------------------------------------------------------------------

    def dataset(self, layer: str, source: str = "activation") -> "h5py.Dataset":
        """The underlying h5py dataset [N, C] of a layer, for streaming (``ds[:, a:b]`` reads columns).

        Parameters
        ----------
        layer : str
        source : {"activation", "relevance"}
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        group = self._group(layer)
        name = _DATASET_NAMES[source]
        if name not in group:
            raise KeyError(
                f"layer {layer!r} of cache {str(self.path)!r} has no {name} (recorded without them)"
            )
        return group[name]

    def activations(self, layer: str, columns=None) -> torch.Tensor:
        """Pooled activations [N, C] float32 (or [N, len(columns)]) of a layer as a torch tensor.

        Parameters
        ----------
        layer : str
        columns : None, slice, int, or sequence of int
            Channels to read (default: all).
        """
        return torch.from_numpy(
            np.ascontiguousarray(_read_columns(self.dataset(layer, "activation"), columns))
        )

    def relevances(self, layer: str, columns=None) -> torch.Tensor:
        """Per-concept relevances [N, C] float32 (or a column subset) of a layer as a torch tensor."""
        return torch.from_numpy(
            np.ascontiguousarray(_read_columns(self.dataset(layer, "relevance"), columns))
        )

    # -- life cycle ------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Flush buffered writes to disk."""
        if self._file.id.valid and self.mode == "a":
            self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._writers.clear()
        if self._file.id.valid:
            self._file.close()

    @property
    def closed(self) -> bool:
        return not self._file.id.valid

    def __enter__(self) -> "ActivationCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self.closed:
            return f"ActivationCache({str(self.path)!r}, closed)"
        if not self.initialized:
            return f"ActivationCache({str(self.path)!r}, empty)"
        return (
            f"ActivationCache({str(self.path)!r}, n_samples={self.n_samples}, layers={self.layers}, "
            f"complete={int(self.complete().sum())}/{self.n_samples})"
        )


# ------------------------------------------------------------------------------------------------------------
# the single-file format of the INVERT release
# ------------------------------------------------------------------------------------------------------------


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
        self._file = _open_h5(
            self.path,
            "w" if (overwrite or not exists) else "r+",
            rdcc_nbytes=_MAX_WRITE_CACHE_BYTES,
            rdcc_nslots=10007,
        )
        self._dataset = self._file.get(dataset)
        if self._dataset is not None and (self._dataset.ndim != 2 or self._dataset.maxshape[0] is not None):
            self._file.close()
            raise ValueError(
                f"{str(self.path)!r}: existing dataset {dataset!r} is not an appendable [N, D] dataset "
                f"(shape {self._dataset.shape}, maxshape {self._dataset.maxshape})"
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
        """Append a batch [B, ...] (torch or numpy), flattened to [B, D] float32, and flush."""
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
        """Close the file (idempotent)."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "FlatActivationWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------------
# labeling from files
# ------------------------------------------------------------------------------------------------------------


def _distributed():
    """:mod:`crp_invert.distributed` when a torch.distributed group with several ranks is running, else None.

    Under ``torchrun`` labeling is then split across the ranks (every rank must call the function).
    """
    try:
        from . import distributed
    except ImportError:  # pragma: no cover - the module is optional for this file
        return None
    return distributed if distributed.is_distributed() else None


def _labeler_n_samples(labeler: "ConceptLabeler") -> int:
    concepts = getattr(labeler, "concepts", None)
    if concepts is None or not hasattr(concepts, "n_samples"):
        raise TypeError(
            f"labeler must be a ConceptLabeler (with .concepts.n_samples), got {type(labeler).__name__}"
        )
    return int(concepts.n_samples)


def label_cache(
    labeler: "ConceptLabeler",
    cache: ActivationCache | str | os.PathLike,
    layers: str | Sequence[str] | None = None,
    source: str = "activation",
    progress: bool = True,
    **label_kwargs: Any,
) -> dict[str, "LayerLabels"]:
    """Label the channels of cached layers, streaming column batches from HDF5.

    Parameters
    ----------
    labeler : ConceptLabeler
        Holds the concept labels; their N must equal the cache's.
    cache : ActivationCache, str or os.PathLike
        The cache (a path is opened read-only and closed afterwards).
    layers : str or sequence of str, optional
        Layers to label (default: all, in cache order).
    source : {"activation", "relevance"}
        Label what a channel's activation detects, or what its relevance detects.
    progress : bool
        Show a tqdm bar over layers (and let the labeler show one over feature batches).
    **label_kwargs
        Passed to :meth:`ConceptLabeler.label` (``L``, ``B``, ``feature_batch_size``, ...); ``layer`` is set.

    Returns
    -------
    dict of str to LayerLabels
        In the order of ``layers``.

    Raises
    ------
    KeyError
        A requested layer is not in the cache (the message lists the layers).
    ValueError
        The cache's N differs from the labeler's, or rows are incomplete.

    Notes
    -----
    When a ``torch.distributed`` process group with several ranks is initialized (``torchrun``), the
    channels of every layer are split across the ranks
    (:func:`crp_invert.distributed.label_cache_distributed`); every rank must then call this function and
    gets the same result.
    """
    from tqdm.auto import tqdm

    distributed = _distributed()
    if distributed is not None:
        return distributed.label_cache_distributed(
            labeler, cache, layers=layers, source=source, progress=progress, **label_kwargs
        )
    with open_for_labeling(labeler, cache, layers, source, label_kwargs) as (cache, names):
        results = {}
        for name in tqdm(names, desc="layers", disable=not progress or len(names) < 2):
            logger.info("labeling %s of layer %r (%d channels)", source, name, cache.n_channels(name))
            results[name] = labeler.label(
                cache.dataset(name, source), layer=name, progress=progress, **label_kwargs
            )
        return results


@contextlib.contextmanager
def open_for_labeling(
    labeler: "ConceptLabeler", cache: "ActivationCache | str | os.PathLike", layers: Any, source: str,
    label_kwargs: dict,
) -> Iterator[tuple["ActivationCache", list]]:
    """Open ``cache`` (a path or an open cache) and check it before any labeling: the source, the
    layers (KeyError listing them), N against the labeler's concepts, complete rows. Yields the
    cache and the layer names; a cache opened here is closed on exit."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if "layer" in label_kwargs:
        raise TypeError("label_cache sets layer= itself; choose layers with layers=")
    own = not isinstance(cache, ActivationCache)
    cache = ActivationCache(cache) if own else cache
    try:
        if not cache.initialized:
            raise ValueError(f"cache {str(cache.path)!r} is empty")
        names = cache.layers if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        for name in names:
            cache._group(name)  # KeyError listing the layers
        n_labels = _labeler_n_samples(labeler)
        if cache.n_samples != n_labels:
            raise ValueError(
                f"cache {str(cache.path)!r} has N={cache.n_samples} rows (samples {cache.sample_range}) but "
                f"the labeler's concepts have N={n_labels} samples; they must describe the same samples "
                "in the same order"
            )
        for name in names:
            cache.require_complete(name)
            cache.dataset(name, source)  # KeyError if relevances were not recorded
        yield cache, names
    finally:
        if own:
            cache.close()


def label_h5(
    labeler: "ConceptLabeler",
    path: str | os.PathLike,
    dataset: str = "Y",
    progress: bool = True,
    **label_kwargs: Any,
) -> "LayerLabels":
    """Label all D columns of an [N, D] dataset in an HDF5 file (the INVERT release format) in column batches.

    Parameters
    ----------
    labeler : ConceptLabeler
    path : str or os.PathLike
    dataset : str
        Name of the [N, D] dataset (``"Y"``).
    progress : bool
    **label_kwargs
        Passed to :meth:`ConceptLabeler.label`; ``layer`` defaults to ``dataset``.

    Returns
    -------
    LayerLabels
    """
    distributed = _distributed()
    if distributed is not None:
        return distributed.label_h5_distributed(
            labeler, path, dataset=dataset, progress=progress, **label_kwargs
        )
    label_kwargs.setdefault("layer", dataset)
    with open_flat_dataset(path, dataset, _labeler_n_samples(labeler)) as data:
        return labeler.label(data, progress=progress, **label_kwargs)


@contextlib.contextmanager
def open_flat_dataset(path: str | os.PathLike, dataset: str, n_samples: int) -> Iterator["h5py.Dataset"]:
    """Open the ``[N, D]`` dataset of an INVERT-format HDF5 file for column reads, checking that it
    exists, is 2-D and has ``n_samples`` rows; the file closes on exit."""
    with _open_h5(path, "r", rdcc_nbytes=_FILE_CACHE_BYTES, rdcc_nslots=10007) as file:
        h5py = _h5py()
        if dataset not in file or not isinstance(file[dataset], h5py.Dataset):
            found = [k for k, v in file.items() if isinstance(v, h5py.Dataset)]
            raise KeyError(f"{str(path)!r} has no dataset {dataset!r}; datasets at the root: {found}")
        data = file[dataset]
        if data.ndim != 2:
            raise ValueError(f"{str(path)!r}: dataset {dataset!r} must be 2-D [N, D], got shape {data.shape}")
        if data.shape[0] != n_samples:
            raise ValueError(
                f"{str(path)!r}: dataset {dataset!r} has N={data.shape[0]} rows but the labeler's "
                f"concepts have N={n_samples} samples"
            )
        yield data
