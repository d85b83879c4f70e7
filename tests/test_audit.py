"""The Clever-Hans audit on planted data: shares, artifact detection and flags against a slow numpy / sklearn / scipy
reference, weights, JSON, verdicts, unknown artifact names, NaN relevances, the command.

The audit of the demo model (its planted artifact channel) is tested in tests/test_demo_audit.py.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import bh_reference, write_cache
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from crp_invert import ConceptLabels, Explanation, Formula, LayerLabels
from crp_invert.audit import (
    MIN_ARTIFACT_AUC,
    NO_RELIABLE_LABEL,
    Audit,
    audit,
    class_concepts_from_data,
    positive_literals,
)
from crp_invert.cli import main
from crp_invert.integration.circuits import circuit_by_weight

CLASSES = ["red circle", "blue square", "empty"]
NAMES = ["red", "blue", "circle", "square", "striped", "mark"]
# channel -> its label (None: no label); channel 1 detects the mark but its label does not say so, channel 3's
# label asserts the mark but the channel does not detect it
LABELS = ["red AND circle", "striped", "circle", "mark AND red", "blue", None, "square AND NOT mark", "circle"]
N = 300
N_MARKED = 60  # the last rows: the artifact concept set (the mark on random images)


def layer_labels(texts, names=NAMES, layer="conv"):
    beams = [[] if text is None else [Explanation(formula=Formula.parse(text, names), auc=0.9, fraction=0.2,
                                                  length=1, p_value=1e-6, n_candidates=3, p_value_bonferroni=3e-6,
                                                  p_value_bh=1e-5, support=60, n_samples=N)] for text in texts]
    return LayerLabels(beams, names, layer)


@pytest.fixture(scope="module")
def planted():
    """Classes 0 and 1 (class 2 has no sample); activations with a mark detector (channel 1) and a weak one
    (channel 6); relevances where class 0 leans on the detector."""
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=N)
    mark = np.arange(N) >= N - N_MARKED
    labels = np.zeros((N, len(NAMES)), dtype=bool)
    labels[:, 0] = labels[:, 2] = targets == 0
    labels[:, 1] = labels[:, 3] = targets == 1
    labels[:, 4] = rng.random(N) < 0.3
    labels[:, 5] = mark
    activations = rng.random((N, len(LABELS)))
    activations[:, 1] += 3.0 * mark  # a clear detector of the mark
    activations[:, 6] += 0.3 * mark  # a weak one (AUC below MIN_ARTIFACT_AUC)
    activations[:, 4] += 3.0 * (targets == 1)
    relevances = rng.random((N, len(LABELS))) * 0.2
    relevances[targets == 0, 1] += 3.0  # the mark channel carries most of class 0's relevance
    relevances[targets == 0, 0] += 1.0
    relevances[targets == 1, 2] += 2.0  # a channel with an unrelated label for class 1
    relevances[targets == 1, 4] += 1.5
    relevances[targets == 1, 6] += 1.0
    relevances[:, 7] -= 0.5  # negative relevance
    return dict(targets=targets, concepts=ConceptLabels(labels, NAMES), relevances=relevances,
                activations=activations, labels=layer_labels(LABELS), base=np.arange(N - N_MARKED))


def slow_audit(planted, rows, min_share=0.1, min_auc=MIN_ARTIFACT_AUC, alpha=0.05):
    """The audit by hand: shares in numpy, AUC by sklearn, p by scipy, q by scipy's BH, flags by the rule."""
    acts, mark = planted["activations"], planted["concepts"].mask("mark").numpy()
    aucs = np.array([roc_auc_score(mark, acts[:, c]) for c in range(acts.shape[1])])
    p = np.array([mannwhitneyu(acts[mark, c], acts[~mark, c], alternative="greater", method="asymptotic").pvalue
                  for c in range(acts.shape[1])])
    q = bh_reference(p)
    class_concepts = class_concepts_from_data(planted["concepts"], planted["targets"], CLASSES)
    expected = {}
    for index, name in enumerate(CLASSES):
        chosen = rows[planted["targets"][rows] == index]
        if chosen.size == 0:
            continue
        mean = planted["relevances"][chosen].mean(0)
        share = mean / np.abs(mean).sum()
        flags = []
        for channel, text in enumerate(LABELS):
            asserted = set() if text is None else positive_literals(Formula.parse(text))
            if aucs[channel] >= min_auc and q[channel] < alpha:
                flags.append("artifact")
            elif text is None:
                flags.append("unlabeled")
            else:
                flags.append(None if asserted & set(class_concepts[name]) else "unrelated")
        expected[name] = dict(share=share, flags=flags, n=chosen.size)
    return expected, aucs, q


