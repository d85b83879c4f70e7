"""Recording during CRP's FeatureVisualization.run and with plain forward hooks.

Every expected value is computed independently: activations from forward hooks on the *un-canonized* model
(the BatchNorm output equals the merged convolution's output), relevances from direct CondAttribution calls,
CRP's files from a plain FeatureVisualization run.
"""

import filecmp
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

crp = pytest.importorskip("crp")

from crp.attribution import CondAttribution  # noqa: E402
from crp.concepts import ChannelConcept  # noqa: E402
from crp.visualization import FeatureVisualization  # noqa: E402
from helpers import ListDataset, branch_net  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonPlus  # noqa: E402

from crp_invert.integration.recording import InvertFeatureVisualization, load_stat_targets, pool, record_activations  # noqa: E402
from crp_invert.storage.cache import ActivationCache  # noqa: E402

N_SAMPLES = 40
BATCH = 8
CHECKPOINT = 2
LAYERS = ["conv1", "conv2", "parallel.0", "linear1", "linear2"]
# module whose output (in the plain model) equals each recorded layer's output after BatchNorm merging
AFTER_BN = {
    "conv1": "bn1",
    "conv2": "bn2",
    "parallel.0": "parallel.1",
    "linear1": "linear1",
    "linear2": "linear2",
}


def make_model(seed=0):
    return branch_net(seed)


def make_data(n=N_SAMPLES, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 14, 14, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y


def composite():
    return EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])


def layer_map():
    return {name: ChannelConcept() for name in LAYERS}


@pytest.fixture(autouse=True)
def _fast_gc(monkeypatch):
    # CRP calls gc.collect() after every save, which dominates the runtime of these tiny runs
    import crp.maximization
    import crp.statistics

    monkeypatch.setattr(crp.maximization.gc, "collect", lambda *a: 0)
    monkeypatch.setattr(crp.statistics.gc, "collect", lambda *a: 0)


def crp_files(folder):
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_same_crp_files(folder_a, folder_b):
    files_a, files_b = crp_files(folder_a), crp_files(folder_b)
    assert files_a == files_b
    assert files_a, "CRP wrote no files"
    for name in files_a:
        assert filecmp.cmp(Path(folder_a) / name, Path(folder_b) / name, shallow=False), name


