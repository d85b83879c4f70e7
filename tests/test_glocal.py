"""Glocal explanations and circuits, checked against direct CRP calls on small random models."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from crp.attribution import AttributionGraph, CondAttribution
from crp.concepts import ChannelConcept
from crp.graph import trace_model_graph
from helpers import branch_net as make_branch_net
from helpers import randomize_batch_norm, write_cache
from torch import nn
from zennit.composites import EpsilonPlus
from zennit.torchvision import SequentialMergeBatchNorm

from crp_invert.integration.circuits import Circuit, circuit_by_relevance, circuit_by_weight, concept_circuit
from crp_invert.integration.glocal import GlocalExplanation, channel_relevances, decompose, decompose_batch

# ------------------------------------------------------------------------------------------------
# small models: a sequential CNN and a net with a branch merged by zennit's Sum, both with BatchNorm
# ------------------------------------------------------------------------------------------------

def sequential_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 6, 3))
    model.add_module("bn1", nn.BatchNorm2d(6))
    model.add_module("relu1", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(6, 8, 3, stride=2))
    model.add_module("bn2", nn.BatchNorm2d(8))
    model.add_module("relu2", nn.ReLU())
    model.add_module("flatten", nn.Flatten())
    model.add_module("linear1", nn.Linear(8 * 5 * 5, 12))
    model.add_module("relu3", nn.ReLU())
    model.add_module("linear2", nn.Linear(12, 5))
    return randomize_batch_norm(model, seed)


def branch_net(seed: int = 0) -> nn.Module:
    return make_branch_net(seed, c1=6, c2=6, hidden=10, classes=4, flat=24)


MODELS = {"sequential": (sequential_cnn, 13), "branch": (branch_net, 11)}


def n_channels(model, layer):
    module = dict(model.named_modules())[layer]
    return getattr(module, "out_features", None) or module.out_channels


@pytest.fixture(params=sorted(MODELS))
def setup(request):
    make, size = MODELS[request.param]
    model = make()
    attribution = CondAttribution(model)
    composite = EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])
    data = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(7))
    return request.param, model, attribution, composite, data


def direct_heatmap(attribution, sample, condition, composite, exclude_parallel=True):
    return attribution(sample.clone().requires_grad_(True), [condition], composite,
                       exclude_parallel=exclude_parallel).heatmap[0]


def relative_error(value, reference):
    return float((value.double() - reference.double()).norm() / reference.double().norm())


def assert_heatmaps_close(value, reference):
    scale = float(reference.abs().max())
    torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5 * scale)


def hooks_of(model):
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()]


# ------------------------------------------------------------------------------------------------
# decomposition
# ------------------------------------------------------------------------------------------------

def test_all_channels_of_a_bottleneck_sum_to_the_class_heatmap(setup):
    """All channel heatmaps of a bottleneck layer sum to CRP's class heatmap, with nothing left over."""
    _, model, attribution, composite, data = setup
    hooks = hooks_of(model)
    channels = n_channels(model, "linear1")
    for i, target in enumerate([0, 2, 3]):
        sample = data[i:i + 1]
        g = decompose(attribution, sample, target, "linear1", composite, top_k=channels)
        assert isinstance(g, GlocalExplanation)
        assert g.channel_heatmaps.shape == (channels, *sample.shape[2:])
        assert sorted(g.channels.tolist()) == list(range(channels))
        assert_heatmaps_close(g.heatmap, direct_heatmap(attribution, sample, {"y": [target]}, composite))
        assert relative_error(g.channel_heatmaps.sum(0), g.heatmap) < 1e-5
        assert float(g.rest_heatmap.abs().max()) == 0.0  # nothing left, nothing bypasses linear1
        assert g.completeness_error() < 1e-5
    assert hooks_of(model) == hooks


@pytest.mark.parametrize("layer", ["conv1", "conv2", "linear1"])
def test_top_k_plus_rest_is_the_class_heatmap(setup, layer):
    """Completeness: the top-k channel heatmaps plus the rest equal the class heatmap."""
    name, model, attribution, composite, data = setup
    results = decompose_batch(attribution, data, [1, 0, 3], layer, composite, top_k=3, batch_size=4)
    assert len(results) == 3
    for i, g in enumerate(results):
        reference = direct_heatmap(attribution, data[i:i + 1], {"y": [g.target]}, composite)
        assert_heatmaps_close(g.heatmap, reference)
        assert relative_error(g.channel_heatmaps.sum(0) + g.rest_heatmap, reference) < 1e-5
        # the rest is one conditional pass over the complement channels (parallel paths included)
        rest = [c for c in range(n_channels(model, layer)) if c not in g.channels.tolist()]
        assert_heatmaps_close(g.rest_heatmap, direct_heatmap(attribution, data[i:i + 1],
                                                             {"y": [g.target], layer: rest}, composite,
                                                             exclude_parallel=False))
    if name == "branch" and layer == "conv2":
        # conv2 is not a bottleneck (the parallel branch bypasses it): the rest must carry the bypass
        g = decompose(attribution, data[:1], 1, layer, composite, top_k=n_channels(model, layer))
        assert relative_error(g.channel_heatmaps.sum(0), g.heatmap) > 1e-3
        assert relative_error(g.channel_heatmaps.sum(0) + g.rest_heatmap, g.heatmap) < 1e-5


