"""Labeled circuits: the channels that matter most for a class logit (by direct weight, by mean relevance
over a dataset) or below one labeled concept (CRP's :py:class:`crp.attribution.AttributionGraph`), each
channel named by its INVERT label (paper figure 7 and appendix A.8).

Layer names are module names as for recording: leaves, containers (``"layer4"``) and modules called
several times per forward pass. CRP's ``trace_model_graph`` knows only the leaf operations of the traced
model; :py:func:`concept_circuit` maps each requested name to the traced operation that produces its
output (for a container the last operation of the block, for a module called twice its last call) and
answers AttributionGraph's one question, which requested layers feed a layer, from that.
"""
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.checks import is_int
from ..core.jsonio import read_json, write_json
from .guard import model_guard
from .layers import (
    LastCall,
    channel_count,
    check_rank_by,
    check_top_k,
    get_module,
    prepare,
    probe,
    rank_channels,
)
from .shown_labels import NO_RELIABLE_LABEL, best_reliable, checked_layer_labels

logger = logging.getLogger(__name__)

__all__ = ["CircuitNode", "CircuitEdge", "Circuit", "circuit_by_weight", "circuit_by_relevance", "concept_circuit"]


@dataclass(frozen=True)
class CircuitNode:
    """A channel in a circuit: its layer, index, best reliable label (formula text) and the label's statistics.

    ``label`` is None where the node's layer has no labels or (``note == NO_RELIABLE_LABEL``) where the
    channel has no reliable explanation; ``support`` (samples where the formula holds) and ``q`` (its
    Benjamini-Hochberg q-value) come with the label. An output node's label is the class name.
    """

    layer: str
    channel: int
    label: str | None = None
    auc: float | None = None
    value: float | None = None
    support: int | None = None
    q: float | None = None
    note: str | None = None

    @property
    def shown_label(self) -> str | None:
        """What a view shows under the node: the label, or the note ("no reliable label"), or None."""
        return self.label if self.label is not None else self.note

    @property
    def id(self) -> str:
        """``"layer:channel"``."""
        return f"{self.layer}:{self.channel}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "layer": self.layer, "channel": self.channel, "label": self.label,
                "auc": self.auc, "value": self.value, "support": self.support, "q": self.q, "note": self.note}


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

    nodes: tuple[CircuitNode, ...]
    edges: tuple[CircuitEdge, ...]
    quantity: str = "relevance"
    meta: dict[str, Any] = field(default_factory=dict)

    def node(self, node_id: str) -> CircuitNode:
        """The node with id ``"layer:channel"``."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(f"no node {node_id!r} in the circuit")

    @property
    def layers(self) -> list[str]:
        """Layers of the nodes, in order of first appearance."""
        return list(dict.fromkeys(node.layer for node in self.nodes))

    def to_dict(self) -> dict[str, Any]:
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
        return write_json(self.to_dict(), path, indent)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "Circuit":
        quantity = obj["quantity"]
        nodes = tuple(CircuitNode(layer=node["layer"], channel=int(node["channel"]), label=node.get("label"),
                                  auc=node.get("auc"), value=node.get("value"), support=node.get("support"),
                                  q=node.get("q"), note=node.get("note")) for node in obj["nodes"])
        edges = tuple(CircuitEdge(edge["source"], edge["target"], float(edge[quantity]))
                      for edge in obj["edges"])
        return cls(nodes=nodes, edges=edges, quantity=quantity, meta=dict(obj.get("meta", {})))

    @classmethod
    def from_json(cls, text_or_path) -> "Circuit":
        """Read a circuit from JSON text or from a file path."""
        return cls.from_dict(read_json(text_or_path))


def _label_node(layer: str, channel: int, labels, value=None) -> CircuitNode:
    """The node of ``channel`` with its best reliable label (or the note "no reliable label")."""
    value = None if value is None else float(value)
    best = best_reliable(labels, channel)
    if best is None:
        return CircuitNode(layer=layer, channel=int(channel), value=value,
                           note=None if labels is None else NO_RELIABLE_LABEL)
    support = getattr(best, "support", None)
    q = getattr(best, "p_value_bh", None)
    return CircuitNode(layer=layer, channel=int(channel), label=str(best.formula), auc=float(best.auc), value=value,
                       support=None if support is None else int(support), q=None if q is None else float(q))


def _top_channels(values: torch.Tensor, k: int, rank_by: str) -> list[int]:
    return rank_channels(values, rank_by)[:k].tolist()


def _check_target(target, n_outputs: int) -> int:
    if not is_int(target):
        raise TypeError(f"target must be an int, got {type(target).__name__}")
    if not 0 <= target < n_outputs:
        raise ValueError(f"target {target} is out of range (expected 0 <= target < {n_outputs})")
    return int(target)


def _sequential_output(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose output a (nested) Sequential returns: its last child, recursively."""
    while isinstance(module, torch.nn.Sequential) and len(module):
        module = module[-1]
    return module


