"""Scale-out: sharded recording and channel-parallel labeling under torchrun (CPU, Gloo, 2 processes).

The expected values come from a plain single process: the same worker script without torchrun (one process
records the whole range into one cache), ``python -m crp_invert label`` in one process, and slow
re-implementations of the splitting rules.
"""

import filecmp
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_cache

from crp_invert import ActivationCache, ConceptLabeler, ConceptLabels, label_cache
from crp_invert.parallel.labeling import ColumnSlice
from crp_invert.parallel.shards import combine_shards, find_shards, shard_path, split_range

N_SAMPLES = 36
BATCH = 4
CHECKPOINT = 2
LAYERS = ["conv1", "conv2", "linear1", "linear2"]

WORKER = textwrap.dedent('''
    """Records a small CNN with CRP + crp-invert; under torchrun every rank records its share."""
    import gc
    import os
    import sys

    import numpy as np
    import torch
    from torch import nn

    gc.collect = lambda *args: 0  # CRP collects garbage after every checkpoint; slow and useless here

    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlus

    from crp_invert.parallel.group import distributed_session, get_rank
    from crp_invert.parallel.recording import run_sharded
    from crp_invert.integration.recording import InvertFeatureVisualization

    N_SAMPLES, BATCH, CHECKPOINT = {n}, {batch}, {checkpoint}
    LAYERS = {layers!r}


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3)
            self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
            self.linear1 = nn.Linear(54, 8)
            self.linear2 = nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return self.linear2(torch.relu(self.linear1(x.flatten(1))))


    class Data:
        def __init__(self, x, y):
            self.x, self.y = x, y
            self.die_at = int(os.environ.get("DIE_AT", "-1"))
            self.die_rank = int(os.environ.get("DIE_RANK", "-1"))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, index):
            if int(index) == self.die_at and get_rank() == self.die_rank:
                os._exit(3)  # a rank that dies without any cleanup
            return self.x[index], int(self.y[index])


    def main(root):
        torch.manual_seed(0)
        model = Net()
        with torch.no_grad():
            model.bn1.running_mean.uniform_(-0.5, 0.5)
            model.bn1.running_var.uniform_(0.5, 2.0)
        model.eval()
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(N_SAMPLES, 1, 10, 10, generator=generator)
        y = torch.randint(0, 3, (N_SAMPLES,), generator=generator)
        with distributed_session():
            fv = InvertFeatureVisualization(
                CondAttribution(model), Data(x, y), {{name: ChannelConcept() for name in LAYERS}},
                path=os.path.join(root, "fv"), activation_cache=os.path.join(root, "acts.h5"), flush_interval=0,
            )
            saved = run_sharded(fv, EpsilonPlus(canonizers=[SequentialMergeBatchNorm()]), 0, N_SAMPLES,
                                batch_size=BATCH, checkpoint=CHECKPOINT)
            assert sorted(saved) == ["a_max", "a_stats", "r_max", "r_stats"]


    if __name__ == "__main__":
        main(sys.argv[1])
''').format(n=N_SAMPLES, batch=BATCH, checkpoint=CHECKPOINT, layers=LAYERS)


# -- helpers -------------------------------------------------------------------------------------------------


def _env(**extra):
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # torchrun's default for its workers; the same for the single process
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    env.pop("WORLD_SIZE", None)
    env.update({key: str(value) for key, value in extra.items()})
    return env


def torchrun(args, cwd, nproc=2, check=True, **env):
    """``torchrun --standalone`` (c10d rendezvous on localhost, free port) with ``nproc`` CPU processes."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--max-restarts=0",
        "--monitor-interval=0.2",
    ] + [str(a) for a in args]
    result = subprocess.run(command, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def python(args, cwd):
    result = subprocess.run(
        [sys.executable] + [str(a) for a in args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise AssertionError(f"python failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def read_cache(path):
    with ActivationCache(path) as cache:
        return {
            "range": cache.sample_range,
            "layers": cache.layers,
            "info": {
                name: {k: v for k, v in cache.info(name).items() if k != "chunks"} for name in cache.layers
            },
            "complete": cache.complete(),
            "data": {
                (name, source): cache.dataset(name, source)[()]
                for name in cache.layers
                for source in ("activation", "relevance")
            },
        }


def assert_same_cache(path_a, path_b):
    a, b = read_cache(path_a), read_cache(path_b)
    assert a["range"] == b["range"] and a["layers"] == b["layers"] == LAYERS
    assert a["info"] == b["info"]
    assert a["complete"].all() and b["complete"].all()
    for key, value in a["data"].items():
        assert value.dtype == np.float32 and np.isfinite(value).all()
        assert value.tobytes() == b["data"][key].tobytes(), key  # bitwise


def crp_arrays(folder):
    """CRP's result files: {relative path: array}; targets.npy as a sorted list (its order follows files)."""
    folder = Path(folder)
    result = {}
    for file in sorted(folder.rglob("*.npy")):
        value = np.load(file)
        result[str(file.relative_to(folder))] = (
            sorted(value.tolist()) if file.name == "targets.npy" else value
        )
    return result


