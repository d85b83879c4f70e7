"""The search's memory model (issue 13) against measured peak RSS: bytes per sample and feature, the
working memory of each phase, and the fixed part.

    python benchmarks/bench_memory.py [--n 1280000] [--features 128]
    python benchmarks/bench_memory.py --whole 50000x512,1280000x256 --pressure 3
        # whole runs from an ActivationCache: the model's predicted peak against the measured one

Every per-phase measurement runs in a fresh child process with glibc told to return freed blocks to the
system (``MALLOC_MMAP_THRESHOLD_=65536``; ``--whole`` runs keep glibc's and torch's defaults, as a user has
them), and resets the process's peak RSS (``/proc/self/clear_refs``) right before the measured step, so that
the peak minus the RSS before it is what the step held at once. Prints one markdown row per phase: the model's
bytes (``crp_invert.core.search.SearchMemory``, the constants in
``core/search.py`` and ``core/metrics.py``) and the measured ones.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

MARK = "BENCH-MEMORY "


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1)) * 1024


def _reset_peak() -> int:
    """Reset the peak RSS to the current RSS; returns the current RSS."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    return _status("VmRSS")


def _peak_since(base: int) -> int:
    return _status("VmHWM") - base


def child(phase: str, n: int, n_features: int) -> dict:
    """Measure one phase in this (fresh) process."""
    import numpy as np
    import synthetic
    import torch

    from crp_invert import ConceptLabels
    from crp_invert.core import metrics, search

    torch.set_num_threads(1)
    if phase == "ranking":
        scores = torch.from_numpy(np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32))
        base = _reset_peak()
        metrics.compact_ranks(scores[:, :1])
        return {"bytes": _peak_since(base), "per": n}
    if phase == "lists":
        # two concepts on about half of the samples each, joined by OR, and the statistics of the
        # result AND every concept: a sample list of 0.75 N with the working memory of 1.5 N elements
        rng = np.random.default_rng(0)
        dense = rng.random((n, 10)) < np.array([0.49, 0.49] + [0.3] * 8)
        prepared = search.prepare_labels(ConceptLabels(dense, [f"c{i}" for i in range(10)]).torch_sparse_t())
        del dense
        doubled = metrics.compact_ranks(torch.from_numpy(rng.random(n))).doubled
        prims, ops, length = torch.tensor([[[0, 1]]]), torch.tensor([[[-1, 1]]]), torch.tensor([[2]])
        memory = search.SearchMemory(n, 10, 1, 2)
        base = _reset_peak()
        search._and_statistics(doubled, prepared, prims, ops, length, torch.zeros(1, 10, dtype=torch.float64),
                               memory.list_elements())
        return {"bytes": _peak_since(base), "per": memory.list_elements()}
    if phase == "candidates":
        # many candidates, few samples: B = 30, K = 1,481 (177,750 candidates per feature and step)
        concepts, _ = synthetic.concept_labels(2000)
        prepared = search.prepare_labels(concepts.torch_sparse_t())
        ranked = metrics.compact_ranks(torch.from_numpy(synthetic.activations(concepts, n_features)))
        memory = search.SearchMemory(2000, concepts.n_concepts, 30, 3)
        base = _reset_peak()
        search.beam_search(ranked, prepared, L=3, B=30, memory_bytes=1 << 40)
        return {"bytes": _peak_since(base), "per": n_features * memory.n_candidates}
    if phase in ("fixed", "labeling"):
        base_process = _status("VmRSS")
        concepts, _ = synthetic.concept_labels(n)
        acts = synthetic.activations(concepts, n_features)
        from crp_invert import ConceptLabeler

        labeler = ConceptLabeler(concepts)
        before = _reset_peak()
        labeler.label(acts[:, :1], L=3, B=3, progress=False)  # prepares the labels
        prepare_peak = _peak_since(before)
        after_prepare = _status("VmRSS")
        if phase == "fixed":
            return {"process": base_process, "concepts": before - base_process,
                    "prepared": after_prepare - before, "prepare_peak": prepare_peak}
        base = _reset_peak()
        tick = time.perf_counter()
        labeler.label(acts, L=3, B=3, progress=False)
        return {"bytes": _peak_since(base), "seconds": time.perf_counter() - tick}
    if phase == "run":
        return whole_run(Path(os.environ["BENCH_MEMORY_DIR"]), n, n_features)
    raise ValueError(phase)