def circuit_by_weight(linear: torch.nn.Module | str, target: int, k: int = 8, labels=None, *,
                      model: torch.nn.Module | None = None, source_layer: str | None = None,
                      target_name: str | None = None, rank_by: str = "signed") -> Circuit:
    """The ``k`` input channels of a linear layer with the largest weight to output ``target``.

    The paper's circuit for ResNet18 (avgpool -> fc): the channels of the pooled layer that feed a
    class logit most strongly, each with its INVERT label.

    Parameters
    ----------
    linear : torch.nn.Module or str
        A module with a 2-D ``weight`` [outputs, inputs] (``torch.nn.Linear``), or its name in ``model``;
        a Sequential container (``"classifier"``) stands for the last module in it, whose output it is.
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
    rank_by = check_rank_by(rank_by)
    if isinstance(linear, str):
        if model is None:
            raise ValueError(f"linear={linear!r} is a name: pass the model too (model=...)")
        name, module = linear, get_module(model, linear)
    elif isinstance(linear, torch.nn.Module):
        module = linear
        name = "linear"
        if model is not None:
            name = next((n for n, m in model.named_modules() if m is module), name)
    else:
        raise TypeError(f"linear must be a torch.nn.Module or a layer name, got {type(linear).__name__}")
    weight = getattr(_sequential_output(module), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"layer {name!r} has no 2-D weight [outputs, inputs] "
                         f"(a torch.nn.Linear, or a Sequential ending with one, is expected)")
    target = _check_target(target, weight.shape[0])
    n_inputs = weight.shape[1]
    k = check_top_k(k, n_inputs, f"{name} (inputs)")
    if source_layer is None:
        source_layer = getattr(labels, "layer", None) or f"{name}.input"
    layer_labels = checked_layer_labels(labels, source_layer, n_inputs)
    row = weight.detach()[target].cpu()
    channels = _top_channels(row, k, rank_by)
    output = CircuitNode(layer=name, channel=target, label=target_name)
    nodes = [output] + [_label_node(source_layer, c, layer_labels, row[c]) for c in channels]
    edges = [CircuitEdge(node.id, output.id, float(row[node.channel])) for node in nodes[1:]]
    return Circuit(nodes=tuple(nodes), edges=tuple(edges), quantity="weight",
                   meta={"kind": "weight", "linear": name, "target": target, "k": k, "rank_by": rank_by})


def circuit_by_relevance(relevances, target: int, k: int = 8, labels=None, *, layer: str | None = None,
                         sample_targets=None, target_layer: str = "y", target_name: str | None = None,
                         n_outputs: int | None = None, rank_by: str = "signed") -> Circuit:
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
    rank_by = check_rank_by(rank_by)
    if hasattr(relevances, "relevances") and not isinstance(relevances, (torch.Tensor, np.ndarray)):
        if layer is None:
            raise ValueError("layer is required to read relevances from a cache")
        relevances = relevances.relevances(layer)
    if not isinstance(relevances, torch.Tensor):
        relevances = np.asarray(relevances)
    matrix = torch.as_tensor(relevances)
    if matrix.dim() != 2:
        raise ValueError(f"relevances must have shape [N, C], got {tuple(matrix.shape)}")
    if not is_int(target):
        raise TypeError(f"target must be an int, got {type(target).__name__}")
    if n_outputs is not None:
        _check_target(target, n_outputs)
    elif target < 0:
        raise ValueError(f"target {target} is out of range (expected target >= 0)")
    if layer is None:
        layer = getattr(labels, "layer", None) or "layer"
    n_channels = matrix.shape[1]
    k = check_top_k(k, n_channels, layer)
    layer_labels = checked_layer_labels(labels, layer, n_channels)
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
    """The channel whose best reliable label is the formula ``text`` (highest AUC among several)."""
    from ..core.formula import Formula

    if labels is None:
        raise ValueError(f"channel={text!r} names a concept: pass labels for layer {layer!r}")
    formula = Formula.parse(text)
    matches = [(c, best.auc) for c in range(len(labels))
               for best in [best_reliable(labels, c)] if best is not None and best.formula == formula]
    if not matches:
        raise KeyError(f"no channel of layer {layer!r} has the best reliable label {str(formula)!r}")
    return max(matches, key=lambda match: (match[1], -match[0]))[0]


class _Operation:
    """One traced operation: the modules it runs in (outermost first), whether it computes (an ``aten``
    operation) and its neighbours in the data flow."""

    __slots__ = ("modules", "computes", "input_nodes", "output_nodes")

    def __init__(self, scope: str, computes: bool) -> None:
        prefix = "__module."
        self.modules = tuple(part[len(prefix):] for part in str(scope).split("/") if part.startswith(prefix))
        self.computes = computes
        self.input_nodes: list[_Operation] = []
        self.output_nodes: list[_Operation] = []


def _trace_operations(model: torch.nn.Module, data: torch.Tensor) -> list["_Operation"]:
    """The operations of one traced forward pass that depend on the input, linked by the tensors they pass.

    ``torch.jit.trace`` as CRP's ``trace_model_graph`` uses it, read in one pass over the graph (CRP's
    reading searches all nodes for the users of each node: minutes on DenseNet121).
    """
    with warnings.catch_warnings():
        # torch.jit.trace is deprecated in torch 2.x; nothing a user can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (data,), check_trace=False)
    graph = traced.inlined_graph
    produced_by: dict[int, _Operation] = {}
    reached = {value.unique() for value in list(graph.inputs())[1:]}  # the data, not the module itself
    operations = []
    for node in graph.nodes():
        sources = [value.unique() for value in node.inputs()]
        if not any(source in reached for source in sources):
            continue
        operation = _Operation(node.scopeName(), "aten" in node.kind())
        for source in sources:
            producer = produced_by.get(source)
            if producer is not None and producer not in operation.input_nodes:
                operation.input_nodes.append(producer)
                producer.output_nodes.append(operation)
        for value in node.outputs():
            reached.add(value.unique())
            produced_by[value.unique()] = operation
        operations.append(operation)
    return operations


def _operations_of(model_graph) -> list["_Operation"]:
    """The operations of a graph from CRP's ``trace_model_graph``."""
    operations = {id(node): _Operation(node.scopeName, bool(node.is_layer))
                  for node in model_graph.id_node_map.values()}
    for node in model_graph.id_node_map.values():
        operation = operations[id(node)]
        operation.input_nodes = [operations[id(other)] for other in node.input_nodes]
        operation.output_nodes = [operations[id(other)] for other in node.output_nodes]
    return list(operations.values())


