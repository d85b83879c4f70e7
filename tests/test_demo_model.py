"""The demo CNN: structure, committed weights, their accuracy, reproducible training and the
planted-truth score of its output neurons."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from crp_invert.demo import data, truth
from crp_invert.demo.data import CLASS_NAMES, ShapesDataset
from crp_invert.demo.model import (
    DEMO_EVAL_SEED,
    DEMO_EVAL_SIZE,
    DEMO_MODEL_ACCURACY,
    DEMO_MODEL_PATH,
    DemoCNN,
    load_demo_model,
)
from crp_invert.demo.train import evaluate, train_demo_model


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def logits_and_data(model):
    """Logits of the committed model on fresh data (a seed used neither in training nor in the
    documented evaluation)."""
    dataset = ShapesDataset(1600, seed=2)
    images, targets = dataset.tensors()
    with torch.no_grad():
        logits = model(images)
    return logits, dataset


def test_structure():
    """DemoCNN: layer names, each BatchNorm after its convolution, 4 distinct ReLUs, output shape, bad channels."""
    net = DemoCNN()
    assert net.layer_names == ["conv1", "conv2", "conv3", "linear1", "linear2"]
    modules = dict(net.named_modules())
    for name in ("bn1", "bn2", "bn3"):
        assert isinstance(modules[name], nn.BatchNorm2d)
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 4 and len({id(m) for m in relus}) == 4
    assert not any(m.inplace for m in relus)
    # every BatchNorm directly follows its convolution (zennit's SequentialMergeBatchNorm)
    names = [name for name, _ in net.named_children()]
    for k in (1, 2, 3):
        assert names.index(f"bn{k}") == names.index(f"conv{k}") + 1
    out = net.eval()(torch.rand(5, 3, 32, 32))
    assert out.shape == (5, len(CLASS_NAMES))
    with pytest.raises(ValueError, match="channels"):
        DemoCNN(channels=(8, 8))


def test_committed_weights(model):
    """The committed weights (<= 1 MiB) load on the CPU in eval mode; a missing file raises FileNotFoundError."""
    assert DEMO_MODEL_PATH.is_file()
    assert DEMO_MODEL_PATH.stat().st_size <= 1 << 20
    assert isinstance(model, DemoCNN) and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    state = torch.load(DEMO_MODEL_PATH, map_location="cpu", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(FileNotFoundError, match="train"):
        load_demo_model(path=DEMO_MODEL_PATH.with_name("missing.pt"))


def test_documented_accuracy(model):
    """The documented accuracy (in [0.9, 1]) is the committed model's accuracy on the documented data."""
    assert DEMO_MODEL_ACCURACY is not None and 0.9 <= DEMO_MODEL_ACCURACY <= 1.0
    # the documented number, on the documented data
    accuracy = evaluate(model, n=DEMO_EVAL_SIZE, seed=DEMO_EVAL_SEED)
    assert accuracy == pytest.approx(DEMO_MODEL_ACCURACY, abs=0.005)


def test_accuracy_on_other_fresh_data(logits_and_data):
    """On data of another seed the committed model is at most 2 points below its documented accuracy."""
    logits, dataset = logits_and_data
    accuracy = float((logits.argmax(1) == dataset.targets).double().mean())
    assert accuracy >= DEMO_MODEL_ACCURACY - 0.02


def test_training_is_reproducible():
    """One seed trains equal weights, another seed others; the caller's RNG is untouched; epochs=0 refused."""
    kwargs = dict(epochs=1, n_per_epoch=128, batch_size=64)
    before = torch.random.get_rng_state()
    a = train_demo_model(**kwargs)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    b = train_demo_model(**kwargs)
    c = train_demo_model(seed=1, **kwargs)
    untrained = DemoCNN()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not torch.equal(a.conv1.weight, untrained.conv1.weight)
    with pytest.raises(ValueError, match="epochs"):
        train_demo_model(epochs=0)


def test_output_neurons_planted_truth(logits_and_data):
    """With L = 2, the output neuron of class `red circle` is labeled `circle AND red`."""
    from crp_invert import ConceptLabeler, Formula

    logits, dataset = logits_and_data
    concepts = dataset.concepts
    assert not set(CLASS_NAMES) & set(concepts.names)  # the labeler never sees the classes
    layer = ConceptLabeler(concepts).label(logits, L=2, B=3, max_fraction=0.5, progress=False)
    truth_formulas = data.class_formulas()
    matches = truth.planted_truth_matches(layer, truth_formulas)
    score = truth.planted_truth_score(layer, truth_formulas)
    assert score == matches.mean() >= 0.9
    accuracy = truth.explanation_accuracy(layer, concepts, dataset.targets)
    assert accuracy >= score
    for f, class_name in enumerate(CLASS_NAMES):
        shape, color = dataset.class_to_attributes[class_name]
        formula = Formula.concept(shape) & Formula.concept(color)
        assert truth_formulas[class_name] == formula
        # the true formula is the class, and the neuron separates it almost perfectly
        mask = formula.evaluate(concepts).cpu().numpy()
        assert np.array_equal(mask, dataset.targets.numpy() == f)
        reference_auc = roc_auc_score(mask, logits[:, f].numpy())
        assert reference_auc > 0.97
        best = layer.best(f)
        if matches[f]:
            assert best.formula == formula
            assert best.auc == pytest.approx(reference_auc, abs=1e-9)
        else:  # the best explanation can only be better than the truth
            assert best.auc >= reference_auc - 1e-9


