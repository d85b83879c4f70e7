"""The vectorized beam search against the slow per-candidate algorithm and exhaustive enumeration,
and the ConceptLabeler / LayerLabels API: statistics, files, bad input."""
import csv
import json

import h5py
import numpy as np
import pytest
import torch
from helpers import bh_reference, random_case, write_cache
from scipy.stats import mannwhitneyu
from slow_invert import all_formulas, slow_auc, slow_beam_search, slow_is_reliable, slow_support_floor

from crp_invert import ConceptLabeler, ConceptLabels, Formula, LayerLabels, SearchParams
from crp_invert.core.labels import NO_RELIABLE_LABEL, Explanation, LabelsByLayer, ReliabilityRule

SETTINGS = [
    dict(L=3, B=3),
    dict(L=3, B=3, min_support=0),
    dict(L=3, B=4, min_support=17, max_fraction=0.8),
    dict(L=2, B=2, mode="negative"),
    dict(L=3, B=4, limit_search=3, min_fraction=0.1, max_fraction=0.7),
    dict(L=1, B=5),
    dict(L=4, B=2, max_fraction=1.0),
]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kwargs", SETTINGS)
def test_equals_slow_per_candidate_search(seed, kwargs):
    """The vectorized search equals the slow per-candidate search (support floor included) bit for bit."""
    labels, scores, names = random_case(seed)
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, progress=False, **kwargs)
    for f in range(scores.shape[1]):
        slow = slow_beam_search(scores[:, f], labels, names, **kwargs)
        fast = result[f]
        # same formulas in the same order, and the same AUCs to the last bit
        assert [e.formula for e in fast] == [s[0] for s in slow]
        assert [e.auc for e in fast] == [s[1] for s in slow]
        assert [e.fraction for e in fast] == pytest.approx([s[2] for s in slow], abs=1e-15)
        for e in fast:
            assert e.length == e.formula.length


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("min_support", [0, 10, 14])
def test_wide_beam_finds_the_exhaustive_optimum(seed, mode, min_support):
    """A beam wide enough for every formula finds the best of the exhaustive search space (support floor included)."""
    labels, scores, names = random_case(seed, k=4)
    L = 3
    space = all_formulas(labels, names, L, min_support=min_support)
    B = max(1, len(space))  # wide enough to hold every formula: the search becomes exhaustive
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=L, B=B, mode=mode, progress=False,
                                                                min_support=min_support)
    if not space:
        assert all(beam == [] for beam in result)
        return
    assert {e.formula for e in result[0]} == set(space)  # exactly the formulas the floor allows
    for f in range(scores.shape[1]):
        aucs = {formula: slow_auc(scores[:, f], mask) for formula, mask in space.items()}
        best = max(aucs.values()) if mode == "positive" else min(aucs.values())
        assert result[f][0].auc == pytest.approx(best, abs=1e-12)
        # the beam holds distinct formulas, each scored correctly
        formulas = [e.formula for e in result[f]]
        assert len(set(formulas)) == len(formulas)
        for e in result[f][:20]:
            assert e.auc == pytest.approx(aucs[e.formula], abs=1e-12)


def test_beam_explanations_are_consistent_with_their_formula():
    """Each explanation's fraction, AUC and p-values agree with its formula evaluated directly (slow AUC, scipy)."""
    labels, scores, names = random_case(11, n=200, k=5, f=6)
    concepts = ConceptLabels(labels, names)
    result = ConceptLabeler(concepts).label(scores, L=3, B=3, progress=False)
    for f, beam in enumerate(result):
        assert 1 <= len(beam) <= 3
        aucs = [e.auc for e in beam]
        assert aucs == sorted(aucs, reverse=True)
        for e in beam:
            mask = e.formula.evaluate(concepts).numpy()
            assert e.fraction == pytest.approx(mask.mean())
            assert 0 < e.fraction <= 0.5
            assert e.auc == pytest.approx(slow_auc(scores[:, f], mask), abs=1e-12)
            reference = mannwhitneyu(scores[mask, f], scores[~mask, f], alternative="greater",
                                     method="asymptotic").pvalue
            assert e.p_value == pytest.approx(reference, rel=1e-9)
            assert e.p_value_bonferroni == pytest.approx(min(1.0, e.p_value * e.n_candidates))
            assert e.n_candidates > 0


def test_benjamini_hochberg_over_features():
    """The BH q-values over features equal the Benjamini-Hochberg reference applied to the Bonferroni p-values."""
    labels, scores, names = random_case(5, n=150, f=8)
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=2, B=2, progress=False)
    bonferroni = np.array([result[f][0].p_value_bonferroni for f in range(8)])
    expected = bh_reference(bonferroni)
    np.testing.assert_allclose([result[f][0].p_value_bh for f in range(8)], expected, rtol=1e-12)


