"""Transformers: unit layouts, a tiny torchvision VisionTransformer (random weights, 32 x 32 inputs, patch 8,
2 layers, hidden 32) recorded, attributed (gradient x input), decomposed and labeled end to end on CPU.

Expected values come from direct forward hooks and plain autograd on the model, CRP's ChannelConcept on the
transposed tensor, sklearn's ROC AUC, and fingerprints computed from their definition.
"""

import json

import numpy as np
import pytest
import torch

tv = pytest.importorskip("torchvision")

from click.testing import CliRunner  # noqa: E402
from crp.concepts import ChannelConcept  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from crp_invert.cli import main  # noqa: E402
from crp_invert.demo.data import ShapesDataset  # noqa: E402
from crp_invert.fuzzy import Fuzzifier, FuzzyCircuit  # noqa: E402
from crp_invert.integration.feature_visualization import InvertFeatureVisualization  # noqa: E402
from crp_invert.integration.glocal import Evidence  # noqa: E402
from crp_invert.integration.hooks import record_activations  # noqa: E402
from crp_invert.integration.layouts import TokenConcept, parse_layout  # noqa: E402
from crp_invert.integration.vit import (  # noqa: E402
    GradientTimesInput,
    conservation,
    decompose_units,
    units_first_view,
    vit_layer_map,
    vit_layouts,
)
from crp_invert.labeler import ConceptLabeler  # noqa: E402
from crp_invert.storage.cache import ActivationCache  # noqa: E402
from crp_invert.storage.fingerprint import fingerprint, model_hash  # noqa: E402

HIDDEN, N, CLASSES = 32, 48, 16
BLOCK = "encoder.layers.encoder_layer_1"


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """A torchvision ViT with random weights; the head too (torchvision initializes it to zero)."""
    torch.manual_seed(seed)
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=HIDDEN,
                                        mlp_dim=64, num_classes=CLASSES)
    torch.nn.init.normal_(model.heads.head.weight, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(N, seed=3)


def direct_outputs(model, images, layers):
    """Layer outputs from plain forward hooks, and the input of ``heads`` (the paper's feature extractor)."""
    outputs = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, inputs, output, name=name: outputs.__setitem__(name, output.detach())) for name in layers]
    handles.append(model.heads.register_forward_pre_hook(
        lambda module, inputs: outputs.__setitem__("heads input", inputs[0].detach())))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def loader(dataset, batch_size=16):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def test_token_layouts_match_direct_hooks(tmp_path, shapes):
    """Blocks reduced over tokens by mean / max / class token and the feature extractor equal direct hooks."""
    model = tiny_vit()
    layouts = {"encoder.layers.encoder_layer_0": "tokens:max", BLOCK: "tokens:mean", "encoder": "tokens:cls"}
    cache = record_activations(model, loader(shapes), list(layouts), tmp_path / "a.h5", layouts=layouts,
                               progress=False)
    images, _ = shapes.tensors()
    direct = direct_outputs(model, images, list(layouts))
    expected = {"encoder.layers.encoder_layer_0": direct["encoder.layers.encoder_layer_0"].amax(1),
                BLOCK: direct[BLOCK].mean(1), "encoder": direct["heads input"]}
    for name, values in expected.items():
        assert cache.n_channels(name) == HIDDEN
        torch.testing.assert_close(cache.activations(name), values, rtol=1e-5, atol=1e-6)
        info = cache.info(name)
        assert (info["layout"], info["pooling"]) == ("tokens", parse_layout(layouts[name])[1])
    cache.close()


def test_three_d_output_without_layout_is_refused(tmp_path, shapes):
    """A [B, T, D] output without a declared layout is refused naming the choices; nothing is recorded."""
    model = tiny_vit()
    with pytest.raises(ValueError, match="tokens:cls.*channels"):
        record_activations(model, loader(shapes), [f"{BLOCK}.mlp"], tmp_path / "a.h5", progress=False)
    if (tmp_path / "a.h5").exists():
        with ActivationCache(tmp_path / "a.h5") as cache:
            assert f"{BLOCK}.mlp" not in cache


