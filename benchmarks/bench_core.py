"""Benchmark of the INVERT core (issues 2 and 13): a whole ImageNet-scale layer, the slow reference, and
the time per feature as N grows.

    python benchmarks/bench_core.py [--features 512] [--samples 50000] [--device cpu] [--slow-features 1]
    python benchmarks/bench_core.py --scaling 50000,200000,1280000 [--scaling-features 64 or 512,64,16]

Prints a markdown table: wall time and peak memory (RSS) of labeling F features with L = 3, B = 3
over N samples and K = 1,481 concepts, the time per feature of the slow per-candidate algorithm
(tests/slow_invert.py: one formula at a time, AUC by sklearn-style ranking) and the speed-up, and
the FashionMNIST check when ../shared/data/fashion-mnist-crp is present. With ``--scaling`` it prints
instead the time per feature (wall and CPU of this process) of labeling ``--scaling-features`` features in
memory at every N, and its growth against N log N; with ``PYTHONPATH`` pointing at another checkout, of that
version (the script needs only ``ConceptLabeler``).
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import synthetic  # noqa: E402

from crp_invert import ConceptLabeler  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slow-features", type=int, default=1)
    parser.add_argument("--slow-L", type=int, default=2)
    parser.add_argument("--skip-fashion", action="store_true")
    parser.add_argument("--scaling", default=None, help="comma-separated sample counts: time per feature")
    parser.add_argument("--scaling-features", default="64", help="features per N (one value, or one per N)")
    args = parser.parse_args()
    if args.scaling:
        scaling(args)
        return

    rows = []
    concepts, _ = synthetic.concept_labels(args.samples)
    acts = synthetic.activations(concepts, args.features)
    labeler = ConceptLabeler(concepts, device=args.device)
    labeler.label(acts[:, :8], L=3, B=3, progress=False)  # warm-up
    rss_before = peak_rss_gb()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = labeler.label(acts, L=3, B=3, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    fast_total = time.perf_counter() - start
    fast_per_feature = fast_total / args.features
    memory = f"peak RSS {peak_rss_gb():.2f} GB (before: {rss_before:.2f} GB)"
    if args.device.startswith("cuda"):
        memory += f", GPU peak {torch.cuda.max_memory_allocated() / 1024 ** 3:.2f} GB"
    rows.append((f"layer N={args.samples:,} K={concepts.n_concepts:,} F={args.features} L=3 B=3 ({args.device})",
                 f"{fast_total:.2f} s ({1000 * fast_per_feature:.1f} ms/feature)", memory))
    median_auc = float(np.median([beam[0].auc for beam in result if beam]))
    rows.append(("median best AUC of the synthetic layer", f"{median_auc:.4f}", ""))

    # the slow per-candidate algorithm on a few features, same L as named
    from slow_invert import slow_beam_search

    dense = concepts.dense().numpy()
    names = concepts.names
    slow_times, fast_l_times = [], []
    for f in range(args.slow_features):
        start = time.perf_counter()
        slow = slow_beam_search(acts[:, f], dense, names, L=args.slow_L, B=3, max_fraction=0.5)
        slow_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        fast = labeler.label(acts[:, f:f + 1], L=args.slow_L, B=3, progress=False)
        fast_l_times.append(time.perf_counter() - start)
        if abs(slow[0][1] - fast[0][0].auc) > 1e-9 and slow[0][1] > fast[0][0].auc:
            raise SystemExit(f"fast search lost against the slow one on feature {f}")
    slow_per_feature = float(np.mean(slow_times))
    start = time.perf_counter()
    labeler.label(acts, L=args.slow_L, B=3, progress=False)
    fast_layer_l = (time.perf_counter() - start) / args.features
    rows.append((f"slow per-candidate search, L={args.slow_L}, per feature (mean of {args.slow_features})",
                 f"{slow_per_feature:.1f} s", ""))
    rows.append((f"fast search inside a layer, L={args.slow_L}, per feature",
                 f"{1000 * fast_layer_l:.1f} ms", f"speed-up {slow_per_feature / fast_layer_l:,.0f}x"))
    rows.append((f"fast search on one feature alone, L={args.slow_L}",
                 f"{1000 * float(np.mean(fast_l_times)):.0f} ms",
                 f"speed-up {slow_per_feature / float(np.mean(fast_l_times)):,.0f}x"))

    fashion = HERE.parent.parent / "shared" / "data" / "fashion-mnist-crp"
    if not args.skip_fashion and fashion.is_dir():
        from fashion_mnist import fashion_layer_check

        for row in fashion_layer_check(fashion, args.device):
            rows.append(row)

    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| what | time | notes |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def scaling(args) -> None:
    """Time per feature at every N of ``--scaling`` (in memory, default feature batch), against N log N."""
    import math

    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| N | features | wall s | wall ms / feature | CPU ms / feature | growth of wall per feature "
          "vs the first N | N log N growth |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    first = None
    sizes = [int(v) for v in args.scaling.split(",")]
    counts = [int(v) for v in args.scaling_features.split(",")]
    for n, n_features in zip(sizes, counts * len(sizes) if len(counts) == 1 else counts, strict=True):
        concepts, _ = synthetic.concept_labels(n)
        acts = synthetic.activations(concepts, n_features)
        labeler = ConceptLabeler(concepts, device=args.device)
        labeler.label(acts[:, :2], L=3, B=3, progress=False)  # warm-up, prepares the labels
        wall, cpu = time.perf_counter(), time.process_time()
        labeler.label(acts, L=3, B=3, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        per_feature = wall / n_features
        first = first or (n, per_feature)
        growth = per_feature / first[1]
        n_log_n = n * math.log(n) / (first[0] * math.log(first[0]))
        print(f"| {n:,} | {n_features} | {wall:.2f} | {1000 * per_feature:.1f} | "
              f"{1000 * cpu / n_features:.1f} | {growth:.1f}x | {n_log_n:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
