"""Scale out with ``torch.distributed`` (``torchrun``): sharded recording, channel-parallel labeling.

Recording
---------
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

Labeling
--------
:func:`label_cache_distributed` splits the channels of every layer into contiguous shares, each rank reads
only its columns from HDF5 and labels them with :meth:`ConceptLabeler.label`; the parts are gathered with
``all_gather_object`` and joined (Benjamini-Hochberg is recomputed over the whole layer), so every rank gets
the same :class:`~crp_invert.labeler.LayerLabels` as a single process would compute: the search is
deterministic per feature (exact float64 rank sums), so splitting the features changes nothing.
:func:`crp_invert.cache.label_cache` (and ``crp-invert label`` under torchrun) use it automatically when a
process group with more than one rank is initialized.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .cache import ActivationCache
    from .labeler import ConceptLabeler, LayerLabels

logger = logging.getLogger(__name__)

__all__ = [
    "init_distributed",
    "distributed_session",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "local_device",
    "split_range",
    "shard_path",
    "find_shards",
    "combine_shards",
    "run_sharded",
    "ColumnSlice",
    "label_cache_distributed",
    "label_h5_distributed",
    "all_gather_labels",
]

_SHARD_RE = r"\.shard-(?P<rank>[0-9]{5})-of-(?P<world>[0-9]{5})"


# ------------------------------------------------------------------------------------------------------------
# process group
# ------------------------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is initialized."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def get_rank() -> int:
    """Rank of this process in the initialized process group, 0 without one."""
    dist = _dist()
    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes of the initialized process group, 1 without one."""
    dist = _dist()
    return int(dist.get_world_size()) if dist.is_available() and dist.is_initialized() else 1