def test_positive_literals():
    """Positive literals: atoms under an even number of NOTs."""
    parse = Formula.parse
    assert positive_literals(parse("a AND NOT b")) == {"a"}
    assert positive_literals(parse("NOT (a OR NOT b)")) == {"b"}
    assert positive_literals(parse("NOT NOT a")) == {"a"}
    assert positive_literals(parse("(a AND b) OR (c AND NOT d)")) == {"a", "b", "c"}
    with pytest.raises(TypeError):
        positive_literals("a")


def test_shares_detection_and_flags_equal_a_slow_reference(planted):
    """Shares, artifact AUC and q, flags and order equal the numpy / sklearn / scipy computation."""
    result = audit(planted["relevances"], planted["labels"], "conv", CLASSES, targets=planted["targets"],
                   artifacts=["mark"], concepts=planted["concepts"], activations=planted["activations"],
                   k=len(LABELS), samples=planted["base"])
    expected, aucs, q = slow_audit(planted, planted["base"])
    assert result.detection == "activations"
    for item in result.classes[:2]:
        reference = expected[item.name]
        assert item.n_samples == reference["n"]
        assert [c.channel for c in item.channels] == list(np.argsort(-reference["share"], kind="stable"))
        np.testing.assert_allclose([c.share for c in item.channels], np.sort(reference["share"])[::-1], rtol=1e-12)
        for channel in item.channels:
            assert channel.flag == reference["flags"][channel.channel], (item.name, channel)
            assert channel.artifact == "mark"
            np.testing.assert_allclose(channel.artifact_auc, aucs[channel.channel], rtol=1e-12)
            np.testing.assert_allclose(channel.artifact_q, q[channel.channel], rtol=1e-6)
            text = LABELS[channel.channel]
            assert channel.label == (None if text is None else str(Formula.parse(text)))
            assert channel.shown_label == (NO_RELIABLE_LABEL if text is None else channel.label)
            assert channel.label_q == (None if text is None else 1e-5)
    red = result["red circle"]
    # the detector leads class 0 though its label never mentions the mark; "mark AND red" is no suspect
    assert red.channels[0].channel == 1 and red.channels[0].flag == "artifact" and red.suspect.channel == 1
    assert next(c for c in red.channels if c.channel == 3).flag is None
    assert aucs[6] < MIN_ARTIFACT_AUC and next(c for c in red.channels if c.channel == 6).flag != "artifact"
    assert result["empty"].channels == [] and result["empty"].n_samples == 0
    assert {name: [c.channel for c in channels] for name, channels in result.flagged().items()} == {
        "red circle": [1], "blue square": [2]}
    assert result.flagged(min_share=0.0)["red circle"] == red.flagged(0.0)


def test_suspect_is_the_largest_share_among_all_channels(planted):
    """ClassAudit.suspect: the artifact channel with the largest share over every channel, not only the k listed."""
    result = audit(planted["relevances"], planted["labels"], "conv", CLASSES, targets=planted["targets"],
                   artifacts=["mark"], concepts=planted["concepts"], activations=planted["activations"], k=1,
                   samples=planted["base"])
    expected, _, _ = slow_audit(planted, planted["base"])
    for name in CLASSES[:2]:
        reference = expected[name]
        suspects = [c for c, flag in enumerate(reference["flags"]) if flag == "artifact"]
        best = max(suspects, key=lambda c: reference["share"][c])
        assert result[name].suspect.channel == best
        np.testing.assert_allclose(result[name].suspect_share, reference["share"][best], rtol=1e-12)
    assert result["blue square"].channels[0].channel != result["blue square"].suspect.channel
    assert result["empty"].suspect is None and result["empty"].suspect_share == 0.0
    assert result.suspects(0.0) == {name: result[name].suspect for name in CLASSES[:2]}
    assert list(result.suspects()) == [name for name in CLASSES[:2] if result[name].suspect_share >= 0.1]


def test_without_concepts_the_labels_decide(planted):
    """Without concepts the detection is not measured: a reliable label asserting the artifact flags the channel."""
    class_concepts = class_concepts_from_data(planted["concepts"], planted["targets"], CLASSES)
    result = audit(planted["relevances"], planted["labels"], "conv", CLASSES, targets=planted["targets"],
                   artifacts=["mark"], class_concepts=class_concepts, k=len(LABELS))
    assert result.detection == "labels"
    red = result["red circle"]
    assert next(c for c in red.channels if c.channel == 3).flag == "artifact"
    assert next(c for c in red.channels if c.channel == 1).flag == "unrelated"
    assert all(c.artifact_auc is None for c in red.channels)
    assert "detection not measured" in result.table()


