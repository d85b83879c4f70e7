"""crp_invert.metrics against sklearn, scipy and a brute-force pairwise count."""
import numpy as np
import pytest
import torch
from helpers import bh_reference, slow_benjamini_hochberg
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu, rankdata, tiecorrect
from sklearn.metrics import roc_auc_score

from crp_invert.core.metrics import (
    auc_from_rank_sums,
    auroc,
    benjamini_hochberg,
    mann_whitney_pvalue,
    midranks,
    rank_scores,
)


def relu_scores(rng, n, f, decimals=1):
    # ReLU zeros and rounding give heavy ties, as real activations do
    return np.maximum(rng.normal(size=(n, f)), 0.0).round(decimals)


def pairwise_auc(scores, mask):
    pos, neg = scores[mask], scores[~mask]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_with_ties(seed):
    """auroc equals sklearn and the brute-force pairwise count on tied scores."""
    rng = np.random.default_rng(seed)
    scores = relu_scores(rng, 400, 6)
    labels = rng.random((400, 5)) < rng.uniform(0.05, 0.6, size=5)
    result = auroc(torch.from_numpy(scores), torch.from_numpy(labels)).numpy()
    for f in range(6):
        for k in range(5):
            assert abs(result[f, k] - roc_auc_score(labels[:, k], scores[:, f])) < 1e-9
            assert abs(result[f, k] - pairwise_auc(scores[:, f], labels[:, k])) < 1e-12


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=40))
def test_auroc_pairwise_property(pairs):
    """auroc equals the pairwise count for any scores and mask (0.5 when one class is empty)."""
    scores = np.array([p[0] for p in pairs], dtype=np.float64)
    mask = np.array([p[1] for p in pairs])
    result = auroc(torch.from_numpy(scores), torch.from_numpy(mask)).item()
    if mask.all() or not mask.any():
        assert result == 0.5
    else:
        assert abs(result - pairwise_auc(scores, mask)) < 1e-12


def test_compact_ranks_refuses_an_unknown_backend():
    """An unknown backend name raises a ValueError naming it."""
    from crp_invert.core.metrics import compact_ranks

    with pytest.raises(ValueError, match="'numpy'"):
        compact_ranks(torch.rand(5, 2), backend="numpy")


def test_midranks_and_tie_term_equal_scipy():
    """Midranks equal scipy's rankdata and the tie term scipy's tiecorrect."""
    rng = np.random.default_rng(3)
    scores = relu_scores(rng, 1000, 4)
    ranked = rank_scores(torch.from_numpy(scores))
    for f in range(4):
        np.testing.assert_array_equal(ranked.ranks[:, f].numpy(), rankdata(scores[:, f]))
        n = len(scores)
        # scipy's tiecorrect is 1 - tie_term / (n^3 - n)
        assert abs(1 - ranked.tie_term[f].item() / (n ** 3 - n) - tiecorrect(rankdata(scores[:, f]))) < 1e-12
    np.testing.assert_array_equal(midranks(torch.from_numpy(scores)).numpy(), ranked.ranks.numpy())


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize("seed", range(3))
def test_pvalue_equals_scipy_asymptotic(alternative, seed):
    """Mann-Whitney p-values equal scipy's asymptotic ones for every alternative."""
    rng = np.random.default_rng(seed)
    scores = relu_scores(rng, 300, 5)
    labels = rng.random((300, 4)) < 0.3
    scores[:, 0] += 2.0 * labels[:, 0]  # one strong effect: tiny p-values
    torch_scores = torch.from_numpy(scores)
    auc = auroc(torch_scores, torch.from_numpy(labels))
    ranked = rank_scores(torch_scores)
    p_value = mann_whitney_pvalue(
        auc, torch.from_numpy(labels.sum(0))[None, :], 300, ranked.tie_term[:, None], alternative
    ).numpy()
    for f in range(5):
        for k in range(4):
            reference = mannwhitneyu(scores[labels[:, k], f], scores[~labels[:, k], f],
                                     alternative=alternative, method="asymptotic").pvalue
            assert abs(p_value[f, k] - reference) <= 1e-9 * reference


