"""Glocal explanations: a class heatmap decomposed into labeled per-channel heatmaps, and labeled circuits.

A local explanation (the heatmap of one prediction) is the sum of the conditional heatmaps of the
channels of an earlier layer (CRP). Each channel carries its global INVERT label, which turns the
heatmap into "recognized through channel 296 = box and channel 154 = Chinese text" (paper
section 5.2). The circuits (paper figure 7 and appendix A.8) name the channels that matter most for
a class logit, by direct weight, by mean relevance over a dataset, or by following CRP's
:py:class:`crp.attribution.AttributionGraph` down from one labeled concept.

All conditional heatmaps come from CRP's :py:class:`crp.attribution.CondAttribution`, with several
conditions per backward pass. Hooks that CRP would leave attached after an error are removed.
"""
import contextlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "GlocalExplanation",
    "decompose",
    "decompose_batch",
    "channel_relevances",
    "CircuitNode",
    "CircuitEdge",
    "Circuit",
    "circuit_by_weight",
    "circuit_by_relevance",
    "concept_circuit",
]

RANK_BY = ("signed", "absolute")


# ------------------------------------------------------------------------------------------------
# helpers: hooks, validation
# ------------------------------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@contextlib.contextmanager
def _no_leaked_hooks(model: torch.nn.Module):
    """Remove, on exit, every module hook that was registered inside the context.

    CRP's ``CondAttribution`` removes its recording hooks only when a pass succeeds; after an error
    (a bad condition, a keyboard interrupt) they would stay attached to the model. Snapshot the hook
    ids of every module and drop whatever is new when the context exits, also on error.
    """
    modules = list(model.modules())
    before = [{name: set(getattr(module, name, {}).keys()) for name in _HOOK_DICTS} for module in modules]
    try:
        yield
    finally:
        for module, known in zip(modules, before):
            for name in _HOOK_DICTS:
                hooks = getattr(module, name, None)
                if not hooks:
                    continue
                for key in [key for key in hooks if key not in known[name]]:
                    hooks.pop(key, None)
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(module, extra, {}).pop(key, None)


def _get_module(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        names = [name for name in modules if name]
        shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
        raise KeyError(f"layer {layer!r} is not a module of the model; expected one of: {shown}")
    return modules[layer]


def _check_rank_by(rank_by: str) -> str:
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by={rank_by!r}; expected one of {RANK_BY}")
    return rank_by


def _check_top_k(top_k: int, n_channels: int, layer: str) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= n_channels:
        raise ValueError(f"top_k={top_k} is out of range: layer {layer!r} has {n_channels} channels "
                         f"(expected 1 <= top_k <= {n_channels})")
    return int(top_k)


def _layer_labels(labels: Any, layer: str, n_channels: int):
    """Return the LayerLabels for ``layer`` (or None), checked against the layer's channel count."""
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        if layer not in labels:
            raise KeyError(f"no labels for layer {layer!r}; labels are given for {sorted(labels)}")
        labels = labels[layer]
    label_layer = getattr(labels, "layer", None)
    if label_layer is not None and label_layer != layer:
        raise ValueError(f"labels are for layer {label_layer!r}, not for layer {layer!r}")
    if len(labels) != n_channels:
        raise ValueError(f"labels have {len(labels)} features but layer {layer!r} has {n_channels} channels; "
                         f"labels of another layer?")
    return labels


def _best_label(labels, channel: int):
    """The best Explanation of ``channel`` in ``labels`` or None."""
    if labels is None:
        return None
    explanations = labels[int(channel)]
    return explanations[0] if len(explanations) else None


def _rank(values: torch.Tensor, rank_by: str) -> torch.Tensor:
    key = values.abs() if rank_by == "absolute" else values
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def _as_targets(target, n_samples: int, n_outputs: int, prediction: torch.Tensor) -> List[int]:
    if target is None:
        return prediction.argmax(dim=1).tolist()
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    elif isinstance(target, np.ndarray):
        target = target.tolist()
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        targets = [int(target)] * n_samples
    elif isinstance(target, Sequence) and not isinstance(target, str):
        targets = list(target)
        if len(targets) != n_samples:
            raise ValueError(f"got {len(targets)} targets for {n_samples} samples")
    else:
        raise TypeError(f"target must be an int, a sequence of ints or None, got {type(target).__name__}")
    for value in targets:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"targets must be ints, got {value!r}")
        if not 0 <= value < n_outputs:
            raise ValueError(f"target {value} is out of range: the model has {n_outputs} outputs "
                             f"(expected 0 <= target < {n_outputs})")
    return [int(value) for value in targets]


