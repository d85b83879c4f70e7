"""The Clever-Hans audit on planted data: shares against a direct computation, flags, weights, JSON, errors.

The audit of the demo model (its planted artifact channel) is tested in tests/test_demo_audit.py.
"""

import numpy as np
import pytest
import torch

from crp_invert import ConceptLabels, Explanation, Formula, LayerLabels
from crp_invert.audit import Audit, audit, class_concepts_from_data, positive_literals
from crp_invert.integration.circuits import circuit_by_weight
from crp_invert.storage.cache import ActivationCache

CLASSES = ["red circle", "blue square", "empty"]
NAMES = ["red", "blue", "circle", "square", "striped", "mark"]
# channel -> its label (None: no label)
LABELS = ["red AND circle", "mark AND red", "striped", "NOT red", "blue", None, "square AND NOT mark", "circle"]
N = 240


def layer_labels(texts, names=NAMES, layer="conv"):
    beams = [[] if text is None else [Explanation(formula=Formula.parse(text, names), auc=0.9, fraction=0.2,
                                                  length=1, p_value=0.01)] for text in texts]
    return LayerLabels(beams, names, layer)


@pytest.fixture(scope="module")
def planted():
    """Classes 0 and 1 (class 2 has no sample); relevances of 8 channels with a planted mark channel for class 0."""
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=N)
    labels = np.zeros((N, len(NAMES)), dtype=bool)
    labels[:, 0] = labels[:, 2] = targets == 0
    labels[:, 1] = labels[:, 3] = targets == 1
    labels[:, 4] = rng.random(N) < 0.3
    relevances = rng.random((N, len(LABELS))) * 0.2
    relevances[targets == 0, 1] += 3.0  # the mark channel carries most of class 0's relevance
    relevances[targets == 0, 0] += 1.0
    relevances[targets == 1, 2] += 2.0  # an unrelated channel for class 1
    relevances[targets == 1, 4] += 1.5
    relevances[:, 3] -= 0.5  # negative relevance
    return dict(targets=targets, concepts=ConceptLabels(labels, NAMES), relevances=relevances,
                labels=layer_labels(LABELS))


def test_positive_literals():
    parse = Formula.parse
    assert positive_literals(parse("a AND NOT b")) == {"a"}
    assert positive_literals(parse("NOT (a OR NOT b)")) == {"b"}
    assert positive_literals(parse("NOT NOT a")) == {"a"}
    assert positive_literals(parse("(a AND b) OR (c AND NOT d)")) == {"a", "b", "c"}
    with pytest.raises(TypeError):
        positive_literals("a")


def test_shares_flags_and_order_match_a_direct_computation(planted):
    result = audit(planted["relevances"], planted["labels"], "conv", CLASSES, targets=planted["targets"],
                   artifacts=["mark"], concepts=planted["concepts"], k=len(LABELS), min_share=0.1)
    class_concepts = class_concepts_from_data(planted["concepts"], planted["targets"], CLASSES)
    assert class_concepts == {"red circle": ("red", "circle"), "blue square": ("blue", "square"), "empty": ()}
    for index, item in enumerate(result.classes[:2]):
        rows = planted["targets"] == index
        mean = planted["relevances"][rows].mean(0)
        share = mean / np.abs(mean).sum()
        assert item.n_samples == rows.sum() and item.concepts == class_concepts[item.name]
        assert [c.channel for c in item.channels] == list(np.argsort(-share, kind="stable"))
        np.testing.assert_allclose([c.share for c in item.channels], np.sort(share)[::-1], rtol=1e-12)
        np.testing.assert_allclose(sum(abs(c.share) for c in item.channels), 1.0)
        for channel in item.channels:
            text = LABELS[channel.channel]
            assert channel.label == (None if text is None else str(Formula.parse(text)))
            if text is None:
                expected = "unlabeled"
            elif "mark" in positive_literals(Formula.parse(text)):
                expected = "artifact"
            elif not positive_literals(Formula.parse(text)) & set(item.concepts):
                expected = "unrelated"
            else:
                expected = None
            assert channel.flag == expected, (item.name, channel)
    red = result["red circle"]
    assert red.channels[0].channel == 1 and red.channels[0].flag == "artifact"
    blue = result[1]
    assert blue.channels[0].channel == 2 and blue.channels[0].flag == "unrelated"
    assert result["empty"].channels == [] and result["empty"].n_samples == 0
    # "square AND NOT mark" asserts square, not the mark: no flag for blue square
    assert next(c for c in blue.channels if c.channel == 6).flag is None
    flagged = result.flagged()
    assert {name: [c.channel for c in channels] for name, channels in flagged.items()} == {
        "red circle": [1], "blue square": [2]}
    assert result.flagged(min_share=0.0)["red circle"] == red.flagged(0.0)
    assert all(c.share >= 0.0 for c in red.flagged(0.0))


