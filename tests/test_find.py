"""Concept search: find_channels against sklearn / scipy, against the labeler, streaming against in-memory."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import bh_reference, write_cache
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from crp_invert import ConceptLabeler, ConceptLabels, Formula, LayerLabels
from crp_invert.cli import main
from crp_invert.core.labels import NO_RELIABLE_LABEL
from crp_invert.core.metrics import rank_scores
from crp_invert.find import ChannelSearch, _mask_rank_sums_torch, default_search_batch, find_channels, mask_rank_sums
from crp_invert.storage.cache import ActivationCache

N = 300
NAMES = ["red", "round", "big", "striped", "dog cat"]
LAYERS = {"conv": 7, "fc": 4}


def random_formula(rng: np.random.Generator, names, max_length: int = 4) -> Formula:
    """A random formula of 1..max_length atoms, any nesting of AND / OR, negated atoms and groups."""
    atoms = []
    for name in rng.choice(names, size=int(rng.integers(1, max_length + 1)), replace=True):
        atom = Formula.concept(str(name))
        atoms.append(~atom if rng.random() < 0.4 else atom)
    formula = atoms[0]
    for atom in atoms[1:]:
        formula = formula & atom if rng.random() < 0.5 else formula | atom
        if rng.random() < 0.2:
            formula = ~formula
    return formula


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Concepts, tied activations and relevances (rounded, ReLU zeros) of two layers, in memory and in a cache."""
    rng = np.random.default_rng(0)
    labels = rng.random((N, len(NAMES))) < 0.35
    concepts = ConceptLabels(labels, NAMES)
    acts, rels = {}, {}
    for layer, channels in LAYERS.items():
        signal = labels[:, np.arange(channels) % len(NAMES)].astype(np.float32)
        noise = rng.normal(size=(N, channels)).astype(np.float32)
        acts[layer] = np.maximum(1.5 * signal + noise - 0.5, 0).round(1)  # many ties, many zeros
        rels[layer] = (acts[layer] * rng.random((N, channels)).astype(np.float32)).round(2)
    layers = {name: (acts[name], rels[name]) for name in LAYERS}
    path = write_cache(tmp_path_factory.mktemp("find") / "cache.h5", layers)
    concepts_path = path.parent / "concepts.npz"
    concepts.save(concepts_path)
    return dict(concepts=concepts, labels=labels, acts=acts, rels=rels, path=path, concepts_path=concepts_path)


def test_auc_and_p_values_equal_sklearn_and_scipy_for_random_formulas(data):
    """find_channels' AUCs equal sklearn's and p-values scipy's for random formulas on tied data."""
    rng = np.random.default_rng(1)
    concepts = data["concepts"]
    checked = 0
    for _ in range(25):
        formula = random_formula(rng, NAMES)
        mask = formula.evaluate(concepts).numpy()
        if not 0 < mask.sum() < N:
            continue
        result = find_channels(formula, data["acts"], concepts)
        assert len(result) == sum(LAYERS.values())
        assert result.n_positive == mask.sum() and result.fraction == pytest.approx(mask.mean())
        for match in result:
            values = data["acts"][match.layer][:, match.channel].astype(np.float64)  # scipy keeps float32
            assert match.auc == pytest.approx(roc_auc_score(mask, values), abs=1e-12)
            expected = mannwhitneyu(values[mask], values[~mask], alternative="greater", method="asymptotic").pvalue
            assert match.p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("share", [0.01, 0.3, 0.5, 0.8, 0.995])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_rank_sums_equal_the_rank_matrix_times_the_mask(share, dtype):
    """The sort-and-search rank sums and tie terms are exactly those of rank_scores (ties, zeros, -0.0), in both
    implementations."""
    generator = torch.Generator().manual_seed(int(share * 1000))
    block = torch.randint(-3, 4, (500, 9), generator=generator).to(dtype) * 0.5
    block[:, 0] = torch.rand(500, generator=generator, dtype=torch.float64).to(dtype)  # no ties
    block[:, 1] = 0.0  # one tie group
    block[::3, 2] = -0.0
    mask = torch.rand(500, generator=generator) < share
    mask[0], mask[1] = True, False
    ranked = rank_scores(block)
    for implementation in (mask_rank_sums, _mask_rank_sums_torch):  # numpy on the CPU; torch on other devices
        rank_sum, tie_term = implementation(block, mask)
        assert torch.equal(rank_sum, ranked.ranks.T @ mask.double())
        assert torch.equal(tie_term, ranked.tie_term)


