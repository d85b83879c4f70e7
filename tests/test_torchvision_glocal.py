"""Glocal decomposition and circuits on torchvision models (random weights, 32x32 inputs) against direct CRP calls.

Every layer name that works for recording works here: leaves, containers (``"layer4"``, ``"features"``) and
modules called twice per forward pass (ResNet BasicBlock's ``relu``: its last call, the block's output).
Nothing is downloaded (``weights=None``).
"""
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Sequence

import pytest
import torch
import torchvision
from crp.attribution import AttributionGraph, CondAttribution
from crp.concepts import ChannelConcept
from crp.graph import trace_model_graph
from helpers import randomize_batch_norm
from zennit.canonizers import NamedMergeBatchNorm
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer, SequentialMergeBatchNorm, VGGCanonizer

from crp_invert.integration.circuits import circuit_by_weight, concept_circuit
from crp_invert.integration.glocal import channel_relevances, decompose

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")

SIZE = 32
TARGET = 3
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def densenet_merge_pairs(model) -> list:
    """The batch norms of a torchvision DenseNet that directly follow a convolution (conv0 -> norm0 and each
    dense layer's conv1 -> norm2). zennit's SequentialMergeBatchNorm also pairs each dense layer's conv2 with
    the next layer's norm1, which normalizes the concatenation of all earlier features, and fails."""
    pairs = [(("features.conv0",), "features.norm0")]
    pairs += [((f"{name}.conv1",), f"{name}.norm2") for name, module in model.named_modules()
              if type(module).__name__ == "_DenseLayer"]
    return pairs


@dataclass
class Spec:
    build: Callable
    composite: Callable
    leaf: str
    container: str
    circuit: Sequence[str]  # lower layers first, the last one is decomposed
    same_tensor: Dict[str, str]  # name -> a module name with the same output that CRP masks correctly


SPECS = {
    "vgg11_bn": Spec(torchvision.models.vgg11_bn, lambda model: EpsilonPlusFlat(canonizers=[VGGCanonizer()]),
                     leaf="features.18", container="features", circuit=("features.18", "features"),
                     same_tensor={}),
    "resnet18": Spec(torchvision.models.resnet18, lambda model: EpsilonPlusFlat(canonizers=[ResNetCanonizer()]),
                     leaf="layer4.1.conv2", container="layer4", circuit=("layer2", "layer3", "layer4"),
                     same_tensor={"layer1.0.relu": "layer1.0", "layer1.1.relu": "layer1.1",
                                  "layer2.0.relu": "layer2.0"}),
    "mobilenet_v2": Spec(torchvision.models.mobilenet_v2,
                         lambda model: EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]),
                         leaf="features.17.conv.2", container="features.16", circuit=("features.15", "features.16"),
                         same_tensor={}),
    "densenet121": Spec(torchvision.models.densenet121,
                        lambda model: EpsilonPlusFlat(canonizers=[NamedMergeBatchNorm(densenet_merge_pairs(model))]),
                        leaf="features.transition3.conv", container="features.denseblock4",
                        circuit=("features.transition3", "features.denseblock4"), same_tensor={}),
}


@functools.lru_cache(maxsize=None)
def build(name: str):
    """The model (random weights, random batch norm statistics, eval mode), its attribution, composite and a
    sample; built once per test session (the tests leave the models unchanged, which they check)."""
    spec = SPECS[name]
    torch.manual_seed(0)
    model = randomize_batch_norm(spec.build(weights=None, num_classes=10), 0)
    sample = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return spec, model, CondAttribution(model), spec.composite(model), sample


@pytest.fixture(params=sorted(SPECS))
def setup(request):
    return (request.param,) + build(request.param)


def _tensor_digest(value: torch.Tensor):
    # exact copies of the small tensors; storage and float64 sum of the large classifier weights
    return value.clone() if value.numel() <= 2 ** 20 else (value.data_ptr(), float(value.double().sum()))


def model_state(model):
    """Hooks, attributes, children and parameters of every module: what hooks and canonizers change."""
    return {
        "hooks": [(name, tuple(len(getattr(module, d)) for d in HOOK_DICTS)) for name, module in model.named_modules()],
        "attributes": [(name, sorted(vars(module)), sorted(module._modules)) for name, module in model.named_modules()],
        "tensors": {key: _tensor_digest(value) for key, value in model.state_dict().items()},
    }