def hooks_left(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One recording run and one plain CRP run on the same model and data."""
    import crp.maximization
    import crp.statistics

    root = tmp_path_factory.mktemp("recorded")
    model = make_model()
    x, y = make_data()
    dataset = ListDataset(x, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crp.maximization.gc, "collect", lambda *a: 0)
        mp.setattr(crp.statistics.gc, "collect", lambda *a: 0)
        fv = InvertFeatureVisualization(
            CondAttribution(model),
            dataset,
            layer_map(),
            path=str(root / "fv"),
            activation_cache=root / "acts.h5",
            pooling="mean",
            flush_interval=3600,  # everything buffered until the end: rows written as one block
        )
        fv.run(composite(), 0, N_SAMPLES, batch_size=BATCH, checkpoint=CHECKPOINT)
        plain = FeatureVisualization(CondAttribution(model), dataset, layer_map(), path=str(root / "plain"))
        plain.run(composite(), 0, N_SAMPLES, batch_size=BATCH, checkpoint=CHECKPOINT)
    return {"root": root, "model": model, "x": x, "y": y, "cache": root / "acts.h5", "state": state, "fv": fv}


def independent_pooled(model, x, pooling="mean"):
    """Pooled outputs in float64 from forward hooks on the plain (un-canonized) model."""
    modules = dict(model.named_modules())
    outputs = {}
    handles = [
        modules[AFTER_BN[name]].register_forward_hook(
            lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().double())
        )
        for name in LAYERS
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    reduce = {"mean": lambda t: t.mean(-1), "max": lambda t: t.max(-1).values, "sum": lambda t: t.sum(-1)}[
        pooling
    ]
    return {name: (reduce(out.flatten(2)) if out.dim() > 2 else out) for name, out in outputs.items()}


def condattribution_relevances(model, x, targets):
    """Per-channel relevance of each sample w.r.t. its target, straight from CondAttribution."""
    attribution = CondAttribution(model)
    result = attribution(
        x.clone().requires_grad_(True), [{"y": [int(t)]} for t in targets], composite(), record_layer=LAYERS
    )
    return {name: ChannelConcept().attribute(result.relevances[name], abs_norm=False) for name in LAYERS}


# -- the recording run ---------------------------------------------------------------------------------------


def test_cache_layout_and_completion(recorded):
    with ActivationCache(recorded["cache"]) as cache:
        assert cache.layers == LAYERS
        assert cache.n_samples == N_SAMPLES and cache.sample_range == (0, N_SAMPLES)
        assert cache.is_complete() and cache.missing_ranges() == []
        for name in LAYERS:
            info = cache.info(name)
            assert info["pooling"] == "mean" and info["concept"] == "ChannelConcept"
            assert info["relevances"] and "EpsilonPlus" in info["composite"]
            assert len(info["fingerprint"]) == 64
        assert cache.n_channels("conv1") == 4 and cache.n_channels("linear1") == 6


def test_cached_activations_equal_independent_pooling(recorded):
    expected = independent_pooled(recorded["model"], recorded["x"])
    with ActivationCache(recorded["cache"]) as cache:
        for name in LAYERS:
            got = cache.activations(name).double()
            assert got.shape == expected[name].shape
            torch.testing.assert_close(got, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # the canonized model is back to its original parameters and has no hooks
    state = recorded["model"].state_dict()
    assert all(torch.equal(state[k], v) for k, v in recorded["state"].items())
    assert hooks_left(recorded["model"]) == 0


def test_cached_relevances_equal_condattribution(recorded):
    expected = condattribution_relevances(recorded["model"], recorded["x"], recorded["y"])
    with ActivationCache(recorded["cache"]) as cache:
        for name in LAYERS:
            got = cache.relevances(name)
            assert got.abs().max() > 0
            torch.testing.assert_close(got, expected[name].float(), rtol=1e-5, atol=1e-7, msg=name)


def test_crp_files_unchanged_by_recording(recorded):
    assert_same_crp_files(recorded["root"] / "fv", recorded["root"] / "plain")


def test_compute_stats_without_numpy_int(recorded):
    fv = recorded["fv"]
    path = fv.RelStats.PATH
    if not hasattr(np, "int"):
        # the numpy-2 rough edge we work around: CRP's own loader fails
        from crp.helper import load_stat_targets as crp_load_stat_targets

        with pytest.raises(AttributeError):
            crp_load_stat_targets(path)
    targets = load_stat_targets(path)
    assert sorted(targets.tolist()) == sorted(set(recorded["y"].tolist()))
    sorted_t, sorted_val = fv.compute_stats(1, "linear1", mode="relevance", top_N=3, mean_N=5)
    # slow re-computation from CRP's files
    means = {}
    for t in targets:
        rel = np.load(Path(path) / "linear1" / f"{t}_rel.npy")
        means[int(t)] = float(torch.from_numpy(rel[:5, 1]).mean())
    best = sorted(means, key=lambda t: -means[t])[:3]
    assert [int(t) for t in sorted_t] == best
    np.testing.assert_allclose(sorted_val.numpy(), [means[t] for t in best], rtol=1e-6)
    assert not hasattr(np, "int")  # nothing was patched globally


def test_refuses_other_model_or_pooling(recorded, tmp_path):
    before = ActivationCache(recorded["cache"])
    acts = before.activations("conv2")
    before.close()
    other = make_model(seed=5)
    x, y = make_data()
    fv = InvertFeatureVisualization(
        CondAttribution(other),
        ListDataset(x, y),
        layer_map(),
        path=str(tmp_path / "fv"),
        activation_cache=recorded["cache"],
    )
    with pytest.raises(ValueError, match="model_hash"):
        fv.run(composite(), 0, 8, batch_size=8)
    fv = InvertFeatureVisualization(
        CondAttribution(recorded["model"]),
        ListDataset(x, y),
        layer_map(),
        path=str(tmp_path / "fv"),
        activation_cache=recorded["cache"],
        pooling="max",
    )
    with pytest.raises(ValueError, match="pooling"):
        fv.run(composite(), 0, 8, batch_size=8)
    fv = InvertFeatureVisualization(
        CondAttribution(recorded["model"]),
        ListDataset(x[:30], y[:30]),
        layer_map(),
        path=str(tmp_path / "fv"),
        activation_cache=recorded["cache"],
    )
    with pytest.raises(ValueError, match="length"):
        fv.run(composite(), 0, 8, batch_size=8)
    with ActivationCache(recorded["cache"]) as cache:
        assert torch.equal(cache.activations("conv2"), acts)
        assert cache.is_complete()
    assert hooks_left(other) == 0


def test_unknown_layer_and_bad_arguments(tmp_path):
    model = make_model()
    x, y = make_data(8)
    with pytest.raises(KeyError, match="conv1"):
        InvertFeatureVisualization(
            CondAttribution(model),
            ListDataset(x, y),
            {"nope": ChannelConcept()},
            path=str(tmp_path),
            activation_cache=tmp_path / "a.h5",
        )
    with pytest.raises(ValueError, match="pooling"):
        InvertFeatureVisualization(
            CondAttribution(model),
            ListDataset(x, y),
            layer_map(),
            path=str(tmp_path),
            activation_cache=tmp_path / "a.h5",
            pooling="median",
        )
    with pytest.raises(TypeError, match="activation_cache"):
        InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y), layer_map(), path=str(tmp_path),
                                   activation_cache=3)
    assert not (tmp_path / "a.h5").exists()


# -- interruptions -------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_results(recorded, tmp_path):
    model = make_model()
    x, y = make_data()
    armed = {"on": True}

    def on_get(index):
        if armed["on"] and index == 3 * BATCH + 2:  # in the 4th batch, after CRP's first checkpoint
            raise Interrupt("stop")

    dataset = ListDataset(x, y, on_get)
    fv = InvertFeatureVisualization(
        CondAttribution(model),
        dataset,
        layer_map(),
        path=str(tmp_path / "fv"),
        activation_cache=tmp_path / "acts.h5",
        flush_interval=0,
    )
    with pytest.raises(Interrupt):
        fv.run(composite(), 0, N_SAMPLES, batch_size=BATCH, checkpoint=CHECKPOINT)
    assert hooks_left(model) == 0
    with ActivationCache(tmp_path / "acts.h5") as cache:
        assert cache.missing_ranges() == [(3 * BATCH, N_SAMPLES)]
        assert not cache.is_complete()
        assert torch.isnan(cache.activations("conv1")[3 * BATCH :]).all()
        with ActivationCache(recorded["cache"]) as full:
            assert torch.equal(
                cache.activations("linear1")[: 3 * BATCH], full.activations("linear1")[: 3 * BATCH]
            )

    armed["on"] = False
    fv.resume(composite(), batch_size=BATCH, checkpoint=CHECKPOINT)
    assert hooks_left(model) == 0
    with ActivationCache(tmp_path / "acts.h5") as cache, ActivationCache(recorded["cache"]) as full:
        assert cache.is_complete()
        for name in LAYERS:
            assert torch.equal(cache.activations(name), full.activations(name))
            assert torch.equal(cache.relevances(name), full.relevances(name))
    assert_same_crp_files(tmp_path / "fv", recorded["root"] / "fv")
    # nothing left to do
    assert fv.resume(composite(), batch_size=BATCH, checkpoint=CHECKPOINT) == {
        "r_max": [],
        "a_max": [],
        "r_stats": [],
        "a_stats": [],
    }


def test_killed_process_leaves_resumable_cache(recorded, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from test_recording import *
        model = make_model()
        x, y = make_data()
        def on_get(index):
            if index == 2 * BATCH + 1:
                os.kill(os.getpid(), signal.SIGKILL)
        fv = InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y, on_get), layer_map(),
                                        path={str(tmp_path / "fv")!r}, activation_cache={str(tmp_path / "acts.h5")!r},
                                        flush_interval=0)
        fv.run(composite(), 0, N_SAMPLES, batch_size=BATCH, checkpoint=100)
    """)
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with ActivationCache(tmp_path / "acts.h5") as cache:
        assert cache.missing_ranges() == [(2 * BATCH, N_SAMPLES)]
    model = make_model()
    x, y = make_data()
    fv = InvertFeatureVisualization(
        CondAttribution(model),
        ListDataset(x, y),
        layer_map(),
        path=str(tmp_path / "fv"),
        activation_cache=tmp_path / "acts.h5",
    )
    fv.run(composite(), 2 * BATCH, N_SAMPLES, batch_size=BATCH)  # only the missing range
    with ActivationCache(tmp_path / "acts.h5") as cache, ActivationCache(recorded["cache"]) as full:
        assert cache.is_complete()
        for name in LAYERS:
            assert torch.equal(cache.activations(name), full.activations(name))
            assert torch.equal(cache.relevances(name), full.relevances(name))