def _probe(model: torch.nn.Module, data: torch.Tensor, layer: str) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """One forward pass without gradients: the model output and the output shape of ``layer``."""
    module = _get_module(model, layer)
    shapes = {}

    def hook(_module, _input, output):
        shapes["out"] = tuple(output.shape)

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            prediction = model(data)
    finally:
        handle.remove()
    if "out" not in shapes:
        raise ValueError(f"layer {layer!r} was not called in the forward pass of the model")
    if prediction.dim() != 2:
        raise ValueError(f"the model output must have shape [batch, classes], got {tuple(prediction.shape)}")
    return prediction, shapes["out"]


def _prepare(sample: torch.Tensor, device) -> torch.Tensor:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    return sample.detach().to(device)


def _attribute(attribution, data: torch.Tensor, conditions: List[Dict[str, List[int]]], composite, layer,
               record: bool, exclude_parallel: bool, batch_size: int, progress: bool = False):
    """Run CondAttribution on row i of ``data`` with ``conditions[i]``, in chunks of ``batch_size`` rows.

    Returns the heatmaps [R, ...] and, when ``record``, the relevance of ``layer`` [R, C, ...].
    """
    heatmaps, relevances = [], []
    n_rows = len(conditions)
    chunks = range(0, n_rows, batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, total=math.ceil(n_rows / batch_size), desc="conditional heatmaps")
    for start in chunks:
        rows = data[start:start + batch_size].detach().clone().requires_grad_(True)
        result = attribution(rows, conditions[start:start + batch_size], composite,
                             record_layer=[layer] if record else [], exclude_parallel=exclude_parallel)
        heatmaps.append(result.heatmap.detach())
        if record:
            relevances.append(result.relevances[layer].detach())
    heatmap = torch.cat(heatmaps, dim=0)
    return heatmap, (torch.cat(relevances, dim=0) if record else None)


# ------------------------------------------------------------------------------------------------
# decomposition
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class GlocalExplanation:
    """The heatmap of one prediction split into the labeled conditional heatmaps of a layer's channels.

    Attributes
    ----------
    layer : str
        The layer whose channels decompose the heatmap.
    target : int
        The output (class) explained.
    heatmap : torch.Tensor
        The class heatmap, CondAttribution with ``{"y": [target]}``, shape of the input without batch and
        color dimension ([H, W] for images).
    channels : torch.Tensor
        The ``top_k`` channels (long) ranked by relevance, most relevant first.
    channel_heatmaps : torch.Tensor
        [top_k, H, W], CondAttribution with ``{"y": [target], layer: [c]}`` for each channel.
    relevance : torch.Tensor
        [top_k] relevance of each channel, ``ChannelConcept().attribute(R, abs_norm=False)``.
    share : torch.Tensor
        [top_k] the channel's relevance divided by the layer total (:py:attr:`total_relevance`; zero if
        the total is zero). Signed: shares of all channels sum to one.
    labels : tuple
        The best :py:class:`~crp_invert.Explanation` of each channel (``layer_labels[c][0]``) or None.
    rest_heatmap : torch.Tensor
        Heatmap of everything except the ``top_k`` channels: one conditional pass with the complement
        channel set, without excluding parallel paths, so it also holds relevance that bypasses the layer
        (skip connections). ``channel_heatmaps.sum(0) + rest_heatmap == heatmap`` always.
    channel_relevance : torch.Tensor
        [C] relevance of every channel of the layer.
    prediction : torch.Tensor
        [n_outputs] the model output for the sample.
    rank_by : str
        "signed" or "absolute": how the channels were ranked.
    """

    layer: str
    target: int
    heatmap: torch.Tensor
    channels: torch.Tensor
    channel_heatmaps: torch.Tensor
    relevance: torch.Tensor
    share: torch.Tensor
    labels: Tuple[Any, ...]
    rest_heatmap: torch.Tensor
    channel_relevance: torch.Tensor
    prediction: torch.Tensor
    rank_by: str = "signed"

    @property
    def top_k(self) -> int:
        """Number of channels decomposed."""
        return int(self.channels.numel())

    @property
    def total_relevance(self) -> float:
        """Sum of the relevance of all channels of the layer."""
        return float(self.channel_relevance.sum())

    def completeness_error(self) -> float:
        """Relative error ``|sum(channel_heatmaps) + rest - heatmap| / |heatmap|`` (Frobenius norms)."""
        total = self.channel_heatmaps.double().sum(0) + self.rest_heatmap.double()
        reference = self.heatmap.double()
        norm = float(reference.norm())
        return float((total - reference).norm()) / (norm if norm > 0 else 1.0)

    def label_strings(self) -> List[Optional[str]]:
        """The formula of each channel's label as text (None where unlabeled)."""
        return [None if label is None else str(label.formula) for label in self.labels]

    def to(self, device) -> "GlocalExplanation":
        """A copy with all tensors on ``device``."""
        values = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                  for name, value in self.__dict__.items()}
        return GlocalExplanation(**values)