def write_cache(path, relevances):
    """A one-layer cache ("conv") holding ``relevances`` as both activations and relevances."""
    relevances = relevances.astype(np.float32)
    with ActivationCache(path, mode="a", overwrite=True) as cache:
        cache.initialize((0, N))
        cache.add_layer("conv", len(LABELS), relevances=True, pooling="mean")
        cache.write("conv", (0, N), relevances, relevances)
        cache.mark_complete((0, N))
    return path


def test_cache_samples_and_top_k(planted, tmp_path):
    path = write_cache(tmp_path / "cache.h5", planted["relevances"])
    relevances = planted["relevances"].astype(np.float32)
    concepts = dict(class_concepts=class_concepts_from_data(planted["concepts"], planted["targets"], CLASSES))
    from_file = audit(str(path), {"conv": planted["labels"]}, "conv", CLASSES, targets=planted["targets"],
                      artifacts=["mark"], k=3, **concepts)
    in_memory = audit(relevances, planted["labels"], "conv", CLASSES, targets=planted["targets"],
                      artifacts=["mark"], k=3, **concepts)
    assert from_file == in_memory and all(len(c.channels) == 3 for c in from_file.classes[:2])
    half = np.arange(N) < N // 2
    part = audit(relevances, planted["labels"], "conv", CLASSES, targets=planted["targets"], k=3,
                 samples=half, **concepts)
    assert part["red circle"].n_samples == ((planted["targets"] == 0) & half).sum()
    same = audit(relevances, planted["labels"], "conv", CLASSES, targets=planted["targets"], k=3,
                 samples=np.flatnonzero(half), **concepts)
    assert same == part


def test_weights_rank_like_circuit_by_weight():
    torch.manual_seed(1)
    linear = torch.nn.Linear(len(LABELS), len(CLASSES))
    labels = layer_labels(LABELS)
    concepts = {"red circle": ("red", "circle"), "blue square": ("blue", "square"), "empty": ("striped",)}
    result = audit(None, labels, "conv", CLASSES, by="weight", weight=linear.weight, artifacts=["mark"],
                   class_concepts=concepts, k=4)
    assert result.quantity == "weight"
    for target, item in enumerate(result.classes):
        circuit = circuit_by_weight(linear, target, k=4, labels=labels)
        assert [c.channel for c in item.channels] == [node.channel for node in circuit.nodes[1:]]
        row = linear.weight.detach()[target].double().numpy()
        np.testing.assert_allclose([c.share for c in item.channels],
                                   row[[c.channel for c in item.channels]] / np.abs(row).sum())


def test_json_round_trip_and_table(planted, tmp_path):
    result = audit(planted["relevances"], planted["labels"], "conv", CLASSES, targets=planted["targets"],
                   artifacts=["mark"], concepts=planted["concepts"])
    again = Audit.from_json(result.to_json(tmp_path / "audit.json"))
    assert again == result and Audit.from_json(tmp_path / "audit.json") == result
    assert result.to_dict()["flagged"] == {"red circle": [1], "blue square": [2]}
    table = result.table()
    assert "[artifact]" in table and "mark AND red" in table and "(no label)" not in table.split("blue")[0]


