"""ActivationCache, FlatActivationWriter, and labeling straight from HDF5 (label_cache, label_h5)."""

import json
import os
import resource
import signal

import h5py
import numpy as np
import pytest
import torch
from helpers import write_cache

from crp_invert import ActivationCache, FlatActivationWriter, label_cache, label_h5
from crp_invert.storage.fingerprint import fingerprint, model_hash
from crp_invert.storage.h5 import chunk_shape

N, C = 60, 7


def random_layers(layers=("features.40", "layer4.1.conv2"), n=N, c=C, seed=0):
    """Random activations (ties included) and relevances of the layers, ``c + i`` channels for layer ``i``."""
    rng = np.random.default_rng(seed)
    data = {}
    for i, name in enumerate(layers):
        acts = rng.integers(0, 5, size=(n, c + i)).astype(np.float32) + rng.random((n, c + i)).astype(np.float32)
        acts[:, 0] = np.round(acts[:, 0])  # ties
        rels = rng.normal(size=(n, c + i)).astype(np.float32)
        data[name] = (acts, rels)
    return data


def write_random_cache(path, layers=("features.40", "layer4.1.conv2"), n=N, c=C, relevances=True, complete=True,
                       seed=0):
    """A cache filled with :func:`random_layers` (layer ``i`` has fingerprint ``fp{i}``); returns the arrays
    written."""
    data = random_layers(layers, n, c, seed)
    meta = {name: {"pooling": "mean", "fingerprint": f"fp{i}"} for i, name in enumerate(layers)}
    if complete:
        write_cache(path, {name: (acts, rels if relevances else None) for name, (acts, rels) in data.items()},
                    meta=meta.__getitem__)
        return data
    with ActivationCache(path, mode="a", overwrite=True) as cache:  # written but never marked complete
        cache.initialize((0, n))
        for name, (acts, rels) in data.items():
            cache.add_layer(name, acts.shape[1], relevances=relevances, **meta[name])
            cache.write(name, (0, n), acts, rels if relevances else None)
    return data


def make_concepts(n=N, k=5, seed=1):
    from crp_invert.core.concepts import ConceptLabels

    rng = np.random.default_rng(seed)
    labels = rng.random((n, k)) < 0.3
    labels[:, 0] = np.arange(n) % 2 == 0
    return ConceptLabels(labels, [f"c{i}" for i in range(k)])


# -- the file ------------------------------------------------------------------------------------------------


def test_round_trip_and_column_reads(tmp_path):
    """A cache returns the activations and relevances written, also for column slices, index lists and masks."""
    data = write_random_cache(tmp_path / "a.h5")
    with ActivationCache(tmp_path / "a.h5") as cache:
        assert cache.layers == ["features.40", "layer4.1.conv2"]
        assert cache.n_samples == N and cache.is_complete()
        acts, rels = data["layer4.1.conv2"]
        assert isinstance(cache.activations("layer4.1.conv2"), torch.Tensor)
        np.testing.assert_array_equal(cache.activations("layer4.1.conv2").numpy(), acts)
        np.testing.assert_array_equal(cache.relevances("layer4.1.conv2").numpy(), rels)
        np.testing.assert_array_equal(cache.activations("layer4.1.conv2", slice(2, 5)).numpy(), acts[:, 2:5])
        np.testing.assert_array_equal(
            cache.activations("layer4.1.conv2", [6, 0, 6, -1]).numpy(), acts[:, [6, 0, 6, -1]]
        )
        mask = np.arange(C + 1) % 3 == 0
        np.testing.assert_array_equal(cache.relevances("layer4.1.conv2", mask).numpy(), rels[:, mask])
        np.testing.assert_array_equal(cache.activations("layer4.1.conv2", 3).numpy(), acts[:, [3]])
        dataset = cache.dataset("features.40")
        assert isinstance(dataset, h5py.Dataset) and dataset.shape == (N, C)
        np.testing.assert_array_equal(dataset[:, 1:3], data["features.40"][0][:, 1:3])
        with pytest.raises(IndexError):
            cache.activations("features.40", [C])
        with pytest.raises(ValueError, match="read-only"):
            cache.write("features.40", (0, 1), np.zeros((1, C)))