def whole_run(folder: Path, n: int, n_features: int) -> dict:
    """Label the layer of an ActivationCache as ``crp-invert label`` does (the default budget, torch's
    threads): the peak RSS against the model's prediction, the RSS before labeling (the process, the concepts,
    the open cache) + the prepared labels (their arrays) + the batches in flight as planned."""
    from crp_invert import ActivationCache, ConceptLabeler, ConceptLabels, label_cache
    from crp_invert.core.labeling import planned_memory
    from crp_invert.core.params import SearchParams
    from crp_invert.core.search import default_memory_budget

    concepts = ConceptLabels.load(folder / f"labels_{n}.npz")
    with ActivationCache(folder / f"layer4_{n}x{n_features}.h5") as cache:
        base = _reset_peak()
        budget = default_memory_budget("cpu")
        plan = planned_memory(cache.dataset("layer4", "activation"), concepts, SearchParams(L=3, B=3))
        labeler = ConceptLabeler(concepts)
        tick = time.perf_counter()
        label_cache(labeler, cache, progress=False, L=3, B=3)
        seconds = time.perf_counter() - tick
        peak = _status("VmHWM")
    return {"base": base, "prepared": labeler.prepared_nbytes, "in_flight": plan["in_flight_bytes"],
            "batch": plan["feature_batch_size"], "prefetch": plan["prefetch"], "peak": peak, "seconds": seconds,
            "budget": budget}