def _downstream(node: _Operation, targets: set) -> bool:
    """Whether any operation in ``targets`` (ids) is reachable from ``node`` along the data flow."""
    seen, stack = {id(node)}, list(node.output_nodes)
    while stack:
        current = stack.pop()
        if id(current) in targets:
            return True
        if id(current) not in seen:
            seen.add(id(current))
            stack.extend(current.output_nodes)
    return False


def _output_node(operations: Sequence[_Operation], name: str) -> _Operation:
    """The traced operation that produces the output of module ``name``.

    The operations of the module (its scope and the scopes inside it) that feed something outside it
    are its exits; the output is the exit that no other exit leads to: for a container the last operation
    of the block, for a module called several times its last call.
    """
    inside = [node for node in operations if name in node.modules]
    if not inside:
        raise KeyError(f"layer {name!r} runs no operation in the traced graph of the model")
    members = {id(node) for node in inside}
    exits = [node for node in inside
             if not node.output_nodes or any(id(out) not in members for out in node.output_nodes)]
    last = [node for node in exits if not _downstream(node, {id(other) for other in exits if other is not node})]
    if len(last) != 1 or not last[0].computes:
        raise ValueError(f"layer {name!r} has {len(last)} parallel outputs in the traced graph; a circuit "
                         f"needs a module with one output tensor")
    return last[0]