def test_layer_names_cannot_escape(tmp_path):
    """Layer names with slashes, dots or odd characters are stored under numbered groups and read back unchanged."""
    names = ["a/b", "..", "/root", "layers/0", ".", "x" * 300, "ümlaut name"]
    with ActivationCache(tmp_path / "n.h5", mode="a") as cache:
        cache.initialize((0, 4))
        for i, name in enumerate(names):
            cache.add_layer(name, 2)
            cache.write(name, (0, 4), np.full((4, 2), i, dtype=np.float32))
        cache.mark_complete((0, 4))
    with ActivationCache(tmp_path / "n.h5") as cache:
        assert cache.layers == names
        for i, name in enumerate(names):
            assert (cache.activations(name) == i).all()
    with h5py.File(tmp_path / "n.h5", "r") as file:
        assert sorted(file.keys()) == ["layers"]
        assert sorted(file["layers"].keys(), key=int) == [str(i) for i in range(len(names))]
        assert all(isinstance(file["layers"][k], h5py.Group) for k in file["layers"])


def test_missing_layer_lists_layers(tmp_path):
    """Reading a missing layer raises a KeyError that lists the cache's layers."""
    write_random_cache(tmp_path / "a.h5")
    with ActivationCache(tmp_path / "a.h5") as cache:
        with pytest.raises(KeyError, match=r"features\.40.*layer4\.1\.conv2"):
            cache.activations("conv9")
        assert "conv9" not in cache and "features.40" in cache


def test_existing_file_is_never_overwritten(tmp_path):
    """Opening an existing cache continues it: other sample counts or layer settings are refused, only overwrite=True
    wipes it."""
    data = write_random_cache(tmp_path / "a.h5")
    with ActivationCache(tmp_path / "a.h5", mode="a") as cache:  # continue, do not wipe
        assert cache.layers == list(data)
        with pytest.raises(ValueError, match="samples"):
            cache.initialize((0, N + 1))
        with pytest.raises(ValueError, match="pooling"):
            cache.add_layer("features.40", C, relevances=True, pooling="max")
        with pytest.raises(ValueError, match="n_channels"):
            cache.add_layer("features.40", C + 1, relevances=True)
        cache.add_layer("features.40", C, relevances=True, pooling="mean")  # same: accepted
    with ActivationCache(tmp_path / "a.h5") as cache:
        np.testing.assert_array_equal(cache.activations("features.40").numpy(), data["features.40"][0])
    with ActivationCache(tmp_path / "a.h5", mode="a", overwrite=True) as cache:
        assert not cache.initialized and cache.layers == []
    with pytest.raises(ValueError, match="mode"):
        ActivationCache(tmp_path / "a.h5", mode="w")


def test_completion_bookkeeping(tmp_path):
    """complete, missing_ranges and is_complete follow the rows marked complete per layer, for a shard of the
    dataset."""
    with ActivationCache(tmp_path / "c.h5", mode="a") as cache:
        cache.initialize((100, 110), dataset_length=200)  # a shard: samples [100, 110) of 200
        cache.add_layer("l1", 3)
        cache.add_layer("l2", 2)
        assert cache.missing_ranges() == [(100, 110)]
        cache.write("l1", (0, 4), np.ones((4, 3)))
        cache.write("l2", (0, 4), np.ones((4, 2)))
        cache.mark_complete((0, 4))
        cache.write("l1", np.array([6, 8]), np.ones((2, 3)))
        cache.mark_complete(np.array([6, 8]), ["l1"])
        assert cache.missing_ranges("l1") == [(104, 106), (107, 108), (109, 110)]
        assert cache.missing_ranges() == [(104, 110)]
        assert cache.complete("l1").sum() == 6 and not cache.is_complete()
        with pytest.raises(ValueError, match="increasing"):
            cache.write("l1", np.array([3, 2]), np.ones((2, 3)))
        with pytest.raises(ValueError, match="shape"):
            cache.write("l1", (0, 2), np.ones((2, 4)))
        with pytest.raises(IndexError):
            cache.write("l1", (8, 11), np.ones((3, 3)))
    with ActivationCache(tmp_path / "c.h5") as cache:
        assert cache.sample_range == (100, 110) and cache.dataset_length == 200
        assert torch.isnan(cache.activations("l1")[4]).all()
        with pytest.raises(ValueError, match=r"\[104, 110\)"):
            cache.require_complete()


