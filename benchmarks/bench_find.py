"""Benchmark of the concept search (issue 14): ``find_channels`` for one formula.

    python benchmarks/bench_find.py [--samples 50000] [--features 512] [--repeat 3] [--threads 2]

Prints a markdown table: the time of ``find_channels`` for one formula

* over the N = 50 k, F = 512 synthetic layer of ``benchmarks/synthetic.py`` (1,481 concepts), in memory and
  streamed from an HDF5 activation cache (page cache warm), with the default column batch and a few others;
* over every layer of the demo (2,000 images, 160 channels in 5 layers, activations recorded with plain
  forward hooks, ``record_activations``), from its cache.

Goal: under a second for the synthetic layer. Times are the median of ``--repeat`` runs after one warm-up.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import synthetic  # noqa: E402

from crp_invert.find import default_search_batch, find_channels  # noqa: E402
from crp_invert.storage.cache import ActivationCache  # noqa: E402


def timed(function, repeat: int) -> tuple:
    result = function()  # warm-up (and the result)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def synthetic_rows(args, folder: Path) -> list:
    rows = []
    concepts, _ = synthetic.concept_labels(args.samples)
    acts = synthetic.activations(concepts, args.features)
    # a formula over a parent concept and a class: the kind of query a user types
    counts = concepts.counts()
    parent = next(name for name, count in zip(concepts.names, counts) if name.startswith("parent")
                  and 0.05 * args.samples < count < 0.3 * args.samples)
    formula = f"{parent} AND NOT class0"
    memory = {"layer": torch.from_numpy(acts)}
    result, seconds = timed(lambda: find_channels(formula, memory, concepts), args.repeat)
    batch = default_search_batch(args.samples, args.features)
    shape = f"N = {args.samples:,}, F = {args.features}, K = {concepts.n_concepts:,}"
    rows.append((f"synthetic {shape}, in memory (batch {batch})", f"{seconds:.3f} s"))
    path = folder / "synthetic.h5"
    with ActivationCache(path, mode="a", overwrite=True) as cache:
        cache.initialize((0, args.samples))
        cache.add_layer("layer", args.features, relevances=False, pooling="mean")
        cache.write("layer", (0, args.samples), acts)
        cache.mark_complete((0, args.samples))
    for batch_size in (None, 8, 64, args.features):
        streamed, seconds = timed(lambda b=batch_size: find_channels(formula, path, concepts, feature_batch_size=b),
                                  args.repeat)
        same = streamed.matches == result.matches
        name = "default" if batch_size is None else str(batch_size)
        rows.append((f"synthetic, streamed from HDF5, batch {name}", f"{seconds:.3f} s (same result: {same})"))
    rows.append((f"synthetic formula `{formula}`: fraction, best AUC",
                 f"{result.fraction:.4f}, {result[0].auc:.4f} (channel {result[0].channel})"))
    return rows


def demo_rows(args, folder: Path) -> list:
    from crp_invert import record_activations
    from crp_invert.demo.data import AuditDataset
    from crp_invert.demo.model import load_demo_model

    dataset = AuditDataset(2000, seed=2)
    model = load_demo_model()
    path = folder / "demo.h5"
    loader = torch.utils.data.DataLoader(dataset, batch_size=200)
    record_activations(model, loader, model.layer_names, path, progress=False).close()
    formula = "circle AND NOT red"
    found, seconds = timed(lambda: find_channels(formula, path, dataset.concepts), args.repeat)
    top = found[0]
    return [(f"demo: every layer ({len(found)} channels, N = {len(dataset):,}), `{formula}`", f"{seconds:.3f} s"),
            ("demo: best channel", f"{top.layer}:{top.channel}, AUC {top.auc:.4f}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        rows = synthetic_rows(args, Path(folder))
        if not args.skip_demo:
            rows += demo_rows(args, Path(folder))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"numpy {np.__version__}")
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