def test_ranking_is_by_auc_and_q_values_are_benjamini_hochberg(data):
    """Matches rank by AUC over every channel, q-values are Benjamini-Hochberg, planted channels come first."""
    result = find_channels("red AND NOT round", data["acts"], data["concepts"])
    aucs = [m.auc for m in result]
    assert aucs == sorted(aucs, reverse=True)
    keys = [(m.layer, m.channel) for m in result]
    assert sorted(keys) == sorted((layer, c) for layer, n in LAYERS.items() for c in range(n))
    p_values = np.array([m.p_value for m in result])
    np.testing.assert_allclose([m.p_value_bh for m in result], bh_reference(p_values), rtol=1e-12)
    # channel c of every layer follows concept c % K: "red" channels rank first
    assert {(m.layer, m.channel) for m in result[:2]} == {("conv", 0), ("fc", 0)}


def test_negative_mode_ranks_lowest_first_with_less_p_values(data):
    """Negative mode ranks the lowest AUC first with scipy's one-sided 'less' p-values."""
    concepts = data["concepts"]
    result = find_channels("red", data["acts"], concepts, layers="conv", mode="negative")
    mask = concepts.mask("red").numpy()
    aucs = [m.auc for m in result]
    assert aucs == sorted(aucs)
    for match in result:
        values = data["acts"]["conv"][:, match.channel].astype(np.float64)
        expected = mannwhitneyu(values[mask], values[~mask], alternative="less", method="asymptotic").pvalue
        assert match.p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_equals_the_labelers_auc_for_the_channels_own_labels(data):
    """find_channels gives each channel's own labels the labeler's AUC, p-value and fraction."""
    concepts = data["concepts"]
    labels = ConceptLabeler(concepts).label_cache(str(data["path"]), L=3, B=2, progress=False)
    for layer, layer_labels in labels.items():
        for channel in range(len(layer_labels)):
            for explanation in layer_labels[channel]:
                found = find_channels(explanation.formula, data["path"], concepts, layers=[layer])
                match = next(m for m in found if m.channel == channel)
                assert match.auc == pytest.approx(explanation.auc, abs=1e-12)
                assert match.p_value == pytest.approx(explanation.p_value, rel=1e-9, abs=1e-300)
                assert found.fraction == pytest.approx(explanation.fraction, abs=1e-12)


@pytest.mark.parametrize("source", ["activation", "relevance"])
def test_streaming_from_the_cache_equals_in_memory(data, source):
    """Streaming from the cache in any batch size equals the in-memory search, and an open cache stays open."""
    concepts = data["concepts"]
    arrays = data["acts"] if source == "activation" else data["rels"]
    memory = find_channels("big OR NOT striped", {k: torch.from_numpy(v) for k, v in arrays.items()}, concepts,
                           source=source)
    for batch in (1, 3, None):
        streamed = find_channels("big OR NOT striped", str(data["path"]), concepts, source=source,
                                 feature_batch_size=batch)
        assert streamed.matches == memory.matches
        assert streamed.layers == list(LAYERS)
    with ActivationCache(data["path"]) as cache:  # an open cache stays open
        assert find_channels("big", cache, concepts, source=source).layers == list(LAYERS)
        assert not cache.closed