def test_unreadable_files(tmp_path):
    """Missing, non-HDF5, truncated and foreign HDF5 files raise errors that say what is wrong."""
    with pytest.raises(FileNotFoundError):
        ActivationCache(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5 at all")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        ActivationCache(tmp_path / "text.h5")
    write_random_cache(tmp_path / "full.h5")
    raw = (tmp_path / "full.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.h5"):
        ActivationCache(tmp_path / "cut.h5")
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file["Y"] = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="not a crp-invert activation cache"):
        ActivationCache(tmp_path / "other.h5")


def test_chunk_shape_properties():
    """chunk_shape stays within the array and about 1 MiB a chunk, and one band of chunks stays bounded."""
    for n_rows, n_cols in [
        (5000, 16),
        (10, 3),
        (1_281_167, 2048),
        (1_000_000, 256),
        (None, 100_000),
        (None, 5),
    ]:
        rows, cols = chunk_shape(n_rows, n_cols)
        assert 1 <= cols <= n_cols and rows >= 1
        if n_rows is not None:
            assert rows <= n_rows
        assert rows * cols * 4 <= 2 << 20  # about 1 MiB, never huge
        assert rows * n_cols * 4 <= 32 << 20  # one band of chunks (what an append touches) stays bounded


def test_fingerprint_components():
    """The fingerprint changes with each of its components, and model_hash with the model's buffers."""
    base = dict(model_hash="m", layer="conv1", dataset_length=10, pooling="mean")
    reference = fingerprint(**base)
    assert fingerprint(**base) == reference
    for key, value in [
        ("model_hash", "m2"),
        ("layer", "conv2"),
        ("dataset_length", 11),
        ("pooling", "max"),
        ("concept", "Other"),
        ("composite", "EpsilonPlus"),
        ("relevance", "sum"),
    ]:
        assert fingerprint(**{**base, key: value}) != reference
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    digest = model_hash(model)
    assert digest == model_hash(model)
    with torch.no_grad():
        model[1].running_mean += 1  # buffers count
    assert model_hash(model) != digest


# -- labeling from files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labeler():
    from crp_invert import ConceptLabeler

    return ConceptLabeler(make_concepts())


@pytest.mark.parametrize("source", ["activation", "relevance"])
def test_label_cache_equals_in_memory(tmp_path, labeler, source):
    """label_cache gives the same labels as labeling the activations or relevances in memory."""
    data = write_random_cache(tmp_path / "a.h5")
    results = label_cache(
        labeler, tmp_path / "a.h5", source=source, L=2, B=2, feature_batch_size=3, progress=False
    )
    assert list(results) == list(data)
    for name, (acts, rels) in data.items():
        expected = labeler.label(
            torch.from_numpy(acts if source == "activation" else rels),
            L=2,
            B=2,
            feature_batch_size=3,
            layer=name,
            progress=False,
        )
        assert results[name] == expected
        assert results[name].layer == name
    # through the labeler's method, one layer, an open cache
    with ActivationCache(tmp_path / "a.h5") as cache:
        via_method = labeler.label_cache(
            cache, layers="features.40", source=source, L=2, B=2, feature_batch_size=3, progress=False
        )
        assert not cache.closed
    assert via_method["features.40"] == results["features.40"]