# -- multi-target datasets -----------------------------------------------------------------------------------


def multitarget_to_single(self, multi_target):
    return [int(t) for t in np.flatnonzero(multi_target)]


class MultiFV(InvertFeatureVisualization):
    multitarget_to_single = multitarget_to_single


class PlainMultiFV(FeatureVisualization):
    multitarget_to_single = multitarget_to_single


def test_multitarget_dataset(tmp_path, caplog):
    model = make_model()
    n = 12
    x, _ = make_data(n)
    multi = np.zeros((n, 3), dtype=np.int64)
    rng = np.random.default_rng(0)
    for i in range(n):
        multi[i, rng.choice(3, size=1 + i % 2, replace=False)] = 1
    multi[5] = 0  # no target: CRP never forwards it
    dataset = ListDataset(x, multi)
    fv = MultiFV(
        CondAttribution(model), dataset, layer_map(), path=str(tmp_path / "fv"), activation_cache=tmp_path / "m.h5"
    )
    with caplog.at_level("WARNING"):
        fv.run(composite(), 0, n, batch_size=4)
    assert "no target" in caplog.text
    plain = PlainMultiFV(CondAttribution(model), dataset, layer_map(), path=str(tmp_path / "plain"))
    plain.run(composite(), 0, n, batch_size=4)
    assert_same_crp_files(tmp_path / "fv", tmp_path / "plain")

    acts = independent_pooled(model, x)
    rels = {name: torch.zeros(n, acts[name].shape[1], dtype=torch.float64) for name in LAYERS}
    for t in range(3):
        per_target = condattribution_relevances(model, x, [t] * n)
        for name in LAYERS:
            rels[name] += per_target[name].double() * torch.from_numpy(multi[:, t]).double()[:, None]
    with ActivationCache(tmp_path / "m.h5") as cache:
        assert cache.missing_ranges() == [(5, 6)]
        keep = np.arange(n) != 5
        for name in LAYERS:
            torch.testing.assert_close(
                cache.activations(name)[keep].double(), acts[name][keep], rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                cache.relevances(name)[keep].double(), rels[name][keep], rtol=1e-4, atol=1e-6
            )