def test_planted_conjunction_is_found():
    """A feature driven by red AND circle AND NOT big gets that formula with AUC 1."""
    rng = np.random.default_rng(0)
    labels = rng.random((2000, 6)) < 0.4
    names = ["red", "green", "circle", "square", "big", "small"]
    truth = labels[:, 0] & labels[:, 2] & ~labels[:, 4]
    scores = (truth + 0.1 * rng.random(2000))[:, None]
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=3, B=3, progress=False)
    best = result[0][0]
    assert best.formula == Formula.parse("red AND circle AND NOT big")
    assert best.auc == 1.0


def test_feature_batches_inputs_and_devices_agree(tmp_path):
    """Feature batches, numpy, torch and h5py inputs give the same labels."""
    labels, scores, names = random_case(2, n=120, f=7)
    labeler = ConceptLabeler(ConceptLabels(labels, names), device="cpu")
    reference = labeler.label(scores, L=3, B=3, progress=False)
    assert labeler.label(scores, L=3, B=3, feature_batch_size=2, progress=False) == reference
    assert labeler.label(torch.from_numpy(scores).float().double(), L=3, B=3, progress=False) == reference
    with h5py.File(tmp_path / "acts.h5", "w") as handle:
        handle.create_dataset("Y", data=scores)
    with h5py.File(tmp_path / "acts.h5", "r") as handle:
        assert labeler.label(handle["Y"], L=3, B=3, feature_batch_size=3, progress=False) == reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_equals_cpu():
    """Labels on a CUDA device equal those on the CPU."""
    labels, scores, names = random_case(4, n=500, f=16)
    concepts = ConceptLabels(labels, names)
    cpu = ConceptLabeler(concepts, device="cpu").label(scores, L=3, B=3, progress=False)
    gpu = ConceptLabeler(concepts, device="cuda").label(scores, L=3, B=3, progress=False)
    # formulas and AUCs bit for bit; p-values to 1e-12 (CUDA's erfc may differ from the CPU's in the last bits)
    assert [[(e.formula, e.auc, e.fraction) for e in b] for b in cpu] == [[(e.formula, e.auc, e.fraction)
                                                                           for e in b] for b in gpu]
    assert [e.p_value for b in gpu for e in b] == pytest.approx([e.p_value for b in cpu for e in b], rel=1e-12)


def test_memorize_states():
    """memorize_states keeps every step's beam (the last is the result, best AUCs rise) and leaves the labels alone."""
    labels, scores, names = random_case(3, f=3)
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=3, B=2, memorize_states=True,
                                                               progress=False)
    assert len(result.states) == 3
    for f in range(3):
        assert [e.formula for e in result.states[2][f]] == [e.formula for e in result[f]]
        assert all(e.length == 1 for e in result.states[0][f])
        # the best AUC never decreases with the length
        bests = [result.states[step][f][0].auc for step in range(3)]
        assert bests == sorted(bests)
    plain = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=3, B=2, progress=False)
    assert plain.states is None and plain == result


def test_validation_split_reports_held_out_statistics():
    """A validation split (fraction or mask) reports the statistics of the held-out rows."""
    rng = np.random.default_rng(1)
    labels = rng.random((1000, 4)) < 0.3
    scores = np.stack([labels[:, 0] + 0.5 * rng.random(1000), rng.random(1000)], 1)
    concepts = ConceptLabels(labels, list("abcd"))
    result = ConceptLabeler(concepts).label(scores, L=2, B=2, validation=0.5, progress=False)
    assert result.parameters["validation"] == 500
    good, noise = result[0][0], result[1][0]
    assert good.formula == Formula.concept("a") and good.validation_auc == 1.0
    assert noise.validation_auc is not None and abs(noise.validation_auc - 0.5) < 0.1
    # an explicit mask: statistics equal a direct computation on the held-out rows
    held = np.zeros(1000, dtype=bool)
    held[::3] = True
    result = ConceptLabeler(concepts).label(scores, L=2, B=2, validation=held, progress=False)
    for f in range(2):
        for e in result[f]:
            mask = e.formula.evaluate(concepts).numpy()
            assert e.validation_auc == pytest.approx(slow_auc(scores[held, f], mask[held]), abs=1e-12)
            assert e.validation_fraction == pytest.approx(mask[held].mean())
            assert e.auc == pytest.approx(slow_auc(scores[~held, f], mask[~held]), abs=1e-12)