def _same(value, reference) -> bool:
    if isinstance(reference, torch.Tensor):
        return isinstance(value, torch.Tensor) and torch.equal(value, reference)
    return value == reference


def assert_unchanged(model, before):
    after = model_state(model)
    assert after["hooks"] == before["hooks"]
    assert after["attributes"] == before["attributes"]
    assert sorted(after["tensors"]) == sorted(before["tensors"])
    for key, value in before["tensors"].items():
        assert _same(after["tensors"][key], value), key


def crp_heatmap(attribution, sample, condition, composite, exclude_parallel=True):
    return attribution(sample.clone().requires_grad_(True), [condition], composite,
                       exclude_parallel=exclude_parallel).heatmap[0]


def crp_channel_relevance(attribution, sample, condition, composite, layer, abs_norm=False, exclude_parallel=True):
    relevance = attribution(sample.clone().requires_grad_(True), [condition], composite, record_layer=[layer],
                            exclude_parallel=exclude_parallel).relevances[layer]
    return ChannelConcept().attribute(relevance, abs_norm=abs_norm)[0]


def assert_close(value, reference, rtol=1e-4):
    scale = float(reference.abs().max())
    torch.testing.assert_close(value, reference, rtol=rtol, atol=1e-5 * scale if scale > 0 else 1e-30)


# ------------------------------------------------------------------------------------------------
# decomposition on a leaf and on a container
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["leaf", "container"])
def test_decomposition_is_complete_and_equals_crp(setup, kind):
    """On torchvision models, leaf and container decompositions are complete and equal CRP's."""
    _, spec, model, attribution, composite, sample = setup
    layer = getattr(spec, kind)
    before = model_state(model)
    g = decompose(attribution, sample, TARGET, layer, composite, top_k=2)
    assert_unchanged(model, before)
    assert g.completeness_error() <= 1e-5
    assert_close(g.heatmap, crp_heatmap(attribution, sample, {"y": [TARGET]}, composite))
    # ranking: CRP's recorded relevance of the layer
    relevance = crp_channel_relevance(attribution, sample, {"y": [TARGET]}, composite, layer)
    assert_close(g.channel_relevance, relevance)
    assert g.channels.tolist() == torch.argsort(relevance, descending=True, stable=True)[:2].tolist()
    # each part is CRP's conditional heatmap; the rest is the complement plus what bypasses the layer
    for channel, heatmap in zip(g.channels.tolist(), g.channel_heatmaps):
        assert_close(heatmap, crp_heatmap(attribution, sample, {"y": [TARGET], layer: [channel]}, composite))
    complement = [c for c in range(len(relevance)) if c not in g.channels.tolist()]
    assert_close(g.rest_heatmap, crp_heatmap(attribution, sample, {"y": [TARGET], layer: complement}, composite,
                                             exclude_parallel=False))
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------
# circuits on container names
# ------------------------------------------------------------------------------------------------

def _expected_step(attribution, sample, composite, conditions, lower, width):
    """What AttributionGraph computes for one step down, by one direct CondAttribution call."""
    relevance = crp_channel_relevance(attribution, sample, conditions, composite, lower, abs_norm=True,
                                      exclude_parallel=False)
    return relevance, torch.argsort(relevance, descending=True)[:width].tolist()


def _check_circuit(circuit, attribution, sample, composite, layers, top, channel, width, alias=lambda name: name):
    """Every edge of ``circuit`` against direct CondAttribution calls (layers renamed by ``alias`` for CRP)."""
    edges = {(edge.source, edge.target): edge.value for edge in circuit.edges}
    assert len(edges) == len(circuit.edges)  # no repeated edges
    frontier, parent = [(top, channel)], {alias(top): [channel], "y": [TARGET]}
    checked = 0
    for step, w in enumerate(width):
        lower = layers[len(layers) - 2 - step]
        following = []
        for upper, upper_channel in frontier:
            conditions = dict(parent)
            conditions[alias(upper)] = [upper_channel]
            relevance, top_channels = _expected_step(attribution, sample, composite, conditions, alias(lower), w)
            children = {int(edge_source.split(":")[1]): value for (edge_source, edge_target), value in edges.items()
                        if edge_target == f"{upper}:{upper_channel}" and edge_source.startswith(f"{lower}:")}
            assert len(children) == w
            scale = float(relevance.abs().max())
            for child, value in children.items():
                assert value == pytest.approx(float(relevance[child]), rel=1e-3, abs=1e-5 * scale)
            # the chosen children are the w largest (as values: ties may be ordered either way)
            assert sorted(children.values(), reverse=True) == pytest.approx(
                relevance[top_channels].tolist(), rel=1e-3, abs=1e-5 * scale)
            following += [(lower, child) for child in children]
            checked += len(children)
        frontier = following
    assert checked == len(edges)