def decompose_batch(attribution, samples: torch.Tensor, target, layer: str, composite, labels=None,
                    top_k: int = 8, rank_by: str = "signed", batch_size: int = 32, device=None,
                    progress: bool = False) -> List[GlocalExplanation]:
    """Decompose the heatmaps of a batch of samples into the conditional heatmaps of ``layer``'s channels.

    Each sample gets its own top channels. All conditional heatmaps (``top_k`` per sample, plus one
    rest heatmap) are computed with several conditions per backward pass (``batch_size`` rows each).

    Parameters
    ----------
    attribution : crp.attribution.CondAttribution
        CRP's attribution object over the model.
    samples : torch.Tensor
        [B, ...] input batch.
    target : int, sequence of int or None
        The output explained, one for all samples or one per sample; None takes the predicted class.
    layer : str
        Name of the layer whose channels decompose the heatmap (a module name of the model).
    composite : zennit.core.Composite
        LRP composite (with canonizers) used by CRP.
    labels : LayerLabels, mapping of layer name to LayerLabels, or None
        INVERT labels of the layer; each channel gets its best Explanation.
    top_k : int
        Number of channels, 1 <= top_k <= number of channels of the layer.
    rank_by : {"signed", "absolute"}
        Rank channels by their signed relevance (default) or by its absolute value.
    batch_size : int
        Rows (sample, condition) per forward/backward pass.
    device : torch.device or str, optional
        Where to compute; default: the attribution's device.
    progress : bool
        Show a tqdm progress bar over the passes.

    Returns
    -------
    list of GlocalExplanation
        One per sample, in order; tensors on ``device``.

    Raises
    ------
    KeyError
        ``layer`` is not a module of the model, or ``labels`` is a mapping without ``layer``.
    ValueError
        a target out of range, ``top_k`` out of range, labels with another channel count or layer,
        an unknown ``rank_by``.
    """
    from crp.concepts import ChannelConcept

    rank_by = _check_rank_by(rank_by)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = attribution.model
    _get_module(model, layer)
    device = attribution.device if device is None else torch.device(device)
    data = _prepare(samples, device)
    if data.dim() < 2:
        raise ValueError(f"samples must have a batch dimension, got shape {tuple(data.shape)}")
    n_samples = data.shape[0]

    prediction, layer_shape = _probe(model, data, layer)
    if len(layer_shape) < 2:
        raise ValueError(f"layer {layer!r} has output shape {layer_shape}; expected [batch, channels, ...]")
    n_channels = layer_shape[1]
    targets = _as_targets(target, n_samples, prediction.shape[1], prediction)
    top_k = _check_top_k(top_k, n_channels, layer)
    layer_labels = _layer_labels(labels, layer, n_channels)

    with _no_leaked_hooks(model):
        # class heatmaps and the relevance of the layer
        class_conditions = [{"y": [t]} for t in targets]
        heatmaps, layer_relevance = _attribute(attribution, data, class_conditions, composite, layer,
                                               record=True, exclude_parallel=True, batch_size=batch_size)
        channel_rel = ChannelConcept().attribute(layer_relevance, abs_norm=False)  # [B, C]
        order = _rank(channel_rel, rank_by)[:, :top_k]  # [B, top_k]

        # one row per (sample, top channel)
        rows = data.repeat_interleave(top_k, dim=0)
        conditions = [{"y": [targets[i]], layer: [int(c)]}
                      for i in range(n_samples) for c in order[i].tolist()]
        channel_heatmaps, _ = _attribute(attribution, rows, conditions, composite, layer, record=False,
                                         exclude_parallel=True, batch_size=batch_size, progress=progress)
        channel_heatmaps = channel_heatmaps.reshape(n_samples, top_k, *channel_heatmaps.shape[1:])

        # the rest: complement channels plus whatever bypasses the layer
        rest_conditions = []
        for i in range(n_samples):
            chosen = set(order[i].tolist())
            complement = [c for c in range(n_channels) if c not in chosen]
            rest_conditions.append({"y": [targets[i]], layer: complement})
        rest_heatmaps, _ = _attribute(attribution, data, rest_conditions, composite, layer, record=False,
                                      exclude_parallel=False, batch_size=batch_size)

    results = []
    for i in range(n_samples):
        total = channel_rel[i].sum()
        relevance = channel_rel[i, order[i]]
        share = relevance / total if total != 0 else torch.zeros_like(relevance)
        results.append(GlocalExplanation(
            layer=layer,
            target=targets[i],
            heatmap=heatmaps[i],
            channels=order[i].clone(),
            channel_heatmaps=channel_heatmaps[i],
            relevance=relevance,
            share=share,
            labels=tuple(_best_label(layer_labels, c) for c in order[i].tolist()),
            rest_heatmap=rest_heatmaps[i],
            channel_relevance=channel_rel[i],
            prediction=prediction[i].detach(),
            rank_by=rank_by,
        ))
    return results