def test_label_cache_refuses_bad_caches(tmp_path, labeler):
    """label_cache refuses missing layers, other sample counts, incomplete caches, missing relevances and unknown
    sources."""
    write_random_cache(tmp_path / "a.h5")
    with pytest.raises(KeyError, match=r"conv9.*features\.40"):
        label_cache(labeler, tmp_path / "a.h5", layers=["conv9"], progress=False)
    write_random_cache(tmp_path / "short.h5", n=N - 1)
    with pytest.raises(ValueError, match=f"N={N - 1}.*N={N}"):
        label_cache(labeler, tmp_path / "short.h5", progress=False)
    write_random_cache(tmp_path / "partial.h5", complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        label_cache(labeler, tmp_path / "partial.h5", progress=False)
    write_random_cache(tmp_path / "norel.h5", relevances=False)
    with pytest.raises(KeyError, match="relevances"):
        label_cache(labeler, tmp_path / "norel.h5", source="relevance", progress=False)
    with pytest.raises(ValueError, match="source"):
        label_cache(labeler, tmp_path / "a.h5", source="gradient", progress=False)
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(ValueError):
        label_cache(labeler, tmp_path / "junk.h5", progress=False)


# -- the INVERT release format -------------------------------------------------------------------------------


def test_flat_writer_round_trip(tmp_path, labeler):
    """FlatActivationWriter appends batches (also after reopening) whose flattened rows read back and label like in
    memory."""
    rng = np.random.default_rng(3)
    batches = [torch.from_numpy(rng.normal(size=(b, 2, 3)).astype(np.float32)) for b in (25, 1, 20)]
    batches.append(rng.normal(size=(14, 2, 3)))  # numpy float64 is accepted too
    with FlatActivationWriter(tmp_path / "y.h5", chunks=(8, 4)) as writer:
        for batch in batches[:3]:
            writer.append(batch)
        assert writer.n_rows == 46 and writer.n_features == 6
        with pytest.raises(ValueError, match="features"):
            writer.append(np.zeros((2, 5)))
    with FlatActivationWriter(tmp_path / "y.h5") as writer:  # reopening appends
        writer.append(batches[3])
        assert writer.n_rows == N
    expected = np.concatenate([np.asarray(b, dtype=np.float32).reshape(len(b), -1) for b in batches])
    with h5py.File(tmp_path / "y.h5", "r") as file:
        assert list(file.keys()) == ["Y"] and file["Y"].dtype == np.float32
        np.testing.assert_array_equal(file["Y"][()], expected)
    result = label_h5(labeler, tmp_path / "y.h5", L=2, B=2, feature_batch_size=4, progress=False)
    assert result == labeler.label(
        torch.from_numpy(expected), L=2, B=2, feature_batch_size=4, layer="Y", progress=False
    )
    assert labeler.label_h5(tmp_path / "y.h5", L=2, B=2, feature_batch_size=4, progress=False) == result
    with pytest.raises(KeyError, match="'Y'"):
        label_h5(labeler, tmp_path / "y.h5", dataset="X", progress=False)
    with FlatActivationWriter(tmp_path / "y.h5", overwrite=True) as writer:
        writer.append(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="N=3"):
        label_h5(labeler, tmp_path / "y.h5", progress=False)
    with pytest.raises(ValueError, match="plain name"):
        FlatActivationWriter(tmp_path / "z.h5", dataset="a/b")


def test_cache_is_json_free_of_paths(tmp_path):
    """The cache's layer index maps layer names to numbered groups, and its datasets are chunked."""
    write_random_cache(tmp_path / "a.h5")
    with h5py.File(tmp_path / "a.h5", "r") as file:
        index = json.loads(file.attrs["layer_index"])
        assert index == {"features.40": "0", "layer4.1.conv2": "1"}
        group = file["layers"]["0"]
        assert group["activations"].chunks is not None and group["complete"].dtype == np.uint8


# -- faults: kills at every step of creating a cache, full disks, two writers (issue 11) ----------------------

KILL_N = 40
KILL_LAYERS = (("a", 3, True), ("b", 5, False))
# every call that changes the file or its name: the child is killed right before the k-th of them
KILL_POINTS = [
    (h5py.File, "__init__"), (h5py.File, "flush"), (h5py.Group, "create_group"), (h5py.Group, "create_dataset"),
    (h5py.AttributeManager, "__setitem__"), (h5py.Dataset, "__setitem__"), (os, "replace"), (os, "posix_fallocate"),
    (os, "truncate"), (os, "fsync"),
]


WIDE = (("wide", 300, True),)


def kill_data(name):
    channels = {n: c for n, c, _ in KILL_LAYERS + WIDE}[name]
    values = np.arange(KILL_N * channels, dtype=np.float32).reshape(KILL_N, channels) / 7 + len(name)
    return values, -values


def record(path, layers=KILL_LAYERS):
    """What a recording does to its cache: create or continue it, add the layers, write, mark complete."""
    with ActivationCache(path, mode="a") as cache:
        cache.initialize((0, KILL_N))
        for name, channels, relevances in layers:
            cache.add_layer(name, channels, relevances=relevances, pooling="mean", fingerprint=f"fp-{name}")
        for name, _, relevances in layers:
            acts, rels = kill_data(name)
            cache.write(name, (0, KILL_N // 2), acts[: KILL_N // 2], rels[: KILL_N // 2] if relevances else None)
            cache.mark_complete((0, KILL_N // 2), [name])
            cache.write(name, (KILL_N // 2, KILL_N), acts[KILL_N // 2:], rels[KILL_N // 2:] if relevances else None)
            cache.mark_complete((KILL_N // 2, KILL_N), [name])


def assert_recorded(path, layers=KILL_LAYERS):
    with ActivationCache(path) as cache:
        assert cache.layers == [name for name, _, _ in layers]
        assert cache.is_complete()
        for name, _, relevances in layers:
            acts, rels = kill_data(name)
            np.testing.assert_array_equal(cache.activations(name).numpy(), acts)
            if relevances:
                np.testing.assert_array_equal(cache.relevances(name).numpy(), rels)
            assert cache.info(name)["fingerprint"] == f"fp-{name}"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .partial, no .lock left


def in_child(body, kill_at=0, fsize=None, counter=None):
    """Run ``body`` in a forked child, killed with SIGKILL right before the ``kill_at``-th call of KILL_POINTS
    (0: never), under an optional RLIMIT_FSIZE. Returns the wait status; ``counter`` receives the number of
    calls."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            count = [0]

            def counted(real):
                def wrapped(*args, **kwargs):
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return wrapped

            for owner, name in KILL_POINTS:
                setattr(owner, name, counted(getattr(owner, name)))
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            try:
                body()
            except (OSError, ValueError) as error:
                code = 3 if "space" in str(error) or "too large" in str(error).lower() or fsize is not None else 4
            if counter is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                counter.write_text(str(count[0]))
        except BaseException:
            code = 5
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def killed(status):
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.slow
def test_kill_at_every_step_of_creating_a_cache(tmp_path):
    """A process killed at any step of creating a cache leaves no file or one that opens with trustworthy complete
    rows."""
    counter = tmp_path / "count"
    (tmp_path / "dry").mkdir()
    assert in_child(lambda: record(tmp_path / "dry" / "cache.h5"), counter=counter) == 0
    n_calls = int(counter.read_text())
    assert n_calls > 20
    for k in range(1, n_calls + 1):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        path = folder / "cache.h5"
        assert killed(in_child(lambda path=path: record(path), kill_at=k)), k
        if path.exists():  # renamed into place: it must open, with trustworthy complete rows
            with ActivationCache(path) as cache:
                for name in cache.layers:
                    done = cache.complete(name)
                    np.testing.assert_array_equal(cache.activations(name).numpy()[done], kill_data(name)[0][done])
        record(path)  # the rerun completes
        assert_recorded(path)


def test_kill_while_adding_a_layer_keeps_complete_rows(tmp_path):
    """A process killed while adding a layer leaves the earlier layer complete and the cache usable for a rerun."""
    first, second = KILL_LAYERS[:1], KILL_LAYERS
    counter = tmp_path / "count"
    (tmp_path / "dry").mkdir()
    record(tmp_path / "dry" / "cache.h5", first)
    assert in_child(lambda: record(tmp_path / "dry" / "cache.h5", second), counter=counter) == 0
    n_calls = int(counter.read_text())
    for k in range(1, n_calls + 1):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        path = folder / "cache.h5"
        record(path, first)
        assert killed(in_child(lambda path=path: record(path, second), kill_at=k)), k
        with ActivationCache(path) as cache:  # layer a: untouched
            assert cache.is_complete("a")
            np.testing.assert_array_equal(cache.activations("a").numpy(), kill_data("a")[0])
        record(path, second)
        assert_recorded(path, second)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.2, 0.5, 0.9])
def test_file_size_limit_while_creating_then_rerun(tmp_path, fraction):
    """Running out of file size while creating a cache leaves a file that opens, and a rerun with space completes it."""
    (tmp_path / "full").mkdir()
    record(tmp_path / "full" / "cache.h5")
    size = (tmp_path / "full" / "cache.h5").stat().st_size
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "cache.h5"
    status = in_child(lambda: record(path), fsize=int(fraction * size))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, status
    if path.exists():
        ActivationCache(path).close()  # whatever is there opens
    record(path)  # a rerun with space continues
    assert_recorded(path)


@pytest.mark.parametrize("room", [512, 8000, 30000, 90000])
def test_file_size_limit_while_adding_a_layer_keeps_the_cache(tmp_path, room):
    """Running out of file size while adding a layer keeps the complete earlier layer, and a rerun adds the new one."""
    path = tmp_path / "cache.h5"
    first, second = KILL_LAYERS[:1], KILL_LAYERS[:1] + WIDE  # the wide layer needs about 100 kB
    record(path, first)
    status = in_child(lambda: record(path, second), fsize=path.stat().st_size + room)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, status
    with ActivationCache(path) as cache:  # without reserving the space first, HDF5 left a truncated file
        assert cache.layers == ["a"] and cache.is_complete()
        np.testing.assert_array_equal(cache.activations("a").numpy(), kill_data("a")[0])
    record(path, second)
    assert_recorded(path, second)


def test_two_writers_one_refused_file_intact(tmp_path):
    """While one process writes a cache, every other open is refused as in use, and the writer's file ends complete."""
    from crp_invert.storage.lock import FileInUseError

    for trial in range(5):
        path = tmp_path / f"cache{trial}.h5"
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the first writer: records half, waits, records the rest
            code = 1
            try:
                with ActivationCache(path, mode="a") as cache:
                    cache.initialize((0, KILL_N))
                    for name, channels, relevances in KILL_LAYERS:
                        cache.add_layer(name, channels, relevances=relevances, pooling="mean",
                                        fingerprint=f"fp-{name}")
                    for name, _, relevances in KILL_LAYERS:
                        acts, rels = kill_data(name)
                        cache.write(name, (0, KILL_N // 2), acts[: KILL_N // 2],
                                    rels[: KILL_N // 2] if relevances else None)
                    cache.mark_complete((0, KILL_N // 2))
                    os.write(ready_w, b"1")
                    os.read(go_r, 1)
                    for name, _, relevances in KILL_LAYERS:
                        acts, rels = kill_data(name)
                        cache.write(name, (KILL_N // 2, KILL_N), acts[KILL_N // 2:],
                                    rels[KILL_N // 2:] if relevances else None)
                    cache.mark_complete((KILL_N // 2, KILL_N))
                code = 0
            finally:
                os._exit(code)
        assert os.read(ready_r, 1) == b"1"
        refused = []
        attempts = (lambda path=path: ActivationCache(path, mode="a"),
                    lambda path=path: ActivationCache(path, "a", overwrite=True),
                    lambda path=path: ActivationCache(path), lambda path=path: record(path))
        for attempt in attempts:
            with pytest.raises(FileInUseError, match="in use by another process") as caught:
                attempt()
            assert "damaged" not in str(caught.value)
            refused.append(caught.value)
        os.write(go_w, b"1")
        _, status = os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert len(refused) == 4
        moved = tmp_path / f"alone{trial}" / "cache.h5"
        moved.parent.mkdir()
        os.replace(path, moved)
        assert_recorded(moved)


def test_a_file_locked_by_hdf5_alone_is_in_use_not_damaged(tmp_path):
    """A cache held open by a plain h5py writer (no lock file of ours) is reported in use, not damaged."""
    from crp_invert.storage.lock import FileInUseError

    path = tmp_path / "cache.h5"
    record(path)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a plain h5py writer (no lock file of ours)
        try:
            with h5py.File(path, "r+"):
                os.write(ready_w, b"1")
                os.read(go_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(FileInUseError, match="in use by another process"):
            ActivationCache(path)
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
    assert_recorded(path)


def test_half_initialized_file_of_older_versions_is_recreated(tmp_path):
    """A half-initialized or empty HDF5 file left by older versions is recreated by the next recording."""
    path = tmp_path / "cache.h5"
    with h5py.File(path, "w") as file:  # what a kill inside write_root left behind: no layer_index
        file.attrs["format"] = "crp-invert-activation-cache"
        file.attrs["n_samples"] = 3
    record(path)
    assert_recorded(path)
    with h5py.File(path, "w") as file:  # an empty HDF5 file
        pass
    record(path)
    assert_recorded(path)


# -- copy-on-write of a cache in place (issue 18) ---------------------------------------------------------------


def test_adding_a_layer_leaves_the_file_in_place_untouched_until_its_rows(tmp_path):
    """A layer added to a cache in place goes to a copy: the file's bytes do not change until rows are written,
    then the copy, with the old layers and the new one, replaces it."""
    path = tmp_path / "cache.h5"
    record(path, KILL_LAYERS[:1])
    before = path.read_bytes()
    with ActivationCache(path, mode="a") as cache:
        cache.add_layer("b", 5, relevances=False, pooling="mean", fingerprint="fp-b")
        assert path.read_bytes() == before
        assert (tmp_path / "cache.h5.partial").exists()
        cache.write("b", (0, KILL_N), kill_data("b")[0])
        assert path.read_bytes() != before and not (tmp_path / "cache.h5.partial").exists()
        cache.mark_complete((0, KILL_N), ["b"])
    with ActivationCache(path) as cache:
        assert cache.layers == ["a", "b"] and cache.is_complete()
        np.testing.assert_array_equal(cache.activations("a").numpy(), kill_data("a")[0])
        np.testing.assert_array_equal(cache.activations("b").numpy(), kill_data("b")[0])


def test_a_stale_copy_left_by_a_kill_is_removed_and_the_file_kept(tmp_path):
    """A copy left by a writer killed before renaming it is dropped by the next writer; the file is as it was."""
    path = tmp_path / "cache.h5"
    record(path, KILL_LAYERS[:1])
    (tmp_path / "cache.h5.partial").write_bytes(b"half a copy")
    with ActivationCache(path, mode="a") as cache:
        assert cache.layers == ["a"]
    assert not (tmp_path / "cache.h5.partial").exists()
    record(path, KILL_LAYERS)
    assert_recorded(path, KILL_LAYERS)


def test_the_copy_keeps_the_permissions_of_the_file(tmp_path):
    """Adding a layer keeps the cache's own permissions (the copy is not a private temporary file)."""
    path = tmp_path / "cache.h5"
    record(path, KILL_LAYERS[:1])
    os.chmod(path, 0o640)
    record(path, KILL_LAYERS)
    assert (path.stat().st_mode & 0o777) == 0o640


def write_old_layout(path, n=KILL_N):
    """A cache written with plain h5py in the single-file layout of format version 1 (what earlier versions of
    the package wrote: chunked, not allocated early)."""
    acts = kill_data("a")[0]
    with h5py.File(path, "w") as file:
        file.attrs.update({"format": "crp-invert-activation-cache", "format_version": 1, "n_samples": n,
                           "sample_start": 0, "sample_end": n, "dataset_length": n,
                           "layer_index": json.dumps({"a": "0"})})
        group = file.create_group("layers/0")
        group.attrs.update({"name": "a", "n_samples": n, "n_channels": acts.shape[1], "sample_start": 0,
                            "sample_end": n, "dataset_length": n, "format_version": 1, "pooling": "mean",
                            "fingerprint": "fp-a"})
        group.create_dataset("activations", data=acts, chunks=(8, acts.shape[1]))
        group.create_dataset("relevances", data=kill_data("a")[1], chunks=(8, acts.shape[1]))
        group.create_dataset("complete", data=np.ones(n, dtype=np.uint8))


def test_a_cache_of_the_old_layout_is_read_and_continued(tmp_path):
    """A file in the earlier single-file layout reads as it is and takes new layers (through a copy)."""
    path = tmp_path / "cache.h5"
    write_old_layout(path)
    with ActivationCache(path) as cache:
        assert cache.layers == ["a"] and cache.is_complete()
        np.testing.assert_array_equal(cache.activations("a").numpy(), kill_data("a")[0])
        np.testing.assert_array_equal(cache.relevances("a").numpy(), kill_data("a")[1])
    record(path, KILL_LAYERS)
    assert_recorded(path, KILL_LAYERS)


@pytest.mark.slow
@pytest.mark.parametrize("mode,trials", [("kill", 12), ("exit", 8), ("write", 12)])
def test_fault_injection_loses_no_layer_and_no_row(tmp_path, mode, trials):
    """Writers killed at random points (SIGKILL timer, an exit at a random h5py call or HDF5 write) leave a cache
    with every complete row and layer, and resume to the expected values bit for bit (benchmarks/fault_injection)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_injection.py"
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(script), "--trials", str(trials), "--mode", mode, "--seed", "7",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["trials"] == trials and result["killed"] >= 1
    assert result["failures"] == 0, result["examples"]
    assert result["resumed_bitwise"] == trials


@pytest.mark.parametrize("seed", range(6))
def test_first_nonfinite_equals_a_scan_of_every_value(tmp_path, seed):
    """first_nonfinite finds the same first bad value (row-major, complete rows only) and count of affected
    columns in its band as a scan of every value, also beside finite values whose column sums overflow."""
    from crp_invert.storage.h5 import first_nonfinite

    rng = np.random.default_rng(seed)
    values = rng.random((50, 6)).astype(np.float32)
    values[:, 1] = np.float32(3e38)  # finite, but the column's sum overflows to inf
    for _ in range(seed % 3):
        values[rng.integers(50), rng.integers(6)] = rng.choice([np.nan, np.inf, -np.inf])
    rows = rng.random(50) < 0.7
    with h5py.File(tmp_path / "v.h5", "w") as file:
        dataset = file.create_dataset("v", data=values, chunks=(8, 6))
        found = first_nonfinite(dataset, rows)
    bad = ~np.isfinite(values) & rows[:, None]
    if not bad.any():
        assert found is None
        return
    row, column = (int(v) for v in np.argwhere(bad)[0])
    band = slice(row - row % 8, row - row % 8 + 8)
    kind = "NaN" if np.isnan(values[row, column]) else "an infinite value"
    assert found == (row, column, kind, int(bad[band].any(axis=0).sum()))
