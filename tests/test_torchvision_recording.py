"""InvertFeatureVisualization as a drop-in for CRP on the torchvision models CRP users explain (random weights,
32 x 32 inputs, CPU).

For each model the same layer map (leaf convolutions, container blocks, and for ResNet18 a ``relu`` that every
BasicBlock calls twice) goes through plain CRP and through ours. Expected values are independent of our code:
CRP's files from plain CRP, activations from forward hooks on the model under the composite's canonizers,
relevances from CRP's ``CondAttribution(record_layer=...)``.

DenseNet121: zennit 0.4.6's ``SequentialMergeBatchNorm`` (zennit has no DenseNet canonizer) pairs each dense
layer's ``norm1`` with the previous layer's ``conv2`` and fails with a RuntimeError while registering, in plain
CRP too, and leaves ``features.conv0`` with an added bias. Recording works on DenseNet121 with a composite
without that canonizer; with it, ours raises the same error and leaves the model as it was.
"""

import numpy as np
import pytest
import torch

tv = pytest.importorskip("torchvision")

from crp.attribution import CondAttribution  # noqa: E402
from crp.concepts import ChannelConcept  # noqa: E402
from crp.visualization import FeatureVisualization  # noqa: E402
from helpers import ListDataset, assert_same_crp_files, hooks_left, randomize_batch_norm  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonPlus  # noqa: E402
from zennit.core import Composite  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402

from crp_invert.integration.feature_visualization import InvertFeatureVisualization  # noqa: E402
from crp_invert.integration.hooks import record_activations  # noqa: E402
from crp_invert.storage.cache import ActivationCache  # noqa: E402

N, BATCH, CLASSES = 8, 4, 4

# model, canonizer (None: none), layers: leaf convolutions, container blocks, modules called twice per pass
MODELS = {
    "vgg11_bn": (tv.models.vgg11_bn, VGGCanonizer, ["features.0", "features.8", "features", "classifier.0"]),
    "resnet18": (
        tv.models.resnet18,
        ResNetCanonizer,
        ["conv1", "layer1.0.conv1", "layer1.0.relu", "layer1", "layer2.1", "layer4.1.relu", "layer4"],
    ),
    "mobilenet_v2": (
        tv.models.mobilenet_v2,
        SequentialMergeBatchNorm,
        ["features.0.0", "features.2", "features.3.conv.1.0", "features"],
    ),
    "densenet121": (
        tv.models.densenet121,
        None,
        ["features.conv0", "features.denseblock1.denselayer1.conv1", "features.denseblock1", "features.transition1"],
    ),
}
CALLED_TWICE = {"layer1.0.relu", "layer4.1.relu"}


def build(name, seed=0):
    make, _, _ = MODELS[name]
    torch.manual_seed(seed)
    return randomize_batch_norm(make(weights=None, num_classes=CLASSES), seed)


def canonizers(name):
    canonizer = MODELS[name][1]
    return [canonizer()] if canonizer is not None else []


def composite(name):
    return EpsilonPlus(canonizers=canonizers(name))


def data(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, 32, 32, generator=generator), torch.randint(0, CLASSES, (N,), generator=generator)


def layer_map(name):
    return {layer: ChannelConcept() for layer in MODELS[name][2]}


def model_state(model):
    """Everything a canonizer or a hook may change: parameter objects and values, buffers, attributes, hooks."""
    return {
        "parameters": {name: (id(p), p.detach().clone()) for name, p in model.named_parameters()},
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "attributes": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "hooks": hooks_left(model),
    }


def assert_same_state(before, after):
    assert before["parameters"].keys() == after["parameters"].keys()
    for key, (identity, value) in before["parameters"].items():
        assert after["parameters"][key][0] == identity and torch.equal(after["parameters"][key][1], value), key
    assert all(torch.equal(before["buffers"][k], v) for k, v in after["buffers"].items())
    assert before["attributes"] == after["attributes"] and after["hooks"] == before["hooks"] == 0


@pytest.fixture(autouse=True)
def _fast_gc(monkeypatch):
    import crp.maximization
    import crp.statistics

    monkeypatch.setattr(crp.maximization.gc, "collect", lambda *a: 0)
    monkeypatch.setattr(crp.statistics.gc, "collect", lambda *a: 0)


