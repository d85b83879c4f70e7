"""HDF5 storage of per-sample, per-concept activations and relevances, (the activation cache).

Two formats of ours:

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

Crash safety (a kill anywhere, inside HDF5's own writes included, loses no layer and no row that was
complete): HDF5 changes its metadata (object headers, B-trees, heaps, the superblock) in several writes when
a group or dataset is created and the file flushed, so a process killed in between can leave a file HDF5 no
longer opens, and with it every layer recorded before. Hence HDF5 metadata never changes in a file that is
in place at ``FILE``:

* A new cache is built under a temporary name (``FILE.partial``) and renamed into place once its root and
  first layers are on disk (at the first row written, flush or close).
* A layer added to a cache in place is added to a copy (copy-on-write): the file is flushed, copied to
  ``FILE.partial`` (with its permissions), the layer created there, and the copy renamed over ``FILE`` with
  the next rows written (or at flush / close). Layers added in one session share one copy. A kill before
  the rename leaves ``FILE`` as it was (the stale copy is removed by the next writer); the rename itself is
  atomic. The price is one copy of the file per session that adds layers (disk space and time of a copy).
* Datasets have a fixed shape and are allocated when the layer is created (the space is reserved first: a
  full disk or a file-size limit refuses the layer before any metadata changes), so writing rows into a file
  in place writes only raw data and never HDF5 metadata.
* Rows are marked in ``complete`` only after their data were flushed, and a layer enters the root's
  ``layer_index`` last (a layer group the index does not name was interrupted and is ignored).

So a process stopped at any point (exception, Ctrl-C, ``kill -9``) leaves a file that opens, holds every
layer that had complete rows, and whose ``complete`` rows are trustworthy; the rest is recorded again by a
resumed run. ``benchmarks/fault_injection.py`` kills writers at random points and checks exactly this (see
BENCHMARKS.md). Other designs were weighed: a file per layer behind an index file keeps no single file a user
can open with h5py (and breaks the virtual datasets of sharded caches); HDF5's SWMR mode protects appends,
not the creation of new datasets. Files of the earlier single-file writers have the same layout and are read
and continued as they are. A file whose root was never finished (by an older version) and that has no
complete row is re-created.

Concurrency: a writer holds ``FILE.lock`` (see :mod:`crp_invert.storage.lock`); a second writer, or a reader
while a writer is at work, gets :class:`~crp_invert.storage.lock.FileInUseError` ("in use by another
process"), never a report of a damaged file.

Everything read back is checked before use: root attributes (integers, a consistent sample range, a layer
index naming existing groups) and each layer's datasets (shapes, dtypes) against its attributes.

Chunking: chunks are blocks of ``rows x columns`` (about 1 MiB, see :func:`chunk_shape`), so that
appending a batch of rows touches one band of chunks, and reading a batch of columns (as the labeler
does) reads whole chunks sequentially without loading the layer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.checks import check_name, is_int
from .h5 import (
    FILE_CACHE_BYTES,
    MAX_WRITE_CACHE_BYTES,
    chunk_shape,
    first_nonfinite,
    h5py_module,
    open_h5,
    read_columns,
    row_selection,
    true_ranges,
)
from .lock import FileLock

if TYPE_CHECKING:  # pragma: no cover
    import h5py

__all__ = ["ActivationCache", "open_for_labeling", "write_root", "create_layer", "layer_meta", "FORMAT",
           "FORMAT_VERSION", "SOURCES", "check_root", "is_activation_cache"]

logger = logging.getLogger(__name__)

FORMAT = "crp-invert-activation-cache"
FORMAT_VERSION = 1
SOURCES = ("activation", "relevance")
_DATASET_NAMES = {"activation": "activations", "relevance": "relevances"}

# HDF5 chunk cache per dataset. Datasets written by the cache get one sized to two bands of chunks
# (see ActivationCache._writer); the file-level default stays small so that many layers do not add up.


# ------------------------------------------------------------------------------------------------------------
# the layout: the one place that writes it (ActivationCache and the shard index use these)
# ------------------------------------------------------------------------------------------------------------

DatasetMaker = Callable[["h5py.Group", str, tuple, str, float], None]


def write_root(file: h5py.File, start: int, end: int, dataset_length: int, **extra: Any) -> None:
    """Write the root attributes of a cache holding samples ``[start, end)`` of ``dataset_length``."""
    attrs = file.attrs
    attrs["format"] = FORMAT
    attrs["format_version"] = FORMAT_VERSION
    attrs["n_samples"] = end - start
    attrs["sample_start"] = start
    attrs["sample_end"] = end
    attrs["dataset_length"] = dataset_length
    attrs["layer_index"] = "{}"
    for key, value in extra.items():
        attrs[key] = value
    file.require_group("layers")


def create_layer(file: h5py.File, layer: str, n_channels: int, relevances: bool, meta: dict[str, Any],
                 make_dataset: DatasetMaker) -> None:
    """Add layer ``layer`` to a cache whose root is written: a numbered group with its attributes and the
    datasets ``activations``, ``relevances`` (if recorded) and ``complete``, each made by ``make_dataset(group,
    name, shape, dtype, fill)`` (allocated datasets when recording, virtual ones for an index of shards)."""
    n_rows = int(file.attrs["n_samples"])
    layers = file["layers"]
    key = str(len(layers))
    while key in layers:
        key = str(int(key) + 1)
    group = layers.create_group(key)
    for name in ["activations"] + (["relevances"] if relevances else []):
        make_dataset(group, name, (n_rows, n_channels), "f4", np.nan)
    make_dataset(group, "complete", (n_rows,), "u1", 0)
    attrs = {
        "name": layer,
        "n_samples": n_rows,
        "n_channels": n_channels,
        "sample_start": int(file.attrs["sample_start"]),
        "sample_end": int(file.attrs["sample_end"]),
        "dataset_length": int(file.attrs["dataset_length"]),
        "format_version": FORMAT_VERSION,
    }
    attrs.update({k: v for k, v in meta.items() if v is not None})
    for attr_key, value in attrs.items():
        group.attrs[attr_key] = value
    index = json.loads(file.attrs["layer_index"])
    index[layer] = key
    file.attrs["layer_index"] = json.dumps(index)


def layer_meta(info: dict[str, Any]) -> dict[str, Any]:
    """The attributes of a layer (``ActivationCache.info``) that describe how it was recorded, without
    those the layout derives (rows, channels, sample range, chunks)."""
    derived = {"name", "n_samples", "n_channels", "sample_start", "sample_end", "dataset_length",
               "format_version", "chunks", "relevances"}
    return {key: value for key, value in info.items() if key not in derived}


def _int_attr(attrs: Any, key: str) -> int:
    value = attrs[key]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"attribute {key!r} must be an integer, got {type(value).__name__} {value!r:.60}")
    return int(value)


def _str_attr(attrs: Any, key: str) -> str:
    value = attrs[key]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise ValueError(f"attribute {key!r} must be a string, got {type(value).__name__}")
    return value


def check_root(file: h5py.File) -> dict[str, Any]:
    """The checked root of a cache: ``n_samples``, ``sample_start``, ``sample_end``, ``dataset_length`` as
    ints and ``index`` (layer name -> group key), or ValueError naming what is wrong (a damaged cache).

    Checked: the format and its version, integer attributes with ``0 <= start < end <= dataset_length`` and
    ``n_samples = end - start``, a ``layers`` group, and a layer index that is a JSON object of names to
    groups that exist.
    """
    h5py = h5py_module()
    try:
        attrs = file.attrs
        version = _int_attr(attrs, "format_version") if "format_version" in attrs else -1
        if version > FORMAT_VERSION:
            raise ValueError(f"it has cache format version {version}, this code reads <= {FORMAT_VERSION}")
        for key in ("n_samples", "sample_start", "sample_end", "dataset_length", "layer_index"):
            if key not in attrs:
                raise ValueError(f"it is missing the root attribute {key!r}")
        root = {key: _int_attr(attrs, key) for key in ("n_samples", "sample_start", "sample_end", "dataset_length")}
        start, end, length = root["sample_start"], root["sample_end"], root["dataset_length"]
        if not 0 <= start < end <= length or root["n_samples"] != end - start:
            raise ValueError(
                f"its sample range is inconsistent (n_samples={root['n_samples']}, [{start}, {end}) of "
                f"{length})"
            )
        text = _str_attr(attrs, "layer_index")
        try:
            index = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError("its layer index is not JSON") from None
        if not isinstance(index, dict) or not all(
            isinstance(name, str) and name and isinstance(key, str) for name, key in index.items()
        ):
            raise ValueError("its layer index is not an object of layer names to group keys")
        layers = file.get("layers")
        if not isinstance(layers, h5py.Group):
            raise ValueError("it has no 'layers' group")
        for name, key in index.items():
            if "/" in key or key in (".", "..") or not isinstance(layers.get(key), h5py.Group):
                raise ValueError(f"the group {key!r} of layer {name!r} is missing")
    except (KeyError, TypeError, OSError, RuntimeError, UnicodeDecodeError) as error:
        raise ValueError(f"its root attributes cannot be read ({type(error).__name__}: {error})") from None
    root["index"] = index
    return root


def _has_complete_rows(file: h5py.File) -> bool:
    """Whether any layer group of ``file`` marks a row complete (unreadable groups count as yes)."""
    h5py = h5py_module()
    layers = file.get("layers")
    if not isinstance(layers, h5py.Group):
        return False
    for key in layers:
        try:
            complete = layers[key]["complete"]
            if any(complete[a:a + (1 << 20)].any() for a in range(0, complete.shape[0], 1 << 20)):
                return True
        except (KeyError, TypeError, OSError, ValueError, RuntimeError):
            return True
    return False


def _format_of(file: h5py.File) -> str | None:
    """The ``format`` root attribute as a str, or None (missing, unreadable or not a string)."""
    try:
        return _str_attr(file.attrs, "format") if "format" in file.attrs else None
    except (ValueError, KeyError, TypeError, OSError, RuntimeError, UnicodeDecodeError):
        return None


def is_activation_cache(path: str | os.PathLike) -> bool:
    """Whether the HDF5 file at ``path`` says it is an activation cache (False for other HDF5 files; the
    errors of :func:`open_h5` for missing, locked or damaged files)."""
    with open_h5(path, "r") as file:
        return _format_of(file) == FORMAT


def _checked_layer_arguments(layer: Any, n_channels: Any, meta: dict[str, Any]) -> int:
    """Check the arguments of :meth:`ActivationCache.add_layer`; returns ``n_channels`` as an int."""
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be a non-empty str, got {layer!r}")
    check_name(layer, "a layer name")
    if not is_int(n_channels):
        raise TypeError(f"layer {layer!r}: n_channels must be an int, got {n_channels!r}")
    if int(n_channels) < 1:
        raise ValueError(f"layer {layer!r}: n_channels must be >= 1, got {int(n_channels)}")
    for key, value in meta.items():
        if isinstance(value, str):
            if "\0" in value:
                raise ValueError(f"layer {layer!r}: attribute {key!r} contains a NUL character")
        elif value is not None and not isinstance(value, (int, float, bool, np.generic)):
            raise TypeError(f"layer {layer!r}: attribute {key!r} must be a str or a number, got {value!r:.80}")
    return int(n_channels)


def _layer_bytes(n_rows: int, n_channels: int, relevances: bool, chunks: tuple[int, int]) -> int:
    """Bytes a new layer takes in the file (its data, chunk index and attributes, with a margin)."""
    n_chunks = -(-n_rows // chunks[0]) * -(-n_channels // chunks[1])
    data_bytes = n_rows * n_channels * 4 * (2 if relevances else 1) + n_rows
    return data_bytes + 64 * n_chunks * 2 + (256 << 10) + data_bytes // 100


def _allocated_datasets(chunks: tuple[int, int]) -> DatasetMaker:
    """A dataset maker for :func:`create_layer` whose datasets are allocated at creation: writing rows later
    never changes HDF5 metadata (crash safety)."""

    def allocated(group: h5py.Group, name: str, shape: tuple, dtype: str, fill: float) -> None:
        h5py = h5py_module()
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks if len(shape) == 2 else None,
                             fillvalue=fill, dcpl=dcpl)

    return allocated


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class ActivationCache:
    """Per-sample pooled activations (and relevances) of the concepts of several layers, in one HDF5 file.

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 file.
    mode : {"r", "a"}
        ``"r"`` opens an existing cache read-only. ``"a"`` opens it for recording, creating the file if it
        does not exist (its size is set by :meth:`initialize`). A new file is built as ``PATH.partial`` and
        appears at ``path`` with the first rows written (or at :meth:`flush` / :meth:`close`). A writer holds
        ``PATH.lock`` until it closes.
    overwrite : bool
        With ``mode="a"``: replace an existing file instead of continuing it (the old file stays until the new
        one is renamed over it). Without it an existing file is never overwritten.

    Raises
    ------
    FileInUseError
        Another process writes the file (or, for ``mode="a"``, reads it).
    ValueError
        Not an activation cache, or a damaged one (the message says what is wrong).

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
        self._checked_values: set[tuple[str, str]] = set()
        self._pending: Path | None = None  # the temporary file of a cache not yet renamed into place
        self._copied = False  # whether _pending is a copy of the file in place (copy-on-write), not a new cache
        self._file = None
        if mode == "r" and not self.path.exists():
            raise FileNotFoundError(f"no such file: {str(self.path)!r}")
        self._lock = FileLock(self.path, exclusive=mode == "a")
        try:
            if mode == "a":
                self._open_for_writing(overwrite)
            else:
                self._file = open_h5(self.path, "r", rdcc_nbytes=FILE_CACHE_BYTES, rdcc_nslots=10007)
                if len(self._file.attrs) or len(self._file):
                    self._check_format()
        except BaseException:
            if self._file is not None and self._file.id.valid:
                self._file.close()
            self._lock.release()
            raise

    def _open_for_writing(self, overwrite: bool) -> None:
        """Open an existing cache to continue it, or start a new one under a temporary name."""
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not overwrite:
            self._file = open_h5(self.path, "r+", rdcc_nbytes=FILE_CACHE_BYTES, rdcc_nslots=10007)
            if not len(self._file.attrs) and not len(self._file):
                logger.info("%s is an empty HDF5 file; creating the cache anew", self.path)
            elif _format_of(self._file) == FORMAT and "layer_index" not in self._file.attrs \
                    and not _has_complete_rows(self._file):
                logger.warning("%s was interrupted while being created (no complete row); creating it anew",
                               self.path)
            else:
                self._check_format()
                # a copy left by a kill before it was renamed into place (we hold the lock: it is ours)
                self.path.with_name(self.path.name + ".partial").unlink(missing_ok=True)
                return
            self._file.close()
        # a new cache: built as FILE.partial (ours while we hold the lock), renamed into place by _commit
        self._pending = self.path.with_name(self.path.name + ".partial")
        self._file = open_h5(self._pending, "w", rdcc_nbytes=FILE_CACHE_BYTES, rdcc_nslots=10007)

    def _commit(self) -> None:
        """Rename a new cache into place once its root (and the layers added so far) are on disk."""
        if self._pending is None:
            return
        self._file.flush()
        descriptor = os.open(self._pending, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(self._pending, self.path)
        self._pending, self._copied = None, False

    def _abandon(self) -> None:
        """After a failed change of a new cache or of a copy: drop the temporary file (nothing at ``path``
        changed). A new cache is closed; a cache in place is open again as it was."""
        pending, self._pending = self._pending, None
        copied, self._copied = self._copied, False
        self._writers.clear()
        self._groups.clear()
        self._index_memo = None
        try:
            if self._file is not None and self._file.id.valid:
                self._file.close()
        except Exception:  # the failure (a full disk) may repeat while closing; the file is dropped anyway
            pass
        with contextlib.suppress(OSError):
            os.unlink(pending)
        if copied:
            self._file = open_h5(self.path, "r+", rdcc_nbytes=FILE_CACHE_BYTES, rdcc_nslots=10007)
        else:
            self._lock.release()

    @contextlib.contextmanager
    def _changing(self, what: str) -> Iterator[None]:
        """Run HDF5 changes; on failure a new cache is abandoned, and the error says what failed."""
        try:
            yield
        except BaseException as error:
            if self._pending is not None:
                self._abandon()
                if isinstance(error, (OSError, ValueError, RuntimeError)) and not isinstance(error, FileExistsError):
                    raise OSError(
                        getattr(error, "errno", None) or errno.EIO,
                        f"cannot {what} in {str(self.path)!r} ({_one_line(error)}); nothing was written, run "
                        "again when the problem (e.g. a full disk) is solved",
                    ) from error
            raise

    # -- file-level ------------------------------------------------------------------------------------------

    def _check_format(self) -> None:
        if _format_of(self._file) != FORMAT:
            raise ValueError(
                f"{str(self.path)!r} is an HDF5 file but not a crp-invert activation cache (no format "
                f"attribute {FORMAT!r}; objects at the root: {sorted(self._file.keys())[:10]}); for a single "
                "dataset such as "
                "'Y' of the INVERT release use label_h5"
            )
        try:
            root = check_root(self._file)
        except ValueError as error:
            raise ValueError(f"{str(self.path)!r} is a damaged activation cache: {error}") from None
        self._root = {key: root[key] for key in ("n_samples", "sample_start", "sample_end", "dataset_length")}
        self._index_memo = root["index"]

    @property
    def initialized(self) -> bool:
        """Whether the file already holds a cache (rows and sample range are fixed)."""
        return self._root_attrs() is not None

    def _root_attrs(self) -> dict[str, Any] | None:
        # root attributes are written once (initialize) and checked when read
        if self._root is None and _format_of(self._file) == FORMAT:
            self._check_format()
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
        with self._changing("initialize the cache"):
            write_root(self._file, start, end, dataset_length)
            self._file.flush()

    def _writable(self) -> None:
        if self.mode != "a":
            raise ValueError(f"cache {str(self.path)!r} is open read-only; open it with mode='a' to record")
        if self.closed:
            raise ValueError(f"cache {str(self.path)!r} is closed")

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
            self._index_memo = check_root(self._file)["index"] if self.initialized else {}
        return dict(self._index_memo)

    @property
    def layers(self) -> list[str]:
        """Layer names, in the order they were added."""
        return list(self._index())

    def __contains__(self, layer: str) -> bool:
        return layer in self._index()

    def group_path(self, layer: str) -> str:
        """The HDF5 path of a layer's group (e.g. ``/layers/3``); KeyError listing the layers if unknown."""
        return self._group(layer).name

    def _group(self, layer: str) -> h5py.Group:
        index = self._index()
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a str, got {type(layer).__name__}")
        if layer not in index:
            raise KeyError(f"layer {layer!r} is not in cache {str(self.path)!r}; layers: {list(index)}")
        group = self._groups.get(layer)
        if group is None:
            group = self._file["layers"][index[layer]]
            try:
                self._check_group(layer, group)
            except (KeyError, TypeError, OSError, RuntimeError, UnicodeDecodeError) as error:
                raise ValueError(
                    f"cache {str(self.path)!r} is damaged: layer {layer!r} cannot be read ({_one_line(error)})"
                ) from None
            self._groups[layer] = group
        return group

    def _check_group(self, layer: str, group: h5py.Group) -> None:
        """Check a layer's attributes and datasets against the root before any of them is read."""
        h5py = h5py_module()
        damaged = f"cache {str(self.path)!r} is damaged: layer {layer!r}"
        name = _str_attr(group.attrs, "name") if "name" in group.attrs else None
        if name != layer:
            raise ValueError(f"{damaged}: its group is named {name!r}")
        n_rows = self.n_samples
        n_channels = _int_attr(group.attrs, "n_channels")
        if n_channels < 1:
            raise ValueError(f"{damaged}: n_channels is {n_channels}")
        for dataset, shape, kinds in (("activations", (n_rows, n_channels), "f"),
                                      ("relevances", (n_rows, n_channels), "f"),
                                      ("complete", (n_rows,), "biu")):
            item = group.get(dataset)
            if item is None and dataset == "relevances":
                continue
            if not isinstance(item, h5py.Dataset):
                raise ValueError(f"{damaged}: it has no {dataset} dataset")
            if item.shape != shape or item.dtype.kind not in kinds:
                raise ValueError(
                    f"{damaged}: {dataset} has shape {item.shape} and dtype {item.dtype}, expected {shape} "
                    f"({'float' if kinds == 'f' else 'integer'})"
                )

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

        Notes
        -----
        A layer added to a cache that is already in place is added to a copy of the file, renamed over it with
        the next rows written (or at :meth:`flush` / :meth:`close`): see the module's "Crash safety".
        """
        self._writable()
        self._need_init()
        n_channels = _checked_layer_arguments(layer, n_channels, meta)
        if layer in self._index():
            self._check_same_layer(layer, n_channels, relevances, meta)
            return
        chunks = self._layer_chunks(layer, n_channels, chunks)
        self._copy_on_write()
        self._reserve(_layer_bytes(self.n_samples, n_channels, relevances, chunks), f"add layer {layer!r}")
        with self._changing(f"add layer {layer!r}"):
            create_layer(self._file, layer, n_channels, relevances, meta, _allocated_datasets(chunks))
            self._index_memo = None
            self._file.flush()
            self._trim()

    def _check_same_layer(self, layer: str, n_channels: int, relevances: bool, meta: dict[str, Any]) -> None:
        """ValueError naming every difference between an existing layer and the one asked for."""
        group = self._group(layer)
        diffs = []
        if int(group.attrs["n_channels"]) != n_channels:
            diffs.append(f"n_channels: stored {int(group.attrs['n_channels'])}, now {n_channels}")
        if relevances and "relevances" not in group:
            diffs.append("relevances: stored without, now with")
        for key, value in meta.items():
            stored = group.attrs.get(key)
            stored = stored.item() if isinstance(stored, np.generic) else stored
            try:
                same = bool(stored == value)
            except (ValueError, TypeError):  # an array stored where a scalar is given
                same = False
            if not same:
                diffs.append(f"{key}: stored {stored!r:.80}, now {value!r:.80}")
        if diffs:
            raise ValueError(
                f"cache {str(self.path)!r} layer {layer!r} was recorded differently; refusing to mix results "
                "(use another file or overwrite=True): " + "; ".join(diffs)
            )

    def _layer_chunks(self, layer: str, n_channels: int, chunks: tuple[int, int] | None) -> tuple[int, int]:
        """The chunk shape of a new layer: the given one, checked, or :func:`chunk_shape`."""
        n_rows = self.n_samples
        chunks = chunk_shape(n_rows, n_channels) if chunks is None else tuple(int(c) for c in chunks)
        if len(chunks) != 2 or not all(0 < c <= size for c, size in zip(chunks, (n_rows, n_channels))):
            raise ValueError(f"layer {layer!r}: chunks must be 2 sizes within {(n_rows, n_channels)}, got {chunks}")
        return chunks

    def _copy_on_write(self) -> None:
        """Before HDF5 metadata of a cache in place changes: continue on a copy (``PATH.partial``), renamed over
        the file by :meth:`_commit`, so that a kill inside HDF5's writes leaves the file as it was."""
        if self._pending is not None:
            return
        self._file.flush()
        self._writers.clear()
        self._groups.clear()
        self._file.close()
        pending = self.path.with_name(self.path.name + ".partial")
        try:
            shutil.copyfile(self.path, pending)
            shutil.copymode(self.path, pending)
            self._file = open_h5(pending, "r+", rdcc_nbytes=FILE_CACHE_BYTES, rdcc_nslots=10007)
        except BaseException as error:
            with contextlib.suppress(OSError):
                os.unlink(pending)
            self._file = open_h5(self.path, "r+", rdcc_nbytes=FILE_CACHE_BYTES, rdcc_nslots=10007)
            if isinstance(error, OSError):
                raise OSError(error.errno, f"cannot copy {str(self.path)!r} to add a layer ({error.strerror}); "
                              "nothing was changed: free space and run again") from None
            raise
        self._pending, self._copied = pending, True

    def _trim(self) -> None:
        """Cut the space :meth:`_reserve` set aside and HDF5 did not use (after a flush)."""
        target = self._pending if self._pending is not None else self.path
        used = int(self._file.id.get_filesize())
        if os.stat(target).st_size > used:
            os.truncate(target, used)

    def _reserve(self, n_bytes: int, what: str) -> None:
        """Allocate ``n_bytes`` at the end of the file before HDF5 writes there: a full disk or a file-size
        limit (``RLIMIT_FSIZE``) then refuses the change before any HDF5 metadata changed."""
        target = self._pending if self._pending is not None else self.path
        descriptor = os.open(target, os.O_RDWR | os.O_CLOEXEC)
        try:
            # from HDF5's end of the file, where it allocates; _trim gives back what it did not use
            os.posix_fallocate(descriptor, int(self._file.id.get_filesize()), int(n_bytes))
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return  # a file system that cannot reserve space: HDF5 finds out while writing
            if self._pending is not None:
                os.close(descriptor)
                descriptor = -1
                self._abandon()
            raise OSError(
                error.errno,
                f"not enough space to {what} in {str(self.path)!r} ({n_bytes} bytes: {error.strerror}); nothing "
                "was changed: free space (or raise the file-size limit) and run again",
            ) from None
        finally:
            if descriptor >= 0:
                os.close(descriptor)

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
        selection, count = row_selection(rows, self.n_samples)
        self._commit()
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
        selection, count = row_selection(rows, self.n_samples)
        layers = self.layers if layers is None else list(layers)
        groups = [self._group(layer) for layer in layers]
        self._commit()
        self._file.flush()
        if count:
            for group in groups:
                self._writer(group, "complete")[selection] = 1
        self._file.flush()

    def _writer(self, group: h5py.Group, name: str) -> h5py.Dataset:
        """The dataset, opened with a chunk cache of two bands of chunks (appends stay in memory)."""
        key = (group.name, name)
        dataset = self._writers.get(key)
        if dataset is None:
            h5py = h5py_module()
            plain = group[name]
            band = (plain.chunks[0] if plain.chunks else 1) * int(np.prod(plain.shape[1:], dtype=np.int64))
            nbytes = int(min(MAX_WRITE_CACHE_BYTES, max(1 << 20, 2 * band * plain.dtype.itemsize)))
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
        return true_ranges(~self.complete(layer), offset=self.sample_range[0])

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

    def dataset(self, layer: str, source: str = "activation") -> h5py.Dataset:
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
            np.ascontiguousarray(read_columns(self.dataset(layer, "activation"), columns))
        )

    def relevances(self, layer: str, columns=None) -> torch.Tensor:
        """Per-concept relevances [N, C] float32 (or a column subset) of a layer as a torch tensor."""
        return torch.from_numpy(
            np.ascontiguousarray(read_columns(self.dataset(layer, "relevance"), columns))
        )

    def check_values(self, layer: str, source: str = "activation", progress: bool = False) -> None:
        """Refuse (ValueError naming the layer, channel and sample) NaN or infinite values in a layer's
        complete rows; read in bands of rows, once per open cache and layer.

        Parameters
        ----------
        layer : str
        source : {"activation", "relevance"}
        progress : bool
            Show a progress bar over the bands.
        """
        key = (layer, source)
        if key in self._checked_values:
            return
        found = first_nonfinite(self.dataset(layer, source), self.complete(layer), f"checking {layer}", progress)
        if found is not None:
            row, channel, kind, n_bad = found
            raise ValueError(
                f"cache {str(self.path)!r}: layer {layer!r} has {kind} in the {source}s of channel {channel} "
                f"(dataset sample {self.sample_range[0] + row}"
                + (f"; {n_bad} channels of its band of rows are affected" if n_bad > 1 else "")
                + "); labels need finite values: record this layer again"
            )
        self._checked_values.add(key)

    # -- life cycle ------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Flush buffered writes to disk (a new cache is renamed into place first)."""
        if self._file.id.valid and self.mode == "a":
            self._commit()
            self._file.flush()

    def close(self) -> None:
        """Close the file and release its lock (idempotent). A new cache is renamed into place first."""
        self._writers.clear()
        self._groups.clear()
        try:
            if self._file is not None and self._file.id.valid:
                try:
                    self._commit()
                finally:
                    self._file.close()
        finally:
            if getattr(self, "_lock", None) is not None:
                self._lock.release()

    @property
    def closed(self) -> bool:
        return self._file is None or not self._file.id.valid

    def __enter__(self) -> ActivationCache:
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