def test_labels_json_table_top_and_layers(data, tmp_path):
    """Matches carry each channel's reliable label, and a ChannelSearch round-trips through JSON."""
    concepts = data["concepts"]
    labels = ConceptLabeler(concepts).label_cache(str(data["path"]), L=2, B=2, progress=False)
    result = find_channels('"dog cat" AND red', data["path"], concepts, labels=labels)
    for match in result:
        best = labels[match.layer].best(match.channel)
        if best is None:
            assert match.label == NO_RELIABLE_LABEL and match.label_auc is None
        else:
            assert match.label == str(best.formula) and match.label_auc == best.auc
    assert result.formula == Formula.parse('red AND "dog cat"')
    again = ChannelSearch.from_json(result.to_json(tmp_path / "found.json"))
    assert again == result and ChannelSearch.from_json(tmp_path / "found.json") == result
    assert json.loads(result.to_json())["text"] == str(result.formula)
    assert len(result.top(3)) == 3 and result.top(3).matches == result.matches[:3]
    fc = result.of_layer("fc")
    assert [m.layer for m in fc] == ["fc"] * LAYERS["fc"] and fc.layers == ["fc"]
    table = result.table(max_rows=2)
    assert "dog cat" in table and "... " in table and str(result[0].channel) in table.splitlines()[3]


def test_errors(data):
    """Unknown concepts or layers, formulas true on none or all samples, wrong N and bad sources raise named errors."""
    concepts = data["concepts"]
    with pytest.raises(KeyError, match="unknown"):
        find_channels("red AND purple", data["acts"], concepts)
    with pytest.raises(ValueError, match="holds for 0 of"):
        find_channels("red AND NOT red", data["acts"], concepts)
    with pytest.raises(ValueError, match=f"holds for {N} of"):
        find_channels("red OR NOT red", data["acts"], concepts)
    with pytest.raises(KeyError, match="nolayer"):
        find_channels("red", data["path"], concepts, layers="nolayer")
    with pytest.raises(ValueError, match="N ="):
        find_channels("red", {"x": data["acts"]["conv"][:10]}, concepts)
    with pytest.raises(ValueError, match="source"):
        find_channels("red", data["acts"], concepts, source="gradient")
    with pytest.raises(ValueError, match="mode"):
        find_channels("red", data["acts"], concepts, mode="both")
    with pytest.raises(ValueError, match="feature_batch_size"):
        find_channels("red", data["acts"], concepts, feature_batch_size=0)
    with pytest.raises(TypeError, match="formula"):
        find_channels(3, data["acts"], concepts)
    bad = {"x": np.where(np.arange(N)[:, None] == 5, np.nan, data["acts"]["conv"])}
    with pytest.raises(ValueError, match="NaN"):
        find_channels("red", bad, concepts)
    assert default_search_batch(50_000, 512) == 20 and default_search_batch(10, 5) == 5
    assert default_search_batch(50_000, 512, chunk_columns=16) == 16 and default_search_batch(2_000, 512, 16) == 512


