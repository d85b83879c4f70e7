"""Scale benchmark: a 1 GB activation layer (N = 1,000,000, F = 256 float32) and K = 1,481 concepts.

Measures, on files written to ``--dir`` (default /tmp/crp-invert-bench-scale, never the repository):

1. append throughput while recording (rows appended in batches of ``--append-rows``; rows marked complete,
   which flushes, after every batch or every 2 s as the recorder does) for the default chunk shape of
   :func:`crp_invert.storage.h5.chunk_shape` and an alternative (``--alt-chunks``, default the earlier wide
   1024 x 256 chunks);
2. read throughput of column batches (``feature_batch_size`` columns at a time, as the labeler reads them)
   against the disk's sequential read speed (O_DIRECT reads, which bypass the page cache). The page cache
   cannot be dropped without root, so the file is evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)``:
   "cold" evicts before *every* column batch (a layer larger than RAM), "warm" reads from the page cache;
3. the labeler's memory per feature (peak RSS of fresh processes labeling a few features with two feature
   batch sizes), the feature batch size that keeps a process under ``--memory-gb``, and labeling all
   features with L = 2, B = 3 in 1 process and in 2 processes (torchrun, Gloo) under that bound, with
   the peak RSS of every process (``resource.getrusage``) and a check that both give identical labels.

Run: ``python benchmarks/bench_scale.py`` (about 15-25 minutes on 2 cores; ``--n 100000`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

MARK = "BENCH-RESULT "


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- writing -------------------------------------------------------------------------------------------------


def write_layer(
    path: Path, concepts, n_features: int, chunks, append_rows: int, flush_interval: float, seed: int = 1
) -> dict:
    """Write an [N, F] ReLU activation layer (each feature driven by one concept) row batch by row batch.

    Only the ``write`` + ``mark_complete`` calls are timed (what recording adds), not making the numbers.
    Rows are marked complete (which flushes the file) every ``flush_interval`` seconds, as the recorder does
    (its default is 2 s), or after every batch with 0.
    """
    from crp_invert.storage.cache import ActivationCache

    rng = np.random.default_rng(seed)
    n = concepts.n_samples
    drivers = rng.integers(0, concepts.n_concepts, size=n_features)
    csr = concepts.sparse().tocsc()[:, drivers].tocsr()  # [N, F] driver labels
    block = 1 << 16
    seconds, done, last_flush = 0.0, 0, time.perf_counter()
    with ActivationCache(path, mode="a", overwrite=True) as cache:
        cache.initialize((0, n))
        cache.add_layer("synthetic", n_features, chunks=chunks, pooling="mean", fingerprint="bench-scale")
        used = cache.info("synthetic")["chunks"]
        for start in range(0, n, block):
            stop = min(start + block, n)
            signal = 1.5 * csr[start:stop].toarray() + rng.normal(0.0, 1.0, size=(stop - start, n_features))
            values = np.maximum(signal - 0.5, 0.0).round(2).astype(np.float32)
            tick = time.perf_counter()
            for row in range(start, stop, append_rows):
                end = min(row + append_rows, stop)
                cache.write("synthetic", (row, end), values[row - start : end - start])
                if flush_interval == 0 or time.perf_counter() - last_flush >= flush_interval:
                    cache.mark_complete((done, end), ["synthetic"])  # flushes, as the recorder does
                    done, last_flush = end, time.perf_counter()
            seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        cache.mark_complete((done, n), ["synthetic"])
        seconds += time.perf_counter() - tick
    size = n * n_features * 4
    return {
        "chunks": tuple(used),
        "seconds": seconds,
        "mb_s": size / seconds / 1e6,
        "file_mb": path.stat().st_size / 1e6,
    }


# -- reading -------------------------------------------------------------------------------------------------


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages; works without root)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read(path: Path, direct: bool, block: int = 8 << 20) -> float:
    """MB/s of reading the whole file in ``block`` pieces (O_DIRECT: from the disk, not the page cache)."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, flags)
    total = 0
    tick = time.perf_counter()
    try:
        while True:
            got = os.readv(fd, [buffer])
            total += got
            if got < block:
                break
    finally:
        os.close(fd)
    return total / (time.perf_counter() - tick) / 1e6


