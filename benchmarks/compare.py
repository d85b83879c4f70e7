"""Issue 22: compare the speed of two commits, interleaved in one run, and print the ratios.

    python benchmarks/compare.py REV_A REV_B [--rounds 3] [--large] [--only core fashion]
    python benchmarks/compare.py main .            # "." is the working tree as it is (uncommitted changes too)

Each revision is checked out with ``git worktree`` into a temporary folder; the same workloads (defined here, in
the calling checkout, through the public API only) run in fresh processes with ``PYTHONPATH`` set to that
folder, in the order A B B A per round, so that a drift of the machine's load hits both alike. Per workload the
best of all rounds is compared: wall seconds and CPU seconds of the process (CPU time is the steadier figure
on a shared machine). Ratios are B / A: below 1 means B is faster.

Workloads (each skipped with a note where its data or packages are missing):

- ``core``: labeling synthetic ImageNet-like layers (``synthetic.py``, K = 1,481, L = 3, B = 3): N = 5,000 and
  50,000 with F = 64; with ``--large`` also N = 1,280,000 with F = 16.
- ``hdf5``: a synthetic layer labeled from an HDF5 file (``label_h5``, the CLI's path) in one process:
  N = 200,000 with F = 640 (0.5 GB, two batches or more); with ``--large`` N = 1,280,000 with F = 256 (1.3 GB).
  CPU / wall is the number of cores kept busy.
- ``fashion``: the shared FashionMNIST model's four layers, each labeled once by one labeler in the order a user
  labels them (the first-call cost), and linear1 again (best of 3).
- ``recording``: ``record_activations`` of the four FashionMNIST layers against a bare forward pass over the same
  DataLoader (interleaved), on the 5,000 val images and on them repeated 4x (the per-batch part).
- ``glocal``: ``decompose_batch`` of 32 FashionMNIST samples at linear1 (top_k = 8) and of 20 with all 120
  channels (top_k = 120): seconds per sample (1 torch thread).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = ("core", "hdf5", "fashion", "recording", "glocal")


# the workloads, run inside a revision's process ----------------------------------------------------------
def clock(fn, repeat: int = 1) -> dict:
    """Best wall and CPU seconds of ``repeat`` calls."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return {"wall": best_wall, "cpu": best_cpu}


def probe_core(large: bool) -> dict:
    import synthetic

    from crp_invert import ConceptLabeler

    sizes = [(5_000, 64), (50_000, 64)] + ([(1_280_000, 16)] if large else [])
    figures = {}
    for n, f in sizes:
        concepts, _ = synthetic.concept_labels(n)
        acts = synthetic.activations(concepts, f)
        labeler = ConceptLabeler(concepts)
        labeler.label(acts[:, :1], L=3, B=3, progress=False)  # set-up (prepared labels) outside the timing
        figures[f"core N={n:,} F={f}"] = clock(lambda lab=labeler, a=acts: lab.label(a, L=3, B=3, progress=False))
    return figures


def probe_hdf5(large: bool) -> dict:
    import h5py
    import synthetic

    from crp_invert import ConceptLabeler

    n, f = (1_280_000, 256) if large else (200_000, 640)
    concepts, _ = synthetic.concept_labels(n)
    labeler = ConceptLabeler(concepts)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "layer.h5"
        with h5py.File(path, "w") as handle:
            data = handle.create_dataset("Y", shape=(n, f), dtype="float32", chunks=(min(n, 1 << 16), 1))
            for start, stop, block in synthetic.activation_blocks(concepts, f):
                data[start:stop] = block
        labeler.label(concepts.dense()[:, :1].float().numpy(), L=1, B=1, progress=False)  # prepares the labels
        result = clock(lambda: labeler.label_h5(path, L=3, B=3, progress=False))
    result["cores busy"] = result["cpu"] / result["wall"]
    return {f"hdf5 N={n:,} F={f} (label_h5)": result}


def fashion_data():
    from fashion_mnist import data_dir, load

    folder = data_dir()
    if folder is None:
        raise FileNotFoundError("the shared FashionMNIST folder is missing")
    return load(folder)


def probe_fashion() -> dict:
    from fashion_mnist import CLASSES, HIERARCHY, LAYERS, pooled_activations

    from crp_invert import ConceptLabeler, ConceptLabels

    model, images, targets = fashion_data()
    acts = pooled_activations(model, images)
    concepts = ConceptLabels.from_targets(targets, CLASSES, hierarchy=HIERARCHY)
    labeler = ConceptLabeler(concepts)
    figures = {f"fashion {name} once": clock(lambda name=name: labeler.label(acts[name], L=3, B=3, progress=False))
               for name in LAYERS}
    figures["fashion linear1 repeated (best of 3)"] = clock(
        lambda: labeler.label(acts["linear1"], L=3, B=3, progress=False), repeat=3)
    return figures


