"""Fuzzy-logic circuits: operators against their definitions, identities, circuits, neuron selection."""
import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from crp_invert.fuzzy import (
    LOGICS,
    Fuzzifier,
    FuzzyCircuit,
    best_neurons,
    fuzzify,
    fuzzy_and,
    fuzzy_not,
    fuzzy_or,
    standardize_params,
    t_conorm,
    t_norm,
)

# definitions written out per element, in plain Python floats
T_NORMS = {
    "goedel": lambda a, b: min(a, b),
    "product": lambda a, b: a * b,
    "lukasiewicz": lambda a, b: max(0.0, a + b - 1.0),
    "yager": lambda a, b: max(0.0, 1.0 - math.sqrt((1 - a) ** 2 + (1 - b) ** 2)),
}
T_CONORMS = {
    "goedel": lambda a, b: max(a, b),
    "product": lambda a, b: a + b - a * b,
    "lukasiewicz": lambda a, b: min(1.0, a + b),
    "yager": lambda a, b: min(1.0, math.sqrt(a ** 2 + b ** 2)),
}


@pytest.fixture
def degrees():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(3, 500, generator=generator, dtype=torch.float64)
    # include the corners of the unit square
    values[:, :4] = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.5, 0.0, 1.0]])
    return values


@pytest.mark.parametrize("logic", LOGICS)
def test_operators_match_definitions(logic, degrees):
    """Each t-norm and t-conorm equals its scalar textbook definition; NOT is 1 - a."""
    a, b, _ = degrees
    pairs = list(zip(a.tolist(), b.tolist()))
    expected_and = torch.tensor([T_NORMS[logic](x, y) for x, y in pairs], dtype=torch.float64)
    expected_or = torch.tensor([T_CONORMS[logic](x, y) for x, y in pairs], dtype=torch.float64)
    torch.testing.assert_close(t_norm(a, b, logic), expected_and, rtol=0, atol=1e-12)
    torch.testing.assert_close(t_conorm(a, b, logic), expected_or, rtol=0, atol=1e-12)
    torch.testing.assert_close(fuzzy_not(a), 1 - a)


