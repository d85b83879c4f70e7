"""CRP's attribution objects with this package's defaults, for callers outside ``integration/`` (the demo):
the composite ``EpsilonPlusFlat`` with ``SequentialMergeBatchNorm`` and one ``ChannelConcept`` per layer.

Only ``integration/`` imports crp and zennit; the demo asks this module for the objects it hands to
:class:`~crp_invert.integration.recording.InvertFeatureVisualization` and
:func:`~crp_invert.integration.glocal.decompose_batch`.

Examples
--------
>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
>>> setup = channel_attribution(model.eval(), ["0"])
>>> sorted(setup.layer_map), type(setup.composite).__name__
(['0'], 'EpsilonPlusFlat')
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ChannelAttribution", "channel_attribution", "default_composite"]


@dataclass(frozen=True)
class ChannelAttribution:
    """What CRP needs to attribute channels of a model.

    Attributes
    ----------
    attribution : crp.attribution.CondAttribution
    composite : zennit.core.Composite
    layer_map : dict of str to crp.concepts.ChannelConcept
        One channel concept per recorded layer (``FeatureVisualization``'s ``layer_map``).
    """

    attribution: Any
    composite: Any
    layer_map: dict[str, Any]


def default_composite() -> Any:
    """``EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])``: zennit's composite for CNNs with batch norm
    directly after their convolutions."""
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    return EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])


def channel_attribution(model: torch.nn.Module, layers: Sequence[str],
                        device: str | torch.device = "cpu") -> ChannelAttribution:
    """A ``CondAttribution`` of ``model``, :func:`default_composite` and a ``ChannelConcept`` per layer."""
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept

    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of layer names, got the str {layers!r}")
    return ChannelAttribution(attribution=CondAttribution(model, device=device), composite=default_composite(),
                              layer_map={str(name): ChannelConcept() for name in layers})