def test_find_command(data, tmp_path):
    """crp-invert find writes the library's top matches and names an unknown concept."""
    out = tmp_path / "found.json"
    result = CliRunner().invoke(main, ["find", str(data["path"]), str(data["concepts_path"]), "red AND NOT round",
                                       "--layer", "conv", "--top", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = find_channels("red AND NOT round", data["path"], data["concepts"], layers=["conv"]).top(3)
    assert ChannelSearch.from_json(out) == expected
    assert "red AND NOT round" in result.output and len(expected) == 3
    bad = CliRunner().invoke(main, ["find", str(data["path"]), str(data["concepts_path"]), "purple"])
    assert bad.exit_code != 0 and "purple" in bad.output


def test_find_command_keeps_an_existing_out_unless_overwrite(data, tmp_path):
    """crp-invert find refuses to replace an existing --out file unless --overwrite."""
    out = tmp_path / "found.json"
    out.write_text("keep me")
    args = ["find", str(data["path"]), str(data["concepts_path"]), "red", "--out", str(out)]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    assert out.read_text() == "keep me"
    replaced = CliRunner().invoke(main, args + ["--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert ChannelSearch.from_json(out).formula == find_channels("red", data["path"], data["concepts"]).formula


def test_label_column_shows_the_reliable_label_or_says_there_is_none(data, tmp_path):
    """Each match shows its channel's best() label with AUC, support and q, or NO_RELIABLE_LABEL (also in JSON)."""
    concepts = data["concepts"]
    labels = ConceptLabeler(concepts).label_cache(str(data["path"]), L=3, B=2, progress=False)
    # a channel of pure noise whose beam holds no reliable formula: its labels are the paper's, unfiltered
    noise = ConceptLabeler(concepts).label(np.random.default_rng(5).random((N, 1)), L=3, B=2, min_support=0,
                                           progress=False)
    assert noise.best(0) is None
    layer_labels = {"conv": labels["conv"], "fc": LayerLabels.concatenate([_subset(labels["fc"], 3), noise])}
    result = find_channels("red", data["path"], concepts, labels=layer_labels)
    seen = set()
    for match in result:
        best = layer_labels[match.layer].best(match.channel)
        if best is None:
            assert (match.label, match.label_auc, match.label_support, match.label_q) == (NO_RELIABLE_LABEL, None,
                                                                                       None, None)
            assert match.label_text() == NO_RELIABLE_LABEL
        else:
            assert (match.label, match.label_auc, match.label_support, match.label_q) == (
                str(best.formula), best.auc, best.support, best.p_value_bh)
            assert f"n {best.support}" in match.label_text()
        seen.add(best is None)
    assert seen == {True, False}
    table = result.table()
    assert NO_RELIABLE_LABEL in table and "channel's label (AUC, n = support, q)" in table
    assert ChannelSearch.from_json(result.to_json(tmp_path / "found.json")) == result
    old = json.loads(result.to_json())
    for row in old["matches"]:
        del row["label_support"], row["label_q"]
    assert len(ChannelSearch.from_dict(old)) == len(result)  # results of an older version still load


def _subset(labels, stop):
    """The first ``stop`` channels of a LayerLabels."""
    return LayerLabels([labels[f] for f in range(stop)], labels.concept_names, labels.layer, labels.parameters)


def test_find_command_reads_the_labels_next_to_the_cache(data, tmp_path):
    """Without --channel-labels, find shows the labels in labels/index.json beside the cache; the flag turns
    them off."""
    import shutil

    folder = tmp_path / "run"
    folder.mkdir()
    cache = folder / "activations.h5"
    shutil.copy(data["path"], cache)
    labeled = CliRunner().invoke(main, ["label", str(cache), str(data["concepts_path"]), "-L", "2", "-B", "2",
                                        "--out", str(folder / "labels"), "-q"])
    assert labeled.exit_code == 0, labeled.output
    args = ["find", str(cache), str(data["concepts_path"]), "red", "--out", str(tmp_path / "found.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "labels/index.json" in result.output
    labels = ConceptLabeler(data["concepts"]).label_cache(str(cache), L=2, B=2, progress=False)
    assert ChannelSearch.from_json(tmp_path / "found.json") == find_channels("red", cache, data["concepts"],
                                                                              labels=labels).top(20)
    bare = CliRunner().invoke(main, args + ["--overwrite", "--no-channel-labels"])
    assert bare.exit_code == 0, bare.output
    assert all(match.label is None for match in ChannelSearch.from_json(tmp_path / "found.json"))


def test_unknown_concept_names_the_closest(data):
    """A typo in find's formula names the closest known concept."""
    with pytest.raises(KeyError, match="'rde' \\(closest: 'red'\\)"):
        find_channels("rde AND round", data["acts"], data["concepts"])


def test_table_without_labels_has_no_label_column(data):
    """A search without labels prints no (empty) label column and no trailing blanks."""
    result = find_channels("red", data["path"], data["concepts"], labels=None)
    lines = result.table().splitlines()
    assert "channel's label" not in lines[1] and lines[1].split() == ["rank", "layer", "channel", "AUC", "p", "q",
                                                                     "(BH)"]
    assert all(line == line.rstrip() for line in lines)
