"""Recording during CRP's FeatureVisualization.run and with plain forward hooks.

Every expected value is computed independently: activations from forward hooks on the *un-canonized* model
(the BatchNorm output equals the merged convolution's output), relevances from direct CondAttribution calls,
CRP's files from a plain FeatureVisualization run.
"""

import signal
from pathlib import Path

import numpy as np
import pytest
import torch

crp = pytest.importorskip("crp")

from crp.attribution import CondAttribution  # noqa: E402
from crp.concepts import ChannelConcept  # noqa: E402
from crp.visualization import FeatureVisualization  # noqa: E402
from helpers import ListDataset, assert_same_crp_files, hooks_left  # noqa: E402
from kill_child import (  # noqa: E402  (the setup the killed children use too)
    BATCH,
    CHECKPOINT,
    LAYERS,
    N_SAMPLES,
    composite,
    layer_map,
    make_data,
    make_model,
    run_killed_child,
    watchdog,
)

from crp_invert.integration.recording import InvertFeatureVisualization, load_stat_targets, pool, record_activations  # noqa: E402
from crp_invert.storage.cache import ActivationCache  # noqa: E402

# module whose output (in the plain model) equals each recorded layer's output after BatchNorm merging
AFTER_BN = {
    "conv1": "bn1",
    "conv2": "bn2",
    "parallel.0": "parallel.1",
    "linear1": "linear1",
    "linear2": "linear2",
}


@pytest.fixture(autouse=True)
def _watchdog():
    """Every test here (each resume included) ends or fails with the stack of where it hangs."""
    with watchdog(600):
        yield


@pytest.fixture(autouse=True)
def _fast_gc(monkeypatch):
    # CRP calls gc.collect() after every save, which dominates the runtime of these tiny runs
    import crp.maximization
    import crp.statistics

    monkeypatch.setattr(crp.maximization.gc, "collect", lambda *a: 0)
    monkeypatch.setattr(crp.statistics.gc, "collect", lambda *a: 0)


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
    """The recorded cache holds the mapped layers, all samples complete, with pooling, concept, composite and
    fingerprint metadata."""
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
    """Cached activations equal an independent pooled forward pass, and the model is restored without hooks."""
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
    """Cached relevances equal CRP's CondAttribution with ChannelConcept."""
    expected = condattribution_relevances(recorded["model"], recorded["x"], recorded["y"])
    with ActivationCache(recorded["cache"]) as cache:
        for name in LAYERS:
            got = cache.relevances(name)
            assert got.abs().max() > 0
            torch.testing.assert_close(got, expected[name].float(), rtol=1e-5, atol=1e-7, msg=name)


def test_crp_files_unchanged_by_recording(recorded):
    """Recording leaves CRP's result files byte for byte those of plain CRP."""
    assert_same_crp_files(recorded["root"] / "fv", recorded["root"] / "plain")


def test_compute_stats_without_numpy_int(recorded):
    """compute_stats works on numpy 2 (no ``np.int``) without patching numpy, and equals a slow recomputation."""
    fv = recorded["fv"]
    path = fv.RelStats.PATH
    had_int = hasattr(np, "int")  # numpy < 1.24 still has the deprecated alias (the declared floor is 1.23)
    if not had_int:
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
    assert hasattr(np, "int") == had_int  # nothing was patched globally


def test_refuses_other_model_or_pooling(recorded, tmp_path):
    """Continuing a cache with another model, pooling or dataset length is refused and leaves the cache unchanged."""
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
    """Unknown layers and bad recording arguments are refused when the visualization is made."""
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
    """An interrupted run keeps its complete rows, and resuming gives the same cache as an uninterrupted run."""
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


@pytest.mark.slow
def test_killed_process_leaves_resumable_cache(recorded, tmp_path):
    """A child SIGKILLed in a batch leaves a cache whose complete rows are the finished batches; recording the
    missing range then equals an uninterrupted run."""
    proc = run_killed_child("batch", 2 * BATCH + 1, tmp_path / "fv", tmp_path / "acts.h5", checkpoint=100)
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
    # the collected run leaves nothing of ours in CRP's folder, and nothing to resume
    assert not (tmp_path / "fv" / ".crp-invert").exists()
    assert fv.resume(composite(), batch_size=BATCH) == {"r_max": [], "a_max": [], "r_stats": [], "a_stats": []}