def measure(phase: str, n: int, n_features: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", phase, "--n", str(n), "--features", str(n_features)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith(MARK))[len(MARK):])


def measure_run(folder: Path, n: int, n_features: int) -> dict:
    """:func:`whole_run` in a fresh process with the environment a user has (glibc's and torch's defaults)."""
    env = dict(os.environ, BENCH_MEMORY_DIR=str(folder),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", "run", "--n", str(n), "--features", str(n_features)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith(MARK))[len(MARK):])


def ensure_layer(folder: Path, n: int, n_features: int) -> None:
    """The synthetic layer and its concepts of ``bench_imagenet.py`` in ``folder`` (written once)."""
    import synthetic
    from bench_imagenet import write_cache

    from crp_invert import ConceptLabels

    folder.mkdir(parents=True, exist_ok=True)
    labels = folder / f"labels_{n}.npz"
    if not labels.exists():
        synthetic.concept_labels(n)[0].save(labels)
    cache = folder / f"layer4_{n}x{n_features}.h5"
    if not cache.exists():
        write_cache(cache, ConceptLabels.load(labels), n_features)


@contextlib.contextmanager
def memory_pressure(leave_bytes: int | None) -> Iterator[None]:
    """Another process holding all but ``leave_bytes`` of the available memory (None: nothing held)."""
    if leave_bytes is None:
        yield
        return
    with open("/proc/meminfo", encoding="ascii") as handle:
        available = int(re.search(r"MemAvailable:\s+(\d+)", handle.read()).group(1)) * 1024
    hold = max(0, available - leave_bytes)
    hog = subprocess.Popen([sys.executable, "-c", "import numpy, sys, time; a = numpy.ones(int(sys.argv[1]), "
                            "dtype=numpy.uint8); print('held', flush=True); time.sleep(86400)", str(hold)],
                           stdout=subprocess.PIPE, text=True)
    try:
        hog.stdout.readline()
        yield
    finally:
        hog.kill()
        hog.wait()


def print_whole_runs(folder: Path, runs: list[tuple[int, int]], leave_gib: float | None) -> None:
    """One row per layer and memory condition: the model's prediction of the peak RSS against the peak."""
    import platform

    mib = 1 << 20
    print(f"# bench_memory --whole: K = 1,481, L = 3, B = 3, synthetic layers from an ActivationCache; "
          f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    print("\n| N | F | free memory | budget | batches | before labeling | prepared labels | batches in flight "
          "(model) | predicted peak | measured peak | measured / predicted |\n" + "| --- " * 11 + "|")
    for n, n_features in runs:
        ensure_layer(folder, n, n_features)
        for leave in [None] + ([int(leave_gib * (1 << 30))] if leave_gib else []):
            with memory_pressure(leave):
                row = measure_run(folder, n, n_features)
            predicted = row["base"] + row["prepared"] + row["in_flight"]
            condition = "idle machine" if leave is None else f"{leave_gib:g} GiB left (another process holds the rest)"
            batches = f"{row['batch']}{' x 2 in flight' if row['prefetch'] else ''}"
            print(f"| {n:,} | {n_features:,} | {condition} | {row['budget'] / mib:.0f} MiB | {batches} | "
                  f"{row['base'] / mib:.0f} MiB | {row['prepared'] / mib:.0f} MiB | {row['in_flight'] / mib:.0f} MiB | "
                  f"{predicted / mib:.0f} MiB | {row['peak'] / mib:.0f} MiB | {row['peak'] / predicted:.2f} |",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_280_000)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--whole", default=None,
                        help="comma-separated NxF layers labeled from an ActivationCache as the CLI does, e.g. "
                             "50000x512,1280000x256: the model's predicted peak against the measured one")
    parser.add_argument("--pressure", type=float, default=None,
                        help="with --whole, also measure with only this many GiB left available")
    parser.add_argument("--dir", default="/tmp/crp-invert-bench-imagenet", help="where --whole keeps its files")
    args = parser.parse_args()
    if args.child:
        print(MARK + json.dumps(child(args.child, args.n, args.features)), flush=True)
        return
    if args.whole:
        runs = [tuple(int(v) for v in item.lower().split("x")) for item in args.whole.split(",")]
        print_whole_runs(Path(args.dir), runs, args.pressure)
        return

    import platform

    from crp_invert.core.metrics import RANK_BYTES_PER_SAMPLE
    from crp_invert.core.search import _CANDIDATE_BYTES, _LIST_BYTES, SearchMemory, default_memory_budget

    n, mib = args.n, 1 << 20
    print(f"# bench_memory: N = {n:,}, K = 1,481, L = 3, B = 3; {platform.machine()}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| what | model | measured (peak RSS) |\n| --- | --- | --- |")
    row = measure("ranking", n, 1)
    print(f"| ranking one feature (float32 scores without ties), bytes per sample | {RANK_BYTES_PER_SAMPLE} | "
          f"{row['bytes'] / row['per']:.1f} |", flush=True)
    row = measure("lists", n, 1)
    print(f"| sample lists of one formula (0.75 N samples) and their pairs with concepts, bytes per list element "
          f"of the working memory | {_LIST_BYTES} | {row['bytes'] / row['per']:.1f} |", flush=True)
    row = measure("candidates", n, 16)
    print(f"| scoring candidates (B = 30, K = 1,481, 16 features, N = 2,000), bytes per candidate and feature | "
          f"{_CANDIDATE_BYTES} (plus the top entries) | {row['bytes'] / row['per']:.1f} |", flush=True)
    row = measure("fixed", n, 1)
    print(f"| fixed: Python, torch, numpy, scipy, crp_invert | | {row['process'] / mib:.0f} MiB |")
    print(f"| fixed: the concept labels (synthetic, ConceptLabels) | | {row['concepts'] / mib:.0f} MiB |")
    print(f"| fixed: the prepared labels kept by the labeler (peak while preparing) | | "
          f"{row['prepared'] / mib:.0f} MiB ({row['prepare_peak'] / mib:.0f} MiB) |", flush=True)
    from crp_invert.core.labeling import batch_plan

    memory = SearchMemory(n, 1481, 3, 3)
    budget = default_memory_budget("cpu")
    # as label_array plans it: one batch, or two in flight (the next read and ranked while one is searched)
    batch, prefetch, part = batch_plan(memory, args.features, budget, itemsize=4)
    working = memory.working_memory(part)
    model = (2 if prefetch else 1) * (min(batch, args.features) * memory.feature_bytes(4) + working)
    row = measure("labeling", n, args.features)
    print(f"| labeling {args.features} features in memory (default budget {budget / mib:.0f} MiB: batches of "
          f"{batch}{', two in flight' if prefetch else ''}, working memory {working / mib:.0f} MiB each), peak "
          f"above the prepared labeler | "
          f"at most {model / mib:.0f} MiB (a batch as read, its ranks and rank sums + working memory) | "
          f"{row['bytes'] / mib:.0f} MiB ({row['seconds']:.1f} s) |", flush=True)


if __name__ == "__main__":
    main()
