"""The Recorder's rows against a slow reference: the fast paths for indices that are sorted and unique (sorted
once per batch, no summing) give what sorting every call gives, for any mix of sorted, repeated and unsorted
indices, and record_activations skips iterating only torch's own sequential samplers; the glocal evidence's
percentile by binary search equals scipy's."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("crp")

from crp.concepts import ChannelConcept  # noqa: E402

from crp_invert.integration.hooks import _plain_sequential  # noqa: E402
from crp_invert.integration.recorder import Recorder  # noqa: E402
from crp_invert.storage.cache import ActivationCache  # noqa: E402

N_SAMPLES, CHANNELS = 12, {"a": 3, "b": 2}


def slow_rows(batches):
    """Expected activations (first occurrence of a sample in its batch) and relevances (sum over its rows)."""
    act = {name: np.full((N_SAMPLES, c), np.nan) for name, c in CHANNELS.items()}
    rel = {name: np.full((N_SAMPLES, c), np.nan) for name, c in CHANNELS.items()}
    for indices, outputs, relevances in batches:
        for name in CHANNELS:
            for sample in sorted(set(indices)):
                rows = [i for i, index in enumerate(indices) if index == sample]
                act[name][sample] = outputs[name][rows[0]].numpy()
                rel[name][sample] = relevances[name][rows].sum(0).numpy()
    return act, rel


batch_strategy = st.lists(st.integers(0, N_SAMPLES - 1), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(batch_strategy, min_size=1, max_size=4), st.data())
def test_recorder_rows_equal_slow_reference(tmp_path_factory, index_lists, data):
    """Activations and relevances written for sorted, repeated and unsorted indices equal the slow reference."""
    path = tmp_path_factory.mktemp("rows") / "c.h5"
    batches = []
    for indices in index_lists:
        outputs = {name: torch.randn(len(indices), c) for name, c in CHANNELS.items()}
        relevances = {name: torch.randn(len(indices), c) for name, c in CHANNELS.items()}
        batches.append((indices, outputs, relevances))
    layer_map = {name: ChannelConcept() for name in CHANNELS}
    with ActivationCache(path, mode="a") as cache:
        cache.initialize((0, N_SAMPLES))
        recorder = Recorder(cache, layer_map, {name: "mean" for name in CHANNELS}, True,
                            {name: {} for name in CHANNELS}, flush_interval=1e9)
        for indices, outputs, relevances in batches:
            recorder.begin(np.array(sorted(set(indices))))
            for name in CHANNELS:  # each layer gets its own index object, as CRP passes them
                as_array = data.draw(st.sampled_from([np.array, torch.tensor, list]))
                recorder.activation(name, outputs[name].clone(), as_array(indices))
            for name in reversed(list(CHANNELS)):
                recorder.relevance(name, relevances[name].clone(), np.array(indices))
            recorder.end()
        recorder.close()
    expected_act, expected_rel = slow_rows(batches)
    with ActivationCache(path) as cache:
        for name in CHANNELS:
            np.testing.assert_allclose(cache.activations(name).numpy(), expected_act[name], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(cache.relevances(name).numpy(), expected_rel[name], rtol=1e-5, atol=1e-5)


class OwnSequential(torch.utils.data.SequentialSampler):
    """A subclass that may change the order: must be iterated, not trusted."""


def test_plain_sequential_only_for_torchs_own_classes():
    """Only torch's SequentialSampler over the loader's dataset (and torch's BatchSampler on it) skip the check."""
    dataset = torch.utils.data.TensorDataset(torch.zeros(10, 1))
    other = torch.utils.data.TensorDataset(torch.zeros(20, 1))
    loader = torch.utils.data.DataLoader
    assert _plain_sequential(loader(dataset, batch_size=3))
    assert _plain_sequential(loader(dataset, batch_size=None))
    assert not _plain_sequential(loader(dataset, batch_size=3, shuffle=True))
    assert not _plain_sequential(loader(dataset, batch_size=3, sampler=OwnSequential(dataset)))
    assert not _plain_sequential(loader(dataset, batch_size=3, sampler=torch.utils.data.SequentialSampler(other)))
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), 3, False)
    assert not _plain_sequential(loader(dataset, batch_sampler=batches))  # not the loader's own sampler


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0, 1.5, 2.0, -3.0, float("nan"), float("inf"), -float("inf")]),
                min_size=1, max_size=30),
       st.sampled_from([0.0, 1.0, 1.25, 2.0, -3.0, 5.0, float("inf"), -float("inf"), float("nan")]))
def test_evidence_percentile_equals_scipy(values, value):
    """The evidence's percentile by binary search equals scipy's percentileofscore(kind="mean") over finite values."""
    from scipy.stats import percentileofscore

    from crp_invert.integration.evidence import _Column

    column = np.array(values)
    finite = column[np.isfinite(column)]
    if finite.size == 0:
        with pytest.raises(ValueError, match="finite"):
            _Column(column)
        return
    percentile, n = _Column(column).percentile(value)
    assert n == finite.size
    expected = 0.0 if value != value else percentileofscore(finite, value, kind="mean")
    assert percentile == pytest.approx(expected, abs=1e-9)