# -- multi-target datasets -----------------------------------------------------------------------------------


def multitarget_to_single(self, multi_target):
    return [int(t) for t in np.flatnonzero(multi_target)]


class MultiFV(InvertFeatureVisualization):
    multitarget_to_single = multitarget_to_single


class PlainMultiFV(FeatureVisualization):
    multitarget_to_single = multitarget_to_single


def test_multitarget_dataset(tmp_path, caplog):
    """With several targets a sample, cached relevances are the sum over its targets and CRP's files equal plain
    CRP's."""
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
    """record_activations with mean, max and sum pooling equals an independent pooled forward pass."""
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
    """Without a composite, record_activations stores the plain layer outputs."""
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
    """An error in the loader removes record_activations' hooks, and a rerun continues where it stopped."""
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
    """record_activations refuses unknown layers, a missing n_samples and too many samples, leaving no hooks."""
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
    """pool's mean, sum, max and custom poolings equal their definitions; unknown or shape-keeping poolings are
    refused."""
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
    """Labels from the recorded cache equal labels of the same tensors in memory."""
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


# -- a drop-in for CRP's FeatureVisualization (issues 10, 12) ------------------------------------------------


def test_constructor_is_crps_plus_keyword_only_additions():
    """InvertFeatureVisualization takes FeatureVisualization's arguments plus keyword-only additions."""
    import inspect

    ours = list(inspect.signature(InvertFeatureVisualization.__init__).parameters.values())
    theirs = list(inspect.signature(FeatureVisualization.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])
    assert "activation_cache" in [p.name for p in ours[len(theirs) :]]
    assert InvertFeatureVisualization.__module__ == "crp_invert.integration.feature_visualization"
    assert issubclass(InvertFeatureVisualization, FeatureVisualization)


def grey_images(samples, heatmaps, rf):
    """A plot function for CRP's image cache: one grey-scale PIL image per heatmap. (The tutorial's
    vis_opaque_img makes palette images that PIL 13 cannot save under numpy 2, in plain CRP too.)"""
    from PIL import Image

    scaled = (heatmaps - heatmaps.amin()) / (heatmaps.amax() - heatmaps.amin() + 1e-12) * 255
    return [Image.fromarray(h.to(torch.uint8).numpy()) for h in scaled]


def test_crp_tutorial_arguments(tmp_path, monkeypatch):
    """Constructed and run exactly as CRP's README (positional, default path) and its feature-visualization
    tutorial (preprocess_fn, path, cache=ImageCache, run(composite, 0, n, 32, 100), get_max_reference)."""
    from crp.cache import ImageCache

    monkeypatch.chdir(tmp_path)
    model = make_model()
    x, y = make_data(20)
    dataset = ListDataset(x, y)

    def preprocessing(batch):
        return batch * 2.0

    # README: FeatureVisualization(attribution, dataset, layer_map); fv.run(composite, 0, len(dataset))
    fv = InvertFeatureVisualization(CondAttribution(model), dataset, layer_map())
    fv.run(composite(), 0, len(dataset))
    plain = FeatureVisualization(CondAttribution(model), dataset, layer_map(), path="plain")
    plain.run(composite(), 0, len(dataset))
    for sub in ("RelMax_sum_normed", "ActMax_sum_normed", "RelStats_sum_normed", "ActStats_sum_normed"):
        assert_same_crp_files(tmp_path / "FeatureVisualization" / sub, tmp_path / "plain" / sub)
    with ActivationCache(tmp_path / "FeatureVisualization" / "activations.h5") as cache:  # the default place
        assert cache.is_complete() and cache.layers == LAYERS

    # tutorial: keyword arguments, CRP's image cache as cache=, run with positional batch size and checkpoint
    images = {}
    for name, cls in (("ours", InvertFeatureVisualization), ("theirs", FeatureVisualization)):
        image_cache = ImageCache(path=str(tmp_path / f"{name}-images"))
        fv = cls(CondAttribution(model), dataset, layer_map(), preprocess_fn=preprocessing,
                 path=str(tmp_path / name), cache=image_cache)
        assert fv.Cache is image_cache
        fv.run(composite(), 0, len(dataset), 32, 100)
        refs = fv.get_max_reference([0, 1], "conv2", "relevance", (0, 4), composite=composite(),
                                    plot_fn=grey_images)
        images[name] = {c: [np.asarray(img) for img in imgs] for c, imgs in refs.items()}
        assert sorted(p.name for p in (tmp_path / f"{name}-images").rglob("*.png"))  # the image cache was used
    assert images["ours"].keys() == images["theirs"].keys()
    for c in images["ours"]:
        assert all(np.array_equal(a, b) for a, b in zip(images["ours"][c], images["theirs"][c], strict=True))
    with ActivationCache(tmp_path / "ours" / "activations.h5") as cache:
        expected = independent_pooled(model, preprocessing(x))
        torch.testing.assert_close(cache.activations("conv2").double(), expected["conv2"], rtol=1e-4, atol=1e-5)