# -- plain forward hooks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "max", "sum"])
def test_record_activations_pooling(tmp_path, pooling):
    model = make_model()
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    cache = record_activations(
        model, loader, LAYERS, tmp_path / "r.h5", pooling=pooling, composite=composite(), progress=False
    )
    expected = independent_pooled(model, x, pooling)
    with cache:
        assert cache.is_complete() and cache.layers == LAYERS
        for name in LAYERS:
            torch.testing.assert_close(cache.activations(name).double(), expected[name], rtol=1e-4, atol=1e-5)
            assert cache.info(name)["pooling"] == pooling
    assert hooks_left(model) == 0


def test_record_activations_without_composite_records_plain_outputs(tmp_path):
    model = make_model()
    x, _ = make_data(10)
    cache = record_activations(
        model, [x[:6], x[6:]], {"conv1": ChannelConcept()}, tmp_path / "r.h5", n_samples=10, progress=False
    )
    with torch.no_grad():
        expected = model.conv1(x).mean((2, 3))
    with cache:
        torch.testing.assert_close(cache.activations("conv1"), expected)


def test_record_activations_error_removes_hooks_and_resumes(tmp_path):
    model = make_model()
    x, _ = make_data()
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))

    def loader(fail_at=None):
        for i, start in enumerate(range(0, N_SAMPLES, 10)):
            if i == fail_at:
                raise Interrupt("stop")
            yield (x[start : start + 10], None)

    with pytest.raises(Interrupt):
        record_activations(
            model,
            loader(fail_at=2),
            LAYERS,
            tmp_path / "r.h5",
            n_samples=N_SAMPLES,
            composite=composite(),
            flush_interval=0,
            progress=False,
        )
    assert hooks_left(model) == 1  # only our counting hook
    with ActivationCache(tmp_path / "r.h5") as cache:
        assert cache.missing_ranges() == [(20, N_SAMPLES)]
    calls.clear()
    record_activations(
        model, loader(), LAYERS, tmp_path / "r.h5", n_samples=N_SAMPLES, composite=composite(), progress=False
    ).close()
    assert calls == [10, 10]  # complete batches are skipped
    reference = record_activations(
        model,
        loader(),
        LAYERS,
        tmp_path / "ref.h5",
        n_samples=N_SAMPLES,
        composite=composite(),
        progress=False,
    )
    with reference, ActivationCache(tmp_path / "r.h5") as cache:
        for name in LAYERS:
            assert torch.equal(cache.activations(name), reference.activations(name))
    # continuing the cache without the canonizers would mix different activations: refused
    with pytest.raises(ValueError, match="composite"):
        record_activations(model, loader(), LAYERS, tmp_path / "r.h5", n_samples=N_SAMPLES, progress=False)
    assert hooks_left(model) == 1


