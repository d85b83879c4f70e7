"""The search's memory model (issue 13) against measured peak RSS: bytes per sample and feature, the
working memory of each phase, and the fixed part.

    python benchmarks/bench_memory.py [--n 1280000] [--features 128]

Every measurement runs in a fresh child process with glibc told to return freed blocks to the system
(``MALLOC_MMAP_THRESHOLD_=65536``), and resets the process's peak RSS (``/proc/self/clear_refs``) right
before the measured step, so that the peak minus the RSS before it is what the step held at once. Prints
one markdown row per phase: the model's bytes (``crp_invert.core.search.SearchMemory``, the constants in
``core/search.py`` and ``core/metrics.py``) and the measured ones.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
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
    raise ValueError(phase)


def measure(phase: str, n: int, n_features: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", phase, "--n", str(n), "--features", str(n_features)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith(MARK))[len(MARK):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_280_000)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(MARK + json.dumps(child(args.child, args.n, args.features)), flush=True)
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