def decompose(attribution, sample: torch.Tensor, target, layer: str, composite, labels=None, top_k: int = 8,
              rank_by: str = "signed", batch_size: int = 32, device=None,
              progress: bool = False) -> GlocalExplanation:
    """Decompose the heatmap of one sample into the labeled conditional heatmaps of ``layer``'s channels.

    ``channel_heatmaps`` has shape [top_k, H, W]; for a batch of samples use :py:func:`decompose_batch`,
    which returns one :py:class:`GlocalExplanation` per sample.

    Parameters
    ----------
    attribution : crp.attribution.CondAttribution
    sample : torch.Tensor
        One input of shape [1, ...] (CRP's convention).
    target : int or None
        The output explained; None takes the predicted class.
    layer, composite, labels, top_k, rank_by, batch_size, device, progress
        As in :py:func:`decompose_batch`.

    Returns
    -------
    GlocalExplanation

    Examples
    --------
    >>> g = decompose(attribution, sample, target, layer="features.40", composite=composite,
    ...               labels=layer_labels, top_k=8)   # doctest: +SKIP
    >>> g.channel_heatmaps.shape                      # doctest: +SKIP
    torch.Size([8, 224, 224])
    """
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dim() < 2 or sample.shape[0] != 1:
        raise ValueError(f"decompose explains one sample of shape [1, ...] (CRP's convention), got shape "
                         f"{tuple(sample.shape)}; use decompose_batch for a batch, or sample.unsqueeze(0)")
    if isinstance(target, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(target, str):
        raise TypeError("decompose takes one int target (or None); use decompose_batch for several")
    return decompose_batch(attribution, sample, target, layer, composite, labels=labels, top_k=top_k,
                           rank_by=rank_by, batch_size=batch_size, device=device, progress=progress)[0]


def channel_relevances(attribution, data, target, layer: str, composite, batch_size: int = 32,
                       device=None, progress: bool = False) -> torch.Tensor:
    """Per-channel relevance of ``layer`` for each sample, ``ChannelConcept.attribute(R, abs_norm=False)``.

    Parameters
    ----------
    attribution : crp.attribution.CondAttribution
    data : torch.Tensor or iterable
        [N, ...] inputs, or an iterable of batches (tensors or ``(input, target, ...)`` tuples).
    target : int, sequence of int or None
        The output the relevance is computed for (one for all, one per sample, or None for the
        predicted class).
    layer, composite, batch_size, device, progress
        As in :py:func:`decompose_batch`.

    Returns
    -------
    torch.Tensor
        [N, C] on the CPU.
    """
    from crp.concepts import ChannelConcept

    model = attribution.model
    _get_module(model, layer)
    device = attribution.device if device is None else torch.device(device)
    batches = [data] if isinstance(data, torch.Tensor) else data
    if isinstance(target, (torch.Tensor, np.ndarray)):
        target = target.tolist()
    results, offset = [], 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        batch = _prepare(batch, device)
        prediction, layer_shape = _probe(model, batch, layer)
        if isinstance(target, Sequence) and not isinstance(target, str):
            batch_target = list(target[offset:offset + len(batch)])
        else:
            batch_target = target
        targets = _as_targets(batch_target, len(batch), prediction.shape[1], prediction)
        with _no_leaked_hooks(model):
            _, rel = _attribute(attribution, batch, [{"y": [t]} for t in targets], composite, layer,
                                record=True, exclude_parallel=True, batch_size=batch_size, progress=progress)
        results.append(ChannelConcept().attribute(rel, abs_norm=False).cpu())
        offset += len(batch)
    if not results:
        raise ValueError("data holds no samples")
    return torch.cat(results, dim=0)


# ------------------------------------------------------------------------------------------------
# circuits
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CircuitNode:
    """A channel in a circuit: its layer, index, label (formula text) and the label's AUC."""

    layer: str
    channel: int
    label: Optional[str] = None
    auc: Optional[float] = None
    value: Optional[float] = None

    @property
    def id(self) -> str:
        """``"layer:channel"``."""
        return f"{self.layer}:{self.channel}"

    def to_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "layer": self.layer, "channel": self.channel, "label": self.label,
                "auc": self.auc, "value": self.value}