def test_json_and_csv(tmp_path):
    """Labels round-trip through JSON (states, odd names), the CSVs hold each best label, bad JSON is named."""
    labels, scores, names = random_case(7, f=5)
    names[1] = 'odd "name", (with) AND'
    result = ConceptLabeler(ConceptLabels(labels, names)).label(
        scores, L=3, B=3, validation=0.3, memorize_states=True, layer="features.40", progress=False)
    result.to_json(tmp_path / "labels.json")
    loaded = LayerLabels.from_json(tmp_path / "labels.json")
    assert loaded == result
    assert loaded.layer == "features.40" and loaded.parameters == result.parameters
    assert [[e.formula for e in beam] for beam in loaded.states[1]] == \
        [[e.formula for e in beam] for beam in result.states[1]]
    for f in range(5):
        assert [e.auc for e in loaded[f]] == [e.auc for e in result[f]]

    result.to_csv(tmp_path / "full.csv")
    rows = list(csv.DictReader(open(tmp_path / "full.csv")))
    assert len(rows) == 5
    for row, feature in zip(rows, range(5)):
        best = result.best(feature)
        if best is None:
            assert row["formula"] == NO_RELIABLE_LABEL and row["auc"] == ""
            continue
        assert Formula.parse(row["formula"]) == best.formula
        assert float(row["auc"]) == best.auc
        assert float(row["p_value_bh"]) == best.p_value_bh

    result.to_csv(tmp_path / "bench.csv", style="benchmark-any")
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert list(rows[0]) == ["neuron", "concept", "concept_id", "metric"]
    renamed = Formula.parse(rows[0]["concept_id"])
    assert renamed.concepts == {str(names.index(n)) for n in result[0][0].formula.concepts}
    shown = NO_RELIABLE_LABEL if result.best(0) is None else str(result.best(0).formula)[:20]
    assert "feature" in result.table() and shown in result.table()

    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="LayerLabels"):
        LayerLabels.from_json(tmp_path / "bad.json")


def test_indexing():
    """LayerLabels index like a list of beams, reject bad keys, and concatenate."""
    labels, scores, names = random_case(1, f=3)
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=2, B=2, progress=False)
    assert len(result) == result.n_features == 3
    assert result[-1] == result[2]
    assert result.best_any(0) == result[0][0]
    with pytest.raises(IndexError):
        result[3]
    with pytest.raises(TypeError):
        result["0"]
    joined = LayerLabels.concatenate([result, result])
    assert joined.n_features == 6 and joined[4] == result[1]


def test_no_valid_formula_gives_an_empty_beam():
    # a holds everywhere, b on 9 of 10 samples: no primitive has a fraction in [0.3, 0.5]
    """A feature without any formula in the fraction range gets an empty beam and no best label."""
    labels = np.ones((10, 2), dtype=bool)
    labels[0, 1] = False
    result = ConceptLabeler(ConceptLabels(labels, ["a", "b"])).label(
        np.random.rand(10, 2), L=2, B=2, min_fraction=0.3, max_fraction=0.5, progress=False)
    assert result[0] == [] and result.best(0) is None
    assert "no formula" in result.table()


class TestBadInput:
    @pytest.fixture
    def labeler(self):
        labels, _, names = random_case(0, n=30, k=3)
        return ConceptLabeler(ConceptLabels(labels, names))

    def test_sample_count_mismatch(self, labeler):
        """Scores with another number of samples than the concepts raise a ValueError naming both."""
        with pytest.raises(ValueError, match="N = 29.*N = 30"):
            labeler.label(np.random.rand(29, 2), progress=False)

    @pytest.mark.parametrize("bad, kind", [(np.nan, "NaN"), (np.inf, "inf")])
    def test_non_finite_names_the_feature(self, labeler, bad, kind):
        """NaN or infinite scores raise a ValueError naming the feature."""
        scores = np.random.rand(30, 9)
        scores[4, 7] = bad
        with pytest.raises(ValueError, match=f"feature 7 contain {kind}"):
            labeler.label(scores, feature_batch_size=4, progress=False)


    def test_finite_scores_whose_sum_overflows_are_accepted(self, labeler):
        """float32 columns whose sum overflows to inf (values near the float32 maximum) are still labeled, and a
        NaN beside them is still found."""
        scores = np.random.rand(30, 3).astype(np.float32)
        scores[:, 1] = np.float32(3e38) * np.linspace(0.5, 1.0, 30, dtype=np.float32)
        result = labeler.label(scores, progress=False)
        reference = labeler.label(scores.astype(np.float64), progress=False)
        assert [str(result.best_any(f).formula) for f in range(3)] == [str(reference.best_any(f).formula) for f in range(3)]
        scores[3, 2] = np.nan
        with pytest.raises(ValueError, match="feature 2 contain NaN"):
            labeler.label(scores, progress=False)
    @pytest.mark.parametrize("kwargs, error, pattern", [
        (dict(L=0), ValueError, "L must be at least 1"),
        (dict(B=0), ValueError, "B must be at least 1"),
        (dict(L=2.5), TypeError, "L must be an int"),
        (dict(min_fraction=-0.1), ValueError, r"min_fraction must be in \[0, 1\]"),
        (dict(max_fraction=1.5), ValueError, r"max_fraction must be in \[0, 1\]"),
        (dict(min_fraction=0.6, max_fraction=0.4), ValueError, "must not exceed"),
        (dict(mode="up"), ValueError, "mode must be one of"),
        (dict(limit_search=0), ValueError, "limit_search"),
        (dict(feature_batch_size=0), ValueError, "feature_batch_size"),
        (dict(validation=1.5), ValueError, "validation"),
        (dict(validation=np.ones(30, dtype=bool)), ValueError, "some but not all"),
    ])
    def test_parameters(self, labeler, kwargs, error, pattern):
        """Out-of-range search parameters raise the expected error naming the parameter."""
        with pytest.raises(error, match=pattern):
            labeler.label(np.random.rand(30, 2), progress=False, **kwargs)

    def test_shapes_and_types(self, labeler):
        """Scores not of shape [N, F] or not real numbers, and concepts not ConceptLabels, raise named errors."""
        with pytest.raises(ValueError, match=r"\[N, F\]"):
            labeler.label(np.random.rand(30), progress=False)
        with pytest.raises(TypeError):
            labeler.label([[1.0]] * 30, progress=False)
        with pytest.raises(TypeError, match="real numbers"):
            labeler.label(np.zeros((30, 2), dtype=bool), progress=False)
        with pytest.raises(TypeError, match="ConceptLabels"):
            ConceptLabeler(np.zeros((3, 3)))