@pytest.fixture(scope="module", params=list(MODELS))
def runs(request, tmp_path_factory):
    """Plain CRP and ours on the same model, data and layer map (the tests using it are marked slow: the four
    models take minutes to run)."""
    import crp.maximization
    import crp.statistics

    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = build(name)
    before = model_state(model)
    x, y = data()
    dataset = ListDataset(x, y)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crp.maximization.gc, "collect", lambda *a: 0)
        mp.setattr(crp.statistics.gc, "collect", lambda *a: 0)
        plain = FeatureVisualization(CondAttribution(model), dataset, layer_map(name), path=str(root / "plain"))
        plain.run(composite(name), 0, N, BATCH, 1)
        ours = InvertFeatureVisualization(CondAttribution(model), dataset, layer_map(name), path=str(root / "ours"),
                                          activation_cache=root / "acts.h5", progress=False)
        ours.run(composite(name), 0, N, BATCH, 1)
    return {"name": name, "root": root, "model": model, "x": x, "y": y, "before": before}


@pytest.mark.slow
def test_crp_files_equal_plain_crp(runs):
    """Recording activations leaves CRP's result files byte for byte those of plain CRP on a torchvision model."""
    assert_same_crp_files(runs["root"] / "ours", runs["root"] / "plain")


@pytest.mark.slow
def test_model_unchanged_and_no_hooks_left(runs):
    """After the recording run the torchvision model's state is unchanged and no hooks are left."""
    assert_same_state(runs["before"], model_state(runs["model"]))


def canonized_outputs(name, model, x):
    """Pooled outputs of the layers from forward hooks on the model under the composite's canonizers (the last
    call of a module called twice), and how often each module was called."""
    modules = dict(model.named_modules())
    outputs, calls = {}, {}

    def hook(layer):
        def store(module, inputs, output):
            # the last call's output; a copy, since an in-place ReLU may follow
            outputs[layer] = output.detach().mean((2, 3)) if output.dim() == 4 else output.detach().clone()
            calls[layer] = calls.get(layer, 0) + 1

        return store

    handles = [modules[layer].register_forward_hook(hook(layer)) for layer in MODELS[name][2]]
    try:
        with Composite(canonizers=canonizers(name)).context(model), torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, calls


@pytest.mark.slow
def test_cached_activations_equal_canonized_forward_hooks(runs):
    """The cached activations equal the pooled outputs of forward hooks on the canonized model."""
    name = runs["name"]
    outputs, calls = canonized_outputs(name, runs["model"], runs["x"])
    assert {layer for layer, n in calls.items() if n == 2} == CALLED_TWICE & set(calls)
    with ActivationCache(runs["root"] / "acts.h5") as cache:
        assert cache.layers == MODELS[name][2] and cache.is_complete()
        for layer, expected in outputs.items():
            torch.testing.assert_close(cache.activations(layer), expected, rtol=1e-5, atol=1e-6, msg=layer)


@pytest.mark.slow
def test_record_activations_equal_canonized_forward_hooks(runs, tmp_path):
    """record_activations with the composite's canonizers equals forward hooks on the canonized model, and leaves the
    model as it was."""
    name, model, x = runs["name"], runs["model"], runs["x"]
    before = model_state(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=BATCH)
    with record_activations(model, loader, MODELS[name][2], tmp_path / "r.h5", composite=Composite(
            canonizers=canonizers(name)), progress=False) as cache:
        for layer, expected in canonized_outputs(name, model, x)[0].items():
            torch.testing.assert_close(cache.activations(layer), expected, rtol=1e-5, atol=1e-6, msg=layer)
    assert_same_state(before, model_state(model))


@pytest.mark.slow
def test_cached_relevances_equal_condattribution(runs):
    """The cached relevances equal CRP's CondAttribution with ChannelConcept, one layer at a time."""
    name, model, x, y = runs["name"], runs["model"], runs["x"], runs["y"]
    with ActivationCache(runs["root"] / "acts.h5") as cache:
        for layer in MODELS[name][2]:
            # one layer per call: CondAttribution resets the gradient of each recorded output after reading it, so a
            # block and its last module (layer4, layer4.1.relu: one tensor) cannot be recorded in one call
            result = CondAttribution(model)(x.clone().requires_grad_(True), [{"y": [int(t)]} for t in y],
                                            composite(name), record_layer=[layer])
            expected = ChannelConcept().attribute(result.relevances[layer], abs_norm=False)
            got = cache.relevances(layer)
            assert got.abs().max() > 0, layer
            scale = float(expected.abs().max())
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=layer)


@pytest.mark.slow
def test_failing_call_leaves_no_hooks_or_canonizer_changes(runs, tmp_path):
    """An error in the middle of a run leaves the torchvision model without hooks or canonizer changes."""
    name = runs["name"]
    model = build(name)
    before = model_state(model)
    x, y = data()

    def fail(index):
        if index == BATCH + 1:  # in the second batch, with the composite and CRP's hooks registered
            raise KeyError("no such image")

    fv = InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y, fail), layer_map(name),
                                    path=str(tmp_path / "fv"), activation_cache=tmp_path / "a.h5", progress=False)
    with pytest.raises(KeyError, match="no such image"):
        fv.run(composite(name), 0, N, BATCH, 1)
    assert_same_state(before, model_state(model))
    with ActivationCache(tmp_path / "a.h5") as cache:
        assert cache.missing_ranges() == [(BATCH, N)]


