"""A model left as it was when a call that attaches hooks and canonizers fails.

CRP's ``run_distributed`` registers the user's composite and its own feature-visualization hooks and removes
them only when its loop ends normally; zennit's ``Composite.register`` leaves the canonizers it applied before
a failing one in place (e.g. ``SequentialMergeBatchNorm`` on DenseNet121 adds a bias to ``features.conv0``
and then fails). :func:`restored_on_error` takes a snapshot of every module's hooks, parameters, buffers,
children and attributes (references only, no copies of tensors) and, if the body raises, removes the composite
the regular way and then puts every module back as it was.

Canonizers that replace tensors (as zennit's do: ``weight.data = ...``, ``module.bias = Parameter(...)``,
``module.forward = ...``) are undone exactly; an in-place change of a tensor's values would not be.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["restored_on_error", "hooks_of"]

logger = logging.getLogger(__name__)


def hooks_of(module: torch.nn.Module) -> dict[str, dict]:
    """The hook dictionaries of a module (``_forward_hooks``, ``_forward_hooks_with_kwargs``, ...), by name."""
    return {key: value for key, value in vars(module).items()
            if key.startswith("_") and "hooks" in key and isinstance(value, dict)}


class _ModuleState:
    """What a canonizer or a hook may change on one module, kept by reference."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.parameters = dict(module._parameters)
        self.parameter_data = {k: p.data for k, p in self.parameters.items() if p is not None}
        self.buffers = dict(module._buffers)
        self.buffer_data = {k: b.data for k, b in self.buffers.items() if b is not None}
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
        for key, data in self.parameter_data.items():
            if self.parameters[key].data is not data:
                self.parameters[key].data = data
        for key, data in self.buffer_data.items():
            if self.buffers[key].data is not data:
                self.buffers[key].data = data


@contextlib.contextmanager
def restored_on_error(model: torch.nn.Module, composite: Any = None) -> Iterator[None]:
    """Run the body; if it raises, remove ``composite`` and restore every module of ``model`` as it was before.

    Parameters
    ----------
    model : torch.nn.Module
    composite : zennit Composite, optional
        Removed first (``composite.remove()``, which zennit allows at any time) so that zennit reverts what it
        knows about; the snapshot then reverts the rest (hooks of other composites, partial registrations).
    """
    states = [_ModuleState(module) for module in model.modules()]
    try:
        yield
    except BaseException:
        try:
            if composite is not None:
                composite.remove()
        except Exception:  # the snapshot below restores the model anyway
            logger.debug("composite.remove() failed after an error", exc_info=True)
        finally:
            for state in states:
                state.restore()
        raise