def test_conv1d_is_channels_first_without_a_layout(tmp_path):
    """Conv1d says its layout: its [B, C, L] output is pooled over L without a declaration."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 5, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3)).eval()
    data = torch.randn(10, 2, 12)
    model(data)
    cache = record_activations(model, loader(torch.utils.data.TensorDataset(data), 4), ["0"], tmp_path / "c.h5",
                               progress=False)
    with torch.no_grad():
        expected = model[0](data).mean(-1)
    torch.testing.assert_close(cache.activations("0"), expected)
    assert cache.info("0")["layout"] == "channels"
    cache.close()


def test_layout_is_in_the_fingerprint(tmp_path, shapes):
    """A tokens layer's fingerprint covers its layout; a channels layer keeps the fingerprint of older caches;
    continuing a layer with another layout is refused."""
    model = tiny_vit()
    path = tmp_path / "a.h5"
    record_activations(model, loader(shapes), [BLOCK], path, layouts={BLOCK: "tokens:mean"}, progress=False).close()
    with ActivationCache(path) as cache:
        stored = cache.fingerprint(BLOCK)
    digest = model_hash(model)
    assert stored == fingerprint(digest, BLOCK, N, "tokens:mean", "ChannelConcept", "none", "")
    assert stored != fingerprint(digest, BLOCK, N, "mean", "ChannelConcept", "none", "")
    with pytest.raises(ValueError, match="recorded differently"):
        record_activations(model, loader(shapes), [BLOCK], path, layouts={BLOCK: "tokens:cls"}, progress=False)
    other = tmp_path / "b.h5"
    record_activations(model, loader(shapes), ["conv_proj"], other, progress=False).close()
    with ActivationCache(other) as cache:
        assert cache.fingerprint("conv_proj") == fingerprint(digest, "conv_proj", N, "mean", "ChannelConcept",
                                                             "none", "")


def test_cache_without_layout_attribute_continues_as_channels(tmp_path, shapes):
    """A layer written before layouts existed (no ``layout`` attribute) continues as channels, not as tokens."""
    model = tiny_vit()
    path = tmp_path / "old.h5"
    with ActivationCache(path, mode="a") as cache:  # what an older version wrote: the same attributes, no layout
        cache.initialize((0, N))
        cache.add_layer("conv_proj", HIDDEN, pooling="mean", concept="ChannelConcept", model_hash=model_hash(model),
                        relevance="", composite="none",
                        fingerprint=fingerprint(model_hash(model), "conv_proj", N, "mean", "ChannelConcept", "none",
                                                ""))
    record_activations(model, loader(shapes), ["conv_proj"], path, progress=False).close()
    with ActivationCache(path) as cache:
        assert cache.is_complete("conv_proj") and "layout" not in cache.info("conv_proj")
    with pytest.raises(ValueError, match="before unit layouts existed"):
        record_activations(model, loader(shapes), ["conv_proj"], path, layouts={"conv_proj": "tokens"},
                           progress=False)


def test_token_concept_equals_channel_concept_on_the_transposed_tensor():
    """TokenConcept's masks, attribution and reference sampling equal ChannelConcept's on [B, D, T]."""
    torch.manual_seed(1)
    relevance = torch.randn(4, 6, 5)  # [B, T, D]
    transposed = relevance.transpose(1, 2).contiguous()
    concept = TokenConcept()
    torch.testing.assert_close(concept.attribute(relevance, abs_norm=True),
                               ChannelConcept().attribute(transposed, abs_norm=True))
    for got, expected in zip(concept.reference_sampling(relevance, max_target="max"),
                             ChannelConcept().reference_sampling(transposed, max_target="max"), strict=True):
        torch.testing.assert_close(got, expected)
    masked = concept.mask(2, [1, 3])(relevance.clone())
    expected = ChannelConcept.mask(2, [1, 3])(transposed.clone()).transpose(1, 2)
    torch.testing.assert_close(masked, expected)
    masked_rf = concept.mask_rf(0, {4: [0, 2]})(relevance.clone())
    expected_rf = ChannelConcept.mask_rf(0, {4: [0, 2]})(transposed.clone()).transpose(1, 2)
    torch.testing.assert_close(masked_rf, expected_rf)


def autograd_relevance(model, images, targets, layer):
    """Slow reference: a * d f_target / d a at ``layer`` from plain autograd, [B, T, D], and x * df/dx."""
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("a", output))
    try:
        x = images.clone().requires_grad_(True)
        logits = model(x)
    finally:
        handle.remove()
    chosen = logits[torch.arange(len(targets)), torch.as_tensor(targets)].sum()
    grad_a, grad_x = torch.autograd.grad(chosen, [captured["a"], x])
    return (captured["a"] * grad_a).detach(), (x * grad_x).sum(1).detach(), captured, x, logits


@pytest.mark.slow
def test_feature_visualization_records_gradient_x_input(tmp_path, shapes):
    """InvertFeatureVisualization with GradientTimesInput records a and sum_t a * df/da per unit (autograd)."""
    model = tiny_vit()
    layouts = {BLOCK: "tokens:mean", "encoder": "tokens:cls"}
    fv = InvertFeatureVisualization(GradientTimesInput(model), shapes, vit_layer_map(layouts), path=str(tmp_path),
                                    layouts=layouts, progress=False)
    fv.run(None, 0, N, batch_size=16, checkpoint=32)
    images, targets = shapes.tensors()
    with ActivationCache(tmp_path / "activations.h5") as cache:
        for name in layouts:
            relevance, _, captured, _, _ = autograd_relevance(model, images, targets.tolist(), name)
            torch.testing.assert_close(cache.relevances(name), relevance.sum(1), rtol=1e-4, atol=1e-5)
            assert cache.n_channels(name) == HIDDEN
        torch.testing.assert_close(cache.activations("encoder"), direct_outputs(model, images, [])["heads input"])


def test_gradient_x_input_conservation(shapes):
    """Conservation measured: exact for the feature extractor (a linear head without bias), not at the input."""
    model = tiny_vit()
    images, targets = shapes.tensors(range(8))
    sums = conservation(GradientTimesInput(model), images, targets.tolist(), ["encoder"])
    bias = model.heads.head.bias.detach()[targets]
    torch.testing.assert_close(sums["layer:encoder"], sums["output"] - bias, rtol=1e-4, atol=1e-5)
    _, heatmap, _, _, logits = autograd_relevance(model, images, targets.tolist(), "encoder")
    torch.testing.assert_close(sums["input"], heatmap.reshape(8, -1).sum(1), rtol=1e-4, atol=1e-5)


def unit_heatmap(model, image, target, layer, unit):
    """Slow reference: x * d/dx of the target's gradient at ``layer`` masked to ``unit`` at every token."""
    captured = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("a", output))
    try:
        x = image[None].clone().requires_grad_(True)
        logit = model(x)[0, target]
    finally:
        handle.remove()
    grad_a = torch.autograd.grad(logit, captured["a"], retain_graph=True)[0]
    keep = torch.zeros_like(grad_a)
    keep[..., unit] = 1
    grad_x = torch.autograd.grad(captured["a"], x, grad_outputs=grad_a * keep)[0]
    return (x * grad_x).sum(1)[0].detach()