def _most_relevant(attribution, sample, composite, layer):
    return int(torch.argmax(channel_relevances(attribution, sample, TARGET, layer, composite)[0]))


def test_concept_circuit_on_container_names(setup):
    """concept_circuit works on container names of torchvision models."""
    _, spec, model, attribution, composite, sample = setup
    layers, top = list(spec.circuit), spec.circuit[-1]
    width = (3,) * (len(layers) - 1)
    channel = _most_relevant(attribution, sample, composite, top)
    before = model_state(model)
    circuit = concept_circuit(attribution, sample, composite, top, channel, layers, width=width, target=TARGET)
    assert_unchanged(model, before)
    assert circuit.nodes[0].id == f"{top}:{channel}"
    assert set(circuit.layers) == set(layers)
    _check_circuit(circuit, attribution, sample, composite, layers, top, channel, width)


def test_vgg_container_circuit_equals_crp_attribution_graph_on_the_leaf():
    """A VGG container circuit equals CRP's AttributionGraph on the leaf that is its output."""
    _, model, attribution, composite, sample = build("vgg11_bn")
    # "features" is the output of its last module, the max pool features.28, which CRP's graph knows
    leaf_layers = ["features.18", "features.28"]
    channel = _most_relevant(attribution, sample, composite, "features")
    ours = concept_circuit(attribution, sample, composite, "features", channel, ["features.18", "features"],
                           width=(3,), target=TARGET)
    graph = trace_model_graph(model, sample, leaf_layers)
    reference = AttributionGraph(attribution, graph, {name: ChannelConcept() for name in leaf_layers})
    nodes, connections = reference(sample.clone().requires_grad_(True), composite, channel, "features.28",
                                   target=TARGET, width=[3], verbose=False)
    rename = {"features.28": "features", "features.18": "features.18"}
    expected = sorted((f"{rename[lower]}:{lc}", f"{rename[upper]}:{uc}", round(rel, 5))
                      for (upper, uc), children in connections.items() for lower, lc, rel in children)
    assert sorted((e.source, e.target, round(e.value, 5)) for e in ours.edges) == expected
    assert [(n.layer, n.channel) for n in ours.nodes] == [(rename[name], int(c)) for name, c in nodes]
    # a graph the user traced with CRP (any layer names) gives the same circuit
    given = concept_circuit(attribution, sample, composite, "features", channel, ["features.18", "features"],
                            width=(3,), target=TARGET, graph=graph)
    assert given.to_dict() == ours.to_dict()
    # the weight circuit of a Sequential container is that of its last module
    by_container = circuit_by_weight("classifier", TARGET, k=5, model=model)
    by_leaf = circuit_by_weight("classifier.6", TARGET, k=5, model=model)
    assert [(n.channel, n.value) for n in by_container.nodes] == [(n.channel, n.value) for n in by_leaf.nodes]
    with pytest.raises(ValueError, match="2-D weight"):
        circuit_by_weight("features", TARGET, model=model)


# ------------------------------------------------------------------------------------------------
# a module called twice per forward pass: ResNet BasicBlock's relu
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def resnet():
    return build("resnet18")


