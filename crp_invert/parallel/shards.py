"""Shards: how the rows of a dataset are split across ranks, where each rank's cache file lives, and
the index that presents the shards as one :class:`~crp_invert.storage.ActivationCache`.


Under ``torchrun --nproc_per_node=P`` every rank runs :func:`run_sharded`: it records its own contiguous
share of ``[data_start, data_end)`` (boundaries on multiples of ``batch_size``, so every rank sees exactly
the batches a single process would see and the numbers are bitwise the same) into its own HDF5 *shard*
next to the requested cache file::

    acts.h5                        the index: a small ActivationCache of HDF5 virtual datasets
    acts.shard-00000-of-00002.h5   rows of rank 0 (an ActivationCache with sample_range = its share)
    acts.shard-00001-of-00002.h5   rows of rank 1

Why virtual datasets (and not a merge that copies): the index costs no time and no disk space, is written in
milliseconds by rank 0 once the ranks are done, and can be rebuilt at any time from the shards. Reading it is
ordinary h5py (``ActivationCache("acts.h5")``, ``label_cache``): a column batch reads only those columns from
every shard. The shards' ``complete`` flags are read through the index too, so a shard that is missing or
unfinished shows up as incomplete rows and labeling refuses it. Source files are referenced by name relative
to the index, so the folder can be moved as a whole. ``combine_shards(..., copy=True)`` makes one
self-contained file instead (copied shard by shard, in bands of rows) for moving a single file around.

A rank that dies loses only the unfinished rows of its own shard: launching the same command again (same
number of processes, same ``batch_size`` and ``checkpoint``) resumes every shard with the CRP-integration's
``resume`` and yields the same cache and CRP files as an uninterrupted run.

CRP's own ActMax/RelMax/statistics checkpoints are written by every rank into the common CRP folder (their
file names carry the sample range, so ranks never collide) and rank 0 combines them with CRP's own
``FeatureVisualization.collect_results``, exactly as CRP combines the checkpoints of one process. Several
nodes therefore need a shared filesystem for the cache and CRP's folder (as usual on clusters).

"""

from __future__ import annotations

import json
import logging
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..core.checks import check_int
from ..storage.cache import ActivationCache, create_layer, layer_meta, write_root
from ..storage.h5 import h5py_module, open_h5

logger = logging.getLogger(__name__)

__all__ = ["split_range", "shard_path", "find_shards", "combine_shards", "is_shard_index", "check_shard_layout"]

_SHARD_RE = r"\.shard-(?P<rank>[0-9]{5})-of-(?P<world>[0-9]{5})"