def probe_recording() -> dict:
    import torch
    from fashion_mnist import LAYERS

    from crp_invert import record_activations

    model, images, targets = fashion_data()
    figures = {}
    for times, name in ((1, "recording"), (4, "recording 4x (20,000 samples)")):
        dataset = torch.utils.data.TensorDataset(images.repeat(times, 1, 1, 1), torch.from_numpy(targets).repeat(times))
        loader = torch.utils.data.DataLoader(dataset, batch_size=64)

        def bare(loader=loader):
            with torch.no_grad():
                for batch, _ in loader:
                    model(batch)

        with tempfile.TemporaryDirectory() as folder:
            def record(loader=loader, folder=folder):
                record_activations(model, loader, LAYERS, Path(folder) / "cache.h5", overwrite=True,
                                   progress=False).close()

            # interleaved, so that a drift of the load hits both alike
            for _ in range(3):
                for label, run in ((f"{name}: bare forward pass", bare), (f"{name}: record_activations", record)):
                    result = clock(run)
                    kept = figures.setdefault(label, result)
                    figures[label] = {key: min(kept[key], result[key]) for key in result}
    return figures


def probe_glocal() -> dict:
    import torch
    from crp.attribution import CondAttribution
    from zennit.composites import EpsilonPlus
    from zennit.torchvision import SequentialMergeBatchNorm

    from crp_invert.integration.glocal import decompose_batch

    model, images, targets = fashion_data()
    samples, target = images[:32], [int(t) for t in targets[:32]]
    attribution = CondAttribution(model)
    composite = EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])
    torch.set_num_threads(1)  # as bench_glocal.py: small passes suffer from thread contention

    def run():
        decompose_batch(attribution, samples, target, "linear1", composite, top_k=8, batch_size=64)

    def run_all():  # every channel of linear1, as issue 22 measured it
        decompose_batch(attribution, samples[:20], target[:20], "linear1", composite, top_k=120, batch_size=128)

    run()
    result = clock(run, repeat=3)
    all_channels = clock(run_all, repeat=3)
    return {"glocal decompose_batch (per sample)": {key: value / 32 for key, value in result.items()},
            "glocal decompose_batch top_k=120 (per sample)": {key: value / 20 for key, value in all_channels.items()}}


def probe(workload: str, large: bool) -> dict:
    try:
        if workload in ("core", "hdf5"):
            return globals()[f"probe_{workload}"](large)
        return globals()[f"probe_{workload}"]()
    except Exception as error:  # noqa: BLE001 - a missing data folder or package skips the workload
        return {"error": f"{type(error).__name__}: {error}"}


# the driver ------------------------------------------------------------------------------------------------
def checkout(rev: str, folder: Path) -> Path:
    """The source folder of ``rev``: the calling checkout for ".", else a detached worktree in ``folder``."""
    if rev == ".":
        return ROOT
    target = folder / rev.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(target), rev], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return target


def run_probe(source: Path, workload: str, large: bool, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), str(HERE)]), MPLBACKEND="Agg")
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", workload] + (["--large"] if large else [])
    try:
        completed = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        return {"error": f"exit status {completed.returncode}: {completed.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}" if a > 0 else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="*", help="REV_A REV_B (commits, branches; '.' = the working tree)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of A B B A (default 2)")
    parser.add_argument("--large", action="store_true", help="also N = 1,280,000 in the core workload")
    parser.add_argument("--only", nargs="*", choices=WORKLOADS, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per workload and revision")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.large)), flush=True)
        return 0
    if len(args.revs) != 2:
        parser.error("give two revisions: REV_A REV_B")
    workloads = args.only or list(WORKLOADS)
    best: dict = {rev: {} for rev in args.revs}
    errors: dict = {}
    with tempfile.TemporaryDirectory(prefix="compare_") as folder:
        sources = {}
        try:
            for rev in args.revs:
                sources[rev] = checkout(rev, Path(folder))
            order = [args.revs[0], args.revs[1], args.revs[1], args.revs[0]] * args.rounds
            for workload in workloads:
                for rev in order:
                    figures = run_probe(sources[rev], workload, args.large, args.timeout)
                    if "error" in figures:
                        errors[(rev, workload)] = figures["error"]
                        continue
                    for name, value in figures.items():
                        kept = best[rev].setdefault(name, {"wall": float("inf"), "cpu": float("inf")})
                        kept["wall"], kept["cpu"] = min(kept["wall"], value["wall"]), min(kept["cpu"], value["cpu"])
                    print(f"  {workload} @ {rev}: done", file=sys.stderr, flush=True)
        finally:
            for source in sources.values():
                if source != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(source)], cwd=ROOT,
                                   capture_output=True)
    a, b = args.revs
    print(f"| workload | {a} wall (s) | {b} wall (s) | wall B/A | {a} CPU (s) | {b} CPU (s) | CPU B/A "
          f"| cores busy A, B |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in best[a]:
        if name not in best[b]:
            continue
        x, y = best[a][name], best[b][name]
        print(f"| {name} | {x['wall']:.3f} | {y['wall']:.3f} | {ratio(x['wall'], y['wall'])} | {x['cpu']:.3f} "
              f"| {y['cpu']:.3f} | {ratio(x['cpu'], y['cpu'])} | {x['cpu'] / x['wall']:.2f}, "
              f"{y['cpu'] / y['wall']:.2f} |")
    for (rev, workload), error in errors.items():
        print(f"\n{workload} @ {rev}: {error}")
    print(f"\nbest of {args.rounds} rounds (A B B A); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"at the end, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