def test_unpacked_products_agree(monkeypatch):
    # above 160k samples rank sums and counts come from two products instead of one packed one
    """The unpacked rank-sum and count products give the labels of the packed one."""
    import crp_invert.core.search as search

    labels, scores, names = random_case(9, n=150, f=5)
    labeler = ConceptLabeler(ConceptLabels(labels, names))
    packed = labeler.label(scores, L=3, B=3, progress=False)
    monkeypatch.setattr(search, "_MAX_PACKED_SAMPLES", 10)
    assert labeler.label(scores, L=3, B=3, progress=False) == packed


def test_default_feature_batch_size_follows_memory():
    """The default feature batch is the largest that fits the memory budget beside the working memory."""
    from crp_invert.core.labeling import available_memory, default_feature_batch_size
    from crp_invert.core.search import SearchMemory

    assert available_memory("cpu") is None or available_memory("cpu") > 0
    # N (itemsize + 4) + 16 K bytes per feature besides a working memory of a quarter of the budget
    for n, budget, k in [(1_000_000, 1 << 30, 0), (1_280_000, 512 << 20, 1481), (50_000, 256 << 20, 1481)]:
        memory = SearchMemory(n, k, 3, 3)
        size = default_feature_batch_size(n, 3, memory_bytes=budget, n_concepts=k)
        per_feature = n * 8 + 16 * k
        assert memory.feature_bytes(4) == per_feature
        working = max(memory.minimum_working_memory(), budget // 4)
        assert size == min(4096, (budget - working) // per_feature)
        # the batch fits the budget, one more feature would not (unless capped)
        assert size * per_feature + working <= budget
        assert size == 4096 or (size + 1) * per_feature + working > budget
    # batches stay large at ImageNet scale: 1.28 M samples in the default CPU budget
    assert default_feature_batch_size(1_280_000, 3, memory_bytes=512 << 20, n_concepts=1481) >= 32
    assert default_feature_batch_size(10**9, 3, memory_bytes=1 << 30) == 1
    assert default_feature_batch_size(100, 3, memory_bytes=1 << 40) == 4096
    sizes = [default_feature_batch_size(n, 3) for n in (1_000, 100_000, 10_000_000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 1
    # float64 scores take more per feature than float32
    assert default_feature_batch_size(1_000_000, 3, memory_bytes=1 << 30, itemsize=8) < \
        default_feature_batch_size(1_000_000, 3, memory_bytes=1 << 30, itemsize=4)


def test_concatenate_recomputes_benjamini_hochberg():
    """Concatenated labels of feature parts equal the whole, BH q-values recomputed over all features."""
    labels, scores, names = random_case(6, n=150, f=8)
    labeler = ConceptLabeler(ConceptLabels(labels, names))
    whole = labeler.label(scores, L=2, B=2, progress=False)
    parts = [labeler.label(scores[:, :3], L=2, B=2, progress=False),
             labeler.label(scores[:, 3:], L=2, B=2, progress=False)]
    joined = LayerLabels.concatenate(parts)
    assert joined == whole
    assert [e.p_value_bh for beam in joined for e in beam] == [e.p_value_bh for beam in whole for e in beam]


def test_prepared_label_rows_equal_the_dense_labels():
    """The prepared label rows and matrix equal the dense concept labels (empty rows included)."""
    from crp_invert.core.search import prepare_labels

    labels = np.random.default_rng(0).random((40, 6)) < 0.3
    labels[:, 2] = False  # a concept without positives: an empty row
    prepared = prepare_labels(ConceptLabels(labels, list("abcdef")).torch_sparse_t())
    codes = torch.tensor([[0, 2], [5, 1]])
    gathered = prepared.rows.gather(codes)  # [N, 2, 2]
    for i in range(2):
        for j in range(2):
            assert gathered[:, i, j].tolist() == labels[:, codes[i, j]].tolist()
    assert torch.equal(prepared.matrix.to_dense().T.bool(), torch.from_numpy(labels))


# the search's memory: sample lists, chunks, wide beams, the up-front refusal ----------------------------
def test_formula_lists_equal_the_evaluated_formulas():
    # every formula's sample list (or the list of where it does not hold) against Formula.evaluate,
    # with concepts that hold for more than half of the samples (listed by their complement)
    """Each formula's sample list (or its complement's) equals Formula.evaluate."""
    from crp_invert.core.search import _formula_lists, prepare_labels

    rng = np.random.default_rng(0)
    n, k = 60, 6
    labels = rng.random((n, k)) < np.array([0.1, 0.3, 0.5, 0.7, 0.9, 0.45])
    names = [f"c{i}" for i in range(k)]
    concepts = ConceptLabels(labels, names)
    prepared = prepare_labels(concepts.torch_sparse_t())
    assert prepared.flipped.tolist() == list(labels.sum(0) * 2 > n)
    L = 4
    prims = torch.from_numpy(np.stack([rng.permutation(k)[:L] + k * rng.integers(0, 2, L) for _ in range(200)]))
    ops = torch.from_numpy(rng.integers(0, 2, (200, L)))
    ops[:, 0] = -1
    lengths = torch.from_numpy(rng.integers(1, L + 1, 200))
    keys, flags = _formula_lists(prepared, prims, ops, lengths)
    assert bool((keys[1:] > keys[:-1]).all())  # sorted, no repeats
    for i in range(200):
        formula = None
        for position in range(int(lengths[i])):
            code = int(prims[i, position])
            atom = Formula.concept(names[code % k])
            atom = ~atom if code >= k else atom
            if formula is None:
                formula = atom
            else:
                formula = formula & atom if int(ops[i, position]) == 0 else formula | atom
        listed = np.zeros(n, dtype=bool)
        listed[(keys[(keys // n) == i] % n).numpy()] = True
        assert (listed ^ bool(flags[i])).tolist() == formula.evaluate(concepts).tolist()


def test_small_working_memory_gives_the_same_result(monkeypatch):
    # large formulas with little working memory: ranks and searches in chunks of one feature,
    # formulas in several groups, their samples' concepts in several segments
    """A tiny working memory (chunked ranks, formula groups, concept segments) gives the same beams."""
    import crp_invert.core.search as search
    from crp_invert.core.metrics import compact_ranks
    from crp_invert.core.search import SearchMemory, beam_search, prepare_labels

    formula_lists = search._formula_lists
    monkeypatch.setattr(search, "_prefer_dense", lambda *args: False)  # the sample lists, not dense products

    rng = np.random.default_rng(3)
    n, k = 400, 8
    labels = rng.random((n, k)) < rng.uniform(0.3, 0.8, size=k)
    scores = torch.from_numpy(np.maximum(rng.normal(size=(n, 9)), 0.0).round(1))
    prepared = prepare_labels(ConceptLabels(labels, [f"c{i}" for i in range(k)]).torch_sparse_t())
    kwargs = dict(L=4, B=4, max_fraction=1.0)
    reference = beam_search(scores, prepared, memory_bytes=1 << 30, **kwargs)
    memory = SearchMemory(n, k, 4, 4)
    minimum = memory.minimum_working_memory()
    rank_chunk, _, search_chunk, list_elements = memory.chunks(minimum)
    assert (rank_chunk, search_chunk, list_elements) == (1, 1, memory.list_elements())
    groups = []
    monkeypatch.setattr(search, "_formula_lists", lambda *args: groups.append(1) or formula_lists(*args))
    small = beam_search(compact_ranks(scores, 1), prepared, memory_bytes=minimum, **kwargs)
    assert len(groups) > 9 * (4 - 1)  # more than one group of formulas per chunk and step
    for name in ("primitives", "operators", "length", "n_positive", "auc"):
        assert torch.equal(getattr(small.beam, name), getattr(reference.beam, name))
    assert torch.equal(small.p_value, reference.p_value) and torch.equal(small.n_candidates, reference.n_candidates)


def test_duplicate_check_equals_pairwise_comparison():
    """The duplicate check equals comparing every formula's signature with every earlier one."""
    from crp_invert.core.search import _duplicates, _signature

    rng = np.random.default_rng(1)
    k, L, n_concepts = 60, 3, 4
    prims = torch.from_numpy(rng.integers(0, 2 * n_concepts, (5, k, L)))
    ops = torch.from_numpy(rng.integers(0, 2, (5, k, L)))
    length = torch.from_numpy(rng.integers(1, L + 1, (5, k)))
    result = _duplicates(prims, ops, length, n_concepts)
    signature = _signature(prims, ops, length, n_concepts)
    for f in range(5):
        for i in range(k):
            earlier = any(torch.equal(signature[f, i], signature[f, j]) for j in range(i))
            assert bool(result[f, i]) == earlier
    assert result.any()  # the case has repeated formulas


def test_very_wide_beam_stays_small():
    # B = 10,000 once asked for an F x 4B x 4B x (L + 1) tensor (25 GB); the beam now holds every formula
    """A beam wider than the formula space holds every formula and the exhaustive best AUC."""
    labels, scores, names = random_case(4, k=4, f=2)
    space = all_formulas(labels, names, 3)
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=3, B=10_000, progress=False)
    for f in range(2):
        assert {e.formula for e in result[f]} == set(space)
        aucs = {formula: slow_auc(scores[:, f], mask) for formula, mask in space.items()}
        assert result[f][0].auc == pytest.approx(max(aucs.values()), abs=1e-12)


def test_too_wide_beam_is_refused_before_any_work():
    """A beam too wide for the memory limit is refused with the sizes named, before any column is read."""
    from crp_invert.core.labeling import label_array

    class NoReads:
        shape, dtype = (30, 2), np.dtype(np.float32)

        def __getitem__(self, item):
            raise AssertionError("a column was read")

    labels, _, names = random_case(0, n=30, k=3)
    concepts = ConceptLabels(labels, names)
    # B = 10,000 over 1,000 concepts: 40 M candidates of one feature need about 2.7 GiB
    many = ConceptLabels(np.random.default_rng(0).random((30, 1000)) < 0.2, [f"k{i}" for i in range(1000)])
    with pytest.raises(ValueError, match=r"B = 10000, L = 3 .*K = 1,000 .*GiB.* memory limit of 256.0 MiB"):
        label_array(NoReads(), many, SearchParams(B=10_000), memory_bytes=256 << 20, progress=False)
    # more than any machine has: refused with the default limit too
    with pytest.raises(ValueError, match=r"B = 1000000000, L = 2"):
        ConceptLabeler(concepts).label(NoReads(), L=2, B=10**9, progress=False)


def test_wide_beam_is_refused_within_an_address_space_limit():
    # a child process that believes it has 2 GiB free and may only take 3 GiB more: B = 10,000 over
    # 1,481 concepts (scoring one feature's candidates takes about 4 GiB) must refuse up front, before
    # any large allocation
    """Under an address-space limit a too wide beam is refused up front, not by a failed allocation."""
    import subprocess
    import sys

    code = """
import resource
import numpy as np
import crp_invert.core.search as search
from crp_invert import ConceptLabeler, ConceptLabels
search.available_memory = lambda device=None: 2 << 30
rng = np.random.default_rng(0)
concepts = ConceptLabels(rng.random((500, 1481)) < 0.01, [f"k{i}" for i in range(1481)])
scores = rng.random((500, 2))
with open("/proc/self/status") as handle:
    held = next(int(line.split()[1]) for line in handle if line.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (held + (3 << 30), resource.RLIM_INFINITY))
try:
    result = ConceptLabeler(concepts).label(scores, L=3, B=10_000, progress=False)
    print("finished", len(result[0]))
except ValueError as error:
    print("refused", error)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused") and "B = 10000, L = 3" in out.stdout, out.stdout


# reliability: "a label is a claim" ----------------------------------------------------------------------
@pytest.mark.parametrize("n_samples", [20, 21, 200, 2048])
@pytest.mark.parametrize("n_candidates", [0, 1, 40, 5_000, 10**8])
@pytest.mark.parametrize("min_support", [0, 3, 10, 150])
def test_support_floor_equals_trying_every_support_with_scipy(n_samples, n_candidates, min_support):
    """The support floor is the smallest support at which scipy's most extreme Mann-Whitney p-value can pass."""
    rule = ReliabilityRule(min_support=min_support)
    assert rule.support_floor(n_samples, n_candidates) == slow_support_floor(n_samples, n_candidates,
                                                                             min_support=min_support)


def random_explanations(seed, count=300):
    """Explanations with statistics around every threshold of the rule (support, q, held-out p)."""
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(count):
        n = int(rng.choice([30, 200, 2048]))
        support = int(rng.integers(0, n + 1))
        validated = rng.random() < 0.4
        result.append(Explanation(
            Formula.concept("a"), auc=0.9, fraction=support / n, length=1, p_value=1e-4,
            n_candidates=int(rng.choice([1, 50, 10**9])), p_value_bonferroni=0.01,
            p_value_bh=float(rng.choice([0.001, 0.049, 0.05, 0.3, np.nan])),
            validation_auc=float(rng.random()) if validated else None,
            validation_p_value=float(rng.choice([0.01, 0.06, np.nan])) if validated else None,
            support=None if rng.random() < 0.05 else support, n_samples=n))
    return result


def test_reliable_equals_the_rule_written_out():
    """Explanation.reliable equals the documented rule written out, and every unreliable one says why."""
    explanations = random_explanations(0)
    assert {e.reliable for e in explanations} == {True, False}
    for e in explanations:
        assert e.reliable == slow_is_reliable(e)
        assert (e.unreliable_reason == "") == e.reliable
    strict = ReliabilityRule(alpha=0.01, min_support=20)
    for e in explanations:
        assert strict.is_reliable(e) == slow_is_reliable(e, alpha=0.01, min_support=20)
    reasons = {e.unreliable_reason.split(" ")[0] for e in explanations if not e.reliable}
    assert reasons == {"holds", "fails", "q", "not", "support"}


def weak_and_strong_case(seed=3, n=400):
    """Channel 0 driven by a concept on 200 samples, channel 1 by a conjunction on 3 samples, channel 2 noise."""
    rng = np.random.default_rng(seed)
    labels = rng.random((n, 6)) < [0.5, 0.5, 0.5, 0.5, 0.5, 0.3]
    tiny = labels[:, 0] & labels[:, 1] & labels[:, 2] & labels[:, 3] & labels[:, 4]
    keep = np.flatnonzero(tiny)[:3]
    tiny[:] = False
    tiny[keep] = True
    scores = np.stack([labels[:, 5] + 0.3 * rng.random(n), tiny + 0.01 * rng.random(n), rng.random(n)], 1)
    return labels, scores, [f"c{i}" for i in range(6)]


def test_best_is_the_first_reliable_explanation_of_the_beam():
    """best() is the first reliable explanation of the beam, best_any() its top, explanations() all of it."""
    labels, scores, names = weak_and_strong_case()
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=5, B=4, min_support=0, progress=False)
    for feature in range(3):
        beam = result.explanations(feature)
        assert beam == result[feature] and result.best_any(feature) == beam[0]
        reliable = [e for e in beam if slow_is_reliable(e)]
        assert result.best(feature) == (reliable[0] if reliable else None)
        for e in beam:
            mask = e.formula.evaluate(ConceptLabels(labels, names)).numpy()
            assert e.support == int(mask.sum()) and e.n_samples == len(mask)
    assert result.best(0).formula == Formula.concept("c5")
    assert result.best_any(1).support < 10 and result.best(1) != result.best_any(1)
    assert result.n_reliable() == sum(result.best(f) is not None for f in range(3))


def test_support_floor_keeps_unsupportable_formulas_out_of_the_beam():
    """With min_support every beam formula holds on and fails on at least min_support samples; the paper's
    search (0) finds a conjunction of at most 3 samples with AUC 1."""
    labels, scores, names = weak_and_strong_case()
    concepts = ConceptLabels(labels, names)
    paper = ConceptLabeler(concepts).label(scores, L=5, B=4, min_support=0, progress=False)
    floored = ConceptLabeler(concepts).label(scores, L=5, B=4, min_support=10, progress=False)
    tiny = paper.best_any(1)
    assert tiny.support <= 3 and tiny.auc == 1.0 and not tiny.reliable
    for beam in floored:
        for e in beam:
            assert 10 <= e.support <= e.n_samples - 10
    assert floored.parameters["min_support"] == 10 and paper.parameters["min_support"] == 0


def test_views_show_the_best_reliable_label_or_say_there_is_none(tmp_path):
    """table, rows, CSV (both styles) and JSON show best() or NO_RELIABLE_LABEL; JSON keeps the whole beam."""
    labels, scores, names = weak_and_strong_case()
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=5, B=4, min_support=0, progress=False)
    shown = [result.best(f) for f in range(3)]
    assert shown[0] is not None and None in shown
    rows = result.rows()
    for row, best in zip(rows, shown):
        assert row["formula"] == (NO_RELIABLE_LABEL if best is None else str(best.formula))
        assert row["reliable"] == (best is not None)
        if best is None:
            assert row["reason"] and row["top_formula"] == str(result.best_any(row["feature"]).formula)
        else:
            assert row["support"] == best.support and row["p_value_bh"] == best.p_value_bh
    table = result.table().splitlines()
    for feature, best in enumerate(shown):
        line = table[2 + feature]
        assert (NO_RELIABLE_LABEL in line) == (best is None)
        if best is not None:
            assert str(best.formula) in line and f"{best.support}/{best.n_samples}" in line
    result.to_csv(tmp_path / "full.csv")
    assert [r["formula"] for r in csv.DictReader(open(tmp_path / "full.csv"))] == [r["formula"] for r in rows]
    result.to_csv(tmp_path / "bench.csv", style="benchmark")
    bench = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [int(r["neuron"]) for r in bench] == [f for f, best in enumerate(shown) if best is not None]
    result.to_csv(tmp_path / "any.csv", style="benchmark-any")
    assert len(list(csv.DictReader(open(tmp_path / "any.csv")))) == 3
    result.to_json(tmp_path / "labels.json")
    data = json.loads((tmp_path / "labels.json").read_text())
    assert data["reliability_rule"] == {"alpha": 0.05, "min_support": 10}
    for feature in range(3):
        stored = data["features"][feature]
        assert [e["text"] for e in stored] == [str(e.formula) for e in result[feature]]
        assert [e["reliable"] for e in stored] == [e.reliable for e in result[feature]]
        assert [e["unreliable_reason"] for e in stored] == [e.unreliable_reason for e in result[feature]]
    assert LayerLabels.from_json(tmp_path / "labels.json") == result


def test_labels_of_an_older_version_load_with_derived_or_unknown_support(tmp_path):
    """Old JSON without support: derived from fraction and the searched samples, else unknown and not reliable."""
    labels, scores, names = weak_and_strong_case()
    result = ConceptLabeler(ConceptLabels(labels, names)).label(scores, L=3, B=3, validation=0.25,
                                                                progress=False)
    data = result.to_dict()
    for beam in data["features"]:
        for e in beam:
            for key in ("support", "n_samples", "reliable", "unreliable_reason"):
                del e[key]
    derived = LayerLabels.from_dict(data)
    assert derived == result  # support = round(fraction * n_search_samples), exactly
    del data["parameters"]["n_search_samples"]
    unknown = LayerLabels.from_dict(data)
    for feature in range(3):
        assert unknown.best(feature) is None
        assert all(e.support is None and e.unreliable_reason == "support unknown (labels from an older version)"
                   for e in unknown[feature])
    assert NO_RELIABLE_LABEL in unknown.table()


def one_layer_cache(path, scores):
    """An activation cache with one layer "conv1" holding ``scores``."""
    return write_cache(path, {"conv1": scores.astype(np.float32)})


def test_label_cache_result_names_its_layers_on_a_wrong_key(tmp_path):
    """The dict label_cache returns raises a KeyError that lists the labeled layers."""
    labels, scores, names = weak_and_strong_case()
    path = one_layer_cache(tmp_path / "cache.h5", scores)
    result = ConceptLabeler(ConceptLabels(labels, names)).label_cache(str(path), L=2, B=2, progress=False)
    assert isinstance(result, LabelsByLayer) and list(result) == ["conv1"]
    with pytest.raises(KeyError, match=r"'features.40'.*\['conv1'\]"):
        result["features.40"]
    assert result.get("features.40") is None


def test_min_support_is_checked():
    """min_support must be an int >= 0 (SearchParams and ReliabilityRule name it)."""
    for bad, error in ((-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="min_support"):
            SearchParams(min_support=bad)
    with pytest.raises(ValueError, match="min_support"):
        ReliabilityRule(min_support=-1)
    with pytest.raises(ValueError, match="alpha"):
        ReliabilityRule(alpha=1.5)


@pytest.mark.parametrize("min_support", [0, 10, 25])
def test_label_command_takes_min_support(tmp_path, min_support):
    """crp-invert label --min-support N writes the labels ConceptLabeler.label(min_support=N) finds."""
    from click.testing import CliRunner

    from crp_invert.cli import main

    labels, scores, names = weak_and_strong_case()
    concepts = ConceptLabels(labels, names)
    path = one_layer_cache(tmp_path / "cache.h5", scores)
    concepts.save(tmp_path / "concepts.npz")
    out = tmp_path / "conv1.json"
    result = CliRunner().invoke(main, ["label", str(path), str(tmp_path / "concepts.npz"), "-L", "4", "-B", "3",
                                       "--min-support", str(min_support), "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected = ConceptLabeler(concepts).label(scores.astype(np.float32), L=4, B=3, min_support=min_support,
                                              layer="conv1", progress=False)
    assert LayerLabels.from_json(out) == expected
    assert f"{expected.n_reliable()} of 3 channels have a reliable label" in result.output


@pytest.mark.parametrize("support, n_samples, error, pattern", [
    (-1, 100, ValueError, "'support' must be an int >= 0"),
    (101, 100, ValueError, r"'support' \(101\) exceeds 'n_samples' \(100\)"),
    (3.5, 100, ValueError, "'support' must be an int"),
    (3, "100", ValueError, "'n_samples' must be an int"),
    (True, 100, ValueError, "'support' must be an int"),
])
def test_bad_support_in_json_is_named(support, n_samples, error, pattern):
    """A stored support or sample count that is not a count (or exceeds the samples) is refused, naming the key."""
    data = Explanation(Formula.concept("a"), 0.9, 0.2, 1, 0.01, 3, 0.03, 0.03, support=20, n_samples=100).to_json()
    data.update(support=support, n_samples=n_samples)
    with pytest.raises(error, match=pattern):
        Explanation.from_json(data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prefetched_batches_with_kept_buffers_agree_with_one_batch(dtype):
    """Two batches in flight (the next ranked in a thread) whose buffers are handed from batch to batch, a
    shorter last batch included, give the labels of one batch."""
    from crp_invert.core.labeling import label_array, planned_memory
    from crp_invert.core.search import SearchMemory

    labels, scores, names = random_case(21, n=400, k=6, f=23)
    scores = scores.astype(dtype)
    scores[:, 5] = np.round(scores[:, 5] * 1e6) * 1e30  # a column with a wide span of values
    concepts = ConceptLabels(labels, names)
    params = SearchParams(L=3, B=3)
    plan = SearchMemory(400, 6, 3, 3)
    budget = 2 * (plan.minimum_working_memory() + 5 * plan.feature_bytes(np.dtype(dtype).itemsize))
    planned = planned_memory(scores, concepts, params, memory_bytes=budget)
    assert planned["prefetch"] and planned["feature_batch_size"] == 5
    batched = label_array(scores, concepts, params, memory_bytes=budget, progress=False)
    whole = label_array(scores, concepts, SearchParams(L=3, B=3, feature_batch_size=23), progress=False)
    assert batched.to_dict()["features"] == whole.to_dict()["features"]