class _LayerGraph:
    """Which requested layers feed each requested layer: the one question CRP's ``AttributionGraph`` asks its
    graph (``find_input_layers``), answered from the traced operations of the model.

    CRP names every traced operation by the module it runs in, so a container has no node of its own (or only
    its own operations, such as BasicBlock's residual sum) and a module called twice has one node per call.
    Here each requested module is the operation that produces its output (:func:`_output_node`), and the
    walk from it against the data flow stops at the outputs of the other requested modules, visiting each
    operation once. CRP's own walk follows every path, which lists an input layer once per path (ResNet:
    main path and shortcut; AttributionGraph then repeats its nodes and edges) and takes exponential time
    on DenseNet's dense connections. The order of the input layers is CRP's (first occurrence).
    """

    def __init__(self, operations: Sequence[_Operation], names: Sequence[str]) -> None:
        outputs = {name: _output_node(operations, name) for name in names}
        owner: dict[int, str] = {}
        for name, node in outputs.items():
            if id(node) in owner:
                raise ValueError(f"layers {owner[id(node)]!r} and {name!r} are the same tensor (one is the output "
                                 f"of the other); keep one of them in layers")
            owner[id(node)] = name
        self.inputs = {name: _input_layers(node, owner) for name, node in outputs.items()}

    def find_input_layers(self, layer_name: str) -> list[str]:
        if layer_name not in self.inputs:
            raise KeyError(f"layer {layer_name!r} is not one of the circuit's layers {list(self.inputs)}")
        return list(self.inputs[layer_name])


def _input_layers(start, owner: Mapping[int, str]) -> list[str]:
    """Requested layers whose output reaches ``start`` without passing another requested output (DFS preorder)."""
    found: list[str] = []
    seen = set()
    stack = list(reversed(start.input_nodes))
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in owner:
            if owner[id(node)] not in found:
                found.append(owner[id(node)])
            continue
        stack.extend(reversed(node.input_nodes))
    return found


class _ClosingAttribution:
    """A CondAttribution seen through a proxy that closes, on :meth:`close`, the generators its ``generate``
    made: ``AttributionGraph`` interrupted by an error leaves CRP's generator suspended inside the composite
    context (canonizers applied) until garbage collection."""

    def __init__(self, attribution) -> None:
        self._attribution = attribution
        self._generators: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attribution, name)

    def generate(self, *args, **kwargs):
        generator = self._attribution.generate(*args, **kwargs)
        self._generators.append(generator)
        return generator

    def close(self) -> None:
        for generator in self._generators:
            generator.close()
        self._generators.clear()


class _LastCallConcept:
    """CRP's ChannelConcept whose mask acts on the last call of a module called several times (see
    :py:class:`crp_invert.integration.layers.LastCall`); relevances are read as ChannelConcept reads them."""

    def __init__(self, last_call: LastCall) -> None:
        from crp.concepts import ChannelConcept

        self._channel = ChannelConcept()
        self.mask = last_call.mask

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


