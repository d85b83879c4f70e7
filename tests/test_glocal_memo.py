"""Glocal's shown labels with the per-sample memo of formula checks equal those chosen without it."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crp_invert import Explanation, Formula
from crp_invert.integration.shown_labels import choose_label

NAMES = ["ring", "red", "dog"]
FORMULAS = [Formula.parse(text) for text in
            ["ring", "red", "dog", "ring AND red", "ring OR dog", "NOT red", "red AND NOT dog"]]


def explanation(formula: Formula, auc: float) -> Explanation:
    return Explanation(formula, auc=auc, fraction=0.2, length=1, p_value=1e-9)


channel = st.fixed_dictionaries({
    "act": st.lists(st.tuples(st.sampled_from(range(len(FORMULAS))), st.floats(0.5, 1.0)), max_size=4),
    "rel": st.lists(st.tuples(st.sampled_from(range(len(FORMULAS))), st.floats(0.5, 1.0)), max_size=4),
})


@settings(max_examples=100, deadline=None)
@given(st.lists(channel, min_size=1, max_size=8), st.lists(st.tuples(*[st.booleans()] * 3), min_size=1, max_size=3))
def test_memo_gives_the_choices_of_unmemoized_calls(channels, samples):
    """Channels sharing formulas: choose_label with one memo per sample equals choose_label without a memo."""
    candidates = [{source: [explanation(FORMULAS[f], auc) for f, auc in offers] for source, offers in c.items()}
                  for c in channels]
    for values in samples:
        row = {name: torch.tensor([value]) for name, value in zip(NAMES, values, strict=True)}
        memo: dict = {}
        for cands in candidates:
            fast, slow = choose_label(cands, row, memo), choose_label(cands, row)
            assert (fast.explanation, fast.source, fast.n_reliable, fast.n_holding) == \
                (slow.explanation, slow.source, slow.n_reliable, slow.n_holding)
        for formula, holds in memo.items():
            assert holds == bool(formula.evaluate(row).reshape(-1)[0])