@dataclass(frozen=True)
class CircuitEdge:
    """A connection from an earlier-layer channel (``source``) to a later one (``target``), by node id."""

    source: str
    target: str
    value: float


@dataclass(frozen=True)
class Circuit:
    """A plain, exportable circuit: labeled nodes and weighted edges.

    Edges point in the forward direction: from a channel of an earlier layer (``source``) to the channel
    or output it feeds (``target``). ``quantity`` names what the edge value is: ``"weight"`` (direct
    linear weight) or ``"relevance"``.
    """

    nodes: Tuple[CircuitNode, ...]
    edges: Tuple[CircuitEdge, ...]
    quantity: str = "relevance"
    meta: Dict[str, Any] = field(default_factory=dict)

    def node(self, node_id: str) -> CircuitNode:
        """The node with id ``"layer:channel"``."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(f"no node {node_id!r} in the circuit")

    @property
    def layers(self) -> List[str]:
        """Layers of the nodes, in order of first appearance."""
        return list(dict.fromkeys(node.layer for node in self.nodes))

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-able dict with ``quantity``, ``meta``, ``nodes`` and ``edges`` (source, target, value)."""
        return {
            "quantity": self.quantity,
            "meta": dict(self.meta),
            "nodes": [node.to_dict() for node in self.nodes],
            "edges": [{"source": edge.source, "target": edge.target, self.quantity: edge.value}
                      for edge in self.edges],
        }

    def to_json(self, path=None, indent: int = 2) -> str:
        """The circuit as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
        return text

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "Circuit":
        quantity = obj["quantity"]
        nodes = tuple(CircuitNode(layer=node["layer"], channel=int(node["channel"]), label=node.get("label"),
                                  auc=node.get("auc"), value=node.get("value")) for node in obj["nodes"])
        edges = tuple(CircuitEdge(edge["source"], edge["target"], float(edge[quantity]))
                      for edge in obj["edges"])
        return cls(nodes=nodes, edges=edges, quantity=quantity, meta=dict(obj.get("meta", {})))

    @classmethod
    def from_json(cls, text_or_path) -> "Circuit":
        """Read a circuit from JSON text or from a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as handle:
                text = handle.read()
        return cls.from_dict(json.loads(text))