def test_module_called_twice_is_its_last_call(resnet):
    """A module called twice (ResNet's relu) stands for its last call; the parts add up."""
    spec, model, attribution, composite, sample = resnet
    layer, block = "layer1.0.relu", spec.same_tensor["layer1.0.relu"]
    before = model_state(model)
    g = decompose(attribution, sample, TARGET, layer, composite, top_k=4)
    assert_unchanged(model, before)
    assert g.completeness_error() <= 1e-5
    # the channel relevance is what CRP records for the module: its last call
    assert_close(g.channel_relevance, crp_channel_relevance(attribution, sample, {"y": [TARGET]}, composite, layer))
    # ... which is the block's output: each part equals CRP's conditional heatmap on the block
    assert_close(g.channel_relevance, crp_channel_relevance(attribution, sample, {"y": [TARGET]}, composite, block))
    differs = 0
    for channel, heatmap in zip(g.channels.tolist(), g.channel_heatmaps):
        assert_close(heatmap, crp_heatmap(attribution, sample, {"y": [TARGET], block: [channel]}, composite))
        # CRP's own mask on the relu masks the channel in both calls (after bn1 and after the sum)
        every_call = crp_heatmap(attribution, sample, {"y": [TARGET], layer: [channel]}, composite)
        differs += not torch.allclose(heatmap, every_call, rtol=1e-3, atol=1e-5 * float(heatmap.abs().max()))
    assert differs > 0
    assert_unchanged(model, before)


def test_circuit_through_modules_called_twice(resnet):
    """Circuits pass through modules called twice per forward pass."""
    spec, model, attribution, composite, sample = resnet
    layers = ["layer1.0.relu", "layer1.1.relu", "layer2.0.relu"]
    top = layers[-1]
    channel = _most_relevant(attribution, sample, composite, top)
    before = model_state(model)
    circuit = concept_circuit(attribution, sample, composite, top, channel, layers, width=(3, 2), target=TARGET)
    assert_unchanged(model, before)
    # against CRP on the blocks, whose outputs these last calls are
    _check_circuit(circuit, attribution, sample, composite, layers, top, channel, (3, 2),
                   alias=lambda name: spec.same_tensor.get(name, name))
    with pytest.raises(ValueError, match="same tensor"):
        concept_circuit(attribution, sample, composite, "layer4", 0, ["layer4.1", "layer4"], target=TARGET)


# ------------------------------------------------------------------------------------------------
# failing calls leave no hooks and no canonizer changes behind
# ------------------------------------------------------------------------------------------------

class _Failing(CondAttribution):
    def heatmap_modifier(self, data, on_device=None):
        raise RuntimeError("boom")


def test_failing_calls_leave_the_model_unchanged(setup, monkeypatch):
    """Failing glocal and circuit calls leave the model unchanged (the one model guard)."""
    _, spec, model, attribution, composite, sample = setup
    before = model_state(model)
    with pytest.raises(ValueError, match="out of range"):
        decompose(attribution, sample, 10, spec.container, composite, top_k=2)
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="boom"):  # inside CRP's pass: CRP leaves its recording hooks
        decompose(_Failing(model), sample, TARGET, spec.container, composite, top_k=2)
    assert_unchanged(model, before)

    # inside AttributionGraph: CRP's generator stays suspended inside the composite (canonizers applied)
    def fail(*args, **kwargs):
        raise RuntimeError("attribute failed")

    monkeypatch.setattr(ChannelConcept, "attribute", fail)
    with pytest.raises(RuntimeError, match="attribute failed"):
        concept_circuit(attribution, sample, composite, spec.circuit[-1], 0, spec.circuit, width=(2,), target=TARGET)
    assert_unchanged(model, before)


def test_densenet_sequential_merge_fails_and_is_undone():
    """SequentialMergeBatchNorm fails on DenseNet121: decompose undoes the merged batch norms, plain CRP does not."""
    torch.manual_seed(0)
    model = randomize_batch_norm(torchvision.models.densenet121(weights=None, num_classes=10), 0)
    attribution = CondAttribution(model)
    sample = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
    before = model_state(model)
    with pytest.raises(RuntimeError, match="size of tensor"):
        decompose(attribution, sample, TARGET, "features.denseblock4", composite, top_k=2)
    assert_unchanged(model, before)
    # plain CRP fails the same way and leaves the batch norms merged before the failure changed
    with pytest.raises(RuntimeError, match="size of tensor"):
        attribution(sample.clone().requires_grad_(True), [{"y": [TARGET]}], composite)
    changed = model_state(model)
    assert sorted(changed["tensors"]) != sorted(before["tensors"]) or any(
        not _same(changed["tensors"][key], value) for key, value in before["tensors"].items())
