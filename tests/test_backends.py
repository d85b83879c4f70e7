"""The device (torch) kernels against the CPU (numpy / scipy) kernels and the exactness suite.

``backend="torch"`` runs on CPU tensors the code a GPU runs, so every device branch executes here without a
GPU. Each case runs for (cpu, auto), (cpu, torch) and, marked ``cuda`` (``pytest -m cuda``; skipped without
a GPU), for (cuda, auto): formulas, AUCs and p-values must equal the slow reference, sklearn, scipy and
exhaustive enumeration, and the backends must agree bit for bit.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import random_case
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score
from slow_invert import all_formulas, slow_auc, slow_beam_search

from crp_invert import ConceptLabeler, ConceptLabels, SearchParams
from crp_invert.cli import main
from crp_invert.core.backend import BACKENDS, check_backend, device_kernels
from crp_invert.core.labeling import label_array
from crp_invert.core.metrics import compact_ranks
from crp_invert.core.search import beam_search, prepare_labels
from crp_invert.find import find_channels, mask_rank_sums

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# (device, backend): the CPU kernels, the device kernels forced on the CPU, and a real GPU
TARGETS = [
    pytest.param(("cpu", "auto"), id="cpu-auto"),
    pytest.param(("cpu", "torch"), id="cpu-torch"),
    pytest.param(("cuda", "auto"), id="cuda", marks=[pytest.mark.cuda, CUDA]),
]
SETTINGS = [
    dict(L=3, B=3),
    dict(L=2, B=2, mode="negative"),
    dict(L=3, B=4, limit_search=3, min_fraction=0.1, max_fraction=0.7),
    dict(L=4, B=2, max_fraction=1.0),
]


@pytest.fixture(params=["lists", "dense"])
def algorithm(request, monkeypatch):
    """The statistics of phi AND c from sample lists or from dense products (both exact; chosen by size)."""
    import crp_invert.core.search as search

    dense = request.param == "dense"
    monkeypatch.setattr(search, "_prefer_dense", lambda prepared, max_length: dense and prepared.dense_t is not None)
    return request.param


def assert_same_labels(result, reference, target):
    """Identical formulas, AUCs, fractions and counts; p-values identical on the CPU, to 1e-12 on a GPU (its
    erfc may differ from the CPU's in the last bits)."""
    def rows(labels):
        return [[(e.formula, e.auc, e.fraction, e.n_candidates, e.validation_auc, e.validation_fraction)
                 for e in beam] for beam in labels]

    assert rows(result) == rows(reference)
    p_values = [e.p_value for beam in result for e in beam]
    expected = [e.p_value for beam in reference for e in beam]
    if target[0] == "cpu":
        assert p_values == expected
        assert result == reference
    else:
        assert p_values == pytest.approx(expected, rel=1e-12, abs=0)


def labeler(concepts, target):
    device, backend = target
    return ConceptLabeler(concepts, device=device, backend=backend)


def test_backend_names_are_checked():
    """Unknown backends raise ValueError naming them; auto picks the device kernels off the CPU only."""
    assert BACKENDS == ("auto", "torch")
    assert device_kernels("cpu") is False and device_kernels("cpu", "torch") is True
    assert device_kernels(torch.device("cuda:1")) is True and device_kernels(None) is False
    for bad in ("numpy", "", None, 1):
        with pytest.raises(ValueError, match="backend must be one of"):
            check_backend(bad)
    with pytest.raises(ValueError, match="'gpu'"):
        ConceptLabeler(ConceptLabels(np.eye(3, dtype=bool), ["a", "b", "c"]), backend="gpu")
    assert "backend='torch'" in repr(ConceptLabeler(ConceptLabels(np.eye(3, dtype=bool), list("abc")),
                                                    backend="torch"))


def test_torch_backend_prepares_no_scipy_matrix():
    """The torch backend keeps no scipy matrix, so the concepts' rank sums take the sparse product."""
    concepts = ConceptLabels(np.eye(4, dtype=bool), list("abcd"))
    assert prepare_labels(concepts.torch_sparse_t("cpu")).by_sample is not None
    assert prepare_labels(concepts.torch_sparse_t("cpu"), "torch").by_sample is None


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kwargs", SETTINGS)
@pytest.mark.parametrize("seed", range(4))
def test_equals_slow_reference(target, kwargs, seed, algorithm):
    """Formulas and AUCs (bit for bit) equal the slow per-candidate search; p-values equal scipy's."""
    labels, scores, names = random_case(seed)
    result = labeler(ConceptLabels(labels, names), target).label(scores, progress=False, **kwargs)
    alternative = "greater" if kwargs.get("mode", "positive") == "positive" else "less"
    for f in range(scores.shape[1]):
        slow = slow_beam_search(scores[:, f], labels, names, **kwargs)
        assert [e.formula for e in result[f]] == [s[0] for s in slow]
        assert [e.auc for e in result[f]] == [s[1] for s in slow]
        for e in result[f]:
            mask = e.formula.evaluate(ConceptLabels(labels, names)).numpy().reshape(-1)
            expected = mannwhitneyu(scores[mask, f], scores[~mask, f], alternative=alternative,
                                    method="asymptotic").pvalue
            assert e.p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("seed", range(3))
def test_wide_beam_finds_the_exhaustive_optimum(target, seed, algorithm):
    """A beam holding every formula finds the best AUC of all formulas up to length 3, each scored right."""
    labels, scores, names = random_case(seed, k=4)
    space = all_formulas(labels, names, 3)
    result = labeler(ConceptLabels(labels, names), target).label(scores, L=3, B=len(space), progress=False)
    for f in range(scores.shape[1]):
        aucs = {formula: slow_auc(scores[:, f], mask) for formula, mask in space.items()}
        assert result[f][0].auc == pytest.approx(max(aucs.values()), abs=1e-12)
        for e in result[f][:20]:
            assert e.auc == pytest.approx(aucs[e.formula], abs=1e-12)


@pytest.mark.parametrize("target", TARGETS[1:])
@pytest.mark.parametrize("kwargs", [dict(L=3, B=3, validation=0.3, memorize_states=True),
                                    dict(L=2, B=3, mode="negative", feature_batch_size=2)])
def test_backends_give_identical_labels(target, kwargs, algorithm):
    """The device kernels give the CPU kernels' labels bit for bit (validation, states, batches included)."""
    labels, scores, names = random_case(7, n=400, k=6, f=7)
    concepts = ConceptLabels(labels, names)
    reference = ConceptLabeler(concepts).label(scores, progress=False, **kwargs)
    result = labeler(concepts, target).label(torch.from_numpy(scores).float(), progress=False, **kwargs)
    assert_same_labels(result, reference, target)
    if "validation" in kwargs:
        for step in range(3):
            assert [[(s.formula, s.auc) for s in b] for b in result.states[step]] == \
                [[(s.formula, s.auc) for s in b] for b in reference.states[step]]


@pytest.mark.parametrize("target", TARGETS)
def test_small_working_memory_and_unpacked_sums_agree(target, monkeypatch, algorithm):
    """Chunked searches (tiny working memory) and unpacked sums give the one-chunk labels."""
    import crp_invert.core.search as search

    labels, scores, names = random_case(9, n=300, k=5, f=9)
    concepts = ConceptLabels(labels, names)
    reference = ConceptLabeler(concepts).label(scores, L=3, B=3, progress=False)
    device, backend = target
    params = SearchParams(L=3, B=3)
    small = label_array(torch.from_numpy(scores), concepts, params, device=device, backend=backend,
                        memory_bytes=600_000, progress=False)
    assert_same_labels(small, reference, target)
    monkeypatch.setattr(search, "_MAX_PACKED_SAMPLES", 10)
    assert_same_labels(labeler(concepts, target).label(scores, L=3, B=3, progress=False), reference, target)


@pytest.mark.parametrize("target", TARGETS)
def test_beam_search_on_raw_scores(target):
    """beam_search ranks raw scores and prepares raw labels with the chosen kernels; same beams."""
    labels, scores, names = random_case(11, n=200, k=5, f=6)
    device, backend = target
    labels_t = ConceptLabels(labels, names).torch_sparse_t(device)
    raw = beam_search(torch.from_numpy(scores).to(device), labels_t, L=3, B=3, backend=backend)
    ranked = compact_ranks(torch.from_numpy(scores), backend="auto")
    reference = beam_search(ranked, prepare_labels(ConceptLabels(labels, names).torch_sparse_t("cpu")), L=3, B=3)
    assert torch.equal(raw.beam.primitives, reference.beam.primitives)
    assert torch.equal(raw.beam.auc, reference.beam.auc)
    assert torch.equal(raw.tie_term, reference.tie_term)
    if device == "cpu":
        assert torch.equal(raw.p_value, reference.p_value)
    torch.testing.assert_close(raw.p_value, reference.p_value, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("target", TARGETS)
def test_find_channels_equals_sklearn(target, make_cache):
    """find_channels from a cache: AUCs equal sklearn's, p-values scipy's, on every backend and device."""
    labels, scores, names = random_case(5, n=250, k=4, f=6)
    concepts = ConceptLabels(labels, names)
    path = make_cache({"conv": scores.astype(np.float32)})
    device, backend = target
    found = find_channels("c0 AND NOT c1", path, concepts, device=device, backend=backend, feature_batch_size=4)
    mask = labels[:, 0] & ~labels[:, 1]
    values = scores.astype(np.float32).astype(np.float64)
    for match in found.matches:
        assert match.auc == pytest.approx(roc_auc_score(mask, values[:, match.channel]), abs=1e-12)
        expected = mannwhitneyu(values[mask, match.channel], values[~mask, match.channel],
                                alternative="greater", method="asymptotic").pvalue
        assert match.p_value == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="backend"):
        find_channels("c0", path, concepts, backend="cuda")


def test_mask_rank_sums_backends_agree():
    """The numpy and the torch kernel of find give the same rank sums and tie terms, bit for bit."""
    rng = np.random.default_rng(2)
    block = torch.from_numpy(np.maximum(rng.normal(size=(500, 5)), 0).round(1))
    for share in (0.2, 0.8):
        mask = torch.from_numpy(rng.random(500) < share)
        auto, device = mask_rank_sums(block, mask), mask_rank_sums(block, mask, "torch")
        assert torch.equal(auto.ranks, device.ranks) and torch.equal(auto.tie_term, device.tie_term)


def test_cli_backend_torch_writes_the_same_labels(tmp_path, make_cache):
    """crp-invert label --backend torch writes the labels of the default backend."""
    labels, scores, names = random_case(3, n=200, k=4, f=5)
    path = make_cache({"fc": scores.astype(np.float32)})
    ConceptLabels(labels, names).save(tmp_path / "concepts.npz")
    outputs = {}
    for backend in BACKENDS:
        out = tmp_path / f"{backend}.json"
        result = CliRunner().invoke(main, ["label", str(path), str(tmp_path / "concepts.npz"), "--backend", backend,
                                           "-q", "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs[backend] = json.loads(out.read_text())
    assert outputs["auto"]["features"] == outputs["torch"]["features"]
    result = CliRunner().invoke(main, ["label", str(path), str(tmp_path / "concepts.npz"), "--backend", "gpu"])
    assert result.exit_code != 0 and "gpu" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["default", "negative", "wide", "limited", "validation"])
def test_bench_exact_cases_agree(setting):
    """bench_exact.py's settings on a small synthetic ImageNet-like layer: both backends, identical labels."""
    sys.path.insert(0, str(BENCHMARKS))
    import bench_exact
    import synthetic

    concepts, _ = synthetic.concept_labels(3000, seed=2)
    activations = synthetic.activations(concepts, 6, seed=3)
    kwargs = dict(bench_exact.SETTINGS[setting], progress=False)
    reference = ConceptLabeler(concepts).label(activations, **kwargs)
    assert ConceptLabeler(concepts, backend="torch").label(activations, **kwargs) == reference


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_json(tmp_path):
    """benchmarks/gpu_check.py --device cpu runs every section (small sizes) and writes one JSON of figures."""
    import subprocess

    out = tmp_path / "check.json"
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--out", str(out),
                                "--fashion-mnist", str(tmp_path / "missing")],
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert list(sections) == ["environment", "imagenet_labeling", "synthetic_equality", "pytest_cuda",
                              "fashion_mnist", "glocal"]
    assert report["torch"] == torch.__version__ and report["failed_sections"] == []
    assert sections["fashion_mnist"]["status"] == "skipped" and "missing" in sections["fashion_mnist"]["skipped"]
    for name in ("environment", "imagenet_labeling", "synthetic_equality", "pytest_cuda", "glocal"):
        assert sections[name]["status"] == "ok", sections[name]
    labeling = sections["imagenet_labeling"]
    assert labeling["features"] == 12 and labeling["all_seconds"] > 0 and labeling["budget_16gib_identical"]
    for case in ("default", "negative_validation", "find_channels"):
        assert sections["synthetic_equality"][case]["identical"] is True
    assert sections["pytest_cuda"]["tests_skipped"] > 0 and "tests_failed" not in sections["pytest_cuda"]
    assert sections["glocal"]["heatmap_max_rel_diff"] < 1e-5 and sections["glocal"]["same_channels"]
    assert "wrote" in completed.stdout


class _ReadColumns:
    """An [N, F] array-like whose column reads allocate a torch copy, as reading a file does."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.shape, self.dtype = data, tuple(data.shape), data.dtype

    def __getitem__(self, key):
        return self.data[key].clone()


def torch_peak_bytes(fn) -> int:
    """The peak of the bytes held by torch's CPU allocator while ``fn()`` runs, from every allocation and free
    the profiler records (``profile_memory``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    held = peak = 0
    for _, size in events:
        held += size
        peak = max(peak, held)
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("free_gb", [16, 80])
def test_gpu_batch_plan_matches_the_torch_allocations(free_gb, monkeypatch):
    """The feature-batch plan of a 16 / 80 GB GPU (simulated free memory) at N = 1.28 M, K = 1,481, and its
    miniature (N, K and the budget / 128: the same batch) allocates within 10 % of the plan on the CPU (scores
    without ties: the plan is the worst case; ties make ranking take less)."""
    import crp_invert.core.search as search
    from crp_invert.core.search import SearchMemory, default_memory_budget

    monkeypatch.setattr(search, "available_memory", lambda device=None: free_gb * 10 ** 9)
    budget = default_memory_budget("cuda")
    assert budget == min(4 << 30, free_gb * 10 ** 9 // 4)
    plan = SearchMemory(1_280_000, 1481, B=3, L=3)
    batch = plan.feature_batch(budget, itemsize=4)
    plan_bytes = batch * plan.feature_bytes(4) + plan.working_memory(budget)
    assert 0.97 * budget <= plan_bytes <= budget and 280 <= batch <= 400
    # the miniature: every term of the plan scales with N or K, so the batch stays the same
    small = SearchMemory(10_000, 12, B=3, L=3)
    small_budget = budget // 128
    assert abs(small.feature_batch(small_budget, 4) - batch) <= 0.02 * batch
    small_batch = small.feature_batch(small_budget, 4)
    predicted = small_batch * small.feature_bytes(4) + small.working_memory(small_budget)
    rng = np.random.default_rng(free_gb)
    concepts = ConceptLabels(rng.random((10_000, 12)) < rng.uniform(0.02, 0.3, size=12), [f"c{i}" for i in range(12)])
    scores = torch.from_numpy(rng.normal(size=(10_000, small_batch)).astype(np.float32))
    prepared = prepare_labels(concepts.torch_sparse_t("cpu"), "torch")
    measured = torch_peak_bytes(lambda: label_array(
        _ReadColumns(scores), concepts, SearchParams(L=3, B=3), backend="torch", memory_bytes=small_budget,
        prepared=prepared, progress=False))
    assert abs(measured - predicted) <= 0.10 * measured, (measured, predicted)


def test_gpu_free_memory_sets_the_default_budget(monkeypatch):
    """On a CUDA device the budget is a quarter of the GPU's free memory (torch.cuda.mem_get_info), capped at 4 GiB."""
    from crp_invert.core.search import available_memory, default_memory_budget, memory_limit

    for free in (2 * 10 ** 9, 16 * 10 ** 9, 80 * 10 ** 9):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 2 * free))
        assert available_memory("cuda") == free
        assert default_memory_budget("cuda:0") == min(4 << 30, free // 4)
        assert memory_limit("cuda") == max(min(4 << 30, free // 4), free // 2)


def test_dense_products_are_chosen_for_small_label_matrices():
    """Dense products for FashionMNIST-sized labels (N 5,000, K 14), sample lists for ImageNet-like ones."""
    from crp_invert.core.search import _prefer_dense

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, size=5000)
    small = ConceptLabels.from_targets(targets, [f"class{i}" for i in range(10)],
                                       hierarchy={"a": ["class0", "class1"], "b": ["class2", "class3", "class4"]})
    assert _prefer_dense(prepare_labels(small.torch_sparse_t("cpu")), 3)
    sys.path.insert(0, str(BENCHMARKS))
    import synthetic

    concepts, _ = synthetic.concept_labels(2000)
    prepared = prepare_labels(concepts.torch_sparse_t("cpu"))
    assert prepared.dense_t is not None and not _prefer_dense(prepared, 3)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("validation", [None, 0.25])
def test_prefetched_batches_give_the_same_labels(target, validation, monkeypatch, tmp_path):
    """Several automatic batches from HDF5, each read and ranked in a thread while the one before is searched,
    give the labels of one batch."""
    import h5py

    import crp_invert.core.labeling as labeling

    labels, scores, names = random_case(13, n=3000, k=6, f=40)
    concepts = ConceptLabels(labels, names)
    reference = ConceptLabeler(concepts).label(scores, L=3, B=3, validation=validation, progress=False)
    seen = []
    batches = labeling._ranked_batches
    monkeypatch.setattr(labeling, "_ranked_batches", lambda *args: seen.append(args[2:]) or batches(*args))
    with h5py.File(tmp_path / "acts.h5", "w") as handle:
        handle.create_dataset("Y", data=scores, chunks=(3000, 1))
    device, backend = target
    with h5py.File(tmp_path / "acts.h5", "r") as handle:
        result = label_array(handle["Y"], concepts, SearchParams(L=3, B=3), device=device, backend=backend,
                             validation=validation, memory_bytes=1_000_000, progress=False)
    batch, n_features, prefetch = seen[0]
    assert prefetch and 1 <= batch < n_features == 40
    assert_same_labels(result, reference, target)
