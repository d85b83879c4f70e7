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
from pathlib import Path
from typing import Any

from ..storage.cache import ActivationCache
from .group import all_gather, broadcast, get_rank, get_world_size
from .shards import check_shard_layout, combine_shards, shard_path, split_range

logger = logging.getLogger(__name__)

__all__ = ["run_sharded"]

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
    cache = fv.activation_cache
    if isinstance(cache, ActivationCache) or not isinstance(cache, (str, os.PathLike)):
        raise TypeError(
            f"run_sharded needs fv built with activation_cache= a path (the combined cache), got "
            f"{type(cache).__name__}"
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
    check_shard_layout(combined, world_size, bool(fv.overwrite))

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
                checkpoints = fv.resume_distributed(composite, a, b, batch_size, checkpoint, on_device)
            else:
                checkpoints = fv.run_distributed(composite, a, b, batch_size, checkpoint, on_device)
    except Exception as err:  # tell the other ranks instead of leaving them waiting in the gather
        error, failure = f"rank {rank}: {type(err).__name__}: {err}", err
    finally:
        fv.activation_cache = combined
    gathered = all_gather((error, {key: list(checkpoints.get(key, [])) for key in _KINDS}))
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
    saved, error = broadcast((saved, error))
    if error is not None:
        raise RuntimeError(f"combining the shards failed: {error}")
    return saved

