"""Vision transformers (torchvision's ``VisionTransformer``): which layers to record, an attribution that runs
on them, and the glocal decomposition over their units.

Layers
    :func:`vit_layouts` names the encoder blocks (``[B, T, D]``, units last) and the feature extractor: the
    output of ``encoder`` (after its final LayerNorm) reduced to the class token, which is exactly the
    representation ``heads`` classifies (the INVERT paper labels these units of ViT B/16 and L/16).
Relevances: gradient x input, not LRP
    zennit 0.4.6's composites fail on torchvision's ViT (a rule's backward hook on ``MultiheadAttention``,
    which takes three inputs, returns one gradient). :class:`GradientTimesInput` is CRP's ``CondAttribution``
    without a composite, with relevance defined as activation times gradient: the input heatmap is
    ``x * df/dx`` (summed over colour channels), the relevance at a recorded layer is ``a * df/da``, and the
    backward pass starts from 1 at the target logit (not from the logit's value, as CRP's LRP does), so that a
    model that is linear and bias-free would conserve ``f(x)`` exactly. What it is: a first-order Taylor
    attribution, exact for the conditional masking (the class heatmap is the sum of the units' conditional
    heatmaps plus the rest, by linearity of the gradient in the mask). What it is not: LRP; the attention's
    softmax, GELU, LayerNorm and the biases are differentiated, not given rules, so the relevances do not sum
    to the logit (measure it with :func:`conservation`) and can be noisy, as gradients of deep nets are.
Decomposition
    :func:`decompose_units` runs :func:`~crp_invert.integration.glocal.decompose_batch` on a layer whose
    units are on the last axis, through a view of the model in which the layer's output is shown units first.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from crp.attribution import CondAttribution

from .layouts import TokenConcept
from .shown_labels import labels_of_layer

__all__ = ["GradientTimesInput", "vit_layouts", "vit_layer_map", "units_first_view", "decompose_units",
           "conservation", "RELEVANCE_GRADIENT_X_INPUT"]

#: how :class:`GradientTimesInput` defines relevance (what a recording stores as its ``relevance`` attribute)
RELEVANCE_GRADIENT_X_INPUT = "gradient x input: a * df/da at the layer, seeded with 1 at the target"


class GradientTimesInput(CondAttribution):
    """CRP's ``CondAttribution`` computing gradient x input (use it with ``composite=None``).

    Heatmap ``sum_c x * df/dx``; relevance at a recorded layer ``a * df/da``; the backward pass starts with 1
    at each target (see the module's notes on what this is and is not). Conditions mask the gradient at a
    layer as usual, so conditional heatmaps add up to the class heatmap.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    >>> x = torch.rand(1, 1, 2, 2, requires_grad=True)
    >>> result = GradientTimesInput(model)(x, [{"y": [1]}], None)
    >>> bool(torch.isclose(result.heatmap.sum(), model(x)[0, 1]))
    True
    """

    #: relevances are activation times gradient: recording multiplies CRP's gradient by the layer output
    relevance_times_activation = True

    def relevance_init(self, prediction, target_list, init_rel):
        seed = torch.ones_like(prediction) if init_rel is None else init_rel
        return super().relevance_init(prediction, target_list, seed)

    def heatmap_modifier(self, data, on_device=None):
        heatmap = (data.detach() * data.grad.detach()).sum(dim=1)
        return heatmap.to(on_device) if on_device else heatmap

    def _attribute(self, *args, **kwargs):
        result = super()._attribute(*args, **kwargs)
        relevances = {name: result.activations[name].to(grad) * grad for name, grad in result.relevances.items()}
        return result._replace(relevances=relevances)


def _is_vit(model: torch.nn.Module) -> bool:
    encoder = getattr(model, "encoder", None)
    return isinstance(getattr(encoder, "layers", None), torch.nn.Sequential) and hasattr(model, "heads")


def vit_layouts(model: torch.nn.Module, blocks: str | None = "tokens:mean",
                features: str | None = "tokens:cls") -> dict[str, str]:
    """The layers of a torchvision ``VisionTransformer`` and their unit layouts.

    Parameters
    ----------
    model : torchvision.models.VisionTransformer
    blocks : str or None
        Layout of every encoder block ``encoder.layers.<name>`` (None: leave the blocks out).
    features : str or None
        Layout of ``encoder``, the feature extractor (None: leave it out); ``"tokens:cls"`` records the
        class-token representation that ``heads`` classifies.

    Returns
    -------
    dict of str to str
        Layer name -> layout, blocks first; pass it as ``layouts=`` and its keys as the layers.

    Examples
    --------
    >>> from torchvision.models import VisionTransformer
    >>> vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    >>> vit_layouts(vit)
    {'encoder.layers.encoder_layer_0': 'tokens:mean', 'encoder.layers.encoder_layer_1': 'tokens:mean', \
'encoder': 'tokens:cls'}
    """
    if not _is_vit(model):
        raise TypeError(f"expected a torchvision VisionTransformer (with encoder.layers and heads), "
                        f"got {type(model).__name__}")
    result = {}
    if blocks is not None:
        result.update({f"encoder.layers.{name}": blocks for name, _ in model.encoder.layers.named_children()})
    if features is not None:
        result["encoder"] = features
    return result


def vit_layer_map(layouts: Mapping[str, str]) -> dict[str, TokenConcept]:
    """CRP's ``layer_map`` for the layers of :func:`vit_layouts`: a :class:`TokenConcept` each."""
    return {name: TokenConcept() for name in layouts}


class _Transpose(torch.nn.Module):
    """Moves axis ``source`` to ``destination`` (a module, so that CRP and hooks can name its output).

    ``units_first`` marks the module whose 3-D output has its units on axis 1 (what a check for 3-D outputs of
    undeclared layout can accept)."""

    def __init__(self, source: int, destination: int) -> None:
        super().__init__()
        self.source, self.destination = source, destination
        self.units_first = destination == 1

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.movedim(self.source, self.destination)


class _UnitsFirstView(torch.nn.Module):
    """``module`` followed by ``units`` (its output [B, D, T], units first) and ``back`` ([B, T, D] again)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.units = _Transpose(-1, 1)
        self.back = _Transpose(1, -1)

    def forward(self, *args, **kwargs):
        return self.back(self.units(self.module(*args, **kwargs)))


@contextlib.contextmanager
def units_first_view(model: torch.nn.Module, layer: str) -> Iterator[str]:
    """Within the block, ``layer`` of ``model`` is wrapped so that a module shows its output units first;
    yields that module's name (``layer + ".units"``). The model computes the same function; it is restored
    on exit, also after an exception. Parameters and their names in ``state_dict`` change inside the block."""
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must name a submodule of the model, got {layer!r}")
    parent_name, _, child = layer.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        original = parent.get_submodule(child)
    except AttributeError:
        raise KeyError(f"layer {layer!r} is not a module of the model") from None
    setattr(parent, child, _UnitsFirstView(original))
    try:
        yield f"{layer}.units"
    finally:
        setattr(parent, child, original)


def _class_token(units_first: torch.Tensor) -> torch.Tensor:
    """[B, D, T] -> [B, D]: the class token (token 0) of an output shown units first."""
    return units_first[:, :, 0]


def _view_evidence(evidence: Any, layer: str):
    """The evidence for the view: the cache layer named as recorded, a class-token pooling made explicit."""
    if evidence is None:
        return None
    reference_layer = evidence.layer or layer
    pooling = evidence.pooling
    info = getattr(evidence.reference, "info", None)
    if pooling is None and callable(info) and info(reference_layer).get("pooling") == "cls":
        pooling = _class_token
    elif pooling == "cls":
        pooling = _class_token
    return dataclasses.replace(evidence, layer=reference_layer, pooling=pooling)


def decompose_units(attribution, samples: torch.Tensor, target, layer: str, composite=None, labels=None,
                    top_k: int = 8, **kwargs: Any) -> list:
    """:func:`~crp_invert.integration.glocal.decompose_batch` over the units on the last axis of ``layer``.

    The same arguments and results as ``decompose_batch`` (``kwargs``: ``rank_by``, ``batch_size``,
    ``device``, ``progress``, ``evidence``); a unit's conditional heatmap keeps the gradient of that unit at
    every token, its relevance is the sum over the tokens. An ``Evidence`` over a cache reads the layer's
    pooling from the cache (``"cls"`` included). Use :class:`GradientTimesInput` and ``composite=None`` on
    torchvision's ViT.

    Examples
    --------
    >>> parts = decompose_units(GradientTimesInput(vit), images, None, "encoder", top_k=4)  # doctest: +SKIP
    >>> parts[0].completeness_error  # doctest: +SKIP
    """
    from .glocal import decompose_batch

    kwargs["evidence"] = _view_evidence(kwargs.get("evidence"), layer)
    labels = labels_of_layer(labels, layer)
    with units_first_view(attribution.model, layer) as view:
        if labels is not None:
            labels = copy.copy(labels)
            labels.layer = view
        parts = decompose_batch(attribution, samples, target, view, composite, labels=labels, top_k=top_k,
                                **kwargs)
    return [dataclasses.replace(part, layer=layer) for part in parts]


def conservation(attribution: CondAttribution, data: torch.Tensor, targets: Sequence[int],
                 layers: Sequence[str] = (), composite=None) -> dict[str, torch.Tensor]:
    """How much of the target's output the relevances keep: per sample, the sum of the input heatmap and of
    each layer's relevance, next to the output (the target logit) and the seed of the backward pass.

    Returns
    -------
    dict of str to torch.Tensor
        ``"output"`` [B] the target logits, ``"input"`` [B] the heatmap sums, ``"layer:<name>"`` [B] the
        relevance sums; for :class:`GradientTimesInput` a conserving attribution has ``input == output``.
    """
    data = data.detach().clone().requires_grad_(True)
    conditions = [{"y": [int(t)]} for t in targets]
    result = attribution(data, conditions, composite, record_layer=list(layers))
    index = torch.arange(len(conditions))
    sums = {"output": result.prediction.detach()[index, torch.as_tensor([int(t) for t in targets])],
            "input": result.heatmap.detach().reshape(len(conditions), -1).sum(1)}
    for name in layers:
        sums[f"layer:{name}"] = result.relevances[name].detach().reshape(len(conditions), -1).sum(1)
    return sums