def assert_same_crp_results(folder_a, folder_b):
    """Same files; same values in the same order; samples of tied values (ReLU zeros) in any order.

    CRP sorts with a non-stable argsort, so the order of samples with equal values depends on the order in
    which checkpoints are merged, also in a single process.
    """
    a, b = crp_arrays(folder_a), crp_arrays(folder_b)
    assert sorted(a) == sorted(b) and len(a) > 10
    assert not any("_0_" in name for name in a), "checkpoint files were left behind"
    for name, value in a.items():
        if name.endswith("targets.npy"):
            assert value == b[name], name
        elif name.endswith("rel.npy"):
            assert value.tobytes() == b[name].tobytes(), name  # the values, bitwise and in order
            prefix = name[: -len("rel.npy")]
            for key in (value, b[name]):
                assert key.shape == a[prefix + "data.npy"].shape
            for column in range(value.shape[1]):
                triples = [
                    sorted(
                        zip(
                            rel[:, column].tolist(),
                            data[:, column].tolist(),
                            rf[:, column].tolist(),
                            strict=True,
                        )
                    )
                    for rel, data, rf in (
                        (value, a[prefix + "data.npy"], a[prefix + "rf.npy"]),
                        (b[name], b[prefix + "data.npy"], b[prefix + "rf.npy"]),
                    )
                ]
                assert triples[0] == triples[1], (name, column)


# -- the runs (shared by the tests below) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    script = root / "worker.py"
    script.write_text(WORKER)
    (root / "single").mkdir()
    python([script, root / "single"], cwd=root)
    (root / "sharded").mkdir()
    torchrun([script, root / "sharded"], cwd=root)
    return {"root": root, "script": script}


@pytest.mark.slow  # shares the module's torchrun runs (about a minute)
def test_sharded_recording_equals_single_process(runs):
    """Two torchrun ranks write batch-aligned shards whose index and CRP files equal a one-process run."""
    root = runs["root"]
    shards = find_shards(root / "sharded" / "acts.h5")
    assert sorted(shards) == [2] and sorted(shards[2]) == [0, 1]
    # each shard holds its own contiguous, batch-aligned share
    with ActivationCache(shards[2][0]) as first, ActivationCache(shards[2][1]) as second:
        assert first.sample_range == split_range(0, N_SAMPLES, 0, 2, BATCH) == (0, 20)
        assert second.sample_range == (20, N_SAMPLES) and second.dataset_length == N_SAMPLES
    assert_same_cache(root / "sharded" / "acts.h5", root / "single" / "acts.h5")
    assert_same_crp_results(root / "sharded" / "fv", root / "single" / "fv")


