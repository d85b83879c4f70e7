"""Issue 13: label an ImageNet-sized layer (ResNet50 layer4 on the 1.28 M training images) from an
ActivationCache on disk with ``crp-invert label``, in fresh processes, and measure time and peak memory.

    python benchmarks/bench_imagenet.py                      # N = 1,280,000, F = 2,048 (a 10.5 GB file)
    python benchmarks/bench_imagenet.py --features 256       # the quick version (1.3 GB)
    python benchmarks/bench_imagenet.py --n 200000 --features 64 --runs 1x2   # a small check
    python benchmarks/bench_imagenet.py --device cuda --runs 1x2             # the search on a GPU
    python benchmarks/bench_imagenet.py --features 256 --runs 1x1 --cores 0  # one core (the serial fraction)

Writes a synthetic layer (``benchmarks/synthetic.py``: 1,000 classes + 481 parents, K = 1,481, about
8.6 positive concepts per sample; every feature a ReLU of one concept plus noise) into an ActivationCache
in ``--dir`` (default under /tmp; removed afterwards unless ``--keep``) and the concepts into an ``.npz``,
then runs ``crp-invert label CACHE CONCEPTS -L 3 -B 3 -q --out labels.json`` for every ``--runs`` entry
``PROCESSESxTHREADS`` (torchrun for more than one process). The page cache holding the file is dropped
before every run (``posix_fadvise``), so the file is read from the disk. Prints markdown rows: wall time
of the whole command (start-up, loading the concepts and writing the JSON included), time per feature,
and the peak RSS of the largest process (``wait4``); then whether all runs gave identical labels.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))


def write_cache(path: Path, concepts, n_features: int) -> float:
    """Write the synthetic layer ``layer4`` into an ActivationCache; returns seconds."""
    import synthetic

    from crp_invert.storage.cache import ActivationCache

    tick = time.perf_counter()
    with ActivationCache(path, mode="a", overwrite=True) as cache:
        cache.initialize((0, concepts.n_samples))
        cache.add_layer("layer4", n_features, pooling="mean", fingerprint="bench-imagenet")
        for start, stop, block in synthetic.activation_blocks(concepts, n_features):
            cache.write("layer4", (start, stop), block)
            cache.mark_complete((start, stop), ["layer4"])
    return time.perf_counter() - tick


def run_label(cache: Path, labels: Path, out: Path, processes: int, threads: int, L: int, B: int,
              device: str = "cpu", cores: str | None = None) -> dict:
    """One ``crp-invert label`` run in a fresh process tree: wall seconds and the largest peak RSS."""
    from bench_scale import evict

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    command = ["-m", "crp_invert", "label", str(cache), str(labels), "-L", str(L), "-B", str(B),
               "--device", device, "-q", "--out", str(out), "--overwrite"]
    if processes > 1:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] + command
    evict(cache)
    tick = time.perf_counter()
    pin = [] if cores is None else ["taskset", "-c", cores]
    child = subprocess.Popen(pin + [sys.executable] + command, env=env)
    _pid, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - tick
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"crp-invert label failed with exit status {os.waitstatus_to_exitcode(status)}")
    return {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss / 1024 ** 2,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "sys_seconds": usage.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_280_000)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("-L", dest="L", type=int, default=3)
    parser.add_argument("-B", dest="B", type=int, default=3)
    parser.add_argument("--runs", default="1x2,2x1", help="comma-separated PROCESSESxTHREADS (default 1x2,2x1)")
    parser.add_argument("--device", default="cpu", help="passed to crp-invert label (cuda: the search on the GPU)")
    parser.add_argument("--dir", default="/tmp/crp-invert-bench-imagenet")
    parser.add_argument("--keep", action="store_true", help="keep the files (and reuse them next time)")
    parser.add_argument("--cores", default=None, help="run pinned to these CPUs (taskset -c), e.g. 0 for one core")
    args = parser.parse_args()

    import synthetic
    import torch

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / f"layer4_{args.n}x{args.features}.h5"
    labels = folder / f"labels_{args.n}.npz"
    print(f"# bench_imagenet: N = {args.n:,}, F = {args.features:,}, L = {args.L}, B = {args.B}; files in {folder}")
    if not labels.exists():
        concepts, _ = synthetic.concept_labels(args.n)
        concepts.save(labels)
    if not cache.exists():
        from crp_invert import ConceptLabels

        seconds = write_cache(cache, ConceptLabels.load(labels), args.features)
        print(f"wrote {cache} ({cache.stat().st_size / 1e6:,.0f} MB) in {seconds:.1f} s", flush=True)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| N | F | device | processes x threads | wall s (whole command) | s per feature | "
          "peak RSS (largest process, at exit) | CPU s (of which system) | cores busy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    outputs = []
    for run in args.runs.split(","):
        processes, threads = (int(v) for v in run.lower().split("x"))
        out = folder / f"labels_{processes}x{threads}.json"
        row = run_label(cache, labels, out, processes, threads, args.L, args.B, args.device, args.cores)
        outputs.append(out)
        print(f"| {args.n:,} | {args.features:,} | {args.device} | {processes} x {threads} | {row['seconds']:.1f} | "
              f"{row['seconds'] / args.features:.3f} | {row['peak_rss_gb']:.2f} GiB | {row['cpu_seconds']:.1f} "
              f"({row['sys_seconds']:.1f}) | {row['cpu_seconds'] / row['seconds']:.2f} |", flush=True)
    documents = [json.loads(path.read_text()) for path in outputs]
    same = all(d["features"] == documents[0]["features"] for d in documents)
    print(f"\nlabels identical across runs: {same if len(documents) > 1 else 'n/a (one run)'}")
    if not args.keep:
        for path in [cache, labels] + outputs:
            path.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


if __name__ == "__main__":
    main()