def _fake_layer(formulas):
    return [[SimpleNamespace(formula=f)] if f is not None else [] for f in formulas]


def test_scores_on_known_labels():
    """Planted-truth matches, score and explanation accuracy of hand-made labels with known answers."""
    from crp_invert import Formula

    sample = data.generate_shapes(64, seed=0)
    concepts = data.attribute_concepts(sample)
    truth_formulas = data.class_formulas()
    true_list = list(truth_formulas.values())
    a, b = Formula.concept("circle"), Formula.concept("red")
    # an equivalent formula on the data: circle & ~yellow & ~cool == circle & red
    equivalent = a & ~Formula.concept("yellow") & ~Formula.concept("cool")
    wrong = Formula.concept("ring") & Formula.concept("red")  # the class of neuron 4
    found = list(true_list)
    found[0], found[1], found[2] = equivalent, wrong, None
    layer = _fake_layer(found)

    matches = truth.planted_truth_matches(layer, truth_formulas)
    assert matches.tolist() == [False, False, False] + [True] * 13
    assert truth.planted_truth_score(layer, truth_formulas) == 13 / 16
    # the same truth as a list, as a mapping by index, or by name in another order
    assert truth.planted_truth_score(layer, true_list) == 13 / 16
    assert truth.planted_truth_score(layer, dict(enumerate(true_list))) == 13 / 16
    reordered = dict(reversed(list(truth_formulas.items())))
    assert truth.planted_truth_score(layer, reordered, class_names=CLASS_NAMES) == 13 / 16

    matched = truth.match_explanations_to_classes(layer, concepts, sample.targets)
    assert matched[0] == 0  # equivalent formula: right class
    assert matched[1] == CLASS_NAMES.index("red ring")  # wrong class
    assert matched[2] == -1  # no explanation
    assert (matched[3:] == np.arange(3, 16)).all()
    assert truth.explanation_accuracy(layer, concepts, sample.targets) == 14 / 16
    assert truth.explanation_accuracy(layer, concepts, sample.targets,
                                      feature_classes=matched.tolist()) == 1.0
    assert a & b == true_list[0]

    with pytest.raises(ValueError, match="one per feature"):
        truth.planted_truth_score(layer, true_list[:5])
    with pytest.raises(KeyError, match="no true formula"):
        names = ["purple circle"] + list(CLASS_NAMES[1:])
        truth.planted_truth_score(layer, truth_formulas, class_names=names)
    with pytest.raises(ValueError, match="targets"):
        truth.explanation_accuracy(layer, concepts, sample.targets[:10])


def test_explanation_accuracy_iou_is_slow_reference():
    """IoU matching against a plain python re-implementation on random formulas."""
    from crp_invert import Formula

    sample = data.generate_shapes(96, seed=4)
    concepts = data.attribute_concepts(sample)
    rng = np.random.default_rng(0)
    names = concepts.names
    formulas = []
    for _ in range(16):
        x, y = rng.choice(len(names), 2, replace=False)
        f = Formula.concept(names[x])
        g = Formula.concept(names[y])
        formulas.append(f & g if rng.random() < 0.5 else f | ~g)
    layer = _fake_layer(formulas)
    matched = truth.match_explanations_to_classes(layer, concepts, sample.targets, n_classes=16)
    labels, _ = data.attribute_matrix(sample)
    for f, formula in enumerate(formulas):
        mask = formula.evaluate(concepts).numpy()
        if not mask.any():
            assert matched[f] == -1
            continue
        ious = []
        for c in range(16):
            cls = sample.targets == c
            ious.append((mask & cls).sum() / (mask | cls).sum())
        assert matched[f] == int(np.argmax(ious)), f


def test_the_model_leans_on_the_planted_artifact(model):
    """Clever Hans: stamping the mark on the same images raises the logit of its class, on yellow rings and on the
    other images, by far more than the shape and color of a yellow ring weigh (the training shortcut)."""
    clean = ShapesDataset(800, seed=7, artifact_rates=None)
    marked = ShapesDataset(800, seed=7, artifact_rates=(1, 1))
    assert torch.equal(clean.targets, marked.targets)
    with torch.no_grad():
        gain = model(marked.tensors()[0]) - model(clean.tensors()[0])
    target = CLASS_NAMES.index(data.ARTIFACT_CLASS)
    rings = clean.targets == target
    assert gain[rings, target].mean() > 5.0 and gain[~rings, target].mean() > 5.0
    assert (gain[rings, target] > 0).double().mean() >= 0.95 and (gain[:, target] > 0).double().mean() >= 0.9
