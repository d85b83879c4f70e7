"""The torchrun process group: start and end it, rank and world size, and the object collectives
(all-gather, broadcast, barrier) that are no-ops in a single process."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["init_distributed", "distributed_session", "is_distributed", "get_rank", "get_world_size",
           "local_device", "all_gather", "broadcast", "barrier"]


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
    """``"cuda:LOCAL_RANK"`` for ``device="cuda"`` under torchrun (one GPU per process), else ``device``.

    Examples
    --------
    >>> import os
    >>> local_device("cpu")
    'cpu'
    >>> "LOCAL_RANK" in os.environ or local_device("cuda") == "cuda"
    True
    """
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


def all_gather(obj: Any) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    if get_world_size() == 1:
        return [obj]
    dist = _dist()
    result: list = [None] * dist.get_world_size()
    dist.all_gather_object(result, obj)
    return result


def broadcast(obj: Any, src: int = 0) -> Any:
    if get_world_size() == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if get_world_size() > 1:
        _dist().barrier()


