"""A slow, obviously-right INVERT: one candidate formula at a time, as the paper describes it.

Used by the tests (and benchmarks/bench_core.py) as the reference for the vectorized search. It
shares nothing with crp_invert.search or crp_invert.metrics: masks are built formula by formula,
AUCs come from scipy's ranks.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from crp_invert import Formula


def slow_auc(scores: np.ndarray, mask: np.ndarray) -> float:
    """AUROC with ties counting one half, from scipy's midranks (0.5 for an empty class)."""
    n_pos = int(mask.sum())
    n_neg = len(mask) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.5
    ranks = rankdata(scores)
    return (ranks[mask].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def slow_beam_search(scores, labels, names, L=3, B=3, limit_search=None, min_fraction=0.0,
                     max_fraction=0.5, mode="positive", min_support=10):
    """Best-first list of ``(Formula, auc, fraction)`` for one feature.

    Parameters mirror ``ConceptLabeler.label``; ``labels`` is a dense boolean ``[N, K]`` array. A formula
    must hold on at least ``min_support`` samples and fail on at least as many.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_samples, n_concepts = labels.shape
    sign = 1.0 if mode == "positive" else -1.0
    prims = []  # (code, Formula, mask) in code order: concepts, then their negations
    for code in range(2 * n_concepts):
        k = code % n_concepts
        atom = Formula.concept(names[k])
        mask = labels[:, k] if code < n_concepts else ~labels[:, k]
        prims.append((code, atom if code < n_concepts else ~atom, mask, k))

    def valid(mask):
        return _valid(mask, n_samples, min_fraction, max_fraction, min_support)

    prim_auc = [slow_auc(scores, mask) for _, _, mask, _ in prims]
    allowed = list(range(2 * n_concepts))
    if limit_search is not None:
        strength = [abs(a - 0.5) for a in prim_auc]
        allowed = sorted(sorted(allowed, key=lambda c: -strength[c])[:limit_search])

    # a beam entry: (score, formula, mask, used concepts)
    entries = [(sign * prim_auc[c], prims[c][1], prims[c][2], {prims[c][3]}) for c in allowed if valid(prims[c][2])]
    beam = _best_distinct(entries, B)
    for _ in range(1, L):
        candidates = list(beam)
        for _, formula, mask, used in beam:
            for op in ("and", "or"):
                for code in allowed:
                    _, atom, prim_mask, k = prims[code]
                    if k in used:
                        continue
                    new_mask = mask & prim_mask if op == "and" else mask | prim_mask
                    if not valid(new_mask):
                        continue
                    new_formula = formula & atom if op == "and" else formula | atom
                    candidates.append((sign * slow_auc(scores, new_mask), new_formula, new_mask, used | {k}))
        beam = _best_distinct(candidates, B)
    return [(formula, sign * score, mask.sum() / n_samples) for score, formula, mask, _ in beam]


def _best_distinct(entries, B):
    order = sorted(range(len(entries)), key=lambda i: -entries[i][0])  # stable: earlier wins ties
    chosen, seen = [], set()
    for i in order:
        if entries[i][1] in seen:
            continue
        seen.add(entries[i][1])
        chosen.append(entries[i])
        if len(chosen) == B:
            break
    return chosen


def _valid(mask, n_samples, min_fraction, max_fraction, min_support):
    """The search's constraints on a formula's mask, written out: 0 < count < N, the fractions, the support."""
    count = int(mask.sum())
    fraction = count / n_samples
    return (0 < count < n_samples and min_fraction - 1e-9 <= fraction <= max_fraction + 1e-9
            and count >= min_support and n_samples - count >= min_support)


def all_formulas(labels, names, L, min_fraction=0.0, max_fraction=0.5, min_support=10):
    """Every left-deep formula of length <= L with distinct concepts whose every prefix satisfies the
    fraction and support constraints (the search space of the beam search), as ``{Formula: mask}``."""
    labels = np.asarray(labels, dtype=bool)
    n_samples, n_concepts = labels.shape

    def valid(mask):
        return _valid(mask, n_samples, min_fraction, max_fraction, min_support)

    prims = []
    for code in range(2 * n_concepts):
        k = code % n_concepts
        atom = Formula.concept(names[k])
        prims.append((atom if code < n_concepts else ~atom, labels[:, k] if code < n_concepts else ~labels[:, k], k))
    found = {}
    frontier = [(f, m, {k}) for f, m, k in prims if valid(m)]
    for f, m, _ in frontier:
        found[f] = m
    for _ in range(1, L):
        new_frontier = []
        for formula, mask, used in frontier:
            for atom, prim_mask, k in prims:
                if k in used:
                    continue
                for op in ("and", "or"):
                    new_mask = mask & prim_mask if op == "and" else mask | prim_mask
                    if valid(new_mask):
                        new_formula = formula & atom if op == "and" else formula | atom
                        if new_formula not in found:
                            found[new_formula] = new_mask
                            new_frontier.append((new_formula, new_mask, used | {k}))
        frontier = new_frontier
    return found


def slow_support_floor(n_samples, n_candidates, alpha=0.05, min_support=10):
    """The smallest support n >= min_support at which ``n_candidates`` times the one-sided Mann-Whitney
    p-value (scipy, asymptotic) of the most extreme ranking (the n samples above all others) is below
    alpha, by trying every n; ``N // 2 + 1`` when none is."""
    from scipy.stats import mannwhitneyu

    for n in range(max(1, min_support), n_samples // 2 + 1):
        top, rest = np.arange(n_samples - n, n_samples), np.arange(n_samples - n)
        p_value = mannwhitneyu(top, rest, alternative="greater", method="asymptotic").pvalue
        if max(1, n_candidates) * p_value < alpha:
            return n
    return max(min_support, n_samples // 2 + 1)


def slow_is_reliable(e, alpha=0.05, min_support=10):
    """The reliability rule written out from RELIABILITY_RULE for one Explanation-like object."""
    if e.support is None or e.n_samples is None:
        return False
    floor = slow_support_floor(e.n_samples, e.n_candidates, alpha, min_support)
    if e.support < floor or e.n_samples - e.support < floor:
        return False
    if not e.p_value_bh < alpha:
        return False
    validated = e.validation_auc is not None or e.validation_p_value is not None
    return not validated or (e.validation_p_value is not None and e.validation_p_value < alpha)
