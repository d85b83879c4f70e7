"""Which kernels a computation uses, chosen apart from where its tensors live.

``"auto"`` (the default) runs numpy radix sorts and scipy sparse products on CPU tensors (faster there)
and torch kernels on every other device; ``"torch"`` runs the torch kernels on any device, the CPU
included, so that the code a GPU runs is also executed (and tested) without one. Both give the same
results, bit for bit: every sum the search forms is a sum of integers, exact in any order.

The torch kernels use only operations CUDA has for the dtypes they use: sorts of float32/float64 values,
``torch.sparse.mm`` of a float64 CSR matrix with a float64 dense one (CUDA has no sparse products of
integer matrices, so the 0/1 labels are float64 there), ``index_add_``/``bincount``/``searchsorted`` on
int64 and ``scatter_`` of int32.
"""
from __future__ import annotations

import torch

__all__ = ["BACKENDS", "check_backend", "device_kernels"]

BACKENDS = ("auto", "torch")


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS` (ValueError naming it otherwise)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def device_kernels(device: str | torch.device | None, backend: str = "auto") -> bool:
    """True where the torch (device) kernels run: always with ``backend="torch"``, else off the CPU.

    Examples
    --------
    >>> device_kernels("cpu"), device_kernels("cpu", "torch"), device_kernels("cuda")
    (False, True, True)
    """
    if check_backend(backend) == "torch":
        return True
    return torch.device("cpu" if device is None else device).type != "cpu"