def test_activation_cache_passed_as_cache_still_works(tmp_path):
    """The old cache= spelling still works with a DeprecationWarning, and giving both spellings is refused."""
    model = make_model()
    x, y = make_data(16)
    with pytest.warns(DeprecationWarning, match="activation_cache"):
        fv = InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y), layer_map(),
                                        path=str(tmp_path / "fv"), cache=tmp_path / "old.h5")
    assert fv.Cache is None and fv.activation_cache == tmp_path / "old.h5"
    fv.run(composite(), 0, 16, batch_size=8)
    with ActivationCache(tmp_path / "old.h5") as cache:
        assert cache.is_complete()
    with pytest.raises(TypeError, match="activation_cache"):
        InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y), layer_map(), path=str(tmp_path),
                                   cache=tmp_path / "a.h5", activation_cache=tmp_path / "b.h5")


class FailingRelevance(Exception):
    pass


def _fail_in_backward_of_batch(fv, batch):
    """Make CRP's backward hook raise in the given batch (counted from 0)."""
    seen = {"n": 0}
    analyze = fv.analyze_relevance

    def failing(rel, layer_name, *args):
        if layer_name == "linear2":
            seen["n"] += 1
        if seen["n"] > batch:
            raise FailingRelevance("stop")
        return analyze(rel, layer_name, *args)

    fv.analyze_relevance = failing


def test_error_inside_crps_loop_leaves_the_model_as_it_was(tmp_path):
    """An error inside CRP's loop leaves the model's parameters, buffers, attributes and hooks as they were (plain CRP
    does not)."""
    model = make_model()
    params = {name: p for name, p in model.named_parameters()}
    data = {name: p.data.clone() for name, p in model.state_dict().items()}
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    x, y = make_data(24)
    fv = InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y), layer_map(),
                                    path=str(tmp_path / "fv"), activation_cache=tmp_path / "a.h5", flush_interval=0)
    _fail_in_backward_of_batch(fv, 1)
    with pytest.raises(FailingRelevance):
        fv.run(composite(), 0, 24, batch_size=8)
    assert hooks_left(model) == 0
    assert {name: p for name, p in model.named_parameters()} == params  # no bias added to a conv, no copies
    assert all(torch.equal(data[name], t) for name, t in model.state_dict().items())  # BatchNorms un-merged
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    with ActivationCache(tmp_path / "a.h5") as cache:
        assert cache.missing_ranges() == [(8, 24)]  # the first batch was kept, the failing one dropped
    # the same failure in plain CRP leaves its hooks and the merged BatchNorms behind: what the guard is for
    plain_model = make_model()

    class Plain(FeatureVisualization):
        pass

    plain = Plain(CondAttribution(plain_model), ListDataset(x, y), layer_map(), path=str(tmp_path / "plain"))
    _fail_in_backward_of_batch(plain, 1)
    with pytest.raises(FailingRelevance):
        plain.run(composite(), 0, 24, batch_size=8)
    assert hooks_left(plain_model) > 0
    assert not torch.equal(plain_model.state_dict()["bn1.running_var"], data["bn1.running_var"])