def column_reads(path: Path, feature_batch_size: int, cold: bool) -> dict:
    """Read every column in batches as the labeler does (through ActivationCache); MB/s of delivered data."""
    from crp_invert.storage.cache import ActivationCache

    if not cold:
        sequential_read(path, direct=False)  # bring the file into the page cache
    seconds, delivered = 0.0, 0
    with ActivationCache(path) as cache:
        data = cache.dataset("synthetic")
        for start in range(0, data.shape[1], feature_batch_size):
            if cold:
                evict(path)
            tick = time.perf_counter()
            block = data[:, start : start + feature_batch_size]
            seconds += time.perf_counter() - tick
            delivered += block.nbytes
    return {"seconds": seconds, "mb_s": delivered / seconds / 1e6}


# -- labeling in fresh processes -----------------------------------------------------------------------------


def child(args) -> None:
    """Label (part of) the layer in this process; print one JSON line with time and peak RSS."""
    import torch

    from crp_invert import ConceptLabeler, ConceptLabels, label_cache
    from crp_invert.parallel.group import distributed_session, get_rank, get_world_size
    from crp_invert.parallel.labeling import ColumnSlice
    from crp_invert.storage.cache import ActivationCache

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with distributed_session():
        concepts = ConceptLabels.load(Path(args.dir) / "labels.npz")
        labeler = ConceptLabeler(concepts)
        base = rss_mb()
        tick = time.perf_counter()
        if args.limit:
            with ActivationCache(args.child) as cache:
                labeler.label(
                    ColumnSlice(cache.dataset("synthetic"), 0, args.limit),
                    L=args.L,
                    B=args.B,
                    feature_batch_size=args.fb,
                    progress=False,
                )
            result = None
        else:
            result = label_cache(
                labeler, args.child, L=args.L, B=args.B, feature_batch_size=args.fb, progress=False
            )["synthetic"]
        seconds = time.perf_counter() - tick
        if result is not None and get_rank() == 0 and args.out:
            result.to_json(args.out)
        print(
            MARK
            + json.dumps(
                {
                    "rank": get_rank(),
                    "world": get_world_size(),
                    "seconds": seconds,
                    "base_rss_mb": base,
                    "peak_rss_mb": rss_mb(),
                    "fb": args.fb,
                }
            ),
            flush=True,
        )


def run_child(script_args: list, nproc: int, threads: int) -> list:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    if nproc == 1:
        command = [sys.executable, str(Path(__file__).resolve())] + script_args
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(Path(__file__).resolve()),
        ] + script_args
    tick = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if result.returncode != 0:
        raise RuntimeError(f"child failed: {result.stderr[-4000:]}")
    rows = [json.loads(line[len(MARK) :]) for line in result.stdout.splitlines() if line.startswith(MARK)]
    for row in rows:
        row["wall_s"] = wall
    return sorted(rows, key=lambda row: row["rank"])