@pytest.mark.parametrize("logic", LOGICS)
def test_de_morgan_and_boundaries(logic, degrees):
    """Every logic satisfies De Morgan's laws, neutral elements, commutativity and associativity."""
    a, b, c = degrees
    # NOT(a AND b) == NOT a OR NOT b and the dual, for each t-norm / t-conorm pair
    torch.testing.assert_close(fuzzy_not(fuzzy_and(a, b, logic=logic)),
                               fuzzy_or(fuzzy_not(a), fuzzy_not(b), logic=logic), rtol=0, atol=1e-12)
    torch.testing.assert_close(fuzzy_not(fuzzy_or(a, b, logic=logic)),
                               fuzzy_and(fuzzy_not(a), fuzzy_not(b), logic=logic), rtol=0, atol=1e-12)
    # 1 is neutral for AND, 0 for OR; commutativity; associativity makes the n-ary fold order free
    ones, zeros = torch.ones_like(a), torch.zeros_like(a)
    torch.testing.assert_close(t_norm(a, ones, logic), a, rtol=0, atol=1e-12)
    torch.testing.assert_close(t_conorm(a, zeros, logic), a, rtol=0, atol=1e-12)
    torch.testing.assert_close(t_norm(a, b, logic), t_norm(b, a, logic))
    torch.testing.assert_close(fuzzy_and(a, b, c, logic=logic), t_norm(a, t_norm(b, c, logic), logic),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(fuzzy_or(a, b, c, logic=logic), t_conorm(t_conorm(a, b, logic), c, logic),
                               rtol=0, atol=1e-12)
    for value in (fuzzy_and(a, b, c, logic=logic), fuzzy_or(a, b, c, logic=logic)):
        assert value.min() >= 0 and value.max() <= 1


def test_goedel_is_min_max_and_boolean_limit(degrees):
    """Goedel logic is min/max, and every logic is boolean logic on crisp inputs."""
    torch.testing.assert_close(fuzzy_and(*degrees, logic="goedel"), degrees.min(dim=0).values)
    torch.testing.assert_close(fuzzy_or(*degrees, logic="goedel"), degrees.max(dim=0).values)
    # on crisp inputs every logic is boolean logic
    for logic, (x, y) in itertools.product(LOGICS, itertools.product([0.0, 1.0], repeat=2)):
        a, b = torch.tensor([x], dtype=torch.float64), torch.tensor([y], dtype=torch.float64)
        assert float(t_norm(a, b, logic)) == float(bool(x) and bool(y))
        assert float(t_conorm(a, b, logic)) == float(bool(x) or bool(y))


def test_yager_p_generalizes():
    """Yager with p = 1 equals Lukasiewicz; a bad p or logic name raises ValueError."""
    a, b = torch.tensor([0.3, 0.8]), torch.tensor([0.6, 0.9])
    # p = 1 is Lukasiewicz
    torch.testing.assert_close(t_norm(a, b, "yager", p=1.0), t_norm(a, b, "lukasiewicz"))
    torch.testing.assert_close(t_conorm(a, b, "yager", p=1.0), t_conorm(a, b, "lukasiewicz"))
    with pytest.raises(ValueError, match="p must be"):
        t_norm(a, b, "yager", p=0)
    with pytest.raises(ValueError, match="logic"):
        t_norm(a, b, "zadeh")


def test_fuzzifier_standardize_then_sigmoid():
    """The fuzzifier is a sigmoid of numpy-standardized activations, 0.5 for a constant neuron."""
    generator = torch.Generator().manual_seed(1)
    acts = torch.randn(200, 5, generator=generator, dtype=torch.float64) * torch.arange(1, 6) + 3
    acts[:, 4] = 2.0  # constant neuron
    mean, std = standardize_params(acts)
    np.testing.assert_allclose(mean.numpy(), acts.numpy().mean(0))
    np.testing.assert_allclose(std.numpy(), acts.numpy().std(0), atol=1e-12)
    fuzzifier = Fuzzifier().fit(acts)
    degrees = fuzzifier(acts)
    varying = acts.numpy()[:, :4]
    expected = 1 / (1 + np.exp(-(varying - varying.mean(0)) / varying.std(0)))
    np.testing.assert_allclose(degrees[:, :4].numpy(), expected, rtol=1e-12)
    assert torch.all(degrees[:, 4] == 0.5)
    torch.testing.assert_close(fuzzify(acts, mean, std), degrees)
    with pytest.raises(RuntimeError, match="fit"):
        Fuzzifier()(acts)
    with pytest.raises(ValueError, match="features"):
        fuzzifier(acts[:, :3])


def test_circuit_matches_manual_evaluation_and_auc():
    """A FuzzyCircuit equals the hand-written composition of t-norms, and its score sklearn's AUC."""
    generator = torch.Generator().manual_seed(2)
    acts = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    degrees = Fuzzifier().fit(acts)(acts)
    concept = (acts[:, 1] > 0.3) & (acts[:, 5] > -0.2)
    for logic in LOGICS:
        circuit = FuzzyCircuit("n1 AND n5 AND NOT n7", logic=logic)
        assert circuit.neurons == [1, 5, 7]
        manual = t_norm(t_norm(degrees[:, 1], degrees[:, 5], logic), 1 - degrees[:, 7], logic)
        torch.testing.assert_close(circuit(degrees), manual, rtol=0, atol=1e-12)
        auc = circuit.score(degrees, concept)
        assert auc == pytest.approx(roc_auc_score(concept.numpy(), manual.numpy()), abs=1e-12)
    # OR, parentheses, named atoms
    circuit = FuzzyCircuit("a OR (b AND NOT c)", logic="product", names={"a": 0, "b": 3, "c": 2})
    manual = t_conorm(degrees[:, 0], degrees[:, 3] * (1 - degrees[:, 2]), "product")
    torch.testing.assert_close(circuit(degrees), manual)
    with pytest.raises(KeyError, match="n<index>"):
        FuzzyCircuit("dog AND n3")
    with pytest.raises(ValueError, match="neuron 9"):
        FuzzyCircuit("n9 AND n1")(degrees)


def test_best_neurons_against_sklearn():
    """best_neurons picks, per concept, the neuron of highest sklearn AUC."""
    from crp_invert import ConceptLabels

    generator = torch.Generator().manual_seed(3)
    acts = torch.randn(250, 6, generator=generator)
    acts[:, 2] = acts[:, 2].round()  # ties
    labels = torch.stack([acts[:, 4] + 0.5 * torch.randn(250, generator=generator) > 0,
                          acts[:, 2] > 0, torch.rand(250, generator=generator) > 0.7], dim=1)
    concepts = ConceptLabels(labels.numpy(), ["a", "b", "c"])
    matches = best_neurons(acts, concepts)
    for k, match in enumerate(matches):
        aucs = [roc_auc_score(labels[:, k].numpy(), acts[:, f].numpy()) for f in range(6)]
        assert match.concept == ["a", "b", "c"][k]
        assert match.neuron == int(np.argmax(aucs))
        assert match.auc == pytest.approx(max(aucs), abs=1e-12)
    # monotone mapping: same selection on truth degrees; plain tensors work with names
    fuzzy_matches = best_neurons(Fuzzifier().fit(acts)(acts), labels, names=["a", "b", "c"])
    assert [m.neuron for m in fuzzy_matches] == [m.neuron for m in matches]
    with pytest.raises(ValueError, match="samples"):
        best_neurons(acts[:10], labels)