@pytest.mark.parametrize("layer", ["encoder", BLOCK])
def test_decompose_units_is_complete_and_matches_autograd(layer, shapes):
    """Units' conditional heatmaps + rest = class heatmap; each unit's heatmap is x * d/dx of the gradient
    masked to that unit at every token (plain autograd); the model is restored."""
    model = tiny_vit()
    images, targets = shapes.tensors(range(2))
    parts = decompose_units(GradientTimesInput(model), images, targets.tolist(), layer, None, top_k=3)
    relevance, _, _, _, _ = autograd_relevance(model, images, targets.tolist(), layer)
    for i, part in enumerate(parts):
        assert part.layer == layer and part.channel_relevance.shape == (HIDDEN,)
        assert part.completeness_error() < 1e-4
        torch.testing.assert_close(part.channel_relevance, relevance[i].sum(0), rtol=1e-4, atol=1e-5)
        unit = int(part.channels[0])
        expected = unit_heatmap(model, images[i], int(targets[i]), layer, unit)
        torch.testing.assert_close(part.channel_heatmaps[0], expected, rtol=1e-4, atol=1e-6)
    assert [name for name, _ in model.named_modules()] == [name for name, _ in tiny_vit().named_modules()]


def test_units_first_view_restores_after_an_error():
    """The view is removed also when the block raises."""
    model = tiny_vit()
    with pytest.raises(RuntimeError), units_first_view(model, BLOCK) as name:
        assert name == f"{BLOCK}.units"
        raise RuntimeError
    assert type(model.get_submodule(BLOCK)).__name__ == "EncoderBlock"