@pytest.mark.parametrize("layer", ["conv2", "linear1"])
def test_channel_heatmaps_equal_direct_conditional_attribution(setup, layer):
    """Each channel heatmap equals a direct CondAttribution call with that channel's condition."""
    _, model, attribution, composite, data = setup
    g = decompose(attribution, data[1:2], 2, layer, composite, top_k=4, batch_size=3)
    assert g.channel_heatmaps.shape[0] == 4
    for channel, heatmap in zip(g.channels.tolist(), g.channel_heatmaps):
        assert_heatmaps_close(heatmap, direct_heatmap(attribution, data[1:2], {"y": [2], layer: [channel]},
                                                      composite))


@pytest.mark.parametrize("rank_by", ["signed", "absolute"])
def test_ranking_equals_channel_concept_attribute(setup, rank_by):
    """Channels are ranked by ChannelConcept.attribute (signed or absolute), stable by index."""
    _, model, attribution, composite, data = setup
    layer, top_k = "conv2", 4
    for i in range(len(data)):
        sample = data[i:i + 1].clone().requires_grad_(True)
        recorded = attribution(sample, [{"y": [1]}], composite, record_layer=[layer]).relevances[layer]
        relevance = ChannelConcept().attribute(recorded, abs_norm=False)[0].numpy().astype(np.float64)
        key = np.abs(relevance) if rank_by == "absolute" else relevance
        order = np.argsort(-key, kind="stable")[:top_k]
        g = decompose(attribution, data[i:i + 1], 1, layer, composite, top_k=top_k, rank_by=rank_by)
        np.testing.assert_allclose(g.relevance.numpy(), relevance[order], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(key[g.channels.numpy()], key[order], rtol=1e-4, atol=1e-6)
        distinct = np.diff(np.sort(key)).min() > 1e-4 * np.abs(key).max()
        if distinct:
            assert g.channels.tolist() == order.tolist()
        np.testing.assert_allclose(g.share.numpy(), relevance[order] / relevance.sum(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g.channel_relevance.numpy(), relevance, rtol=1e-4, atol=1e-6)
        assert g.total_relevance == pytest.approx(relevance.sum(), rel=1e-4, abs=1e-6)


def test_batch_equals_single_samples_and_predicted_target(setup):
    """A batch decomposes as its samples one by one; target None takes the predicted class."""
    _, model, attribution, composite, data = setup
    batch = decompose_batch(attribution, data, None, "conv2", composite, top_k=2, batch_size=5)
    predicted = model(data).argmax(1).tolist()
    for i, g in enumerate(batch):
        assert g.target == predicted[i]
        single = decompose(attribution, data[i:i + 1], predicted[i], "conv2", composite, top_k=2,
                           device="cpu")
        assert g.channels.tolist() == single.channels.tolist()
        assert_heatmaps_close(g.channel_heatmaps, single.channel_heatmaps)
        assert_heatmaps_close(g.rest_heatmap, single.rest_heatmap)


def _layer_labels(model, data, layer, seed=0):
    """Real LayerLabels from the ConceptLabeler on the layer's pooled activations of random data."""
    from crp_invert import ConceptLabeler, ConceptLabels

    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(60, *data.shape[1:], generator=generator)
    captured = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda module, args, out: captured.__setitem__("out", out.detach()))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    activations = captured["out"]
    if activations.dim() > 2:
        activations = activations.flatten(2).mean(-1)
    # two concepts follow channels 0 and 1 (reliable labels there), two are noise (no reliable label elsewhere)
    planted = [activations[:, c] > activations[:, c].median() for c in (0, 1)]
    noise = list((torch.rand(60, 2, generator=generator) > 0.6).T)
    concepts = ConceptLabels(torch.stack(planted + noise, 1), ["red", "round", "furry", "metal"])
    return ConceptLabeler(concepts).label(activations, L=2, B=2, layer=layer, progress=False)


def _shown(labels, channel):
    """(formula text, AUC) of the best reliable label of ``channel``, (None, None) where it has none."""
    best = labels.best(channel)
    return (None, None) if best is None else (str(best.formula), best.auc)


def test_labels_attached_are_the_layer_labels(setup):
    """Without evidence each part shows its channel's best reliable explanation (None without labels)."""
    _, model, attribution, composite, data = setup
    labels = _layer_labels(model, data, "conv2")
    g = decompose(attribution, data[:1], 0, "conv2", composite, labels=labels, top_k=3)
    best = {c: next((e for e in labels[c] if getattr(e, "reliable", True)), None) for c in range(len(labels))}
    for channel, label in zip(g.channels.tolist(), g.labels):
        assert label is best[channel]
    assert g.label_strings() == [None if best[c] is None else str(best[c].formula) for c in g.channels.tolist()]
    # a mapping of layer -> LayerLabels works the same
    g2 = decompose(attribution, data[:1], 0, "conv2", composite, labels={"conv2": labels}, top_k=3)
    assert [id(x) for x in g2.labels] == [id(x) for x in g.labels]
    # no labels: None per channel
    assert decompose(attribution, data[:1], 0, "conv2", composite, top_k=2).labels == (None, None)


def test_bad_input(setup):
    """Bad layers, targets, top_k, rank_by and samples are refused with errors naming them."""
    _, model, attribution, composite, data = setup
    hooks = hooks_of(model)
    sample = data[:1]
    with pytest.raises(KeyError, match="not a module"):
        decompose(attribution, sample, 0, "features.40", composite)
    with pytest.raises(ValueError, match="out of range"):
        decompose(attribution, sample, 10, "conv2", composite)
    with pytest.raises(ValueError, match="out of range"):
        decompose(attribution, sample, -1, "conv2", composite)
    with pytest.raises(ValueError, match="top_k"):
        decompose(attribution, sample, 0, "conv2", composite, top_k=n_channels(model, "conv2") + 1)
    with pytest.raises(ValueError, match="top_k"):
        decompose(attribution, sample, 0, "conv2", composite, top_k=0)
    with pytest.raises(ValueError, match="rank_by"):
        decompose(attribution, sample, 0, "conv2", composite, rank_by="max", top_k=2)
    with pytest.raises(ValueError, match="decompose_batch"):
        decompose(attribution, data, 0, "conv2", composite)
    with pytest.raises(ValueError, match="targets"):
        decompose_batch(attribution, data, [0, 1], "conv2", composite)
    with pytest.raises(KeyError, match="no labels for layer"):
        decompose(attribution, sample, 0, "conv2", composite, labels={"conv1": []}, top_k=2)
    assert hooks_of(model) == hooks


def test_labels_of_another_layer_are_refused(setup):
    """Labels of another layer or channel count are refused."""
    _, model, attribution, composite, data = setup
    labels = _layer_labels(model, data, "linear1")
    with pytest.raises(ValueError, match="labels have 1[02] features but layer 'conv2' has [68] channels"):
        # labels of another layer without a layer name: refused by the channel count, before any pass
        decompose(attribution, data[:1], 0, "conv2", composite, labels=_Unnamed(labels), top_k=2)
    with pytest.raises(ValueError, match="labels are for layer 'linear1'"):
        decompose(attribution, data[:1], 0, "conv2", composite, labels=labels, top_k=2)


class _Unnamed:
    """LayerLabels seen without its layer name (only the channel count can tell the mismatch)."""

    layer = None

    def __init__(self, labels):
        self._labels = labels

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, index):
        return self._labels[index]