def test_record_activations_bad_input(tmp_path):
    model = make_model()
    x, _ = make_data(10)
    with pytest.raises(KeyError, match="not modules"):
        record_activations(model, [x], ["conv9"], tmp_path / "r.h5", n_samples=10)
    with pytest.raises(TypeError, match="n_samples"):
        record_activations(model, [x], ["conv1"], tmp_path / "r.h5")
    with pytest.raises(ValueError, match="more than"):
        record_activations(model, [x, x], ["conv1"], tmp_path / "r.h5", n_samples=10, progress=False)
    assert hooks_left(model) == 0


def test_pool_matches_definition():
    out = torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(pool(out, "mean"), out.mean((2, 3)))
    torch.testing.assert_close(pool(out, "sum"), out.sum((2, 3)))
    torch.testing.assert_close(pool(out, "max"), out.amax((2, 3)))
    flat = torch.randn(3, 4)
    assert pool(flat, "max") is flat
    torch.testing.assert_close(pool(out, lambda t: t[:, :, 0, 0]), out[:, :, 0, 0])
    with pytest.raises(ValueError):
        pool(out, "median")
    with pytest.raises(ValueError):
        pool(out, lambda t: t)


def test_labels_from_recorded_cache_equal_in_memory(recorded):
    from crp_invert import ConceptLabeler
    from crp_invert.core.concepts import ConceptLabels

    concepts = ConceptLabels.from_targets(recorded["y"].numpy(), ["a", "b", "c"])
    labeler = ConceptLabeler(concepts)
    for source in ("activation", "relevance"):
        from_cache = labeler.label_cache(recorded["cache"], source=source, L=2, B=2, progress=False)
        assert list(from_cache) == LAYERS
        with ActivationCache(recorded["cache"]) as cache:
            for name in LAYERS:
                tensor = cache.activations(name) if source == "activation" else cache.relevances(name)
                assert from_cache[name] == labeler.label(tensor.clone(), L=2, B=2, layer=name, progress=False)
    # relevance of the last layer w.r.t. the sample's own target is nonzero only in the target's logit
    with ActivationCache(recorded["cache"]) as cache:
        rel = cache.relevances("linear2")
        own = rel[torch.arange(N_SAMPLES), recorded["y"]]
        assert torch.equal(rel.abs().sum(1), own.abs())