def label_units(cache, concepts, layer, source="activation"):
    return ConceptLabeler(concepts, device="cpu").label_cache(cache, layers=[layer], source=source, L=1, B=1,
                                                              progress=False)[layer]


@pytest.mark.slow
def test_goedel_circuit_scores_a_composite_concept(tmp_path):
    """Section 5.3: units labeled with two atomic concepts, AND-ed in a Goedel circuit, scored on their
    composite (a concept no unit was labeled with) equal to sklearn's AUC of min(sigmoid(z_a), sigmoid(z_b))."""
    shapes = ShapesDataset(96, seed=5)
    model = tiny_vit()
    path = tmp_path / "a.h5"
    record_activations(model, loader(shapes, 32), ["encoder"], path, layouts={"encoder": "tokens:cls"},
                       progress=False).close()
    concepts = shapes.concepts
    with ActivationCache(path) as cache:
        labels = label_units(cache, concepts, "encoder")
        acts = cache.activations("encoder").double()
    best = {}
    for unit in range(len(labels)):
        top = labels[unit][0]
        if top.formula.kind == "concept" and top.auc > best.get(top.formula.name, (0, -1))[1]:
            best[top.formula.name] = (unit, top.auc)
    masks = {name: concepts.mask(name).reshape(-1).numpy() for name in best}
    pairs = [(a, b) for a in best for b in best if a < b and 5 <= (masks[a] & masks[b]).sum() <= 91]
    assert pairs, f"no two labeled concepts overlap: {sorted(best)}"
    a, b = pairs[0]
    circuit = FuzzyCircuit(f"n{best[a][0]} AND n{best[b][0]}", logic="goedel")
    memberships = Fuzzifier().fit(acts)(acts)
    composite = masks[a] & masks[b]
    z = (acts - acts.mean(0)) / acts.std(0)
    expected = roc_auc_score(composite, np.minimum(torch.sigmoid(z[:, best[a][0]]).numpy(),
                                                   torch.sigmoid(z[:, best[b][0]]).numpy()))
    assert circuit.score(memberships, torch.from_numpy(composite)) == pytest.approx(expected, abs=1e-9)
    assert all(str(labels[u][0].formula) != f"{a} AND {b}" for u in range(len(labels)))


def write_model_file(folder):
    """A Python file the CLI loads the tiny ViT and the data from."""
    source = f'''
import torch, torchvision
from crp_invert.demo.data import ShapesDataset

def model():
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                             hidden_dim={HIDDEN}, mlp_dim=64, num_classes={CLASSES})
    torch.nn.init.normal_(m.heads.head.weight, std=0.3)
    return m.eval()

def data():
    return ShapesDataset({N}, seed=3)
'''
    path = folder / "vit_spec.py"
    path.write_text(source)
    return path