def split_range(start: int, end: int, rank: int, world_size: int, align: int = 1) -> tuple[int, int]:
    """The contiguous share ``[a, b)`` of ``[start, end)`` of one rank.

    The range is cut into blocks of ``align`` items (counted from ``start``; the last block may be shorter),
    the blocks are dealt out in order, as evenly as possible (the first ranks get one more if they do not
    divide). Shares of consecutive ranks are adjacent and cover ``[start, end)``; a rank may get an empty
    share ``(b, b)`` when there are fewer blocks than ranks.

    Parameters
    ----------
    start, end : int
        The whole range, ``start <= end``.
    rank, world_size : int
        ``0 <= rank < world_size``.
    align : int
        Share boundaries fall on ``start + k * align`` (use the batch size for recording, so that every rank
        sees the batches a single process would see).

    Returns
    -------
    (int, int)
    """
    start, end = check_int(start, "start", minimum=0), check_int(end, "end", minimum=0)
    rank, world_size = _check_rank(rank, world_size)
    align = check_int(align, "align")
    if end < start:
        raise ValueError(f"end must be >= start, got [{start}, {end})")
    n_blocks = -(-(end - start) // align)
    per_rank, extra = divmod(n_blocks, world_size)
    first = rank * per_rank + min(rank, extra)
    last = first + per_rank + (1 if rank < extra else 0)
    return min(end, start + first * align), min(end, start + last * align)


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    """``(rank, world_size)`` as ints with ``0 <= rank < world_size`` (TypeError / ValueError otherwise)."""
    rank, world_size = check_int(rank, "rank", minimum=None), check_int(world_size, "world_size")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """File of one rank's shard: ``acts.h5`` -> ``acts.shard-00001-of-00004.h5`` (same folder)."""
    path = Path(path)
    rank, world_size = _check_rank(rank, world_size)
    if world_size > 99999:
        raise ValueError(f"world_size must be < 100000, got {world_size}")
    suffix = path.suffix or ".h5"
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.shard-{rank:05d}-of-{world_size:05d}{suffix}")


def find_shards(path: str | os.PathLike) -> dict[int, dict[int, Path]]:
    """Shard files of ``path`` on disk: ``{world_size: {rank: file}}``."""
    path = Path(path)
    suffix = path.suffix or ".h5"
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    pattern = re.compile("^" + re.escape(stem) + _SHARD_RE + re.escape(suffix) + "$")
    found: dict[int, dict[int, Path]] = {}
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        return found
    for file in folder.iterdir():
        match = pattern.match(file.name)
        if match:
            found.setdefault(int(match["world"]), {})[int(match["rank"])] = file
    return found


def is_shard_index(path: Path) -> bool:
    """Whether ``path`` is an index of shards written by :func:`combine_shards` (False for other files)."""
    if not path.exists() or path.stat().st_size == 0 or not h5py_module().is_hdf5(path):
        return False
    with open_h5(path, "r") as file:
        return "shards" in file.attrs


class _Shard(NamedTuple):
    """One shard file as the index sees it."""

    rank: int
    file: Path
    rows: tuple[int, int]
    groups: dict[str, str]


class _LayerSpec(NamedTuple):
    """What every shard must agree on for one layer."""

    n_channels: int
    meta: dict[str, Any]
    relevances: bool
    chunks: Any


def combine_shards(
    path: str | os.PathLike,
    world_size: int | None = None,
    sample_range: tuple[int, int] | None = None,
    copy: bool = False,
    overwrite: bool = False,
) -> Path:
    """Present the shards of ``path`` as one :class:`~crp_invert.storage.ActivationCache` at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The combined cache (the shards are ``shard_path(path, rank, world_size)``).
    world_size : int, optional
        Number of shards (default: the only world size found on disk).
    sample_range : (int, int), optional
        The rows the combined cache must cover (default: from the first shard's start to the last one's end).
        Rows that no shard holds are refused (ValueError naming them).
    copy : bool
        False (default): write a small index file of HDF5 virtual datasets that read from the shards.
        True: copy all rows into one self-contained cache file, shard by shard.
    overwrite : bool
        Replace an existing file at ``path`` that is not an index of these shards. An existing index is
        always rebuilt.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileNotFoundError
        No shards were found.
    ValueError
        Shards of several world sizes and none chosen, or shards that do not fit together (other layers,
        channels, fingerprints, dataset length, overlapping or missing sample ranges).
    """
    path = Path(path)
    world_size, files = _shard_files(path, world_size)
    if path.exists() and path.stat().st_size > 0 and not overwrite and not is_shard_index(path):
        raise ValueError(
            f"{str(path)!r} exists and is not an index of shards; pass overwrite=True to replace it"
        )
    shards, layers, dataset_length = _read_shards(path, files)
    start, end = (shards[0].rows[0], shards[-1].rows[1]) if sample_range is None else map(int, sample_range)
    _check_coverage(path, shards, start, end)
    if copy:
        _write_copy(path, shards, layers, (start, end), dataset_length)
    else:
        _write_index(path, shards, layers, (start, end), dataset_length, int(world_size))
        logger.info("wrote index %s over %d shards", path, len(shards))
    return path


def _shard_files(path: Path, world_size: int | None) -> tuple[int, dict[int, Path]]:
    """The world size to combine and its shard files ``{rank: file}`` (refused where ambiguous or absent)."""
    found = find_shards(path)
    if world_size is None:
        if not found:
            raise FileNotFoundError(
                f"no shard files of {str(path)!r} (expected {shard_path(path, 0, 1).name} ...)")
        if len(found) != 1:
            raise ValueError(f"found shards of {str(path)!r} for world sizes {sorted(found)}; pass world_size=")
        world_size = next(iter(found))
    files = found.get(int(world_size), {})
    if not files:
        raise FileNotFoundError(
            f"no shard files of {str(path)!r} for world size {world_size} "
            f"(expected e.g. {shard_path(path, 0, world_size).name})"
        )
    return int(world_size), files


def _layer_specs(shard: ActivationCache) -> dict[str, _LayerSpec]:
    """Every layer of one shard as the other shards must repeat it."""
    return {
        name: _LayerSpec(shard.n_channels(name), layer_meta(shard.info(name)), shard.info(name)["relevances"],
                         shard.info(name)["chunks"])
        for name in shard.layers
    }


def _check_same_layers(file: Path, specs: dict[str, _LayerSpec], first: dict[str, _LayerSpec]) -> None:
    """Refuse a shard whose layers differ from the first shard's (other model or setup)."""
    if list(specs) != list(first):
        raise ValueError(f"shard {file.name} has layers {list(specs)}, the first shard {list(first)}")
    for name, want in first.items():
        got = specs[name]
        if (got.n_channels, got.meta.get("fingerprint"), got.relevances) != (
            want.n_channels, want.meta.get("fingerprint"), want.relevances
        ):
            raise ValueError(
                f"shard {file.name} layer {name!r} does not match the first shard (channels "
                f"{got.n_channels} vs {want.n_channels}, fingerprint {got.meta.get('fingerprint')} vs "
                f"{want.meta.get('fingerprint')}); it was recorded by another model or setup"
            )


def _read_shards(path: Path, files: dict[int, Path]) -> tuple[list[_Shard], dict[str, _LayerSpec], int | None]:
    """Open every shard, check that they fit together, and return them sorted by their rows."""
    shards: list[_Shard] = []
    layers: dict[str, _LayerSpec] = {}
    dataset_length = None
    for rank in sorted(files):
        with ActivationCache(files[rank]) as shard:
            if not shard.initialized:
                logger.warning("shard %s is empty; ignored", files[rank])
                continue
            if dataset_length is not None and shard.dataset_length != dataset_length:
                raise ValueError(
                    f"shard {files[rank].name} has dataset_length {shard.dataset_length}, the others "
                    f"{dataset_length}"
                )
            dataset_length = shard.dataset_length
            specs = _layer_specs(shard)
            if layers:
                _check_same_layers(files[rank], specs, layers)
            layers = layers or specs
            groups = {name: shard.group_path(name) for name in specs}
            shards.append(_Shard(rank, files[rank], tuple(shard.sample_range), groups))
    if not shards:
        raise ValueError(f"all shard files of {str(path)!r} are empty")
    shards.sort(key=lambda shard: shard.rows)
    return shards, layers, dataset_length


def _check_coverage(path: Path, shards: list[_Shard], start: int, end: int) -> None:
    """The shards' rows must tile ``[start, end)`` exactly: no overlap, no gap."""
    position = start
    for shard in shards:
        a, _ = shard.rows
        if a != position:
            what = "overlap" if a < position else f"no shard holds samples [{position}, {a})"
            raise ValueError(f"shards of {str(path)!r} do not fit together: {what} (at {shard.file.name})")
        position = shard.rows[1]
    if position != end or shards[0].rows[0] != start:
        raise ValueError(
            f"shards of {str(path)!r} cover [{shards[0].rows[0]}, {position}), not the requested "
            f"[{start}, {end})"
        )


def _write_copy(path: Path, shards: list[_Shard], layers: dict[str, _LayerSpec], rows: tuple[int, int],
                dataset_length: int | None) -> None:
    """One self-contained cache: every shard's rows copied in bands, written beside and renamed."""
    start, end = rows
    tmp = path.with_name(path.name + ".tmp")
    with ActivationCache(tmp, mode="a", overwrite=True) as out:
        out.initialize((start, end), dataset_length=dataset_length)
        for name, want in layers.items():
            out.add_layer(name, want.n_channels, relevances=want.relevances, chunks=want.chunks, **want.meta)
        for shard in shards:
            _copy_shard(out, shard, layers, start)
    os.replace(tmp, path)


def _copy_shard(out: ActivationCache, shard: _Shard, layers: dict[str, _LayerSpec], start: int) -> None:
    """Copy one shard's rows and completion flags into ``out`` (rows offset by ``start``)."""
    a, b = shard.rows
    with ActivationCache(shard.file) as source:
        for name, want in layers.items():
            step = int(want.chunks[0]) if want.chunks else 1024
            acts = source.dataset(name, "activation")
            rels = source.dataset(name, "relevance") if want.relevances else None
            for row in range(0, b - a, step):
                stop = min(row + step, b - a)
                out.write(name, (a - start + row, a - start + stop), acts[row:stop],
                          None if rels is None else rels[row:stop])
            done = np.flatnonzero(source.complete(name)) + (a - start)
            if done.size:
                out.mark_complete(done, [name])


def _write_index(path: Path, shards: list[_Shard], layers: dict[str, _LayerSpec], rows: tuple[int, int],
                 dataset_length: int | None, world_size: int) -> None:
    """The index: virtual datasets over the shards, written beside and renamed."""
    start, end = rows
    listing = [{"file": s.file.name, "rank": s.rank, "sample_range": list(s.rows)} for s in shards]
    tmp = path.with_name(path.name + ".tmp")
    with open_h5(tmp, "w") as index:
        write_root(index, start, end, dataset_length, shards=json.dumps(listing), world_size=world_size)
        for name, want in layers.items():
            create_layer(index, name, want.n_channels, want.relevances, want.meta,
                         partial(_virtual_dataset, shards=shards, layer=name, start=start))
    os.replace(tmp, path)


def _virtual_dataset(group: Any, dataset: str, shape: tuple, dtype: Any, fill: Any, *, shards: list[_Shard],
                     layer: str, start: int) -> None:
    """One dataset of the index: the shards' rows of ``layer`` mapped in order into one virtual dataset."""
    h5py = h5py_module()
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    for shard in shards:
        a, b = shard.rows
        source = h5py.VirtualSource(shard.file.name, f"{shard.groups[layer]}/{dataset}", shape=(b - a,) + shape[1:])
        layout[a - start : b - start] = source
    group.create_virtual_dataset(dataset, layout, fillvalue=fill)


def check_shard_layout(combined: Path, world_size: int, overwrite: bool) -> None:
    """Refuse to mix a run with shards of another number of processes (resume needs the same split)."""
    found = {size: files for size, files in find_shards(combined).items() if size != world_size}
    if found:
        other = sorted(found)
        raise ValueError(
            f"{str(combined)!r} has shards of a run with {other} processes; resume it with the same "
            "number of "
            f"processes, or combine its shards (combine_shards(..., copy=True)) and delete them first"
        )
    if world_size == 1 and is_shard_index(combined):
        raise ValueError(
            f"{str(combined)!r} is an index over shards of a multi-process run; resume it with the same "
            "number of processes"
        )
    if (
        world_size > 1
        and not overwrite
        and combined.exists()
        and combined.stat().st_size
        and not is_shard_index(combined)
    ):
        raise ValueError(
            f"{str(combined)!r} exists and is not an index of shards (a single-process cache?); "
            "use another cache path or overwrite=True"
        )