@pytest.mark.slow  # shares the module's torchrun runs (about a minute)
def test_combine_by_copy_equals_index(runs, tmp_path):
    """combine_shards(copy=True) writes a real cache equal to the virtual index, readable without the shards."""
    source = runs["root"] / "sharded"
    for file in source.glob("acts.shard-*"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    combine_shards(tmp_path / "acts.h5", copy=True)
    with ActivationCache(tmp_path / "acts.h5") as cache:
        assert cache.info("conv1")["chunks"] is not None  # a real dataset, not a virtual one
    for file in tmp_path.glob("acts.shard-*"):
        file.unlink()
    assert_same_cache(tmp_path / "acts.h5", source / "acts.h5")


@pytest.mark.slow  # shares the module's torchrun runs (about a minute)
def test_killed_rank_resumes_to_same_result(runs, tmp_path):
    """A rank killed mid-run keeps its flushed rows, and the rerun resumes to the one-process result."""
    root = runs["root"]
    (tmp_path / "run").mkdir()
    die_at = 20 + 2 * BATCH + 1  # rank 1 dies in its third batch, after one CRP checkpoint
    result = torchrun(
        [runs["script"], tmp_path / "run"], cwd=tmp_path, check=False, DIE_AT=die_at, DIE_RANK=1
    )
    assert result.returncode != 0
    assert not (tmp_path / "run" / "acts.h5").exists()  # no index before every rank is done
    with ActivationCache(shard_path(tmp_path / "run" / "acts.h5", 1, 2)) as shard:
        missing = shard.missing_ranges()
        assert missing and missing[-1][1] == N_SAMPLES
        assert shard.complete()[: 2 * BATCH].all()  # what was flushed before the crash is kept
    torchrun([runs["script"], tmp_path / "run"], cwd=tmp_path)
    assert_same_cache(tmp_path / "run" / "acts.h5", root / "single" / "acts.h5")
    assert_same_crp_results(tmp_path / "run" / "fv", root / "single" / "fv")


@pytest.fixture(scope="module")
def concept_file(runs):
    generator = np.random.default_rng(3)
    labels = generator.random((N_SAMPLES, 6)) < 0.35
    path = runs["root"] / "labels.npz"
    ConceptLabels(labels, [f"c{k}" for k in range(6)]).save(path)
    return path


@pytest.mark.slow  # shares the module's torchrun runs (about a minute)
def test_label_command_under_torchrun_writes_same_json(runs, concept_file):
    """crp-invert label under torchrun writes the labels of one process."""
    root = runs["root"]
    args = [
        "-m",
        "crp_invert",
        "label",
        root / "sharded" / "acts.h5",
        concept_file,
        "-L",
        "2",
        "-B",
        "3",
        "--feature-batch-size",
        "2",
        "-q",
    ]
    python(args + ["--out", root / "labels_single"], cwd=root)
    result = torchrun(args + ["--out", root / "labels_torchrun"], cwd=root)
    single = sorted(p.name for p in (root / "labels_single").iterdir())
    assert single == sorted(p.name for p in (root / "labels_torchrun").iterdir())
    assert len(single) == len(LAYERS) + 1  # one JSON per layer and index.json
    for name in single:
        assert filecmp.cmp(root / "labels_single" / name, root / "labels_torchrun" / name, shallow=False), (
            name
        )
    assert "wrote" not in result.stdout  # -q: nothing printed, and never twice


# -- in-process tests ----------------------------------------------------------------------------------------


def slow_split(start, end, world, align):
    """Deal out blocks of ``align`` items one by one, round-robin over the ranks in rank order."""
    blocks = [list(range(a, min(a + align, end))) for a in range(start, end, align)]
    counts = [0] * world
    for i in range(len(blocks)):
        counts[i % world] += 1
    shares, position = [], 0
    for count in counts:
        items = [item for block in blocks[position : position + count] for item in block]
        position += count
        shares.append(items)
    return shares


@pytest.mark.parametrize(
    "start,end,world,align",
    [(0, 36, 2, 4), (5, 106, 3, 7), (0, 3, 4, 1), (2, 2, 3, 1), (0, 1000, 7, 32), (10, 11, 2, 5)],
)
def test_split_range_matches_slow_dealing(start, end, world, align):
    """split_range equals dealing aligned batches to ranks one by one."""
    shares = [split_range(start, end, rank, world, align) for rank in range(world)]
    for (a, b), items in zip(shares, slow_split(start, end, world, align), strict=True):
        assert list(range(a, b)) == items
    assert all((a - start) % align == 0 or a == end for a, _ in shares)


def test_split_range_and_shard_path_reject_bad_values():
    """split_range and shard_path name shards as documented and reject bad ranks, alignments and ranges."""
    with pytest.raises(ValueError, match="rank"):
        split_range(0, 10, 2, 2)
    with pytest.raises(ValueError, match="align"):
        split_range(0, 10, 0, 2, align=0)
    with pytest.raises(ValueError, match="end"):
        split_range(5, 4, 0, 1)
    assert shard_path("out/acts.h5", 1, 4) == Path("out/acts.shard-00001-of-00004.h5")
    assert shard_path("acts", 0, 1) == Path("acts.shard-00000-of-00001.h5")
    with pytest.raises(ValueError):
        shard_path("acts.h5", 4, 4)


def _write_shard(path, rows, data, fingerprint="fp"):
    """A complete shard of a 30-sample dataset holding ``rows`` of every array in ``data`` (relevances: minus)."""
    a, b = rows
    write_cache(path, {name: (values[a:b], -values[a:b]) for name, values in data.items()}, rows=rows,
                dataset_length=30, meta=lambda name: {"fingerprint": f"{fingerprint}-{name}"}, overwrite=False)


@pytest.fixture
def shard_data():
    generator = np.random.default_rng(0)
    return {
        "a/b": generator.normal(size=(30, 5)).astype("f4"),
        "x": generator.normal(size=(30, 2)).astype("f4"),
    }


def test_index_reads_through_to_the_shards(tmp_path, shard_data):
    """The combined index reads every shard's rows and columns, also after its folder moves."""
    path = tmp_path / "acts.h5"
    for rank in range(3):
        _write_shard(shard_path(path, rank, 3), split_range(0, 30, rank, 3, 4), shard_data)
    combine_shards(path)
    with ActivationCache(path) as cache:
        assert cache.layers == ["a/b", "x"] and cache.sample_range == (0, 30) and cache.is_complete()
        for name, values in shard_data.items():
            assert np.array_equal(cache.activations(name).numpy(), values)
            assert np.array_equal(cache.relevances(name, columns=[1, 0]).numpy(), -values[:, [1, 0]])
    # the index refers to the shards by relative name: the folder can move
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    with ActivationCache(moved / "acts.h5") as cache:
        assert np.array_equal(cache.activations("x").numpy(), shard_data["x"])
    # a missing shard shows as incomplete rows, which labeling refuses
    shard_path(moved / "acts.h5", 1, 3).unlink()
    with ActivationCache(moved / "acts.h5") as cache:
        assert cache.missing_ranges() == [(12, 24)]
        labeler = ConceptLabeler(ConceptLabels(np.eye(30, 3, dtype=bool), ["p", "q", "r"]))
        with pytest.raises(ValueError, match="incomplete"):
            label_cache(labeler, cache, progress=False)


def test_combine_shards_refuses_what_does_not_fit(tmp_path, shard_data):
    """combine_shards refuses no shards, gaps, other fingerprints, short covers, mixed world sizes and overwriting."""
    path = tmp_path / "acts.h5"
    with pytest.raises(FileNotFoundError, match="no shard"):
        combine_shards(path)
    _write_shard(shard_path(path, 0, 2), (0, 12), shard_data)
    _write_shard(shard_path(path, 1, 2), (16, 30), shard_data)
    with pytest.raises(ValueError, match=r"no shard holds samples \[12, 16\)"):
        combine_shards(path)
    shard_path(path, 1, 2).unlink()
    _write_shard(shard_path(path, 1, 2), (12, 30), shard_data, fingerprint="other")
    with pytest.raises(ValueError, match="fingerprint"):
        combine_shards(path)
    shard_path(path, 1, 2).unlink()
    _write_shard(shard_path(path, 1, 2), (12, 30), shard_data)
    with pytest.raises(ValueError, match="cover"):
        combine_shards(path, sample_range=(0, 31))
    _write_shard(shard_path(path, 0, 3), (0, 30), shard_data)
    with pytest.raises(ValueError, match="world sizes"):
        combine_shards(path)
    path.write_bytes(b"not an index")
    with pytest.raises(ValueError, match="overwrite"):
        combine_shards(path, world_size=2)
    combine_shards(path, world_size=2, overwrite=True)
    with ActivationCache(path) as cache:
        assert cache.is_complete()


def test_column_slice_reads_only_its_columns():
    """ColumnSlice returns and reads only its own columns of the dataset."""
    calls = []

    class Recorder:
        shape = (4, 10)

        def __getitem__(self, key):
            calls.append(key)
            return np.arange(40.0).reshape(4, 10)[key]

    view = ColumnSlice(Recorder(), 3, 8)
    assert view.shape == (4, 5)
    assert np.array_equal(view[:, 1:3], np.arange(40.0).reshape(4, 10)[:, 4:6])
    assert np.array_equal(view[:, 4:99], np.arange(40.0).reshape(4, 10)[:, 7:8])
    assert calls == [(slice(None), slice(4, 6)), (slice(None), slice(7, 8))]
    with pytest.raises(TypeError):
        view[0]
    with pytest.raises(ValueError):
        ColumnSlice(Recorder(), 5, 11)


def test_shares_of_features_join_to_the_single_process_labels(tmp_path):
    """The per-rank code path (column shares + join + BH over the layer) in one process, 3 simulated ranks."""
    import crp_invert.parallel.labeling as distributed
    from crp_invert.core.labels import LayerLabels

    generator = np.random.default_rng(1)
    labels = generator.random((80, 5)) < 0.3
    acts = (labels[:, [0, 1, 2, 3, 4, 0, 1]] + generator.normal(0, 0.7, (80, 7))).astype("f4")
    labeler = ConceptLabeler(ConceptLabels(labels, list("abcde")))
    expected = labeler.label(acts, L=2, B=3, progress=False, layer="l")
    parts = []
    for rank in range(3):
        a, b = split_range(0, 7, rank, 3)
        parts.append(
            labeler.label(ColumnSlice(acts, a, b), L=2, B=3, progress=False, layer="l", feature_batch_size=2)
        )
    per_share_q = [beam[0].p_value_bh for part in parts for beam in part]
    gathered = distributed.all_gather
    try:
        distributed.all_gather = lambda part: parts
        joined = distributed.all_gather_labels(parts[0])
    finally:
        distributed.all_gather = gathered
    assert joined == expected
    assert joined.to_dict() == expected.to_dict()
    # the join must redo Benjamini-Hochberg over the whole layer (each share saw fewer features)
    assert per_share_q != [beam[0].p_value_bh for beam in expected]
    assert LayerLabels.concatenate(parts) == expected


@pytest.fixture
def rank_path(monkeypatch):
    """Make the labeler take its torchrun path (column shares, gather) in a single process of world size 1."""
    import crp_invert.labeler as labeler_module

    def use(flag: bool) -> None:
        monkeypatch.setattr(labeler_module, "is_distributed", lambda: flag)

    return use


@pytest.mark.slow  # shares the module's torchrun runs (about a minute)
def test_label_cache_on_the_rank_path_equals_label_cache(runs, concept_file, rank_path):
    """label_cache on the per-rank path equals the one-process labels and names unknown layers."""
    labeler = ConceptLabeler(ConceptLabels.load(concept_file))
    path = runs["root"] / "sharded" / "acts.h5"
    expected = label_cache(labeler, path, L=2, B=2, progress=False)
    rank_path(True)
    got = label_cache(labeler, path, L=2, B=2, progress=False)
    assert list(got) == LAYERS
    assert all(got[name].to_dict() == expected[name].to_dict() for name in LAYERS)
    with pytest.raises(KeyError, match="conv1"):
        label_cache(labeler, path, layers=["nope"])


def test_label_h5_on_the_rank_path_equals_label_h5(tmp_path, rank_path):
    """label_h5 on the per-rank path equals the one-process labels of a flat file."""
    from crp_invert import FlatActivationWriter, label_h5

    generator = np.random.default_rng(2)
    labels = generator.random((50, 4)) < 0.4
    with FlatActivationWriter(tmp_path / "flat.h5") as writer:
        for start in range(0, 50, 20):
            writer.append(
                labels[start : start + 20, [0, 1, 2, 3, 0]] + generator.normal(0, 1, (min(20, 50 - start), 5))
            )
    labeler = ConceptLabeler(ConceptLabels(labels, list("abcd")))
    expected = label_h5(labeler, tmp_path / "flat.h5", L=2, B=2, progress=False)
    rank_path(True)
    got = label_h5(labeler, tmp_path / "flat.h5", L=2, B=2, progress=False)
    assert got.to_dict() == expected.to_dict() and got.layer == "Y"
    with pytest.raises(KeyError, match="Y"):
        label_h5(labeler, tmp_path / "flat.h5", dataset="Z")


@pytest.mark.slow  # shares the module's torchrun runs (about a minute)
def test_resume_skips_checkpoint_files_left_truncated(runs, tmp_path):
    """A rank killed while CRP saves leaves a truncated checkpoint; resume must redo it, not load it."""
    import importlib.util

    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlus

    from crp_invert.integration.recording import InvertFeatureVisualization

    spec = importlib.util.spec_from_file_location("dist_worker", runs["script"])
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    torch.manual_seed(0)
    model = worker.Net()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 1, 10, 10, generator=generator)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the reference process
    try:
        fv = InvertFeatureVisualization(
            CondAttribution(model),
            worker.Data(x, y),
            {name: ChannelConcept() for name in LAYERS},
            path=str(tmp_path / "fv"),
            activation_cache=tmp_path / "acts.h5",
            flush_interval=0,
        )
        checkpoints = fv.run_distributed(
            EpsilonPlus(canonizers=[SequentialMergeBatchNorm()]),
            0,
            N_SAMPLES,
            batch_size=BATCH,
            checkpoint=CHECKPOINT,
        )
        victim = Path(checkpoints["a_stats"][-len(LAYERS) - 1] + "rel.npy")  # in the last-but-one checkpoint
        victim.write_bytes(victim.read_bytes()[:50])
        fv.resume(
            EpsilonPlus(canonizers=[SequentialMergeBatchNorm()]),
            0,
            N_SAMPLES,
            batch_size=BATCH,
            checkpoint=CHECKPOINT,
        )
    finally:
        torch.set_num_threads(threads)
    assert_same_crp_results(tmp_path / "fv", runs["root"] / "single" / "fv")
    assert_same_cache(tmp_path / "acts.h5", runs["root"] / "single" / "acts.h5")