def _label_node(layer: str, channel: int, labels, value=None) -> CircuitNode:
    best = _best_label(labels, channel)
    return CircuitNode(layer=layer, channel=int(channel),
                       label=None if best is None else str(best.formula),
                       auc=None if best is None else float(best.auc),
                       value=None if value is None else float(value))


def _top_channels(values: torch.Tensor, k: int, rank_by: str) -> List[int]:
    return _rank(values, rank_by)[:k].tolist()


def _check_target(target, n_outputs: int) -> int:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise TypeError(f"target must be an int, got {type(target).__name__}")
    if not 0 <= target < n_outputs:
        raise ValueError(f"target {target} is out of range (expected 0 <= target < {n_outputs})")
    return int(target)


def circuit_by_weight(linear: Union[torch.nn.Module, str], target: int, k: int = 8, labels=None, *,
                      model: Optional[torch.nn.Module] = None, source_layer: Optional[str] = None,
                      target_name: Optional[str] = None, rank_by: str = "signed") -> Circuit:
    """The ``k`` input channels of a linear layer with the largest weight to output ``target``.

    The paper's circuit for ResNet18 (avgpool -> fc): the channels of the pooled layer that feed a
    class logit most strongly, each with its INVERT label.

    Parameters
    ----------
    linear : torch.nn.Module or str
        A module with a 2-D ``weight`` [outputs, inputs] (``torch.nn.Linear``), or its name in ``model``.
    target : int
        The output (row of the weight).
    k : int
        Number of input channels.
    labels : LayerLabels, optional
        Labels of the layer that feeds ``linear`` (one per input channel).
    model : torch.nn.Module, optional
        Needed when ``linear`` is a name.
    source_layer : str, optional
        Name of the feeding layer for the nodes; default ``labels.layer`` or ``"<linear>.input"``.
    target_name : str, optional
        Label of the output node (e.g. the class name).
    rank_by : {"signed", "absolute"}

    Returns
    -------
    Circuit
        ``quantity="weight"``: the output node first, then the k channels best first; node and edge value
        is the weight.
    """
    rank_by = _check_rank_by(rank_by)
    if isinstance(linear, str):
        if model is None:
            raise ValueError(f"linear={linear!r} is a name: pass the model too (model=...)")
        name, module = linear, _get_module(model, linear)
    elif isinstance(linear, torch.nn.Module):
        module = linear
        name = "linear"
        if model is not None:
            name = next((n for n, m in model.named_modules() if m is module), name)
    else:
        raise TypeError(f"linear must be a torch.nn.Module or a layer name, got {type(linear).__name__}")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"layer {name!r} has no 2-D weight [outputs, inputs] "
                         f"(a torch.nn.Linear is expected)")
    target = _check_target(target, weight.shape[0])
    n_inputs = weight.shape[1]
    k = _check_top_k(k, n_inputs, f"{name} (inputs)")
    if source_layer is None:
        source_layer = getattr(labels, "layer", None) or f"{name}.input"
    layer_labels = _layer_labels(labels, source_layer, n_inputs)
    row = weight.detach()[target].cpu()
    channels = _top_channels(row, k, rank_by)
    output = CircuitNode(layer=name, channel=target, label=target_name)
    nodes = [output] + [_label_node(source_layer, c, layer_labels, row[c]) for c in channels]
    edges = [CircuitEdge(node.id, output.id, float(row[node.channel])) for node in nodes[1:]]
    return Circuit(nodes=tuple(nodes), edges=tuple(edges), quantity="weight",
                   meta={"kind": "weight", "linear": name, "target": target, "k": k, "rank_by": rank_by})


