"""Sharded recording under torchrun: every rank records its share of the dataset into its own shard
(with the CRP integration's recording), rank 0 collects CRP's checkpoints and writes the index.

A rank that dies loses only the unfinished rows of its own shard: launching the same command again (same
number of processes, same ``batch_size`` and ``checkpoint``) resumes every shard and yields the same cache
and CRP files as an uninterrupted run. CRP's checkpoints are written by every rank into the common CRP
folder (their file names carry the sample range, so ranks never collide); rank 0 combines them with CRP's
own ``FeatureVisualization.collect_results``. Several nodes therefore need a shared filesystem.
"""

from __future__ import annotations

import logging
import os
from copy import copy as shallow_copy
from pathlib import Path
from typing import Any, NamedTuple

from ..core.checks import check_int
from ..storage.cache import ActivationCache
from ..storage.crp_files import CRP_KINDS
from .group import all_gather, broadcast, get_rank, get_world_size
from .shards import check_shard_layout, combine_shards, shard_path, split_range

logger = logging.getLogger(__name__)

__all__ = ["run_sharded"]


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
    ``fv.run`` (or ``fv.resume`` for an existing cache) on the cache itself; in a group, every rank runs
    ``fv.run_distributed`` (or ``fv.resume_distributed``) on its shard and rank 0 collects.

    Parameters
    ----------
    fv : InvertFeatureVisualization
        Built on every rank with the same ``activation_cache`` path (the combined cache; the shards go next to
        it) and the same CRP ``path`` (the folder must be shared by all ranks, also across nodes).
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
    combined, data_start, data_end, batch_size, checkpoint = _checked_run(fv, data_start, data_end, batch_size,
                                                                          checkpoint)
    rank, world_size = get_rank(), get_world_size()
    overwrite = bool(fv.overwrite) or not resume
    check_shard_layout(combined, world_size, overwrite)
    args = (composite, batch_size, checkpoint, on_device)
    if world_size == 1:
        return _run_one(_driven(fv, combined, (data_start, data_end), overwrite), combined, data_start, data_end,
                        *args)
    a, b = split_range(data_start, data_end, rank, world_size, align=batch_size)
    shard = shard_path(combined, rank, world_size)
    error, failure, checkpoints = None, None, {key: [] for key in CRP_KINDS}
    try:
        checkpoints = _record_shard(_driven(fv, shard, (a, b), overwrite), shard, a, b, *args)
    except Exception as err:  # tell the other ranks instead of leaving them waiting in the gather
        error, failure = f"rank {rank}: {type(err).__name__}: {err}", err
    gathered = all_gather((error, checkpoints))
    if failure is not None:
        raise failure
    errors = [e for e, _ in gathered if e is not None]
    if errors:
        raise RuntimeError("sharded recording failed on other ranks: " + "; ".join(errors))
    saved, error = None, None
    if rank == 0:
        try:
            saved = _collect(fv, [part for _, part in gathered])
            combine_shards(combined, world_size, sample_range=(data_start, data_end), copy=copy, overwrite=True)
        except Exception as err:
            error = f"rank 0: {type(err).__name__}: {err}"
    saved, error = broadcast((saved, error))
    if error is not None:
        raise RuntimeError(f"combining the shards failed: {error}")
    return saved


class _Run(NamedTuple):
    """The checked arguments of :func:`run_sharded`."""

    cache: Path  # the combined cache
    data_start: int
    data_end: int
    batch_size: int
    checkpoint: int


def _checked_run(fv: Any, data_start: int, data_end: int | None, batch_size: int, checkpoint: int) -> _Run:
    """The combined cache path, the sample range and the batch sizes, checked (TypeError / ValueError naming
    bad values)."""
    cache = fv.activation_cache
    if isinstance(cache, ActivationCache) or not isinstance(cache, (str, os.PathLike)):
        raise TypeError(
            f"run_sharded needs fv built with activation_cache= a path (the combined cache), got "
            f"{type(cache).__name__}"
        )
    batch_size, checkpoint = check_int(batch_size, "batch_size"), check_int(checkpoint, "checkpoint")
    data_end = len(fv.dataset) if data_end is None else check_int(data_end, "data_end", minimum=None)
    data_start = check_int(data_start, "data_start", minimum=None)
    if not 0 <= data_start < data_end <= len(fv.dataset):
        raise ValueError(
            f"need 0 <= data_start < data_end <= len(dataset) = {len(fv.dataset)}, got "
            f"[{data_start}, {data_end})"
        )
    return _Run(Path(cache), data_start, data_end, batch_size, checkpoint)


def _driven(fv: Any, cache: Path, rows: tuple[int, int], overwrite: bool) -> Any:
    """A shallow copy of ``fv`` that records ``rows`` into ``cache``: the caller's object is never changed."""
    driven = shallow_copy(fv)
    driven.activation_cache, driven.sample_range, driven.overwrite = cache, rows, overwrite
    return driven


def _run_one(fv: Any, cache: Path, start: int, end: int, composite: Any, batch_size: int, checkpoint: int,
             on_device: Any) -> dict[str, list[str]]:
    """One process: CRP's ``run`` on the cache itself, or ``resume`` where the cache exists."""
    if not fv.overwrite and cache.exists():
        return fv.resume(composite, start, end, batch_size, checkpoint, on_device)
    return fv.run(composite, start, end, batch_size, checkpoint, on_device)


def _record_shard(fv: Any, shard: Path, a: int, b: int, composite: Any, batch_size: int, checkpoint: int,
                  on_device: Any) -> dict[str, list[str]]:
    """Record one rank's share ``[a, b)`` into its shard (``resume_distributed`` where the shard exists)."""
    if b <= a:
        return {key: [] for key in CRP_KINDS}
    if not fv.overwrite and shard.exists():
        checkpoints = fv.resume_distributed(composite, a, b, batch_size, checkpoint, on_device)
    else:
        checkpoints = fv.run_distributed(composite, a, b, batch_size, checkpoint, on_device)
    return {key: list(checkpoints.get(key, [])) for key in CRP_KINDS}


def _collect(fv: Any, parts: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    """Rank 0: CRP's ``collect_results`` over every rank's checkpoints (they must be visible on rank 0)."""
    merged = {key: [p for part in parts for p in part[key]] for key in CRP_KINDS}
    missing = [p for key in ("r_max", "a_max") for p in merged[key] if not Path(p + "data.npy").exists()]
    if missing:
        raise FileNotFoundError(
            f"rank 0 cannot see CRP checkpoint files written by other ranks (e.g. {missing[0]}data.npy); "
            "CRP's path= must be on a filesystem shared by all ranks"
        )
    if not any(merged[key] for key in CRP_KINDS):
        logger.info("nothing was recorded: every shard was complete and its CRP results already collected")
        return {key: [] for key in CRP_KINDS}
    return fv.collect_results(merged)
