"""One model guard: a model left as it was after a call that attaches hooks and canonizers.

CRP's ``run_distributed`` registers the user's composite and its own feature-visualization hooks and removes
them only when its loop ends normally; CRP's ``CondAttribution`` removes its recording hooks only when a pass
succeeds; zennit's ``Composite.register`` leaves the canonizers it applied before a failing one in place
(``SequentialMergeBatchNorm`` on DenseNet121 adds a bias to ``features.conv0`` and then fails), and an error
inside CRP's ``AttributionGraph`` leaves ``generate`` suspended inside its composite context.

:func:`model_guard` takes a snapshot of every module's hooks, parameters, buffers, children and attributes
(references only, no copies of tensors) and puts every module back as it was: always on exit (glocal,
circuits: nothing they attach should outlive the call) or only when the body raises (recording: a successful
run leaves the model as CRP leaves it). On an error the composite, when given, is removed the regular way
first, so that zennit reverts what it knows about; the snapshot then reverts the rest.

Canonizers that replace tensors (as zennit's do: ``weight.data = ...``, ``module.bias = Parameter(...)``,
``module.forward = ...``) are undone exactly; an in-place change of a tensor's values would not be.

Examples
--------
>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
>>> with model_guard(model):
...     _ = model[0].register_forward_hook(lambda *args: None)
>>> len(model[0]._forward_hooks)
0
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["model_guard", "restored_on_error", "hooks_of"]

logger = logging.getLogger(__name__)


def hooks_of(module: torch.nn.Module) -> dict[str, dict]:
    """The hook dictionaries of a module (``_forward_hooks``, ``_forward_hooks_with_kwargs``, ...), by name."""
    return {key: value for key, value in vars(module).items()
            if key.startswith("_") and "hooks" in key and isinstance(value, dict)}


def _same_storage(tensor: torch.Tensor, data: torch.Tensor) -> bool:
    return (tensor.data_ptr() == data.data_ptr() and tensor.shape == data.shape
            and tensor.stride() == data.stride() and tensor.dtype == data.dtype)


class _ModuleState:
    """What a canonizer or a hook may change on one module, kept by reference."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.parameters = dict(module._parameters)
        self.buffers = dict(module._buffers)
        self.data = {(kind, key): value.data for kind, table in (("p", self.parameters), ("b", self.buffers))
                     for key, value in table.items() if value is not None}
        self.children = dict(module._modules)
        self.hooks = {key: dict(value) for key, value in hooks_of(module).items()}
        self.attributes = dict(vars(module))

    def restore(self) -> None:
        module = self.module
        for key in set(vars(module)) - set(self.attributes):
            delattr(module, key)  # e.g. a forward or a submodule set by an AttributeCanonizer
        for key, value in self.attributes.items():
            if key not in vars(module) or vars(module)[key] is not value:
                object.__setattr__(module, key, value)
        for target, saved in ((module._parameters, self.parameters), (module._buffers, self.buffers),
                              (module._modules, self.children)):
            target.clear()
            target.update(saved)
        for key, hooks in self.hooks.items():
            current = getattr(module, key)
            current.clear()
            current.update(hooks)
        for (kind, key), data in self.data.items():
            tensor = (self.parameters if kind == "p" else self.buffers)[key]
            if not _same_storage(tensor, data):
                tensor.data = data  # a canonizer's ``weight.data = ...``


def _remove_composite(composite: Any) -> None:
    try:
        composite.remove()
    except Exception:  # the snapshot restores the model anyway
        logger.debug("composite.remove() failed after an error", exc_info=True)


@contextlib.contextmanager
def model_guard(model: torch.nn.Module, composite: Any = None, *, only_on_error: bool = False) -> Iterator[None]:
    """Run the body and put every module of ``model`` back as it was before: hooks, parameters, buffers,
    children, attributes (canonizer changes).

    Parameters
    ----------
    model : torch.nn.Module
    composite : zennit Composite, optional
        Removed first when the body raises (``composite.remove()``, which zennit allows at any time).
    only_on_error : bool
        False (default): restore on every exit, so nothing attached inside outlives the body. True: restore
        only when the body raises (a successful body keeps what it did, e.g. CRP's registered results).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> try:
    ...     with model_guard(model, only_on_error=True):
    ...         model[0].bias = None
    ...         raise RuntimeError("a canonizer failed")
    ... except RuntimeError:
    ...     pass
    >>> model[0].bias is not None
    True
    """
    states = [_ModuleState(module) for module in model.modules()]
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        if composite is not None:
            _remove_composite(composite)
        raise
    finally:
        if failed or not only_on_error:
            for state in states:
                state.restore()


def restored_on_error(model: torch.nn.Module, composite: Any = None) -> contextlib.AbstractContextManager[None]:
    """``model_guard(model, composite, only_on_error=True)``: the name recording code has used."""
    return model_guard(model, composite, only_on_error=True)