def circuit_by_relevance(relevances, target: int, k: int = 8, labels=None, *, layer: Optional[str] = None,
                         sample_targets=None, target_layer: str = "y", target_name: Optional[str] = None,
                         n_outputs: Optional[int] = None, rank_by: str = "signed") -> Circuit:
    """The ``k`` channels of a layer with the largest mean relevance for output ``target``.

    Parameters
    ----------
    relevances : torch.Tensor, numpy.ndarray or ActivationCache
        [N, C] per-channel relevance of each sample (from :py:func:`channel_relevances`, or a cache's
        ``relevances(layer)``, which holds each sample's relevance w.r.t. the target CRP used for it).
    target : int
        The output explained.
    k : int
        Number of channels.
    labels : LayerLabels or mapping of layer to LayerLabels, optional
    layer : str, optional
        Layer name (required for a cache; default ``labels.layer``).
    sample_targets : array-like of int, optional
        [N] the target of each row; when given only the rows with ``sample_targets == target`` are averaged
        (the rows of a cache are relevances w.r.t. each sample's own target).
    target_layer : str
        Layer name of the output node (default ``"y"``, CRP's name of the model output).
    target_name : str, optional
        Label of the output node.
    n_outputs : int, optional
        Number of outputs, to check ``target``.
    rank_by : {"signed", "absolute"}

    Returns
    -------
    Circuit
        ``quantity="relevance"``; node and edge value is the mean relevance.
    """
    rank_by = _check_rank_by(rank_by)
    if hasattr(relevances, "relevances") and not isinstance(relevances, (torch.Tensor, np.ndarray)):
        if layer is None:
            raise ValueError("layer is required to read relevances from a cache")
        relevances = relevances.relevances(layer)
    if not isinstance(relevances, torch.Tensor):
        relevances = np.asarray(relevances)
    matrix = torch.as_tensor(relevances)
    if matrix.dim() != 2:
        raise ValueError(f"relevances must have shape [N, C], got {tuple(matrix.shape)}")
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise TypeError(f"target must be an int, got {type(target).__name__}")
    if n_outputs is not None:
        _check_target(target, n_outputs)
    elif target < 0:
        raise ValueError(f"target {target} is out of range (expected target >= 0)")
    if layer is None:
        layer = getattr(labels, "layer", None) or "layer"
    n_channels = matrix.shape[1]
    k = _check_top_k(k, n_channels, layer)
    layer_labels = _layer_labels(labels, layer, n_channels)
    rows = matrix.double()
    if sample_targets is not None:
        sample_targets = torch.as_tensor(np.asarray(sample_targets)).reshape(-1)
        if len(sample_targets) != len(rows):
            raise ValueError(f"sample_targets has {len(sample_targets)} entries for {len(rows)} rows "
                             f"of relevance")
        rows = rows[sample_targets == target]
        if len(rows) == 0:
            raise ValueError(f"no sample has target {target}")
    mean = rows.mean(dim=0)
    channels = _top_channels(mean, k, rank_by)
    output = CircuitNode(layer=target_layer, channel=int(target), label=target_name)
    nodes = [output] + [_label_node(layer, c, layer_labels, mean[c]) for c in channels]
    edges = [CircuitEdge(node.id, output.id, float(mean[node.channel])) for node in nodes[1:]]
    return Circuit(nodes=tuple(nodes), edges=tuple(edges), quantity="relevance",
                   meta={"kind": "relevance", "layer": layer, "target": int(target), "k": k,
                         "n_samples": int(len(rows)), "rank_by": rank_by})


def _channel_of_concept(text: str, labels, layer: str) -> int:
    """The channel whose best label is the formula ``text`` (highest AUC among several)."""
    from .formula import Formula

    if labels is None:
        raise ValueError(f"channel={text!r} names a concept: pass labels for layer {layer!r}")
    formula = Formula.parse(text)
    matches = [(c, best.auc) for c in range(len(labels))
               for best in [_best_label(labels, c)] if best is not None and best.formula == formula]
    if not matches:
        raise KeyError(f"no channel of layer {layer!r} has the best label {str(formula)!r}")
    return max(matches, key=lambda match: (match[1], -match[0]))[0]


