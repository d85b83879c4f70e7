"""Issue 22: where a ``crp-invert label`` run spends its time, stage by stage, in one process.

    python benchmarks/bench_stages.py CACHE CONCEPTS [crp-invert label options]
    python benchmarks/bench_stages.py /tmp/crp-invert-bench-imagenet/layer4_1280000x256.h5 \\
        /tmp/crp-invert-bench-imagenet/labels_1280000.npz -L 3 -B 3 -q --out /tmp/l.json --overwrite

(the files of ``bench_imagenet.py --features 256 --keep``). Runs the command in this process with timers wrapped
around the labeling's stages (reading, the finite check, ranking one column, the concepts' rank sums, the beam
search) and prints, per stage and thread kind: calls, wall and CPU seconds, minor page faults; then the
process's wall and CPU seconds after ``import torch``, the cores kept busy, and when the first batch started.
A benchmark only: it replaces module attributes for the run.
"""
from __future__ import annotations

import collections
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import crp_invert.core.labeling as labeling  # noqa: E402
import crp_invert.core.metrics as metrics  # noqa: E402
import crp_invert.core.search as search  # noqa: E402

STAGES = [(labeling, "read_feature_columns"), (labeling, "check_finite"), (metrics, "_rank_column"),
          (search, "_concept_rank_sums"), (search, "_search_features")]
EVENTS: list[tuple] = []


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def timed(module, name: str) -> None:
    """Replace ``module.name`` by a wrapper recording (stage, thread, start, end, thread CPU, faults)."""
    function = getattr(module, name)

    def wrapper(*args, **kwargs):
        start, cpu, faults = time.perf_counter(), time.thread_time(), _faults()
        try:
            return function(*args, **kwargs)
        finally:
            EVENTS.append((name, threading.current_thread().name, start, time.perf_counter(),
                           time.thread_time() - cpu, _faults() - faults))

    setattr(module, name, wrapper)


def report(started: float, usage_before) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime
    system = usage.ru_stime - usage_before.ru_stime
    print(f"after import torch: wall {wall:.2f} s, CPU {cpu:.2f} s (system {system:.2f}),"
          f" cores busy {cpu / wall:.2f}, peak RSS {usage.ru_maxrss / 1024 ** 2:.2f} GiB, "
          f"minor faults {usage.ru_minflt - usage_before.ru_minflt:,}")
    if EVENTS:
        print(f"first stage at {min(e[2] for e in EVENTS) - started:.2f} s, last stage ended at "
              f"{max(e[3] for e in EVENTS) - started:.2f} s")
    totals: dict = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])
    for name, thread, start, end, cpu_seconds, faults in EVENTS:
        kind = "MainThread" if thread == "MainThread" else "worker threads"
        row = totals[(name, kind)]
        row[0] += 1
        row[1] += end - start
        row[2] += cpu_seconds
        row[3] += faults
    print("\n| stage | thread | calls | wall s (summed over threads) | CPU s | minor faults |\n"
          "| --- | --- | ---: | ---: | ---: | ---: |")
    for (name, kind), (calls, wall_seconds, cpu_seconds, faults) in sorted(totals.items()):
        print(f"| {name} | {kind} | {calls} | {wall_seconds:.2f} | {cpu_seconds:.2f} | {faults:,} |")


def main() -> None:
    for module, name in STAGES:
        timed(module, name)
    from crp_invert.cli import main as cli

    started, usage_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    try:
        cli(["label"] + sys.argv[1:], prog_name="bench_stages.py", standalone_mode=False)
    finally:
        if EVENTS:  # nothing labeled (--help, an error before the first batch): nothing to report
            report(started, usage_before)


if __name__ == "__main__":
    main()