def local_device(device: str = "cuda") -> str:
    """``"cuda:LOCAL_RANK"`` for ``device="cuda"`` under torchrun (one GPU per process), else ``device``."""
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return str(device)


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialize ``torch.distributed`` from the environment torchrun sets, if there is one.

    Parameters
    ----------
    backend : {"gloo", "nccl"}, optional
        Default: NCCL when CUDA is available (and then ``torch.cuda.set_device(LOCAL_RANK)``), else Gloo.
    timeout_s : float, optional
        Timeout of collective operations (torch's default if None).

    Returns
    -------
    bool
        True if this call initialized the process group (then call
        ``torch.distributed.destroy_process_group()`` at the end, or use :func:`distributed_session`); False
        if it was already initialized or the process was not started by torchrun (no ``WORLD_SIZE``).
    """
    import datetime

    import torch

    dist = _dist()
    if not dist.is_available():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("torch.distributed is not available in this torch build, but WORLD_SIZE > 1")
        return False
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=float(timeout_s))
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    logger.info(
        "initialized %s process group: rank %d of %d", backend, dist.get_rank(), dist.get_world_size()
    )
    return True


@contextmanager
def distributed_session(backend: str | None = None, timeout_s: float | None = None) -> Iterator[bool]:
    """Context manager: :func:`init_distributed` on entry, destroy the process group on exit if it made it.

    Yields
    ------
    bool
        Whether more than one process takes part (:func:`is_distributed`).
    """
    made = init_distributed(backend, timeout_s)
    try:
        yield is_distributed()
    finally:
        if made:
            _dist().destroy_process_group()


def _all_gather(obj: Any) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    if get_world_size() == 1:
        return [obj]
    dist = _dist()
    result: list = [None] * dist.get_world_size()
    dist.all_gather_object(result, obj)
    return result


def _broadcast(obj: Any, src: int = 0) -> Any:
    if get_world_size() == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def _barrier() -> None:
    if get_world_size() > 1:
        _dist().barrier()


# ------------------------------------------------------------------------------------------------------------
# splitting work
# ------------------------------------------------------------------------------------------------------------


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
    start, end, rank, world_size, align = (int(v) for v in (start, end, rank, world_size, align))
    if end < start:
        raise ValueError(f"end must be >= start, got [{start}, {end})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    n_blocks = -(-(end - start) // align)
    per_rank, extra = divmod(n_blocks, world_size)
    first = rank * per_rank + min(rank, extra)
    last = first + per_rank + (1 if rank < extra else 0)
    return min(end, start + first * align), min(end, start + last * align)


# ------------------------------------------------------------------------------------------------------------
# shard files
# ------------------------------------------------------------------------------------------------------------


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """File of one rank's shard: ``acts.h5`` -> ``acts.shard-00001-of-00004.h5`` (same folder)."""
    path = Path(path)
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
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


def _is_index(path: Path) -> bool:
    """Whether ``path`` is an index of shards written by :func:`combine_shards` (False for other files)."""
    from .cache import _h5py, _open_h5

    if not path.exists() or path.stat().st_size == 0 or not _h5py().is_hdf5(path):
        return False
    with _open_h5(path, "r") as file:
        return "shards" in file.attrs


def _layer_meta(cache: "ActivationCache", layer: str) -> dict[str, Any]:
    info = cache.info(layer)
    for key in (
        "name",
        "n_samples",
        "n_channels",
        "sample_start",
        "sample_end",
        "dataset_length",
        "format_version",
        "chunks",
        "relevances",
    ):
        info.pop(key, None)
    return info


def combine_shards(
    path: str | os.PathLike,
    world_size: int | None = None,
    sample_range: tuple[int, int] | None = None,
    copy: bool = False,
    overwrite: bool = False,
) -> Path:
    """Present the shards of ``path`` as one :class:`~crp_invert.cache.ActivationCache` at ``path``.

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
    from .cache import FORMAT, FORMAT_VERSION, ActivationCache, _h5py, _open_h5

    path = Path(path)
    found = find_shards(path)
    if world_size is None:
        if len(found) != 1:
            raise (FileNotFoundError if not found else ValueError)(
                f"found shards of {str(path)!r} for world sizes {sorted(found)}; pass world_size="
                if found
                else f"no shard files of {str(path)!r} (expected {shard_path(path, 0, 1).name} ...)"
            )
        world_size = next(iter(found))
    files = found.get(int(world_size), {})
    if not files:
        raise FileNotFoundError(
            f"no shard files of {str(path)!r} for world size {world_size} "
            f"(expected e.g. {shard_path(path, 0, world_size).name})"
        )
    if path.exists() and path.stat().st_size > 0 and not overwrite and not _is_index(path):
        raise ValueError(
            f"{str(path)!r} exists and is not an index of shards; pass overwrite=True to replace it"
        )

    shards = []  # (rank, file, (a, b))
    layers: dict[str, dict[str, Any]] = {}
    dataset_length = None
    for rank in sorted(files):
        with ActivationCache(files[rank]) as shard:
            if not shard.initialized:
                logger.warning("shard %s is empty; ignored", files[rank])
                continue
            if dataset_length is None:
                dataset_length = shard.dataset_length
            elif shard.dataset_length != dataset_length:
                raise ValueError(
                    f"shard {files[rank].name} has dataset_length {shard.dataset_length}, the others "
                    f"{dataset_length}"
                )
            names = shard.layers
            if not layers:
                for name in names:
                    layers[name] = {
                        "n_channels": shard.n_channels(name),
                        "meta": _layer_meta(shard, name),
                        "relevances": shard.info(name)["relevances"],
                        "chunks": shard.info(name)["chunks"],
                    }
            elif names != list(layers):
                raise ValueError(
                    f"shard {files[rank].name} has layers {names}, the first shard {list(layers)}"
                )
            for name in names:
                want = layers[name]
                if (
                    shard.n_channels(name) != want["n_channels"]
                    or shard.fingerprint(name) != want["meta"].get("fingerprint")
                    or shard.info(name)["relevances"] != want["relevances"]
                ):
                    raise ValueError(
                        f"shard {files[rank].name} layer {name!r} does not match the first shard (channels "
                        f"{shard.n_channels(name)} vs {want['n_channels']}, fingerprint "
                        f"{shard.fingerprint(name)} vs "
                        f"{want['meta'].get('fingerprint')}); it was recorded by another model or setup"
                    )
            groups = {name: shard._group(name).name for name in names}
            shards.append((rank, files[rank], shard.sample_range, groups))
    if not shards:
        raise ValueError(f"all shard files of {str(path)!r} are empty")
    shards.sort(key=lambda item: item[2])
    shard_ranges = [(rank, file, rows) for rank, file, rows, _ in shards]
    start, end = (
        (shards[0][2][0], shards[-1][2][1]) if sample_range is None else (int(v) for v in sample_range)
    )
    position = start
    for _, file, (a, b) in shard_ranges:
        if a != position:
            what = "overlap" if a < position else f"no shard holds samples [{position}, {a})"
            raise ValueError(f"shards of {str(path)!r} do not fit together: {what} (at {file.name})")
        position = b
    if position != end or shards[0][2][0] != start:
        raise ValueError(
            f"shards of {str(path)!r} cover [{shards[0][2][0]}, {position}), not the requested "
            f"[{start}, {end})"
        )
    n_rows = end - start

    if copy:
        tmp = path.with_name(path.name + ".tmp")
        with ActivationCache(tmp, mode="a", overwrite=True) as out:
            out.initialize((start, end), dataset_length=dataset_length)
            for name, want in layers.items():
                out.add_layer(
                    name,
                    want["n_channels"],
                    relevances=want["relevances"],
                    chunks=want["chunks"],
                    **want["meta"],
                )
            for _, file, (a, b) in shard_ranges:
                with ActivationCache(file) as shard:
                    for name, want in layers.items():
                        step = int(want["chunks"][0]) if want["chunks"] else 1024
                        acts = shard.dataset(name, "activation")
                        rels = shard.dataset(name, "relevance") if want["relevances"] else None
                        for row in range(0, b - a, step):
                            stop = min(row + step, b - a)
                            out.write(
                                name,
                                (a - start + row, a - start + stop),
                                acts[row:stop],
                                None if rels is None else rels[row:stop],
                            )
                        done = np.flatnonzero(shard.complete(name)) + (a - start)
                        if done.size:
                            out.mark_complete(done, [name])
        os.replace(tmp, path)
        return path

    h5py = _h5py()
    tmp = path.with_name(path.name + ".tmp")
    with _open_h5(tmp, "w") as index:
        attrs = index.attrs
        attrs["format"] = FORMAT
        attrs["format_version"] = FORMAT_VERSION
        attrs["n_samples"] = n_rows
        attrs["sample_start"] = start
        attrs["sample_end"] = end
        attrs["dataset_length"] = dataset_length
        attrs["shards"] = json.dumps(
            [{"file": file.name, "rank": rank, "sample_range": [a, b]} for rank, file, (a, b) in shard_ranges]
        )
        attrs["world_size"] = int(world_size)
        group_of = {}
        root = index.create_group("layers")
        for key, (name, want) in enumerate(layers.items()):
            group = root.create_group(str(key))
            n_channels = want["n_channels"]
            datasets = [("activations", (n_rows, n_channels), "f4", np.nan)]
            if want["relevances"]:
                datasets.append(("relevances", (n_rows, n_channels), "f4", np.nan))
            datasets.append(("complete", (n_rows,), "u1", 0))
            for dataset, shape, dtype, fill in datasets:
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                for _, file, (a, b), groups in shards:
                    source = h5py.VirtualSource(
                        file.name, f"{groups[name]}/{dataset}", shape=(b - a,) + shape[1:]
                    )
                    layout[a - start : b - start] = source
                group.create_virtual_dataset(dataset, layout, fillvalue=fill)
            meta = dict(want["meta"])
            meta.update(
                name=name,
                n_samples=n_rows,
                n_channels=n_channels,
                sample_start=start,
                sample_end=end,
                dataset_length=dataset_length,
                format_version=FORMAT_VERSION,
            )
            for attr_key, value in meta.items():
                if value is not None:
                    group.attrs[attr_key] = value
            group_of[name] = str(key)
        attrs["layer_index"] = json.dumps(group_of)
    os.replace(tmp, path)
    logger.info("wrote index %s over %d shards", path, len(shards))
    return path


# ------------------------------------------------------------------------------------------------------------
# sharded recording during CRP's FeatureVisualization.run
# ------------------------------------------------------------------------------------------------------------

_KINDS = ("r_max", "a_max", "r_stats", "a_stats")


def run_sharded(
    fv: Any,
    composite: Any,
    data_start: int = 0,
    data_end: int | None = None,
    batch_size: int = 32,
    checkpoint: int = 500,
    on_device: Any = None,
    resume: bool = True,
    copy: bool = False,
) -> dict[str, list[str]]:
    """``fv.run`` for every rank of a torchrun job: each rank records its share into its own shard.

    Call it on every rank with the same arguments. Without a process group (one process) it is
    ``fv.run`` (or ``fv.resume`` for an unfinished cache) on the cache itself.

    Parameters
    ----------
    fv : InvertFeatureVisualization
        Built on every rank with the same ``cache`` path (the combined cache; the shards go next to it) and
        the same CRP ``path`` (the folder must be shared by all ranks, also across nodes).
    composite : zennit Composite
    data_start, data_end : int
        The samples to run over (default: the whole dataset).
    batch_size, checkpoint, on_device
        As for CRP's ``run``. Every rank's share starts on a multiple of ``batch_size`` from ``data_start``.
    resume : bool
        Continue existing shards (only their missing rows are recorded, CRP checkpoints they left are kept);
        False starts over (``fv.overwrite`` also starts over).
    copy : bool
        Combine the shards by copying into one file instead of an index of virtual datasets
        (see :func:`combine_shards`).

    Returns
    -------
    dict of str to list of str
        CRP's saved files (as ``fv.run`` returns them), on every rank.
    """
    from .cache import ActivationCache

    cache = fv.activation_cache
    if isinstance(cache, ActivationCache) or not isinstance(cache, (str, os.PathLike)):
        raise TypeError(
            f"run_sharded needs fv built with cache= a path (the combined cache), got {type(cache).__name__}"
        )
    batch_size, checkpoint = int(batch_size), int(checkpoint)
    if batch_size < 1 or checkpoint < 1:
        raise ValueError(f"batch_size and checkpoint must be >= 1, got {batch_size}, {checkpoint}")
    data_end = len(fv.dataset) if data_end is None else int(data_end)
    data_start = int(data_start)
    if not 0 <= data_start < data_end <= len(fv.dataset):
        raise ValueError(
            f"need 0 <= data_start < data_end <= len(dataset) = {len(fv.dataset)}, got "
            f"[{data_start}, {data_end})"
        )
    combined = Path(cache)
    rank, world_size = get_rank(), get_world_size()
    if not resume:
        fv.overwrite = True
    _check_shard_layout(combined, world_size, bool(fv.overwrite))

    if world_size == 1:
        fv.sample_range = (data_start, data_end)
        if not fv.overwrite and combined.exists():
            return fv.resume(composite, data_start, data_end, batch_size, checkpoint, on_device)
        return fv.run(composite, data_start, data_end, batch_size, checkpoint, on_device)

    a, b = split_range(data_start, data_end, rank, world_size, align=batch_size)
    shard = shard_path(combined, rank, world_size)
    error, failure = None, None
    checkpoints: dict[str, list[str]] = {key: [] for key in _KINDS}
    try:
        if b > a:
            fv.activation_cache = shard
            fv.sample_range = (a, b)
            if not fv.overwrite and shard.exists():
                checkpoints = fv.resume(composite, a, b, batch_size, checkpoint, on_device, collect=False)
            else:
                checkpoints = fv.run_distributed(composite, a, b, batch_size, checkpoint, on_device)
    except Exception as err:  # tell the other ranks instead of leaving them waiting in the gather
        error, failure = f"rank {rank}: {type(err).__name__}: {err}", err
    finally:
        fv.activation_cache = combined
    gathered = _all_gather((error, {key: list(checkpoints.get(key, [])) for key in _KINDS}))
    if failure is not None:
        raise failure
    errors = [e for e, _ in gathered if e is not None]
    if errors:
        raise RuntimeError("sharded recording failed on other ranks: " + "; ".join(errors))

    saved, error = None, None
    if rank == 0:
        try:
            merged = {key: [p for _, part in gathered for p in part[key]] for key in _KINDS}
            missing = [
                p for key in ("r_max", "a_max") for p in merged[key] if not Path(p + "data.npy").exists()
            ]
            if missing:
                raise FileNotFoundError(
                    "rank 0 cannot see CRP checkpoint files written by other ranks (e.g. "
                    f"{missing[0]}data.npy); "
                    "CRP's path= must be on a filesystem shared by all ranks"
                )
            if any(merged[key] for key in _KINDS):
                saved = fv.collect_results(merged)
            else:
                logger.info(
                    "nothing was recorded: every shard was complete and its CRP results already collected"
                )
                saved = {key: [] for key in _KINDS}
            combine_shards(
                combined, world_size, sample_range=(data_start, data_end), copy=copy, overwrite=True
            )
        except Exception as err:
            error = f"rank 0: {type(err).__name__}: {err}"
    saved, error = _broadcast((saved, error))
    if error is not None:
        raise RuntimeError(f"combining the shards failed: {error}")
    return saved


def _check_shard_layout(combined: Path, world_size: int, overwrite: bool) -> None:
    """Refuse to mix a run with shards of another number of processes (resume needs the same split)."""
    found = {size: files for size, files in find_shards(combined).items() if size != world_size}
    if found:
        other = sorted(found)
        raise ValueError(
            f"{str(combined)!r} has shards of a run with {other} processes; resume it with the same "
            "number of "
            f"processes, or combine its shards (combine_shards(..., copy=True)) and delete them first"
        )
    if world_size == 1 and _is_index(combined):
        raise ValueError(
            f"{str(combined)!r} is an index over shards of a multi-process run; resume it with the same "
            "number of processes"
        )
    if (
        world_size > 1
        and not overwrite
        and combined.exists()
        and combined.stat().st_size
        and not _is_index(combined)
    ):
        raise ValueError(
            f"{str(combined)!r} exists and is not an index of shards (a single-process cache?); "
            "use another cache path or overwrite=True"
        )


# ------------------------------------------------------------------------------------------------------------
# channel-parallel labeling
# ------------------------------------------------------------------------------------------------------------


class ColumnSlice:
    """Columns ``[start, stop)`` of an [N, F] array-like (e.g. an h5py.Dataset), read lazily.

    Has ``.shape`` and ``x[:, a:b]`` column slicing, which is all :meth:`ConceptLabeler.label` needs; only the
    requested columns are read.
    """

    def __init__(self, data: Any, start: int, stop: int) -> None:
        n_rows, n_cols = (int(s) for s in data.shape)
        if not 0 <= int(start) <= int(stop) <= n_cols:
            raise ValueError(f"columns [{start}, {stop}) out of range for {n_cols} columns")
        self.data, self.start, self.stop = data, int(start), int(stop)
        self.shape = (n_rows, self.stop - self.start)

    def __getitem__(self, key):
        if (
            not isinstance(key, tuple)
            or len(key) != 2
            or key[0] != slice(None)
            or not isinstance(key[1], slice)
            or key[1].step not in (None, 1)
        ):
            raise TypeError(f"ColumnSlice supports x[:, a:b] only, got {key!r}")
        a, b, _ = key[1].indices(self.shape[1])
        return self.data[:, self.start + a : self.start + max(a, b)]


def all_gather_labels(part: "LayerLabels") -> "LayerLabels":
    """Join the labels of consecutive feature shares of all ranks into the layer's labels, on every rank.

    The Benjamini-Hochberg q-values are recomputed over all features (each rank saw only its share).
    """
    from .labeler import LayerLabels

    parts = [p for p in _all_gather(part) if p.n_features]
    return LayerLabels.concatenate(parts) if parts else part


def _label_share(
    labeler: "ConceptLabeler", data: Any, layer: str | None, progress: bool, label_kwargs: dict[str, Any]
) -> "LayerLabels":
    from .labeler import LayerLabels

    start, stop = split_range(0, int(data.shape[1]), get_rank(), get_world_size())
    if stop > start:
        part = labeler.label(
            ColumnSlice(data, start, stop), layer=layer, progress=progress and get_rank() == 0, **label_kwargs
        )
    else:
        part = LayerLabels([], labeler.concepts.names, layer)
    return all_gather_labels(part)


def label_cache_distributed(
    labeler: "ConceptLabeler",
    cache: "ActivationCache | str | os.PathLike",
    layers: str | Sequence[str] | None = None,
    source: str = "activation",
    progress: bool = True,
    **label_kwargs: Any,
) -> dict[str, "LayerLabels"]:
    """:func:`crp_invert.cache.label_cache` with the channels of every layer split across the ranks.

    Call it on every rank with the same arguments (it is a collective operation). Each rank reads only its
    columns; every rank returns the same, complete result, equal to the single-process one. Without a process
    group it labels everything in this process.

    Parameters
    ----------
    labeler, cache, layers, source, progress, **label_kwargs
        As for :func:`crp_invert.cache.label_cache`.

    Returns
    -------
    dict of str to LayerLabels
    """
    from .cache import open_for_labeling

    with open_for_labeling(labeler, cache, layers, source, label_kwargs) as (cache, names):
        results = {}
        for name in names:
            logger.info("rank %d labeling %s of layer %r", get_rank(), source, name)
            results[name] = _label_share(labeler, cache.dataset(name, source), name, progress, label_kwargs)
        return results


def label_h5_distributed(
    labeler: "ConceptLabeler",
    path: str | os.PathLike,
    dataset: str = "Y",
    progress: bool = True,
    **label_kwargs: Any,
) -> "LayerLabels":
    """:func:`crp_invert.cache.label_h5` with the columns split across the ranks (collective, see above)."""
    from .cache import _labeler_n_samples, open_flat_dataset

    layer = label_kwargs.pop("layer", dataset)
    with open_flat_dataset(path, dataset, _labeler_n_samples(labeler)) as data:
        return _label_share(labeler, data, layer, progress, label_kwargs)
