"""The torch (device) kernels on the CPU against the numpy / scipy kernels on ``bench_exact.py``'s cases.

    python benchmarks/bench_backends.py                 # every case (the FashionMNIST ones where ../shared exists)
    python benchmarks/bench_backends.py --max-n 50000   # only the cases up to N = 50,000

One markdown row per case: formulas, AUCs and p-values (the final beams and, with memorize_states, every step)
identical between ``backend="auto"`` and ``backend="torch"`` on the CPU, and the seconds of each.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def rows(labels) -> list:
    beams = [labels] + list(labels.states or [])
    return [[[(str(e.formula), e.auc, e.p_value, e.fraction, e.validation_auc, e.validation_p_value) for e in beam]
             for beam in step] for step in beams]


def main() -> int:
    import bench_exact

    from crp_invert import ConceptLabeler

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-n", type=int, default=None, help="skip cases with more samples")
    args = parser.parse_args()
    print("| case | N | F | identical | auto (s) | torch (s) |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    all_identical = True
    for name, acts, concepts, kwargs in bench_exact.cases():
        if args.max_n is not None and concepts.n_samples > args.max_n:
            continue
        times, results = {}, {}
        for backend in ("auto", "torch"):
            tick = time.perf_counter()
            results[backend] = ConceptLabeler(concepts, backend=backend).label(acts, progress=False, **kwargs)
            times[backend] = time.perf_counter() - tick
        identical = rows(results["auto"]) == rows(results["torch"])
        all_identical &= identical
        print(f"| {name} | {concepts.n_samples:,} | {acts.shape[1]} | {identical} | {times['auto']:.2f} "
              f"| {times['torch']:.2f} |", flush=True)
    print(f"\nall identical: {all_identical}; {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