@contextlib.contextmanager
def open_for_labeling(
    cache: ActivationCache | str | os.PathLike, layers: str | Sequence[str] | None, source: str, n_samples: int,
) -> Iterator[tuple[ActivationCache, list]]:
    """Open ``cache`` (a path or an open cache) and check it before any labeling: the source, the
    layers (KeyError listing them), N against the concepts' ``n_samples``, complete rows, finite values
    (a NaN is named with its layer before any layer is labeled). Yields the cache and the layer names; a
    cache opened here is closed on exit."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    own = not isinstance(cache, ActivationCache)
    cache = ActivationCache(cache) if own else cache
    try:
        if not cache.initialized:
            raise ValueError(f"cache {str(cache.path)!r} is empty")
        names = cache.layers if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        for name in names:
            cache._group(name)  # KeyError listing the layers
        n_labels = int(n_samples)
        if cache.n_samples != n_labels:
            raise ValueError(
                f"cache {str(cache.path)!r} has N={cache.n_samples} rows (samples {cache.sample_range}) but "
                f"the labeler's concepts have N={n_labels} samples; they must describe the same samples "
                "in the same order"
            )
        for name in names:
            cache.require_complete(name)
            cache.dataset(name, source)  # KeyError if relevances were not recorded
        for name in names:
            cache.check_values(name, source)
        yield cache, names
    finally:
        if own:
            cache.close()