def concept_circuit(attribution, sample: torch.Tensor, composite, layer: str, channel: int,
                    layers: Sequence[str], labels: Mapping[str, Any] | None = None,
                    width: Sequence[int] = (4, 2),
                    target: int | None = None, abs_norm: bool = True, batch_size: int = 16,
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
        ``layer``). Each gets a ``ChannelConcept``. Any module names: leaves, containers (``["layer3",
        "layer4"]``: the blocks' outputs) and modules called several times per forward pass (their last
        call, as in :py:func:`crp_invert.decompose`); two names for the same tensor (``"layer4"`` and
        ``"layer4.1"``) are refused.
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
        A graph from ``crp.graph.trace_model_graph`` of this model (any layer names; it is read, not
        modified). Default: the model is traced with ``torch.jit.trace`` as CRP traces it, read in linear
        time (CRP's reading takes a minute on DenseNet121).
    device : torch.device or str, optional

    Returns
    -------
    Circuit
        ``quantity="relevance"``; the first node is the concept, edges go from sub-concept to concept.
    """
    model = attribution.model
    layers = list(dict.fromkeys(layers))
    for name in layers + [layer]:
        get_module(model, name)
    if layer not in layers:
        raise ValueError(f"layer {layer!r} must be one of layers={layers}")
    if not width or any(not is_int(w) or w < 1 for w in width):
        raise ValueError(f"width must be a non-empty sequence of positive ints, got {width!r}")
    device = attribution.device if device is None else torch.device(device)
    data = prepare(sample, device)
    if data.shape[0] != 1:
        raise ValueError(f"concept_circuit explains one sample [1, ...], got a batch of {data.shape[0]}")
    found = probe(model, data, layers)
    if target is not None:
        target = _check_target(target, found.prediction.shape[1])
    labels = dict(labels or {})
    checked = {name: checked_layer_labels(labels[name], name, channel_count(found.shapes, name))
               for name in layers if name in labels}
    channel = _checked_channel(channel, checked.get(layer), layer, channel_count(found.shapes, layer))
    with model_guard(model):
        operations = _trace_operations(model, data) if graph is None else _operations_of(graph)
    last_call = LastCall(model, [name for name in layers if found.calls[name] > 1])
    with model_guard(model), last_call.attached():
        nodes, connections = _attribution_graph(attribution, _LayerGraph(operations, layers), last_call, layers)(
            data.clone().requires_grad_(True), composite, channel, layer, target=target, width=list(width),
            abs_norm=abs_norm, batch_size=batch_size, verbose=False)
    return Circuit(nodes=_labeled_nodes(nodes, checked), edges=_graph_edges(connections), quantity="relevance",
                   meta={"kind": "attribution_graph", "layer": layer, "channel": channel,
                         "target": target, "width": list(width), "abs_norm": abs_norm})


def _checked_channel(channel, labels, layer: str, n_channels: int) -> int:
    """``channel`` as an index of ``layer``; a formula text names the channel whose best reliable label it is."""
    if isinstance(channel, str):
        channel = _channel_of_concept(channel, labels, layer)
    if not is_int(channel):
        raise TypeError(f"channel must be an int or a formula text, got {type(channel).__name__}")
    if not 0 <= channel < n_channels:
        raise ValueError(f"channel {channel} is out of range: layer {layer!r} has {n_channels} channels")
    return int(channel)


def _attribution_graph(attribution, layer_graph: "_LayerGraph", last_call: LastCall, layers: Sequence[str]):
    """CRP's AttributionGraph over ``layer_graph``, as a call that closes CRP's generators on every exit."""
    from crp.attribution import AttributionGraph
    from crp.concepts import ChannelConcept

    concepts = {name: _LastCallConcept(last_call) if name in last_call.calls else ChannelConcept()
                for name in layers}

    def run(*args, **kwargs):
        closing = _ClosingAttribution(attribution)
        try:
            return AttributionGraph(closing, layer_graph, concepts)(*args, **kwargs)
        finally:
            closing.close()

    return run


def _labeled_nodes(nodes, labels: Mapping[str, Any]) -> tuple[CircuitNode, ...]:
    """AttributionGraph's ``(layer, channel)`` nodes, each once, with its best reliable label."""
    circuit_nodes: dict[tuple[str, int], CircuitNode] = {}
    for node_layer, node_channel in nodes:
        key = (node_layer, int(node_channel))
        if key not in circuit_nodes:
            circuit_nodes[key] = _label_node(node_layer, int(node_channel), labels.get(node_layer))
    return tuple(circuit_nodes.values())


def _graph_edges(connections) -> tuple[CircuitEdge, ...]:
    """AttributionGraph's connections as edges from sub-concept to concept."""
    return tuple(CircuitEdge(f"{lower_layer}:{int(lower_channel)}", f"{upper_layer}:{int(upper_channel)}", float(rel))
                 for (upper_layer, upper_channel), children in connections.items()
                 for lower_layer, lower_channel, rel in children)