def test_densenet_with_batchnorm_merging_fails_cleanly(tmp_path):
    """BatchNorm merging on DenseNet fails with plain CRP's error, but our run leaves the model as it was."""
    x, y = data()
    merge = EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])
    plain_model = build("densenet121")
    plain = FeatureVisualization(CondAttribution(plain_model), ListDataset(x, y), layer_map("densenet121"),
                                 path=str(tmp_path / "plain"))
    with pytest.raises(RuntimeError) as plain_error:
        plain.run(merge, 0, N, BATCH, 1)
    assert plain_model.features.conv0.bias is not None  # plain CRP leaves zennit's partial merge behind

    model = build("densenet121")
    before = model_state(model)
    fv = InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y), layer_map("densenet121"),
                                    path=str(tmp_path / "ours"), activation_cache=tmp_path / "a.h5", progress=False)
    with pytest.raises(RuntimeError) as our_error:
        fv.run(EpsilonPlus(canonizers=[SequentialMergeBatchNorm()]), 0, N, BATCH, 1)
    assert str(our_error.value) == str(plain_error.value)
    assert_same_state(before, model_state(model))
    assert model.features.conv0.bias is None


@pytest.mark.slow
def test_every_layer_name_plain_crp_accepts_is_recorded(runs):
    """Every name of the layer map (leaves, containers, modules called twice) has complete, finite rows."""
    with ActivationCache(runs["root"] / "acts.h5") as cache:
        for layer in MODELS[runs["name"]][2]:
            for values in (cache.activations(layer), cache.relevances(layer)):
                assert values.shape[0] == N and np.isfinite(values.numpy()).all(), layer


def tiny_vit(seed=0):
    """torchvision's VisionTransformer (random weights, random head: torchvision's is zero)."""
    torch.manual_seed(seed)
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                        mlp_dim=64, num_classes=CLASSES)
    torch.nn.init.normal_(model.heads.head.weight, std=0.3)
    return model.eval()


def test_vit_records_units_and_leaves_crp_files_as_plain_crp(tmp_path):
    """ViT through CRP with TokenConcept and gradient x input: CRP's files equal plain CRP's, the cache holds the
    units (last axis) of the blocks and the class token of the feature extractor as forward hooks see them."""
    from crp_invert.integration.layouts import TokenConcept
    from crp_invert.integration.vit import GradientTimesInput

    model = tiny_vit()
    layouts = {"encoder.layers.encoder_layer_1": "tokens:max", "encoder": "tokens:cls"}
    x, y = data()
    dataset = ListDataset(x, y)
    plain = FeatureVisualization(GradientTimesInput(model), dataset, {k: TokenConcept() for k in layouts},
                                 path=str(tmp_path / "plain"))
    plain.run(None, 0, N, BATCH, 4)
    ours = InvertFeatureVisualization(GradientTimesInput(model), dataset, {k: TokenConcept() for k in layouts},
                                      path=str(tmp_path / "ours"), activation_cache=tmp_path / "acts.h5",
                                      layouts=layouts, progress=False)
    ours.run(None, 0, N, BATCH, 4)
    assert_same_crp_files(tmp_path / "ours", tmp_path / "plain")
    outputs = {}
    handles = [model.get_submodule(k).register_forward_hook(
        lambda m, i, o, k=k: outputs.__setitem__(k, o.detach())) for k in layouts]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    assert hooks_left(model) == 0
    with ActivationCache(tmp_path / "acts.h5") as cache:
        torch.testing.assert_close(cache.activations("encoder.layers.encoder_layer_1"),
                                   outputs["encoder.layers.encoder_layer_1"].amax(1))
        torch.testing.assert_close(cache.activations("encoder"), outputs["encoder"][:, 0])
        assert cache.n_channels("encoder") == 32 and cache.info("encoder")["layout"] == "tokens"


def test_vit_block_without_layout_is_refused_in_feature_visualization(tmp_path):
    """CRP's usual ChannelConcept on a [B, T, D] block: refused at the first batch, the model left clean."""
    model = tiny_vit()
    x, y = data()
    fv = InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y),
                                    {"encoder.layers.encoder_layer_0": ChannelConcept()}, path=str(tmp_path),
                                    progress=False)
    with pytest.raises(ValueError, match="tokens:mean"):
        fv.run(None, 0, N, BATCH, 4)
    assert hooks_left(model) == 0
