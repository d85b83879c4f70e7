"""A model's layers as CRP's conditions see them: lookup by module name, a probing forward pass, channel
ranking, argument checks, and masks that act on the last call of a module called several times.

Shared by :py:mod:`crp_invert.integration.glocal` and :py:mod:`crp_invert.integration.circuits`. Every module
name works as a layer: leaves, containers (``"layer4"``, whose output is the layer) and modules called several
times per forward pass (their last call, the tensor CRP's ``record_layer`` records).
"""
import contextlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from ..core.checks import is_int

__all__ = ["RANK_BY", "LastCall", "Probe", "get_module", "check_rank_by", "check_top_k", "rank_channels",
           "probe", "channel_count", "prepare"]

RANK_BY = ("signed", "absolute")


class LastCall:
    """Masks for modules called several times per forward pass that act on the last call only.

    CRP's mask hook registers its gradient mask on the output of every call of a module: a condition on
    ResNet's BasicBlock ``relu`` (applied after ``bn1`` and again after the residual sum) would mask the
    same channel index in two unrelated tensors. CRP records (``record_layer``) the output of the last
    call, so the layer *is* its last call's output: what its activations and relevances describe. While
    attached, forward hooks count each module's calls in every forward pass and tag each call's output
    with a gradient hook that notes which call the gradient arriving there belongs to; the masks made by
    :meth:`mask_map` then mask only the gradient of the last call. For modules called once this is
    CRP's ``ChannelConcept.mask``.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.names = list(names)
        self.calls = {name: 0 for name in self.names}
        self.current = {name: -1 for name in self.names}

    def _reset(self, *_args) -> None:
        for name in self.names:
            self.calls[name] = 0

    def _forward_hook(self, name: str):
        def hook(_module, _inputs, output):
            index = self.calls[name]
            self.calls[name] = index + 1
            if isinstance(output, torch.Tensor) and output.requires_grad:
                def note(grad, index=index):
                    self.current[name] = index
                    return grad

                output.register_hook(note)

        return hook

    @contextlib.contextmanager
    def attached(self):
        """Register the counting hooks (first in line, before CRP's mask hooks) until exit."""
        modules = dict(self.model.named_modules())
        handles = [self.model.register_forward_pre_hook(self._reset)]
        try:
            for name in self.names:
                handles.append(modules[name].register_forward_hook(self._forward_hook(name), prepend=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def is_last(self, name: str) -> bool:
        """Whether the gradient being masked at ``name`` belongs to its last call of the forward pass."""
        return self.current[name] == self.calls[name] - 1

    def mask(self, batch_id: int, concept_ids: list[int], layer_name: str):
        """CRP's ``mask_map`` signature: ``ChannelConcept.mask`` applied to the last call of ``layer_name``."""
        from crp.concepts import ChannelConcept

        channel_mask = ChannelConcept.mask(batch_id, concept_ids, layer_name)
        if layer_name not in self.calls:
            return channel_mask

        def last_call_mask(grad):
            return channel_mask(grad) if self.is_last(layer_name) else grad

        return last_call_mask


def get_module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The module named ``layer`` (KeyError listing the model's module names otherwise)."""
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        names = [name for name in modules if name]
        shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
        raise KeyError(f"layer {layer!r} is not a module of the model; expected one of: {shown}")
    return modules[layer]


def check_rank_by(rank_by: str) -> str:
    """``rank_by`` if it is one of :data:`RANK_BY` (ValueError otherwise)."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by={rank_by!r}; expected one of {RANK_BY}")
    return rank_by


def check_top_k(top_k: int, n_channels: int, layer: str) -> int:
    """``top_k`` as an int in ``[1, n_channels]`` (TypeError / ValueError naming ``layer`` otherwise)."""
    if not is_int(top_k):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= n_channels:
        raise ValueError(f"top_k={top_k} is out of range: layer {layer!r} has {n_channels} channels "
                         f"(expected 1 <= top_k <= {n_channels})")
    return int(top_k)


def rank_channels(values: torch.Tensor, rank_by: str) -> torch.Tensor:
    """Channel indices along the last axis, largest (signed or absolute) value first, ties by index."""
    key = values.abs() if rank_by == "absolute" else values
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


class Probe(NamedTuple):
    """What one forward pass tells: the model output, each layer's output shape and number of calls."""

    prediction: torch.Tensor
    shapes: dict[str, tuple[int, ...]]
    calls: dict[str, int]


def probe(model: torch.nn.Module, data: torch.Tensor, layers: Sequence[str]) -> Probe:
    """One forward pass without gradients: the model output, the output shape of each layer (its last call)
    and how often each layer is called."""
    modules = {name: get_module(model, name) for name in layers}
    shapes: dict[str, tuple[int, ...]] = {}
    calls = {name: 0 for name in modules}

    def make_hook(name):
        def hook(_module, _input, output):
            calls[name] += 1
            if not isinstance(output, torch.Tensor):
                raise ValueError(f"layer {name!r} returns a {type(output).__name__}, not a tensor: CRP's "
                                 f"conditions and recordings need a module with one output tensor")
            shapes[name] = tuple(output.shape)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            prediction = model(data)
    finally:
        for handle in handles:
            handle.remove()
    for name in modules:
        if not calls[name]:
            raise ValueError(f"layer {name!r} was not called in the forward pass of the model")
    if not isinstance(prediction, torch.Tensor) or prediction.dim() != 2:
        raise ValueError(f"the model output must have shape [batch, classes], got "
                         f"{tuple(getattr(prediction, 'shape', ())) or type(prediction).__name__}")
    return Probe(prediction, shapes, calls)


def channel_count(shapes: Mapping[str, tuple[int, ...]], layer: str) -> int:
    """The channel count (axis 1) of ``layer``'s output shape in ``shapes``."""
    shape = shapes[layer]
    if len(shape) < 2:
        raise ValueError(f"layer {layer!r} has output shape {shape}; expected [batch, channels, ...]")
    return shape[1]


def prepare(sample: torch.Tensor, device) -> torch.Tensor:
    """``sample`` detached and moved to ``device`` (TypeError if it is not a tensor)."""
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    return sample.detach().to(device)