def test_cache_samples_and_top_k(planted, tmp_path):
    """A cache gives the audit of its arrays; samples= restricts the averaged rows."""
    path = write_cache(tmp_path / "cache.h5", {"conv": (planted["activations"], planted["relevances"])})
    relevances = planted["relevances"].astype(np.float32)
    activations = planted["activations"].astype(np.float32)
    kwargs = dict(targets=planted["targets"], artifacts=["mark"], concepts=planted["concepts"], k=3)
    from_file = audit(str(path), {"conv": planted["labels"]}, "conv", CLASSES, **kwargs)
    in_memory = audit(relevances, planted["labels"], "conv", CLASSES, activations=activations, **kwargs)
    assert from_file == in_memory and all(len(c.channels) == 3 for c in from_file.classes[:2])
    half = np.arange(N) < N // 2
    part = audit(relevances, planted["labels"], "conv", CLASSES, activations=activations, samples=half, **kwargs)
    assert part["red circle"].n_samples == ((planted["targets"] == 0) & half).sum()
    same = audit(relevances, planted["labels"], "conv", CLASSES, activations=activations,
                 samples=np.flatnonzero(half), **kwargs)
    assert same == part


def test_weights_rank_like_circuit_by_weight():
    """by="weight": the channels and shares of circuit_by_weight."""
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


def test_json_round_trip_table_and_verdicts(planted, tmp_path):
    """JSON keeps everything; the table shows AUC, q, support and ends with one verdict per class."""
    result = audit(planted["relevances"], planted["labels"], "conv", CLASSES, targets=planted["targets"],
                   artifacts=["mark"], concepts=planted["concepts"], activations=planted["activations"],
                   samples=planted["base"])
    again = Audit.from_json(result.to_json(tmp_path / "audit.json"))
    assert again == result and Audit.from_json(tmp_path / "audit.json") == result
    data = json.loads((tmp_path / "audit.json").read_text())
    assert data["flagged"] == {"red circle": [1], "blue square": [2]}
    row = data["classes"][0]["channels"][0]
    assert {"artifact_auc", "artifact_q", "label_support", "label_q"} <= set(row)
    verdicts = result.verdicts()
    assert len(verdicts) == len(CLASSES) and data["verdicts"] == verdicts
    assert verdicts[0].startswith("red circle: artifact suspect conv:1 carries")
    assert verdicts[1].startswith("blue square: no artifact suspect") and "conv:2 [unrelated]" in verdicts[1]
    assert verdicts[2].startswith("empty: not audited")
    table = result.table()
    assert table.splitlines()[-len(CLASSES):] == [f"  {line}" for line in verdicts]
    assert "[artifact]" in table and "art. AUC" in table and NO_RELIABLE_LABEL not in table.split("blue square")[0]
    # an audit written before support, q and the detection were stored still loads
    for item in data["classes"]:
        item.pop("suspect")
        for channel in item["channels"]:
            for key in ("artifact", "artifact_auc", "artifact_q", "label_support", "label_q"):
                channel.pop(key)
    old = Audit.from_dict({key: value for key, value in data.items() if key not in ("detection", "alpha")})
    assert [c.channel for c in old["red circle"].channels] == [c.channel for c in result["red circle"].channels]