@pytest.mark.slow
def test_end_to_end_cli(tmp_path, shapes):
    """CLI: record (with relevances) -> label (activation, relevance) -> find -> audit -> decompose -> report on a
    tiny ViT."""
    spec = write_model_file(tmp_path)
    runner = CliRunner()
    cache = tmp_path / "vit.h5"
    refused = runner.invoke(main, ["record", str(cache), "--model", f"{spec}:model", "--data", f"{spec}:data",
                                   "--layer", BLOCK, "-q"])
    assert refused.exit_code != 0 and "tokens:mean" in refused.output
    result = runner.invoke(main, ["record", str(cache), "--model", f"{spec}:model", "--data", f"{spec}:data",
                                  "--layer", BLOCK, "--layer", "encoder", "--layout", f"{BLOCK}=tokens:mean",
                                  "--layout", "encoder=tokens:cls", "--relevances", "gradient-x-input",
                                  "--batch-size", "16", "--overwrite", "-q"])
    assert result.exit_code == 0, result.output
    concepts_path = tmp_path / "concepts.npz"
    shapes.concepts.save(concepts_path)
    for source in ("activation", "relevance"):
        out = tmp_path / source
        result = runner.invoke(main, ["label", str(cache), str(concepts_path), "--source", source, "-L", "1",
                                      "-B", "1", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"## encoder ({source}, tokens:cls)" in result.output
        assert f"## {BLOCK} ({source}, tokens:mean)" in result.output
        index = json.loads((out / "index.json").read_text())
        assert set(index) == {BLOCK, "encoder"}
    result = runner.invoke(main, ["find", str(cache), str(concepts_path), "red AND circle", "--layer", "encoder",
                                  "--top", "0", "--out", str(tmp_path / "find.json")])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "find.json").read_text())
    rows = found["matches"] if isinstance(found, dict) and "matches" in found else found
    assert len(rows) == HIDDEN
    (tmp_path / "classes.json").write_text(json.dumps(shapes.class_names))
    np.save(tmp_path / "targets.npy", shapes.targets.numpy())
    result = runner.invoke(main, ["audit", str(cache), str(tmp_path / "activation" / "index.json"), "--targets",
                                  str(tmp_path / "targets.npy"), "--classes", str(tmp_path / "classes.json"),
                                  "--concepts", str(concepts_path), "--layer", "encoder",
                                  "--out", str(tmp_path / "audit.json"), "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["decompose", str(cache), "--model", f"{spec}:model", "--data", f"{spec}:data",
                                  "--layer", "encoder", "--labels", str(tmp_path / "relevance" / "index.json"),
                                  "--concepts", str(concepts_path), "--sample", "0", "--sample", "5",
                                  "--top-k", "3", "--out", str(tmp_path / "glocal.json")])
    assert result.exit_code == 0, result.output
    parts = json.loads((tmp_path / "glocal.json").read_text())
    assert [part["layer"] for part in parts] == ["encoder", "encoder"]
    assert all(len(part["evidence"]) == 3 and len(part["channel_relevance"]["values"]) == HIDDEN for part in parts)
    result = runner.invoke(main, ["report", str(cache), str(tmp_path / "activation" / "index.json"), "--concepts",
                                  str(concepts_path), "--out", str(tmp_path / "report.html"), "-q"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_end_to_end_api(tmp_path, shapes):
    """API: FeatureVisualization records a tiny ViT; labels from activations and relevances; find's AUCs equal
    sklearn's; decomposition with evidence from the cache (class-token pooling) is complete."""
    from crp_invert.audit import audit
    from crp_invert.find import find_channels

    model = tiny_vit()
    layouts = vit_layouts(model, blocks=None)
    fv = InvertFeatureVisualization(GradientTimesInput(model), shapes, vit_layer_map(layouts), path=str(tmp_path),
                                    layouts=layouts, progress=False)
    fv.run(None, 0, N, batch_size=16, checkpoint=32)
    concepts = shapes.concepts
    with ActivationCache(tmp_path / "activations.h5") as cache:
        labels = label_units(cache, concepts, "encoder")
        relevance_labels = label_units(cache, concepts, "encoder", source="relevance")
        assert len(labels) == len(relevance_labels) == HIDDEN
        search = find_channels("red AND circle", cache, concepts, layers=["encoder"])
        mask = concepts.mask("red").reshape(-1).numpy() & concepts.mask("circle").reshape(-1).numpy()
        acts = cache.activations("encoder").numpy()
        assert len(search) == HIDDEN
        for match in search.matches[:3]:
            assert match.auc == pytest.approx(roc_auc_score(mask, acts[:, match.channel]), abs=1e-9)
        report = audit(cache, {"encoder": labels}, "encoder", shapes.class_names, targets=shapes.targets.numpy(),
                       concepts=concepts, k=3)
        assert report is not None
        images, targets = shapes.tensors(range(2))
        parts = decompose_units(GradientTimesInput(model), images, targets.tolist(), "encoder", None,
                                labels=labels, top_k=3,
                                evidence=Evidence(cache, concepts=concepts, sample_index=[0, 1]))
        for part in parts:
            assert part.completeness_error() < 1e-4
            for item in part.evidence:
                assert item.activation == pytest.approx(float(acts[parts.index(part), item.channel]), rel=1e-4)


@pytest.mark.parametrize("name", ["integration.layouts", "integration.vit"])
def test_docstring_examples(name):
    """The examples in the docstrings of the layout and ViT modules run and print what they say."""
    import doctest
    import importlib

    module = importlib.import_module(f"crp_invert.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_callable_token_pooling_sees_units_first(tmp_path, shapes):
    """``"tokens"`` with a callable pooling: the callable gets [B, D, T] (here: the mean of the patch tokens)."""
    model = tiny_vit()
    cache = record_activations(model, loader(shapes), [BLOCK], tmp_path / "a.h5", layouts={BLOCK: "tokens"},
                               pooling={BLOCK: lambda units: units[:, :, 1:].mean(-1)}, progress=False)
    images, _ = shapes.tensors()
    torch.testing.assert_close(cache.activations(BLOCK), direct_outputs(model, images, [BLOCK])[BLOCK][:, 1:].mean(1))
    assert cache.info(BLOCK)["pooling"].startswith("callable:")
    cache.close()


@pytest.mark.parametrize("spec, error", [("token", ValueError), ("channels:cls", ValueError),
                                         ("tokens:median", ValueError), (3, TypeError)])
def test_bad_layouts_are_refused(spec, error):
    """Unknown layouts, poolings a layout does not have, and non-strings are refused naming the choices."""
    with pytest.raises(error, match="layout"):
        parse_layout(spec)


def test_tokens_layout_needs_a_token_concept(tmp_path, shapes):
    """A tokens layer with CRP's ChannelConcept would condition over tokens: refused before any work."""
    model = tiny_vit()
    with pytest.raises(TypeError, match="TokenConcept"):
        InvertFeatureVisualization(GradientTimesInput(model), shapes, {BLOCK: ChannelConcept()}, path=str(tmp_path),
                                   layouts={BLOCK: "tokens:mean"}, progress=False)
    with pytest.raises(KeyError, match="not in the layer map"):
        record_activations(model, loader(shapes), [BLOCK], tmp_path / "a.h5", layouts={"encoder": "tokens"},
                           progress=False)


def test_token_concept_in_the_layer_map_declares_the_tokens_layout(tmp_path, shapes):
    """A TokenConcept in the layer map is a declaration: units on the last axis, reduced by the pooling."""
    model = tiny_vit()
    cache = record_activations(model, loader(shapes), {BLOCK: TokenConcept()}, tmp_path / "a.h5", pooling="max",
                               progress=False)
    images, _ = shapes.tensors()
    torch.testing.assert_close(cache.activations(BLOCK), direct_outputs(model, images, [BLOCK])[BLOCK].amax(1))
    assert cache.info(BLOCK)["layout"] == "tokens"
    cache.close()