def test_crp_progress_bars_are_named(tmp_path, capsys):
    """CRP's progress bars are named after the work they show, and progress=False shows none."""
    import crp.maximization
    import crp.statistics
    import crp.visualization
    from crp.cache import ImageCache
    from tqdm import tqdm

    model = make_model()
    x, y = make_data(16)
    fv = InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y), layer_map(),
                                    path=str(tmp_path / "fv"), activation_cache=tmp_path / "a.h5")
    capsys.readouterr()
    fv.run(composite(), 0, 16, batch_size=8)
    bars = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "|" in line]
    assert bars
    names = {bar.split(":")[0] for bar in bars}
    assert names == {"CRP FeatureVisualization + recording", "collecting CRP results"}, bars
    assert crp.visualization.tqdm is tqdm and crp.maximization.tqdm is tqdm and crp.statistics.tqdm is tqdm
    fv.Cache = ImageCache(path=str(tmp_path / "images"))
    fv.precompute_ref({"conv2": [0, 1]}, composite(), rf=False, plot_list=[grey_images])
    bars = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "|" in line]
    assert bars and {bar.split(":")[0] for bar in bars} == {"precomputing reference images"}, bars
    assert crp.visualization.tqdm is tqdm
    fv = InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y), layer_map(),
                                    path=str(tmp_path / "quiet"), activation_cache=tmp_path / "b.h5", progress=False)
    fv.run(composite(), 0, 16, batch_size=8)
    assert "|" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["/tmp/escape", "a/../../escape", "..", "..\\escape", "C:escape", "a\x00b"])
def test_layer_names_that_leave_the_output_folder_are_refused(tmp_path, name):
    """Layer names that would write outside the output folder are refused before anything is written."""
    model = make_model()
    model._modules[name] = torch.nn.Identity()  # torch's add_module refuses some of these names, a dict does not
    x, y = make_data(8)
    with pytest.raises(ValueError, match="outside"):
        InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y), {name: ChannelConcept()},
                                   path=str(tmp_path / "fv"), activation_cache=tmp_path / "a.h5")
    assert not (tmp_path / "fv").exists() and not (tmp_path / "a.h5").exists()


def test_layer_names_inside_the_output_folder_are_accepted():
    """Layer names that stay inside the output folder are accepted."""
    from crp_invert.integration.feature_visualization import check_layer_names

    check_layer_names(["features.0", "layer4.1.relu", "a/b", "x..y", ""])


# -- rows belong to the right samples (issue 11, item 4) -----------------------------------------------------


class ListSampler(torch.utils.data.Sampler):
    def __init__(self, order):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


@pytest.mark.parametrize(
    "make_loader",
    [
        lambda ds: torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True),
        lambda ds: torch.utils.data.DataLoader(ds, batch_size=4, sampler=torch.utils.data.SubsetRandomSampler(
            range(len(ds)))),
        lambda ds: torch.utils.data.DataLoader(ds, batch_size=4, sampler=ListSampler(range(0, len(ds), 2))),
        lambda ds: torch.utils.data.DataLoader(ds, batch_size=4, sampler=ListSampler([0, 0, *range(1, len(ds))])),
        lambda ds: torch.utils.data.DataLoader(ds, batch_sampler=[[0, 1], [3, 2], *[[i] for i in range(4, len(ds))]]),
    ],
    ids=["shuffle", "subset-random", "skips", "repeats", "batch-sampler-out-of-order"],
)
def test_record_activations_refuses_loaders_out_of_dataset_order(tmp_path, make_loader):
    """record_activations refuses loaders that do not yield the dataset in order, writing no file."""
    model = make_model()
    x, y = make_data(12)
    loader = make_loader(torch.utils.data.TensorDataset(x, y))
    with pytest.raises(ValueError, match="order"):
        record_activations(model, loader, ["conv1"], tmp_path / "r.h5", progress=False)
    assert not (tmp_path / "r.h5").exists()