def test_unknown_artifact_names_the_close_ones(planted):
    """An artifact name no concept (or without concepts: no label) knows is a KeyError naming close names."""
    kwargs = dict(targets=planted["targets"], activations=planted["activations"])
    with pytest.raises(KeyError, match=r"'marks' is not among the concepts.*close names: \['mark'\]"):
        audit(planted["relevances"], planted["labels"], "conv", CLASSES, artifacts=["marks"],
              concepts=planted["concepts"], **kwargs)
    class_concepts = {name: () for name in CLASSES}
    with pytest.raises(KeyError, match=r"'mrak' is not known to the labels.*close names: \['mark'\]"):
        audit(planted["relevances"], planted["labels"], "conv", CLASSES, artifacts=["mrak"],
              class_concepts=class_concepts, **kwargs)
    with pytest.raises(KeyError, match=r"'glare' .*known: \['red'"):
        audit(planted["relevances"], planted["labels"], "conv", CLASSES, artifacts=["glare"],
              class_concepts=class_concepts, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_relevances_are_refused_with_layer_sample_and_channel(planted, bad):
    """NaN / inf relevances are refused (layer, sample, channel, count), never averaged away."""
    relevances = planted["relevances"].copy()
    relevances[17, 4] = bad
    relevances[40, 2] = bad
    kwargs = dict(targets=planted["targets"], concepts=planted["concepts"], activations=planted["activations"])
    with pytest.raises(ValueError, match=r"layer 'conv' hold 2 NaN or infinite value\(s\), the first at sample 17, "
                                         r"channel 4"):
        audit(relevances, planted["labels"], "conv", CLASSES, **kwargs)
    # rows left out with samples= are not averaged, so they do not matter
    keep = np.setdiff1d(planted["base"], [17, 40])
    assert audit(relevances, planted["labels"], "conv", CLASSES, samples=keep, **kwargs)["red circle"].n_samples > 0
    weight = np.ones((len(CLASSES), len(LABELS)))
    weight[1, 5] = bad
    with pytest.raises(ValueError, match="weights of layer 'conv' hold 1 NaN or infinite value.*class 1, channel 5"):
        audit(None, planted["labels"], "conv", CLASSES, by="weight", weight=weight,
              class_concepts={name: () for name in CLASSES})


def test_errors(planted):
    """Bad arguments raise errors that name them."""
    kwargs = dict(targets=planted["targets"], concepts=planted["concepts"])
    relevances, labels = planted["relevances"], planted["labels"]
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
    with pytest.raises(ValueError, match="min_artifact_auc"):
        audit(relevances, labels, "conv", CLASSES, min_artifact_auc=0.2, **kwargs)
    with pytest.raises(KeyError, match="no class"):
        audit(relevances, labels, "conv", CLASSES, **kwargs)["purple"]


@pytest.fixture()
def files(planted, tmp_path):
    """The audit command's inputs for the planted data."""
    path = write_cache(tmp_path / "cache.h5", {"conv": (planted["activations"], planted["relevances"])})
    planted["labels"].to_json(tmp_path / "conv.json")
    np.save(tmp_path / "targets.npy", planted["targets"])
    (tmp_path / "targets.txt").write_text("\n".join(map(str, planted["targets"])))
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    (tmp_path / "named.json").write_text(json.dumps({"red circle": ["red"], "blue square": ["blue"], "empty": []}))
    planted["concepts"].save(tmp_path / "concepts.npz")
    return tmp_path, path


def run_audit(folder, cache, *args):
    return CliRunner().invoke(main, ["audit", str(cache), str(folder / "conv.json"), *args])


def test_audit_command_equals_the_function(planted, files):
    """The command writes the function's audit and prints its table with the verdicts."""
    folder, cache = files
    expected = audit(str(cache), planted["labels"], "conv", CLASSES, targets=planted["targets"], artifacts=["mark"],
                     concepts=planted["concepts"], k=4)
    for targets in ("targets.npy", "targets.txt"):
        out = folder / f"audit-{targets}.json"
        result = run_audit(folder, cache, "--targets", str(folder / targets), "--classes", str(folder / "classes.json"),
                           "--concepts", str(folder / "concepts.npz"), "--artifact", "mark", "--top", "4",
                           "--out", str(out))
        assert result.exit_code == 0, result.output
        assert [Audit.from_dict(item) for item in json.loads(out.read_text())] == [expected]
        assert "[artifact]" in result.output and expected.verdicts()[0] in result.output
    result = run_audit(folder, cache, "--targets", str(folder / "targets.npy"), "--classes",
                       str(folder / "named.json"), "--out", str(folder / "named-audit.json"), "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "named-audit.json").read_text())[0]["classes"][0]["concepts"] == ["red"]
    bad = run_audit(folder, cache, "--targets", str(folder / "classes.json"), "--classes", str(folder / "classes.json"))
    assert bad.exit_code != 0 and "ints" in bad.output


@pytest.mark.parametrize("with_concepts", [True, False])
def test_audit_command_refuses_an_unknown_artifact(files, with_concepts):
    """`audit --artifact artefact` exits 1 with one line naming the close name, with and without --concepts."""
    folder, cache = files
    concepts = ["--concepts", str(folder / "concepts.npz")] if with_concepts else []
    classes = folder / ("classes.json" if with_concepts else "named.json")
    result = run_audit(folder, cache, "--targets", str(folder / "targets.npy"), "--classes", str(classes),
                       "--artifact", "marc", "--out", str(folder / "a.json"), *concepts)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'marc'" in lines[0] and "close names: ['mark']" in lines[0]
    assert not (folder / "a.json").exists()


def test_audit_command_refuses_nan_relevances(planted, files):
    """The command exits 1 naming layer, sample and channel of a NaN relevance."""
    folder, _ = files
    relevances = planted["relevances"].copy()
    relevances[5, 3] = np.nan
    cache = write_cache(folder / "nan.h5", {"conv": (planted["activations"], relevances)})
    result = run_audit(folder, cache, "--targets", str(folder / "targets.npy"), "--classes",
                       str(folder / "classes.json"), "--concepts", str(folder / "concepts.npz"), "--artifact", "mark",
                       "--out", str(folder / "nan.json"))
    assert result.exit_code == 1 and "sample 5, channel 3" in result.output, result.output