def test_constant_feature_gives_half_and_one():
    """A constant feature has AUC 0.5 and p-value 1 (no NaN) for every alternative."""
    scores = torch.zeros(50, 1)
    labels = torch.arange(50)[:, None] % 3 == 0
    auc = auroc(scores, labels)
    assert auc.item() == 0.5
    ranked = rank_scores(scores)
    for alternative in ("two-sided", "greater", "less"):
        p_value = mann_whitney_pvalue(auc, labels.sum(0), 50, ranked.tie_term, alternative)
        assert p_value.item() == 1.0
        assert not torch.isnan(p_value).any()


def test_degenerate_masks():
    """Empty and full masks give AUC 0.5 and p-value 1."""
    assert auc_from_rank_sums(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0), 10).item() == 0.5
    assert auc_from_rank_sums(torch.tensor(55.0, dtype=torch.float64), torch.tensor(10), 10).item() == 0.5
    assert mann_whitney_pvalue(torch.tensor([0.5]), torch.tensor([0]), 10, torch.tensor([0.0])).item() == 1.0


def test_float64_keeps_digits_at_large_n():
    # float32 rank sums lose digits past a few thousand samples; ours must stay exact
    """AUCs keep sklearn's digits at 60,000 samples (float64 rank sums)."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(60_000, 1)).astype(np.float32)
    mask = rng.random(60_000) < 0.5
    result = auroc(torch.from_numpy(scores), torch.from_numpy(mask)).item()
    assert abs(result - roc_auc_score(mask, scores[:, 0])) < 1e-12


def test_benjamini_hochberg_equals_scipy():
    """benjamini_hochberg equals the Benjamini-Hochberg reference (scipy's where present)."""
    rng = np.random.default_rng(0)
    p_values = rng.random(50) ** 3
    np.testing.assert_allclose(benjamini_hochberg(torch.from_numpy(p_values)).numpy(),
                               bh_reference(p_values), rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_slow_benjamini_hochberg_equals_scipy(seed):
    """The tests' slow Benjamini-Hochberg reference (used where scipy < 1.11) equals scipy's, ties and ones included."""
    scipy_stats = pytest.importorskip("scipy.stats")
    if not hasattr(scipy_stats, "false_discovery_control"):
        pytest.skip("scipy < 1.11 has no false_discovery_control")
    rng = np.random.default_rng(seed)
    p_values = np.concatenate([rng.random(40) ** 3, rng.random(5).round(1), [1.0, 1.0, 0.0]])
    rng.shuffle(p_values)
    expected = scipy_stats.false_discovery_control(p_values, method="bh")
    np.testing.assert_allclose(slow_benjamini_hochberg(p_values), expected, rtol=1e-12)
    np.testing.assert_allclose(bh_reference(p_values), expected, rtol=0)


def test_bad_input():
    """Bad alternatives, non-0/1 labels, shape mismatches and numpy inputs raise named errors."""
    with pytest.raises(ValueError, match="alternative"):
        mann_whitney_pvalue(torch.tensor([0.5]), torch.tensor([1]), 3, torch.tensor([0.0]), "bigger")
    with pytest.raises(ValueError, match="0/1"):
        auroc(torch.rand(5, 1), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        auroc(torch.rand(5, 1), torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError):
        auroc(np.zeros((5, 1)), torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize("device, backend", [
    ("cpu", "auto"), ("cpu", "torch"),
    pytest.param("cuda", "auto", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="needs a CUDA device")]),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_compact_ranks_equal_scipy_for_every_dtype(dtype, device, backend):
    """Doubled midranks and tie terms of both backends equal scipy's rankdata for every dtype."""
    from crp_invert.core.metrics import _rank_rows, compact_ranks

    rng = np.random.default_rng(4)
    values = np.concatenate([relu_scores(rng, 500, 3, decimals=2) - 0.3,  # negatives, zeros, ties
                             rng.normal(size=(500, 2)) * 1e3], axis=1)
    values[:7, 0] = -0.0  # equal to 0.0
    values[10:20, 1] = np.inf
    values[20:25, 1] = -np.inf
    scores = torch.from_numpy(values).to(dtype) if dtype.is_floating_point else torch.from_numpy(values * 1e3).to(dtype)
    exact = scores.double().numpy()
    for chunk in (None, 2):
        ranked = compact_ranks(scores.to(device), chunk, backend)
        ranked = type(ranked)(ranked.doubled.cpu(), ranked.tie_term.cpu())
        assert ranked.doubled.dtype == torch.int32 and ranked.doubled.shape == (5, 500)
        for f in range(5):
            np.testing.assert_array_equal(ranked.doubled[f].numpy(), 2 * rankdata(exact[:, f]))
            groups = np.unique(exact[:, f], return_counts=True)[1]
            assert ranked.tie_term[f].item() == float((groups ** 3 - groups).sum())
    # the device-independent path (used on GPUs) gives the same
    doubled = torch.empty(5, 500, dtype=torch.int32)
    ties = torch.empty(5, dtype=torch.float64)
    _rank_rows(scores.T, doubled, ties)
    assert torch.equal(doubled, compact_ranks(scores).doubled) and torch.equal(ties, compact_ranks(scores).tie_term)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_tie_term_above_two_million_samples(backend):
    """From N = 2**21 on, tie terms are summed in float64 (t**3 overflows int64 no more); both backends agree
    with numpy's exact group counts."""
    from crp_invert.core.metrics import compact_ranks

    n = 2 ** 21 + 3
    values = (np.arange(n) % 1000).astype(np.float32)  # 1,000 tie groups of about 2,097 values
    ranked = compact_ranks(torch.from_numpy(values)[:, None], backend=backend)
    groups = np.unique(values, return_counts=True)[1].astype(np.float64)
    assert ranked.tie_term[0].item() == pytest.approx(float((groups ** 3 - groups).sum()), rel=1e-15)
    order = np.argsort(values, kind="stable")
    assert ranked.doubled[0, order[0]] == 1 + int(groups[0])  # the lowest group: doubled midrank 1 + t


def test_scratch_lends_kept_memory_and_ranks_alike():
    """A Scratch hands a given-back block to the next take of any dtype that fits (the smallest such), ignores
    arrays it did not lend, and compact_ranks with a kept scratch ranks like a fresh one, batch after batch."""
    from crp_invert.core.metrics import compact_ranks
    from crp_invert.core.scratch import Scratch

    scratch = Scratch()
    big, small = scratch.take((100,), np.float64), scratch.take((10,), np.int32)
    scratch.give(big)
    scratch.give(small)
    scratch.give(np.empty(3))  # not lent: ignored
    assert scratch.kept_bytes == 840
    again = scratch.take((5,), np.int64)
    assert again.ctypes.data == small.ctypes.data and again.dtype == np.int64 and again.flags.c_contiguous
    rng = np.random.default_rng(3)
    for n_features in (7, 7, 3):
        scores = torch.from_numpy(np.round(rng.normal(size=(500, n_features)), 1).astype(np.float32))
        kept = compact_ranks(scores, 2, scratch=scratch)
        fresh = compact_ranks(scores, 2)
        assert torch.equal(kept.doubled, fresh.doubled) and torch.equal(kept.tie_term, fresh.tie_term)
        for f in range(n_features):
            np.testing.assert_array_equal(kept.doubled[f].numpy(), 2 * rankdata(scores[:, f].numpy()))
        scratch.give(kept.doubled)
    empty = compact_ranks(torch.zeros(5, 0), scratch=scratch)  # no column: empty ranks, nothing to rank
    assert empty.doubled.shape == (0, 5) and empty.tie_term.shape == (0,)