def test_hooks_are_removed_when_a_pass_fails(setup):
    """A failing pass leaves no hook behind (plain CRP would)."""
    _, model, attribution, composite, data = setup
    hooks = hooks_of(model)

    class Failing(CondAttribution):
        def heatmap_modifier(self, data, on_device=None):
            raise RuntimeError("boom")

    failing = Failing(model)
    with pytest.raises(RuntimeError, match="boom"):
        decompose(failing, data[:1], 0, "conv2", composite, top_k=2)
    assert hooks_of(model) == hooks
    # the same failure straight through CRP leaves its recording hook behind (what we guard against)
    with pytest.raises(RuntimeError, match="boom"):
        failing(data[:1].clone().requires_grad_(True), [{"y": [0]}], composite, record_layer=["conv2"])
    assert hooks_of(model) != hooks


def test_channel_relevances_equal_channel_concept(setup):
    """channel_relevances equals ChannelConcept.attribute of CRP's recorded relevance."""
    _, model, attribution, composite, data = setup
    targets = [0, 1, 2]
    result = channel_relevances(attribution, data, targets, "conv2", composite, batch_size=2)
    loader = [(data[:2], torch.tensor(targets[:2])), (data[2:], torch.tensor(targets[2:]))]
    from_loader = channel_relevances(attribution, loader, torch.tensor(targets), "conv2", composite)
    torch.testing.assert_close(from_loader, result, rtol=1e-4, atol=1e-6)
    for i, target in enumerate(targets):
        recorded = attribution(data[i:i + 1].clone().requires_grad_(True), [{"y": [target]}], composite,
                               record_layer=["conv2"]).relevances["conv2"]
        torch.testing.assert_close(result[i], ChannelConcept().attribute(recorded, abs_norm=False)[0],
                                   rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# circuits
# ------------------------------------------------------------------------------------------------

def test_circuit_by_weight_is_an_argsort_of_the_weight_row():
    """circuit_by_weight picks the largest weights of the class row, each with its label."""
    model = sequential_cnn()
    weight = model.linear2.weight.detach().numpy()
    labels = _layer_labels(model, torch.zeros(1, 1, 13, 13), "linear1")
    for target in range(weight.shape[0]):
        circuit = circuit_by_weight("linear2", target, k=5, labels=labels, model=model,
                                    target_name=f"class{target}")
        expected = np.argsort(-weight[target], kind="stable")[:5].tolist()
        assert circuit.quantity == "weight"
        assert circuit.nodes[0].layer == "linear2" and circuit.nodes[0].channel == target
        assert circuit.nodes[0].label == f"class{target}"
        assert [node.channel for node in circuit.nodes[1:]] == expected
        assert [node.layer for node in circuit.nodes[1:]] == ["linear1"] * 5
        for node, edge in zip(circuit.nodes[1:], circuit.edges):
            assert edge.source == node.id and edge.target == circuit.nodes[0].id
            assert edge.value == pytest.approx(float(weight[target, node.channel]))
            label, auc = _shown(labels, node.channel)
            assert node.label == label and (auc is None or node.auc == pytest.approx(auc))
    # the module itself, absolute ranking
    circuit = circuit_by_weight(model.linear2, 1, k=3, rank_by="absolute", model=model)
    expected = np.argsort(-np.abs(weight[1]), kind="stable")[:3].tolist()
    assert [n.channel for n in circuit.nodes[1:]] == expected
    assert circuit.nodes[0].layer == "linear2" and circuit.nodes[1].layer == "linear2.input"
    with pytest.raises(ValueError, match="out of range"):
        circuit_by_weight("linear2", 5, model=model)
    with pytest.raises(ValueError, match="top_k"):
        circuit_by_weight("linear2", 0, k=13, model=model)
    with pytest.raises(KeyError, match="not a module"):
        circuit_by_weight("fc", 0, model=model)
    with pytest.raises(ValueError, match="2-D weight"):
        circuit_by_weight("conv1", 0, model=model)
    with pytest.raises(ValueError, match="labels have 8 features but layer 'linear1' has 12 channels"):
        conv2_labels = _Unnamed(_layer_labels(model, torch.zeros(1, 1, 13, 13), "conv2"))
        circuit_by_weight("linear2", 0, labels=conv2_labels, model=model, source_layer="linear1")


def test_circuit_by_relevance_and_json_roundtrip(tmp_path):
    """circuit_by_relevance averages the target's rows; its JSON round-trips."""
    generator = torch.Generator().manual_seed(5)
    relevances = torch.randn(40, 7, generator=generator)
    sample_targets = torch.randint(0, 3, (40,), generator=generator)
    circuit = circuit_by_relevance(relevances, 2, k=3, layer="conv2", sample_targets=sample_targets,
                                   target_name="cat")
    mean = relevances[sample_targets == 2].double().mean(0).numpy()
    assert [n.channel for n in circuit.nodes[1:]] == np.argsort(-mean, kind="stable")[:3].tolist()
    assert [e.value for e in circuit.edges] == pytest.approx(np.sort(mean)[::-1][:3].tolist())
    assert circuit.meta["n_samples"] == int((sample_targets == 2).sum())

    class FakeCache:
        layers = ["conv2"]

        def relevances(self, layer):
            assert layer == "conv2"
            return relevances

    from_cache = circuit_by_relevance(FakeCache(), 2, k=3, layer="conv2", sample_targets=sample_targets,
                                      target_name="cat")
    assert from_cache == circuit
    # JSON: plain structure, edges carry "relevance"
    data = json.loads(circuit.to_json(tmp_path / "circuit.json"))
    assert set(data) == {"quantity", "meta", "nodes", "edges"}
    assert set(data["edges"][0]) == {"source", "target", "relevance"}
    assert data["nodes"][1] == {"id": f"conv2:{circuit.nodes[1].channel}", "layer": "conv2",
                                "channel": circuit.nodes[1].channel, "label": None, "auc": None,
                                "value": circuit.nodes[1].value, "support": None, "q": None, "note": None}
    assert Circuit.from_json(tmp_path / "circuit.json") == circuit
    assert Circuit.from_json(circuit.to_json()) == circuit
    with pytest.raises(ValueError, match="no sample has target"):
        circuit_by_relevance(relevances, 7, k=3, layer="conv2", sample_targets=sample_targets)
    with pytest.raises(ValueError, match="out of range"):
        circuit_by_relevance(relevances, 3, k=3, layer="conv2", n_outputs=3)
    with pytest.raises(ValueError, match="layer is required"):
        circuit_by_relevance(FakeCache(), 1)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # the reference's trace_model_graph
@pytest.mark.parametrize("target", [None, 1])
def test_concept_circuit_follows_the_attribution_graph(setup, target):
    """concept_circuit gives the nodes and edges of CRP's AttributionGraph."""
    name, model, attribution, composite, data = setup
    layers = ["conv1", "conv2", "linear1"]
    sample = data[:1]
    labels = {layer: _layer_labels(model, data, layer) for layer in ("conv1", "conv2")}
    hooks = hooks_of(model)
    circuit = concept_circuit(attribution, sample, composite, "linear1", 3, layers, labels=labels,
                              width=(2, 2), target=target)
    assert hooks_of(model) == hooks
    graph = trace_model_graph(model, sample, layers)
    reference = AttributionGraph(attribution, graph, {layer: ChannelConcept() for layer in layers})
    nodes, connections = reference(sample.clone().requires_grad_(True), composite, 3, "linear1",
                                   target=target, width=[2, 2], verbose=False)
    assert [(n.layer, n.channel) for n in circuit.nodes] == list(dict.fromkeys((name, int(c)) for name, c in nodes))
    expected_edges = sorted((f"{ll}:{lc}", f"{ul}:{uc}", round(rel, 5))
                            for (ul, uc), children in connections.items() for ll, lc, rel in children)
    assert sorted((e.source, e.target, round(e.value, 5)) for e in circuit.edges) == expected_edges
    assert circuit.nodes[0].id == "linear1:3"
    for node in circuit.nodes:
        if node.layer in labels:
            label, auc = _shown(labels[node.layer], node.channel)
            assert node.label == label and (auc is None or node.auc == pytest.approx(auc))
        else:
            assert node.label is None
    assert Circuit.from_json(circuit.to_json()) == circuit
    # start from a concept name: the channel whose best label is that formula, highest AUC first
    shown = {c: _shown(labels["conv2"], c) for c in range(n_channels(model, "conv2"))}
    formula = shown[0][0]
    assert formula is not None  # channel 0 has a planted concept
    candidates = [c for c, (text, _) in shown.items() if text == formula]
    best = max(candidates, key=lambda c: (shown[c][1], -c))
    by_name = concept_circuit(attribution, sample, composite, "conv2", formula, layers, labels=labels,
                              width=(2,), target=target)
    assert by_name.nodes[0].id == f"conv2:{best}" and by_name.nodes[0].label == formula
    with pytest.raises(KeyError, match="no channel"):
        # labels have length <= 2, so no channel's best label is this formula of length 3
        concept_circuit(attribution, sample, composite, "conv2", "red AND metal AND furry", layers,
                        labels=labels)
    with pytest.raises(ValueError, match="pass labels"):
        concept_circuit(attribution, sample, composite, "conv2", formula, layers)
    with pytest.raises(ValueError, match="out of range"):
        concept_circuit(attribution, sample, composite, "linear1", 99, layers)
    with pytest.raises(ValueError, match="must be one of"):
        concept_circuit(attribution, sample, composite, "linear2", 0, layers)


def test_circuit_by_relevance_reads_a_real_activation_cache(tmp_path):
    """circuit_by_relevance reads the relevances of a real activation cache."""
    from crp_invert import ActivationCache
    from crp_invert.integration.circuits import circuit_by_relevance

    generator = torch.Generator().manual_seed(3)
    relevances = torch.randn(30, 6, generator=generator)
    sample_targets = torch.arange(30) % 3
    write_cache(tmp_path / "acts.h5", {"features.4": (torch.rand(30, 6, generator=generator), relevances)}, meta={})
    with ActivationCache(tmp_path / "acts.h5") as cache:
        from_cache = circuit_by_relevance(cache, target=1, k=3, layer="features.4", sample_targets=sample_targets)
    from_tensor = circuit_by_relevance(relevances, target=1, k=3, layer="features.4", sample_targets=sample_targets)
    assert from_cache.to_dict() == from_tensor.to_dict()
    expected = torch.argsort(relevances[sample_targets == 1].mean(0), descending=True)[:3].tolist()
    assert [node.channel for node in from_cache.nodes if node.layer == "features.4"] == expected


# ------------------------------------------------------------------------------------------------
# evidence: the sample's activation percentile and whether each channel's label holds for it
# ------------------------------------------------------------------------------------------------

N_REFERENCE = 40


@pytest.fixture
def labeled_reference(setup, tmp_path):
    """A labeled dataset for conv2: its pooled activations as CRP records them (canonized), concepts planted on
    three channels and one random, labels from the labeler, and an ActivationCache file holding the activations."""
    from crp_invert import ConceptLabeler, ConceptLabels

    _, model, attribution, composite, data = setup
    generator = torch.Generator().manual_seed(11)
    inputs = torch.randn(N_REFERENCE, *data.shape[1:], generator=generator)
    recorded = attribution(inputs.clone().requires_grad_(True), [{"y": [0]}] * N_REFERENCE, composite,
                           record_layer=["conv2"]).activations["conv2"]
    reference = recorded.flatten(2).mean(-1)
    # three concepts follow channels 0-2 (reliable labels there), one is noise
    planted = [reference[:, c] > reference[:, c].median() for c in range(3)]
    noise = torch.rand(N_REFERENCE, generator=generator) > 0.5
    concepts = ConceptLabels(torch.stack(planted + [noise], 1), ["red", "round", "furry", "metal"])
    labels = ConceptLabeler(concepts).label(reference, L=2, B=2, layer="conv2", progress=False)
    path = tmp_path / "acts.h5"
    write_cache(path, {"conv2": reference})
    return inputs, reference, concepts, labels, path


def _direct_pooled(attribution, composite, sample, target, layer="conv2"):
    activation = attribution(sample.clone().requires_grad_(True), [{"y": [target]}], composite,
                             record_layer=[layer]).activations[layer]
    return activation.flatten(2).mean(-1)[0].double()


def _expected_choice(beam, concepts, index):
    """Slowly: the first reliable explanation of the beam that holds on sample ``index`` of the whole data set,
    whether one holds, and how many are reliable and hold."""
    reliable = [e for e in beam if getattr(e, "reliable", True)]
    holding = [e for e in reliable if bool(e.formula.evaluate(concepts)[index])]
    holds = None if not reliable else bool(holding)
    return (holding[0] if holding else None), holds, len(reliable), len(holding)


def test_evidence_matches_the_cache_and_formula_evaluate(setup, labeled_reference):
    """Evidence: activation and percentile as the cache holds them; each part shows the first reliable label
    of its beam that holds on the sample (or none, label_holds False)."""
    from scipy.stats import percentileofscore

    from crp_invert import ActivationCache, Evidence

    _, model, attribution, composite, _ = setup
    inputs, reference, concepts, labels, path = labeled_reference
    hooks = hooks_of(model)
    holds_seen, beam_firsts = set(), set()
    with ActivationCache(path) as cache:
        for index in (3, 17, 29, 30, 31):
            sample = inputs[index:index + 1]
            g = decompose(attribution, sample, 1, "conv2", composite, labels=labels, top_k=4,
                          evidence=Evidence(cache, concepts=concepts, sample_index=index))
            pooled = _direct_pooled(attribution, composite, sample, 1)
            assert [part.channel for part in g.evidence] == g.channels.tolist()
            for part, label in zip(g.evidence, g.labels):
                column = reference[:, part.channel].double().numpy()
                assert part.activation == pytest.approx(float(pooled[part.channel]), rel=1e-5, abs=1e-7)
                assert part.activation == pytest.approx(float(column[index]), rel=1e-5, abs=1e-7)
                assert part.percentile == pytest.approx(percentileofscore(column, part.activation, kind="mean"))
                assert part.n_reference == N_REFERENCE
                shown, holds, n_reliable, n_holding = _expected_choice(labels[part.channel], concepts, index)
                assert label is shown and part.label_holds is holds
                assert (part.n_reliable, part.n_holding) == (n_reliable, n_holding)
                assert part.unexplained == (holds is False and part.percentile < 50)
                holds_seen.add(holds)
                beam_firsts.add(label is labels[part.channel][0])
            assert g.unexplained() == [part.channel for part in g.evidence if part.unexplained]
            # the same from an [N, C] tensor and the sample's concepts as a mapping
            row = {name: bool(concepts.mask(name)[index]) for name in concepts.names}
            from_tensor = decompose(attribution, sample, 1, "conv2", composite, labels=labels, top_k=4,
                                    evidence=Evidence(reference, concept_row=row))
            assert from_tensor.evidence == g.evidence
            # a path to the cache, as label_cache takes
            from_path = decompose(attribution, sample, 1, "conv2", composite, labels=labels, top_k=4,
                                  evidence=Evidence(str(path), concepts=concepts, sample_index=index))
            assert from_path.evidence == g.evidence
    assert True in holds_seen and beam_firsts == {True, False}  # a label behind the beam's first was shown
    assert hooks_of(model) == hooks


def test_evidence_of_a_batch_equals_single_samples(setup, labeled_reference):
    """Evidence of a batch equals that of single samples, whatever form the concepts take."""
    from scipy.stats import percentileofscore

    from crp_invert import Evidence

    _, model, attribution, composite, _ = setup
    inputs, reference, concepts, labels, _ = labeled_reference
    indices = [5, 12]
    dense = concepts.dense().numpy()
    batch = decompose_batch(attribution, inputs[indices], [0, 2], "conv2", composite, labels=labels, top_k=3,
                            evidence=Evidence(reference, concepts=concepts, sample_index=indices,
                                              low_percentile=30))
    as_matrix = decompose_batch(attribution, inputs[indices], [0, 2], "conv2", composite, labels=labels, top_k=3,
                                evidence=Evidence(reference, concepts=concepts, concept_row=dense[indices]))
    as_labels = decompose_batch(attribution, inputs[indices], [0, 2], "conv2", composite, labels=labels, top_k=3,
                                evidence=Evidence(reference, concept_row=concepts.subset(indices)))
    for g, h, k in zip(batch, as_matrix, as_labels):
        assert [p.label_holds for p in g.evidence] == [p.label_holds for p in h.evidence] == \
            [p.label_holds for p in k.evidence]
    for g, index, target in zip(batch, indices, [0, 2]):
        single = decompose(attribution, inputs[index:index + 1], target, "conv2", composite, labels=labels,
                           top_k=3, evidence=Evidence(reference.numpy(), concept_row=dense[index],
                                                      concepts=concepts, low_percentile=30))
        assert g.channels.tolist() == single.channels.tolist()
        for part, other in zip(g.evidence, single.evidence):
            assert part.channel == other.channel and part.label_holds == other.label_holds
            # batched and single passes round differently: each percentile is that of its own activation
            assert part.activation == pytest.approx(other.activation, rel=1e-5, abs=1e-7)
            column = reference[:, part.channel].double().numpy()
            for result in (part, other):
                assert result.percentile == pytest.approx(percentileofscore(column, result.activation, kind="mean"))
            assert part.low_percentile == 30
            assert part.unexplained == (part.label_holds is False and part.percentile < 30)


def test_glocal_json_roundtrip(setup, labeled_reference, tmp_path):
    """A GlocalExplanation (with and without evidence) survives its JSON unchanged."""
    from crp_invert import Evidence

    _, model, attribution, composite, _ = setup
    inputs, reference, concepts, labels, _ = labeled_reference
    g = decompose(attribution, inputs[7:8], None, "conv2", composite, labels=labels, top_k=3,
                  evidence=Evidence(reference, concepts=concepts, sample_index=7))
    for original in (g, decompose(attribution, inputs[7:8], None, "conv2", composite, top_k=2)):
        text = original.to_json(tmp_path / "glocal.json")
        for restored in (GlocalExplanation.from_json(text), GlocalExplanation.from_json(tmp_path / "glocal.json")):
            for name in ("layer", "target", "rank_by", "labels", "evidence"):
                assert getattr(restored, name) == getattr(original, name), name
            for name in ("heatmap", "channels", "channel_heatmaps", "relevance", "share", "rest_heatmap",
                         "channel_relevance", "prediction"):
                value, reference_value = getattr(restored, name), getattr(original, name)
                assert value.dtype == reference_value.dtype and torch.equal(value, reference_value.cpu()), name
    data = json.loads(g.to_json())
    assert data["evidence"][0]["unexplained"] == g.evidence[0].unexplained
    assert json.loads(decompose(attribution, inputs[7:8], None, "conv2", composite, top_k=2).to_json())[
        "evidence"] is None


def test_evidence_bad_input(setup, labeled_reference, caplog):
    """Evidence that does not fit the layer, samples or pooling is refused; a mismatching cache row warns."""
    from crp_invert import ActivationCache, ChannelEvidence, Evidence

    _, model, attribution, composite, _ = setup
    inputs, reference, concepts, labels, path = labeled_reference
    sample = inputs[:1]

    def run(evidence):
        return decompose(attribution, sample, 0, "conv2", composite, labels=labels, top_k=2, evidence=evidence)

    with pytest.raises(ValueError, match="channels but the decomposed layer has"):
        run(Evidence(reference[:, :3]))
    with pytest.raises(ValueError, match="needs the concept names"):
        run(Evidence(reference, concept_row=concepts.dense()[0]))
    with pytest.raises(ValueError, match="2 entries for 1 samples"):
        run(Evidence(reference, sample_index=[0, 1], concepts=concepts))
    with pytest.raises(ValueError, match="out of range"):
        run(Evidence(reference, sample_index=N_REFERENCE, concepts=concepts))
    with pytest.raises(TypeError, match="reference must be"):
        Evidence([[0.0]])
    with pytest.raises(ValueError, match="low_percentile"):
        Evidence(reference, low_percentile=120)
    with pytest.raises(TypeError, match="evidence must be an Evidence"):
        run(reference)
    with ActivationCache(path) as cache:
        with pytest.raises(ValueError, match="recorded with pooling 'mean'"):
            run(Evidence(cache, pooling="max"))
        with pytest.raises(KeyError):
            run(Evidence(cache, layer="conv1"))
    # the sample's stored row differs from its activation: recorded another way -> a warning
    shifted = reference.clone()
    shifted[0] += 1.0
    with caplog.at_level("WARNING", logger="crp_invert.integration.evidence"):
        run(Evidence(shifted, sample_index=0))
    assert "recorded with another composite or pooling" in caplog.text
    # the mark: label fails and the activation is below the threshold
    assert ChannelEvidence(0, 0.1, 10.0, 40, label_holds=False).unexplained
    assert not ChannelEvidence(0, 0.1, 10.0, 40, label_holds=True).unexplained
    assert not ChannelEvidence(0, 0.1, 10.0, 40, label_holds=None).unexplained
    assert not ChannelEvidence(0, 2.0, 90.0, 40, label_holds=False).unexplained
    assert ChannelEvidence(0, 2.0, 60.0, 40, label_holds=False, low_percentile=75).unexplained


# ------------------------------------------------------------------------------------------------
# which label a part shows: reliable ones only, the one that holds on the sample, act or rel
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Marked:
    """An explanation with a reliability flag set by the test (whatever the rule would say)."""

    formula: object
    auc: float
    reliable: bool
    p_value_bh: float = float("nan")

    def to_json(self):
        return {"text": str(self.formula), "auc": self.auc}


class MarkedLabels:
    """LayerLabels-like: each beam of ``labels`` with every explanation whose (channel, rank) is in
    ``unreliable`` marked unreliable; AUCs shifted by ``shift`` (to make the other source win)."""

    def __init__(self, labels, unreliable, shift=0.0):
        self.layer = labels.layer
        self.beams = [[Marked(e.formula, float(e.auc) + shift, (c, j) not in unreliable) for j, e in enumerate(beam)]
                      for c, beam in enumerate(labels)]

    def __len__(self):
        return len(self.beams)

    def explanations(self, channel):
        return list(self.beams[channel])


def _slow_choice(sources, channel, holds):
    """Per source the first reliable explanation that holds (``holds`` None: the first reliable one), then the
    higher AUC, activation first on ties; and whether a reliable one holds, as the figure says."""
    offers, n_reliable, n_holding = [], 0, 0
    for rank, source in enumerate(("act", "rel")):
        if sources.get(source) is None:
            continue
        reliable = [e for e in sources[source].explanations(channel) if e.reliable]
        n_reliable += len(reliable)
        chosen = reliable if holds is None else [e for e in reliable if holds(e)]
        n_holding += len(chosen)
        if chosen:
            offers.append((-chosen[0].auc, rank, source, chosen[0]))
    best = min(offers, key=lambda offer: offer[:2]) if offers else None
    state = None if holds is None or not n_reliable else n_holding > 0
    return (best[3] if best else None), (best[2] if best else None), state


def test_parts_show_reliable_labels_only(setup, labeled_reference):
    """Unreliable explanations are never shown: a part shows the first reliable one of the beam, or none."""
    _, model, attribution, composite, _ = setup
    inputs, _, _, labels, _ = labeled_reference
    unreliable = {(c, 0) for c in range(0, len(labels), 2)} | {(1, 1)} | {(0, rank) for rank in range(5)}
    marked = MarkedLabels(labels, unreliable)
    results = decompose_batch(attribution, inputs[:3], 0, "conv2", composite, labels=marked, top_k=len(labels))
    shown = set()
    for g in results:
        for channel, label, source in zip(g.channels.tolist(), g.labels, g.sources()):
            expected, expected_source, _ = _slow_choice({"act": marked}, channel, None)
            assert label is expected and source == expected_source
            shown.add(label is None)
        assert g.completeness_error() < 1e-5
    assert shown == {True, False}  # both a label and "no reliable label" were shown
    assert all("no reliable label" in g.shown_texts() for g in results)  # channel 0 has no reliable label


def test_parts_choose_per_sample_between_activation_and_relevance_labels(setup, labeled_reference):
    """With evidence each part shows, of both sources, the reliable label that holds on the sample with the
    higher AUC (slow reference on the whole data set's concepts); the source is kept in the JSON too."""
    from crp_invert import ConceptLabeler, Evidence

    _, model, attribution, composite, _ = setup
    inputs, reference, concepts, labels, _ = labeled_reference
    scores = reference + torch.randn(reference.shape, generator=torch.Generator().manual_seed(3))
    relevance = ConceptLabeler(concepts).label(scores, L=2, B=2, layer="conv2", progress=False)
    act = MarkedLabels(labels, {(c, 0) for c in range(1, len(labels), 3)})
    rel = MarkedLabels(relevance, {(c, 1) for c in range(0, len(labels), 2)}, shift=0.01)
    indices = [2, 9, 21, 33]
    results = decompose_batch(attribution, inputs[indices], None, "conv2", composite, labels=act,
                              relevance_labels=rel, top_k=len(labels),
                              evidence=Evidence(reference, concepts=concepts, sample_index=indices))
    seen_sources, seen_states = set(), set()
    for g, index in zip(results, indices):
        def holds(e, index=index):
            return bool(e.formula.evaluate(concepts)[index])

        for channel, label, source, part in zip(g.channels.tolist(), g.labels, g.sources(), g.evidence):
            expected, expected_source, state = _slow_choice({"act": act, "rel": rel}, channel, holds)
            assert label is expected and source == expected_source and part.label_holds is state
            seen_sources.add(source)
            seen_states.add(state)
        assert g.completeness_error() < 1e-5
        data = json.loads(json.dumps(g.to_dict()))
        assert data["label_sources"] == g.sources() and data["shown"] == g.shown_texts()
    assert {"act", "rel"} <= seen_sources and True in seen_states
    # without evidence: the best reliable label of either source, by AUC
    plain = decompose_batch(attribution, inputs[indices], None, "conv2", composite, labels=act,
                            relevance_labels=rel, top_k=len(labels))
    for g in plain:
        for channel, label, source in zip(g.channels.tolist(), g.labels, g.sources()):
            assert (label, source) == _slow_choice({"act": act, "rel": rel}, channel, None)[:2]
    with pytest.raises(ValueError, match="labels are for layer 'linear1'"):
        decompose(attribution, inputs[:1], 0, "conv2", composite, top_k=2,
                  relevance_labels=_layer_labels(model, inputs, "linear1"))


def test_old_glocal_json_without_sources_loads(setup):
    """JSON written before label sources and reliable-label counts existed still loads (all "act")."""
    _, model, attribution, composite, data = setup
    labels = _layer_labels(model, data, "conv2")
    g = decompose(attribution, data[:1], 0, "conv2", composite, labels=labels, top_k=2)
    old = g.to_dict()
    del old["label_sources"], old["shown"]
    restored = GlocalExplanation.from_dict(old)
    assert restored.label_sources is None
    assert restored.sources() == [None if label is None else "act" for label in g.labels]
    with pytest.raises(ValueError, match="label_sources"):
        GlocalExplanation.from_dict(dict(g.to_dict(), label_sources=["activation", None]))


def test_model_guard_restores_always_or_on_error_only():
    """model_guard: hooks, parameters, buffers and attributes come back on every exit, or only after an
    error with only_on_error=True; restored_on_error is that guard."""
    from crp_invert.integration.guard import model_guard, restored_on_error

    def snapshot(model):
        return [(name, dict(m._forward_hooks), dict(m._parameters), dict(m._buffers), m.forward)
                for name, m in model.named_modules()]

    def tamper(model):
        model[0].register_forward_hook(lambda *args: None)
        model[0].bias = nn.Parameter(torch.zeros(3))
        model[1].running_mean.data = torch.ones(3)
        model[0].weight.data = model[0].weight.data * 2
        model[1].forward = lambda x: x

    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    before = snapshot(model)
    weight = model[0].weight.detach().clone()
    with model_guard(model):
        tamper(model)
    assert snapshot(model) == before and torch.equal(model[0].weight, weight)
    with model_guard(model, only_on_error=True):
        tamper(model)
    assert snapshot(model) != before
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    before = snapshot(model)
    for guard in (model_guard(model, only_on_error=True), restored_on_error(model)):
        with pytest.raises(RuntimeError):
            with guard:
                tamper(model)
                raise RuntimeError("a canonizer failed")
        assert snapshot(model) == before and float(model[1].running_mean.abs().sum()) == 0
