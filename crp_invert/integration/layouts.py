"""Unit layouts: which axis of a layer's output holds the units that get labels, and how the rest is reduced.

``"channels"``
    ``[B, C, *spatial]`` (convolutions, and ``[B, C]`` of linear layers): the units are the channels, the
    spatial positions are pooled (``"mean"``, ``"max"``, ``"sum"`` or a callable). What crp-invert always did.
``"tokens"``
    ``[B, T, D]`` (transformers: tokens, hidden units): the units are on the **last** axis, the tokens are
    reduced by the class token (``"cls"``: token 0, as the INVERT paper labels ViT features), ``"mean"``,
    ``"max"``, ``"sum"`` or a callable ``output [B, D, T] -> [B, D]`` (it sees the units first).

A layer's layout is chosen per layer (``layouts={"encoder": "tokens:cls"}``; ``"tokens"`` alone takes the
layer's ``pooling``), or by the layer map: a :class:`TokenConcept` there means ``"tokens"``. Without a choice a
layer is ``"channels"``, and a 3-D output is refused at the first batch with a message naming the choices: a
``[B, T, D]`` tensor must never be recorded over the wrong axis by default.
Modules whose type says the layout (``Conv1d``, ``BatchNorm1d``, 1-D pooling: channels first) are exempt.

The layout is stored with the layer in the activation cache (attribute ``layout``, part of the fingerprint),
and every reader gets ``[N, units]`` columns as for channels.

:class:`TokenConcept` is CRP's ``Concept`` for units on the last axis: its conditional masks, its relevance per
unit (the sum over tokens) and its reference sampling (argmax over tokens) act on that axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from crp.concepts import ChannelConcept, Concept

__all__ = ["LAYOUTS", "TOKEN_POOLINGS", "Layout", "TokenConcept", "parse_layout", "layer_layouts",
           "units_first", "check_output_layout", "CHANNELS_FIRST_1D", "layout_concepts"]

LAYOUTS = ("channels", "tokens")
TOKEN_POOLINGS = ("cls", "mean", "max", "sum")
CHANNEL_POOLINGS = ("mean", "max", "sum")

Pooling = Union[str, Callable[[torch.Tensor], torch.Tensor]]
Layout = Union[str, tuple]

#: modules whose 3-D output is channels first ([B, C, L]) by definition
CHANNELS_FIRST_1D = (
    torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.BatchNorm1d, torch.nn.InstanceNorm1d,
    torch.nn.MaxPool1d, torch.nn.AvgPool1d, torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveMaxPool1d,
    torch.nn.LPPool1d,
)

_CHOICES = ("declare the layer's unit layout: layouts={name: 'tokens:cls' | 'tokens:mean' | 'tokens:max' | "
            "'tokens:sum' | 'channels'} (CLI: --layout NAME=tokens:mean); 'tokens' takes the units on the last "
            "axis [B, T, D], 'channels' the second axis [B, C, L]")


def parse_layout(spec: str) -> tuple[str, str | None]:
    """``"tokens:mean"`` -> ``("tokens", "mean")``; ``"tokens"`` -> ``("tokens", None)`` (pooling not given).

    Raises
    ------
    ValueError
        an unknown layout or a pooling the layout does not have (``"channels:cls"``).
    """
    if not isinstance(spec, str):
        raise TypeError(f"a layout must be a str like 'tokens:mean', got {type(spec).__name__}: {spec!r}")
    kind, _, pooling = spec.strip().partition(":")
    if kind not in LAYOUTS:
        raise ValueError(f"unknown layout {spec!r}; expected one of {LAYOUTS}, optionally with a pooling "
                         f"('tokens:' + one of {TOKEN_POOLINGS}, 'channels:' + one of {CHANNEL_POOLINGS})")
    if not pooling:
        return kind, None
    allowed = TOKEN_POOLINGS if kind == "tokens" else CHANNEL_POOLINGS
    if pooling not in allowed:
        raise ValueError(f"layout {spec!r}: pooling {pooling!r} is not one of {allowed} for {kind!r}")
    return kind, pooling


def layer_layouts(
    model: torch.nn.Module,
    layer_map: Mapping[str, Any],
    poolings: Mapping[str, Pooling],
    layouts: str | Mapping[str, str] | None,
) -> tuple[dict[str, str], dict[str, Pooling], dict[str, bool]]:
    """Per layer: its layout, its pooling (a layout's own pooling wins) and whether the layout was declared.

    A layer whose concept in ``layer_map`` is a :class:`TokenConcept` is ``"tokens"`` (reduced by its
    ``pooling``) unless ``layouts`` says more. Any other layer without a declared layout is ``"channels"``; it is
    marked undeclared unless its module says the layout (:data:`CHANNELS_FIRST_1D`), so that a 3-D output is
    refused at the first batch (:func:`check_output_layout`). A ``"tokens"`` layer with a CRP concept needs a
    :class:`TokenConcept`.
    """
    if layouts is None:
        layouts = {}
    elif isinstance(layouts, str):
        layouts = {name: layouts for name in layer_map}
    elif not isinstance(layouts, Mapping):
        raise TypeError(f"layouts must be a str or a dict of layer name to layout, got {type(layouts).__name__}")
    unknown = sorted(set(layouts) - set(layer_map))
    if unknown:
        raise KeyError(f"layouts given for layers not in the layer map: {unknown}; layers: {list(layer_map)}")
    modules = dict(model.named_modules())
    kinds, pooled, declared = {}, dict(poolings), {}
    for name, concept in layer_map.items():
        if name in layouts:
            kind, pooling = parse_layout(layouts[name])
            declared[name] = True
        elif isinstance(concept, TokenConcept):  # the layer map says it: units on the last axis
            kind, pooling = "tokens", None
            declared[name] = True
        else:
            kind, pooling = "channels", None
            declared[name] = isinstance(modules.get(name), CHANNELS_FIRST_1D)
        if pooling is not None:
            pooled[name] = pooling
        chosen = pooled[name]
        if not callable(chosen) and chosen not in (TOKEN_POOLINGS if kind == "tokens" else CHANNEL_POOLINGS):
            raise ValueError(f"layer {name!r}: pooling {chosen!r} is not defined for layout {kind!r}")
        if kind == "tokens" and concept is not None and not isinstance(concept, TokenConcept):
            raise TypeError(
                f"layer {name!r} has the tokens layout but concept {type(concept).__name__}: CRP would condition "
                "and sample references over the tokens; use crp_invert.integration.layouts.TokenConcept()"
            )
        kinds[name] = kind
    return kinds, pooled, declared


def layout_concepts(layers: list[str], layouts: Mapping[str, str]) -> dict[str, Concept]:
    """CRP's ``layer_map`` for ``layers``: a :class:`TokenConcept` for tokens layers, ``ChannelConcept`` else."""
    return {name: TokenConcept() if name in layouts and parse_layout(layouts[name])[0] == "tokens"
            else ChannelConcept() for name in layers}


def check_output_layout(layer: str, output: torch.Tensor, layout: str, declared: bool) -> None:
    """ValueError for an output the layout cannot read: a 3-D output of an undeclared layer, or a tokens layer
    whose output is not [B, T, D]."""
    if layout == "tokens" and output.dim() != 3:
        raise ValueError(f"layer {layer!r} has the tokens layout but its output has shape {tuple(output.shape)}; "
                         "expected [B, T, D]")
    if output.dim() == 3 and not declared:
        raise ValueError(
            f"layer {layer!r} returns a 3-D output {tuple(output.shape)}: is it [B, C, L] (channels) or "
            f"[B, T, D] (tokens, units last)? Refusing to guess; {_CHOICES}"
        )


def units_first(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The units on axis 1: ``[B, T, D] -> [B, D, T]`` for tokens (a view), unchanged for channels."""
    if layout == "tokens":
        return tensor.movedim(-1, 1)
    return tensor


class TokenConcept(Concept):
    """CRP concept whose units are on the **last** axis of a ``[B, T, D]`` layer output (transformer tokens).

    ``mask`` keeps the gradient of the given units at every token; ``mask_rf`` keeps it at given tokens of a unit
    (``{unit: [tokens]}``); ``attribute`` sums each unit's relevance over the tokens ([B, D]);
    ``reference_sampling`` ranks samples per unit as CRP's ``ChannelConcept`` does for channels, with the token
    of the largest relevance as the unit's receptive field.

    Examples
    --------
    >>> import torch
    >>> TokenConcept().attribute(torch.ones(2, 5, 3), abs_norm=False)
    tensor([[5., 5., 5.],
            [5., 5., 5.]])
    """

    @staticmethod
    def mask(batch_id: int, concept_ids: list, layer_name: str | None = None) -> Callable:
        """A gradient hook keeping only the units ``concept_ids`` (last axis) of sample ``batch_id``."""
        def mask_fct(grad: torch.Tensor) -> torch.Tensor:
            keep = torch.zeros(grad.shape[-1], dtype=grad.dtype, device=grad.device)
            keep[concept_ids] = 1
            grad[batch_id] = grad[batch_id] * keep
            return grad

        return mask_fct

    @staticmethod
    def mask_rf(batch_id: int, c_n_map: Mapping[int, list], layer_name: str | None = None) -> Callable:
        """A gradient hook keeping, for each unit of ``c_n_map``, only the listed tokens."""
        def mask_fct(grad: torch.Tensor) -> torch.Tensor:
            keep = torch.zeros(grad.shape[1:], dtype=grad.dtype, device=grad.device)
            for unit, tokens in c_n_map.items():
                keep[tokens, unit] = 1
            grad[batch_id] = grad[batch_id] * keep
            return grad

        return mask_fct

    def get_rf_indices(self, output_shape, layer_name: str | None = None):
        """The tokens (receptive-field positions) of a per-sample output shape ``[T, D]``."""
        import numpy as np

        return np.arange(0, int(output_shape[0])) if len(output_shape) > 1 else [0]

    def attribute(self, relevance, mask=None, layer_name: str | None = None, abs_norm: bool = True):
        """Relevance per unit [B, D]: the sum over the tokens (normalized by the absolute sum if ``abs_norm``)."""
        if isinstance(mask, torch.Tensor):
            relevance = relevance * mask
        return ChannelConcept.attribute(self, units_first(relevance, "tokens"), None, layer_name, abs_norm)

    def reference_sampling(self, relevance, layer_name: str | None = None, max_target: str = "sum",
                           abs_norm: bool = True):
        """CRP's reference sampling with the units on the last axis (samples sorted per unit)."""
        return ChannelConcept.reference_sampling(self, units_first(relevance, "tokens").contiguous(), layer_name,
                                                 max_target, abs_norm)