def test_errors(planted):
    kwargs = dict(targets=planted["targets"], concepts=planted["concepts"])
    relevances, labels = planted["relevances"], planted["labels"]
    with pytest.raises(KeyError, match="not among the concepts"):
        audit(relevances, labels, "conv", CLASSES, artifacts=["watermark"], **kwargs)
    with pytest.raises(ValueError, match="targets"):
        audit(relevances, labels, "conv", CLASSES, concepts=planted["concepts"])
    with pytest.raises(ValueError, match="targets must be"):
        audit(relevances, labels, "conv", CLASSES, targets=planted["targets"][:5])
    with pytest.raises(ValueError, match="channels"):
        audit(relevances[:, :3], labels, "conv", CLASSES, **kwargs)
    with pytest.raises(ValueError, match="class_concepts"):
        audit(relevances, labels, "conv", CLASSES, targets=planted["targets"])
    with pytest.raises(KeyError, match="no class concepts"):
        audit(relevances, labels, "conv", CLASSES, targets=planted["targets"], class_concepts={"red circle": ()})
    with pytest.raises(KeyError, match="no labels"):
        audit(relevances, {"other": labels}, "conv", CLASSES, **kwargs)
    with pytest.raises(ValueError, match="by"):
        audit(relevances, labels, "conv", CLASSES, by="gradient", **kwargs)
    with pytest.raises(ValueError, match="weight="):
        audit(None, labels, "conv", CLASSES, by="weight", class_concepts={c: () for c in CLASSES})
    with pytest.raises(ValueError, match="k must"):
        audit(relevances, labels, "conv", CLASSES, k=0, **kwargs)
    with pytest.raises(KeyError, match="no class"):
        audit(relevances, labels, "conv", CLASSES, **kwargs)["purple"]


def test_audit_command_equals_the_function(planted, tmp_path):
    import json

    from click.testing import CliRunner

    from crp_invert.cli import main

    path = write_cache(tmp_path / "cache.h5", planted["relevances"])
    planted["labels"].to_json(tmp_path / "conv.json")
    np.save(tmp_path / "targets.npy", planted["targets"])
    (tmp_path / "targets.txt").write_text("\n".join(map(str, planted["targets"])))
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    planted["concepts"].save(tmp_path / "concepts.npz")
    expected = audit(str(path), planted["labels"], "conv", CLASSES, targets=planted["targets"], artifacts=["mark"],
                     concepts=planted["concepts"], k=4)
    for targets in ("targets.npy", "targets.txt"):
        out = tmp_path / f"audit-{targets}.json"
        result = CliRunner().invoke(main, ["audit", str(path), str(tmp_path / "conv.json"), "--targets",
                                           str(tmp_path / targets), "--classes", str(tmp_path / "classes.json"),
                                           "--concepts", str(tmp_path / "concepts.npz"), "--artifact", "mark",
                                           "--top", "4", "--out", str(out)])
        assert result.exit_code == 0, result.output
        written = json.loads(out.read_text())
        assert [Audit.from_dict(item) for item in written] == [expected]
        assert "[artifact]" in result.output
    # class concepts given in the classes file
    (tmp_path / "named.json").write_text(json.dumps({"red circle": ["red"], "blue square": ["blue"], "empty": []}))
    result = CliRunner().invoke(main, ["audit", str(path), str(tmp_path / "conv.json"), "--targets",
                                       str(tmp_path / "targets.npy"), "--classes", str(tmp_path / "named.json"),
                                       "--out", str(tmp_path / "named-audit.json"), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "named-audit.json").read_text())[0]["classes"][0]["concepts"] == ["red"]
    bad = CliRunner().invoke(main, ["audit", str(path), str(tmp_path / "conv.json"), "--targets",
                                    str(tmp_path / "classes.json"), "--classes", str(tmp_path / "classes.json")])
    assert bad.exit_code != 0 and "ints" in bad.output