def test_record_activations_accepts_sequential_loaders(tmp_path):
    """record_activations accepts sequential loaders (default, sequential sampler, drop_last) and records their rows."""
    model = make_model()
    x, y = make_data(12)
    dataset = torch.utils.data.TensorDataset(x, y)
    expected = independent_pooled(model, x)["linear1"]
    loaders = {
        "default": torch.utils.data.DataLoader(dataset, batch_size=5),
        "sampler": torch.utils.data.DataLoader(dataset, batch_size=5, sampler=ListSampler(range(12))),
        "drop_last": torch.utils.data.DataLoader(dataset, batch_size=5, drop_last=True),
    }
    for name, loader in loaders.items():
        with record_activations(model, loader, ["linear1"], tmp_path / f"{name}.h5", progress=False) as cache:
            complete = cache.complete()
            assert complete.sum() == (10 if name == "drop_last" else 12)
            torch.testing.assert_close(cache.activations("linear1")[complete].double(), expected[complete])


def test_record_activations_refuses_to_continue_with_other_data(tmp_path):
    """Continuing a recording with other data is refused and leaves the cached rows unchanged."""
    model = make_model()
    x, y = make_data(12)
    other = x.clone()
    other[0] += 1  # another first sample (e.g. other preprocessing)
    record_activations(model, [x[:6]], ["conv1"], tmp_path / "r.h5", n_samples=12, progress=False).close()
    with ActivationCache(tmp_path / "r.h5") as cache:
        before = cache.activations("conv1")
        assert len(cache.info("conv1")["data_hash"]) == 64
    with pytest.raises(ValueError, match="other data"):
        record_activations(model, [other[:6], other[6:]], ["conv1"], tmp_path / "r.h5", n_samples=12, progress=False)
    with ActivationCache(tmp_path / "r.h5") as cache:
        torch.testing.assert_close(cache.activations("conv1"), before, equal_nan=True, rtol=0, atol=0)
        assert cache.missing_ranges() == [(6, 12)]
    # the same data continue the file
    record_activations(model, [x[:6], x[6:]], ["conv1"], tmp_path / "r.h5", n_samples=12, progress=False).close()
    with ActivationCache(tmp_path / "r.h5") as cache:
        assert cache.is_complete()


def test_resume_refuses_other_dataset_preprocessing_or_weights(tmp_path):
    """Resuming with another dataset, targets, preprocessing or weights is refused; the same inputs resume."""
    model = make_model()
    x, y = make_data(24)
    armed = {"on": True}

    def interrupt(index):
        if armed["on"] and index == 9:
            raise Interrupt("stop")

    def make(dataset, model=model, **kwargs):
        return InvertFeatureVisualization(CondAttribution(model), dataset, layer_map(), path=str(tmp_path / "fv"),
                                          activation_cache=tmp_path / "a.h5", flush_interval=0, **kwargs)

    with pytest.raises(Interrupt):
        make(ListDataset(x, y, interrupt)).run(composite(), 0, 24, batch_size=8)
    other_x = x.clone()
    other_x[0] *= -1
    attempts = {
        "dataset": lambda: make(ListDataset(other_x, y)),
        "targets": lambda: make(ListDataset(x, (y + 1) % 3)),
        "preprocessing values": lambda: make(ListDataset(x, y), preprocess_fn=lambda t: t * 2),
        "preprocessing function": lambda: make(ListDataset(x, y), preprocess_fn=torch.clone),
        "weights": lambda: make(ListDataset(x, y), model=make_model(seed=3)),
    }
    for what, build in attempts.items():
        with pytest.raises(ValueError, match="other data|preprocessing|model_hash"):
            build().resume(composite(), batch_size=8)
        with ActivationCache(tmp_path / "a.h5") as cache:
            assert cache.missing_ranges() == [(8, 24)], what
    make(ListDataset(x, y)).resume(composite(), batch_size=8)
    with ActivationCache(tmp_path / "a.h5") as cache:
        assert cache.is_complete()