# -- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--dir", default="/tmp/crp-invert-bench-scale")
    parser.add_argument("--memory-gb", type=float, default=2.0)
    parser.add_argument("--append-rows", type=int, default=256)
    parser.add_argument(
        "--alt-chunks",
        default="1024,256",
        help="alternative chunk shape rows,cols (default: crp-invert's earlier wide chunks)",
    )
    parser.add_argument("-L", "--L", dest="L", type=int, default=2)
    parser.add_argument("-B", "--B", dest="B", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the files in --dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--fb", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import synthetic

    from crp_invert.core.labeling import default_feature_batch_size
    from crp_invert.core.labels import LayerLabels
    from crp_invert.storage.h5 import chunk_shape

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    n, n_features = args.n, args.features
    print(
        f"# bench_scale: N = {n:,}, F = {n_features}, K = 1,481, L = {args.L}, B = {args.B}, "
        f"bound {args.memory_gb} GB per process; files in {folder}"
    )

    tick = time.perf_counter()
    concepts, _ = synthetic.concept_labels(n)
    concepts.save(folder / "labels.npz")
    print(
        f"concept labels: {concepts.n_concepts} concepts, {concepts.sparse().nnz:,} positives, "
        f"{time.perf_counter() - tick:.1f} s"
    )

    # 1. appends
    alt = tuple(
        min(int(v), limit) for v, limit in zip(args.alt_chunks.split(","), (n, n_features), strict=True)
    )
    layouts = {"default": (folder / "acts_default.h5", None), "alternative": (folder / "acts_alt.h5", alt)}
    print("\n## append throughput (recording), rows appended in batches of", args.append_rows)
    print("| layout | chunk shape (rows x cols) | flush | append MB/s | seconds for 1 GB | file MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for flush_interval in (0.0, 2.0):
        for name, (path, chunks) in layouts.items():
            row = write_layer(path, concepts, n_features, chunks, args.append_rows, flush_interval)
            print(
                f"| {name} | {row['chunks'][0]} x {row['chunks'][1]} | "
                f"{'every batch' if flush_interval == 0 else f'every {flush_interval:g} s'} | "
                f"{row['mb_s']:.0f} | "
                f"{row['seconds']:.1f} | {row['file_mb']:.0f} |",
                flush=True,
            )
    del concepts

    # 2. sequential disk speed and column reads
    probe = layouts["default"][0]
    evict(probe)
    disk = sequential_read(probe, direct=True)
    sequential_read(probe, direct=False)
    cached = sequential_read(probe, direct=False)
    print(
        f"\nsequential read of the 1 GB file: disk (O_DIRECT, 8 MiB blocks) {disk:.0f} MB/s; "
        f"page cache {cached:.0f} MB/s"
    )

    # 3. memory per feature: two short labeling runs in fresh processes
    small, large = 2, 8
    rows = {}
    for fb in (small, large):
        rows[fb] = run_child(
            [
                "--child",
                str(probe),
                "--dir",
                str(folder),
                "--fb",
                str(fb),
                "--limit",
                str(fb),
                "-L",
                str(args.L),
                "-B",
                str(args.B),
            ],
            1,
            2,
        )[0]
    per_feature = (rows[large]["peak_rss_mb"] - rows[small]["peak_rss_mb"]) / (large - small) * (1 << 20)
    base = rows[small]["peak_rss_mb"] * (1 << 20) - small * per_feature
    bytes_per = per_feature / n
    budget = args.memory_gb * 1e9
    fb = int(max(1, (0.9 * budget - base) // per_feature))
    print(
        f"\n## labeler memory: peak RSS {rows[small]['peak_rss_mb']:.0f} MB with {small} features per batch, "
        f"{rows[large]['peak_rss_mb']:.0f} MB with {large}: {per_feature / 1e6:.0f} MB per feature = "
        f"{bytes_per:.0f} bytes per feature per sample (B = {args.B}); fixed part {base / 1e6:.0f} MB "
        f"(labels, torch, h5py; RSS after loading the labels {rows[small]['base_rss_mb']:.0f} MB)"
    )
    print(
        f"   default_feature_batch_size(N, B) = {default_feature_batch_size(n, args.B, n_concepts=1481)} "
        f"(the memory model of crp_invert.core.search.SearchMemory: 8 bytes per feature per sample for "
        f"float32 activations, besides the working memory); chosen for "
        f"{args.memory_gb} GB: feature_batch_size = {fb}"
    )

    print("\n## column-batch reads (feature_batch_size =", fb, "columns per read, all features)")
    print("| layout | page cache | seconds | MB/s delivered | vs disk sequential |")
    print("| --- | --- | --- | --- | --- |")
    for name, (path, _) in layouts.items():
        for cold in (True, False):
            row = column_reads(path, fb, cold)
            print(
                f"| {name} {chunk_shape(n, n_features) if name == 'default' else alt} | "
                f"{'evicted before every batch' if cold else 'warm'} | {row['seconds']:.1f} | "
                f"{row['mb_s']:.0f} | "
                f"{row['mb_s'] / disk:.2f}x |",
                flush=True,
            )

    # 4. labeling, 1 and 2 processes
    print(f"\n## labeling all {n_features} features, L = {args.L}, B = {args.B}, feature_batch_size = {fb}")
    print("| processes | torch threads each | wall s (incl. start) | labeling s | peak RSS per process MB |")
    print("| --- | --- | --- | --- | --- |")
    results = {}
    for nproc, threads in ((1, 2), (1, 1), (2, 1)):
        out = folder / f"labels_{nproc}x{threads}.json"
        got = run_child(
            [
                "--child",
                str(probe),
                "--dir",
                str(folder),
                "--fb",
                str(fb),
                "-L",
                str(args.L),
                "-B",
                str(args.B),
                "--out",
                str(out),
            ],
            nproc,
            threads,
        )
        results[(nproc, threads)] = out
        peaks = ", ".join("%.0f" % r["peak_rss_mb"] for r in got)
        print(
            f"| {nproc} | {threads} | {got[0]['wall_s']:.0f} | {max(r['seconds'] for r in got):.0f} | "
            f"{peaks} |",
            flush=True,
        )
    reference = LayerLabels.from_json(results[(1, 2)]).to_dict()
    same = all(LayerLabels.from_json(path).to_dict() == reference for path in results.values())
    print(f"\nlabels identical across 1 and 2 processes: {same}")
    if not args.keep:
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