def concept_circuit(attribution, sample: torch.Tensor, composite, layer: str, channel: int,
                    layers: Sequence[str], labels: Optional[Mapping[str, Any]] = None,
                    width: Sequence[int] = (4, 2),
                    target: Optional[int] = None, abs_norm: bool = True, batch_size: int = 16,
                    graph=None, device=None) -> Circuit:
    """Follow CRP's AttributionGraph from a labeled concept down to labeled sub-concepts in earlier layers.

    Parameters
    ----------
    attribution : crp.attribution.CondAttribution
    sample : torch.Tensor
        One input [1, ...].
    composite : zennit.core.Composite
    layer : str
        Layer of the concept to decompose.
    channel : int or str
        Channel of the concept in ``layer``, or a formula text (``"dog"``, ``"wheel AND NOT car"``): the
        channel whose best label is that formula, with the highest AUC among them (needs ``labels[layer]``).
    layers : sequence of str
        The layers the graph may pass through (CRP's ``layer_names`` of ``trace_model_graph``; must include
        ``layer``). Each gets a ``ChannelConcept``.
    labels : mapping of layer name to LayerLabels, optional
        Labels per layer; nodes of layers without labels stay unlabeled.
    width : sequence of int
        How many sub-concepts per step, one entry per step down (CRP's ``width``).
    target : int, optional
        Decompose w.r.t. this output; None starts at ``layer`` with its activation.
    abs_norm : bool
        Edge relevance normalized by the sum of absolute relevance of the lower layer (CRP default).
    batch_size : int
        Maximal conditions per pass.
    graph : crp.graph.ModelGraph, optional
        A graph from ``crp.graph.trace_model_graph`` (traced when not given).
    device : torch.device or str, optional

    Returns
    -------
    Circuit
        ``quantity="relevance"``; the first node is the concept, edges go from sub-concept to concept.
    """
    from crp.attribution import AttributionGraph
    from crp.concepts import ChannelConcept
    from crp.graph import trace_model_graph

    model = attribution.model
    layers = list(layers)
    for name in layers + [layer]:
        _get_module(model, name)
    if layer not in layers:
        raise ValueError(f"layer {layer!r} must be one of layers={layers}")
    if not width or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in width):
        raise ValueError(f"width must be a non-empty sequence of positive ints, got {width!r}")
    device = attribution.device if device is None else torch.device(device)
    data = _prepare(sample, device)
    if data.shape[0] != 1:
        raise ValueError(f"concept_circuit explains one sample [1, ...], got a batch of {data.shape[0]}")
    prediction, layer_shape = _probe(model, data, layer)
    n_channels = layer_shape[1]
    if target is not None:
        target = _check_target(target, prediction.shape[1])
    labels = dict(labels or {})
    checked = {}
    for name in layers:
        if name in labels:
            _, shape = _probe(model, data, name)
            checked[name] = _layer_labels(labels[name], name, shape[1])
    if isinstance(channel, str):
        channel = _channel_of_concept(channel, checked.get(layer), layer)
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)):
        raise TypeError(f"channel must be an int or a formula text, got {type(channel).__name__}")
    if not 0 <= channel < n_channels:
        raise ValueError(f"channel {channel} is out of range: layer {layer!r} has {n_channels} channels")

    with _no_leaked_hooks(model):
        if graph is None:
            with warnings.catch_warnings():
                # CRP traces with torch.jit.trace, deprecated in torch 2.x; nothing a user can act on
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
                graph = trace_model_graph(model, data, layers)
        attribution_graph = AttributionGraph(attribution, graph, {name: ChannelConcept() for name in layers})
        nodes, connections = attribution_graph(
            data.clone().requires_grad_(True), composite, int(channel), layer, target=target,
            width=list(width), abs_norm=abs_norm, batch_size=batch_size, verbose=False)

    circuit_nodes = {}
    for node_layer, node_channel in nodes:
        key = (node_layer, int(node_channel))
        if key not in circuit_nodes:
            circuit_nodes[key] = _label_node(node_layer, int(node_channel), checked.get(node_layer))
    edges = []
    for (upper_layer, upper_channel), children in connections.items():
        upper = circuit_nodes[(upper_layer, int(upper_channel))]
        for lower_layer, lower_channel, rel in children:
            lower = circuit_nodes[(lower_layer, int(lower_channel))]
            edges.append(CircuitEdge(lower.id, upper.id, float(rel)))
    return Circuit(nodes=tuple(circuit_nodes.values()), edges=tuple(edges), quantity="relevance",
                   meta={"kind": "attribution_graph", "layer": layer, "channel": int(channel),
                         "target": target, "width": list(width), "abs_norm": abs_norm})