def test_caches_without_data_fingerprint_are_continued(tmp_path, caplog):
    """Caches written before the data fingerprint existed keep working (with a warning)."""
    import h5py

    model = make_model()
    x, _ = make_data(12)
    record_activations(model, [x[:6]], ["conv1"], tmp_path / "r.h5", n_samples=12, progress=False).close()
    with h5py.File(tmp_path / "r.h5", "r+") as file:
        for group in file["layers"].values():
            del group.attrs["data_hash"]
    with caplog.at_level("WARNING"):
        record_activations(model, [x[:6], x[6:]], ["conv1"], tmp_path / "r.h5", n_samples=12, progress=False).close()
    assert "without a fingerprint of the data" in caplog.text
    with ActivationCache(tmp_path / "r.h5") as cache:
        assert cache.is_complete() and "data_hash" not in cache.info("conv1")




# -- kills at every stage (issues 11 and 18) --------------------------------------------------------------------

# (point, n): the n-th call at that point is killed (see kill_child.POINTS); the collect points cover the first
# and third file each of CRP's result objects reads and writes (data.npy, rel.npy), and the targets files
KILL_POINTS = [
    ("batch", 3 * BATCH + 1),  # after the first checkpoint, before the second
    ("batch", BATCH + 1),  # before any checkpoint
    ("checkpoint-save", 7),
    ("commit", 2),
    ("flush", 3),
    ("after-collect", 1),
    ("collect-deletions", 1),
    ("collect-targets:r_stats", 1),
    ("collect-targets:a_stats", 1),
] + [(f"collect-{what}:{kind}", n) for kind in ("r_max", "a_max", "r_stats", "a_stats")
     for what in ("load", "save") for n in (1, 3)]


def resume_and_compare(tmp_path, reference, n_samples=N_SAMPLES, expect_collect=True):
    """Resume in this process (under the test's watchdog) and compare cache and CRP's files with ``reference``."""
    model = make_model()
    x, y = make_data(n_samples)
    fv = InvertFeatureVisualization(CondAttribution(model), ListDataset(x, y), layer_map(), path=str(tmp_path / "fv"),
                                    activation_cache=tmp_path / "acts.h5", progress=False)
    saved = fv.resume(composite(), batch_size=BATCH, checkpoint=CHECKPOINT)  # under the test's watchdog
    assert sorted(saved) == ["a_max", "a_stats", "r_max", "r_stats"]
    assert bool(saved["r_max"]) == expect_collect
    with ActivationCache(tmp_path / "acts.h5") as cache, ActivationCache(reference["cache"]) as full:
        assert cache.is_complete()
        for name in LAYERS:
            assert torch.equal(cache.activations(name), full.activations(name))
            assert torch.equal(cache.relevances(name), full.relevances(name))
    assert_same_crp_files(tmp_path / "fv", reference["root"] / "fv")  # also: nothing of ours left in CRP's folder
    assert fv.resume(composite(), batch_size=BATCH, checkpoint=CHECKPOINT) == {k: [] for k in saved}
    assert hooks_left(model) == 0


@pytest.mark.slow
@pytest.mark.parametrize("point,n", KILL_POINTS)
def test_kill_at_any_point_then_resume_equals_an_uninterrupted_run(recorded, tmp_path, point, n):
    """A child SIGKILLed at each stage of a run and of CRP's collect resumes to the files of an uninterrupted run."""
    proc = run_killed_child(point, n, tmp_path / "fv", tmp_path / "acts.h5")
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-500:] + proc.stderr[-3000:]
    resume_and_compare(tmp_path, recorded, expect_collect=point != "collect-deletions")  # there, only deleting was left


@pytest.fixture(scope="module")
def recorded_32(tmp_path_factory):
    """An uninterrupted run over 32 samples: 4 batches, so CRP's last checkpoint holds no sample."""
    import crp.maximization
    import crp.statistics

    root = tmp_path_factory.mktemp("recorded32")
    x, y = make_data(32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crp.maximization.gc, "collect", lambda *a: 0)
        mp.setattr(crp.statistics.gc, "collect", lambda *a: 0)
        fv = InvertFeatureVisualization(CondAttribution(make_model()), ListDataset(x, y), layer_map(),
                                        path=str(root / "fv"), activation_cache=root / "acts.h5", progress=False)
        fv.run(composite(), 0, 32, batch_size=BATCH, checkpoint=CHECKPOINT)
    return {"root": root, "cache": root / "acts.h5"}


@pytest.mark.slow
@pytest.mark.parametrize("point,n", [("collect-load:a_max", 1), ("collect-targets:a_stats", 1), ("after-collect", 1)])
def test_kill_in_collect_when_the_last_checkpoint_is_empty_resumes(recorded_32, tmp_path, point, n):
    """The hang of issue 18: a kill in the collect of a run whose batches end on a checkpoint (an empty last
    checkpoint is logged) resumes, under a watchdog, to the files of an uninterrupted run."""
    proc = run_killed_child(point, n, tmp_path / "fv", tmp_path / "acts.h5", n_samples=32)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-500:] + proc.stderr[-3000:]
    resume_and_compare(tmp_path, recorded_32, n_samples=32)


@pytest.mark.slow
def test_kill_before_every_file_of_the_collect_resumes_to_an_uninterrupted_run(tmp_path):
    """Every file CRP's collect reads or writes (RelMax, ActMax, RelStats, ActStats; data, rf, rel, targets):
    the files on disk right before it (what a SIGKILL there leaves: a killed process loses only its memory) resume
    to the files of an uninterrupted run. Two layers and 32 samples (an empty last checkpoint) keep it short."""
    import shutil
    import types

    import crp.maximization
    import crp.statistics

    x, y = make_data(32)
    layers = ["conv2", "linear2"]

    def fv_at(folder):
        return InvertFeatureVisualization(CondAttribution(make_model()), ListDataset(x, y),
                                          {name: ChannelConcept() for name in layers}, path=str(folder / "fv"),
                                          activation_cache=folder / "acts.h5", progress=False)

    fv_at(tmp_path / "reference").run(composite(), 0, 32, batch_size=BATCH, checkpoint=CHECKPOINT)
    run = tmp_path / "run"
    fv = fv_at(run)
    checkpoints = fv.run_distributed(composite(), 0, 32, batch_size=BATCH, checkpoint=CHECKPOINT)
    snapshots = []

    def snapshotting(function):
        def wrapper(*args, **kwargs):
            snapshot = tmp_path / f"kill{len(snapshots)}"
            shutil.copytree(run, snapshot)
            snapshots.append((snapshot, function.__name__, Path(str(args[0])).name))
            return function(*args, **kwargs)
        return wrapper

    patched = types.SimpleNamespace(**{**vars(np), "save": snapshotting(np.save), "load": snapshotting(np.load)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crp.maximization, "np", patched)
        mp.setattr(crp.statistics, "np", patched)
        fv.collect_results(checkpoints)
    assert_same_crp_files(run / "fv", tmp_path / "reference" / "fv")
    files = {name for _, _, name in snapshots}
    assert any(name.endswith("targets.npy") for name in files) and len(snapshots) > 100
    for snapshot, operation, name in snapshots:
        saved = fv_at(snapshot).resume(composite(), batch_size=BATCH, checkpoint=CHECKPOINT)
        assert saved["r_max"], (operation, name)
        assert_same_crp_files(snapshot / "fv", tmp_path / "reference" / "fv")
        with ActivationCache(snapshot / "acts.h5") as cache, \
                ActivationCache(tmp_path / "reference" / "acts.h5") as full:
            for layer in layers:
                assert torch.equal(cache.activations(layer), full.activations(layer))
                assert torch.equal(cache.relevances(layer), full.relevances(layer))
        shutil.rmtree(snapshot)
